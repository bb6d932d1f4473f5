"""The exact token of spiked intersection rows whose grown intersection did not fit in the top-K buffers.

``launcher._intersection_kernel`` builds SafeDecoding's grown intersection C from each row's two
top-K (logit, id) lists. When fewer than ``need`` tokens are in both lists, C reaches past the
buffers and the row is flagged (``over``). ``_intersection_fallback_kernel`` decides those rows on
the GPU from the full logits rows, without sorting and without any host read, so that intersection
mode on the logits path is graph-capturable (issue 17). One program per row; programs of rows that
did not spike or are not flagged return at once. The work of a flagged row is a few hundred passes
over its two logits rows (a rare path):

1. ``k'`` -- the smallest k >= k_min (candidate_k clipped to V) whose intersection
   ``C_k = {i : rank_b(i) < k and rank_e(i) < k}`` holds at least ``need`` tokens -- by bisection
   over k (``|C_k|`` grows with k; ``C_V`` is the whole row). For each probed k the rank thresholds
   ``T_b(k)``, ``T_e(k)`` are the k-th largest int64 order keys of the two rows
   (``select_tiles.order_key``: larger logit first, then lower id, the order of torch's stable
   descending sort), so ``rank(i) < k`` iff ``order_key(i) >= T(k)``. A k-th largest order key is
   found without sorting (``_kth_order_keys``): first its value key by MSB-first radix search over
   the 32 value-key bits, then, among the tokens tied at that value, the id by the same search over
   the id bits; R bits per round (2^R candidate thresholds counted per pass), one pass over the row
   per round, base and expert in the same passes. Then one pass counts ``|C_k|``.
2. The guarded scores on C exactly as ``reference.step_scores`` computes them:
   ``g = max(p_b + alpha (p_e - p_b), score_floor)`` on C (without the tokens -inf in both models, where
   C holds another: ``reference.scored_intersection``), 0 elsewhere, ``s = g / sum(g)``
   (``p = exp((l - max) - log_sum)``, the order of operations of the other kernels).
3. The token: greedy arg-max of s (lowest id on ties), or ``reference.choose_tokens`` on
   ``q = max(s, 0)``: the rules of ``reference.sampling_mask`` (top-k threshold, then the top-p one,
   each by radix search over value keys, as ``fused_select._sample_fallback_kernel`` does by plain
   bisection) and Gumbel-max with the reference's Philox noise (``select_tiles.philox_gumbel``).

The kernel writes the token and clears the row's flag. Sums (the normaliser of s, the top-p masses)
run in tile order, not torch's, so scores can differ from the reference's by an ulp, like those of
the other kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..params import StepParams
from .launcher import INTERPRETED, LAUNCH_OPTIONS, TILE_ELEMENTS, RowVectors, Scratch, SelectPlan, next_pow2
from .select_tiles import (INDEX_NONE, KEY_NONE, fold_gumbel_max, kept_log_max, order_key, positive_temperature,
                           rows_temperature, rows_value, tile_log_probs, top_p_weights, value_key, value_of)

__all__ = ["RADIX_BITS", "decide_intersection_overflow"]

# bits per round of the radix searches (2^R candidate thresholds counted per pass over the row).
# GPU: 2 (three useful compares per entry for half the passes of plain bisection); the interpreter
# pays per operation, not per element, so it takes 4 (a quarter of the passes). Must divide 32.
RADIX_BITS = 4 if INTERPRETED else 2


@triton.jit
def _load_pair(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, BT: tl.constexpr):
    """Columns start .. start + BT - 1 of one row of both logits as [1, BT] fp32 (-inf past the
    vocabulary), their [BT] ids and the [1, BT] in-vocabulary mask."""
    cols = start + tl.arange(0, BT)
    cm = (cols < n_vocab)[None, :]
    lb = tl.load(lb_ptr + row * stride_b + cols[None, :], mask=cm, other=float("-inf")).to(tl.float32)
    le = tl.load(le_ptr + row * stride_e + cols[None, :], mask=cm, other=float("-inf")).to(tl.float32)
    return lb, le, cols, cm


@triton.jit
def _kth_order_keys(lb_ptr, le_ptr, row, stride_b, stride_e, n_vocab, kth, id_rounds,
                    R: tl.constexpr, BT: tl.constexpr):
    """[1] int64 k-th largest order keys (the key of the token of rank kth - 1) of the base and the
    expert row; kth: [1] int32 in [1, V].

    Phase 1: the k-th largest value key v (biased to [0, 2^32) in int64: u = key + 2^31), the
    largest u with #{u_i >= u} >= kth. Phase 2: among the tokens tied at v, the id t of the
    (kth - #{value > v})-th lowest, i.e. the largest t with #{key_i > key(v, t)} < kth. Each round
    counts 2^R candidates t + j 2^shift (j = 0 .. 2^R - 1; j = 0 always qualifies) in one pass and
    keeps the last one that qualifies (the counts are monotone in j).
    """
    NJ: tl.constexpr = 2**R
    j = tl.arange(0, NJ).to(tl.int64)
    ub = tl.zeros([1], tl.int64)
    ue = tl.zeros([1], tl.int64)
    for i in range(32 // R):
        shift = 32 - R * (i + 1)
        cb = ub + (j << shift)  # [NJ]
        ce = ue + (j << shift)
        cnt_b = tl.zeros([NJ], tl.int32)
        cnt_e = tl.zeros([NJ], tl.int32)
        for start in range(0, n_vocab, BT):
            lb, le, cols, cm = _load_pair(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, BT)
            kb = value_key(lb).to(tl.int64) + 2147483648
            ke = value_key(le).to(tl.int64) + 2147483648
            cnt_b += tl.sum((cm & (kb >= cb[:, None])).to(tl.int32), axis=1)
            cnt_e += tl.sum((cm & (ke >= ce[:, None])).to(tl.int32), axis=1)
        ub += (tl.sum((cnt_b >= kth).to(tl.int64), axis=0) - 1) << shift
        ue += (tl.sum((cnt_e >= kth).to(tl.int64), axis=0) - 1) << shift
    # the order key (value key << 32) | (2^31 - 1 - id) of the threshold value with id 0
    hb = ((ub - 2147483648) << 32) + 0x7FFFFFFF
    he = ((ue - 2147483648) << 32) + 0x7FFFFFFF
    tb = tl.zeros([1], tl.int64)
    te = tl.zeros([1], tl.int64)
    for i in range(id_rounds):
        shift = R * (id_rounds - 1 - i)
        cb = hb - (tb + (j << shift))  # [NJ] order keys (value v, id candidate)
        ce = he - (te + (j << shift))
        cnt_b = tl.zeros([NJ], tl.int32)
        cnt_e = tl.zeros([NJ], tl.int32)
        for start in range(0, n_vocab, BT):
            lb, le, cols, cm = _load_pair(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, BT)
            cnt_b += tl.sum((cm & (order_key(lb, cols[None, :]) > cb[:, None])).to(tl.int32), axis=1)
            cnt_e += tl.sum((cm & (order_key(le, cols[None, :]) > ce[:, None])).to(tl.int32), axis=1)
        tb += (tl.sum((cnt_b < kth).to(tl.int64), axis=0) - 1) << shift
        te += (tl.sum((cnt_e < kth).to(tl.int64), axis=0) - 1) << shift
    return hb - tb, he - te


@triton.jit
def _guarded_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e, ls_e, alpha,
                  tb, te, score_floor, only_allowed, norm, BT: tl.constexpr):
    """s = g / norm of columns start .. start + BT - 1 ([1, BT]; 0 outside C and past the vocabulary),
    g = max(p_b + alpha (p_e - p_b), floor) on C = {order_key_b >= tb and order_key_e >= te}, where
    ``only_allowed`` ([1] bool) leaves out the tokens -inf in both models (``reference.scored_intersection``);
    the arithmetic of ``launcher._intersection_kernel``. Also returns the [BT] ids and [1, BT] mask."""
    lb, le, cols, cm = _load_pair(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, BT)
    in_set = cm & (order_key(lb, cols[None, :]) >= tb[:, None]) & (order_key(le, cols[None, :]) >= te[:, None])
    allowed = (lb > float("-inf")) | (le > float("-inf"))
    in_set = in_set & (allowed | ~only_allowed[:, None])
    _, pb = tile_log_probs(lb, m_b, ls_b)
    _, pe = tile_log_probs(le, m_e, ls_e)
    mixed = pb + alpha[:, None] * (pe - pb)
    guarded = tl.where(in_set, tl.maximum(mixed, score_floor), 0.0)
    return guarded / norm[:, None], cols, cm


@triton.jit
def _intersection_fallback_kernel(
    lb_ptr, le_ptr, stride_b, stride_e, n_rows, n_vocab, rowinfo_ptr, alpha_ptr, spike_ptr, over_ptr, tokens_ptr,
    seed_ptr, seed_stride, offset_ptr, offset_stride, k_min, need, score_floor, temperature, row_temperature_ptr,
    top_k, top_p, outer_rounds, id_rounds, row_top_k_ptr, row_top_p_ptr,
    BT: tl.constexpr, R: tl.constexpr, SAMPLE: tl.constexpr, USE_TOPK: tl.constexpr, USE_TOPP: tl.constexpr,
    ROW_T: tl.constexpr = 0, ROW_K: tl.constexpr = 0, ROW_P: tl.constexpr = 0, TEMPERED: tl.constexpr = False,
):
    """The exact token of one spiked, flagged intersection row (see the module docstring); other
    programs return at once. SAMPLE: 0 greedy, else Gumbel-max sampling (with USE_TOPK / USE_TOPP;
    TEMPERED: top-p over q^(1/T), ``select_tiles.tempered_weights``).
    One program per row (``n_rows``: the grid of csrc_triton's AOT launcher comes from the arguments)."""
    row = tl.program_id(0).to(tl.int64)
    one = tl.zeros([1], tl.int32)
    present = (row + one) < n_rows
    flagged = (tl.load(over_ptr + row + one, mask=present, other=0) != 0) & (
        tl.load(spike_ptr + row + one, mask=present, other=0) != 0) & present
    if tl.sum(flagged.to(tl.int32), axis=0) > 0:
        NJ: tl.constexpr = 2**R
        j = tl.arange(0, NJ).to(tl.int64)
        # k' in (lo, hi]: |C_hi| >= need, |C_lo| < need (or lo = k_min - 1); C_V is the whole row
        # (carried as lo and gap = hi - lo: a loop-carried hi is never read after the loop, and carrying
        # both lo and hi had ptxas spill one to the stack for sm_80)
        lo = k_min - 1 + one
        gap = n_vocab - lo
        tb = tl.full([1], KEY_NONE, tl.int64)  # the thresholds of C_hi (KEY_NONE: every token)
        te = tl.full([1], KEY_NONE, tl.int64)
        for _round in range(outer_rounds):
            if tl.max(gap, axis=0) > 1:
                mid = lo + gap // 2  # (lo + hi) // 2, lo >= 0
                cb, ce = _kth_order_keys(lb_ptr, le_ptr, row, stride_b, stride_e, n_vocab, mid, id_rounds, R, BT)
                size = tl.zeros([1], tl.int32)
                for start in range(0, n_vocab, BT):
                    lb, le, cols, cm = _load_pair(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, BT)
                    both = cm & (order_key(lb, cols[None, :]) >= cb[:, None]) & (order_key(le, cols[None, :]) >= ce[:, None])
                    size += tl.sum(both.to(tl.int32), axis=1)
                grown = size >= need
                gap = tl.where(grown, gap // 2, gap - gap // 2)  # (lo, mid] or (mid, hi]
                lo = tl.where(grown, lo, mid)
                tb = tl.where(grown, cb, tb)
                te = tl.where(grown, ce, te)

        info = rowinfo_ptr + row * 8 + one
        m_b = tl.load(info)
        ls_b = tl.load(info + 1)
        m_e = tl.load(info + 2)
        ls_e = tl.load(info + 3)
        alpha = tl.load(alpha_ptr + row + one)
        unit = tl.full([1], 1.0, tl.float32)
        yes = tl.full([1], 1, tl.int1)
        total_allowed = tl.zeros([1], tl.float32)  # sums of g over C's allowed tokens and over all of C
        total_all = tl.zeros([1], tl.float32)
        for start in range(0, n_vocab, BT):
            g, cols, cm = _guarded_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e, ls_e,
                                        alpha, tb, te, score_floor, yes, unit, BT)
            total_allowed += tl.sum(g, axis=1)
            g, cols, cm = _guarded_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e, ls_e,
                                        alpha, tb, te, score_floor, ~yes, unit, BT)
            total_all += tl.sum(g, axis=1)
        # g >= score_floor > 0 on C: a positive sum means C holds a token either model allows
        only_allowed = total_allowed > 0.0
        total = tl.where(only_allowed, total_allowed, total_all)  # the scores' normaliser

        best = tl.full([1], float("-inf"), tl.float32)
        best_id = tl.full([1], INDEX_NONE, tl.int32)
        if SAMPLE == 0:
            for start in range(0, n_vocab, BT):
                s, cols, cm = _guarded_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e,
                                            ls_e, alpha, tb, te, score_floor, only_allowed, total, BT)
                v = tl.where(cm, s, float("-inf"))
                tile_best = tl.max(v, axis=1)
                tile_id = tl.min(tl.where(cm & (v == tile_best[:, None]), cols[None, :], INDEX_NONE), axis=1)
                better = tile_best > best
                best_id = tl.where(better, tile_id, best_id)
                best = tl.where(better, tile_best, best)
            token = best_id
        else:
            # top-k: the k-th largest q = max(s, 0) (its value key; q >= 0: keys in [0, 2^31)), else 0
            kth_key = tl.zeros([1], tl.int64)
            # the row's own top-k / top-p where given (new names: a runtime branch keeps the arguments' types)
            row_k = rows_value(top_k, row_top_k_ptr, row + one, flagged, ROW_K)
            row_p = rows_value(top_p, row_top_p_ptr, row + one, flagged, ROW_P)
            if USE_TOPK:
                k = tl.minimum(row_k, n_vocab)
                for i in range(32 // R):
                    shift = 32 - R * (i + 1)
                    cand = kth_key + (j << shift)
                    cnt = tl.zeros([NJ], tl.int32)
                    for start in range(0, n_vocab, BT):
                        s, cols, cm = _guarded_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b,
                                                 m_e, ls_e, alpha, tb, te, score_floor, only_allowed, total, BT)
                        q = tl.maximum(s, 0.0)
                        cnt += tl.sum((cm & (value_key(q).to(tl.int64) >= cand[:, None])).to(tl.int32), axis=1)
                    kth_key += (tl.sum((cnt >= k).to(tl.int64), axis=0) - 1) << shift
            kth_q = value_of(kth_key.to(tl.int32))
            # top-p over the probabilities of the kept q: kept iff their mass strictly above is < top_p
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
                        s, cols, cm = _guarded_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b,
                                                    m_e, ls_e, alpha, tb, te, score_floor, only_allowed, total, BT)
                        top = tl.maximum(top, kept_log_max(tl.maximum(s, 0.0), kth_q, temper))
                    top = tl.where(top > float("-inf"), top, 0.0)
                kept = tl.zeros([1], tl.float32)
                for start in range(0, n_vocab, BT):
                    s, cols, cm = _guarded_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e,
                                             ls_e, alpha, tb, te, score_floor, only_allowed, total, BT)
                    q = tl.maximum(s, 0.0)
                    kept += tl.sum(top_p_weights(q, kth_q, temper, top, TEMPERED), axis=1)
                norm = tl.maximum(kept, 1e-30)
                # the largest key t whose mass strictly above value(t) is >= top_p (t = 0 if none)
                t = tl.zeros([1], tl.int64)
                p_max = tl.zeros([1], tl.float32)
                mass0 = tl.zeros([1], tl.float32)  # the mass strictly above 0
                for i in range(32 // R):
                    shift = 32 - R * (i + 1)
                    cand = t + (j << shift)
                    mass = tl.zeros([NJ], tl.float32)
                    for start in range(0, n_vocab, BT):
                        s, cols, cm = _guarded_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b,
                                                 m_e, ls_e, alpha, tb, te, score_floor, only_allowed, total, BT)
                        q = tl.maximum(s, 0.0)
                        prob = top_p_weights(q, kth_q, temper, top, TEMPERED) / norm[:, None]
                        pkey = value_key(prob).to(tl.int64)
                        mass += tl.sum(tl.where(pkey > cand[:, None], prob, 0.0), axis=1)
                        p_max = tl.maximum(p_max, tl.max(prob, axis=1))
                    if i == 0:
                        mass0 = tl.sum(tl.where(j == 0, mass, 0.0), axis=0) + mass0
                    t += tl.maximum(tl.sum((mass >= row_p).to(tl.int64), axis=0) - 1, 0) << shift
                # the first key past t is the smallest kept probability
                floor_p = tl.where(mass0 >= row_p, tl.minimum(value_of((t + 1).to(tl.int32)), p_max), 0.0)
            # Gumbel-max over the kept tokens with the reference's noise (lowest id among equal maxima)
            seed = tl.load(seed_ptr + row * seed_stride + one)
            offset = tl.load(offset_ptr + row * offset_stride + one)
            for start in range(0, n_vocab, BT):
                s, cols, cm = _guarded_tile(lb_ptr, le_ptr, row, stride_b, stride_e, start, n_vocab, m_b, ls_b, m_e,
                                            ls_e, alpha, tb, te, score_floor, only_allowed, total, BT)
                q = tl.maximum(s, 0.0)
                keep = cm & (q > 0.0)
                if USE_TOPK:
                    keep = keep & (q >= kth_q[:, None])
                if USE_TOPP:
                    keep = keep & (top_p_weights(q, kth_q, temper, top, TEMPERED) / norm[:, None] >= floor_p[:, None])
                best, best_id = fold_gumbel_max(q, keep, cols[None, :], seed, offset, row + one, row_t, best,
                                                best_id, ROW_T)
            token = tl.where(best == float("-inf"), 0, best_id)  # nothing kept: torch.argmax of all -inf is 0
        tl.store(tokens_ptr + row + one, token.to(tl.int64), mask=flagged)
        tl.store(over_ptr + row + one, tl.zeros_like(flagged), mask=flagged)


def decide_intersection_overflow(
    base_logits: torch.Tensor, expert_logits: torch.Tensor, plan: SelectPlan, scratch: Scratch, rows: RowVectors,
    params: StepParams, temperature: float, tokens: torch.Tensor, spike: torch.Tensor, over: torch.Tensor,
    *, radix_bits: int | None = None, tempered: bool = False,
) -> None:
    """Decide on the GPU the rows that spiked in intersection mode and whose grown intersection did
    not fit in the top-K buffers (``over`` set by the finalize kernel): writes their ``tokens`` and
    clears their ``over`` flags; other rows are left alone. No host synchronisation.

    base_logits / expert_logits: [B, V] with unit stride along the vocabulary (``LogitsPasses``);
    scratch.rowinfo must hold the reduce kernel's row statistics; ``temperature`` as the finalize
    kernel got it (1.0 when greedy); ``tempered``: top-p over q^(1/T), as the finalize's. ``radix_bits``
    (tests): bits per search round, default RADIX_BITS.
    """
    r = RADIX_BITS if radix_bits is None else radix_bits
    if r < 1 or 32 % r:
        raise ValueError(f"radix_bits must divide 32, got {r}")
    vocab = plan.vocab
    bt = min(next_pow2(vocab), TILE_ELEMENTS if INTERPRETED else max(256, 4096 >> r))
    id_bits = max(1, (vocab - 1).bit_length())
    id_rounds = -(-id_bits // r)
    outer_rounds = max(1, (vocab - plan.kth + 1).bit_length())  # enough halvings of (k_min - 1, V]
    _intersection_fallback_kernel[(plan.batch,)](
        base_logits, expert_logits, base_logits.stride(0), expert_logits.stride(0), plan.batch, vocab, scratch.rowinfo,
        rows.alpha,
        spike, over, tokens, rows.seed, rows.seed_stride, rows.offset, rows.offset_stride,
        plan.kth, plan.need, params.score_floor, temperature=temperature, top_k=params.top_k, top_p=params.top_p,
        outer_rounds=outer_rounds, id_rounds=id_rounds, **rows.temperature_arg, **rows.top_k_p_arg,
        BT=bt, R=r, SAMPLE=plan.sample, USE_TOPK=plan.use_topk, USE_TOPP=plan.use_topp, TEMPERED=tempered,
        **LAUNCH_OPTIONS,
    )
