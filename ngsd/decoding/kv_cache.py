"""Pass a KV cache to a Hugging Face model and read it back, under the name its transformers uses.

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


def select_cache_rows(cache: Any, rows: torch.Tensor, layers: Sequence[int] | None = None) -> Any:
    """`cache` keeping only the batch rows `rows` (in that order), in every layer or in `layers` only.

    Lets a call drop expert rows it prefilled to check a request (see `RiskPlan.confirm`) without a
    second prefill of the rows it keeps. Same cache types as `append_cache_rows`.
    """
    all_layers = getattr(cache, "layers", None)
    if all_layers is None:
        raise TypeError(f"cannot select the rows of a {type(cache).__name__}")
    for index in range(len(all_layers)) if layers is None else layers:
        layer = all_layers[index]
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise TypeError(f"cannot select the rows of a {type(layer).__name__} cache layer")
        layer.keys = keys.index_select(0, rows.to(keys.device))
        layer.values = values.index_select(0, rows.to(values.device))
    return cache
