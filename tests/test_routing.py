"""The step from final hidden states (LM head inside the op) and per-row risk routing in the loop."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ngsd import NGSDConfig, ReflectionConfig, guarded_generate
from ngsd.decoding.heads import HeadSplit, split_head
from ngsd.experts.lora import LoraAdapter
from ngsd.risk.probe import ProbeSpec, RiskProbe, decoder_layers, model_fingerprint
from tests.conftest import forward_from_another_thread, mixed_length_batch, tiny_lora_expert, tiny_model

FAMILIES = ["llama", "qwen2", "gemma"]


@pytest.mark.parametrize("family", FAMILIES)
def test_trunk_then_head_equals_the_models_own_logits(family):
    model = tiny_model(family)
    split = split_head(model)
    assert isinstance(split, HeadSplit), split
    ids, mask, _ = mixed_length_batch([5, 3], model.config.vocab_size)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        hidden = split.trunk(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
    torch.testing.assert_close(hidden @ split.weight.T, logits, rtol=1e-5, atol=1e-5)


def test_families_that_change_logits_after_the_head_stay_on_logits():
    model = tiny_model("llama")
    model.config.logit_scale = 0.5
    assert "logit_scale" in split_head(model)
    model.config.logit_scale = None
    model.config.model_type = "gemma2"
    assert "not one whose logits" in split_head(model)


def _run(model, expert, ids, mask, **kwargs):
    return guarded_generate(model, ids, mask, expert=expert, max_new_tokens=10, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_state_step_gives_the_logits_steps_tokens(family, tmp_path):
    model = tiny_model(family)
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    ids, mask, _ = mixed_length_batch([6, 4, 7], model.config.vocab_size, seed=3)
    config = NGSDConfig(tau=2.0, v_th=0.3)
    hidden = _run(model, adapter, ids, mask, config=config, alpha=0.9)
    # a logits processor that changes nothing forces the logits path
    logits = _run(model, adapter, ids, mask, config=config, alpha=0.9, logits_processor=lambda seq, scores: scores)
    assert hidden.traces[0].step_path == "hidden states"
    assert logits.traces[0].step_path.startswith("logits")
    assert torch.equal(hidden.sequences, logits.sequences)
    assert [t.spikes for t in hidden.traces] == [t.spikes for t in logits.traces]
    assert any(any(t.spikes) for t in hidden.traces), "the gate must fire for this comparison to mean something"


def test_separate_expert_model_runs_on_hidden_states_with_its_own_head():
    model, expert = tiny_model("llama", seed=0), tiny_model("llama", seed=5)
    ids, mask, _ = mixed_length_batch([5, 8], model.config.vocab_size, seed=1)
    config = NGSDConfig(tau=2.0, v_th=0.3)
    hidden = _run(model, expert, ids, mask, config=config, alpha=0.7)
    logits = _run(model, expert, ids, mask, config=config, alpha=0.7, logits_processor=lambda seq, scores: scores)
    assert hidden.traces[0].step_path == "hidden states"
    assert torch.equal(hidden.sequences, logits.sequences)


def _probe_splitting(model, ids, mask, folder):
    """A probe with random weights whose routing threshold sits between the batch's risks."""
    torch.manual_seed(0)
    hidden_size = model.config.hidden_size
    spec = ProbeSpec(layer=1, pooling=("mean",), model=model_fingerprint(model))
    probe = RiskProbe(spec, torch.zeros(hidden_size), torch.ones(hidden_size), torch.randn(hidden_size) * 0.05,
                      torch.tensor(0.0))
    from ngsd.decoding.pair import capture_hidden_states

    with torch.no_grad(), capture_hidden_states(model, [1]) as states:
        model(input_ids=ids, attention_mask=mask)
    risks = probe.risk(probe.features([None, states[1]], mask))
    assert len(set(risks.tolist())) == len(risks), f"risks must differ per row for the test: {risks}"
    ordered = risks.sort().values
    threshold = float((ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2)
    probe.save(folder)
    return risks, threshold


def _split_batch(tmp_path):
    """The llama test model, a LoRA expert, a batch of 4 and a probe that routes half of it."""
    model = tiny_model("llama")
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=2)
    risks, threshold = _probe_splitting(model, ids, mask, tmp_path / "probe")
    return model, adapter, ids, mask, risks, threshold


def test_routed_rows_decode_like_unguarded_and_guarded_rows_like_a_fixed_alpha(tmp_path):
    model, adapter, ids, mask, risks, threshold = _split_batch(tmp_path)
    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=threshold)
    config = NGSDConfig(tau=2.0, v_th=0.3, reflection=reflection)

    rows_seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: rows_seen.append(out.shape[0]))
    try:
        routed_run = _run(model, adapter, ids, mask, config=config)
    finally:
        handle.remove()
    routed = [row for row, risk in enumerate(risks.tolist()) if risk < threshold]
    guarded = [row for row in range(4) if row not in routed]
    assert len(routed) == 2
    # the prefill of the base rows, the expert prefill of the guarded rows, then B + R rows per step
    assert rows_seen[:2] == [4, 2] and set(rows_seen[2:]) == {6}
    for row in routed:
        trace = routed_run.traces[row]
        assert not trace.guarded and trace.alpha == 0.0 and not any(trace.spikes)
        assert trace.reflection.routed and trace.reflection.risk < threshold

    plain = _run(model, None, ids, mask, config=NGSDConfig(mode="off"))
    alphas = [routed_run.traces[row].alpha for row in range(4)]
    fixed = _run(model, adapter, ids, mask, config=config, alpha=[a if a else 0.5 for a in alphas])
    for row in routed:
        assert routed_run.traces[row].tokens == plain.traces[row].tokens
    for row in guarded:
        assert routed_run.traces[row].guarded
        assert routed_run.traces[row].tokens == fixed.traces[row].tokens
        assert routed_run.traces[row].spikes == fixed.traces[row].spikes


def test_a_forward_in_another_thread_during_the_prefill_leaves_every_rows_risk_and_route(tmp_path):
    """Two calls on one model: the prefill's hidden-state hooks recorded the other call's forward, so a harmful
    request could take a benign one's risk and decode unguarded (or the shapes clashed and the call failed)."""
    model, adapter, ids, mask, risks, threshold = _split_batch(tmp_path)
    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=threshold)
    config = NGSDConfig(tau=2.0, v_th=0.3, reflection=reflection)
    alone = _run(model, adapter, ids, mask, config=config)
    other_ids, other_mask, _ = mixed_length_batch([3, 8, 5], model.config.vocab_size, seed=9)
    with forward_from_another_thread(model, decoder_layers(model)[-1], other_ids, other_mask) as errors:
        concurrent = _run(model, adapter, ids, mask, config=config)
    assert not errors, errors
    assert [t.reflection.risk for t in concurrent.traces] == [t.reflection.risk for t in alone.traces]
    assert [t.guarded for t in concurrent.traces] == [t.guarded for t in alone.traces]
    assert torch.equal(concurrent.sequences, alone.sequences)


def test_probe_without_routing_guards_every_row(tmp_path):
    model = tiny_model("qwen2")
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=2)
    _probe_splitting(model, ids, mask, tmp_path / "probe")
    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route=False)
    out = _run(model, adapter, ids, mask, config=NGSDConfig(reflection=reflection))
    assert all(t.guarded for t in out.traces)
    assert all(t.reflection.route_below is None and t.alpha in (0.1, 0.5, 0.9) for t in out.traces)


def test_a_batch_where_every_row_is_routed_has_no_expert_rows(tmp_path):
    model = tiny_model("gemma")
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    ids, mask, _ = mixed_length_batch([6, 4], model.config.vocab_size, seed=2)
    _probe_splitting(model, ids, mask, tmp_path / "probe")
    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=10.0)
    out = _run(model, adapter, ids, mask, config=NGSDConfig(reflection=reflection))
    plain = _run(model, None, ids, mask, config=NGSDConfig(mode="off"))
    assert not any(t.guarded for t in out.traces)
    assert torch.equal(out.sequences, plain.sequences)


def test_probe_mode_without_a_probe_for_the_model_is_a_clear_error():
    model = tiny_model("llama")
    ids, mask, _ = mixed_length_batch([3], model.config.vocab_size)
    with pytest.raises(ValueError, match="train-probe"):
        guarded_generate(model, ids, mask, expert=model, config=NGSDConfig(reflection=ReflectionConfig(mode="probe")))


def _checked_run(model, expert, ids, mask, folder, check_divergence: float, **kwargs):
    """Every row under route_below (10) and over check_above (0): each one is decided by the check."""
    if not folder.exists():
        _probe_splitting(model, ids, mask, folder)
    reflection = ReflectionConfig(mode="probe", probe=str(folder), route_below=10.0, check_above=0.0,
                                  check_divergence=check_divergence)
    return _run(model, expert, ids, mask, config=NGSDConfig(tau=2.0, v_th=0.3, reflection=reflection), **kwargs)


def _rows_per_embedding_call(model, run) -> list[int]:
    seen: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("kind", ["adapter hidden", "adapter logits", "separate model"])
def test_the_divergence_check_keeps_exactly_the_rows_whose_expert_diverges_and_drops_the_others(kind, tmp_path):
    model = tiny_model("qwen2" if kind == "adapter logits" else "llama")
    expert = tiny_model("llama", seed=5) if kind == "separate model" else \
        LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    extra = {"logits_processor": lambda seq, scores: scores} if kind == "adapter logits" else {}
    ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=2)

    every = _checked_run(model, expert, ids, mask, tmp_path / "probe", 0.0, **extra)  # TV >= 0: all kept
    divergences = [t.reflection.divergence for t in every.traces]
    assert all(t.guarded and t.alpha == 0.9 for t in every.traces)
    assert len(set(divergences)) == 4 and all(0.0 < d < 1.0 for d in divergences), divergences
    threshold = sorted(divergences)[2]  # the two rows that diverge most stay guarded
    kept = [row for row, d in enumerate(divergences) if d >= threshold]

    seen = _rows_per_embedding_call(model, lambda: _checked_run(model, expert, ids, mask, tmp_path / "probe",
                                                                threshold, **extra))
    out = _checked_run(model, expert, ids, mask, tmp_path / "probe", threshold, **extra)
    assert [t.guarded for t in out.traces] == [row in kept for row in range(4)]
    assert [t.reflection.divergence for t in out.traces] == pytest.approx(divergences, abs=1e-6)
    for row, trace in enumerate(out.traces):
        relation = ">=" if row in kept else "<"
        assert f"divergence {trace.reflection.divergence:.3f} {relation} check_divergence" in trace.reflection.reason
        assert trace.alpha == (0.9 if row in kept else 0.0)
    if kind != "separate model":  # base prefill, the checked rows' expert prefill, then B + kept rows per step
        assert seen[:2] == [4, 4] and set(seen[2:]) == {4 + len(kept)}

    plain = _run(model, None, ids, mask, config=NGSDConfig(mode="off"), **extra)
    fixed = _run(model, expert, ids, mask, config=NGSDConfig(tau=2.0, v_th=0.3), alpha=0.9, **extra)
    for row in range(4):
        reference = fixed if row in kept else plain
        assert out.traces[row].tokens == reference.traces[row].tokens
        assert out.traces[row].spikes == (reference.traces[row].spikes if row in kept else [False] * len(out.traces[row].spikes))
    assert any(any(out.traces[row].spikes) for row in kept), "the gate must fire for this comparison to mean something"


def test_priming_at_the_check_fires_every_kept_row_at_its_first_token(tmp_path):
    model = tiny_model("llama")
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=2)
    _probe_splitting(model, ids, mask, tmp_path / "probe")
    every = _checked_run(model, adapter, ids, mask, tmp_path / "probe", 0.0)
    divergences = sorted(t.reflection.divergence for t in every.traces)
    # between the second and third: a threshold equal to a row's own divergence would fire it or not by the last
    # bit of a LoRA product, which the batch's make-up can move (fused products over more rows)
    threshold = (divergences[1] + divergences[2]) / 2
    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=10.0, check_above=0.0,
                                  check_divergence=threshold)
    plain = _run(model, adapter, ids, mask, config=NGSDConfig(reflection=reflection))
    primed = _run(model, adapter, ids, mask, config=NGSDConfig(prime_divergence="check", reflection=reflection))
    start = NGSDConfig(prime_divergence=threshold).start_potential
    assert 0.0 < start < 1.0
    assert [t.guarded for t in primed.traces] == [t.guarded for t in plain.traces]
    assert sum(t.guarded for t in primed.traces) == 2  # priming changes where rows start, never which are guarded
    for before, trace in zip(plain.traces, primed.traces):
        if not trace.guarded:  # routed rows are untouched
            assert trace.tokens == before.tokens and not any(trace.spikes)
            continue
        # the gate's first step sees the same two distributions the check measured
        assert trace.divergence[0] == pytest.approx(trace.reflection.divergence, abs=1e-5)
        assert trace.spikes[0] and not before.spikes[0]
        assert trace.potential[0] == pytest.approx(0.6 * ((1 - 1 / 8.0) * start + trace.divergence[0]), abs=1e-5)


def test_the_check_only_adds_guarded_rows_and_can_be_switched_off(tmp_path):
    model, adapter, ids, mask, risks, threshold = _split_batch(tmp_path)
    base = dict(mode="probe", probe=str(tmp_path / "probe"), route_below=threshold)
    unchecked = _run(model, adapter, ids, mask, config=NGSDConfig(reflection=ReflectionConfig(**base)))
    # a threshold no divergence reaches routes every checked row: the same run as no check at all
    never = _run(model, adapter, ids, mask, config=NGSDConfig(reflection=ReflectionConfig(
        **base, check_above=0.0, check_divergence=1.0)))
    switched_off = _run(model, adapter, ids, mask, config=NGSDConfig(reflection=ReflectionConfig(
        **base, check=False, check_above=0.0, check_divergence=0.0)))
    for run in (never, switched_off):
        assert torch.equal(run.sequences, unchecked.sequences)
        assert [t.guarded for t in run.traces] == [t.guarded for t in unchecked.traces]
    assert [t.reflection.divergence is not None for t in never.traces] == [r < threshold for r in risks.tolist()]
    assert all(t.reflection.divergence is None for t in switched_off.traces)
    always = _run(model, adapter, ids, mask, config=NGSDConfig(reflection=ReflectionConfig(
        **base, check_above=0.0, check_divergence=0.0)))
    assert all(t.guarded for t in always.traces)


def test_a_probes_own_check_is_saved_read_and_validated(tmp_path):
    model = tiny_model("llama")
    spec = ProbeSpec(layer=1, pooling=("mean",), model=model_fingerprint(model), route_below=4.0, check_above=1.5,
                     check_divergence=0.6, check_expert="some-expert")
    size = model.config.hidden_size
    RiskProbe(spec, torch.zeros(size), torch.ones(size), torch.zeros(size), 0.0).save(tmp_path / "probe")
    assert RiskProbe.load(tmp_path / "probe").spec == spec
    from ngsd.risk.estimate import divergence_check

    probe = RiskProbe.load(tmp_path / "probe")
    assert divergence_check(probe, ReflectionConfig(), 4.0) == (1.5, 0.6)
    assert divergence_check(probe, ReflectionConfig(check_divergence=0.3), 4.0) == (1.5, 0.3)
    assert divergence_check(probe, ReflectionConfig(check=False), 4.0) == (None, None)
    assert divergence_check(probe, ReflectionConfig(), None) == (None, None)  # no routing, nothing to check
    assert divergence_check(probe, ReflectionConfig(), 1.0) == (None, None)  # an empty band
    with pytest.raises(ValueError, match="go together"):
        ProbeSpec(layer=1, check_above=1.0)
    with pytest.raises(ValueError, match="check_divergence"):
        ProbeSpec(layer=1, check_above=1.0, check_divergence=1.5)
    with pytest.raises(ValueError, match="check_above"):
        ReflectionConfig(check_above=11.0)
    with pytest.raises(TypeError, match="check must be True or False"):
        ReflectionConfig(check="yes")


def test_a_probe_trained_on_another_model_is_refused(tmp_path):
    model, other = tiny_model("llama"), tiny_model("qwen2")
    ids, mask, _ = mixed_length_batch([3], model.config.vocab_size)
    _probe_splitting(other, ids, mask, tmp_path / "probe")
    config = NGSDConfig(reflection=ReflectionConfig(mode="probe", probe=str(tmp_path / "probe")))
    with pytest.raises(ValueError, match="another model"):
        guarded_generate(model, ids, mask, expert=model, config=config)


def test_the_equal_outputs_warning_ignores_steps_where_every_guarded_row_has_finished():
    import warnings

    from ngsd.decoding.loop import IDENTICAL_LOGITS_STEPS, _IdenticalOutputsWatch

    base = torch.randn(3, 16) * 40
    rows = torch.tensor([0])
    finished_guarded_row = torch.tensor([False, True, True])  # routed rows 1 and 2 go on
    watch = _IdenticalOutputsWatch(enabled=True, device=torch.device("cpu"))
    for _ in range(2 * IDENTICAL_LOGITS_STEPS):
        watch.observe(base, base[rows].clone(), rows, finished_guarded_row)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch.warn_if_stuck()

    still_running = torch.tensor([True, True, True])
    shifted = base[rows] + 0.5  # a small shift in every dimension next to a few large outliers: a real expert
    for _ in range(2 * IDENTICAL_LOGITS_STEPS):
        watch.observe(base, shifted, rows, still_running)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch.warn_if_stuck()
    for _ in range(IDENTICAL_LOGITS_STEPS):
        watch.observe(base, base[rows].clone(), rows, still_running)
    with pytest.warns(RuntimeWarning, match="not applied"):
        watch.warn_if_stuck()


def test_a_checked_row_whose_divergence_is_nan_stays_guarded():
    from ngsd.risk.estimate import ProbeVerdict, RiskPlan

    plan = RiskPlan([0.0, 0.0, 0.0], [ProbeVerdict(risk=1.0, alpha=0.0, routed=True, route_below=3.0)] * 3,
                    route_below=3.0, reflection=ReflectionConfig(), check_above=0.5, check_divergence=0.5,
                    to_check=[0, 2])
    base = torch.zeros(3, 8)
    expert = torch.zeros(2, 8)
    expert[1, 0] = float("nan")  # row 2's expert: the step would report it; the check must not route it unguarded
    assert plan.confirm(torch.tensor([0, 2]), base, expert) == [2]
    assert plan.alphas == [0.0, 0.0, 0.9] and plan.verdicts[2].routed is False and plan.verdicts[0].divergence == 0.0


def test_a_check_fitted_for_another_expert_warns_and_names_the_fix(tmp_path):
    import warnings

    from ngsd.risk.estimate import CheckFittedForAnotherExpert

    model = tiny_model("llama")
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    ids, mask, _ = mixed_length_batch([6, 4], model.config.vocab_size, seed=2)
    size = model.config.hidden_size

    def run(check_expert: str, **reflection):
        spec = ProbeSpec(layer=1, pooling=("mean",), model=model_fingerprint(model), route_below=10.0, check_above=0.0,
                         check_divergence=0.5, check_expert=check_expert)
        folder = tmp_path / f"probe{len(list(tmp_path.glob('probe*')))}"
        RiskProbe(spec, torch.zeros(size), torch.ones(size), torch.zeros(size), 0.0).save(folder)
        config = NGSDConfig(reflection=ReflectionConfig(mode="probe", probe=str(folder), **reflection))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guarded_generate(model, ids, mask, expert=adapter, max_new_tokens=2, config=config)
        return [w for w in caught if issubclass(w.category, CheckFittedForAnotherExpert)]

    (other,) = run("some-expert")
    assert other.filename == __file__  # the caller's line, not a frame inside ngsd or torch
    assert "'some-expert'" in str(other.message) and "'lora'" in str(other.message)
    assert "ngsd train-probe --check-only --expert" in str(other.message)
    assert run("lora") == []  # fitted for this expert
    assert run(str(tmp_path / "lora")) == []  # `ngsd train-probe --expert PATH` records the path as given
    assert run("some-expert", check_divergence=0.3) == []  # the call sets its own threshold
    assert run("some-expert", check=False) == []  # no check, nothing to warn about


# ---------------------------------------------------------------------------------------------
# A helper's hunt of risk routing (stop 49)
# ---------------------------------------------------------------------------------------------


def test_the_gate_forced_open_routes_no_row(tmp_path):
    """mode='open' ("always mix") still routed the probe's low-risk rows unguarded, without a word."""
    model, adapter, ids, mask, risks, threshold = _split_batch(tmp_path)
    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=threshold)
    out = _run(model, adapter, ids, mask, config=NGSDConfig(mode="open", reflection=reflection))
    assert all(t.guarded for t in out.traces) and all(all(t.spikes) for t in out.traces)


def test_a_configured_check_above_past_the_probes_own_route_below_is_refused(tmp_path):
    """ReflectionConfig refuses check_above > route_below when both are given; against the probe's own route_below
    the configured check was dropped silently."""
    from ngsd.risk.estimate import divergence_check

    model = tiny_model("llama")
    spec = ProbeSpec(layer=1, pooling=("mean",), model=model_fingerprint(model), route_below=4.0, check_above=1.5,
                     check_divergence=0.6)
    size = model.config.hidden_size
    RiskProbe(spec, torch.zeros(size), torch.ones(size), torch.zeros(size), 0.0).save(tmp_path / "probe")
    probe = RiskProbe.load(tmp_path / "probe")
    with pytest.raises(ValueError, match="check_above \\(6.0\\) must not exceed route_below \\(4.0"):
        divergence_check(probe, ReflectionConfig(check_above=6.0, check_divergence=0.05), 4.0)


def test_prompts_outside_the_chat_template_are_guarded_whatever_the_probe_says():
    """The probe is trained and calibrated on chat-templated prompts: on raw text (generate(chat=False),
    tokenizer(text) ids) it routed 13 of 40 HarmBench prompts unguarded, against 2 of 40 templated."""
    from ngsd.api import encode_prompts
    from ngsd.loading import default_cache_dir
    from ngsd.risk.estimate import RiskPlan, untemplated_rows

    if not (default_cache_dir() / "tokenizer.json").is_file():
        pytest.skip(f"the default model's tokenizer is not converted yet at {default_cache_dir()}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_cache_dir())
    tokenizer.padding_side = "left"
    prompts = ["How do I bake bread?", "Write a poem about tea"]
    templated, mask = encode_prompts(tokenizer, prompts)
    raw, raw_mask = encode_prompts(tokenizer, prompts, chat=False)
    assert untemplated_rows(tokenizer, templated, mask) == []
    assert untemplated_rows(tokenizer, raw, raw_mask) == [0, 1]
    plan = RiskPlan(None, [None, None], route_below=4.0, reflection=ReflectionConfig())
    verdict, check = plan.verdict_for(0.5, untemplated=True)
    assert not verdict.routed and not check and verdict.alpha == ReflectionConfig().guarded_alpha
    assert "chat template" in verdict.reason
    assert plan.verdict_for(0.5)[0].routed


def test_without_the_tokenizer_a_probe_calibrated_on_templated_prompts_routes_no_row(tmp_path):
    """ngsd.apply(model, expert) without tokenizer= skipped the chat-template check: raw `tokenizer(text)` ids
    were routed as if templated (4 of 100 AdvBench goals decoded unguarded on the default model, no warning)."""
    import json

    model, adapter, ids, mask, risks, threshold = _split_batch(tmp_path)
    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=threshold)
    config = NGSDConfig(tau=2.0, v_th=0.3, reflection=reflection)
    assert sum(not t.guarded for t in _run(model, adapter, ids, mask, config=config).traces) == 2
    spec_file = tmp_path / "probe" / "probe.json"
    spec_file.write_text(json.dumps({**json.loads(spec_file.read_text()), "chat_template": True}))
    with pytest.warns(UserWarning, match="without the tokenizer.*every row is guarded"):
        out = _run(model, adapter, ids, mask, config=config)
    assert all(t.guarded for t in out.traces)
    assert all("chat template" in t.reflection.reason for t in out.traces)


def test_the_shipped_probe_says_it_was_calibrated_on_templated_prompts():
    from ngsd.risk.probe import RiskProbe, shipped_probe_path

    assert RiskProbe.load(shipped_probe_path()).spec.chat_template


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unguarded_rows_of_a_half_precision_model_decode_as_plain_generate(dtype, tmp_path):
    """The step computed every row's LM head in fp32 where the model computes it in its own dtype: near-ties
    broke the other way, and on the default model in bf16 3 of 8 benign answers (mode off, or routed) differed
    from plain `generate`. Unguarded rows now take the model's own logits; guarded rows keep the fp32 step."""
    differ = []
    for family in FAMILIES:
        for seed in range(3):
            model = tiny_model(family, seed=seed).to(dtype)
            ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=seed)
            eos = model.generation_config.eos_token_id
            plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
            off = guarded_generate(model, ids, mask, expert=None, config=NGSDConfig(mode="off"), max_new_tokens=16,
                                   pad_token_id=0, eos_token_id=eos)
            differ += [(family, seed)] * (not torch.equal(plain, off.sequences))
    assert differ == []

    model, adapter, ids, mask, risks, threshold = _split_batch(tmp_path)
    model.to(dtype)
    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=threshold)
    routed_run = guarded_generate(model, ids, mask, expert=adapter, max_new_tokens=16, pad_token_id=0,
                                  config=NGSDConfig(tau=2.0, v_th=0.3, reflection=reflection))
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    routed = [row for row, trace in enumerate(routed_run.traces) if not trace.guarded]
    assert len(routed) == 2
    for row in routed:
        assert torch.equal(routed_run.sequences[row], plain[row])
    # with the divergence check (the default's), which read a half-precision head's logits before the step knew its
    # rows and failed ("Tensors must have same number of dimensions") on every such model
    checked = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=threshold,
                               check_above=float(risks.min()) - 1, check_divergence=1.0)  # not reached: all routed
    checked_run = guarded_generate(model, ids, mask, expert=adapter, max_new_tokens=16, pad_token_id=0,
                                   config=NGSDConfig(tau=2.0, v_th=0.3, reflection=checked))
    assert [t.guarded for t in checked_run.traces] == [t.guarded for t in routed_run.traces]
    assert all(t.reflection.divergence is not None for t in checked_run.traces if not t.guarded)
    for row in routed:
        assert torch.equal(checked_run.sequences[row], plain[row])


def test_trace_reasons_tell_a_risk_from_its_threshold():
    """Two decimals read 'risk 4.53 < route_below 4.53' beside the shipped probe's 4.5327 (a helper's hunt)."""
    from ngsd.risk.estimate import ProbeVerdict

    assert ProbeVerdict(risk=4.5326, alpha=0.0, routed=True, route_below=4.5327).reason == \
        "risk 4.5326 < route_below 4.5327"
    assert ProbeVerdict(risk=8.1, alpha=0.9, routed=False, route_below=4.5).reason == "risk 8.10 >= route_below 4.50"


def test_a_tokenizer_without_chat_template_routes_no_row_of_a_probe_calibrated_on_templated_prompts(tmp_path):
    """Such a tokenizer made every prompt count as templated (nothing to check against): a raw 'hi' was routed."""
    import json

    from ngsd.loading import default_cache_dir

    if not (default_cache_dir() / "tokenizer.json").is_file():
        pytest.skip(f"the default model's tokenizer is not converted yet at {default_cache_dir()}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_cache_dir())
    tokenizer.chat_template = None
    model, adapter, ids, mask, risks, threshold = _split_batch(tmp_path)
    spec_file = tmp_path / "probe" / "probe.json"
    spec_file.write_text(json.dumps({**json.loads(spec_file.read_text()), "chat_template": True}))
    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=threshold)
    with pytest.warns(UserWarning, match="no chat template"):
        out = _run(model, adapter, ids, mask, config=NGSDConfig(reflection=reflection), tokenizer=tokenizer)
    assert all(t.guarded for t in out.traces)


# ------------------------------------------------------------------------------------------------
# check_rollout: a diverging checked row stays guarded only if the expert's own opening refuses


def _pair_and_prefill(kind: str, tmp_path, rows: list[int]):
    from ngsd.decoding.pair import AdapterPair, ModelPair

    model = tiny_model("llama", init=1.0)  # sharper logits than the default: greedy tokens far from ties
    ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=2)
    if kind == "adapter":
        adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
        adapter.attach(model)
        pair, expert_forward = AdapterPair(model, adapter), model
        alone = adapter.rows_from(0)
    else:
        expert = tiny_model("llama", seed=5, init=1.0)
        pair, expert_forward = ModelPair(model, expert), expert
        from contextlib import nullcontext
        alone = nullcontext()
    prefill = pair.prefill(ids, mask, guard_rows=rows)
    return pair, prefill, expert_forward, alone, ids, mask


@pytest.mark.parametrize("kind", ["adapter", "separate model"])
def test_expert_openings_are_the_experts_own_greedy_answer_and_leave_the_pair_as_it_was(kind, tmp_path):
    from ngsd.decoding.pair import positions_from_mask

    rows, steps = [0, 2, 3], 5
    pair, prefill, expert_forward, alone, ids, mask = _pair_and_prefill(kind, tmp_path, rows)
    index = torch.tensor([0, 2])  # batch rows 0 and 3
    openings = pair.expert_openings(index, prefill.expert[index], steps)
    assert openings.shape == (2, steps)
    # the same answer without any cache: the expert alone over the prompt and its own tokens so far
    with torch.no_grad(), alone:
        for j, row in enumerate([0, 3]):
            seq, seq_mask = ids[row:row + 1], mask[row:row + 1]
            for step in range(steps):
                logits = expert_forward(input_ids=seq, attention_mask=seq_mask,
                                        position_ids=positions_from_mask(seq_mask)).logits[0, -1]
                assert int(logits.argmax()) == int(openings[j, step]), (row, step)
                seq = torch.cat([seq, openings[j:j + 1, step:step + 1]], 1)
                seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], 1)
    # the pair decodes on exactly as a pair that never looked ahead
    fresh, fresh_prefill, *_ = _pair_and_prefill(kind, tmp_path / "again", rows)
    tokens = torch.tensor([3, 5, 7, 9])
    for _ in range(3):
        base, expert = pair.step(tokens)
        base_again, expert_again = fresh.step(tokens)
        assert torch.equal(base, base_again) and torch.equal(expert, expert_again)


def _rollout_plan(check_rollout: int):
    from ngsd.risk.estimate import ProbeVerdict, RiskPlan

    return RiskPlan([0.0] * 4, [ProbeVerdict(risk=1.0, alpha=0.0, routed=True, route_below=3.0)] * 4, route_below=3.0,
                    reflection=ReflectionConfig(), check_above=0.5, check_divergence=0.5, to_check=[0, 1, 2, 3],
                    check_rollout=check_rollout)


def test_a_diverging_checked_row_is_routed_when_the_experts_own_opening_does_not_refuse():
    base = torch.zeros(4, 8)
    expert = torch.zeros(4, 8)
    expert[1:, 0] = 20.0  # rows 1..3 diverge (TV ~ 0.87); row 0 does not
    expert[3, 0] = float("nan")  # row 3: NaN fails closed, whatever its expert says
    asked = []

    def answer(index, first_logits):
        asked.append(index.tolist())
        return [{1: "I'm sorry, but I cannot help with", 2: "Here is a plan for your", 3: "Sure"}[i] for i in index.tolist()]

    plan = _rollout_plan(8)
    assert plan.confirm(torch.arange(4), base, expert, openings=answer) == [1, 3]
    assert asked == [[1, 2]]  # only the rows the divergence would guard, NaN aside, and in one call
    verdicts = plan.verdicts
    assert [v.routed for v in verdicts] == [True, False, True, False]
    assert verdicts[1].opening_refuses is True and "and the expert's own opening refuses" in verdicts[1].reason
    assert verdicts[2].opening_refuses is False and "but the expert's own opening does not refuse" in verdicts[2].reason
    assert verdicts[2].expert_opening == "Here is a plan for your" and verdicts[2].to_dict()["expert_opening"]
    assert verdicts[0].opening_refuses is None and verdicts[3].opening_refuses is None
    assert plan.alphas == [0.0, 0.9, 0.0, 0.9]
    # without a rollout (0 tokens, or no way to get openings) the divergence alone decides
    for tokens, source in ((0, answer), (8, None)):
        assert _rollout_plan(tokens).confirm(torch.arange(4), base, expert, openings=source) == [1, 2, 3]


def test_check_rollout_is_validated_and_read_from_the_probe_unless_the_configuration_says(tmp_path):
    from ngsd.risk.estimate import probe_plan

    model = tiny_model("llama")
    for bad in (-1, 65, 2.5, True):
        with pytest.raises(ValueError, match="check_rollout must be a whole number of tokens"):
            ReflectionConfig(check_rollout=bad)
        with pytest.raises(ValueError, match="check_rollout"):
            ProbeSpec(layer=1, check_rollout=bad)
    spec = ProbeSpec(layer=1, pooling=("mean",), model=model_fingerprint(model), route_below=4.0, check_above=1.5,
                     check_divergence=0.6, check_rollout=8)
    size = model.config.hidden_size
    RiskProbe(spec, torch.zeros(size), torch.ones(size), torch.zeros(size), 0.0).save(tmp_path / "p")
    loaded = RiskProbe.load(tmp_path / "p")
    assert loaded.spec.check_rollout == 8
    assert probe_plan(loaded, ReflectionConfig()).check_rollout == 8
    assert probe_plan(loaded, ReflectionConfig(check_rollout=0)).check_rollout == 0
    assert probe_plan(loaded, ReflectionConfig(check=False)).check_rollout == 0  # no check, nothing to roll out


def test_fitting_keeps_check_rollout_only_where_the_harmful_requests_openings_refuse():
    from ngsd.risk.divergence_check import fit_rollout

    divergences = [0.9, 0.8, 0.7, 0.2, 0.6, 0.5, 0.1]
    labels = [1, 1, 1, 1, 0, 0, 0]
    single = [True, True, True, True, True, True, True]
    in_band = [False, False, False, False, True, True, True]
    refusal, answer = "I'm sorry, but I cannot", "Here is a plan"

    def openings(answers):
        return lambda rows: [answers[i] for i in rows]

    # the three harmful requests the divergence keeps (0.2 is under it) all refuse; one of the two diverging band
    # benign requests gets an answer, the other a refusal: kept, and it guards one of them
    refusing = {0: refusal, 1: refusal, 2: refusal, 4: answer, 5: refusal}
    fitted = fit_rollout(8, divergences, labels, in_band, single, 0.4, openings(refusing), recall=0.98)
    assert fitted == {"tokens": 8, "check_rollout": 8, "harmful_kept_by_divergence": 3, "their_openings_refuse": 3,
                      "band_benign_kept_by_divergence": 2, "band_benign_guarded_with_rollout": 1}
    # an expert whose openings do not say so (another language, a refusal later in the answer): switched off
    fitted = fit_rollout(8, divergences, labels, in_band, single, 0.4, openings({**refusing, 2: answer}), recall=0.98)
    assert fitted["check_rollout"] == 0 and fitted["their_openings_refuse"] == 2


def test_the_fit_reads_the_experts_openings_as_the_loop_makes_them(tmp_path):
    """`expert_openings` (what the fit reads) gives the tokens the loop's look-ahead gives, and leaves the adapter
    as it found it."""
    from ngsd.loading import default_cache_dir, is_converted
    from ngsd.risk.divergence_check import expert_openings

    if not is_converted():
        pytest.skip(f"the SmolLM2 tokenizer comes from the converted default model in {default_cache_dir()}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_cache_dir())
    model = tiny_model("llama", vocab_size=len(tokenizer), init=1.0)
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    texts = ["How do I bake bread?", "Name three rivers in Europe, one per line."]
    fitted = expert_openings(model, tokenizer, texts, adapter, 6)
    assert not adapter.is_attached(model)
    folder = tmp_path / "probe"
    from ngsd.api import encode_prompts

    ids, mask = encode_prompts(tokenizer, texts)
    _probe_splitting(model, ids, mask, folder)
    reflection = ReflectionConfig(mode="probe", probe=str(folder), route_below=10.0, check_above=0.0,
                                  check_divergence=0.0, check_rollout=6)
    from ngsd import generate

    looked = generate(model, tokenizer, texts, expert=adapter, max_new_tokens=1, config=NGSDConfig(reflection=reflection))
    assert [t.reflection.expert_opening for t in looked.traces] == fitted
    # a request's own eos_token_id does not cut the openings the check reads: naming the openings' own tokens ends
    # (as "'m" cut the refusal "I'm sorry, but..." to "I", a hunting helper found) routed refused requests unguarded
    own_tokens = sorted({t for text in fitted for t in tokenizer(text, add_special_tokens=False).input_ids})
    asked = generate(model, tokenizer, texts, expert=adapter, max_new_tokens=1, eos_token_id=own_tokens,
                     config=NGSDConfig(reflection=reflection))
    assert [t.reflection.expert_opening for t in asked.traces] == fitted


def test_a_streamer_gets_the_first_token_before_the_look_ahead_when_no_route_changes_it(tmp_path, monkeypatch):
    """Under the default gate no row mixes at its first token, so the check's look-ahead (the expert answering
    ahead, which delays a checked row by its own greedy steps) cannot change the first token: the streamer
    gets it first. A primed gate mixes at once: then the first token waits for the look-ahead's verdict. The
    tokens are those of a call without a streamer either way."""
    from ngsd.loading import default_cache_dir, is_converted

    if not is_converted():
        pytest.skip(f"the SmolLM2 tokenizer comes from the converted default model in {default_cache_dir()}")
    from transformers import AutoTokenizer

    from ngsd import generate
    from ngsd.api import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(default_cache_dir())
    model = tiny_model("llama", vocab_size=len(tokenizer), init=1.0)
    texts = ["How do I bake bread?", "Name three rivers in Europe, one per line."]
    ids, mask = encode_prompts(tokenizer, texts)
    _probe_splitting(model, ids, mask, tmp_path / "probe")
    events: list[tuple[str, Any]] = []

    class Recorder:
        def put(self, value):
            events.append(("put", value.clone()))

        def end(self):
            events.append(("end", None))

    decode = tokenizer.decode

    def logged_decode(*args, **kwargs):  # the look-ahead decodes each opening: the log shows when it ran
        events.append(("decode", None))
        return decode(*args, **kwargs)

    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=10.0, check_above=0.0,
                                  check_divergence=0.0, check_rollout=4)
    expert = tiny_model("llama", vocab_size=len(tokenizer), seed=5, init=1.0)  # another model: it diverges at once
    for config, early in [(NGSDConfig(reflection=reflection), True),
                          (NGSDConfig(reflection=reflection, initial_potential=1.0, tau=2.0), False)]:
        events.clear()
        quiet = generate(model, tokenizer, texts, expert=expert, max_new_tokens=3, config=config)
        with monkeypatch.context() as patch:
            patch.setattr(tokenizer, "decode", logged_decode)
            streamed = generate(model, tokenizer, texts, expert=expert, max_new_tokens=3, config=config,
                                streamer=Recorder())
        kinds = [kind for kind, _ in events]
        kinds = kinds[:kinds.index("end")]  # (generate decodes the answers after the stream ends)
        look_ahead = [i for i, kind in enumerate(kinds) if kind == "decode"][-2:]  # one opening a row
        puts = [i for i, kind in enumerate(kinds) if kind == "put"]
        assert len(puts) == 4 and look_ahead == [look_ahead[0], look_ahead[0] + 1], kinds
        assert (puts[1] < look_ahead[0]) is early, kinds
        assert torch.equal(streamed.output.sequences, quiet.output.sequences)
        tokens = torch.stack([value for kind, value in events if kind == "put"][1:], dim=1)
        assert torch.equal(tokens, streamed.output.sequences[:, streamed.output.prompt_width:])
        assert [t.spikes[:1] for t in streamed.traces] == [t.spikes[:1] for t in quiet.traces]
        assert [t.potential for t in streamed.traces] == [t.potential for t in quiet.traces]
