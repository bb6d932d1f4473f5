"""Warnings that point at the user's own line.

A fixed `stacklevel` cannot: the same warning is reached from `guarded_generate`, `ngsd.generate`
and a patched `model.generate` (through transformers and torch's `no_grad` wrapper), each at a
different depth, and Python 3.11 has no `skip_file_prefixes`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from functools import lru_cache

_LIBRARIES = ("ngsd", "transformers", "torch")


@lru_cache(maxsize=1)
def _library_folders() -> tuple[str, ...]:
    folders = []
    for name in _LIBRARIES:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            folders.append(os.path.join(os.path.realpath(location), ""))
    return tuple(folders)


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """`warnings.warn` attributed to the first frame outside ngsd, transformers and torch."""
    folders = _library_folders()
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.realpath(frame.f_code.co_filename).startswith(folders):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
