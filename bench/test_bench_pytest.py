"""pytest-benchmark suite: the selection op and one guarded decode step, plus checks of the bench harness.

Nothing here asserts anything about time. CI runs the suite in a quick mode where every benchmarked
function runs exactly once:

    python -m pytest bench/test_bench_pytest.py --benchmark-disable -q

and a local measurement keeps the timings and compares runs:

    python -m pytest bench/test_bench_pytest.py --benchmark-only --benchmark-autosave
    python -m pytest bench/test_bench_pytest.py --benchmark-only --benchmark-compare

The decode step on the default model (SmolLM2-135M-Instruct, batch 32) runs when its converted
checkpoint is already cached (see `ngsd.loading`); elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json

import pytest
import torch

from harness import PeakMemory, TimingStreamer, median
from ngsd import NGSDConfig, guarded_generate
from ngsd.experts.lora import LoraAdapter
from ngsd.decoding.pair import AdapterPair
from ngsd_kernels import guarded_select
from tests.conftest import llama_pair, mixed_length_batch, tiny_lora_expert, tiny_model  # noqa: F401 (fixture)

VOCAB = 49152  # SmolLM2's vocabulary: the selection op's cost scales with it

SELECT_CASES = {
    "ngsd_greedy": NGSDConfig().step_params(5),
    "safedecoding_greedy": NGSDConfig(mode="safedecoding").step_params(0),
    "ngsd_sampling_top_p": NGSDConfig().step_params(5, temperature=0.7, top_p=0.9),
}


def step_inputs(batch: int, vocab: int = VOCAB, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, vocab, generator=generator) * 3
    expert = base + torch.randn(batch, vocab, generator=generator)
    potential = torch.rand(batch, generator=generator)
    alpha = torch.full((batch,), 0.9)
    seeds = torch.arange(batch, dtype=torch.int64)
    offset = torch.zeros(1, dtype=torch.int64)
    return base, expert, potential, alpha, seeds, offset


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_selection_op(benchmark, case, batch):
    inputs = step_inputs(batch)
    benchmark.group = f"selection op, batch {batch}, vocab {VOCAB}"
    tokens, potential, spike, divergence = benchmark(guarded_select, *inputs, SELECT_CASES[case])
    assert tokens.shape == (batch,) and ((tokens >= 0) & (tokens < VOCAB)).all()
    assert ((divergence >= 0) & (divergence <= 1)).all()
    assert potential.shape == spike.shape == (batch,)


def _decode_step_bench(benchmark, model, adapter: LoraAdapter, input_ids, mask, group: str, rounds: int = 5) -> None:
    """One decode step as the loop runs it: base and expert rows in one forward, then the selection op."""
    batch = input_ids.shape[0]
    config = NGSDConfig()
    alpha = torch.full((batch,), 0.9)
    seeds = torch.arange(batch, dtype=torch.int64)
    offset = torch.ones(1, dtype=torch.int64)

    def fresh_state():  # untimed: a new pair after its prefill, so every round steps from the same point
        pair = AdapterPair(model, adapter)
        with torch.no_grad():
            base = pair.prefill(input_ids, mask, guard_rows=range(batch)).base
        return (pair, base.argmax(-1), torch.zeros(batch)), {}

    def step(pair, tokens, potential):
        with torch.no_grad():
            base, expert = pair.step(tokens)
            return guarded_select(base, expert, potential, alpha, seeds, offset, config.step_params(1))

    benchmark.group = group
    tokens, _, _, _ = benchmark.pedantic(step, setup=fresh_state, rounds=rounds, iterations=1)
    assert tokens.shape == (batch,)


@pytest.mark.parametrize("batch", [1, 16])
def test_decode_step_tiny_model(benchmark, batch, tmp_path):
    model = tiny_model("llama", vocab_size=256)
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    input_ids, mask, _ = mixed_length_batch([5 + (i * 7) % 13 for i in range(batch)], 256, seed=batch)
    _decode_step_bench(benchmark, model, adapter, input_ids, mask, "decode step, tiny llama")


@pytest.fixture(scope="module")
def default_model():
    from ngsd.loading import is_converted, load_model

    if not is_converted():
        pytest.skip("the default model's converted checkpoint is not cached; run `python -m ngsd` once to convert it")
    return load_model(None)


def test_decode_step_default_model_batch32(benchmark, default_model, tmp_path):
    from harness import benchmark_prompts, make_random_lora
    from ngsd.api import encode_prompts
    from ngsd.data import data_available

    if not data_available():
        pytest.skip("benchmark prompts (../shared/data or $NGSD_DATA_DIR) not found")
    model, tokenizer = default_model
    adapter = LoraAdapter.load(make_random_lora(model, tmp_path / "lora"))
    input_ids, mask = encode_prompts(tokenizer, benchmark_prompts(32))
    try:
        _decode_step_bench(benchmark, model, adapter, input_ids, mask, "decode step, SmolLM2-135M, batch 32", rounds=3)
    finally:
        adapter.detach(model)


# ---------------------------------------------------------------------------------------------
# The harness itself (not benchmarks): what the timing scripts rely on
# ---------------------------------------------------------------------------------------------


def test_timing_streamer_sees_one_put_per_step_in_both_loops(llama_pair):
    """Per-step latency is read from streamer puts: prompt once, then one put per generated token."""
    model, folder = llama_pair
    input_ids, mask, _ = mixed_length_batch([4, 7], model.config.vocab_size, seed=2)
    guarded, plain = TimingStreamer("cpu"), TimingStreamer("cpu")
    out = guarded_generate(model, input_ids, mask, expert=folder, alpha=0.5, max_new_tokens=6, streamer=guarded)
    model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                   pad_token_id=0, streamer=plain)
    assert out.sequences.shape[1] == input_ids.shape[1] + 6
    assert len(guarded.times) == len(plain.times) == 7
    assert guarded.times == sorted(guarded.times)


def test_loop_profiler_ranges_count_every_step(llama_pair):
    """The breakdown reads the loop's record_function ranges: one select per token, one forward between tokens."""
    from bench_breakdown import nested_seconds, range_times, summarise_loop
    from torch.profiler import ProfilerActivity, profile

    model, folder = llama_pair
    input_ids, mask, _ = mixed_length_batch([3, 6, 5], model.config.vocab_size, seed=4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = guarded_generate(model, input_ids, mask, expert=folder, alpha=0.5, max_new_tokens=5)
    ranges = range_times(prof)
    assert ranges["ngsd.select"]["calls"] == 5 and ranges["ngsd.forward"]["calls"] == 4  # no forward after the last
    assert all(r["host_s"] > 0 for r in ranges.values())
    # every row guarded: the step runs from final hidden states, its LM heads inside the step op's range
    assert out.traces[0].step_path == "hidden states"
    head = nested_seconds(prof, "ngsd.select")
    assert 0 < head < ranges["ngsd.select"]["host_s"]
    rounds = [{"step_s": 0.1, "cpu_step_s": 0.2, "profiled_step_s": 0.12, "forward_share": 0.7, "lm_head_share": 0.1,
               "select_share": 0.05}]
    loop = summarise_loop(rounds)
    assert loop["forward_s"] == pytest.approx(0.07) and loop["lm_head_s"] == pytest.approx(0.01)
    assert loop["overhead_share"] == pytest.approx(0.15)
    assert "select_timed_share" not in loop  # a round from before the clock


def test_step_op_clock_times_every_step_less_its_lm_heads(llama_pair):
    """The unprofiled clock of the breakdown's target: one time per step, each below the step op's whole call."""
    import ngsd.decoding.step as step_module
    import ngsd_kernels.selector as selector_module
    from bench_breakdown import step_op_clock, summarise_loop

    model, folder = llama_pair
    input_ids, mask, _ = mixed_length_batch([3, 6, 5], model.config.vocab_size, seed=4)
    run, heads = step_module.GuardedStep.run, selector_module.pair_logits
    with step_op_clock("cpu") as selection:
        guarded_generate(model, input_ids, mask, expert=folder, alpha=0.5, max_new_tokens=5)
    assert (step_module.GuardedStep.run, selector_module.pair_logits) == (run, heads)  # put back
    assert len(selection) == 5 and all(s > 0 for s in selection)
    rounds = [{"step_s": 0.1, "cpu_step_s": 0.2, "profiled_step_s": 0.12, "forward_share": 0.7, "lm_head_share": 0.1,
               "select_share": 0.05, "select_timed_s": 0.002}]
    assert summarise_loop(rounds)["select_timed_share"] == pytest.approx(0.02)


def test_forward_variants_time_some_rows_guarded(llama_pair):
    """The `rows` command: R of B rows guarded, each variant timed, and the adapter taken off afterwards."""
    from bench_breakdown import forward_variants
    from harness import Setup

    model, folder = llama_pair
    adapter = LoraAdapter.load(folder)
    setup = Setup(model, None, "cpu", folder, adapter, "test")
    input_ids, mask, _ = mixed_length_batch([3, 6, 5, 4], model.config.vocab_size, seed=5)
    for rows in (1, 4):
        out = forward_variants(setup, input_ids, mask, context=9, calls=2, expert_rows=rows)
        assert out["expert_rows"] == rows and out["context_tokens"] == 9
        assert all(out[name] > 0 for name in ("base_rows", "base_and_expert_rows_no_lora", "base_and_expert_rows_lora"))
        assert out["lora_hooks_s"] == pytest.approx(out["base_and_expert_rows_lora"] - out["base_and_expert_rows_no_lora"])
    assert not adapter.is_attached(model)


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as memory:
        block = torch.ones(64, 2**20 // 4)  # 64 MiB, touched
        del block
    assert memory.peak_bytes - memory.before_bytes >= 48 * 2**20


def test_report_from_synthetic_results(tmp_path):
    """plots.write_report turns the JSON the benchmarks write into RESULTS.md and the two plots."""
    import plots

    env = {"date": "2026-01-01", "device": "cpu", "platform": "test", "cpu_count": 2, "torch_threads": 2,
           "torch": "x", "transformers": "y", "load_average_at_start": [1.0, 1.0, 1.0]}
    meta = {"environment": env, "model": "m", "dtype": "torch.float32",
            "expert": {"source": "s", "lora_adapter_bytes": 2**20, "expert_model_parameter_bytes": 2**29}}

    def method(tps: float, ratio: float) -> dict:
        return {"median_tokens_per_s": tps, "ratio_to_unguarded": ratio, "cpu_ratio_to_unguarded": ratio + 0.1,
                "median_ttft_s": 0.1, "median_step_latency_s": 0.05, "peak_memory_bytes": 2**30}

    e2e = {**meta, "new_tokens": 8, "repeats": 1, "alpha": 0.9, "batches": {
        str(b): {"methods": {"unguarded": method(10.0 * b, 1.0), "ngsd_lora": method(6.5 * b, r)}}
        for b, r in ((1, 0.65), (32, 0.45))}}
    loop = {"step_s": 0.2, "forward_s": 0.18, "select_s": 0.005, "overhead_s": 0.015, "forward_share": 0.9,
            "select_share": 0.025, "overhead_share": 0.075}
    breakdown = {**meta, "steps": 4, "batches": {"32": {
        "loop": loop, "plain_generate_step_s": 0.12, "select_alone": {"ngsd_greedy": 0.004},
        "forward_alone": {"base_rows": 0.1, "base_and_expert_rows_no_lora": 0.15, "base_and_expert_rows_lora": 0.17}}}}
    (tmp_path / "e2e.json").write_text(json.dumps(e2e))
    (tmp_path / "breakdown.json").write_text(json.dumps(breakdown))
    assert plots.write_report(tmp_path) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| NGSD + LoRA throughput / unguarded, batch 1 | >= 0.60 | 0.65 | met | 0.75 | met |" in text
    assert "| NGSD + LoRA throughput / unguarded, batch 32 | >= 0.50 | 0.45 | missed | 0.55 | met |" in text
    assert "| selection op share of a decode step, batch 32 | <= 3% | 2.5% | met | - | not measured |" in text
    loop.update(select_timed_s=0.007, select_timed_share=0.035)  # the clocked figure, when measured, is the target's
    (tmp_path / "breakdown.json").write_text(json.dumps(breakdown))
    assert plots.write_report(tmp_path) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| selection op share of a decode step, batch 32 | <= 3% | 3.5% | missed | - | not measured |" in text
    assert "| 7.0 (3.5%) |" in text
    assert "| 32 | 200.0 | 180.0 (90%) | - (not measured apart) | 5.0 (2.5%) |" in text  # written before the split
    assert "not measured" in text  # no naive.json
    # each part with its own command and commit (it said `all` and one part's date for every part)
    e2e["command"] = "python bench/bench_decode.py e2e --batch-sizes 2"
    e2e["environment"] = {**env, "git": {"commit": "abc1234"}}
    (tmp_path / "e2e.json").write_text(json.dumps(e2e))
    assert plots.write_report(tmp_path) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "- e2e: `python bench/bench_decode.py e2e --batch-sizes 2`, 2026-01-01, commit abc1234, load 1.0" in text
    assert "- breakdown: `python bench/bench_decode.py all`, 2026-01-01, commit unknown" in text
    assert (tmp_path / "throughput.png").stat().st_size > 0 and (tmp_path / "breakdown.png").stat().st_size > 0


def test_median_of_even_count():
    assert median([1.0, 3.0, 2.0, 10.0]) == 2.5


def test_resume_keeps_only_batches_measured_with_the_same_settings(tmp_path):
    from bench_decode import _earlier_e2e

    settings = {"new_tokens": 128, "repeats": 3, "alpha": 0.9, "methods": ["unguarded", "ngsd_lora"]}
    path = tmp_path / "e2e.json"
    assert _earlier_e2e(path, settings) == {}
    path.write_text(json.dumps({**settings, "batches": {"1": {"methods": {}}}}))
    assert list(_earlier_e2e(path, settings)) == ["1"]
    assert _earlier_e2e(path, {**settings, "new_tokens": 64}) == {}


def test_naive_reference_baseline_decodes_like_the_spec_oracle():
    """The benchmark's no-cache baseline does the same work as the float64 spec decoder."""
    from naive_reference import TimedForward, naive_reference_decode
    from tests.naive_ngsd import last_logits, naive_decode

    base, expert = tiny_model("llama", seed=0), tiny_model("llama", seed=3)
    prompt = [5, 9, 14, 22]
    want, want_spikes = naive_decode(last_logits(base), last_logits(expert), prompt, alpha=0.9, max_new_tokens=10)
    base_fn, expert_fn = TimedForward(base), TimedForward(expert)
    got, spikes = naive_reference_decode(base_fn, expert_fn, prompt, alpha=0.9, max_new_tokens=10)
    assert got == want and spikes == want_spikes and any(spikes)
    assert base_fn.seconds > 0 and expert_fn.seconds > 0


def test_benchmark_prompts_past_160_are_distinct():
    """Past MT-Bench's 80 prompts, each AdvBench prompt was paired with itself (n=256 gave 208 distinct prompts)."""
    from harness import benchmark_prompts

    prompts = benchmark_prompts(256)
    assert len(prompts) == 256 == len(set(prompts))
    assert benchmark_prompts(160)[:4] == prompts[:4]


def test_count_options_are_one_line_errors(capsys):
    """--batch-sizes 0, --new-tokens 0, --repeats 0 failed with tracebacks after the model loaded."""
    import bench_decode

    for argv in (["e2e", "--batch-sizes", "0"], ["e2e", "--new-tokens", "-3"], ["naive", "--repeats", "0"]):
        with pytest.raises(SystemExit) as stop:
            bench_decode.main(argv)
        assert stop.value.code == 2 and "whole number >= 1" in capsys.readouterr().err
