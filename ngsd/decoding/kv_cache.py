"""Pass a KV cache to a Hugging Face model and read it back, under the name its transformers uses;
grow its full-attention layers in place instead of by concatenation.

transformers 5.2x renamed the forward argument and output field `past_key_values` to `cache` and
warns on the old name (a FutureWarning plus a logged warning on every call); older releases only
know `past_key_values`. Both are supported by asking the model class which one its forward takes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

import torch
from torch import nn


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    try:
        parameters = inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """`{"cache": cache}` or `{"past_key_values": cache}`, whichever `model`'s forward takes."""
    return {_cache_argument(type(model)): cache}


def returned_cache(output: Any) -> Any:
    """The KV cache in a model output (`output.cache`, or `output.past_key_values` before the rename)."""
    name = "cache" if "cache" in getattr(type(output), "__dataclass_fields__", {}) else "past_key_values"
    return getattr(output, name, None)


def append_cache_rows(cache: Any, other: Any) -> Any:
    """`cache` with the batch rows of `other` appended (two prefills of one model over equally wide prompts).

    Lets the guarded rows' expert copies join the base rows' cache after the base prefill, once
    the risk of each row is known. Supports transformers' dynamic caches (full and sliding-window
    layers), the caches the loop's forwards create.
    """
    layers, other_layers = getattr(cache, "layers", None), getattr(other, "layers", None)
    if layers is None or other_layers is None or len(layers) != len(other_layers):
        raise TypeError(f"cannot append the rows of a {type(other).__name__} to a {type(cache).__name__}")
    for layer, extra in zip(layers, other_layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(getattr(extra, "keys", None), torch.Tensor):
            raise TypeError(f"cannot append the rows of a {type(extra).__name__} cache layer")
        if keys.shape[1:] != extra.keys.shape[1:]:
            raise ValueError(f"cache layers differ beyond the batch: {tuple(keys.shape)} vs {tuple(extra.keys.shape)}")
        layer.keys = torch.cat([keys, extra.keys])
        layer.values = torch.cat([values, extra.values])
    return cache


def has_sliding_layers(cache: Any) -> bool:
    """True when some layer of `cache` keeps only a window of positions (its width is not the prompt's)."""
    return any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ()))


def has_sliding_window(config: Any) -> bool:
    """True when a model config may give some layer a window (or chunk) narrower than the prompt; also for an
    unknown config (None), to be safe: such a cache is not as wide as the prompt."""
    if config is None:
        return True
    text_config = getattr(config, "get_text_config", None)
    config = text_config() if callable(text_config) else config
    if getattr(config, "attention_chunk_size", None):
        return True
    types = getattr(config, "layer_types", None)
    if types:
        return any(kind != "full_attention" for kind in types)
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) is not False


def left_pad_cache(cache: Any, columns: int) -> Any:
    """`cache` with `columns` zero positions before the first in every layer: rows prefilled without their
    common left padding, made as wide as the batch whose cache they join (the attention mask is 0
    there, so the zeros are never attended to). Full-attention layers only."""
    if has_sliding_layers(cache):
        raise TypeError("cannot left-pad a cache with sliding-window layers: their width is not the prompt's")
    for layer in getattr(cache, "layers", ()):
        if isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.dim() == 4:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, columns, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, columns, 0))
    return cache


def place_cache_rows(merged: Any, cache: Any, rows: torch.Tensor, start: int, batch: int, width: int) -> Any:
    """Put a row group's prefilled cache (`row_groups.RowGroup`: its rows, prefilled from column `start` on) into
    the batch's cache of `batch` rows and `width` positions, zeros where no group wrote (padding: the attention
    mask is 0 there). `merged` None: the batch's cache is made from this one (its layers rebound); returns it.
    One group at a time, so a prefill in groups holds at most the batch's cache and one group's. Full-attention
    layers only."""
    if has_sliding_layers(cache):
        raise TypeError("cannot merge caches with sliding-window layers: their width is not the prompt's")
    for index, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        if not isinstance(keys, torch.Tensor) or keys.dim() != 4:
            raise TypeError(f"cannot merge the rows of a {type(layer).__name__} cache layer")
        if merged is None:
            layer.keys = keys.new_zeros((batch, keys.shape[1], width, keys.shape[3]))
            layer.values = values.new_zeros((batch, values.shape[1], width, values.shape[3]))
            target = layer
        else:
            target = merged.layers[index]
        target.keys[rows, :, start:] = keys
        target.values[rows, :, start:] = values
    return cache if merged is None else merged


def copy_cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache holding copies of the batch rows `rows` of `cache`, which stays as it was: a short
    look-ahead from those rows (`AdapterPair.expert_openings`) then writes into the copy only."""
    import copy

    clone = copy.copy(cache)
    clone.layers, shared = [], []
    for index, layer in enumerate(cache.layers):
        if hasattr(layer, "keep_rows"):  # a growable layer moves rows inside its buffers: the copy gets its own
            picked = rows.to(layer.keys.device)
            clone.layers.append(type(layer).holding(layer.keys.index_select(0, picked),
                                                    layer.values.index_select(0, picked)))
        else:  # select_cache_rows rebinds these layers' tensors to new ones
            clone.layers.append(copy.copy(layer))
            shared.append(index)
    return select_cache_rows(clone, rows, layers=shared) if shared else clone


def select_cache_rows(cache: Any, rows: torch.Tensor, layers: Sequence[int] | None = None) -> Any:
    """`cache` keeping only the batch rows `rows` (in that order), in every layer or in `layers` only.

    Lets a call drop expert rows it prefilled to check a request (see `RiskPlan.confirm`) without a
    second prefill of the rows it keeps. Same cache types as `append_cache_rows`.
    """
    all_layers = getattr(cache, "layers", None)
    if all_layers is None:
        raise TypeError(f"cannot select the rows of a {type(cache).__name__}")
    first_moved = _first_moved(rows)  # the same for every layer: read once
    for index in range(len(all_layers)) if layers is None else layers:
        layer = all_layers[index]
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise TypeError(f"cannot select the rows of a {type(layer).__name__} cache layer")
        if hasattr(layer, "keep_rows"):
            layer.keep_rows(rows.to(keys.device), first_moved)
            continue
        layer.keys = keys.index_select(0, rows.to(keys.device))
        layer.values = values.index_select(0, rows.to(values.device))
    return cache


def _first_moved(rows: torch.Tensor) -> int | None:
    """For strictly increasing rows (finished rows dropped), the position of the first row that changes place
    (`len(rows)` when none does); None for any other order. One read of `rows` on the host."""
    order = rows.tolist()
    if any(b <= a for a, b in zip(order, order[1:])) or (order and order[0] < 0):
        return None
    return next((position for position, row in enumerate(order) if row != position), len(order))


GROW_MIN_TOKENS = 64  # a full buffer grows by at least this many positions (or half its length)


def _dynamic_layer_class() -> type | None:
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers before the layered caches: leave the cache as it is
        return None
    return DynamicLayer


def make_growable(cache: Any) -> Any:
    """`cache` with each plain full-attention layer (`DynamicLayer`) replaced by a `GrowableLayer` holding its
    keys and values, with room for `GROW_MIN_TOKENS` more positions.

    transformers' dynamic layer concatenates its whole cache with every new token: at batch 32 and ~100
    positions that copy costs ~14 ms of a ~140 ms decode step on this CPU (SmolLM2-135M). A growable
    layer writes the new positions into spare room and hands attention a view of the filled part:
    the same values, so the same logits bit for bit. Sliding-window and other layer kinds stay as they
    are. Idempotent; returns the cache.
    """
    dynamic = _dynamic_layer_class()
    layers = getattr(cache, "layers", None)
    if dynamic is None or layers is None:
        return cache
    for index, layer in enumerate(layers):
        if type(layer) is dynamic and layer.is_initialized and isinstance(layer.keys, torch.Tensor) \
                and layer.keys.dim() == 4:
            layers[index] = growable_layer_class().holding(layer.keys, layer.values)
    return cache


@functools.lru_cache(maxsize=None)
def growable_layer_class() -> type:
    """The `GrowableLayer` class (built on first use: transformers is imported lazily)."""
    dynamic = _dynamic_layer_class()

    class GrowableLayer(dynamic):  # type: ignore[misc, valid-type]
        """A `DynamicLayer` whose keys and values are views into buffers with spare positions.

        Anything that replaces `keys` / `values` from outside (row selection, appending rows,
        cropping, reordering) is picked up at the next `update`, which copies them into fresh buffers.
        """

        @classmethod
        def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> "GrowableLayer":
            layer = cls()
            layer.device = keys.device
            layer.is_initialized = True
            layer._rebuffer(keys, values, keys.shape[-2] + GROW_MIN_TOKENS)
            return layer

        def _rebuffer(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
            filled = keys.shape[-2]
            self._key_buffer = keys.new_empty((*keys.shape[:-2], capacity, keys.shape[-1]))
            self._value_buffer = values.new_empty((*values.shape[:-2], capacity, values.shape[-1]))
            self._key_buffer[..., :filled, :].copy_(keys)
            self._value_buffer[..., :filled, :].copy_(values)
            self._expose(filled)

        def _expose(self, filled: int) -> None:
            self._filled = filled
            self.keys = self._key_buffer[..., :filled, :]
            self.values = self._value_buffer[..., :filled, :]
            self._exposed = (self.keys, self.values)

        def keep_rows(self, rows: torch.Tensor, first_moved: int | None) -> None:
            """Keep the batch rows `rows`. Increasing rows (dropping finished rows mid-call; `first_moved`:
            the position of the first that changes place, `_first_moved`) are moved down inside the buffers:
            only the rows from there on are copied (through a temporary of their size), and the buffers stay.
            Any other order (None) is a gather into new buffers."""
            if self.keys is not self._exposed[0] or self.values is not self._exposed[1]:
                self._rebuffer(self.keys, self.values, self.keys.shape[-2] + GROW_MIN_TOKENS)
            if first_moved is not None:
                kept = rows.numel()
                if first_moved < kept:
                    for buffer in (self._key_buffer, self._value_buffer):
                        buffer[first_moved:kept] = buffer.index_select(0, rows[first_moved:])
                self._key_buffer, self._value_buffer = self._key_buffer[:kept], self._value_buffer[:kept]
            else:
                self._key_buffer = self._key_buffer.index_select(0, rows)
                self._value_buffer = self._value_buffer.index_select(0, rows)
            self._expose(self._filled)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized or self.keys is None:  # reset: start over from these states
                self.device, self.is_initialized = key_states.device, True
                self._rebuffer(key_states, value_states, key_states.shape[-2] + GROW_MIN_TOKENS)
                return self.keys, self.values
            new = key_states.shape[-2]
            if self.keys is not self._exposed[0] or self.values is not self._exposed[1] \
                    or self.keys.shape[:-2] != key_states.shape[:-2]:
                self._rebuffer(self.keys, self.values, self.keys.shape[-2] + new + GROW_MIN_TOKENS)
            filled = self._filled
            if filled + new > self._key_buffer.shape[-2]:
                self._rebuffer(self.keys, self.values, filled + new + max(GROW_MIN_TOKENS, filled // 2))
            self._key_buffer[..., filled:filled + new, :].copy_(key_states)
            self._value_buffer[..., filled:filled + new, :].copy_(value_states)
            self._expose(filled + new)
            return self.keys, self.values

    return GrowableLayer

