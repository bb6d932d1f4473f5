"""The NeST delta shipped for the default model, and models built from a delta."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

NEST_NAME = "smollm2-135m-nest"
SHIPPED_NEST = Path(__file__).resolve().parent.parent / "assets" / "nest" / NEST_NAME


def shipped_nest_path() -> Path:
    """Folder of the NeST delta shipped for SmolLM2-135M-Instruct (nest_delta.safetensors + report)."""
    return SHIPPED_NEST


def is_nest_delta(path: str | os.PathLike[str]) -> bool:
    """A folder holding a NeST delta but no full checkpoint (config.json)."""
    from .update import DELTA_FILE

    path = Path(path)
    return (path / DELTA_FILE).is_file() and not (path / "config.json").is_file()


def nest_expert(base: Any, delta: str | os.PathLike[str] | None = None) -> Any:
    """A copy of `base` with a NeST delta folded in (default: the shipped one), for `expert=`."""
    from .update import apply_delta

    path = Path(delta) if delta is not None else SHIPPED_NEST
    return apply_delta(copy.deepcopy(base), path).eval()


def load_nest_model(delta: str | os.PathLike[str] | None = None, base: str | None = None, **load_kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer): the base (default model unless `base`) with a NeST delta folded in."""
    from ..loading import load_model
    from .update import apply_delta

    model, tokenizer = load_model(base, **load_kwargs)
    return apply_delta(model, Path(delta) if delta is not None else SHIPPED_NEST), tokenizer


_EXPERTS: dict[tuple[str, int], tuple[Any, Any]] = {}


def nest_expert_for(base: Any, delta: str | os.PathLike[str] | None = None) -> Any:
    """`nest_expert`, built once per (delta, live base model): guarded decoding resolves the expert on
    every call, and a copy of the base per call would cost its whole size each time."""
    import weakref

    key = (str(Path(delta).resolve()) if delta is not None else str(SHIPPED_NEST), id(base))
    cached = _EXPERTS.get(key)
    if cached is not None and cached[0]() is base:
        return cached[1]
    for stale in [k for k, (ref, _) in _EXPERTS.items() if ref() is None]:
        del _EXPERTS[stale]
    expert = nest_expert(base, delta)
    _EXPERTS[key] = (weakref.ref(base), expert)
    return expert
