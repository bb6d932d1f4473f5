"""The guarded decode step as fused Triton kernels over base and expert logits.

``fused_guarded_select`` has exactly the semantics of ``reference.guarded_select_reference`` (same
arguments, same outputs, same tie and set rules). This file holds only the two passes that read
the logits tensors (``LogitsPasses``); the per-row kernels, the plan, the scratch, the launch order
and the exact fallback are ``launcher.py``'s, shared with the hidden-state path. The pass structure
and scratch layout are described at the top of ``select_tiles.py`` and, with byte counts, in
``bench/ROOFLINE.md``.

Launches per step: pass 1, reduce, [intersection], pass 2, finalize -- 4 or 5, no host
synchronisation, except in the modes that use a bounded top-K buffer (top-k / top-p sampling,
intersection candidates): there one flag tensor is read on the host after the finalize kernel, and
rows whose kept set did not fit in the buffer (see ``buffer_sample``) are recomputed with the
PyTorch reference, so results stay exact.

On CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before Triton is imported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks import check_step_inputs
from ..params import StepParams
from .launcher import (
    INTERPRETED,
    LAUNCH_OPTIONS,
    MAX_BUFFER,
    Outputs,
    RowVectors,
    Scratch,
    SelectPlan,
    check_triton_device,
    launch_select,
    plan_select,
    select_exact,
)
from .select_tiles import pass1_store_tile, pass2_store_tile

__all__ = ["INTERPRETED", "MAX_BUFFER", "LogitsPasses", "fused_guarded_select", "fused_guarded_select_with_overflow",
           "plan_select"]


# ----------------------------------------------------------------------------------------------
# the logits passes (everything else: launcher.py)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(lb_ptr, le_ptr, stride_b, stride_e, n_rows, n_vocab, BB: tl.constexpr, BV: tl.constexpr,
               SCALAR: tl.constexpr = False):
    """This program's (row block, vocabulary chunk) of both logits as fp32, with its coordinates and masks.

    SCALAR: one element per load instruction, so that the tile's layout gives each thread the columns
    t, t + 128, ... instead of runs of 16 bytes; union pass 1 wants that layout for its scattered
    candidate stores and strided group maxima (``select_tiles.compaction_slots``), which would
    otherwise move the whole tile through shared memory. The loads stay coalesced (a warp reads 32
    consecutive elements)."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    chunk = tl.program_id(1)
    offs = tl.arange(0, BV)
    if SCALAR:
        offs = tl.max_contiguous(offs, 1)
    cols = chunk * BV + offs
    row_mask = rows < n_rows
    col_mask = offs < n_vocab - chunk * BV
    mask = row_mask[:, None] & col_mask[None, :]
    # the chunk's first column folded into the row pointers (fewer address instructions per element)
    r = rows.to(tl.int64)
    start = chunk.to(tl.int64) * BV
    row_b = lb_ptr + r * stride_b + start
    row_e = le_ptr + r * stride_e + start
    lb = tl.load(row_b[:, None] + offs[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    le = tl.load(row_e[:, None] + offs[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    return lb, le, rows, row_mask, cols, col_mask, chunk


@triton.constexpr_function
def _dense_kind(dtype):
    """select_tiles.dense_key's DENSE code of a logits dtype: 1 bf16, 2 fp16, 0 fp32."""
    return 1 if dtype == tl.bfloat16 else (2 if dtype == tl.float16 else 0)


@triton.jit
def _pass1_kernel(
    lb_ptr, le_ptr, stride_b, stride_e, n_rows, n_vocab, n_chunks, kth,
    stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr,
    BB: tl.constexpr, BV: tl.constexpr, K: tl.constexpr, KEYS: tl.constexpr, SLOTS: tl.constexpr = 0,
    FALLBACK: tl.constexpr = True,
):
    """FALLBACK=False (kernel report only) leaves out the exact rewrite of rows whose union bound
    let too many entries through (``select_tiles.pass1_store_tile``): their slots are then wrong."""
    lb, le, rows, row_mask, cols, col_mask, chunk = _load_tile(lb_ptr, le_ptr, stride_b, stride_e, n_rows, n_vocab,
                                                               BB, BV, KEYS == 1)
    n_present = tl.minimum(n_vocab - chunk * BV, BV)
    pass1_store_tile(
        lb, le, rows, row_mask, cols, col_mask, chunk, n_chunks, stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr,
        K, KEYS, kth, n_present, _dense_kind(lb_ptr.dtype.element_ty), SLOTS, FALLBACK,
    )


@triton.jit
def _pass2_kernel(
    lb_ptr, le_ptr, stride_b, stride_e, n_rows, n_vocab, n_chunks,
    rowinfo_ptr, alpha_ptr, seed_ptr, seed_stride, offset_ptr, offset_stride, temperature,
    div_ptr, best_ptr, besti_ptr, keys2_ptr, mass_ptr,
    BB: tl.constexpr, BV: tl.constexpr, K: tl.constexpr, DIVERGENCE: tl.constexpr, SAMPLE: tl.constexpr,
    NEED_V0: tl.constexpr, NEED_V1: tl.constexpr,
):
    lb, le, rows, row_mask, cols, col_mask, chunk = _load_tile(lb_ptr, le_ptr, stride_b, stride_e, n_rows, n_vocab,
                                                               BB, BV)
    pass2_store_tile(
        lb, le, rows, row_mask, cols, col_mask, chunk, n_chunks,
        rowinfo_ptr, alpha_ptr, seed_ptr, seed_stride, offset_ptr, offset_stride, temperature,
        div_ptr, best_ptr, besti_ptr, keys2_ptr, mass_ptr,
        DIVERGENCE, SAMPLE, K, NEED_V0, NEED_V1,
    )


@dataclass(frozen=True)
class LogitsPasses:
    """The launcher's source for materialised logits [B, V] (unit stride along the vocabulary)."""

    base_logits: torch.Tensor
    expert_logits: torch.Tensor
    # False (tests and the kernel report only): pass 1 skips the exact rewrite of rows whose union
    # bound let more than plan.slots entries through, whose slots are then wrong
    fallback: bool = True

    @classmethod
    def of(cls, base_logits: torch.Tensor, expert_logits: torch.Tensor) -> "LogitsPasses":
        # unit stride along the vocabulary is required by the tile loads; any row stride is fine
        lb = base_logits if base_logits.stride(-1) == 1 else base_logits.contiguous()
        le = expert_logits if expert_logits.stride(-1) == 1 else expert_logits.contiguous()
        return cls(lb, le)

    @property
    def dense_kind(self) -> int:
        """How pass 1 keys the union candidates (select_tiles.dense_key): 1 bf16, 2 fp16, 0 fp32."""
        return {torch.bfloat16: 1, torch.float16: 2}.get(self.base_logits.dtype, 0)

    def _grid(self, plan: SelectPlan) -> tuple[int, int]:
        return (triton.cdiv(plan.batch, plan.block_b), plan.n_chunks)

    def pass1(self, plan: SelectPlan, s: Scratch) -> None:
        lb, le = self.base_logits, self.expert_logits
        _pass1_kernel[self._grid(plan)](
            lb, le, lb.stride(0), le.stride(0), plan.batch, plan.vocab, plan.n_chunks, plan.kth, s.stats, s.counts,
            s.keys_b, s.keys_e, BB=plan.block_b, BV=plan.block_v, K=plan.buffer, KEYS=plan.key_kind,
            SLOTS=plan.slots, FALLBACK=self.fallback, **LAUNCH_OPTIONS,
        )

    def pass2(self, plan: SelectPlan, s: Scratch, rows: RowVectors, temperature: float) -> None:
        lb, le = self.base_logits, self.expert_logits
        _pass2_kernel[self._grid(plan)](
            lb, le, lb.stride(0), le.stride(0), plan.batch, plan.vocab, plan.n_chunks,
            s.rowinfo, rows.alpha, rows.seed, rows.seed_stride, rows.offset, rows.offset_stride, temperature,
            s.div, s.best, s.besti, s.keys2, s.mass,
            BB=plan.block_b, BV=plan.block_v, K=plan.buffer, DIVERGENCE=plan.divergence, SAMPLE=plan.sample,
            NEED_V0=plan.need_v0, NEED_V1=plan.need_v1, **LAUNCH_OPTIONS,
        )

    def row_logits(self, row_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base_logits[row_ids], self.expert_logits[row_ids]


def _empty_batch_outputs(batch: int, potential: torch.Tensor):
    """Outputs when no row can hold a finite logit (V = 0, or B = 0): every row is invalid."""
    device = potential.device
    return (
        torch.full((batch,), -1, dtype=torch.int64, device=device),
        potential.float().clone(),
        torch.zeros(batch, dtype=torch.bool, device=device),
        torch.full((batch,), float("nan"), dtype=torch.float32, device=device),
    )


def _prepare(base_logits, expert_logits, potential, alpha, seed, offset, params, **plan_overrides):
    check_step_inputs(base_logits, expert_logits, potential, alpha, seed, offset)
    if not params.score_floor > 0.0:
        raise ValueError(
            f"score_floor must be > 0 for the Triton backend, got {params.score_floor}; use backend='torch'"
        )
    check_triton_device(base_logits, expert_logits, potential, alpha, seed, offset)
    batch, vocab = base_logits.shape
    if batch == 0 or vocab == 0:
        return None, None
    plan = plan_select(batch, vocab, params, **plan_overrides)
    return plan, Scratch.allocate(plan, base_logits.device)


def fused_guarded_select(
    base_logits: Tensor, expert_logits: Tensor, potential: Tensor, alpha: Tensor, seed: Tensor, offset: Tensor,
    params: StepParams = StepParams(), *, buffer_size: int | None = None, block_v: int | None = None,
    block_b: int | None = None,
) -> Outputs:
    """The step op on the Triton kernels; returns (tokens, new potential, spike, divergence).

    Same arguments and results as ``reference.guarded_select_reference``.

    Input rules: logits [B, V] fp32/fp16/bf16 (both the same dtype; math in fp32); the last
    dimension must have unit stride for the tile loads (any row stride is used as is; other layouts
    are copied to contiguous first); potential and alpha fp32 [B]; seed and offset int64 with 1 or
    B values; all on one CUDA device (CPU only under TRITON_INTERPRET=1). ``params.score_floor``
    must be > 0; candidate_k, min_candidates and top_k (each clipped to V) at most MAX_BUFFER.
    Invalid rows follow the reference: token -1, NaN divergence, potential unchanged, no spike.

    Rows whose top-k / top-p kept set or intersection did not fit in the top-K buffer are
    recomputed with the PyTorch reference (one host read of a flag tensor, buffer modes only);
    ``fused_guarded_select_with_overflow`` skips that and returns the flags instead.
    ``buffer_size``, ``block_v``, ``block_b`` override the launch constants.

    Example (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)::

        zero = torch.zeros(1, dtype=torch.long, device="cuda")
        tokens, v, spike, d = fused_guarded_select(
            base, expert, potential, alpha, seed, zero, StepParams(temperature=0.7, top_p=0.9))
    """
    plan, scratch = _prepare(base_logits, expert_logits, potential, alpha, seed, offset, params,
                             buffer_size=buffer_size, block_v=block_v, block_b=block_b)
    if plan is None:
        return _empty_batch_outputs(base_logits.shape[0], potential)
    source = LogitsPasses.of(base_logits, expert_logits)
    return select_exact(source, plan, scratch, potential, alpha, seed, offset, params)


def fused_guarded_select_with_overflow(
    base_logits: Tensor, expert_logits: Tensor, potential: Tensor, alpha: Tensor, seed: Tensor, offset: Tensor,
    params: StepParams = StepParams(), *, buffer_size: int | None = None, block_v: int | None = None,
    block_b: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The kernels alone, no host synchronisation: (tokens, potential, spike, divergence, overflow).

    ``overflow`` (bool [B], or None in modes where it cannot happen) marks rows whose buffer could
    not decide; their token is the buffer's answer and may differ from the reference.
    """
    plan, scratch = _prepare(base_logits, expert_logits, potential, alpha, seed, offset, params,
                             buffer_size=buffer_size, block_v=block_v, block_b=block_b)
    if plan is None:
        return (*_empty_batch_outputs(base_logits.shape[0], potential), None)
    source = LogitsPasses.of(base_logits, expert_logits)
    return launch_select(source, plan, scratch, RowVectors.of(potential, alpha, seed, offset), params)
