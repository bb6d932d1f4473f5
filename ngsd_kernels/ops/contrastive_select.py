"""Contrastive decoding's token choice in one Triton kernel: two passes over each row's logits.

Pass 1 reads both rows once: the strong model's largest logit (the plausibility floor hangs off it)
and whether the row is valid. Pass 2 scores the plausible tokens, ``l_s - beta l_w`` (divided by T and
Gumbel-perturbed when sampling, from the same Philox stream as the guarded step), and keeps the
best one, lowest id on ties. One program per row; nothing but the token is written. The
definition is ``contrastive.contrastive_select_reference``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launcher import INTERPRETED, LAUNCH_OPTIONS, check_triton_device
from .select_tiles import philox_gumbel_span

FP32_MAX = tl.constexpr(3.4028234663852886e38)

# Elements per program and pass. Untuned for GPUs; the interpreter pays per operation, not per element.
BLOCK = 16384 if INTERPRETED else 2048
MAX_VOCAB = 2**31 - 1 - 16384  # token ids (start + column, int32) stay below 2**31 for every block size


@triton.jit
def _contrastive_select_kernel(strong_ptr, weak_ptr, tokens_ptr, seed_ptr, offset_ptr, vocab, strong_stride,
                               weak_stride, beta, log_plausibility, temperature, SEED_PER_ROW: tl.constexpr,
                               OFFSET_PER_ROW: tl.constexpr, SAMPLE: tl.constexpr, BETA_ZERO: tl.constexpr,
                               BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    rows = row + tl.zeros([1], tl.int64)
    cols = tl.arange(0, BLOCK)[None, :]
    strong_row = strong_ptr + row * strong_stride
    weak_row = weak_ptr + row * weak_stride

    top = tl.full([1], float("-inf"), tl.float32)
    broken = tl.zeros([1], tl.int32)  # NaN or +inf in either row
    weak_finite = tl.zeros([1], tl.int32)
    for start in range(0, vocab, BLOCK):
        ids = start + cols
        inside = ids < vocab
        ls = tl.load(strong_row + ids, mask=inside, other=float("-inf")).to(tl.float32)
        lw = tl.load(weak_row + ids, mask=inside, other=float("-inf")).to(tl.float32)
        bad = (ls != ls) | (ls == float("inf")) | (lw != lw) | (lw == float("inf"))
        broken += tl.sum(bad.to(tl.int32), axis=1)
        weak_finite += tl.sum((lw > float("-inf")).to(tl.int32), axis=1)
        top = tl.maximum(top, tl.max(tl.where(bad, float("-inf"), ls), axis=1))
    valid = (broken == 0) & (weak_finite > 0) & (top > float("-inf"))
    floor = top + log_plausibility

    if SEED_PER_ROW:
        seed = tl.load(seed_ptr + rows)
    else:
        seed = tl.load(seed_ptr + tl.zeros([1], tl.int64))
    if OFFSET_PER_ROW:
        offset = tl.load(offset_ptr + rows)
    else:
        offset = tl.load(offset_ptr + tl.zeros([1], tl.int64))

    best = tl.full([1], float("-inf"), tl.float32)
    best_id = tl.full([1], 2147483647, tl.int32)
    for start in range(0, vocab, BLOCK):
        ids = start + cols
        inside = ids < vocab
        ls = tl.load(strong_row + ids, mask=inside, other=float("-inf")).to(tl.float32)
        if BETA_ZERO:
            score = ls
        else:
            lw = tl.load(weak_row + ids, mask=inside, other=0.0).to(tl.float32)
            score = ls - beta * lw
        score = tl.maximum(score, -FP32_MAX)  # a plausible token never ties with the implausible ones
        if SAMPLE:
            score = tl.maximum(score / temperature + philox_gumbel_span(start, seed, offset, rows, BLOCK), -FP32_MAX)
        plausible = inside & (ls >= floor[:, None])
        score = tl.where(plausible, score, float("-inf"))
        chunk_best = tl.max(score, axis=1)
        chunk_id = tl.min(tl.where(plausible & (score == chunk_best[:, None]), ids, 2147483647), axis=1)
        take = chunk_best > best  # strictly: an earlier chunk keeps a tie (lowest id)
        best_id = tl.where(take, chunk_id, best_id)
        best = tl.where(take, chunk_best, best)
    tl.store(tokens_ptr + rows, tl.where(valid, best_id, -1).to(tl.int64))


def triton_contrastive_select(strong_logits: torch.Tensor, weak_logits: torch.Tensor, seed: torch.Tensor,
                              offset: torch.Tensor, beta: float, plausibility: float,
                              temperature: float) -> torch.Tensor:
    """Tokens int64 [B] (-1: invalid row) of ``contrastive_select_reference``, from the kernel above."""
    check_triton_device(strong_logits, weak_logits, seed, offset)
    batch, vocab = strong_logits.shape
    if vocab > MAX_VOCAB:
        raise ValueError(f"the contrastive kernel indexes tokens in int32: at most {MAX_VOCAB} tokens, got {vocab}; "
                         "use backend='torch'")
    # rows may be strided (logits[:, -1, :]): only a strided vocabulary axis is copied
    strong = strong_logits if strong_logits.stride(-1) == 1 else strong_logits.contiguous()
    weak = weak_logits if weak_logits.stride(-1) == 1 else weak_logits.contiguous()
    tokens = torch.empty(batch, dtype=torch.int64, device=strong.device)
    if batch == 0:
        return tokens
    _contrastive_select_kernel[(batch,)](
        strong, weak, tokens, seed.contiguous(), offset.contiguous(), vocab, strong.stride(0), weak.stride(0),
        float(beta), math.log(plausibility), float(temperature) if temperature > 0 else 1.0,
        SEED_PER_ROW=seed.numel() > 1, OFFSET_PER_ROW=offset.numel() > 1, SAMPLE=temperature > 0,
        BETA_ZERO=beta == 0, BLOCK=min(BLOCK, triton.next_power_of_2(max(vocab, 4))), **LAUNCH_OPTIONS,
    )
    return tokens
