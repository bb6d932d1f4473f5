"""Contrastive decoding's token choice: the strong model's logits against a weak (amateur) model's.

For each row, with ``l_s``, ``l_w`` the two models' logits (fp32 math whatever the input dtype):

1. plausible tokens: ``p_s(i) >= plausibility * max p_s``, i.e. ``l_s(i) >= max l_s + log(plausibility)``
   (Li et al.'s adaptive plausibility constraint, their alpha);
2. score ``c(i) = l_s(i) - beta * l_w(i)`` on them (``l_s`` alone when beta is 0). Per row this is
   ``log p_s - beta log p_w`` up to a constant, so ``beta = 1`` is Li et al. 2023 (arXiv 2210.15097) and
   O'Brien & Lewis' ``(1 + b) l_s - b l_w`` (arXiv 2309.09117) is ``beta = b / (1 + b)`` at temperature
   ``T / (1 + b)`` (the same greedy tokens);
3. choice: greedy ``argmax c`` (ties: lowest id) at ``temperature`` 0, else a draw from
   ``q ∝ exp(c / T)`` on the plausible tokens, by the Gumbel-max trick with the Philox stream the guarded
   step uses (``philox.py``): the same ``(seed, row, offset)`` names the same uniforms.

A plausible token the weak model rules out (``l_w = -inf``) scores ``+inf`` when beta > 0; several such
tokens go to the lowest id, sampled or not (noise cannot tell infinite scores apart). A plausible
token's score never falls below the lowest finite fp32 (-3.4e38), so an overflowing ``beta * l_w``
cannot make it implausible. Rows whose logits hold NaN or +inf, or whose strong or weak row is all
-inf (or empty), are invalid and get token -1.

Backends: ``torch.ops.ngsd.contrastive_select`` (the Triton kernel on CUDA, the PyTorch reference
elsewhere) and ``torch.ops.ngsd.contrastive_select_triton`` (always the kernel: CUDA, or CPU under
``TRITON_INTERPRET=1``); both have a fake for ``torch.compile``.

>>> import torch
>>> from ngsd_kernels import ContrastiveParams, contrastive_select
>>> strong = torch.tensor([[4.0, 3.9, 0.0, -1.0]])
>>> weak = torch.tensor([[4.0, 1.0, 0.0, -1.0]])   # the amateur is as sure of token 0: token 1 wins
>>> contrastive_select(strong, weak, params=ContrastiveParams(beta=1.0, plausibility=0.1)).tolist()
[1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import (check_logits_pair, check_one_device, check_seed_offset, check_tensor_arguments,
                     require_triton)
from .params import MIN_SAMPLING_TEMPERATURE, _real
from .philox import philox_uniform
from .reference import row_is_valid
from .select import default_seed_offset


FP32_MAX = float(torch.finfo(torch.float32).max)
FP32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal fp32: a smaller beta would be 0 there


@dataclass(frozen=True)
class ContrastiveParams:
    """beta >= 0 weighs the weak model; plausibility in (0, 1] cuts tokens far below the strong model's best;
    temperature 0 is greedy, else at least 1e-5."""

    beta: float = 1.0
    plausibility: float = 0.1
    temperature: float = 0.0

    def __post_init__(self) -> None:
        for name in ("beta", "plausibility", "temperature"):
            value = _real(f"ContrastiveParams.{name}", getattr(self, name))
            if abs(value) > FP32_MAX:
                raise ValueError(f"ContrastiveParams.{name} must fit fp32 (the kernels' arithmetic), got {value}")
            object.__setattr__(self, name, value)
        if self.beta < 0 or 0 < self.beta < FP32_TINY:
            raise ValueError(f"ContrastiveParams.beta must be 0 (the strong model alone) or in [{FP32_TINY:g}, "
                             f"{FP32_MAX:g}] (fp32), got {self.beta}")
        if not 0 < self.plausibility <= 1:
            raise ValueError(f"ContrastiveParams.plausibility must be in (0, 1] (Li et al. use 0.1), got "
                             f"{self.plausibility}")
        if not (self.temperature == 0 or self.temperature >= MIN_SAMPLING_TEMPERATURE):
            raise ValueError(f"ContrastiveParams.temperature must be 0 (greedy) or >= {MIN_SAMPLING_TEMPERATURE:g}, "
                             f"got {self.temperature}")


def contrastive_scores(strong_logits: Tensor, weak_logits: Tensor, params: ContrastiveParams) -> Tensor:
    """[B, V] fp32 contrastive scores ``l_s - beta l_w`` on the plausible tokens, -inf elsewhere."""
    strong, weak = strong_logits.float(), weak_logits.float()
    score = strong if params.beta == 0 else strong - params.beta * weak
    floor = strong.amax(-1, keepdim=True) + math.log(params.plausibility)
    return torch.where(strong >= floor, score.clamp_min(-FP32_MAX), torch.full_like(score, float("-inf")))


def contrastive_select_reference(strong_logits: Tensor, weak_logits: Tensor, seed: Tensor, offset: Tensor,
                                 params: ContrastiveParams) -> Tensor:
    """The definition (module docstring): tokens int64 [B], -1 for invalid rows."""
    valid = row_is_valid(strong_logits.float()) & row_is_valid(weak_logits.float())
    if strong_logits.shape[1] == 0:  # no token at all: every row invalid, as in the guarded step
        return torch.full(valid.shape, -1, dtype=torch.int64, device=valid.device)
    scores = contrastive_scores(strong_logits, weak_logits, params)
    if params.temperature > 0:
        u = philox_uniform(seed, offset, scores.shape[-1], torch.arange(scores.shape[0], device=scores.device))
        plausible = scores > float("-inf")
        perturbed = (scores / params.temperature + -torch.log(-torch.log(u))).clamp_min(-FP32_MAX)
        scores = torch.where(plausible, perturbed, scores)
    tokens = torch.argmax(scores, dim=-1)  # the first (lowest) id among equal maxima
    return torch.where(valid, tokens, torch.full_like(tokens, -1))


def check_contrastive_inputs(strong_logits: Tensor, weak_logits: Tensor, seed: Tensor, offset: Tensor) -> None:
    """ValueError naming the argument: [B, V] logits of one float dtype and shape, int64 seed / offset of 1 or B,
    one device."""
    check_logits_pair(strong_logits, weak_logits, ("strong", "weak"),
                      "both models must share one vocabulary (slice a padded LM head to the tokenizer's size first)")
    check_seed_offset(strong_logits.shape[0], seed, offset)
    check_one_device(strong_logits, weak_logits, seed, offset)


_SCHEMA = ("(Tensor strong_logits, Tensor weak_logits, Tensor seed, Tensor offset, float beta, float plausibility, "
           "float temperature) -> Tensor")


def _torch_op(strong_logits: Tensor, weak_logits: Tensor, seed: Tensor, offset: Tensor, beta: float,
              plausibility: float, temperature: float) -> Tensor:
    params = ContrastiveParams(beta, plausibility, temperature)
    check_contrastive_inputs(strong_logits, weak_logits, seed, offset)
    return contrastive_select_reference(strong_logits, weak_logits, seed, offset, params)


def _triton_op(strong_logits: Tensor, weak_logits: Tensor, seed: Tensor, offset: Tensor, beta: float,
               plausibility: float, temperature: float) -> Tensor:
    require_triton()
    from .ops.contrastive_select import triton_contrastive_select  # lazy: Triton is optional on CPU

    ContrastiveParams(beta, plausibility, temperature)
    check_contrastive_inputs(strong_logits, weak_logits, seed, offset)
    return triton_contrastive_select(strong_logits, weak_logits, seed, offset, beta, plausibility, temperature)


def _fake(strong_logits: Tensor, *rest) -> Tensor:
    return strong_logits.new_empty((strong_logits.shape[0],), dtype=torch.int64)


def _define(name: str, default, cuda) -> None:
    op = torch.library.custom_op(f"ngsd::{name}", default, mutates_args=(), schema=_SCHEMA)
    if cuda is not None:
        op.register_kernel("cuda")(cuda)
    op.register_fake(_fake)


_define("contrastive_select", _torch_op, _triton_op)
_define("contrastive_select_triton", _triton_op, None)

BACKENDS = ("auto", "torch", "triton")


def contrastive_select(strong_logits: Tensor, weak_logits: Tensor, seed: Tensor | int | None = None,
                       offset: Tensor | int | None = None, params: ContrastiveParams = ContrastiveParams(),
                       backend: str = "auto") -> Tensor:
    """Next tokens int64 [B] (-1: invalid row) of contrastive decoding (module docstring).

    ``seed`` / ``offset`` (int64 tensors of 1 or B values, or Python ints; default 0) name the sampling stream
    as in ``guarded_select``.
    ``backend``: ``"auto"`` (the op: Triton on CUDA, PyTorch elsewhere), ``"triton"`` (always the kernel),
    ``"torch"`` (the reference called directly).
    """
    if not isinstance(params, ContrastiveParams):
        raise TypeError(f"params must be an ngsd_kernels.ContrastiveParams, got {type(params).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_tensor_arguments(strong_logits=strong_logits, weak_logits=weak_logits)
    seed, offset = default_seed_offset(seed, offset, strong_logits.device)
    check_contrastive_inputs(strong_logits, weak_logits, seed, offset)
    if backend == "torch":
        return contrastive_select_reference(strong_logits, weak_logits, seed, offset, params)
    op = torch.ops.ngsd.contrastive_select if backend == "auto" else torch.ops.ngsd.contrastive_select_triton
    return op(strong_logits, weak_logits, seed, offset, float(params.beta), float(params.plausibility),
              float(params.temperature))
