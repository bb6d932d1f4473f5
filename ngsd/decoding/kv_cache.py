"""Pass a KV cache to a Hugging Face model and read it back, under the name its transformers uses.

transformers 5.2x renamed the forward argument and output field `past_key_values` to `cache` and
warns on the old name (a FutureWarning plus a logged warning on every call); older releases only
know `past_key_values`. Both are supported by asking the model class which one its forward takes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

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
