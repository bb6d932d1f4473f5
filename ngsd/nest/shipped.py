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
