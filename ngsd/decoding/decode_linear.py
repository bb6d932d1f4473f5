"""Route a model's linear layers through `ngsd_kernels`' skinny form during guarded decode steps.

A guarded step on a CPU runs every linear layer on a few rows (base and expert rows of a small
batch), where `weight @ x.T` is faster than `F.linear` (see `ngsd_kernels/ops/skinny_linear.py`
and the step breakdown in `bench/results`). `attach` gives the `nn.Linear` layers that can take
that form (fp32 weights on a CPU) an instance-level `forward` that takes it only inside
`decoding()` in the calling thread and only where it is faster; everywhere else (plain `generate`,
other threads, training) it is the layer's own forward. Layers in bf16/fp16 or on CUDA, and
batches whose decode steps are outside the skinny row range, are never touched.

The guarded loop attaches for one call and detaches at its end (`ngsd.decoding.pair`), so the
model is left as it was found. Attachments are counted per layer: calls running at the same time
on one model (other threads) share the layers, and the last one to finish restores them.

>>> import torch
>>> from torch import nn
>>> layer = nn.Linear(4, 8)
>>> attached = attach(layer, rows=2)
>>> with torch.no_grad(), decoding():
...     out = layer(torch.randn(2, 4))
>>> detach(attached)
>>> "forward" in vars(layer)
False
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ngsd_kernels.ops.skinny_linear import SKINNY_MAX_ROWS, SKINNY_MIN_ROWS, skinny_applies, skinny_linear

_local = threading.local()
_lock = threading.Lock()
_USERS = "_ngsd_decode_linear_users"  # attribute of the installed forward: how many holders it has


def _decode_forward(module: nn.Linear, original: Callable[[torch.Tensor], torch.Tensor]):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if getattr(_local, "on", False) and skinny_applies(x, module.weight):
            return skinny_linear(x, module.weight, module.bias)
        return original(x)

    setattr(forward, _USERS, 0)
    return forward


def is_attached(layer: nn.Module) -> bool:
    return hasattr(layer.__dict__.get("forward"), _USERS)


def can_take_skinny_form(layer: nn.Module) -> bool:
    """An `nn.Linear` whose weight the skinny form accepts: fp32 on a CPU."""
    return (isinstance(layer, nn.Linear) and layer.weight.device.type == "cpu"
            and layer.weight.dtype == torch.float32)


def attach(model: nn.Module, rows: int | None = None) -> list[nn.Linear]:
    """Give the layers of `model` that can take the skinny form the decode-aware forward.

    `rows`: the rows of one decode step; outside the skinny range nothing is attached. Returns
    the layers this call holds, to hand back to `detach` when done.
    """
    if rows is not None and not SKINNY_MIN_ROWS <= rows <= SKINNY_MAX_ROWS:
        return []
    held = []
    with _lock:
        for module in model.modules():
            if can_take_skinny_form(module):
                if not is_attached(module):
                    module.forward = _decode_forward(module, module.forward)
                forward = module.__dict__["forward"]
                setattr(forward, _USERS, getattr(forward, _USERS) + 1)
                held.append(module)
    return held


def detach(layers: nn.Module | Iterable[nn.Module]) -> None:
    """Hand back layers from `attach`; a layer gets its own forward again when its last holder is done.

    Given a model instead, every attached layer of it is restored at once, whoever holds it.
    """
    force = isinstance(layers, nn.Module)
    with _lock:
        for module in layers.modules() if force else layers:
            if not is_attached(module):
                continue
            forward = module.__dict__["forward"]
            users = 0 if force else getattr(forward, _USERS) - 1
            setattr(forward, _USERS, users)
            if users <= 0:
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
