"""The growable KV cache layer: the decode loop's caches grow in place, with the logits of concatenation."""

from __future__ import annotations

import contextlib

import pytest
import torch

from ngsd.decoding import pair as pair_module
from ngsd.decoding.kv_cache import GROW_MIN_TOKENS, growable_layer_class, make_growable, returned_cache

from .conftest import mixed_length_batch, tiny_model


class _Decoder:
    """The loop's `_CachedModel` and its last logits; growable=False keeps transformers' own cache."""

    def __init__(self, model, input_ids, mask, growable: bool, monkeypatch) -> None:
        self.cached = pair_module._CachedModel(model)
        self.growable, self.monkeypatch = growable, monkeypatch
        with self._cache_kind():
            self.logits = self.cached.prefill(input_ids, mask)

    @contextlib.contextmanager
    def _cache_kind(self):
        with self.monkeypatch.context() as patch:
            if not self.growable:
                patch.setattr(pair_module, "make_growable", lambda cache: cache)
            yield

    @property
    def cache(self):
        return self.cached.cache

    def step(self, tokens: torch.Tensor) -> None:
        with self._cache_kind():
            self.logits = self.cached.step(tokens)

    def keep(self, rows: torch.Tensor) -> None:
        self.cached.keep_rows(rows)
        self.logits = self.logits[rows]

    def append(self, other: "_Decoder") -> None:
        self.cached.append_rows(other.cached)
        self.logits = torch.cat([self.logits, other.logits])


def _decode_both(plain: _Decoder, grown: _Decoder, steps: int) -> None:
    for _ in range(steps):
        assert torch.equal(plain.logits, grown.logits)
        tokens = plain.logits.argmax(-1)
        plain.step(tokens)
        grown.step(tokens)
    assert torch.equal(plain.logits, grown.logits)


def test_growable_cache_decodes_the_logits_of_concatenation_and_writes_in_place(monkeypatch):
    model = tiny_model("llama", max_positions=256)
    input_ids, mask, _ = mixed_length_batch([5, 9, 3], model.config.vocab_size)
    with torch.no_grad():
        plain = _Decoder(model, input_ids, mask, growable=False, monkeypatch=monkeypatch)
        grown = _Decoder(model, input_ids, mask, growable=True, monkeypatch=monkeypatch)
        # the prefill leaves transformers' cache (its rows may still be padded or appended elsewhere); the
        # first decode step makes it growable
        assert type(grown.cache.layers[0]) is not growable_layer_class()
        _decode_both(plain, grown, 1)
        layer = grown.cache.layers[0]
        assert type(layer) is growable_layer_class() and type(plain.cache.layers[0]) is not growable_layer_class()
        buffer = layer.keys.data_ptr()
        _decode_both(plain, grown, GROW_MIN_TOKENS - 1)
        assert grown.cache.layers[0].keys.data_ptr() == buffer, "a step inside the spare room must not reallocate"
        _decode_both(plain, grown, 40)  # past the first spare room: the buffer grows once, values unchanged
        assert grown.cache.layers[0].keys.shape == plain.cache.layers[0].keys.shape
        assert grown.cache.get_seq_length() == plain.cache.get_seq_length() == input_ids.shape[1] + GROW_MIN_TOKENS + 40


def test_growable_cache_follows_rows_selected_and_appended_from_outside(monkeypatch):
    """The loop drops checked expert rows and appends guarded ones between steps (`select_cache_rows`,
    `append_cache_rows` replace a layer's keys): the next step must see exactly those rows."""
    model = tiny_model("qwen2")
    input_ids, mask, _ = mixed_length_batch([6, 4, 7], model.config.vocab_size, seed=3)
    with torch.no_grad():
        plain = _Decoder(model, input_ids, mask, growable=False, monkeypatch=monkeypatch)
        grown = _Decoder(model, input_ids, mask, growable=True, monkeypatch=monkeypatch)
        _decode_both(plain, grown, 3)
        rows = torch.tensor([2, 0])
        plain.keep(rows)
        grown.keep(rows)
        _decode_both(plain, grown, 3)
        width = plain.cached.attention_mask.shape[1]  # appended rows are prefilled as wide as the cache
        extra_ids, extra_mask, _ = mixed_length_batch([width, width - 2], model.config.vocab_size, seed=5)
        plain.append(_Decoder(model, extra_ids, extra_mask, growable=False, monkeypatch=monkeypatch))
        grown.append(_Decoder(model, extra_ids, extra_mask, growable=True, monkeypatch=monkeypatch))
        assert grown.logits.shape[0] == 4
        _decode_both(plain, grown, 3)


def test_growable_cache_drops_finished_rows_inside_its_buffers(monkeypatch):
    """Rows kept in increasing order (finished rows leaving mid-call) move down in place: no new buffer."""
    model = tiny_model("llama")
    input_ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=4)
    with torch.no_grad():
        plain = _Decoder(model, input_ids, mask, growable=False, monkeypatch=monkeypatch)
        grown = _Decoder(model, input_ids, mask, growable=True, monkeypatch=monkeypatch)
        _decode_both(plain, grown, 2)
        buffer = grown.cache.layers[0]._key_buffer.data_ptr()
        for rows in (torch.tensor([0, 2, 3]), torch.tensor([1, 2]), torch.tensor([0, 1])):
            plain.keep(rows)
            grown.keep(rows)
            _decode_both(plain, grown, 2)
            assert grown.cache.layers[0]._key_buffer.data_ptr() == buffer
        plain.keep(torch.tensor([], dtype=torch.long))
        grown.keep(torch.tensor([], dtype=torch.long))
        assert grown.cache.layers[0].keys.shape[0] == 0


def test_make_growable_is_idempotent_and_leaves_an_empty_cache_alone():
    from transformers import DynamicCache

    model = tiny_model("llama")
    input_ids, mask, _ = mixed_length_batch([4, 4], model.config.vocab_size)
    with torch.no_grad():
        cache = returned_cache(model(input_ids=input_ids, attention_mask=mask, use_cache=True))
    layers = list(make_growable(cache).layers)
    assert list(make_growable(cache).layers) == layers  # the same layer objects: nothing rebuilt
    empty = DynamicCache()
    assert make_growable(empty) is empty and not any(type(l) is growable_layer_class() for l in empty.layers)


def test_rows_guarded_after_the_prefill_skip_their_common_left_padding_with_the_same_outputs(llama_pair):
    """`guard` prefills short guarded rows of a wide batch without the padding columns they share, pads
    their cache back on the left, and then decodes as if they had been prefilled at full width."""
    from ngsd.decoding.pair import AdapterPair, ModelPair
    from ngsd.experts.lora import LoraAdapter

    model, folder = llama_pair
    adapter = LoraAdapter.load(folder)
    input_ids, mask, _ = mixed_length_batch([9, 3, 4, 8], model.config.vocab_size, seed=7)
    rows = [1, 2]
    widths = []
    embeddings = model.get_input_embeddings()
    with torch.no_grad():
        whole = AdapterPair(model, adapter)
        at_once = whole.prefill(input_ids, mask, guard_rows=rows)
        later = AdapterPair(model, adapter)
        later.prefill(input_ids, mask)
        handle = embeddings.register_forward_hook(lambda module, args, out: widths.append(tuple(out.shape[:2])))
        try:
            expert = later.guard(rows)
        finally:
            handle.remove()
        assert widths == [(2, 4)], "the two guarded rows share 5 padding columns: prefilled 4 wide"
        # (the prefill at once runs 18 expert positions, whose q / k / v and gate / up LoRA products are fused; the
        # later one 8, each layer's own: equal up to float rounding, ~2e-5 here)
        torch.testing.assert_close(expert, at_once.expert, rtol=1e-4, atol=1e-4)
        for step in range(4):
            tokens = torch.full((4,), 3 + step)
            base_a, expert_a = whole.step(tokens)
            base_b, expert_b = later.step(tokens)
            torch.testing.assert_close(base_b, base_a, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(expert_b, expert_a, rtol=1e-4, atol=1e-4)
        whole.close()
        later.close()

        separate = ModelPair(model, model)  # a separate expert model keeps its own, narrower cache
        separate.prefill(input_ids, mask)
        first = separate.guard(rows)
        torch.testing.assert_close(first, model(input_ids=input_ids[rows], attention_mask=mask[rows]).logits[:, -1],
                                   rtol=1e-5, atol=1e-5)
        base, expert = separate.step(torch.full((4,), 5))
        torch.testing.assert_close(expert, base[rows], rtol=1e-5, atol=1e-5)
        separate.close()


@pytest.mark.parametrize("pair_kind", ["adapter", "shared_trunk"])
def test_a_pair_attaches_the_lora_hooks_only_once_a_row_is_guarded(pair_kind, tmp_path):
    """A call whose rows are all routed runs the base alone: no hooks attached, none run on its projections."""
    from ngsd.decoding.pair import AdapterPair, positions_from_mask
    from ngsd.decoding.shared_trunk import SharedTrunkPair
    from ngsd.experts.lora import LoraAdapter

    from .conftest import tiny_lora_expert

    model = tiny_model("llama", layers=4)
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora", layers=[2, 3]))
    pair_class = AdapterPair if pair_kind == "adapter" else SharedTrunkPair
    input_ids, mask, _ = mixed_length_batch([5, 3], model.config.vocab_size, seed=3)
    with torch.no_grad():
        routed = pair_class(model, adapter)
        plain = routed.prefill(input_ids, mask).base
        assert routed.guard([]) is None and not adapter.is_attached(model)
        base, expert = routed.step(torch.full((2,), 4))
        assert expert is None and not adapter.is_attached(model)
        routed.close()
        torch.testing.assert_close(plain, model(input_ids=input_ids, attention_mask=mask,
                                                 position_ids=positions_from_mask(mask)).logits[:, -1],
                                   rtol=1e-5, atol=1e-5)
        later = pair_class(model, adapter)
        later.prefill(input_ids, mask)
        assert not adapter.is_attached(model)
        later.guard([1])
        assert adapter.is_attached(model)
        later.close()
        assert not adapter.is_attached(model), "the call that attached the hooks takes them off"
        at_once = pair_class(model, adapter)
        at_once.prefill(input_ids, mask, guard_rows=[0])
        assert adapter.is_attached(model)
        at_once.close()
        assert not adapter.is_attached(model)


def test_sliding_window_layers_keep_their_own_cache_and_guarded_rows_are_not_trimmed(tmp_path):
    """A model mixing full and sliding-window layers: only the full ones grow in place; rows guarded
    after the prefill are prefilled at full width (a window's width is not the prompt's)."""
    from ngsd import NGSDConfig, guarded_generate
    from ngsd.decoding.pair import AdapterPair
    from ngsd.experts.lora import LoraAdapter

    from .conftest import tiny_lora_expert, tiny_sliding_model

    model = tiny_sliding_model()
    input_ids, mask, _ = mixed_length_batch([9, 3, 12], 96, seed=1)
    plain = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    assert torch.equal(guarded_generate(model, input_ids, mask, config=NGSDConfig(mode="off"), max_new_tokens=20,
                                        pad_token_id=0).sequences, plain)
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    with torch.no_grad():
        at_once, later = AdapterPair(model, adapter), AdapterPair(model, adapter)
        expected = at_once.prefill(input_ids, mask, guard_rows=[1]).expert
        later.prefill(input_ids, mask)
        torch.testing.assert_close(later.guard([1]), expected, rtol=1e-5, atol=1e-5)
        for step in range(8):  # past the window
            tokens = torch.full((3,), 4 + step)
            for got, want in zip(later.step(tokens), at_once.step(tokens)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        kinds = [type(layer).__name__ for layer in later._both.cache.layers]  # growable from the first step on
        assert kinds == ["GrowableLayer", "DynamicSlidingWindowLayer"]


def test_a_fork_of_a_cache_that_has_decoded_leaves_it_as_it_was(monkeypatch):
    """`_CachedModel.fork` (the check's look-ahead) on a cache whose layers are already growable: the fork
    decodes on fresh buffers, and the original then decodes exactly as an untouched twin."""
    model = tiny_model("llama")
    input_ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=4)
    tokens = torch.tensor([3, 5, 7, 9])
    with torch.no_grad():
        forked = _Decoder(model, input_ids, mask, growable=True, monkeypatch=monkeypatch)
        twin = _Decoder(model, input_ids, mask, growable=True, monkeypatch=monkeypatch)
        _decode_both(forked, twin, 2)  # both caches growable now
        for rows in (torch.tensor([2]), torch.tensor([1, 3]), torch.tensor([3, 0])):
            fork = forked.cached.fork(rows)
            for _ in range(3):
                fork.step(tokens[rows])
            forked.step(tokens)
            twin.step(tokens)
            assert torch.equal(forked.logits, twin.logits), rows
