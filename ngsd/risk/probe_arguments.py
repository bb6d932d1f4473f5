"""Checks of the risk probe's training arguments that need no torch: `TrainProbeConfig` and the fits call them,
and so does `ngsd train-probe` before it loads anything."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence


def is_l2_strength(value: Any) -> bool:
    """An L2 strength: a finite real number >= 0 (NaN passed `v < 0`, then gave NaN weights)."""
    try:
        return not isinstance(value, bool) and math.isfinite(value) and value >= 0
    except TypeError:
        return False


def check_l2(l2: Any, name: str = "l2") -> None:
    """ValueError unless `l2` is one finite strength >= 0 (a NaN or infinite strength fits NaN weights)."""
    if not is_l2_strength(l2):
        raise ValueError(f"{name} must be a finite strength >= 0, got {l2!r}")


def check_layer_indices(layers: Sequence[Any], name: str = "layers") -> None:
    """ValueError unless every entry is a hidden-state index >= 0 (0 = the embeddings); a negative index once
    ended in an IndexError after the model load, or (mixed with valid ones) after the whole feature extraction."""
    bad = [v for v in layers if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0]
    if bad:
        hint = "; count from the bottom, not from the end" if any(isinstance(v, (int, float)) and v < 0 for v in bad) else ""
        raise ValueError(f"{name} must be integer hidden-state indices >= 0 (0 = the embeddings, i = the output of "
                         f"decoder layer i), got {', '.join(map(repr, bad))}{hint}")
