"""Checks of the per-call arguments of guarded generation: each bad value is refused by name.

Every entry point (`ngsd.generate`, `guarded_generate`, `ngsd_alpha=` on a guarded
`model.generate`, the CLI) reaches these through `guarded_generate`, so they cannot disagree.

>>> per_row_alphas(0.5, 2)
[0.5, 0.5]
>>> per_row_alphas(["0.5"], 1)
Traceback (most recent call last):
...
TypeError: alpha must be a number or one number per row, got '0.5' (str) in row 0
"""

from __future__ import annotations

import math
from collections.abc import Set as AbstractSet
from numbers import Integral, Real
from typing import Any, Callable, Mapping, Sequence

import torch

from ngsd_kernels.params import MIN_SAMPLING_TEMPERATURE

from .prompt_text import check_prompt_text


def _rows(value: Any, batch: int, name: str, check: Callable[[int, Any], None]) -> list[Any]:
    """A scalar repeated per row, or exactly one value per row; `check(row, value)` runs on each
    value before the count is checked, so a wrong type is named as such."""
    if isinstance(value, (Mapping, AbstractSet)):  # a dict's keys as the values, or a set's own order as the rows'
        raise TypeError(f"{name} must be a value or a sequence of one per row, got a {type(value).__name__}")
    if isinstance(value, torch.Tensor) or (hasattr(value, "ndim") and hasattr(value, "tolist")):  # also numpy arrays
        value = value.item() if value.ndim == 0 else value.flatten().tolist()
    scalar = isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not hasattr(value, "__iter__")
    values = [value] if scalar else list(value)
    for row, item in enumerate(values):
        check(row, item)
    if scalar:
        return values * batch
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} values for a batch of {batch}; give one per row or a single value")
    return values


def per_row_alphas(alpha: Any, batch: int, upper: float | None = 1.0) -> list[float]:
    """One finite mixing strength per row, each in [0, upper] (`upper` None: any finite value >= 0,
    as SafeDecoding's alpha, which scales the expert-minus-base difference)."""
    def check(row: int, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"alpha must be a number or one number per row, got {value!r} ({type(value).__name__}) in row {row}")
        if not math.isfinite(value) or value < 0 or (upper is not None and value > upper):
            bound = "[0, 1]" if upper is not None else ">= 0"
            raise ValueError(f"alpha must be finite and {bound}, got {value} in row {row}")

    return [float(value) for value in _rows(alpha, batch, "alpha", check)]


def per_row_ints(value: Any, batch: int, name: str, minimum: int = 1) -> list[int]:
    """One int >= `minimum` per row; floats (also 2.0), bools and strings are refused by name."""
    def check(row: int, item: Any) -> None:
        if isinstance(item, bool) or not isinstance(item, Integral):
            raise TypeError(f"{name} must be an int or one int per row, got {item!r} ({type(item).__name__}) in row {row}")
        if item < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {item} in row {row}")

    return [int(item) for item in _rows(value, batch, name, check)]


def token_ids(value: Any, name: str) -> list[int]:
    """Token ids given as None (none), one id, or a list / tensor / array of them; anything else refused by name.

    >>> token_ids(2, "eos_token_id"), token_ids(torch.tensor([2, 7]), "eos_token_id"), token_ids(None, "eos_token_id")
    ([2], [2, 7], [])
    """
    if value is None:
        return []
    if isinstance(value, torch.Tensor) or (hasattr(value, "ndim") and hasattr(value, "tolist")):  # numpy too
        value = value.flatten().tolist() if value.ndim else [value.item()]
    elif isinstance(value, Integral) or not isinstance(value, (Sequence, AbstractSet)) or isinstance(value, str):
        value = [value]
    for item in value:
        if isinstance(item, bool) or not isinstance(item, Integral):
            raise TypeError(f"{name} must be a token id (an int) or a list of them, got {item!r} ({type(item).__name__})")
        if item < 0:
            raise ValueError(f"{name} must hold token ids >= 0, got {item}")
    return [int(item) for item in value]


def check_sampling(do_sample: Any, temperature: Any, top_k: Any, top_p: Any) -> dict[str, float | int]:
    """The op's sampling parameters (temperature 0 for greedy), each checked by name."""
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be True or False, got {do_sample!r}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    top_k = 0 if top_k is None else top_k
    if isinstance(top_k, bool) or not isinstance(top_k, Integral):
        raise TypeError(f"top_k must be an int (0 disables it), got {top_k!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if do_sample and not temperature >= MIN_SAMPLING_TEMPERATURE:
        raise ValueError(f"sampling needs temperature >= {MIN_SAMPLING_TEMPERATURE:g}, got {temperature} (a "
                         "smaller one is greedy decoding); use do_sample=False for greedy")
    return dict(temperature=float(temperature) if do_sample else 0.0, top_k=int(top_k), top_p=float(top_p))


def check_seed(seed: Any) -> int | None:
    """The sampling seed: None (drawn from torch's generator) or a whole number that fits an int64."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"seed must be an int or None, got {seed!r} ({type(seed).__name__})")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit a 64-bit signed integer, got {seed}")
    return int(seed)


def check_prompt_texts(prompts: Any, name: str = "prompts") -> list[str]:
    """A list of non-empty strings (one string is a batch of one); anything else is refused by name."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(prompts).__name__}")
    out = list(prompts)
    if not out:
        raise ValueError(f"{name} is empty: give at least one prompt")
    for i, prompt in enumerate(out):
        check_prompt_text(prompt, f"{name}[{i}]")
    return out
