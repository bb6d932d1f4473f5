"""The guarded loop against the naive per-sequence decoder, batch invariance, modes and errors."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import PeftModel

import ngsd
from ngsd import NGSDConfig, guarded_generate
from ngsd.experts.lora import LoraAdapter

from .conftest import in_another_thread_at, mixed_length_batch, tiny_lora_expert, tiny_model
from .naive_ngsd import last_logits, naive_decode

# A low threshold makes the gate fire on random tiny models, so both branches are exercised.
GATE = dict(tau=4.0, v_th=0.6, rho=0.5, candidate_k=8)


def peft_expert_logits(model, folder):
    import copy

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    return last_logits(peft_model)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("mode", ["ngsd", "open", "safedecoding"])
def test_lora_expert_matches_naive_decoder(family, mode, tmp_path):
    model = tiny_model(family)
    folder = tiny_lora_expert(model, tmp_path / "lora")
    lengths = [5, 9, 3, 7]
    input_ids, mask, prompts = mixed_length_batch(lengths, model.config.vocab_size)
    alphas = [0.9, 0.5, 0.1, 0.7]
    config = NGSDConfig(mode=mode, **GATE)
    out = guarded_generate(model, input_ids, mask, expert=folder, config=config, alpha=alphas, max_new_tokens=12)
    base, expert = last_logits(model), peft_expert_logits(model, folder)
    for row, prompt in enumerate(prompts):
        expected_tokens, expected_spikes = naive_decode(
            base, expert, prompt, alpha=alphas[row], max_new_tokens=12, mode=mode,
            tau=4.0, v_th=0.6, rho=0.5, k=8,
        )
        assert out.traces[row].tokens == expected_tokens, f"row {row}"
        assert out.traces[row].spikes == expected_spikes, f"row {row}"
    if mode == "ngsd":
        assert any(any(t.spikes) for t in out.traces), "the gate never fired; the test would not see mixing"


def test_separate_expert_model_matches_naive_decoder():
    model = tiny_model("qwen2", seed=0)
    expert = tiny_model("qwen2", seed=5)
    input_ids, mask, prompts = mixed_length_batch([4, 8, 6], model.config.vocab_size, seed=3)
    out = guarded_generate(model, input_ids, mask, expert=expert, config=NGSDConfig(**GATE), alpha=0.9, max_new_tokens=10)
    for row, prompt in enumerate(prompts):
        expected, spikes = naive_decode(
            last_logits(model), last_logits(expert), prompt, alpha=0.9, max_new_tokens=10, tau=4.0, v_th=0.6, rho=0.5, k=8
        )
        assert out.traces[row].tokens == expected
        assert out.traces[row].spikes == spikes


def test_a_narrower_separate_expert_runs_on_hidden_states():
    """A small model of the family beside a large one (Qwen2.5-0.5B's 896-wide hidden states beside 7B's 3584)."""
    model = tiny_model("qwen2", seed=0)
    expert = tiny_model("qwen2", seed=5, hidden_size=64)
    input_ids, mask, prompts = mixed_length_batch([4, 8, 6], model.config.vocab_size, seed=3)
    out = guarded_generate(model, input_ids, mask, expert=expert, config=NGSDConfig(**GATE), alpha=0.9, max_new_tokens=10)
    assert out.traces[0].step_path == "hidden states"
    for row, prompt in enumerate(prompts):
        expected, spikes = naive_decode(
            last_logits(model), last_logits(expert), prompt, alpha=0.9, max_new_tokens=10, tau=4.0, v_th=0.6, rho=0.5, k=8
        )
        assert out.traces[row].tokens == expected
        assert out.traces[row].spikes == spikes


def test_gate_off_equals_plain_greedy_generate(llama_pair):
    model, folder = llama_pair
    input_ids, mask, _ = mixed_length_batch([6, 3, 8], model.config.vocab_size, seed=7)
    out = guarded_generate(model, input_ids, mask, expert=folder, config=NGSDConfig(mode="off"), max_new_tokens=10)
    plain = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    assert torch.equal(out.sequences, plain)


def test_batch_invariance_sixteen_rows(llama_pair):
    model, folder = llama_pair
    lengths = [3, 17, 8, 1, 12, 5, 20, 9, 2, 14, 6, 11, 4, 16, 7, 10]
    input_ids, mask, prompts = mixed_length_batch(lengths, model.config.vocab_size, seed=11)
    alphas = [0.1, 0.5, 0.9, 0.7] * 4
    config = NGSDConfig(**GATE)
    batch_out = guarded_generate(model, input_ids, mask, expert=folder, config=config, alpha=alphas, max_new_tokens=16)
    for row, prompt in enumerate(prompts):
        alone = guarded_generate(model, torch.tensor([prompt]), None, expert=folder, config=config, alpha=alphas[row],
                                 max_new_tokens=16)
        assert alone.traces[0].tokens == batch_out.traces[row].tokens, f"row {row}"
        assert alone.traces[0].spikes == batch_out.traces[row].spikes, f"row {row}"


def test_eos_freezes_a_row_and_per_row_lengths(llama_pair):
    model, folder = llama_pair
    input_ids, mask, _ = mixed_length_batch([5, 7, 4], model.config.vocab_size, seed=2)
    free = guarded_generate(model, input_ids, mask, expert=folder, config=NGSDConfig(**GATE), alpha=0.5,
                            max_new_tokens=[3, 9, 6])
    assert [len(t.tokens) for t in free.traces] == [3, 9, 6]
    assert [t.stop_reason for t in free.traces] == ["length"] * 3
    eos = free.traces[1].tokens[4]
    stopped = guarded_generate(model, input_ids, mask, expert=folder, config=NGSDConfig(**GATE), alpha=0.5,
                               max_new_tokens=9, eos_token_id=eos, pad_token_id=0)
    row = stopped.traces[1]
    first = free.traces[1].tokens.index(eos)
    assert row.tokens == free.traces[1].tokens[: first + 1] and row.stop_reason == "eos"
    tail = stopped.sequences[1, stopped.prompt_width + first + 1 :]
    assert (tail == 0).all(), "a finished row must only be padded afterwards"


def test_sampling_is_reproducible_with_a_seed(llama_pair):
    model, folder = llama_pair
    input_ids, mask, _ = mixed_length_batch([5, 7], model.config.vocab_size, seed=4)
    kwargs = dict(expert=folder, config=NGSDConfig(**GATE), alpha=0.9, max_new_tokens=12, do_sample=True,
                  temperature=1.3, top_k=20, top_p=0.9)
    a = guarded_generate(model, input_ids, mask, seed=1234, **kwargs)
    b = guarded_generate(model, input_ids, mask, seed=1234, **kwargs)
    c = guarded_generate(model, input_ids, mask, seed=99, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)


def test_trace_holds_divergence_potential_and_spikes(llama_pair):
    model, folder = llama_pair
    input_ids, mask, _ = mixed_length_batch([6], model.config.vocab_size, seed=9)
    config = NGSDConfig(**GATE)
    trace = guarded_generate(model, input_ids, mask, expert=folder, config=config, alpha=0.5, max_new_tokens=10).traces[0]
    v = 0.0
    for d, potential, spike in zip(trace.divergence, trace.potential, trace.spikes):
        assert 0.0 <= d <= 1.0
        v = (1 - 1 / config.tau) * v + d
        assert spike == (v >= config.v_th)
        if spike:
            v = config.v_reset + config.rho * (v - config.v_reset)
        assert potential == pytest.approx(v, rel=1e-5)


def test_two_threads_do_not_share_gate_state(llama_pair):
    model, folder = llama_pair
    input_ids, mask, _ = mixed_length_batch([6, 9], model.config.vocab_size, seed=5)
    config = NGSDConfig(**GATE)
    expected = {a: guarded_generate(model, input_ids, mask, expert=folder, config=config, alpha=a, max_new_tokens=12)
                for a in (0.1, 0.9)}
    plain = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    results, errors = {}, []

    def run(key):
        try:
            for _ in range(3):
                if key == "plain":
                    results[key] = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=12,
                                                  do_sample=False, pad_token_id=0)
                else:
                    results[key] = guarded_generate(model, input_ids, mask, expert=folder, config=config, alpha=key,
                                                    max_new_tokens=12).sequences
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0.1, 0.9, "plain")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.equal(results[0.1], expected[0.1].sequences)
    assert torch.equal(results[0.9], expected[0.9].sequences)
    assert torch.equal(results["plain"], plain), "the LoRA hooks leaked into a plain generate call"


def _hooks_left(model) -> bool:
    """The adapter's hooks, or their holders' count, still on the model."""
    return any(name.startswith("_ngsd_lora") for name in model.__dict__)


@pytest.mark.parametrize("other_thread", ["remove", "apply_again", "apply_and_remove"])
def test_apply_or_remove_in_another_thread_leaves_a_call_in_flight_its_expert(llama_pair, other_thread):
    """ngsd.remove (and a re-apply, which removes first) took the LoRA hooks off while a guarded call in another
    thread was still decoding: it finished with the base alone, no error, a harmful answer unguarded."""
    model, folder = llama_pair
    adapter = LoraAdapter.load(folder)
    input_ids, mask, _ = mixed_length_batch([5, 8], model.config.vocab_size, seed=7)
    config = NGSDConfig(**GATE)
    alone = guarded_generate(model, input_ids, mask, expert=adapter, config=config, alpha=0.9, max_new_tokens=10)
    base_alone = guarded_generate(model, input_ids, mask, config=NGSDConfig(mode="off"), max_new_tokens=10)
    assert not torch.equal(alone.sequences, base_alone.sequences), "the expert must change the tokens for the test"
    if other_thread == "remove":
        ngsd.apply(model, expert=adapter, config=config)
    actions = {"remove": lambda: ngsd.remove(model),
               "apply_again": lambda: ngsd.apply(model, expert=adapter, config=config),
               "apply_and_remove": lambda: ngsd.remove(ngsd.apply(model, expert=adapter, config=config))}
    # forwards through the last block: the base prefill, the expert prefill (the call holds the hooks), then steps
    try:
        with in_another_thread_at(model.model.layers[-1], actions[other_thread], forward=3) as errors:
            in_flight = guarded_generate(model, input_ids, mask, expert=adapter, config=config, alpha=0.9,
                                         max_new_tokens=10)
        assert not errors, errors
        assert torch.equal(in_flight.sequences, alone.sequences)
        assert [t.spikes for t in in_flight.traces] == [t.spikes for t in alone.traces]
        assert _hooks_left(model) == ngsd.is_applied(model)  # apply still holds them, or nobody does
    finally:
        ngsd.remove(model)
    assert not _hooks_left(model)


def test_a_call_that_starts_while_another_holds_the_hooks_runs_its_expert(llama_pair):
    """A call that started while another call held the hooks, after a remove had taken them off, found them
    counted as held and decoded without its expert."""
    model, folder = llama_pair
    adapter = LoraAdapter.load(folder)
    input_ids, mask, _ = mixed_length_batch([6, 4], model.config.vocab_size, seed=8)
    config = NGSDConfig(**GATE)
    alone = guarded_generate(model, input_ids, mask, expert=adapter, config=config, alpha=0.9, max_new_tokens=8)
    results = []

    def remove_then_start_another() -> None:
        ngsd.remove(model)
        results.append(guarded_generate(model, input_ids, mask, expert=adapter, config=config, alpha=0.9,
                                        max_new_tokens=8))

    ngsd.apply(model, expert=adapter, config=config)
    try:
        with in_another_thread_at(model.model.layers[-1], remove_then_start_another, forward=3) as errors:
            first = guarded_generate(model, input_ids, mask, expert=adapter, config=config, alpha=0.9,
                                     max_new_tokens=8)
        assert not errors, errors
        assert torch.equal(first.sequences, alone.sequences)
        assert torch.equal(results[0].sequences, alone.sequences)
    finally:
        ngsd.remove(model)
    assert not _hooks_left(model)


def test_apply_makes_hf_generate_guarded_and_remove_restores(llama_pair):
    model, folder = llama_pair
    input_ids, mask, _ = mixed_length_batch([5, 8], model.config.vocab_size, seed=6)
    config = NGSDConfig(**GATE)
    direct = guarded_generate(model, input_ids, mask, expert=folder, config=config, alpha=0.9, max_new_tokens=10,
                              eos_token_id=2, pad_token_id=0)
    plain = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           pad_token_id=0)
    ngsd.apply(model, expert=folder, config=config)
    try:
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             pad_token_id=0, ngsd_alpha=0.9, return_dict_in_generate=True)
        assert torch.equal(out.sequences[:, : direct.sequences.shape[1]], direct.sequences)
        assert [t.spikes for t in out.ngsd_traces] == [t.spikes for t in direct.traces]
    finally:
        ngsd.remove(model)
    again = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(again, plain)
    assert not ngsd.is_applied(model)


@pytest.mark.parametrize("expert_kind", ["lora", "model"])
def test_a_guarded_model_refuses_copy_and_pickle_by_name_until_removed(llama_pair, expert_kind):
    """copy.deepcopy gave "cannot pickle '_thread._local' object" with a LoRA expert, and with a separate expert a
    copy whose generate still decoded with the original model."""
    import copy
    import io

    model, folder = llama_pair
    model = copy.deepcopy(model)
    ngsd.apply(model, expert=folder if expert_kind == "lora" else tiny_model("llama", seed=1), config=NGSDConfig())
    try:
        with pytest.raises(TypeError, match="call ngsd.remove\\(model\\) first"):
            copy.deepcopy(model)
        with pytest.raises(TypeError, match="call ngsd.remove\\(model\\) first"):
            torch.save(model, io.BytesIO())
    finally:
        ngsd.remove(model)
    copy.deepcopy(model)
    torch.save(model, io.BytesIO())


@pytest.mark.parametrize("plan", ["alone", "paired", "one-by-one"])
@pytest.mark.parametrize("rows, positions", [(1, 1), (3, 1), (10, 1), (2, 7)])
def test_lora_hooks_match_peft_forward(llama_pair, monkeypatch, plan, rows, positions):
    """The hooks give peft's expert on the expert rows and the base model on the others, in every row plan. q / k /
    v and gate / up read one input: over more than ONE_BY_ONE_MAX rows (times positions) their updates run as one
    down and one up product (`_SiblingProducts`), fewer rows in the row plan."""
    import copy

    from ngsd.experts.row_products import PLAN_ENV

    monkeypatch.setenv(PLAN_ENV, plan)
    model, folder = llama_pair
    ids = torch.randint(3, model.config.vocab_size, (rows, positions))
    adapter = LoraAdapter.load(folder)
    adapter.attach(model)
    try:
        layer = model.model.layers[0]
        hooks = {name.rpartition(".")[2]: next(iter(module._forward_hooks.values()))
                 for name, module in layer.named_modules() if name.endswith("_proj")}
        assert hooks["q_proj"].siblings is hooks["k_proj"].siblings is hooks["v_proj"].siblings is not None
        assert hooks["gate_proj"].siblings is hooks["up_proj"].siblings is not None
        assert hooks["o_proj"].siblings is None and hooks["down_proj"].siblings is None
        with torch.no_grad(), adapter.rows_from(rows):
            both = model(torch.cat([ids, ids])).logits
    finally:
        adapter.detach(model)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    with torch.no_grad():
        expected = peft_model(ids).logits
    torch.testing.assert_close(both[rows:], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[:rows], model(ids).logits.detach(), rtol=1e-5, atol=1e-5)


def test_a_sibling_fed_another_input_gets_its_own_update(llama_pair):
    """The fused update is taken only for the very tensor the first sibling read: a model (or a caller) that
    feeds k_proj something else than q_proj gets k_proj's own LoRA update, and the last sibling frees the input."""
    model, folder = llama_pair
    attention = model.model.layers[0].self_attn
    adapter = LoraAdapter.load(folder)
    pairs = {name.rpartition(".")[2]: pair for name, pair in adapter.pairs.items() if ".layers.0.self_attn." in name}

    def expected(name, x):
        layer, pair = getattr(attention, name), pairs[name]
        return layer.weight @ x.T + adapter.scale * pair.up @ (pair.down @ x.T)

    x, other = torch.randn(12, model.config.hidden_size), torch.randn(12, model.config.hidden_size)  # > 8 rows: fused
    adapter.attach(model)
    try:
        with torch.no_grad(), adapter.rows_from(0):
            q, k_other, k, v = (attention.q_proj(x), attention.k_proj(other), attention.k_proj(x),
                                attention.v_proj(x))
            assert adapter._local.sibling_updates is not None
            q_again = attention.q_proj(x)
            assert adapter._local.sibling_updates is None  # q, k and v took theirs from one product: x is let go
    finally:
        adapter.detach(model)
    for name, out, source in (("q_proj", q, x), ("k_proj", k_other, other), ("k_proj", k, x), ("v_proj", v, x),
                              ("q_proj", q_again, x)):
        torch.testing.assert_close(out, expected(name, source).T, rtol=1e-5, atol=1e-5)


def test_one_adapter_serves_models_of_two_dtypes_and_detach_frees_its_copies(llama_pair):
    """attach once converted the adapter's own tensors to the model's dtype: attaching it to a second model of
    another dtype changed the first model's expert under it, and the converted copies outlived detach."""
    import copy
    import gc
    import weakref

    model, folder = llama_pair
    wide = copy.deepcopy(model).double()
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    adapter = LoraAdapter.load(folder)
    adapter.attach(model)
    adapter.attach(wide)
    try:
        with torch.no_grad(), adapter.rows_from(1):
            narrow_out = model(torch.cat([ids, ids])).logits
            wide_out = wide(torch.cat([ids, ids])).logits
        made = [weakref.ref(tensor) for m in [*model.modules(), *wide.modules()]
                for hook in m._forward_hooks.values() for tensor in (hook.down_t, hook.up_t)]
    finally:
        adapter.detach(wide)
    assert wide_out.dtype == torch.float64 and narrow_out.dtype == torch.float32
    torch.testing.assert_close(narrow_out.double(), wide_out, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), adapter.rows_from(1):  # the fp32 model's expert is unchanged by the other attachment
        torch.testing.assert_close(model(torch.cat([ids, ids])).logits, narrow_out)
    adapter.detach(model)
    gc.collect()
    assert made and all(ref() is None for ref in made)


# ---- errors -------------------------------------------------------------------------------------


def test_vocabulary_mismatch_is_refused():
    model = tiny_model("llama", vocab_size=96)
    other = tiny_model("llama", vocab_size=100)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="vocabulary mismatch: the base model scores 96 tokens, the expert 100.*LoRA"):
        guarded_generate(model, ids, expert=other, alpha=0.5, max_new_tokens=2)


def test_nan_logits_raise_a_clear_error(llama_pair):
    model, folder = llama_pair
    expert = tiny_model("llama")
    with torch.no_grad():
        expert.lm_head.weight[5].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="expert"):
        guarded_generate(model, torch.tensor([[5, 6, 7]]), expert=expert, alpha=0.5, max_new_tokens=3)


def test_the_invalid_logits_error_names_each_model_with_a_bad_row():
    """A base row masked everywhere and an expert row with a NaN: both models are named (the base was missed when
    another row of it had finite entries)."""
    from ngsd.decoding.loop import _raise_invalid

    base, expert = torch.randn(2, 8), torch.randn(2, 8)
    base[0] = -float("inf")
    expert[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="from the base and expert model"):
        _raise_invalid([0, 1], 0, base, expert)
    with pytest.raises(FloatingPointError, match="from the base model"):  # no expert rows: only the base ran
        _raise_invalid([0], 0, base, base)


def test_model_dtypes_the_step_cannot_read_are_refused_before_any_forward(llama_pair):
    """Named by model and fix (the op's own errors named its inputs: "base_hidden is torch.float32 ...")."""
    import copy

    model, folder = llama_pair
    with pytest.raises(ValueError, match="the base model is torch.float64; .* torch_dtype=torch.float32"):
        guarded_generate(copy.deepcopy(model).double(), torch.tensor([[4, 5]]), expert=folder, alpha=0.5)
    with pytest.raises(ValueError, match="the base model is torch.float32 and the expert torch.float16"):
        guarded_generate(model, torch.tensor([[4, 5]]), expert=tiny_model("llama", seed=3).half(), alpha=0.5)


def test_a_pad_token_outside_the_vocabulary_is_refused_by_name(llama_pair):
    model, folder = llama_pair
    with pytest.raises(ValueError, match="pad_token_id 1000 is not a token id of this model \\(0..95\\)"):
        guarded_generate(model, torch.tensor([[4, 5]]), expert=folder, alpha=0.5, pad_token_id=1000, max_new_tokens=2)


def test_empty_and_too_long_prompts(llama_pair):
    model, folder = llama_pair
    with pytest.raises(ValueError, match="empty prompt"):
        guarded_generate(model, torch.zeros((1, 0), dtype=torch.long), expert=folder, alpha=0.5)
    with pytest.raises(ValueError, match="empty prompt in rows \\[1\\]"):
        guarded_generate(model, torch.tensor([[4, 5], [0, 0]]), torch.tensor([[1, 1], [0, 0]]), expert=folder, alpha=0.5)
    with pytest.raises(ValueError, match="context window of 128"):
        guarded_generate(model, torch.full((1, 120), 5), expert=folder, alpha=0.5, max_new_tokens=16)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(tau=0.5), "tau"),
        (dict(rho=1.0), "rho"),
        (dict(v_th=0.0), "v_th"),
        (dict(mode="sometimes"), "mode"),
        (dict(candidate_k=0), "candidate_k"),
        (dict(divergence="l2"), "divergence"),
    ],
)
def test_invalid_config_values(changes, message):
    with pytest.raises(ValueError, match=message):
        NGSDConfig(**changes)


def test_missing_expert_and_bad_sampling_settings(llama_pair):
    model, folder = llama_pair
    with pytest.raises(ValueError, match="needs an expert"):
        guarded_generate(model, torch.tensor([[4, 5]]), alpha=0.5)
    with pytest.raises(ValueError, match="temperature"):
        guarded_generate(model, torch.tensor([[4, 5]]), expert=folder, alpha=0.5, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="use do_sample=False for greedy"):  # it once drew token 0 (the pad) each step
        guarded_generate(model, torch.tensor([[4, 5]]), expert=folder, alpha=0.5, do_sample=True, temperature=1e-40)


@pytest.mark.skipif(
    __import__("os").environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1",
)
# Triton's CPU interpreter also evaluates masked-off lanes (inf - inf, log 0) and numpy warns about them.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
def test_kernel_backend_gives_the_same_greedy_outputs_as_pytorch(llama_pair):
    model, folder = llama_pair
    input_ids, mask, _ = mixed_length_batch([5, 8, 3], model.config.vocab_size, seed=8)
    outs = {
        backend: guarded_generate(model, input_ids, mask, expert=folder, config=NGSDConfig(backend=backend, **GATE),
                                  alpha=[0.9, 0.5, 0.1], max_new_tokens=6)
        for backend in ("torch", "triton")
    }
    assert torch.equal(outs["torch"].sequences, outs["triton"].sequences)
    assert [t.spikes for t in outs["torch"].traces] == [t.spikes for t in outs["triton"].traces]


@pytest.mark.parametrize("plan", ["paired", "alone", "one-by-one"])
def test_lora_update_of_few_rows_equals_the_plain_product(plan):
    from ngsd.experts.lora import _lora_update

    torch.manual_seed(0)
    down_t, up_t = torch.randn(48, 8), torch.randn(8, 96)
    # one decode row, one row, several rows, a prefill, a batch of one, more rows than one-by-one takes
    for shape in [(2, 1, 48), (2, 48), (4, 1, 48), (2, 5, 48), (1, 1, 48), (12, 1, 48)]:
        x = torch.randn(*shape)
        out = _lora_update(x, 1 if shape[0] > 1 else 0, down_t, up_t, plan)
        rows = x[1 if shape[0] > 1 else 0:].reshape(-1, 48)
        assert out.shape == (rows.shape[0], 96)
        torch.testing.assert_close(out, rows @ down_t @ up_t)


@pytest.mark.parametrize("plan", ["paired", "alone", "one-by-one"])
@pytest.mark.parametrize("rows, length", [(1, 1), (3, 1), (2, 6), (1, 6), (10, 1)])  # decode rows, prefills
def test_in_place_lora_rows_equal_the_autograd_form(llama_pair, monkeypatch, plan, rows, length):
    """Without grad the hooks add the expert rows' update into the layer output in place; with grad they build
    a new output. Both must give the same expert rows, in every row plan the machine may pick."""
    monkeypatch.setenv("NGSD_LORA_ROW_PLAN", plan)
    model, folder = llama_pair
    adapter = LoraAdapter.load(folder)
    torch.manual_seed(rows)
    ids = torch.randint(3, model.config.vocab_size, (2 + rows, length))
    adapter.attach(model)
    try:
        with adapter.rows_from(2):
            with torch.no_grad():
                in_place = model(ids).logits
            with torch.enable_grad():
                autograd = model(ids).logits.detach()
    finally:
        adapter.detach(model)
    with torch.no_grad():
        plain = model(ids).logits
    # (without grad q / k / v and gate / up share their products: equal up to float rounding, ~3e-5 here)
    torch.testing.assert_close(in_place, autograd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(in_place[:2], plain[:2], rtol=0, atol=0)  # base rows untouched
    assert not torch.allclose(in_place[2:], plain[2:])  # the expert rows did get the adapter


def test_the_context_window_is_checked_row_by_row(llama_pair):
    """A long prompt with few new tokens beside a short one with many was refused, though each row fits the
    window; a finished row is still fed, and its positions now stop at the window's last (a model with learned
    absolute positions would index past its table)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model, folder = llama_pair
    ids, mask, _ = mixed_length_batch([110, 8], 96)
    together = guarded_generate(model, ids, mask, expert=folder, alpha=0.5, max_new_tokens=[10, 100])
    for row, new in ((0, 10), (1, 100)):
        alone = guarded_generate(model, ids[row:row + 1], mask[row:row + 1], expert=folder, alpha=0.5,
                                 max_new_tokens=new)
        assert together.traces[row].tokens == alone.traces[0].tokens
    with pytest.raises(ValueError, match="row 1 has 8 prompt tokens \\+ 121 new tokens"):
        guarded_generate(model, ids, mask, expert=folder, alpha=0.5, max_new_tokens=[10, 121])

    def gpt2(seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=128, n_embd=32, n_layer=2, n_head=2)).eval()

    base, expert = gpt2(0), gpt2(1)
    together = guarded_generate(base, ids, mask, expert=expert, alpha=0.5, max_new_tokens=[10, 100])
    alone = guarded_generate(base, ids[1:], mask[1:], expert=expert, alpha=0.5, max_new_tokens=100)
    assert together.traces[1].tokens == alone.traces[0].tokens
