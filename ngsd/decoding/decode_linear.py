"""Route a model's linear layers through `ngsd_kernels`' skinny form during guarded decode steps.

A guarded step on a CPU runs every linear layer on a few rows (base and expert rows of a small
batch), where `weight @ x.T` is up to 4x faster than `F.linear` (the LM head of the default model:
19 ms -> 4 ms for two rows; see `ngsd_kernels/ops/skinny_linear.py`). Each `nn.Linear` of the
model gets an instance-level `forward` that takes the skinny form only inside `decoding()` in the
calling thread and only where it is faster; everywhere else (plain `generate`, other threads,
training, CUDA) it is the layer's own forward.

>>> import torch
>>> from torch import nn
>>> layer = nn.Linear(4, 8)
>>> attach(layer)
>>> with torch.no_grad(), decoding():
...     out = layer(torch.randn(2, 4))
>>> detach(layer)
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from ngsd_kernels.ops.skinny_linear import skinny_applies, skinny_linear

_local = threading.local()
_MARK = "_ngsd_decode_linear"


def _decode_forward(module: nn.Linear, original: Callable[[torch.Tensor], torch.Tensor]):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if getattr(_local, "on", False) and skinny_applies(x, module.weight):
            return skinny_linear(x, module.weight, module.bias)
        return original(x)

    setattr(forward, _MARK, True)
    return forward


def attach(model: nn.Module) -> None:
    """Give every `nn.Linear` of `model` the decode-aware forward (idempotent)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and not getattr(module.__dict__.get("forward"), _MARK, False):
            module.forward = _decode_forward(module, module.forward)


def detach(model: nn.Module) -> None:
    """Undo `attach`: the layers' own forwards again."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), _MARK, False):
            del module.forward


@contextmanager
def decoding() -> Iterator[None]:
    """Within this block, in this thread, attached linear layers take the skinny form where it is faster."""
    previous = getattr(_local, "on", False)
    _local.on = True
    try:
        yield
    finally:
        _local.on = previous
