"""Finished guarded rows leave the batched forward: their expert copies (and, with none left, the LoRA hooks)
stop costing compute, and every other row decodes exactly as before."""

from __future__ import annotations

import pytest
import torch
from transformers import PrefixConstrainedLogitsProcessor

from ngsd import NGSDConfig, guarded_generate
from ngsd.decoding import loop
from ngsd.decoding.loop import _rows_to_retire
from ngsd.experts.lora import LoraAdapter

from .conftest import mixed_length_batch, tiny_lora_expert, tiny_model

LAYERS = 4


def _expert_and_watched_layer(kind: str, model, tmp_path):
    """The expert for `kind` and the decoder layer whose batch holds the guarded rows' expert copies."""
    if kind == "model":
        expert = tiny_model("llama", layers=LAYERS, seed=1)
        return expert, expert.model.layers[-1], None
    layers = list(range(LAYERS)) if kind == "adapter" else [2, 3]  # top layers only: the shared-trunk pair
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora", layers=layers))
    return adapter, model.model.layers[-1], adapter


def _run(model, expert, watched, adapter, ids, mask, **kwargs):
    """The call's output and, per forward of the watched layer, (rows, hooks attached)."""
    seen = []

    def record(module, args, kwargs_):
        hidden = args[0] if args else kwargs_["hidden_states"]
        seen.append((hidden.shape[0], adapter.is_attached(model) if adapter is not None else None))

    handle = watched.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = guarded_generate(model, ids, mask, expert=expert, config=NGSDConfig(tau=2.0, v_th=0.3), alpha=0.9,
                               **kwargs)
    finally:
        handle.remove()
    return out, seen


def _assert_same(retired, kept):
    assert torch.equal(retired.sequences, kept.sequences)
    for a, b in zip(retired.traces, kept.traces):
        assert (a.guarded, a.tokens, a.spikes, a.stop_reason) == (b.guarded, b.tokens, b.spikes, b.stop_reason)
        torch.testing.assert_close(torch.tensor(a.divergence), torch.tensor(b.divergence), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, sampling", [("adapter", {}), ("shared_trunk", {}), ("model", {}),
                                            ("adapter", {"do_sample": True, "temperature": 0.8, "top_k": 20, "seed": 5}),
                                            ("adapter", {"logits_processor": lambda seq, scores: scores})])
def test_finished_guarded_rows_leave_the_forward_and_the_others_decode_as_before(kind, sampling, tmp_path,
                                                                                monkeypatch):
    model = tiny_model("llama", layers=LAYERS)
    expert, watched, adapter = _expert_and_watched_layer(kind, model, tmp_path)
    ids, mask, _ = mixed_length_batch([6, 4, 7], model.config.vocab_size, seed=3)
    kwargs = dict(max_new_tokens=[3, 12, 6], **sampling)  # rows 0 and 2 finish early, row 1 decodes on
    retired, seen = _run(model, expert, watched, adapter, ids, mask, **kwargs)
    assert all(t.guarded for t in retired.traces) and any(any(t.spikes) for t in retired.traces)
    if kind == "shared_trunk":
        assert "shared trunk" in retired.traces[0].step_path
    rows = [r for r, _ in seen]
    expert_rows = [r - 3 for r in rows] if kind != "model" else rows
    # the prefill, then the forwards after tokens 1-2 with 3 expert rows, after 3-5 with 2, after 6-11 with 1
    assert expert_rows == [3, 3, 3, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    with monkeypatch.context() as patch:
        patch.setattr(loop, "_rows_to_retire", lambda guarded, finished, steps_left: set())
        kept, seen_kept = _run(model, expert, watched, adapter, ids, mask, **kwargs)
    assert {r for r, _ in seen_kept} == {rows[0]}
    _assert_same(retired, kept)


@pytest.mark.parametrize("kind", ["adapter", "shared_trunk"])
def test_the_lora_hooks_come_off_once_every_guarded_row_has_finished(kind, tmp_path, monkeypatch):
    """Routed rows decode on after the guarded ones finished: the base rows alone, no hook on any layer."""
    from ngsd import ReflectionConfig

    from .test_routing import _probe_splitting

    model = tiny_model("llama", layers=LAYERS)
    expert, watched, adapter = _expert_and_watched_layer(kind, model, tmp_path)
    ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=2)
    risks, threshold = _probe_splitting(model, ids, mask, tmp_path / "probe")
    guarded = risks >= threshold
    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=threshold, check=False)
    config = NGSDConfig(tau=2.0, v_th=0.3, reflection=reflection)
    max_new = [3 if g else 7 for g in guarded.tolist()]
    seen = []
    handle = watched.register_forward_pre_hook(
        lambda module, args, kwargs_: seen.append(((args[0] if args else kwargs_["hidden_states"]).shape[0],
                                                   adapter.is_attached(model))), with_kwargs=True)
    try:
        out = guarded_generate(model, ids, mask, expert=expert, config=config, max_new_tokens=max_new)
        with monkeypatch.context() as patch:
            patch.setattr(loop, "_rows_to_retire", lambda guarded, finished, steps_left: set())
            kept = guarded_generate(model, ids, mask, expert=expert, config=config, max_new_tokens=max_new)
    finally:
        handle.remove()
    assert [t.guarded for t in out.traces] == guarded.tolist() and guarded.sum() == 2
    retired_run, kept_run = seen[:8], seen[8:]
    # the base prefill; the guarded rows' expert prefill (shared trunk: upper layers only); the forwards after
    # tokens 1-2 with them; after tokens 3-6 without them, and without hooks
    assert retired_run == [(4, False), (2, True), (6, True), (6, True)] + [(4, False)] * 4
    assert kept_run == [(4, False), (2, True)] + [(6, True)] * 6
    assert not adapter.is_attached(model)
    _assert_same(out, kept)


def test_retiring_waits_until_the_rows_saved_pay_for_the_rows_moved():
    guarded = [0, 1, 2, 3, 4, 5]
    assert _rows_to_retire(guarded, set(), 10) == set()
    assert _rows_to_retire(guarded, {5}, 1) == {5}  # the last rows: nothing moves
    assert _rows_to_retire(guarded, {0}, 4) == set()  # 4 row-steps saved, 5 rows moved
    assert _rows_to_retire(guarded, {0}, 5) == {0}
    assert _rows_to_retire(guarded, {0, 3, 7}, 2) == {0, 3}  # 4 saved, 4 moved; 7 is not guarded
    assert _rows_to_retire(guarded, set(guarded), 1) == set(guarded)
    assert _rows_to_retire(guarded, {2}, 0) == set()  # the call ends after this step


def test_logits_processors_see_each_guarded_row_at_its_own_batch_index_after_a_row_retires(tmp_path):
    """prefix_allowed_tokens_fn reads the batch index: once row 0 retires, the others' expert logits must still be
    processed as rows 1..3 (they were renumbered 0..2 and took their neighbours' constraints)."""
    model = tiny_model("llama", layers=2)
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=2)
    eos, vocab = 2, model.config.vocab_size
    allowed = {0: [eos], **{row: [t for t in range(3, vocab) if t % 4 == row] for row in (1, 2, 3)}}
    out = guarded_generate(model, ids, mask, expert=adapter, config=NGSDConfig(tau=2.0, v_th=0.3), alpha=0.9,
                           max_new_tokens=10, pad_token_id=0, eos_token_id=eos,
                           logits_processor=PrefixConstrainedLogitsProcessor(lambda row, sent: allowed[row], 1))
    assert out.traces[0].tokens == [eos]
    for row in (1, 2, 3):
        tokens = out.traces[row].tokens
        assert len(tokens) == 10 and all(t % 4 == row for t in tokens), (row, tokens)
