"""The guarded decode step straight from the final hidden states (the logits are never stored).

``fused_select_from_hidden`` is the Triton side of ``ngsd_kernels.guarded_select_from_hidden``
(the LM head folded into the step): it takes the final hidden states of the base and expert rows
and the LM-head weight(s), computes the logits tile by tile inside Triton kernels (``tl.dot``,
fp32 accumulation) and runs the same selection as
``guarded_select_reference(h_b @ W_b.T + b_b, h_e @ W_e.T + b_e, ...)``; the two ``[B, V]``
logits tensors are never written to memory.

Launches (4, or 5 in intersection mode; 3 for B <= 2 outside it, the reduce inside pass 1:
``_hs_pass1_reduce_kernel``), none of which waits on the host:

1. ``_hs_pass1_kernel`` (grid: row blocks x vocabulary splits) computes each logits tile and
   folds it into the split's statistics (max, sum-exp, NaN/+inf and finite counts) and, when the
   gate can open, the split's top-K logit order keys;
2. the launcher's reduce kernel (grid: rows) merges the splits: log-sum-exp, validity, union
   thresholds; [its intersection kernel: SafeDecoding's grown intersection];
3. ``_hs_pass2_kernel`` (grid as in 1) computes the *same* logits tiles again: divergence partial
   sums and, for both gate outcomes, the split's arg-max (greedy / Gumbel-max sampling) or top-K
   keys of the scores (top-k / top-p sampling);
4. its finalize kernel (grid: rows): divergence, LIF update, spike, token.

Only the logits producer (``_logit_tiles``) and the loops over a split's tiles are specific to
this file (``HiddenPasses``): every tile is handed to the helpers of ``select_tiles.py``, and the
partials are laid out exactly like the logits path's per-chunk scratch with one "chunk" per
vocabulary split, so ``launcher.py`` runs both paths and they have one definition of every rule
(ties, sets, sampling, invalid rows, overflow fallback).

FLOP / byte trade-off of computing the logits twice (w = bytes per weight element):

- shared head (LoRA / NeST experts): each pass reads W once for both models, 2 V H w in all;
  the logits path reads W twice too (one LM-head matmul per model) and on top writes and reads
  back both fp32 logits tensors (~24 B V bytes: 2 writes, 2 passes x 2 reads, x 4 bytes). Fewer
  bytes at every batch size; the price is twice the FLOPs (4 x 2B V H instead of 2 x 2B V H),
  which starts to matter once the LM-head product is compute-bound (2B rows x V x H at about
  2B FLOP per weight byte: B above ~150 on an H100 in bf16);
- both counts assume one row block (on GPU a block holds up to 64 rows, 128 stacked, so B <= 64):
  every further row block re-reads the weight, mostly from L2 because the row blocks of a split
  are launched next to each other;
- separate heads (a small expert model): 4 V H w here against 2 V H w + 24 B V, so this path
  moves fewer bytes only when B > H w / 12 (B > ~680 at H = 4096 in bf16). For such experts the
  logits path is the faster choice at decode batch sizes; this one still avoids the [B, V] buffers
  (1 GiB of fp32 logits per model at B = 512, V = 262144).

Where the fused kernels are used (``HiddenLaunch``): on a GPU only for top-K buffers of at most
``HIDDEN_MAX_BUFFER`` = 64 entries, with 8 or 16 rows per block and 64 columns per tile, the tiles
that compile without spilling on sm_90 (bench/results/KERNELS.md: a split's running top-K lives
in registers next to the logits tile; at K = 256 or 1024 every such tile spills, and BLOCK_V grew
with K past the shared-memory limit). Other settings materialise the fp32 logits with one GEMM on
the stacked rows (``pair_logits``: a shared head is read once) and run the logits kernels, the
cheaper choice on bytes anyway while B < H / 12 (bench/ROOFLINE.md, "hidden-state path").

Top-k / top-p sampling always takes the materialised path (on CPU too): its candidates are taken
per chunk above a bound found from the whole chunk (``select_tiles.store_sample_candidates``), and
that chunk's decisions then run on the GPU without a host read (``fused_select``'s fallback).

Exactness: both passes call ``_logit_tiles`` with the same constants, so they compute
bit-identical logits and pass-1 thresholds classify pass-2 tokens consistently. Intersection
candidates keep a bounded top-K buffer and flag rows it cannot decide; those rows are recomputed
with the PyTorch reference on their materialised logits (one host read of the flags;
``exact_fallback=False`` skips it). Settings the kernels
reject (a k above their buffer cap, ``score_floor <= 0``) make ``backend="auto"`` use the
PyTorch path and ``backend="triton"`` raise (``launcher.unsupported_reason``).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..params import CandidateMode, StepParams
from ..reference import empty_outputs
from .hidden_torch import hidden_logits, pair_logits
from .launcher import (
    LAUNCH_OPTIONS, Outputs, RowVectors, Scratch, SelectPlan, last_of_row_block, next_pow2, plan_select, reduce_block,
    select_exact,
)
from .select_tiles import (
    INDEX_NONE,
    KEY_NONE,
    VALUE_NONE,
    merge_topk_keys,
    philox_gumbel_span,
    rows_temperature,
    store_pass1_partials,
    tile_argmax,
    tile_choice_values,
    tile_divergence_terms,
    tile_log_probs,
    tile_stats,
    tile_topk_keys,
    tile_union_scores,
)


# ---------------------------------------------------------------------------------------------
# Launch plan (csrc_triton/ngsd_ext.cpp repeats it with the constants it was compiled with)
# ---------------------------------------------------------------------------------------------


# Largest top-K buffer the fused hidden-state kernels are planned with on a GPU: their per-split
# running top-K lives in registers next to the logits tile, and beyond 64 entries every tile that
# holds it spills (bench/results/KERNELS.md). Larger buffers (candidate_k, top_k or a top-p floor
# above 64, the intersection mode's growth room) run as one GEMM on the stacked rows + the logits
# kernels (``HiddenLaunch``; the reasoning: bench/ROOFLINE.md, "hidden-state path").
HIDDEN_MAX_BUFFER = 64


def fused_hidden_fits(batch: int, vocab: int, params: StepParams) -> bool:
    """Whether the fused hidden-state kernels run these settings on a GPU (else: GEMM + logits kernels)."""
    return fused_hidden_supports(vocab, params) and plan_select(batch, vocab, params).buffer <= HIDDEN_MAX_BUFFER


def hidden_materialises(batch: int, vocab: int, params: StepParams, on_gpu: bool) -> bool:
    """Whether ``HiddenLaunch`` computes the logits with one GEMM and runs the logits kernels: settings the
    fused passes do not implement, and on a GPU those they do not fit."""
    return not fused_hidden_supports(vocab, params) or (on_gpu and not fused_hidden_fits(batch, vocab, params))


def fused_hidden_supports(vocab: int, params: StepParams) -> bool:
    """Whether the fused hidden-state passes implement these settings at all (on any device): not
    top-k / top-p sampling, whose candidates need the whole chunk of logits at once
    (``select_tiles.store_sample_candidates``); those steps materialise the logits."""
    return plan_select(1, vocab, params).sample != 2


HIDDEN_FOLD_ROWS = 2  # largest batch whose reduce runs inside the hidden-state pass 1


def plan_hidden_select(
    batch: int,
    vocab: int,
    params: StepParams,
    *,
    shared: bool,
    on_gpu: bool,
    num_splits: int | None = None,
    sm_count: int = 132,
) -> tuple[SelectPlan, dict[str, int]]:
    """(SelectPlan for the shared per-row kernels, block sizes and grid of the hidden-state passes).

    The mode switches and the top-K buffer size come from ``launcher.plan_select`` so that the
    shared reduce / intersection / finalize kernels see exactly what they expect; the vocabulary
    is then cut into ``num_splits`` splits instead of one chunk per tile, which keeps the scratch
    small (``[B, splits, K]`` keys instead of ``[B, V / BLOCK_V, K]``). Raises ValueError for
    settings the kernels do not support (k above the buffer cap).
    """
    select = plan_select(batch, vocab, params)
    # tl.dot needs >= 16 rows: a shared head stacks base and expert rows, 2 * block_b of them.
    # Every row block reads the whole weight once per pass, so large batches get large blocks
    # (up to 64 rows, 128 stacked) and smaller vocabulary tiles to bound the registers.
    # On sm_90 the largest tiles that compile without spilling (bench/results/KERNELS.md): 16 rows
    # (32 stacked) x 64 columns for greedy union steps, 8 rows (16 stacked, tl.dot's minimum) when
    # pass 2 also draws Gumbel noise or keeps top-K keys; larger buffers than K = 64 are not planned
    # here (``fused_hidden_fits``).
    block_b = 8 if shared else 16
    if on_gpu and select.sample == 0 and params.candidate_mode == CandidateMode.UNION:
        block_b = max(block_b, min(next_pow2(batch), 16))
    block_v = 64
    block_v = max(block_v, select.buffer)  # tile_topk_keys needs K <= BLOCK_V
    block_h = 64 if on_gpu else 32
    n_tiles = triton.cdiv(vocab, block_v)
    row_blocks = triton.cdiv(batch, block_b)
    if num_splits is None:
        # enough programs to fill the GPU twice over; few under the interpreter (programs run in turn)
        target = 2 * sm_count if on_gpu else 2
        num_splits = triton.cdiv(target, row_blocks)
    num_splits = max(1, min(int(num_splits), n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, num_splits)
    num_splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty splits
    # the per-row kernels see one "chunk" per split: redo the plan fields that depend on the chunk count.
    # The reduce reads ~512 keys per load here (plan_select allows 4096 on a GPU).
    ncp = next_pow2(num_splits)
    chunk_group = max(1, min(ncp, 512 // select.buffer))
    row_block = max(1, min(next_pow2(batch), 1024 // (chunk_group * select.buffer)))
    select = dataclasses.replace(
        select, n_chunks=num_splits, ncp=ncp, chunk_group=chunk_group, row_block=row_block,
        inter_block=max(1, min(select.buffer, 4096 // (row_block * select.buffer))),
        key_block=max(1, min(ncp * select.buffer, 1024 // row_block)) if select.key_kind == 2 else 1,
        block_b=block_b, block_v=block_v, slots=select.buffer,  # the split's running top-K (bitonic, sorted): K slots per chunk
        pass1_block_v=0, pass1_warps=4,  # both passes walk the same splits
        # the reduce inside pass 1 (``_hs_pass1_reduce_kernel``) only for B <= 2: the last split of a row block
        # reduces the block's rows one after another (~1-2 us each on a GPU for K = 64, an estimate from the
        # kernel report), while the reduce's own launch takes them all at once for the price of a launch
        fold_reduce=batch <= HIDDEN_FOLD_ROWS and select.key_kind != 2,
    )
    # pass 1 on 16-row tiles: 8 warps (4 need 224 registers a thread on sm_90 and spill on sm_80; 8 also
    # execute fewer instructions per logit: bench/results/KERNELS.md); 8-row tiles stay cheaper with 4
    grid = dict(block_b=block_b, block_v=block_v, block_h=block_h, num_splits=num_splits,
                tiles_per_split=tiles_per_split, row_blocks=row_blocks,
                pass1_warps=8 if on_gpu and block_b >= 16 else 4)
    return select, grid



# ---------------------------------------------------------------------------------------------
# Triton kernels (only the logits producer and the per-split accumulation are specific to this
# file; tiles are handed to the helpers of select_tiles.py and the partials are laid out exactly
# like the logits path's per-chunk scratch, with one "chunk" per vocabulary split)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _masked_logit_tiles(
    hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr,
    row0, row_mask, B, V, tile, H, HE,
    s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
    SHARED: tl.constexpr, HAS_BIAS_B: tl.constexpr, HAS_BIAS_E: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
):
    """Vocabulary tile `tile` of this row block: (base, expert) logits with -inf outside the batch and
    vocabulary, the tile's token ids and its mask."""
    cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    mask = row_mask[:, None] & col_mask[None, :]
    lb, le = _logit_tiles(hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr, row0, B, cols, col_mask, H, HE,
                          s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
                          SHARED, HAS_BIAS_B, HAS_BIAS_E, BLOCK_B, BLOCK_V, BLOCK_H, UPCAST)
    return tl.where(mask, lb, float("-inf")), tl.where(mask, le, float("-inf")), cols, mask


@triton.jit
def _logit_tiles(
    hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr,
    row0, B, cols, col_mask, H, HE,
    s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
    SHARED: tl.constexpr, HAS_BIAS_B: tl.constexpr, HAS_BIAS_E: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
):
    """fp32 logits of rows row0..row0+BLOCK_B for vocabulary `cols`: (base, expert), each [BLOCK_B, BLOCK_V].

    With a shared LM head the base and expert hidden rows are stacked into one
    [2*BLOCK_B, BLOCK_H] operand, so every weight tile is loaded once for both models.
    Both passes call this with the same constants, so they compute bit-identical logits.
    """
    kk0 = tl.arange(0, BLOCK_H)
    cols64 = cols.to(tl.int64)
    if SHARED:
        r2 = tl.arange(0, 2 * BLOCK_B)
        is_b = r2 < BLOCK_B
        rows2 = row0 + tl.where(is_b, r2, r2 - BLOCK_B)
        rmask2 = rows2 < B
        rows2 = rows2.to(tl.int64)
        acc = tl.zeros((2 * BLOCK_B, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            kk = k0 + kk0
            kmask = kk < H
            w = tl.load(wb_ptr + cols64[None, :] * s_wb0 + kk[:, None] * s_wb1,
                        mask=col_mask[None, :] & kmask[:, None], other=0.0)
            xb = tl.load(hb_ptr + rows2[:, None] * s_hb0 + kk[None, :] * s_hb1,
                         mask=(is_b & rmask2)[:, None] & kmask[None, :], other=0.0)
            xe = tl.load(he_ptr + rows2[:, None] * s_he0 + kk[None, :] * s_he1,
                         mask=((~is_b) & rmask2)[:, None] & kmask[None, :], other=0.0)
            x = tl.where(is_b[:, None], xb, xe)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision="ieee")
        halves = tl.permute(tl.reshape(acc, (2, BLOCK_B, BLOCK_V)), (1, 2, 0))
        lb, le = tl.split(halves)
    else:
        rows = row0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        rows = rows.to(tl.int64)
        lb = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
        le = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
        # separate heads may differ in hidden size (e.g. a 7B base with a 1B expert): H vs HE
        for k0 in range(0, tl.maximum(H, HE), BLOCK_H):
            kk = k0 + kk0
            kmask_b = kk < H
            kmask_e = kk < HE
            wb = tl.load(wb_ptr + cols64[None, :] * s_wb0 + kk[:, None] * s_wb1,
                         mask=col_mask[None, :] & kmask_b[:, None], other=0.0)
            we = tl.load(we_ptr + cols64[None, :] * s_we0 + kk[:, None] * s_we1,
                         mask=col_mask[None, :] & kmask_e[:, None], other=0.0)
            xb = tl.load(hb_ptr + rows[:, None] * s_hb0 + kk[None, :] * s_hb1,
                         mask=rmask[:, None] & kmask_b[None, :], other=0.0)
            xe = tl.load(he_ptr + rows[:, None] * s_he0 + kk[None, :] * s_he1,
                         mask=rmask[:, None] & kmask_e[None, :], other=0.0)
            if UPCAST:
                wb = wb.to(tl.float32)
                we = we.to(tl.float32)
                xb = xb.to(tl.float32)
                xe = xe.to(tl.float32)
            lb = tl.dot(xb, wb, lb, input_precision="ieee")
            le = tl.dot(xe, we, le, input_precision="ieee")
    if HAS_BIAS_B:
        lb += tl.load(biasb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS_E:
        le += tl.load(biase_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return lb, le


@triton.jit
def _fold_stats(m, s, m_t, s_t):
    """Combine two (max, sum exp(x - max)) partials of the same rows."""
    m_new = tl.maximum(m, m_t)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_new = tl.where(m > float("-inf"), s * tl.exp(m - m_safe), 0.0) + tl.where(
        m_t > float("-inf"), s_t * tl.exp(m_t - m_safe), 0.0)
    return m_new, s_new


@triton.jit
def _fold_best(best, besti, tile_best, tile_besti):
    """Running arg-max over tiles in increasing token order: ties keep the earlier (lower) id."""
    take = (tile_best > best) | (besti == INDEX_NONE)
    return tl.where(take, tile_best, best), tl.where(take, tile_besti, besti)


@triton.jit
def _fold_outcome(scores, gumbel, temperature, cols, mask, best, besti, SAMPLE: tl.constexpr,
                  PER_ROW: tl.constexpr = False):
    """Fold one tile's scores of one gate outcome into the split's running arg-max."""
    tile_best, tile_besti = tile_argmax(tile_choice_values(scores, gumbel, temperature, SAMPLE, PER_ROW), cols, mask)
    return _fold_best(best, besti, tile_best, tile_besti)


@triton.jit
def _hs_pass1_kernel(
    hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr,
    stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr,
    B, V, H, HE,
    s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
    tiles_per_split, n_chunks,
    SHARED: tl.constexpr, HAS_BIAS_B: tl.constexpr, HAS_BIAS_E: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
    K: tl.constexpr, KEYS: tl.constexpr,
):
    """Pass 1 over one (row block, vocabulary split): what fused_select's pass 1 stores per chunk
    (stats [B, n_chunks, 4], counts [B, n_chunks, 4], top-K keys [B, n_chunks, K]), for the split.

    KEYS as in select_tiles.tile_topk_keys: 0 none (gate shut), 1 int32 value keys (union
    thresholds), 2 int64 order keys (intersection ranks)."""
    # row blocks of one split are neighbours in launch order: they share its weight tiles in L2
    row0 = tl.program_id(0) * BLOCK_B
    split = tl.program_id(1)
    rows = row0 + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    m_b = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    m_e = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    s_b = tl.zeros((BLOCK_B,), tl.float32)
    s_e = tl.zeros((BLOCK_B,), tl.float32)
    bad_b = tl.zeros((BLOCK_B,), tl.int32)
    bad_e = tl.zeros((BLOCK_B,), tl.int32)
    fin_b = tl.zeros((BLOCK_B,), tl.int32)
    fin_e = tl.zeros((BLOCK_B,), tl.int32)
    if KEYS == 1:
        top_b = tl.full((BLOCK_B, K), VALUE_NONE, tl.int32)
        top_e = tl.full((BLOCK_B, K), VALUE_NONE, tl.int32)
    else:
        top_b = tl.full((BLOCK_B, K), KEY_NONE, tl.int64)
        top_e = tl.full((BLOCK_B, K), KEY_NONE, tl.int64)
    for t in range(0, tiles_per_split):
        lb, le, cols, mask = _masked_logit_tiles(
            hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr, row0, row_mask, B, V, split * tiles_per_split + t,
            H, HE, s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
            SHARED, HAS_BIAS_B, HAS_BIAS_E, BLOCK_B, BLOCK_V, BLOCK_H, UPCAST)
        tm_b, ts_b, tbad_b, tfin_b = tile_stats(lb, mask)
        tm_e, ts_e, tbad_e, tfin_e = tile_stats(le, mask)
        m_b, s_b = _fold_stats(m_b, s_b, tm_b, ts_b)
        m_e, s_e = _fold_stats(m_e, s_e, tm_e, ts_e)
        bad_b += tbad_b
        bad_e += tbad_e
        fin_b += tfin_b
        fin_e += tfin_e
        if KEYS != 0:
            top_b = merge_topk_keys(top_b, tile_topk_keys(lb, cols, mask, K, KEYS), K)
            top_e = merge_topk_keys(top_e, tile_topk_keys(le, cols, mask, K, KEYS), K)
    store_pass1_partials(rows, row_mask, split, n_chunks, stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr,
                         m_b, s_b, bad_b, fin_b, m_e, s_e, bad_e, fin_e, top_b, top_e, K, KEYS)


@triton.jit
def _hs_pass1_reduce_kernel(
    hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr,
    stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr, rowinfo_ptr, tickets_ptr,
    B, V, H, HE,
    s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
    tiles_per_split, n_chunks, kth,
    SHARED: tl.constexpr, HAS_BIAS_B: tl.constexpr, HAS_BIAS_E: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
    K: tl.constexpr, KEYS: tl.constexpr, NCP: tl.constexpr, CG: tl.constexpr, REDUCE: tl.constexpr = True,
):
    """``_hs_pass1_kernel``, then the reduce of the row block by the last of its splits to finish
    (``fused_select._pass1_reduce_kernel``'s ticket), one row at a time: only the block's rows below B
    (plans with B <= HIDDEN_FOLD_ROWS). Union or no candidate keys. REDUCE=False: kernel report only."""
    _hs_pass1_kernel(hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr, stats_ptr, counts_ptr, keys_b_ptr,
                     keys_e_ptr, B, V, H, HE, s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
                     tiles_per_split, n_chunks, SHARED, HAS_BIAS_B, HAS_BIAS_E, BLOCK_B, BLOCK_V, BLOCK_H, UPCAST,
                     K, KEYS)
    if REDUCE:
        block = tl.program_id(0)
        if last_of_row_block(tickets_ptr, block, n_chunks):
            row0 = block * BLOCK_B
            for r in range(row0, tl.minimum(row0 + BLOCK_B, B)):
                reduce_block(r, B, stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr, rowinfo_ptr, n_chunks, kth,
                             1, NCP, K, CG, KEYS, 0, K)
            tl.store(tickets_ptr + block, 0)


@triton.jit
def _hs_pass2_kernel(
    hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr,
    rowinfo_ptr, alpha_ptr, seed_ptr, seed_stride, offset_ptr, offset_stride, temperature, row_temperature_ptr,
    div_ptr, best_ptr, besti_ptr, keys2_ptr, mass_ptr,
    B, V, H, HE,
    s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
    tiles_per_split, n_chunks,
    SHARED: tl.constexpr, HAS_BIAS_B: tl.constexpr, HAS_BIAS_E: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
    K: tl.constexpr, DIVERGENCE: tl.constexpr, SAMPLE: tl.constexpr,
    NEED_V0: tl.constexpr, NEED_V1: tl.constexpr, ROW_T: tl.constexpr = 0,
):
    """Pass 2 over one (vocabulary split, row block): the same logits again -> what fused_select's
    pass 2 stores per chunk (div [B, n_chunks, 2]; best / besti [B, 2, n_chunks] per gate outcome),
    for the split. Greedy and plain temperature sampling only (keys2_ptr / mass_ptr are never
    touched): top-k / top-p steps run on materialised logits (``HiddenLaunch``)."""
    # row blocks of one split are neighbours in launch order: they share its weight tiles in L2
    row0 = tl.program_id(0) * BLOCK_B
    split = tl.program_id(1)
    rows = row0 + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    info = rows.to(tl.int64) * 8
    m_b = tl.load(rowinfo_ptr + info, mask=row_mask, other=0.0)
    ls_b = tl.load(rowinfo_ptr + info + 1, mask=row_mask, other=0.0)
    m_e = tl.load(rowinfo_ptr + info + 2, mask=row_mask, other=0.0)
    ls_e = tl.load(rowinfo_ptr + info + 3, mask=row_mask, other=0.0)
    thr_b = tl.load(rowinfo_ptr + info + 4, mask=row_mask, other=0.0)
    thr_e = tl.load(rowinfo_ptr + info + 5, mask=row_mask, other=0.0)
    alpha = tl.load(alpha_ptr + rows, mask=row_mask, other=0.0)
    seed = tl.load(seed_ptr + rows * seed_stride, mask=row_mask, other=0)
    offset = tl.load(offset_ptr + rows * offset_stride, mask=row_mask, other=0)
    row_t = rows_temperature(temperature, row_temperature_ptr, rows, row_mask, ROW_T)
    first = tl.zeros((BLOCK_B,), tl.float32)
    second = tl.zeros((BLOCK_B,), tl.float32)
    best0 = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best1 = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    besti0 = tl.full((BLOCK_B,), INDEX_NONE, tl.int32)
    besti1 = tl.full((BLOCK_B,), INDEX_NONE, tl.int32)
    tl.static_assert(SAMPLE != 2, "top-k / top-p sampling runs on materialised logits (HiddenLaunch)")
    for t in range(0, tiles_per_split):
        lb, le, cols, mask = _masked_logit_tiles(
            hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr, row0, row_mask, B, V, split * tiles_per_split + t,
            H, HE, s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
            SHARED, HAS_BIAS_B, HAS_BIAS_E, BLOCK_B, BLOCK_V, BLOCK_H, UPCAST)
        log_pb, pb = tile_log_probs(lb, m_b, ls_b)
        log_pe, pe = tile_log_probs(le, m_e, ls_e)
        t_first, t_second = tile_divergence_terms(log_pb, pb, log_pe, pe, DIVERGENCE)
        first += t_first
        second += t_second
        if SAMPLE == 1:
            gumbel = philox_gumbel_span((split * tiles_per_split + t) * BLOCK_V, seed, offset, rows, BLOCK_V)
        else:
            gumbel = 0.0
        if NEED_V0:
            best0, besti0 = _fold_outcome(pb, gumbel, row_t, cols, mask, best0, besti0, SAMPLE,
                                          ROW_T)
        if NEED_V1:
            mixed = tile_union_scores(lb, le, pb, pe, alpha, thr_b, thr_e)
            best1, besti1 = _fold_outcome(mixed, gumbel, row_t, cols, mask, best1, besti1, SAMPLE,
                                          ROW_T)
    dslot = (rows.to(tl.int64) * n_chunks + split) * 2
    tl.store(div_ptr + dslot, first, mask=row_mask)
    tl.store(div_ptr + dslot + 1, second, mask=row_mask)
    oslot = rows.to(tl.int64) * 2 * n_chunks + split  # [row, outcome, chunk], the logits path's layout
    if NEED_V0:
        tl.store(best_ptr + oslot, best0, mask=row_mask)
        tl.store(besti_ptr + oslot, besti0, mask=row_mask)
    if NEED_V1:
        tl.store(best_ptr + oslot + n_chunks, best1, mask=row_mask)
        tl.store(besti_ptr + oslot + n_chunks, besti1, mask=row_mask)



@dataclasses.dataclass(frozen=True)
class HiddenPasses:
    """The launcher's source for final hidden states and LM head(s): logits computed tile by tile, twice."""

    base_hidden: torch.Tensor
    expert_hidden: torch.Tensor
    base_head_weight: torch.Tensor
    expert_head_weight: torch.Tensor | None  # None: shared head
    base_head_bias: torch.Tensor | None
    expert_head_bias: torch.Tensor | None  # already resolved: the base bias when the expert shares it
    grid_plan: dict[str, int]

    def _launch(self, kernel, plan: SelectPlan, *buffers, **constants) -> None:
        hb, he, wb = self.base_hidden, self.expert_hidden, self.base_head_weight
        we = wb if self.expert_head_weight is None else self.expert_head_weight
        absent = hb  # never read: the HAS_BIAS_* switches are off
        bias_b = self.base_head_bias if self.base_head_bias is not None else absent
        bias_e = self.expert_head_bias if self.expert_head_bias is not None else absent
        g = self.grid_plan
        # fp16/bf16 dots run natively on GPU (exact products, fp32 accumulation); the interpreter's
        # low-precision arithmetic is wrong, so there everything is cast to fp32 after the load
        on_gpu = hb.device.type == "cuda"
        kernel[(g["row_blocks"], plan.n_chunks)](
            hb, he, wb, we, bias_b, bias_e, *buffers,
            plan.batch, plan.vocab, hb.shape[1], he.shape[1], *hb.stride(), *he.stride(), *wb.stride(), *we.stride(),
            g["tiles_per_split"], plan.n_chunks,
            SHARED=self.expert_head_weight is None, HAS_BIAS_B=self.base_head_bias is not None,
            HAS_BIAS_E=self.expert_head_bias is not None, BLOCK_B=g["block_b"], BLOCK_V=g["block_v"],
            BLOCK_H=g["block_h"], UPCAST=(not on_gpu) or hb.dtype == torch.float32, K=plan.buffer,
            **constants, **LAUNCH_OPTIONS,
        )

    def pass1(self, plan: SelectPlan, s: Scratch) -> bool:
        """Pass 1, with the reduce folded in where the plan says so; returns whether it was."""
        warps = self.grid_plan.get("pass1_warps", 4)
        if not plan.fold_reduce:
            self._launch(_hs_pass1_kernel, plan, s.stats, s.counts, s.keys_b, s.keys_e, KEYS=plan.key_kind,
                         num_warps=warps)
            return False
        self._launch(_hs_pass1_reduce_kernel, plan, s.stats, s.counts, s.keys_b, s.keys_e, s.rowinfo, s.tickets,
                     kth=plan.kth, KEYS=plan.key_kind, NCP=plan.ncp, CG=plan.chunk_group, num_warps=warps)
        return True

    def pass2(self, plan: SelectPlan, s: Scratch, rows: RowVectors, temperature: float, tempered: bool = False) -> None:
        # tempered top-p is top-p sampling, which runs on materialised logits (HiddenLaunch): never here
        self._launch(
            _hs_pass2_kernel, plan,
            s.rowinfo, rows.alpha, rows.seed, rows.seed_stride, rows.offset, rows.offset_stride, temperature,
            rows.temperature_arg["row_temperature_ptr"], s.div, s.best, s.besti, s.keys2, s.mass,
            ROW_T=rows.temperature_arg["ROW_T"],
            DIVERGENCE=plan.divergence, SAMPLE=plan.sample, NEED_V0=plan.need_v0, NEED_V1=plan.need_v1,
        )

    def row_logits(self, row_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        we = self.base_head_weight if self.expert_head_weight is None else self.expert_head_weight
        return (
            hidden_logits(self.base_hidden[row_ids], self.base_head_weight, self.base_head_bias),
            hidden_logits(self.expert_hidden[row_ids], we, self.expert_head_bias),
        )


def fused_select_from_hidden(
    base_hidden: Tensor, expert_hidden: Tensor, base_head_weight: Tensor, expert_head_weight: Tensor | None,
    base_head_bias: Tensor | None, expert_head_bias: Tensor | None, potential: Tensor, alpha: Tensor, seed: Tensor,
    offset: Tensor, params: StepParams, *, num_splits: int | None = None, exact_fallback: bool = True,
    row_temperature: Tensor | None = None, row_top_k: Tensor | None = None, row_top_p: Tensor | None = None,
) -> Outputs:
    """The hidden-state step on the Triton kernels (inputs already checked; ``expert_head_weight=None``:
    shared head; ``expert_head_bias=None``: the expert has no bias -- resolve sharing before calling).

    ``num_splits`` overrides how many programs share one row's vocabulary; ``exact_fallback=False``
    skips the one host read of the overflow flags (CUDA-graph capture), leaving overflowing rows with
    the buffer's answer. ``row_temperature``: each row's own temperature (``fused_guarded_select``).
    """
    batch = base_hidden.shape[0]
    device = base_hidden.device
    if batch == 0:
        return empty_outputs(0, potential)
    launch = HiddenLaunch.build(batch, base_head_weight.shape[0], params, device,
                                shared=expert_head_weight is None, num_splits=num_splits)
    return launch.run(base_hidden, expert_hidden, base_head_weight, expert_head_weight, base_head_bias,
                      expert_head_bias, potential, alpha, seed, offset, params, exact_fallback=exact_fallback,
                      row_temperature=row_temperature, row_top_k=row_top_k, row_top_p=row_top_p)


@dataclasses.dataclass(frozen=True)
class HiddenLaunch:
    """The planned hidden-state step for one batch size, vocabulary, setting and head sharing: launch
    constants and scratch, reused by every ``run`` (``GuardedSelector.run_from_hidden`` keeps one).

    ``materialise``: the settings need a top-K buffer the fused kernels cannot hold on a GPU
    (``HIDDEN_MAX_BUFFER``): the logits come from one GEMM on the stacked rows (``pair_logits``: a
    shared head is read once) and the logits kernels run on them with ``plan``."""

    plan: SelectPlan
    grid_plan: dict[str, int]
    scratch: Scratch
    materialise: bool = False

    @classmethod
    def build(cls, batch: int, vocab: int, params: StepParams, device: torch.device, *, shared: bool,
              num_splits: int | None = None, materialise: bool | None = None) -> "HiddenLaunch":
        """``materialise``: None chooses (GPU and a buffer above HIDDEN_MAX_BUFFER); True / False force it."""
        on_gpu = device.type == "cuda"
        if materialise is None:
            materialise = hidden_materialises(batch, vocab, params, on_gpu)
        elif not materialise and not fused_hidden_supports(vocab, params):
            raise ValueError("materialise=False: the fused hidden-state passes do not run top-k / top-p sampling; "
                             "leave materialise=None")
        if materialise:
            plan = plan_select(batch, vocab, params)
            return cls(plan, {}, Scratch.allocate(plan, device), materialise=True)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 0
        plan, grid_plan = plan_hidden_select(batch, vocab, params, shared=shared, on_gpu=on_gpu,
                                             num_splits=num_splits, sm_count=sms)
        return cls(plan, grid_plan, Scratch.allocate(plan, device))

    def run(self, base_hidden: Tensor, expert_hidden: Tensor, base_head_weight: Tensor,
            expert_head_weight: Tensor | None, base_head_bias: Tensor | None, expert_head_bias: Tensor | None,
            potential: Tensor, alpha: Tensor, seed: Tensor, offset: Tensor, params: StepParams,
            exact_fallback: bool = True, row_temperature: Tensor | None = None, row_top_k: Tensor | None = None,
            row_top_p: Tensor | None = None) -> Outputs:
        # the kernels read a bias at unit stride (a view such as packed[:, 0] was read as if contiguous)
        base_head_bias, expert_head_bias = (None if b is None else b.contiguous() for b in (base_head_bias,
                                                                                             expert_head_bias))
        heads = (base_head_weight, expert_head_weight, base_head_bias, expert_head_bias)
        if self.materialise:
            from .fused_select import LogitsPasses

            source = LogitsPasses.of(*pair_logits(base_hidden, expert_hidden, *heads))
        else:
            source = HiddenPasses(base_hidden, expert_hidden, *heads, self.grid_plan)
        return select_exact(source, self.plan, self.scratch, potential, alpha, seed, offset, params,
                            exact_fallback=exact_fallback, row_temperature=row_temperature, row_top_k=row_top_k,
                            row_top_p=row_top_p)
