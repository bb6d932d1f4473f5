"""A LoRA expert that only adapts the top layers: run the layers below it once per row, fork above.

An adapter whose lowest adapted decoder layer is `s` computes exactly what the base computes in
layers 0 .. s-1. `SharedTrunkPair` runs those layers on the B base rows only, then duplicates the
guarded rows' hidden state (one batch concatenation, [B + R] rows) and runs layers s .. L-1 with the
adapter's hooks on for rows >= B. The KV cache has B rows in the lower layers and B + R above, so
guarding costs about (L - s) / L of a forward instead of a whole one.

The layer loop is the decoder's own forward (transformers 5.2x `LlamaModel.forward`, which Qwen2
and Gemma share: embeddings, rotary embeddings, causal mask per layer type, layers, final norm),
written out so the batch can grow between two layers. On a GPU it is the same sequence of kernels
as the model's forward plus one `index_select` + `cat` at the split; nothing reads back to the host.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Sequence

import torch
from torch import nn

from .heads import HeadSplit
from .kv_cache import append_cache_rows, make_growable, select_cache_rows
from .pair import LazyLoraHooks, Prefill, _nothing, _PairBase, capture_hidden_states
from .pair import positions_from_mask
from ..experts.lora import LoraAdapter

# model_type values whose decoder forward is LlamaModel.forward's layer loop (checked against transformers 5.24)
SHARED_TRUNK_FAMILIES = frozenset({"llama", "qwen2", "gemma"})
_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def lowest_adapted_layer(adapter: LoraAdapter) -> int | None:
    """The lowest decoder layer the adapter changes; None when it changes a module outside the decoder layers."""
    found = [_LAYER_NAME.search(name) for name in adapter.pairs]
    if not found or any(match is None for match in found):
        return None
    return min(int(match.group(1)) for match in found)


def shared_trunk_unsupported(model: nn.Module, adapter: LoraAdapter) -> str | None:
    """Why `model` + `adapter` cannot run with a shared trunk, or None when they can."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in SHARED_TRUNK_FAMILIES:
        return (f"model family {family!r} ({type(model).__name__}) has no shared-trunk forward; "
                f"supported: {', '.join(sorted(SHARED_TRUNK_FAMILIES))}")
    split = lowest_adapted_layer(adapter)
    if split is None:
        return "the adapter changes modules outside the decoder layers (embeddings or LM head)"
    if split == 0:
        return "the adapter changes layer 0: there is no trunk to share"
    decoder = model.get_decoder()
    if not all(hasattr(decoder, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{type(decoder).__name__} lacks the Llama-style embed_tokens/layers/norm/rotary_emb"
    return None


class _SplitDecoder:
    """The decoder's forward with the batch growing from B to B + R rows at layer `split`, and its cache."""

    def __init__(self, model: nn.Module, split: int, logits: bool) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        self.config = self.decoder.config
        self.split = split
        self.head = model.get_output_embeddings() if logits else None
        self.cache = self.new_cache()
        layers = self.config.num_hidden_layers
        self.layer_types = getattr(self.config, "layer_types", None) or ["full_attention"] * layers
        self.lower, self.upper = range(0, split), range(split, layers)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def masks(self, hidden: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache) -> dict:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs = dict(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
                      position_ids=positions)
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def inputs(self, hidden: torch.Tensor, rows: int, attention_mask: torch.Tensor, positions: torch.Tensor,
               cache) -> tuple[dict, tuple]:
        """Masks and rotary embeddings for `rows` rows, computed before any layer writes this forward's keys."""
        shaped = hidden[:1].expand(rows, *hidden.shape[1:])  # only its shape and dtype are read
        return self.masks(shaped, attention_mask, positions, cache), self.decoder.rotary_emb(shaped, position_ids=positions)

    def run_layers(self, hidden: torch.Tensor, layers: range, inputs: tuple[dict, tuple], positions: torch.Tensor,
                   cache) -> torch.Tensor:
        masks, rotary = inputs
        for index in layers:
            hidden = self.decoder.layers[index](
                hidden, attention_mask=masks[self.layer_types[index]], position_embeddings=rotary,
                position_ids=positions, cache=cache, use_cache=True,
            )
        return hidden

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last position's final hidden states, or the logits when the pair returns logits."""
        last = self.decoder.norm(hidden[:, -1:, :])
        return (self.head(last) if self.head is not None else last)[:, -1, :]


class SharedTrunkPair(_PairBase):
    """`AdapterPair`'s interface and results for an adapter on the top layers only, with the lower layers run once."""

    def __init__(self, model: nn.Module, adapter: LoraAdapter, head: HeadSplit | None = None) -> None:
        super().__init__()
        reason = shared_trunk_unsupported(model, adapter)
        if reason is not None:
            raise ValueError(f"SharedTrunkPair cannot run this expert: {reason}; use AdapterPair instead")
        self.split = lowest_adapted_layer(adapter)
        self.note = f", shared trunk below layer {self.split}"
        self._adapter = adapter
        self._hooks = LazyLoraHooks(adapter, model)
        self._net = _SplitDecoder(model, self.split, logits=head is None)
        self._batch = 0
        self._mask: torch.Tensor | None = None  # base rows' attention mask so far [B, seen]
        self._next_position: torch.Tensor | None = None  # [B, 1]
        self._trunk_prompt: torch.Tensor | None = None  # layer-`split` input of the prompt, for a later guard()

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, keep_trunk: bool = False) -> torch.Tensor:
        """Layers 0..s-1 on the B rows, then s..L-1 on B + R rows (the guarded rows' copies last)."""
        net, rows, batch = self._net, self.rows, self._batch
        hidden = net.decoder.embed_tokens(input_ids)
        mask = self._mask
        lower = net.inputs(hidden, batch, mask, positions, net.cache)
        forked = rows is not None and rows.numel() > 0
        if forked:
            upper_positions = torch.cat([positions, positions[rows]])
            upper = net.inputs(hidden, batch + rows.numel(), torch.cat([mask, mask[rows]]), upper_positions, net.cache)
        hidden = net.run_layers(hidden, net.lower, lower, positions, net.cache)
        if keep_trunk:
            self._trunk_prompt = hidden
        if forked:
            with self._adapter.rows_from(batch):
                hidden = net.run_layers(torch.cat([hidden, hidden[rows]]), net.upper, upper, upper_positions,
                                        net.cache)
        else:
            hidden = net.run_layers(hidden, net.upper, lower, positions, net.cache)
        return net.output(hidden)

    def prefill(self, input_ids, attention_mask, *, guard_rows=None, capture=()) -> Prefill:
        self._remember(input_ids, attention_mask)
        self._batch = batch = input_ids.shape[0]
        if guard_rows is not None and self._set_rows(guard_rows).numel():
            self._hooks.hold()
        positions = positions_from_mask(attention_mask)
        self._mask, self._next_position = attention_mask, positions[:, -1:] + 1
        with capture_hidden_states(self._net.model, capture) if capture else _nothing() as states:
            out = self._forward(input_ids, positions, keep_trunk=guard_rows is None)
        base_states = {i: h[:batch] for i, h in (states or {}).items()}
        expert = out[batch:] if self.rows is not None and self.rows.numel() else None
        return Prefill(out[:batch], expert, base_states)

    def guard(self, rows):
        rows = self._set_rows(rows)
        trunk, self._trunk_prompt = self._trunk_prompt, None
        if rows.numel() == 0:
            return None
        self._hooks.hold()
        # the expert copies share the base rows' lower layers: run only the upper ones, from the kept trunk output
        net = self._net
        mask, positions = self._mask[rows], positions_from_mask(self._mask)[rows]
        cache = net.new_cache()
        hidden = trunk[rows]
        inputs = net.inputs(hidden, rows.numel(), mask, positions, cache)
        with self._adapter.rows_from(0):
            hidden = net.run_layers(hidden, net.upper, inputs, positions, cache)
        _append_upper_rows(net.cache, cache, net.upper)
        return net.output(hidden)

    def _drop_expert_rows(self, index):
        batch = torch.arange(self._batch, device=index.device)
        select_cache_rows(self._net.cache, torch.cat([batch, self._batch + index]), self._net.upper)
        if index.numel() == 0:  # no expert row left: the layers run without the hooks
            self._hooks.release()

    def step(self, tokens):
        batch = self._batch
        self._mask = torch.cat([self._mask, self._mask.new_ones((batch, 1))], dim=-1)
        positions = self._next_position
        self._next_position = positions + 1
        make_growable(self._net.cache)  # at the first step, after any rows guarded late joined the cache
        out = self._forward(tokens[:, None], positions)
        if self.rows.numel() == 0:
            return out, None
        return out[:batch], out[batch:]

    def close(self) -> None:
        self._net.cache = None
        self._trunk_prompt = None
        self._hooks.release()


def _append_upper_rows(cache, other, layers: Sequence[int]) -> None:
    """Append `other`'s rows to `cache` in the given layers only (the lower layers keep the base rows alone)."""
    def restricted(source) -> SimpleNamespace:  # what `append_cache_rows` reads of a cache
        return SimpleNamespace(layers=[source.layers[i] for i in layers])

    append_cache_rows(restricted(cache), restricted(other))
