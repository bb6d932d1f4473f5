"""The prefill in groups of rows of similar length (`ngsd.decoding.row_groups`): which groups, and that a grouped
prefill gives the padded prefill's outputs, cache, hidden states, risks and tokens."""

from __future__ import annotations

import pytest
import torch

import ngsd.decoding.row_groups as row_groups
from ngsd import NGSDConfig, ReflectionConfig, guarded_generate
from ngsd.decoding.kv_cache import has_sliding_window
from ngsd.decoding.pair import _CachedModel, capture_hidden_states
from ngsd.decoding.row_groups import merge_row_groups, plan_row_groups
from ngsd.experts.lora import LoraAdapter
from tests.conftest import mixed_length_batch, tiny_lora_expert, tiny_model, tiny_sliding_model
from tests.test_routing import _probe_splitting, _rows_per_embedding_call

LENGTHS = [3, 20, 5, 19, 4, 12]  # three short rows, two long ones, one between


def _mask(lengths: list[int], width: int | None = None) -> torch.Tensor:
    width = width or max(lengths)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
    return mask


def test_rows_of_similar_length_share_a_group_only_where_the_positions_saved_pay_for_a_forward():
    mask = _mask([40, 80, 41, 79, 42, 80])
    groups = plan_row_groups(mask, overhead=32)
    assert [g.rows.tolist() for g in groups] == [[0, 2, 4], [1, 3, 5]]
    assert [g.start for g in groups] == [38, 0]
    for group in groups:  # the columns a group leaves out are padding in every row of it
        assert not mask[group.rows, :group.start].any()
    # one forward over the padded batch is as cheap: nothing changes
    assert plan_row_groups(mask, overhead=1000) is None
    assert plan_row_groups(_mask([5, 9, 7]), overhead=32) is None
    # padding every row shares is left out even when no second forward pays
    (only,) = plan_row_groups(_mask([5, 9, 7], width=20), overhead=32)
    assert only.rows.tolist() == [0, 1, 2] and only.start == 11
    # many widths: the plan runs on a coarser grid and still covers every row once
    lengths = list(range(1, 400))
    groups = plan_row_groups(_mask(lengths), overhead=32)
    assert sorted(row for g in groups for row in g.rows.tolist()) == list(range(len(lengths)))
    assert all(not _mask(lengths)[g.rows, :g.start].any() for g in groups)


def test_merged_parts_land_in_their_rows_and_right_aligned_columns():
    mask = _mask([2, 4, 1])
    groups = plan_row_groups(mask, overhead=0)
    last = merge_row_groups([torch.full((len(g.rows), 3), float(i)) for i, g in enumerate(groups)], groups, 3)
    states = merge_row_groups([torch.ones(len(g.rows), 4 - g.start, 2) for g in groups], groups, 3, width=4)
    for i, group in enumerate(groups):
        assert (last[group.rows] == i).all()
    assert torch.equal(states[..., 0], mask.float())  # ones where a row's tokens are, zeros in its padding


def _prefill(model, ids, mask, overhead, monkeypatch, layers=(1, 2)):
    monkeypatch.setattr(row_groups, "GROUP_OVERHEAD_POSITIONS", overhead)
    cached = _CachedModel(model)
    with torch.no_grad(), capture_hidden_states(model, list(layers)) as states:
        last = cached.prefill(ids, mask, states)
    states = dict(states)
    with torch.no_grad():
        steps = [cached.step(torch.arange(5, 5 + ids.shape[0])) for _ in range(3)]
    return last, states, steps, cached


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_a_prefill_in_row_groups_gives_the_padded_prefills_outputs_hidden_states_and_later_steps(family, monkeypatch):
    model = tiny_model(family)
    ids, mask, _ = mixed_length_batch(LENGTHS, model.config.vocab_size, seed=4)
    assert len(plan_row_groups(mask, overhead=0)) > 2
    padded = _prefill(model, ids, mask, 10**9, monkeypatch)
    grouped = _prefill(model, ids, mask, 0, monkeypatch)
    real = mask.bool()
    torch.testing.assert_close(grouped[0], padded[0], rtol=1e-4, atol=1e-4)
    for layer in (1, 2):  # at every real position (padding positions hold zeros, not what padding computed)
        torch.testing.assert_close(grouped[1][layer][real], padded[1][layer][real], rtol=1e-4, atol=1e-4)
        assert not grouped[1][layer][~real].any()
    for grouped_step, padded_step in zip(grouped[2], padded[2]):
        torch.testing.assert_close(grouped_step, padded_step, rtol=1e-4, atol=1e-4)
    assert grouped[3].cache.layers[0].keys.shape == padded[3].cache.layers[0].keys.shape


def test_guarded_decoding_with_the_probe_routes_and_decodes_alike_with_the_prefill_in_groups(tmp_path, monkeypatch):
    model = tiny_model("llama")
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    ids, mask, _ = mixed_length_batch(LENGTHS, model.config.vocab_size, seed=2)
    _, threshold = _probe_splitting(model, ids, mask, tmp_path / "probe")
    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=threshold)
    config = NGSDConfig(tau=2.0, v_th=0.3, reflection=reflection)

    def run(overhead: int):
        monkeypatch.setattr(row_groups, "GROUP_OVERHEAD_POSITIONS", overhead)
        outputs = []
        calls = _rows_per_embedding_call(model, lambda: outputs.append(
            guarded_generate(model, ids, mask, expert=adapter, config=config, max_new_tokens=10)))
        return outputs[0], calls

    (padded, padded_calls), (grouped, grouped_calls) = run(10**9), run(0)
    assert len(grouped_calls) > len(padded_calls)  # the base prefill (and the guarded rows') ran in groups
    assert torch.equal(grouped.sequences, padded.sequences)
    assert [t.guarded for t in grouped.traces] == [t.guarded for t in padded.traces]
    assert 0 < sum(t.guarded for t in padded.traces) < len(LENGTHS)
    assert [t.reflection.risk for t in grouped.traces] == pytest.approx([t.reflection.risk for t in padded.traces],
                                                                        abs=1e-5)
    assert [t.spikes for t in grouped.traces] == [t.spikes for t in padded.traces]
    assert any(any(t.spikes) for t in padded.traces), "the gate must fire for this comparison to mean something"


def test_models_with_a_sliding_window_are_prefilled_in_one_forward(monkeypatch):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    assert not has_sliding_window(LlamaConfig()) and not has_sliding_window(Qwen2Config())
    assert has_sliding_window(MistralConfig()) and has_sliding_window(Gemma2Config())
    assert has_sliding_window(None)  # an unknown model: one forward, to be safe
    model = tiny_sliding_model()
    assert has_sliding_window(model.config)
    ids, mask, _ = mixed_length_batch(LENGTHS, model.config.vocab_size, seed=4)
    monkeypatch.setattr(row_groups, "GROUP_OVERHEAD_POSITIONS", 0)
    with torch.no_grad():
        expected = _CachedModel(model).prefill(ids, mask)
        assert _rows_per_embedding_call(model, lambda: _CachedModel(model).prefill(ids, mask)) == [len(LENGTHS)]
        # a config that does not say so: the first group's cache shows it, and the batch runs as one forward
        monkeypatch.setattr("ngsd.decoding.pair.has_sliding_window", lambda config: False)
        cached = _CachedModel(model)
        calls = _rows_per_embedding_call(model, lambda: cached.prefill(ids, mask))
        assert calls == [len(plan_row_groups(mask, overhead=0)[0].rows), len(LENGTHS)]
        torch.testing.assert_close(cached.prefill(ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_a_fixed_alpha_prefills_the_base_rows_and_their_expert_copies_in_row_groups_with_the_same_tokens(
        llama_pair, monkeypatch):
    model, folder = llama_pair
    adapter = LoraAdapter.load(folder)
    ids, mask, _ = mixed_length_batch(LENGTHS, model.config.vocab_size, seed=2)
    config = NGSDConfig(tau=2.0, v_th=0.3)

    def run(overhead: int):
        monkeypatch.setattr(row_groups, "GROUP_OVERHEAD_POSITIONS", overhead)
        outputs = []
        calls = _rows_per_embedding_call(model, lambda: outputs.append(
            guarded_generate(model, ids, mask, expert=adapter, config=config, alpha=0.9, max_new_tokens=10)))
        return outputs[0], calls

    (padded, padded_calls), (grouped, grouped_calls) = run(10**9), run(0)
    assert padded_calls[0] == 2 * len(LENGTHS)  # one forward of the base rows and their expert copies
    groups = len(plan_row_groups(mask, overhead=0))
    assert grouped_calls[:2 * groups] == [len(g.rows) for g in plan_row_groups(mask, overhead=0)] * 2
    assert torch.equal(grouped.sequences, padded.sequences)
    assert [t.spikes for t in grouped.traces] == [t.spikes for t in padded.traces]
    assert any(any(t.spikes) for t in padded.traces), "the gate must fire for this comparison to mean something"
