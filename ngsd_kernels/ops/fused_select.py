"""The guarded decode step as fused Triton kernels over base and expert logits.

``fused_guarded_select`` has exactly the semantics of ``reference.guarded_select_reference`` (same
arguments, same outputs, same tie and set rules). This file holds only the two passes that read
the logits tensors (``LogitsPasses``); the per-row kernels, the plan, the scratch, the launch order
and the exact fallback are ``launcher.py``'s, shared with the hidden-state path. The pass structure
and scratch layout are described at the top of ``select_tiles.py`` and, with byte counts, in
``bench/ROOFLINE.md``.

Launches per step: pass 1 (with the reduce folded in: ``_pass1_reduce_kernel``), pass 2, finalize;
in intersection mode pass 1, reduce, intersection, pass 2, finalize -- 3 or 5, plus, in top-k /
top-p sampling, ``_sample_fallback_kernel``, which decides on the GPU the rows whose thresholds fell
below their candidates' certainty floor (see ``select_tiles.slots_sample``; its programs return at
once for the other rows), and,
in intersection mode, ``intersection_fallback._intersection_fallback_kernel``, which decides on the GPU
the spiked rows whose grown intersection did not fit in the buffers. No host synchronisation.

On CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before Triton is imported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..checks import check_row_sampling, check_step_inputs
from ..params import StepParams
from ..reference import empty_outputs
from .launcher import (
    INTERPRETED,
    last_of_row_block,
    reduce_block,
    LAUNCH_OPTIONS,
    MAX_BUFFER,
    TILE_ELEMENTS,
    next_pow2,
    Outputs,
    RowVectors,
    Scratch,
    SelectPlan,
    check_triton_device,
    launch_select,
    plan_select,
    select_exact,
)
from .select_tiles import (
    INDEX_NONE,
    fold_gumbel_max,
    kept_log_max,
    pass1_store_tile,
    pass2_store_tile,
    positive_temperature,
    rows_temperature,
    rows_value,
    tile_log_probs,
    tile_union_scores,
    top_p_weights,
    value_key,
    value_of,
)

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
    FALLBACK: tl.constexpr = True, THREADS: tl.constexpr = 128,
):
    """FALLBACK=False (kernel report only) leaves out the exact rewrite of rows whose group-maxima
    bound let too many entries through (``select_tiles.pass1_store_tile``): their slots are then wrong.
    THREADS: 32 x the launch's num_warps (a layout hint; the result does not depend on it)."""
    lb, le, rows, row_mask, cols, col_mask, chunk = _load_tile(lb_ptr, le_ptr, stride_b, stride_e, n_rows, n_vocab,
                                                               BB, BV, KEYS != 0)
    n_present = tl.minimum(n_vocab - chunk * BV, BV)
    pass1_store_tile(
        lb, le, rows, row_mask, cols, col_mask, chunk, n_chunks, stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr,
        K, KEYS, kth, n_present, _dense_kind(lb_ptr.dtype.element_ty), SLOTS, FALLBACK, THREADS,
    )


@triton.jit
def _pass1_reduce_kernel(
    lb_ptr, le_ptr, stride_b, stride_e, n_rows, n_vocab, n_chunks, kth,
    stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr, rowinfo_ptr, tickets_ptr,
    BB: tl.constexpr, BV: tl.constexpr, K: tl.constexpr, KEYS: tl.constexpr, NCP: tl.constexpr, CG: tl.constexpr,
    SLOTS: tl.constexpr = 0, FALLBACK: tl.constexpr = True, THREADS: tl.constexpr = 128, REDUCE: tl.constexpr = True,
):
    """``_pass1_kernel``, then the launcher's reduce of this row block by the last of its programs to finish.

    Each program counts itself in ``tickets_ptr[row block]`` once its partials are stored; the one that
    draws the last ticket has every chunk's partials and reduces the block's BB rows (``reduce_block``,
    union or no candidate keys: intersection mode keeps ``_reduce_kernel``), then sets the ticket back
    to 0 for the next step. One launch fewer a step; the reduce itself runs as it would on its own.
    REDUCE=False (kernel report only): the tile's instructions without the block's reduce.
    """
    _pass1_kernel(lb_ptr, le_ptr, stride_b, stride_e, n_rows, n_vocab, n_chunks, kth, stats_ptr, counts_ptr,
                  keys_b_ptr, keys_e_ptr, BB, BV, K, KEYS, SLOTS, FALLBACK, THREADS)
    if REDUCE:
        block = tl.program_id(0)
        if last_of_row_block(tickets_ptr, block, n_chunks):
            reduce_block(block * BB, n_rows, stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr, rowinfo_ptr, n_chunks,
                         kth, BB, NCP, K, CG, KEYS, _dense_kind(lb_ptr.dtype.element_ty), SLOTS)
            tl.store(tickets_ptr + block, 0)


@triton.jit
def _pass2_kernel(
    lb_ptr, le_ptr, stride_b, stride_e, n_rows, n_vocab, n_chunks,
    rowinfo_ptr, alpha_ptr, seed_ptr, seed_stride, offset_ptr, offset_stride, temperature, row_temperature_ptr,
    div_ptr, best_ptr, besti_ptr, keys2_ptr, mass_ptr,
    BB: tl.constexpr, BV: tl.constexpr, K: tl.constexpr, DIVERGENCE: tl.constexpr, SAMPLE: tl.constexpr,
    NEED_V0: tl.constexpr, NEED_V1: tl.constexpr, THREADS: tl.constexpr = 128, ROW_T: tl.constexpr = 0,
    TEMPERED: tl.constexpr = False,
):
    # top-k / top-p: one element per thread, for the candidates' compaction (as union pass 1)
    lb, le, rows, row_mask, cols, col_mask, chunk = _load_tile(lb_ptr, le_ptr, stride_b, stride_e, n_rows, n_vocab,
                                                               BB, BV, SAMPLE == 2)
    pass2_store_tile(
        lb, le, rows, row_mask, cols, col_mask, chunk, n_chunks,
        rowinfo_ptr, alpha_ptr, seed_ptr, seed_stride, offset_ptr, offset_stride, temperature,
        div_ptr, best_ptr, besti_ptr, keys2_ptr, mass_ptr,
        DIVERGENCE, SAMPLE, K, NEED_V0, NEED_V1, THREADS, row_temperature_ptr, ROW_T, TEMPERED,
    )


@triton.jit
def _row_q_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e, ls_e, alpha, thr_b, thr_e,
                mixed, BT: tl.constexpr):
    """q = max(s, 0) of the columns start .. start + BT - 1 of one row, the scores s exactly as pass 2
    computes them (``tile_log_probs`` / ``tile_union_scores``; the union mixture where ``mixed``);
    columns past the vocabulary get q = 0 (never kept). Returns [1, BT] q and [BT] column ids."""
    cols = start + tl.arange(0, BT)
    cm = (cols < n_vocab)[None, :]
    lb = tl.load(lb_ptr + row * stride_b + cols[None, :], mask=cm, other=float("-inf")).to(tl.float32)
    le = tl.load(le_ptr + row * stride_e + cols[None, :], mask=cm, other=float("-inf")).to(tl.float32)
    _, pb = tile_log_probs(lb, m_b, ls_b)
    _, pe = tile_log_probs(le, m_e, ls_e)
    s = tl.where(mixed[:, None], tile_union_scores(lb, le, pb, pe, alpha, thr_b, thr_e), pb)
    return tl.where(cm, tl.maximum(s, 0.0), 0.0), cols


@triton.jit
def _sample_fallback_kernel(
    lb_ptr, le_ptr, stride_b, stride_e, n_rows, n_vocab, rowinfo_ptr, alpha_ptr, spike_ptr, over_ptr, tokens_ptr,
    seed_ptr, seed_stride, offset_ptr, offset_stride, temperature, row_temperature_ptr, top_k, top_p,
    row_top_k_ptr, row_top_p_ptr,
    BT: tl.constexpr, MODE: tl.constexpr, USE_TOPK: tl.constexpr, USE_TOPP: tl.constexpr, ROW_T: tl.constexpr = 0,
    ROW_K: tl.constexpr = 0, ROW_P: tl.constexpr = 0, TEMPERED: tl.constexpr = False,
):
    """The exact token of one row whose top-K sampling buffer could not decide (the finalize's
    overflow flag), on the GPU: no host read. Programs of rows without the flag return at once.

    The row's q = max(s, 0) is recomputed tile by tile from the logits (union mixture if the row
    spiked in union mode; intersection rows that spiked are left flagged for the caller). Then the
    rules of reference.sampling_mask by bisection over value keys, one pass over the row per round
    (a rare path: ~64 passes): the top-k threshold (the k-th largest q, 31 rounds), the top-p one
    (the smallest probability whose mass strictly above it is < top_p, 31 rounds over
    probabilities q / sum of the kept q; TEMPERED: of q^(1/T), ``select_tiles.tempered_weights``, after one
    more pass for the row's largest log(q) / T), and the Gumbel-max draw with the reference's Philox noise.
    One program per row (``n_rows``: the grid of csrc_triton's AOT launcher, whose grid is computed from
    the kernel's arguments).
    """
    row = tl.program_id(0).to(tl.int64)
    one = tl.zeros([1], tl.int32)
    present = (row + one) < n_rows
    flagged = (tl.load(over_ptr + row + one, mask=present, other=0) != 0) & present
    spiked = tl.load(spike_ptr + row + one, mask=present, other=0) != 0
    if MODE == 1:
        flagged = flagged & ~spiked  # the grown intersection decides those rows: the caller's fallback
    if tl.sum(flagged.to(tl.int32), axis=0) > 0:
        info = rowinfo_ptr + row * 8 + one
        m_b = tl.load(info)
        ls_b = tl.load(info + 1)
        m_e = tl.load(info + 2)
        ls_e = tl.load(info + 3)
        thr_b = tl.load(info + 4)
        thr_e = tl.load(info + 5)
        alpha = tl.load(alpha_ptr + row + one)
        mixed = spiked & (MODE == 0)
        # the row's own top-k / top-p where given (new names: a runtime branch keeps the arguments' types)
        row_k = rows_value(top_k, row_top_k_ptr, row + one, flagged, ROW_K)
        row_p = rows_value(top_p, row_top_p_ptr, row + one, flagged, ROW_P)
        # top-k: the k-th largest q (value keys of q >= 0 are its bit patterns), else 0
        kth_q = tl.zeros([1], tl.float32)
        if USE_TOPK:
            k = tl.minimum(row_k, n_vocab)
            t = tl.zeros([1], tl.int32)
            for bit in range(31):
                cand = t | (1 << (30 - bit))
                cnt = tl.zeros([1], tl.int32)
                for start in range(0, n_vocab, BT):
                    q, _ = _row_q_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e, ls_e, alpha,
                                    thr_b, thr_e, mixed, BT)
                    cnt += tl.sum((value_key(q) >= cand[:, None]).to(tl.int32), axis=1)
                t = tl.where(cnt >= k, cand, t)
            kth_q = value_of(t)
        # top-p: probabilities of the kept q; kept iff their mass strictly above is < top_p (or the max)
        floor_p = tl.zeros([1], tl.float32)
        norm = tl.full([1], 1.0, tl.float32)
        # a new name: a runtime branch cannot turn the scalar argument into a tensor
        row_t = rows_temperature(temperature, row_temperature_ptr, row + one, flagged, ROW_T)
        temper = positive_temperature(row_t, ROW_T)
        top = tl.zeros([1], tl.float32)
        if USE_TOPP:
            if TEMPERED:  # the row's largest log(q) / T: the tempered weights' scale
                top = tl.full([1], float("-inf"), tl.float32)
                for start in range(0, n_vocab, BT):
                    q, _ = _row_q_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e, ls_e,
                                       alpha, thr_b, thr_e, mixed, BT)
                    top = tl.maximum(top, kept_log_max(q, kth_q, temper))
                top = tl.where(top > float("-inf"), top, 0.0)
            total = tl.zeros([1], tl.float32)
            for start in range(0, n_vocab, BT):
                q, _ = _row_q_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e, ls_e, alpha,
                                    thr_b, thr_e, mixed, BT)
                total += tl.sum(top_p_weights(q, kth_q, temper, top, TEMPERED), axis=1)
            norm = tl.maximum(total, 1e-30)
            t = tl.zeros([1], tl.int32)
            p_max = tl.zeros([1], tl.float32)
            for bit in range(31):  # the largest key whose mass strictly above is still >= top_p
                cand = t | (1 << (30 - bit))
                mass = tl.zeros([1], tl.float32)
                for start in range(0, n_vocab, BT):
                    q, _ = _row_q_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e, ls_e, alpha,
                                    thr_b, thr_e, mixed, BT)
                    prob = top_p_weights(q, kth_q, temper, top, TEMPERED) / norm[:, None]
                    mass += tl.sum(tl.where(prob > value_of(cand)[:, None], prob, 0.0), axis=1)
                    p_max = tl.maximum(p_max, tl.max(prob, axis=1))
                t = tl.where(mass >= row_p, cand, t)
            mass0 = tl.zeros([1], tl.float32)  # the mass strictly above 0 (t = 0 is never tested above)
            for start in range(0, n_vocab, BT):
                q, _ = _row_q_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e, ls_e, alpha,
                                    thr_b, thr_e, mixed, BT)
                prob = top_p_weights(q, kth_q, temper, top, TEMPERED) / norm[:, None]
                mass0 += tl.sum(tl.where(prob > 0.0, prob, 0.0), axis=1)
            # first key past the largest one with mass >= top_p: its value is the smallest kept probability
            floor_p = tl.where(mass0 >= row_p, tl.minimum(value_of(t + 1), p_max), 0.0)
        # Gumbel-max over the kept tokens, the reference's noise (lowest id among equal maxima)
        seed = tl.load(seed_ptr + row * seed_stride + one)
        offset = tl.load(offset_ptr + row * offset_stride + one)
        best = tl.full([1], float("-inf"), tl.float32)
        best_id = tl.full([1], INDEX_NONE, tl.int32)
        for start in range(0, n_vocab, BT):
            q, cols = _row_q_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e, ls_e, alpha,
                                    thr_b, thr_e, mixed, BT)
            keep = (q > 0.0) & (q >= kth_q[:, None])
            if USE_TOPP:
                keep = keep & (top_p_weights(q, kth_q, temper, top, TEMPERED) / norm[:, None] >= floor_p[:, None])
            best, best_id = fold_gumbel_max(q, keep, cols[None, :], seed, offset, row + one, row_t, best, best_id,
                                            ROW_T)
        token = tl.where(best == float("-inf"), 0, best_id)  # nothing kept: torch.argmax of all -inf is 0
        tl.store(tokens_ptr + row + one, token.to(tl.int64), mask=flagged)
        tl.store(over_ptr + row + one, tl.zeros_like(flagged), mask=flagged)


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

    def pass1(self, plan: SelectPlan, s: Scratch) -> bool:
        """Pass 1, with the reduce folded in where the plan says so; returns whether it was."""
        lb, le = self.base_logits, self.expert_logits
        grid = (triton.cdiv(plan.batch, plan.block_b), plan.pass1_chunks)
        args = (lb, le, lb.stride(0), le.stride(0), plan.batch, plan.vocab, plan.pass1_chunks, plan.kth, s.stats,
                s.counts, s.keys_b, s.keys_e)
        constants = dict(BB=plan.block_b, BV=plan.pass1_bv, K=plan.buffer, KEYS=plan.key_kind, SLOTS=plan.slots,
                         FALLBACK=self.fallback, THREADS=32 * plan.pass1_warps, num_warps=plan.pass1_warps,
                         **LAUNCH_OPTIONS)
        if not plan.fold_reduce:
            _pass1_kernel[grid](*args, **constants)
            return False
        registers = {"maxnreg": plan.pass1_maxnreg} if plan.pass1_maxnreg else {}
        _pass1_reduce_kernel[grid](*args, s.rowinfo, s.tickets, NCP=plan.pass1_ncp, CG=plan.chunk_group, **registers,
                                   **constants)
        return True

    def pass2(self, plan: SelectPlan, s: Scratch, rows: RowVectors, temperature: float, tempered: bool = False) -> None:
        lb, le = self.base_logits, self.expert_logits
        _pass2_kernel[self._grid(plan)](
            lb, le, lb.stride(0), le.stride(0), plan.batch, plan.vocab, plan.n_chunks,
            s.rowinfo, rows.alpha, rows.seed, rows.seed_stride, rows.offset, rows.offset_stride,
            temperature=temperature, div_ptr=s.div, best_ptr=s.best, besti_ptr=s.besti, keys2_ptr=s.keys2,
            mass_ptr=s.mass, **rows.temperature_arg,
            BB=plan.block_b, BV=plan.block_v, K=plan.buffer, DIVERGENCE=plan.divergence, SAMPLE=plan.sample,
            NEED_V0=plan.need_v0, NEED_V1=plan.need_v1, THREADS=32 * plan.pass2_warps, num_warps=plan.pass2_warps,
            TEMPERED=tempered, **LAUNCH_OPTIONS,
        )

    def sample_fallback(self, plan: SelectPlan, s: Scratch, rows: RowVectors, params: StepParams,
                        temperature: float, tokens: torch.Tensor, spike: torch.Tensor, over: torch.Tensor,
                        tempered: bool = False) -> None:
        """Decide the rows whose top-K sampling buffer overflowed on the GPU (``_sample_fallback_kernel``):
        one program per row, which returns at once unless the row is flagged; clears their flags."""
        lb, le = self.base_logits, self.expert_logits
        bt = min(next_pow2(plan.vocab), TILE_ELEMENTS if INTERPRETED else 2048)
        _sample_fallback_kernel[(plan.batch,)](
            lb, le, lb.stride(0), le.stride(0), plan.batch, plan.vocab, s.rowinfo, rows.alpha, spike, over, tokens,
            rows.seed, rows.seed_stride, rows.offset, rows.offset_stride, temperature=temperature, top_k=params.top_k,
            top_p=params.top_p, **rows.temperature_arg, **rows.top_k_p_arg,
            BT=bt, MODE=plan.mode, USE_TOPK=plan.use_topk, USE_TOPP=plan.use_topp, TEMPERED=tempered,
            **LAUNCH_OPTIONS,
        )

    def intersection_fallback(self, plan: SelectPlan, s: Scratch, rows: RowVectors, params: StepParams,
                              temperature: float, tokens: torch.Tensor, spike: torch.Tensor, over: torch.Tensor,
                              tempered: bool = False) -> None:
        """Decide the spiked rows whose grown intersection overflowed the top-K buffers on the GPU
        (``intersection_fallback.decide_intersection_overflow``): no host read; clears their flags."""
        from .intersection_fallback import decide_intersection_overflow

        decide_intersection_overflow(self.base_logits, self.expert_logits, plan, s, rows, params, temperature,
                                     tokens, spike, over, tempered=tempered)

    def row_logits(self, row_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base_logits[row_ids], self.expert_logits[row_ids]


def _prepare(base_logits, expert_logits, potential, alpha, seed, offset, params, **plan_overrides):
    check_step_inputs(base_logits, expert_logits, potential, alpha, seed, offset)
    check_triton_device(base_logits, expert_logits, potential, alpha, seed, offset)
    batch, vocab = base_logits.shape
    if batch == 0 or vocab == 0:
        return None, None
    plan = plan_select(batch, vocab, params, **plan_overrides)
    return plan, Scratch.allocate(plan, base_logits.device)


def fused_guarded_select(
    base_logits: Tensor, expert_logits: Tensor, potential: Tensor, alpha: Tensor, seed: Tensor, offset: Tensor,
    params: StepParams = StepParams(), *, buffer_size: int | None = None, block_v: int | None = None,
    block_b: int | None = None, pass1_block_v: int | None = None, row_temperature: Tensor | None = None,
    row_top_k: Tensor | None = None, row_top_p: Tensor | None = None,
) -> Outputs:
    """The step op on the Triton kernels; returns (tokens, new potential, spike, divergence).

    Same arguments and results as ``reference.guarded_select_reference``.

    Input rules: logits [B, V] fp32/fp16/bf16 (both the same dtype; math in fp32); the last
    dimension must have unit stride for the tile loads (any row stride is used as is; other layouts
    are copied to contiguous first); potential and alpha fp32 [B]; seed and offset int64 with 1 or
    B values; all on one CUDA device (CPU only under TRITON_INTERPRET=1). ``params.score_floor``
    must be > 0; candidate_k, min_candidates and top_k (each clipped to V) at most MAX_BUFFER.
    Invalid rows follow the reference: token -1, NaN divergence, potential unchanged, no spike.

    Rows whose top-k / top-p thresholds fell below their candidates' floor are decided exactly on the GPU
    (``_sample_fallback_kernel``), and so are rows whose grown intersection did not fit
    (``intersection_fallback.py``): no host read.
    ``fused_guarded_select_with_overflow`` skips both and returns the flags instead.
    ``buffer_size``, ``block_v``, ``block_b``, ``pass1_block_v`` override the launch constants.
    ``row_temperature`` (fp32 [B]): each row's own temperature, in a sampled step (``params.temperature``
    > 0; a row at 0 decodes greedily): rows with different temperatures share one launch. ``row_top_k``
    (int [B], each in [1, params.top_k]) / ``row_top_p`` (fp32 [B], in (0, 1), with params.top_p < 1):
    the same for top-k / top-p.

    Example (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)::

        zero = torch.zeros(1, dtype=torch.long, device="cuda")
        tokens, v, spike, d = fused_guarded_select(
            base, expert, potential, alpha, seed, zero, StepParams(temperature=0.7, top_p=0.9))
    """
    plan, scratch = _prepare(base_logits, expert_logits, potential, alpha, seed, offset, params,
                             buffer_size=buffer_size, block_v=block_v, block_b=block_b, pass1_block_v=pass1_block_v)
    check_row_sampling(row_temperature, row_top_k, row_top_p, *base_logits.shape, potential.device,
                       params.temperature, params.top_k, params.top_p)
    if plan is None:
        return empty_outputs(base_logits.shape[0], potential)
    source = LogitsPasses.of(base_logits, expert_logits)
    return select_exact(source, plan, scratch, potential, alpha, seed, offset, params, row_temperature=row_temperature,
                        row_top_k=row_top_k, row_top_p=row_top_p)


def fused_guarded_select_with_overflow(
    base_logits: Tensor, expert_logits: Tensor, potential: Tensor, alpha: Tensor, seed: Tensor, offset: Tensor,
    params: StepParams = StepParams(), *, buffer_size: int | None = None, block_v: int | None = None,
    block_b: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The step kernels without any fallback: (tokens, potential, spike, divergence, overflow).

    ``overflow`` (bool [B], or None in modes where it cannot happen) marks rows whose buffer could
    not decide; their token is the buffer's answer and may differ from the reference
    (``fused_guarded_select`` decides them on the GPU).
    """
    plan, scratch = _prepare(base_logits, expert_logits, potential, alpha, seed, offset, params,
                             buffer_size=buffer_size, block_v=block_v, block_b=block_b)
    if plan is None:
        return (*empty_outputs(base_logits.shape[0], potential), None)
    source = LogitsPasses.of(base_logits, expert_logits)
    return launch_select(source, plan, scratch, RowVectors.of(potential, alpha, seed, offset), params, fallback=False)
