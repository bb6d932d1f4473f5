"""One launcher for the guarded step's Triton kernels, whatever produces the logits tiles.

A step is three to five launches (``select_tiles.py`` describes the passes and the scratch layout):

    pass 1 (source)  ->  reduce  ->  [intersection]  ->  pass 2 (source)  ->  finalize

Outside intersection mode the reduce runs inside pass 1 (``SelectPlan.fold_reduce``; on the
hidden-state path for B <= 2 only): the last program of a row block to finish its chunk takes a
ticket that says so, and reduces the block.

The two passes over the vocabulary are the *source*'s: the logits path (``fused_select.py``)
loads logits tiles, the hidden-state path (``hidden_select.py``) computes them from final hidden
states and the LM head. Both write the same per-chunk partials, so the per-row kernels below, the
plan, the scratch, the launch order and the exact fallback for rows a bounded top-K buffer could
not decide are written once, here. A source is any object with ``pass1(plan, scratch) -> bool``,
``pass2(plan, scratch, rows, temperature, tempered)`` and ``row_logits(row_ids)`` (``PassKernels``).

On CPU the kernels run only under ``TRITON_INTERPRET=1`` (set before Triton is imported).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch
import triton
import triton.language as tl

from ..params import CandidateMode, Divergence, GateMode, StepParams
from ..reference import Outputs, guarded_select_reference, tempered_top_p
from .select_tiles import (
    INDEX_NONE,
    KEY_NONE,
    combine_log_masses,
    compact_top_keys,
    ilog2,
    key_index,
    key_value,
    keys_sample,
    log_tempered_mass,
    order_key,
    positive_temperature,
    raw_to_order_keys,
    rows_temperature,
    rows_value,
    slots_kth_key,
    slots_kth_largest,
    slots_sample,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# No FMA contraction: keeps each product and sum rounded like PyTorch's separate ops, so that
# the kernels' scores stay within an ulp or two of the reference's (ties decide tokens).
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)

MAX_BUFFER = 1024  # largest top-K buffer: caps candidate_k, min_candidates and top_k (each clipped to V)
# elements per register tile ([BB, BV] logits tiles, [RB, CG * K] merge tiles). Untuned guess for
# GPUs; the interpreter pays per operation, not per element, so it gets bigger tiles.
TILE_ELEMENTS = 16384 if INTERPRETED else 4096


@triton.constexpr_function
def value_key_step(rb, cg, per_chunk, ncp):
    """Slots of a row the union reduce reads per load (``_reduce_kernel``): CG chunks' slots, and when
    those do not cover the row (the keys are re-read every bisection round) at most TILE_ELEMENTS
    per program: CG counts the chunks' K, not their 2K slots, and [1, 8192] loads made ptxas spill
    the row pointer on sm_80 (bench/results/KERNELS.md)."""
    n = cg * per_chunk
    return n if ncp <= cg else max(1, min(n, TILE_ELEMENTS // rb))


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ----------------------------------------------------------------------------------------------
# per-row kernels (shared by every source)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _reduce_kernel(
    stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr, rowinfo_ptr, top_b_ptr, top_e_ptr, n_rows, n_chunks, kth,
    RB: tl.constexpr, NCP: tl.constexpr, K: tl.constexpr, CG: tl.constexpr,
    NEED_KEYS: tl.constexpr, STORE_TOP: tl.constexpr, VALUE_KEYS: tl.constexpr = False, DENSE: tl.constexpr = 0,
    SLOTS: tl.constexpr = 0, KB: tl.constexpr = 1,
):
    """``reduce_rows`` of RB rows a program (a launch of its own: intersection mode, the hidden-state path)."""
    rows = (tl.program_id(0) * RB + tl.arange(0, RB)).to(tl.int64)
    reduce_rows(rows, rows < n_rows, stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr, rowinfo_ptr, top_b_ptr, top_e_ptr,
                n_chunks, kth, RB, NCP, K, CG, NEED_KEYS, STORE_TOP, VALUE_KEYS, DENSE, SLOTS, KB)


@triton.jit
def last_of_row_block(tickets_ptr, block, n_chunks):
    """Count this pass-1 program into its row block's ticket once its partials are stored; true for the one
    that draws the last ticket, which then has every chunk's partials (and sets the ticket back to 0 after
    its reduce). The barrier orders every thread's partial stores before the ticket within the program; the
    atomic's release publishes them, its acquire makes the other programs' partials visible."""
    tl.debug_barrier()
    return tl.atomic_add(tickets_ptr + block, 1, sem="acq_rel", scope="gpu") == n_chunks - 1


@triton.jit(noinline=True)
def reduce_block(row0, n_rows, stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr, rowinfo_ptr, n_chunks, kth,
                 RB: tl.constexpr, NCP: tl.constexpr, K: tl.constexpr, CG: tl.constexpr, KEYS: tl.constexpr,
                 DENSE: tl.constexpr, SLOTS: tl.constexpr):
    """``reduce_rows`` of rows row0 .. row0 + RB - 1 below n_rows, union (KEYS 1) or no candidate keys (0): the
    reduce a pass-1 kernel runs in the last program of a row block (``SelectPlan.fold_reduce``). A function
    of its own (noinline): inlined, ptxas allocated the tile and the reduce together and spilled (8 B in the
    fp32 logits pass 1 on sm_90: kernel report)."""
    rows = (row0 + tl.arange(0, RB)).to(tl.int64)
    reduce_rows(rows, rows < n_rows, stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr, rowinfo_ptr, keys_b_ptr,
                keys_e_ptr, n_chunks, kth, RB, NCP, K, CG, KEYS != 0, False, KEYS == 1, DENSE, SLOTS, 1)


@triton.jit
def reduce_rows(
    rows, rmask, stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr, rowinfo_ptr, top_b_ptr, top_e_ptr, n_chunks, kth,
    RB: tl.constexpr, NCP: tl.constexpr, K: tl.constexpr, CG: tl.constexpr,
    NEED_KEYS: tl.constexpr, STORE_TOP: tl.constexpr, VALUE_KEYS: tl.constexpr, DENSE: tl.constexpr,
    SLOTS: tl.constexpr, KB: tl.constexpr,
):
    """Per row (int64 ``rows`` [RB], ``rmask``): log-sum-exp and validity of both rows, top-K lists
    (intersection), union thresholds; from pass 1's per-chunk partials, into ``rowinfo``.

    Keys: SLOTS slots per chunk (0: K, csrc_triton's AOT build). With VALUE_KEYS fp32 value
    multisets (union mode; their k-th largest by bisection on the keys of the logits' storage
    dtype, DENSE as ``select_tiles.dense_key``), read CG chunks' slots at a time (at most TILE_ELEMENTS
    when they are not the whole row: ``value_key_step``); else int64 raw (value, id) keys
    (intersection mode; made order keys in place, each row's K-th largest order key by bisection,
    the keys at or above it compacted into top_b / top_e), read KB keys at a time.
    """
    c = tl.arange(0, NCP)
    cm = rmask[:, None] & (c < n_chunks)[None, :]
    slot = (rows[:, None] * n_chunks + c[None, :]) * 4
    m_b = tl.load(stats_ptr + slot, mask=cm, other=float("-inf"))
    s_b = tl.load(stats_ptr + slot + 1, mask=cm, other=0.0)
    m_e = tl.load(stats_ptr + slot + 2, mask=cm, other=float("-inf"))
    s_e = tl.load(stats_ptr + slot + 3, mask=cm, other=0.0)
    bad = tl.sum(tl.load(counts_ptr + slot, mask=cm, other=0) + tl.load(counts_ptr + slot + 2, mask=cm, other=0), 1)
    fin_b = tl.sum(tl.load(counts_ptr + slot + 1, mask=cm, other=0), axis=1)
    fin_e = tl.sum(tl.load(counts_ptr + slot + 3, mask=cm, other=0), axis=1)
    valid = (bad == 0) & (fin_b > 0) & (fin_e > 0)

    max_b = tl.max(m_b, axis=1)
    max_e = tl.max(m_e, axis=1)
    # chunks without a finite entry have max -inf and contribute nothing
    sum_b = tl.sum(tl.where(m_b > float("-inf"), s_b * tl.exp(m_b - max_b[:, None]), 0.0), axis=1)
    sum_e = tl.sum(tl.where(m_e > float("-inf"), s_e * tl.exp(m_e - max_e[:, None]), 0.0), axis=1)

    info = rowinfo_ptr + rows * 8
    # fields 0-3 and 6 in one [RB, 8] store: [RB] stores here would share their predicate (rmask and the
    # storing thread) with the threshold stores after the union bisection loops below, and ptxas kept
    # it live through them (sm_80 spilled it to the stack: kernel report)
    f = tl.arange(0, 8)[None, :]
    fields = tl.where(f == 0, max_b[:, None], tl.where(f == 1, tl.log(sum_b)[:, None], tl.where(
        f == 2, max_e[:, None], tl.where(f == 3, tl.log(sum_e)[:, None], valid.to(tl.float32)[:, None]))))
    tl.store(info[:, None] + f, fields, mask=rmask[:, None] & (f != 4) & (f != 5) & (f != 7))
    if NEED_KEYS:
        PER_CHUNK: tl.constexpr = K if SLOTS == 0 else SLOTS  # 0: K (csrc_triton's AOT build)
        n_slots = n_chunks * PER_CHUNK
        row_base = rows * n_slots
        # union candidates: every token whose logit is >= the k-th largest logit of its row
        if VALUE_KEYS:
            # unsorted per-chunk multisets: the k-th largest by bisection, nothing sorted or merged
            # CG chunks' slots per load: one load serves every round when they cover the row
            LOOP: tl.constexpr = NCP > CG
            STEP: tl.constexpr = value_key_step(RB, CG, PER_CHUNK, NCP)
            tl.store(info + 4, slots_kth_largest(keys_b_ptr, row_base, rmask, n_slots, kth, STEP, LOOP, DENSE),
                     mask=rmask)
            tl.store(info + 5, slots_kth_largest(keys_e_ptr, row_base, rmask, n_slots, kth, STEP, LOOP, DENSE),
                     mask=rmask)
        else:
            # intersection: each row's top-K list by order key = the keys >= its K-th largest, unsorted
            # (raw keys from pass 1, made order keys here once per slot), KB keys per load
            LOOP_KEYS: tl.constexpr = NCP * PER_CHUNK > KB
            raw_to_order_keys(keys_b_ptr, row_base, rmask, n_slots, KB, LOOP_KEYS)
            raw_to_order_keys(keys_e_ptr, row_base, rmask, n_slots, KB, LOOP_KEYS)
            tl.debug_barrier()  # the rewritten slots are read by other threads below
            thr_b = slots_kth_key(keys_b_ptr, row_base, rmask, n_slots, K, KB, LOOP_KEYS)
            thr_e = slots_kth_key(keys_e_ptr, row_base, rmask, n_slots, K, KB, LOOP_KEYS)
            tl.store(info + 4, key_value(thr_b), mask=rmask)  # informative only: no kernel reads them here
            tl.store(info + 5, key_value(thr_e), mask=rmask)
            if STORE_TOP:
                compact_top_keys(keys_b_ptr, row_base, rmask, n_slots, thr_b, top_b_ptr, rows * K, K, KB, LOOP_KEYS)
                compact_top_keys(keys_e_ptr, row_base, rmask, n_slots, thr_e, top_e_ptr, rows * K, K, KB, LOOP_KEYS)
    else:
        tl.store(info + 4, tl.zeros_like(max_b), mask=rmask)
        tl.store(info + 5, tl.zeros_like(max_b), mask=rmask)


@triton.jit
def _intersection_kernel(
    top_b_ptr, top_e_ptr, rowinfo_ptr, alpha_ptr, seed_ptr, seed_stride, offset_ptr, offset_stride,
    choice_ptr, iover_ptr, n_rows, n_vocab, k_min, need, score_floor, temperature, row_temperature_ptr, top_k, top_p,
    row_top_k_ptr, row_top_p_ptr,
    RB: tl.constexpr, K: tl.constexpr, EB: tl.constexpr, SAMPLE: tl.constexpr,
    USE_TOPK: tl.constexpr, USE_TOPP: tl.constexpr, ROW_T: tl.constexpr = 0, ROW_K: tl.constexpr = 0,
    ROW_P: tl.constexpr = 0, TEMPERED: tl.constexpr = False,
):
    """Per row: SafeDecoding's grown intersection and the token of the row *if it spikes*.

    With rank = position in the row's descending (logit, then lower id) order, C holds the tokens
    whose worse rank is < k' (k' the smallest value >= k giving >= `need` tokens). The two top-K
    lists (unsorted, from the reduce) give each listed token's rank by counting the larger keys of
    its list; tokens outside either list have worse rank >= K, so C is exact whenever at least
    `need` tokens are in both lists; otherwise the row is flagged (overflow) and decided by the
    caller. Nothing is sorted: ranks by counting, k' by bisection, the draw by ``keys_sample``.
    """
    rows = (tl.program_id(0) * RB + tl.arange(0, RB)).to(tl.int64)
    rmask = rows < n_rows
    pos = tl.arange(0, K)
    kb = tl.load(top_b_ptr + rows[:, None] * K + pos[None, :], mask=rmask[:, None], other=KEY_NONE)
    present_b = kb != KEY_NONE
    ids_b = key_index(kb)
    # per base-list token: its rank in the base list, and its expert key where the expert list has it
    rank_b = tl.zeros([RB, K], tl.int32)
    key_e = tl.full([RB, K], KEY_NONE, tl.int64)
    epos = tl.arange(0, EB)
    for start in range(0, K, EB):
        block_b = tl.load(top_b_ptr + rows[:, None] * K + start + epos[None, :], mask=rmask[:, None], other=KEY_NONE)
        rank_b += tl.sum((block_b[:, None, :] > kb[:, :, None]).to(tl.int32), axis=2)
        ke = tl.load(top_e_ptr + rows[:, None] * K + start + epos[None, :], mask=rmask[:, None], other=KEY_NONE)
        hit = (ids_b[:, :, None] == key_index(ke)[:, None, :]) & present_b[:, :, None] & (ke != KEY_NONE)[:, None, :]
        key_e = tl.maximum(key_e, tl.max(tl.where(hit, ke[:, None, :], KEY_NONE), axis=2))
    matched = key_e != KEY_NONE
    rank_e = tl.zeros([RB, K], tl.int32)
    for start in range(0, K, EB):
        ke = tl.load(top_e_ptr + rows[:, None] * K + start + epos[None, :], mask=rmask[:, None], other=KEY_NONE)
        rank_e += tl.sum((ke[:, None, :] > key_e[:, :, None]).to(tl.int32), axis=2)
    worst = tl.where(matched, tl.maximum(rank_b, rank_e), INDEX_NONE)
    # the need-th smallest worse rank: the largest w in [0, K) with #{worst < w} < need (log2 K rounds)
    overflow = tl.sum(matched.to(tl.int32), axis=1) < need
    need_th = tl.zeros([RB], tl.int32)
    for i in tl.static_range(ilog2(K)):
        cand = need_th | (K >> (i + 1))
        need_th = tl.where(tl.sum((worst < cand[:, None]).to(tl.int32), axis=1) < need, cand, need_th)
    k_eff = tl.maximum(tl.where(overflow, 0, need_th) + 1, k_min)
    in_set = worst < k_eff[:, None]
    # reference.scored_intersection: a token -inf in both models scores 0 unless every candidate is one
    allowed = in_set & ((key_value(kb) > float("-inf")) | (tl.where(matched, key_value(key_e), float("-inf")) > float("-inf")))
    in_set = tl.where((tl.max(allowed.to(tl.int32), axis=1) > 0)[:, None], allowed, in_set)

    info = rowinfo_ptr + rows * 8
    alpha = tl.load(alpha_ptr + rows, mask=rmask, other=0.0)
    m_b = tl.load(info, mask=rmask, other=0.0)
    ls_b = tl.load(info + 1, mask=rmask, other=0.0)
    m_e = tl.load(info + 2, mask=rmask, other=0.0)
    ls_e = tl.load(info + 3, mask=rmask, other=0.0)
    pb = tl.exp((key_value(kb) - m_b[:, None]) - ls_b[:, None])
    pe = tl.exp((tl.where(matched, key_value(key_e), float("-inf")) - m_e[:, None]) - ls_e[:, None])
    mixed = pb + alpha[:, None] * (pe - pb)
    guarded = tl.where(in_set, tl.maximum(mixed, score_floor), 0.0)
    scores = guarded / tl.sum(guarded, axis=1)[:, None]
    if SAMPLE == 0:
        best = tl.max(tl.where(in_set, scores, float("-inf")), axis=1)
        token = tl.min(tl.where(in_set & (scores == best[:, None]), ids_b, INDEX_NONE), axis=1)
    else:
        seed = tl.load(seed_ptr + rows * seed_stride, mask=rmask, other=0)
        offset = tl.load(offset_ptr + rows * offset_stride, mask=rmask, other=0)
        row_t = rows_temperature(temperature, row_temperature_ptr, rows, rmask, ROW_T)
        if TEMPERED:
            total = log_tempered_mass(tl.where(in_set, scores, 0.0), positive_temperature(row_t, ROW_T))
        else:
            total = tl.sum(tl.where(in_set, scores, 0.0), axis=1)
        # every token outside C has q = 0 and is never kept: the candidates are certain (no floor)
        token = keys_sample(tl.where(in_set, order_key(scores, ids_b), KEY_NONE), total, seed, offset, rows, row_t,
                            rows_value(top_k, row_top_k_ptr, rows, rmask, ROW_K),
                            rows_value(top_p, row_top_p_ptr, rows, rmask, ROW_P), USE_TOPK, USE_TOPP, ROW_T, TEMPERED)
    tl.store(choice_ptr + rows, token, mask=rmask)
    tl.store(iover_ptr + rows, overflow.to(tl.int32), mask=rmask)


@triton.jit
def _row_valid(rowinfo_ptr, alpha_ptr, rows, rmask, MODE: tl.constexpr):
    """Rows the step decides: valid logits (the reduce's flag) and alpha as reference.alpha_is_valid
    (finite, and in [0, 1] in union mode, MODE 0)."""
    valid = tl.load(rowinfo_ptr + rows * 8 + 6, mask=rmask, other=0.0) > 0.5
    alpha = tl.load(alpha_ptr + rows, mask=rmask, other=0.0)
    valid = valid & (tl.abs(alpha) < float("inf"))
    if MODE == 0:
        valid = valid & (alpha >= 0.0) & (alpha <= 1.0)
    return valid


@triton.jit
def _gate_step(rowinfo_ptr, div_ptr, potential_ptr, alpha_ptr, rows, rmask, cm, c, n_chunks, decay, v_th, v_reset,
               rho, DIVERGENCE: tl.constexpr, GATE: tl.constexpr, MODE: tl.constexpr):
    """Per row: (valid, divergence, potential, LIF-updated potential, spike) from the chunks' partials."""
    dslot = (rows[:, None] * n_chunks + c[None, :]) * 2
    first = tl.sum(tl.load(div_ptr + dslot, mask=cm, other=0.0), axis=1)
    second = tl.sum(tl.load(div_ptr + dslot + 1, mask=cm, other=0.0), axis=1)
    if DIVERGENCE == 0:
        current = 0.5 * first
    elif DIVERGENCE == 1:
        current = first
    else:
        current = 0.5 * (first + second)
    valid = _row_valid(rowinfo_ptr, alpha_ptr, rows, rmask, MODE)
    potential = tl.load(potential_ptr + rows, mask=rmask, other=0.0)
    # decay 0 (tau = 1) forgets the old potential, also an infinite one: 0 * inf would leave it NaN for good
    v = tl.where(decay == 0.0, current, decay * potential + current)
    fired = v >= v_th
    # rho = 0 is a hard reset, also after an infinite current (KL): 0 * inf would leave a NaN potential
    new_v = tl.where(fired, v_reset + rho * tl.where(rho == 0.0, 0.0, v - v_reset), v)
    if GATE == 0:
        spike = fired
    elif GATE == 1:
        spike = rows >= 0  # gate forced open
    else:
        spike = rows < 0  # gate forced shut
    return valid, current, potential, new_v, spike


@triton.jit
def _store_gate(new_potential_ptr, spike_ptr, divergence_ptr, rows, rmask, valid, current, potential, new_v, spike):
    tl.store(new_potential_ptr + rows, tl.where(valid, new_v, potential), mask=rmask)
    tl.store(spike_ptr + rows, spike & valid, mask=rmask)
    tl.store(divergence_ptr + rows, tl.where(valid, current, float("nan")), mask=rmask)


@triton.jit
def _finalize_kernel(
    rowinfo_ptr, div_ptr, best_ptr, besti_ptr, keys2_ptr, mass_ptr, choice_ptr, iover_ptr,
    potential_ptr, alpha_ptr, seed_ptr, seed_stride, offset_ptr, offset_stride,
    tokens_ptr, new_potential_ptr, spike_ptr, divergence_ptr, over_ptr,
    n_rows, n_chunks, n_vocab, decay, v_th, v_reset, rho, temperature, row_temperature_ptr, top_k, top_p,
    row_top_k_ptr, row_top_p_ptr,
    RB: tl.constexpr, NCP: tl.constexpr, DIVERGENCE: tl.constexpr,
    GATE: tl.constexpr, MODE: tl.constexpr, SAMPLE: tl.constexpr, USE_TOPK: tl.constexpr,
    USE_TOPP: tl.constexpr, NEED_V0: tl.constexpr, SLOTS: tl.constexpr = 1, SB: tl.constexpr = 1,
    ROW_T: tl.constexpr = 0, ROW_K: tl.constexpr = 0, ROW_P: tl.constexpr = 0, TEMPERED: tl.constexpr = False,
):
    """Per row: divergence, LIF update, spike, and the token of the gate outcome that happened.

    Top-k / top-p (SAMPLE 2): ``slots_sample`` over the chunks' SLOTS candidate keys each, SB keys per
    load; a row whose thresholds fell below its certainty floor is flagged (``over``). TEMPERED: top-p
    reads q^(1/T), the chunks' masses are logs (``select_tiles.log_tempered_mass``)."""
    rows = (tl.program_id(0) * RB + tl.arange(0, RB)).to(tl.int64)
    rmask = rows < n_rows
    c = tl.arange(0, NCP)
    cm = rmask[:, None] & (c < n_chunks)[None, :]
    valid, current, potential, new_v, spike = _gate_step(
        rowinfo_ptr, div_ptr, potential_ptr, alpha_ptr, rows, rmask, cm, c, n_chunks, decay, v_th, v_reset, rho,
        DIVERGENCE, GATE, MODE)
    # union top-k / top-p: the gate is evaluated again after the sampling loops (LATE_GATE, below)
    LATE_GATE: tl.constexpr = SAMPLE == 2 and MODE == 0
    if not LATE_GATE:
        # the gate's outputs first: nothing of them stays live through the token choice below
        _store_gate(new_potential_ptr, spike_ptr, divergence_ptr, rows, rmask, valid, current, potential, new_v, spike)

    token = tl.zeros([RB], tl.int32)
    overflow = rows < 0
    if MODE == 0 or NEED_V0:
        if MODE == 0:
            outcome = spike.to(tl.int64)  # slot 1 holds the spiked union outcome
        else:
            outcome = tl.zeros_like(rows)
        oslot = (rows * 2 + outcome) * n_chunks
        if SAMPLE == 2:
            # per chunk: (sum of q, certainty floor) -> the row's mass and the largest floor
            mslot = (oslot[:, None] + c[None, :]) * 2
            if TEMPERED:
                total = combine_log_masses(tl.load(mass_ptr + mslot, mask=cm, other=float("-inf")))
            else:
                total = tl.sum(tl.load(mass_ptr + mslot, mask=cm, other=0.0), axis=1)
            floor = tl.max(tl.load(mass_ptr + mslot + 1, mask=cm, other=0.0), axis=1)
            seed = tl.load(seed_ptr + rows * seed_stride, mask=rmask, other=0)
            offset = tl.load(offset_ptr + rows * offset_stride, mask=rmask, other=0)
            # top-p: the candidates' weights, computed once, go to the other outcome's candidate slots (its
            # n_chunks * SLOTS int64 slots hold twice the fp32 weights needed; nothing reads them after pass 2)
            weights_ptr = keys2_ptr.to(tl.pointer_type(tl.float32))
            weights_base = (rows * 2 + 1 - outcome) * n_chunks * SLOTS * 2
            token, overflow = slots_sample(
                keys2_ptr, oslot * SLOTS, rmask, n_chunks * SLOTS, total, floor, seed, offset, rows,
                rows_temperature(temperature, row_temperature_ptr, rows, rmask, ROW_T),
                rows_value(top_k, row_top_k_ptr, rows, rmask, ROW_K),
                rows_value(top_p, row_top_p_ptr, rows, rmask, ROW_P), USE_TOPK, USE_TOPP, SB, NCP * SLOTS > SB, ROW_T,
                TEMPERED, weights_ptr, weights_base,
            )
        else:
            vals = tl.load(best_ptr + oslot[:, None] + c[None, :], mask=cm, other=float("-inf"))
            ids = tl.load(besti_ptr + oslot[:, None] + c[None, :], mask=cm, other=INDEX_NONE)
            best = tl.max(vals, axis=1)
            token = tl.min(tl.where(cm & (vals == best[:, None]), ids, INDEX_NONE), axis=1)
    if MODE == 1 and GATE != 2:  # the intersection kernel ran (it does not when the gate is shut)
        token = tl.where(spike, tl.load(choice_ptr + rows, mask=rmask, other=0), token)
        overflow = tl.where(spike, tl.load(iover_ptr + rows, mask=rmask, other=0) != 0, overflow)

    if LATE_GATE:
        # the gate's inputs read again after the sampling loops and all its outputs stored here, with the
        # token: nothing of it, not even the stores' predicate (rmask and the storing thread), stays live
        # through the loops, where sm_90's ptxas spilled that predicate to the stack (kernel report).
        # Same loads, same arithmetic: the same values as before the loops.
        valid, current, potential, new_v, spike = _gate_step(
            rowinfo_ptr, div_ptr, potential_ptr, alpha_ptr, rows, rmask, cm, c, n_chunks, decay, v_th, v_reset, rho,
            DIVERGENCE, GATE, MODE)
        _store_gate(new_potential_ptr, spike_ptr, divergence_ptr, rows, rmask, valid, current, potential, new_v, spike)
    elif SAMPLE == 2:
        # read again rather than kept through the sampling loops (where ptxas spilled it to the stack)
        valid = _row_valid(rowinfo_ptr, alpha_ptr, rows, rmask, MODE)
    tl.store(tokens_ptr + rows, tl.where(valid, token.to(tl.int64), -1), mask=rmask)
    tl.store(over_ptr + rows, overflow & valid, mask=rmask)




# ----------------------------------------------------------------------------------------------
# plan, scratch, row vectors
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectPlan:
    """Block sizes, buffer size and mode switches of one step; every field is a launch constant.

    >>> plan = plan_select(4, 1000, StepParams())
    >>> plan.buffer, plan.n_chunks >= 1, plan.sample
    (64, True, 0)
    """

    batch: int
    vocab: int
    block_b: int
    block_v: int
    n_chunks: int
    ncp: int  # n_chunks rounded up to a power of two
    buffer: int  # K, entries per top-K buffer
    chunk_group: int  # chunks whose union slots the reduce reads per load
    row_block: int  # rows per program of the per-row kernels (reduce, intersection, finalize)
    inter_block: int  # expert-list block of the intersection matching
    mode: int
    gate: int
    divergence: int
    sample: int  # 0 greedy, 1 plain temperature sampling, 2 top-k / top-p sampling
    use_topk: bool
    use_topp: bool
    need_keys: bool  # pass 1 writes top-K keys of the logits (a spike is possible)
    need_v0: bool  # the no-spike outcome can happen
    need_v1: bool  # the spiked union outcome can happen
    kth: int  # union: k clipped to V
    need: int  # intersection: min_candidates clipped to V
    may_overflow: bool  # some row may need the exact fallback
    slots: int = 0  # union (key kind 1): fp32 candidate slots per chunk and row (select_tiles.pass1_store_tile)
    sample_slots: int = 1  # top-k / top-p: candidate keys per chunk and gate outcome (select_tiles.sample_slots)
    sample_block: int = 1  # top-k / top-p: candidate keys the finalize kernel reads per load and row
    pass2_warps: int = 4  # warps per pass-2 program (8 where 4 would spill: kernel report)
    key_block: int = 1  # intersection: int64 candidate keys the reduce reads per load and program
    # pass 1 (and so the reduce) on wider chunks than pass 2 (0: block_v, the same chunks): buffers of
    # 1024 on a GPU, whose bound and 2K-slot compaction cost less per logit over 8192 columns
    pass1_block_v: int = 0
    pass1_warps: int = 4
    # the reduce runs inside pass 1: the last program of a row block to finish reduces the block
    # (``fused_select._pass1_reduce_kernel``; the hidden-state plan sets it for B <= 2 only); not in intersection
    # mode, whose reduce (a bisection over every chunk's int64 keys, up to 218 registers) would set pass 1's
    # register budget
    fold_reduce: bool = False
    # register cap (maxnreg) of the folded pass 1 (0: ptxas chooses). 255 on a GPU: with the reduce's noinline
    # call in the kernel, ptxas left to itself capped some variants at 128 or 168 registers and spilled
    # (100-108 B on sm_80); with the cap at 255 they take what the unfolded pass 1 took (kernel report)
    pass1_maxnreg: int = 0

    @property
    def pass1_bv(self) -> int:
        return self.pass1_block_v or self.block_v

    @property
    def pass1_chunks(self) -> int:
        """Chunks of pass 1 and the reduce (pass 2 and the finalize: ``n_chunks``)."""
        return triton.cdiv(self.vocab, self.pass1_block_v) if self.pass1_block_v else self.n_chunks

    @property
    def pass1_ncp(self) -> int:
        return next_pow2(self.pass1_chunks) if self.pass1_block_v else self.ncp

    @property
    def key_kind(self) -> int:
        """Pass-1 keys: 0 none, 1 int32 values (union thresholds), 2 int64 (value, id) (intersection)."""
        if not self.need_keys:
            return 0
        return 2 if self.mode == CandidateMode.INTERSECTION else 1

    @property
    def launches(self) -> int:
        """Launches of a step: pass 1 (with the reduce where folded), [reduce, intersection], pass 2, finalize;
        the device-side fallbacks not counted."""
        return 3 + int(not self.fold_reduce) + int(self.mode == CandidateMode.INTERSECTION and self.need_keys)




def plan_select(
    batch: int,
    vocab: int,
    params: StepParams,
    *,
    buffer_size: int | None = None,
    block_v: int | None = None,
    block_b: int | None = None,
    pass1_block_v: int | None = None,
) -> SelectPlan:
    """Choose launch constants; raise ValueError when a k exceeds the Triton backend's buffer cap.

    ``pass1_block_v``: pass 1's chunk width when it should differ from pass 2's (None: the plan's
    choice, which is 8192 for a union buffer of 1024 on a GPU; 0: the same chunks as pass 2)."""
    candidate_k, candidate_mode, min_candidates = params.candidate_k, params.candidate_mode, params.min_candidates
    gate, temperature, top_k, top_p = params.gate, params.temperature, params.top_k, params.top_p
    spike_possible = gate != GateMode.CLOSED
    intersection = candidate_mode == CandidateMode.INTERSECTION
    sample = 0 if temperature <= 0.0 else 1
    kth = max(1, min(candidate_k, vocab))
    need = max(1, min(min_candidates, vocab))
    # top-k with k >= V keeps every q > 0, i.e. it is off
    use_topk = sample == 1 and 0 < top_k < vocab
    use_topp = sample == 1 and top_p < 1.0
    if use_topk or use_topp:
        sample = 2
    required = {"candidate_k": kth if spike_possible else 1}
    if intersection and spike_possible:
        required["min_candidates"] = need
    if use_topk:
        required["top_k"] = min(top_k, vocab)
    for name, value in required.items():
        if value > MAX_BUFFER:
            raise ValueError(
                f"{name}={value} exceeds the Triton backend's top-K buffer cap of {MAX_BUFFER} entries; "
                f"use a smaller {name} or backend='torch'"
            )
    floor = 16
    if sample == 2 and use_topp and not use_topk:
        floor = 256  # the nucleus must fit in the buffer to avoid the exact fallback
    elif intersection and spike_possible:
        floor = 64  # room for the intersection to grow
    floor = min(floor, next_pow2(vocab))  # a buffer holding the whole row never overflows
    buffer = min(next_pow2(max(max(required.values()), floor)), MAX_BUFFER)
    if buffer_size is not None:
        if buffer_size < max(required.values()) or buffer_size & (buffer_size - 1) or buffer_size > MAX_BUFFER:
            raise ValueError(
                f"buffer_size={buffer_size} must be a power of two in [{max(required.values())}, {MAX_BUFFER}]"
            )
        buffer = buffer_size
    # a chunk must hold at least K entries for its top-K; a smaller block_v request is raised to K.
    # GPU: one row of 4096 per program at every batch size. [2, 2048] tiles launch as many programs
    # from B = 2 on, and each runs a longer instruction stream (pass 1: 43 instructions a logit against
    # 32: a row's bound, reductions and slot fill cost the same for half the columns); at B = 1,
    # [1, 2048] would double the programs of a pass that is far from filling the GPU anyway, for 42
    # instructions a logit (bench/ROOFLINE.md, "Tiles at small batches")
    bv = max(buffer, block_v or min(next_pow2(vocab), TILE_ELEMENTS))
    if bv & (bv - 1):
        raise ValueError(f"block_v={bv} must be a power of two")
    bb = block_b or max(1, min(next_pow2(batch), TILE_ELEMENTS // bv))
    if bb & (bb - 1):
        raise ValueError(f"block_b={bb} must be a power of two")
    n_chunks = triton.cdiv(vocab, bv)
    ncp = next_pow2(n_chunks)
    need_keys = spike_possible  # top-K logit keys serve the candidate sets only
    if pass1_block_v is None:
        # a buffer of 1024: pass 1 on [1, 8192] tiles with 8 warps (the same 32 columns a thread) costs 38-39
        # instructions a logit instead of 46-47 on [1, 4096] (intersection: 42-43 instead of 50-51): its bound
        # needs 2048 group maxima and its 2K = 2048 slots a chunk whatever the chunk's width, and the reduce
        # reads half as many slots. Pass 2 gains nothing per logit from wider tiles (21.6 against 21.5) and
        # keeps [1, 4096]. Not under the interpreter (its tiles are wider already).
        wide = not INTERPRETED and block_v is None and need_keys and buffer >= 1024
        pass1_block_v = min(2 * bv, next_pow2(vocab)) if wide else 0
    if pass1_block_v:
        if pass1_block_v & (pass1_block_v - 1) or pass1_block_v < buffer:
            raise ValueError(f"pass1_block_v={pass1_block_v} must be a power of two >= the buffer ({buffer})")
        if pass1_block_v == bv:
            pass1_block_v = 0
    reduce_ncp = next_pow2(triton.cdiv(vocab, pass1_block_v)) if pass1_block_v else ncp
    chunk_group = max(1, min(reduce_ncp, TILE_ELEMENTS // buffer))
    row_block = max(1, min(next_pow2(batch), TILE_ELEMENTS // (chunk_group * buffer)))
    slots = min(2 * buffer, pass1_block_v or bv) if need_keys else buffer
    if intersection and need_keys:
        # the reduce keeps a row's int64 candidate keys in registers for all 64 bisection rounds when
        # they fit a tile (4096 on a GPU: 32 a thread), else re-reads them every round
        row_block = max(1, min(next_pow2(batch), TILE_ELEMENTS // (reduce_ncp * slots)))
    # pass 1's warps: 32 columns a thread and row, as [1, 4096] with 4 warps
    pass1_warps = 4 * max(1, pass1_block_v * bb // 4096) if pass1_block_v and not INTERPRETED else 4
    # a buffer that holds the whole row decides exactly: no flags, no host read
    may_overflow = vocab > buffer and (sample == 2 or (intersection and spike_possible))
    sample_slots = min(2 * buffer, bv) if sample == 2 else 1  # the same formula as select_tiles.sample_slots
    return SelectPlan(
        batch=batch,
        vocab=vocab,
        block_b=bb,
        block_v=bv,
        n_chunks=n_chunks,
        ncp=ncp,
        buffer=buffer,
        chunk_group=chunk_group,
        row_block=row_block,
        inter_block=max(1, min(buffer, TILE_ELEMENTS // (row_block * buffer))),
        mode=int(candidate_mode),
        gate=int(gate),
        divergence=int(params.divergence),
        sample=sample,
        use_topk=use_topk,
        use_topp=use_topp,
        need_keys=need_keys,
        need_v0=gate != GateMode.OPEN,
        need_v1=spike_possible and not intersection,
        kth=kth,
        need=need,
        may_overflow=may_overflow,
        # union candidates above a group-maxima bound: room for ~1.4 k of them (select_tiles.pair_value_bound)
        slots=slots,
        sample_slots=sample_slots,
        # Jensen-Shannon's extra log tile at one [1, 4096] row per program needs more than 255 registers
        # a thread with 4 warps (sm_90 spills 8-44 B): 8 warps halve the columns per thread
        pass2_warps=8 if bb == 1 and bv >= 4096 and params.divergence == Divergence.JS else 4,
        # at most 1024 int64 keys per load and program on a GPU (8 a thread; 2048 spilled more finalize variants)
        sample_block=(max(1, min(next_pow2(ncp * sample_slots), (TILE_ELEMENTS // 4) // row_block))
                      if sample == 2 else 1),
        key_block=max(1, min(reduce_ncp * slots, TILE_ELEMENTS // row_block)) if intersection and need_keys else 1,
        pass1_block_v=pass1_block_v,
        pass1_warps=pass1_warps,
        fold_reduce=not (intersection and need_keys),
        pass1_maxnreg=0 if INTERPRETED else 255,
    )



def unsupported_reason(batch: int, vocab: int, params: StepParams) -> str | None:
    """Why the Triton kernels cannot run these settings (then use the PyTorch path), or None."""
    if not params.score_floor > 0.0:
        return f"score_floor must be > 0 for the Triton kernels, got {params.score_floor}; use backend='torch'"
    try:
        plan_select(max(batch, 1), max(vocab, 1), params)
    except ValueError as err:
        return str(err)
    return None


def check_triton_device(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is None or t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRETED):
            continue
        raise ValueError(
            f"the Triton backend needs CUDA tensors (got {t.device}); on CPU set TRITON_INTERPRET=1 before "
            "triton is first imported, or use backend='torch'"
        )


@dataclass
class Scratch:
    """The buffers the passes hand each other (layouts: ``select_tiles.py``); unused ones are 1-element.

    Every kernel writes all of its rows before the next one reads them, so one Scratch serves step after
    step of the same plan (``GuardedSelector`` keeps it).
    """

    stats: torch.Tensor
    counts: torch.Tensor
    keys_b: torch.Tensor
    keys_e: torch.Tensor
    rowinfo: torch.Tensor
    top_b: torch.Tensor
    top_e: torch.Tensor
    choice: torch.Tensor
    iover: torch.Tensor
    div: torch.Tensor
    best: torch.Tensor
    besti: torch.Tensor
    keys2: torch.Tensor
    mass: torch.Tensor
    intersect: bool
    # int32 [row blocks], zero between launches: pass 1's programs of a row block count themselves here when the
    # plan folds the reduce into it; the last one resets it (so a reused scratch needs no fill kernel)
    tickets: torch.Tensor | None = None

    @classmethod
    def allocate(cls, plan: SelectPlan, device: torch.device) -> "Scratch":
        batch, nc, k = plan.batch, plan.n_chunks, plan.buffer
        nc1 = plan.pass1_chunks  # pass 1's partials (stats, counts, keys) are per pass-1 chunk
        f32, i32, i64 = torch.float32, torch.int32, torch.int64
        keys_shape = (batch, nc1, plan.slots) if plan.need_keys else (1,)
        key_dtype = i32 if plan.key_kind == 1 else i64
        intersect = plan.mode == CandidateMode.INTERSECTION and plan.need_keys
        top_shape = (batch, k) if intersect else (1,)
        plain = plan.sample != 2
        return cls(
            stats=torch.empty((batch, nc1, 4), dtype=f32, device=device),
            counts=torch.empty((batch, nc1, 4), dtype=i32, device=device),
            keys_b=torch.empty(keys_shape, dtype=key_dtype, device=device),
            keys_e=torch.empty(keys_shape, dtype=key_dtype, device=device),
            rowinfo=torch.empty((batch, 8), dtype=f32, device=device),
            top_b=torch.empty(top_shape, dtype=i64, device=device),
            top_e=torch.empty(top_shape, dtype=i64, device=device),
            # written for every row by the intersection kernel before the finalize kernel reads them
            choice=torch.empty(batch if intersect else 1, dtype=i32, device=device),
            iover=torch.empty(batch if intersect else 1, dtype=i32, device=device),
            div=torch.empty((batch, nc, 2), dtype=f32, device=device),
            best=torch.empty((batch, 2, nc) if plain else (1,), dtype=f32, device=device),
            besti=torch.empty((batch, 2, nc) if plain else (1,), dtype=i32, device=device),
            keys2=torch.empty((batch, 2, nc, plan.sample_slots) if not plain else (1,), dtype=i64, device=device),
            mass=torch.empty((batch, 2, nc, 2) if not plain else (1,), dtype=f32, device=device),
            intersect=intersect,
            tickets=(torch.zeros(triton.cdiv(batch, plan.block_b), dtype=i32, device=device)
                     if plan.fold_reduce else None),
        )


@dataclass(frozen=True)
class RowVectors:
    """The per-row step state as the kernels read it: contiguous vectors, seed/offset with a 0 or 1 stride;
    ``temperature``: None (every row samples at the launch's temperature) or fp32 [B], each row's own."""

    potential: torch.Tensor
    alpha: torch.Tensor
    seed: torch.Tensor
    seed_stride: int
    offset: torch.Tensor
    offset_stride: int
    temperature: torch.Tensor | None = None
    top_k: torch.Tensor | None = None  # int32 [B]
    top_p: torch.Tensor | None = None  # fp32 [B]

    @classmethod
    def of(cls, potential: torch.Tensor, alpha: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
           row_temperature: torch.Tensor | None = None, row_top_k: torch.Tensor | None = None,
           row_top_p: torch.Tensor | None = None) -> "RowVectors":
        batch = potential.shape[0]
        seed_v, seed_stride = _per_row(seed, batch)
        offset_v, offset_stride = _per_row(offset, batch)

        def vector(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if t is None else t.to(dtype).contiguous()

        return cls(potential.contiguous(), alpha.contiguous(), seed_v, seed_stride, offset_v, offset_stride,
                   vector(row_temperature, torch.float32), vector(row_top_k, torch.int32),
                   vector(row_top_p, torch.float32))

    @property
    def top_k_p_arg(self) -> dict:
        """The kernels' per-row top-k / top-p pointers and switches (placeholders the switches never read)."""
        return dict(row_top_k_ptr=self.alpha if self.top_k is None else self.top_k, ROW_K=int(self.top_k is not None),
                    row_top_p_ptr=self.alpha if self.top_p is None else self.top_p, ROW_P=int(self.top_p is not None))

    @property
    def temperature_arg(self) -> dict:
        """The kernels' (row_temperature_ptr, ROW_T) pair: without per-row temperatures a placeholder
        pointer that ROW_T = 0 never reads."""
        per_row = self.temperature is not None
        return dict(row_temperature_ptr=self.temperature if per_row else self.alpha, ROW_T=int(per_row))


def _per_row(t: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """A contiguous int64 vector and its stride (0 when one value serves every row)."""
    flat = t.reshape(-1).to(torch.int64).contiguous()
    return flat, (0 if flat.numel() == 1 and batch != 1 else 1)


# ----------------------------------------------------------------------------------------------
# the launch sequence
# ----------------------------------------------------------------------------------------------


class PassKernels(Protocol):
    """What a logits source provides: its two passes over the vocabulary, and logits of some rows
    (optionally also ``sample_fallback``, see ``launch_select``). ``pass1`` returns whether it also
    ran the reduce (``SelectPlan.fold_reduce``, for a source that can)."""

    def pass1(self, plan: SelectPlan, scratch: Scratch) -> bool: ...

    def pass2(self, plan: SelectPlan, scratch: Scratch, rows: RowVectors, temperature: float,
              tempered: bool = False) -> None: ...

    def row_logits(self, row_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def launch_select(
    source: PassKernels, plan: SelectPlan, scratch: Scratch, rows: RowVectors, params: StepParams,
    fallback: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pass 1, reduce (inside pass 1 where the plan and the source fold it), [intersection], pass 2,
    finalize; no host synchronisation.

    Returns (tokens, new potential, spike, divergence, overflow): ``overflow`` (bool [B], or None
    when no row can be left undecided) marks rows whose buffer could not decide; their token is the
    buffer's answer and may differ from the reference (``select_exact`` recomputes them). With
    ``fallback``, a source with ``sample_fallback`` (the logits path) decides the top-k / top-p rows
    among them on the GPU, and a source with ``intersection_fallback`` the spiked intersection rows
    (``intersection_fallback.py``); the logits path then returns ``overflow=None``.
    """
    batch, vocab, nc, k = plan.batch, plan.vocab, plan.n_chunks, plan.buffer
    device = rows.potential.device
    # outputs: every row is written by the finalize kernel (no fill launches)
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    new_potential = torch.empty(batch, dtype=torch.float32, device=device)
    spike = torch.empty(batch, dtype=torch.bool, device=device)
    current = torch.empty(batch, dtype=torch.float32, device=device)
    over = torch.empty(batch, dtype=torch.bool, device=device)
    s = scratch
    temperature = params.temperature if params.temperature > 0 else 1.0
    # top-p over q^(1/T) (spec 3.5): T != 1, or the rows' own temperatures
    tempered = plan.use_topp and tempered_top_p(params.temperature, params.top_p, rows.temperature, rows.top_p)

    grid_rows = (triton.cdiv(batch, plan.row_block),)
    if not source.pass1(plan, s):
        _reduce_kernel[grid_rows](
            s.stats, s.counts, s.keys_b, s.keys_e, s.rowinfo, s.top_b, s.top_e, batch, plan.pass1_chunks, plan.kth,
            RB=plan.row_block, NCP=plan.pass1_ncp, K=k, CG=plan.chunk_group, NEED_KEYS=plan.need_keys,
            STORE_TOP=s.intersect, VALUE_KEYS=plan.key_kind == 1, DENSE=getattr(source, "dense_kind", 0),
            SLOTS=plan.slots, KB=plan.key_block, **LAUNCH_OPTIONS,
        )
    if s.intersect:
        _intersection_kernel[grid_rows](
            s.top_b, s.top_e, s.rowinfo, rows.alpha, rows.seed, rows.seed_stride, rows.offset, rows.offset_stride,
            s.choice, s.iover, batch, vocab, plan.kth, plan.need, params.score_floor, temperature=temperature,
            top_k=params.top_k, top_p=params.top_p, **rows.temperature_arg, **rows.top_k_p_arg,
            RB=plan.row_block, K=k, EB=plan.inter_block, SAMPLE=plan.sample, USE_TOPK=plan.use_topk,
            USE_TOPP=plan.use_topp, TEMPERED=tempered, **LAUNCH_OPTIONS,
        )
    source.pass2(plan, s, rows, temperature, tempered)
    _finalize_kernel[grid_rows](
        s.rowinfo, s.div, s.best, s.besti, s.keys2, s.mass, s.choice, s.iover,
        rows.potential, rows.alpha, rows.seed, rows.seed_stride, rows.offset, rows.offset_stride,
        tokens, new_potential, spike, current, over,
        batch, nc, vocab, 1.0 - 1.0 / params.tau, params.v_th, params.v_reset, params.rho, temperature=temperature,
        top_k=params.top_k, top_p=params.top_p, **rows.temperature_arg, **rows.top_k_p_arg,
        RB=plan.row_block, NCP=plan.ncp, DIVERGENCE=plan.divergence,
        GATE=int(params.gate), MODE=plan.mode, SAMPLE=plan.sample, USE_TOPK=plan.use_topk, USE_TOPP=plan.use_topp,
        NEED_V0=plan.need_v0, SLOTS=plan.sample_slots, SB=plan.sample_block, TEMPERED=tempered, **LAUNCH_OPTIONS,
    )
    flags_left = plan.may_overflow
    if fallback and plan.may_overflow and plan.sample == 2 and hasattr(source, "sample_fallback"):
        source.sample_fallback(plan, s, rows, params, temperature, tokens, spike, over, tempered)
        flags_left = s.intersect  # spiked intersection rows stay with the caller
    if fallback and flags_left and s.intersect and hasattr(source, "intersection_fallback"):
        # spiked rows whose grown intersection overflowed the buffers: decided on the GPU as well
        source.intersection_fallback(plan, s, rows, params, temperature, tokens, spike, over, tempered)
        flags_left = plan.sample == 2 and not hasattr(source, "sample_fallback")
    return tokens, new_potential, spike, current, (over if flags_left else None)


def select_exact(
    source: PassKernels,
    plan: SelectPlan,
    scratch: Scratch,
    potential: torch.Tensor,
    alpha: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    params: StepParams,
    exact_fallback: bool = True,
    row_temperature: torch.Tensor | None = None,
    row_top_k: torch.Tensor | None = None,
    row_top_p: torch.Tensor | None = None,
) -> Outputs:
    """``launch_select``, then rows the buffers could not decide recomputed with the PyTorch reference.

    The fallback costs one host read of the overflow flags, and only for rows ``launch_select`` left
    flagged: intersection rows of a source without ``intersection_fallback`` (the hidden-state
    path); the logits path decides every flagged row on the GPU and returns no flags.
    ``exact_fallback=False`` skips it (CUDA-graph capture), leaving such rows with the buffer's answer.
    ``row_temperature`` / ``row_top_k`` / ``row_top_p``: [B], each row's own (``RowVectors``; the launch
    must use what they replace).
    """
    rows = RowVectors.of(potential, alpha, seed, offset, row_temperature, row_top_k, row_top_p)
    *outputs, overflow = launch_select(source, plan, scratch, rows, params)
    if overflow is not None and exact_fallback:
        row_ids = torch.nonzero(overflow).flatten()  # the one host synchronisation (hidden path, intersection)
        if row_ids.numel() > 0:
            _recompute_rows(source, row_ids, outputs, potential, alpha, seed, offset, params,
                            (row_temperature, row_top_k, row_top_p))
    return tuple(outputs)


def _recompute_rows(source: PassKernels, row_ids: torch.Tensor, outputs: list[torch.Tensor], potential: torch.Tensor,
                    alpha: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, params: StepParams,
                    per_row: tuple[torch.Tensor | None, ...] = (None, None, None)) -> None:
    """Overwrite `row_ids` of the outputs with the reference (rows are independent of each other);
    ``per_row``: (row_temperature, row_top_k, row_top_p) of the whole batch."""
    seed_rows, offset_rows = seed.reshape(-1), offset.reshape(-1)
    if seed_rows.numel() != 1:
        seed_rows = seed_rows[row_ids]
    if offset_rows.numel() != 1:
        offset_rows = offset_rows[row_ids]
    base_rows, expert_rows = source.row_logits(row_ids)
    exact = guarded_select_reference(
        base_rows, expert_rows, potential[row_ids], alpha[row_ids], seed_rows, offset_rows, params, row_ids=row_ids,
        **{name: None if t is None else t[row_ids]
           for name, t in zip(("row_temperature", "row_top_k", "row_top_p"), per_row)},
    )
    for out, value in zip(outputs, exact):
        out[row_ids] = value
