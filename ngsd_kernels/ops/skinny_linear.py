"""Linear layers for decode-sized inputs on a CPU: `weight @ x.T` instead of `x @ weight.T`.

A decode step feeds each linear layer a handful of rows (2 for a guarded batch of 1: the base row
and the expert row). For such skinny inputs PyTorch's CPU `F.linear` runs a general GEMM that
costs about as much per row as a whole matrix-vector product, while the transposed product
`weight @ x.T` streams the weight once. Measured on the 2-core AVX-512 machine this project is
developed on (torch 2.13 CPU, MKL), microseconds per call, F.linear vs this:

    weight        rows 2        rows 4        rows 16        rows 64        rows 128
    1536 x 576    161 / 106     241 / 146     362 / 246      1011 / 805     1804 / 1770
    576 x 576      80 / 45      100 / 64      103 / 96        318 / 313      633 / 621
    49152 x 576  19479 / 4317  14765 / 3868  18670 / 12484  44344 / 28041  84899 / 46686  (LM head)

A whole guarded decode step of the default model (LoRA expert, base and expert rows in one
forward) went from 115 to 50 ms at batch 1 and from 265 to 215 ms at batch 32.

At one row the two are equal, so one-row inputs keep `F.linear`. The results equal F.linear's up to
float rounding (another summation order). Only fp32 on CPU without autograd takes this path; CUDA
and everything else use `F.linear` unchanged.

    >>> import torch
    >>> w, x = torch.randn(8, 4), torch.randn(2, 4)
    >>> torch.allclose(skinny_linear(x, w), torch.nn.functional.linear(x, w), atol=1e-6)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SKINNY_MIN_ROWS = 2
SKINNY_MAX_ROWS = 128


def skinny_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `skinny_linear` is the faster form for this call (2..128 rows, fp32, CPU, no grad)."""
    rows = x.numel() // max(1, x.shape[-1])
    return (
        SKINNY_MIN_ROWS <= rows <= SKINNY_MAX_ROWS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
    )


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as `(weight @ x.T).T` (same shape, contiguous)."""
    if x.dim() == 0 or weight.dim() != 2:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(weight, flat.t()).t().contiguous()
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])
