"""Tile-level Triton helpers of the guarded decode step, shared by every kernel that feeds it.

Pass structure (one decode step; B rows, V vocabulary, chunks of BLOCK_V columns, NC chunks;
RB rows per program in the per-row kernels):

  pass 1  grid (cdiv(B, BB), NC)  per (row block, vocab chunk), reads both logits tiles once:
          chunk max and sum-exp of base and expert, "any NaN/+inf" and "any finite" flags, and --
          when the gate can open -- the chunk's candidates: in union mode the multiset of its kth
          largest values (k-th largest found by bisection on the values' bits, no sorting:
          ``pair_kth_largest`` + ``store_topk_multiset``), in intersection mode the raw (value, id)
          keys of the entries above a group-maxima bound, which hold its top-K list by order key
          (``store_order_candidates``; exact bisection only for rows it cannot decide).
          -> ``pass1_store_tile``
  reduce  grid (cdiv(B, RB),)  per row: log-sum-exp of both rows, validity, the union thresholds
          (the k-th largest of the chunks' multisets, again by bisection: ``slots_kth_largest``),
          the top-K lists (intersection mode: the K-th largest order key by bisection,
          ``slots_kth_key``, then the keys >= it compacted, unsorted).  [launcher._reduce_kernel]
  inter.  grid (cdiv(B, RB),)  intersection mode only: SafeDecoding's grown intersection from the
          two top-K lists (ranks by counting) and the token the row gets *if* it spikes.
          [launcher._intersection_kernel]
  pass 2  grid (cdiv(B, BB), NC)  reads both logits tiles a second time: partial divergence sums
          and, for BOTH possible gate outcomes (unmixed ``p_b`` and the union mixture), either the
          partial arg-max (greedy / plain temperature sampling, Gumbel-max) or the chunk's candidates
          of ``q = max(s, 0)`` above a group-maxima bound (unsorted) plus the partial mass of ``q``
          (top-k / top-p sampling).
          -> ``pass2_store_tile``
  final.  grid (cdiv(B, RB),)  per row: divergence, LIF update, spike, then the token of the gate
          outcome that happened (arg-max reduce, or top-k / top-p thresholds by bisection and
          Gumbel-max over the chunks' candidates, ``slots_sample``).  [launcher._finalize_kernel]

Scratch buffers (all contiguous, written by one pass and read by the next, never read back on the host):

  stats   fp32  [B, NC, 4]     chunk max_b, sumexp_b, max_e, sumexp_e
  counts  int32 [B, NC, 4]     chunk flags (0/1): any bad_b, any finite_b, any bad_e, any finite_e
  keys_b  int32 or int64 [B, NC, SLOTS]  chunk candidates of base logits (keys_e: expert): union
                               mode fp32 bit patterns (unsorted multiset of the chunk's kth largest,
                               absent slots SLOT_NONE); intersection mode int64 raw (value bits, id)
                               keys (absent RAW_NONE), made order keys in place by the reduce
  top_b   int64 [B, K]         intersection mode: each row's top-K order keys, unsorted (top_e: expert)
  rowinfo fp32  [B, 8]         max_b, log(sumexp_b), max_e, log(sumexp_e), thr_b, thr_e, valid, -
  div     fp32  [B, NC, 2]     partial divergence sums (the second one only for Jensen-Shannon)
  best    fp32  [B, 2, NC]     partial arg-max value of outcome 0 (no spike) / 1 (spike, union)
  besti   int32 [B, 2, NC]     its token id
  keys2   int64 [B, 2, NC, S]  chunk candidates of q per outcome, unsorted order keys (top-k / top-p
                               sampling only; S = min(2K, BV), ``store_sample_candidates``)
  mass    fp32  [B, 2, NC, 2]  per outcome: partial sum of q (top-p at T != 1: the log of the partial sum of
                               q^(1/T), ``log_tempered_mass``), certainty floor of the candidates

A *value key* is the int32 whose signed order is the float order (``value_key``); an *order key*
packs a value key and the token id into one int64 whose signed order is "larger float first, then
lower token id", exactly the order ``torch.sort(..., descending=True, stable=True)`` gives. -0.0 is
folded into +0.0 (they compare equal in torch). Absent entries (columns past V) get VALUE_NONE /
KEY_NONE, smaller than any real key (including -inf). Union thresholds need no sorting (bisection
on "dense" keys: the 16 significant bits of bf16 / fp16 logits, all 32 of fp32), nor do the top-k /
top-p thresholds (bisection on value keys of q), nor the intersection's top-K lists (bisection on
order keys, ranks by counting). Only the hidden-state path's pass 1 still keeps a running top-K with
``bitonic_topk`` (its tiles are 64 columns).

All helpers take fp32 tiles ``[BB, BV]`` (cast bf16/fp16 to fp32 *before* calling: bf16 arithmetic
is wrong under TRITON_INTERPRET) together with the int32 token ids of the tile's columns ``[BV]``
and the per-row vectors ``[BB]`` they need, so that a kernel producing logits tile by tile (e.g.
from hidden states and an LM-head weight) can call them directly.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
import triton.language.standard as _tl_standard

KEY_NONE = tl.constexpr(-(2**63))  # absent slot of an int64 order key buffer
VALUE_NONE = tl.constexpr(-(2**31))  # absent slot of an int32 value key buffer
INDEX_NONE = tl.constexpr(2**31 - 1)
# compiled for a GPU (not TRITON_INTERPRET): selects the GPU-only forms of ``exp_shifted``
COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


# ----------------------------------------------------------------------------------------------
# bitonic sort / top-k of integer keys
#
# The same algorithm as tl.sort / tl.topk (triton/language/standard.py), except that the
# compare-and-swap partner is found with a sum over the pair axis instead of an xor-sum: under
# TRITON_INTERPRET the xor-sum has no vectorised path and runs one Python call per element
# (seconds per top-k), while the sum maps to numpy. On a GPU both are the same two-lane shuffle
# reduction. Integer keys only (the sum wraps around, which is exact in two's complement).
# ----------------------------------------------------------------------------------------------


# tl.sum / tl.max are themselves jit functions, and every nested jit call costs the interpreter
# milliseconds; the bitonic network calls the underlying reduction with Triton's own combine
# functions instead (the interpreter maps exactly these to numpy; compiled code is identical).
_SUM = _tl_standard._sum_combine
_MAX = _tl_standard._elementwise_max
_MIN = _tl_standard._elementwise_min


@triton.constexpr_function
def ilog2(i):
    """floor(log2(i)) of a positive constexpr (the exponent of a power of two)."""
    n, log = i, 0
    while n > 1:
        n >>= 1
        log += 1
    return log


@triton.jit
def bitonic_topk(x, K: tl.constexpr, DESCENDING: tl.constexpr):
    """The K largest (DESCENDING) or smallest entries along the last dim of an int tensor, sorted.

    Sizes must be powers of two; K == x.shape[-1] sorts. Written as one flat function because
    the interpreter pays milliseconds per nested jit call.
    """
    log_n: tl.constexpr = ilog2(x.shape[len(x.shape) - 1])
    log_k: tl.constexpr = ilog2(K)
    if log_k == 0:
        if DESCENDING:
            x = tl.reduce(x, len(x.shape) - 1, _MAX, keep_dims=True)
        else:
            x = tl.reduce(x, len(x.shape) - 1, _MIN, keep_dims=True)
    else:
        n_dims: tl.constexpr = ilog2(x.numel)
        h = tl.reshape(x, [2] * n_dims)
        pair = tl.arange(0, 2)
        # bitonic sort of every block of K (alternating directions, the last one final)
        for stage in tl.static_range(1, log_k + 1):
            for step in tl.static_range(stage):
                # compare along the j-th innermost hypercube axis, j = stage - 1 - step (written out:
                # a constexpr cannot be reassigned inside a loop)
                partner = tl.reduce(h, n_dims - stage + step, _SUM, keep_dims=True) - h
                is_right = tl.reshape(pair, [1] * (n_dims - stage + step) + [2] + [1] * (stage - 1 - step))
                if stage < log_n:
                    flip = tl.reshape(pair, [1] * (n_dims - stage - 1) + [2] + [1] * stage)
                else:
                    flip = DESCENDING
                h = tl.where((h > partner) != (flip ^ is_right).to(tl.int1), partner, h)
        # bitonic top-k: keep the better half of each pair of K-blocks, re-merge the halves
        for level in tl.static_range(log_k + 1, log_n + 1):
            if DESCENDING:
                h = tl.reduce(h, ilog2(h.numel) - 1 - log_k, _MAX)
            else:
                h = tl.reduce(h, ilog2(h.numel) - 1 - log_k, _MIN)
            for step in tl.static_range(log_k):
                # j = log_k - 1 - step; the hypercube now has log2(numel) axes
                partner = tl.reduce(h, ilog2(h.numel) - log_k + step, _SUM, keep_dims=True) - h
                is_right = tl.reshape(pair, [1] * (ilog2(h.numel) - log_k + step) + [2] + [1] * (log_k - 1 - step))
                if level < log_n:
                    flip = tl.reshape(pair, [1] * (ilog2(h.numel) - log_k - 1) + [2] + [1] * log_k)
                else:
                    flip = DESCENDING
                h = tl.where((h > partner) != (flip ^ is_right).to(tl.int1), partner, h)
        x = tl.reshape(h, x.shape[:-1] + [K])
    return x


# ----------------------------------------------------------------------------------------------
# order keys
# ----------------------------------------------------------------------------------------------


@triton.jit
def value_key(x):
    """int32 whose signed order is the float order of x (-0.0 folded into +0.0, as torch compares)."""
    x = x + 0.0  # -0.0 + 0.0 == +0.0
    bits = x.to(tl.int32, bitcast=True)
    # flip the magnitude bits of negative floats: signed int32 order then equals float order
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def value_of(key):
    """The fp32 value of an int32 value key (exact inverse of value_key)."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def order_key(x, ids):
    """int64 order key: larger float first, then lower token id (torch's stable descending sort)."""
    return (value_key(x).to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def key_value(key):
    """The fp32 value packed into an order key (exact)."""
    return value_of((key >> 32).to(tl.int32))


@triton.jit
def key_index(key):
    """The token id packed into an order key."""
    return 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def tile_topk_keys(x, ids, mask, K: tl.constexpr, KEYS: tl.constexpr = 2):
    """[BB, K] descending top-K keys of a [BB, BV] tile; masked entries never enter.

    KEYS 1: int32 value keys (enough for value thresholds: half the sorting work);
    KEYS 2: int64 order keys (value and token id, for ranks and candidate lists).
    """
    if KEYS == 1:
        keys = tl.where(mask, value_key(x), VALUE_NONE)
    else:
        keys = tl.where(mask, order_key(x, ids[None, :]), KEY_NONE)
    return bitonic_topk(keys, K, True)


@triton.jit
def merge_topk_keys(a, b, K: tl.constexpr):
    """Top-K of the union of two [BB, K] key sets (both may be unsorted)."""
    both = tl.reshape(tl.join(a, b), [a.shape[0], 2 * K])
    return bitonic_topk(both, K, True)


# ----------------------------------------------------------------------------------------------
# threshold selection (no sorting): the k-th largest key of a row by bisection on its bits
#
# Union candidates need each row's k-th largest logit, not a sorted list. Keys are "dense": the
# 16 significant bits of a bf16 / fp16 logit (16 rounds) or the fp32 value key (32 rounds), so a
# round is one compare and one add per entry plus one reduction; base and expert counts share
# that reduction (packed in the two halves of an int32).
# ----------------------------------------------------------------------------------------------


@triton.jit
def dense_key(x, DENSE: tl.constexpr):
    """int32 key of a fp32 tile whose signed order is the float order, using only the bits the
    storage dtype has: DENSE 0 fp32 (32 bits), 1 bf16 (16 bits), 2 fp16 (16 bits).

    Unlike ``value_key``, -0.0 keeps its own key just below +0.0: thresholds are used as values
    (``x >= thr``), where the two zeros compare equal, so the fold would only cost an add per entry.
    """
    bits = x.to(tl.int32, bitcast=True)
    if DENSE == 1:
        bits = bits >> 16  # the bf16 pattern, sign-extended
    elif DENSE == 2:
        bits = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)  # exact round trip
    return bits ^ ((bits >> 31) & (0x7FFFFFFF if DENSE == 0 else 0x7FFF))


@triton.jit
def dense_to_value_key(key, DENSE: tl.constexpr):
    """The fp32 value key (``value_key``) of the value a dense key stands for (exact inverse)."""
    if DENSE == 1:
        out = (key << 16) | ((key >> 31) & 0xFFFF)
    elif DENSE == 2:
        bits = key ^ ((key >> 31) & 0x7FFF)
        out = value_key(bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))
    else:
        out = key
    return out


KEY_NEG_INF = tl.constexpr(-2139095041)  # value_key(-inf)
KEY_POS_INF = tl.constexpr(2139095040)  # value_key(+inf)


@triton.jit
def _pivot(cand, DENSE: tl.constexpr):
    """The float a candidate dense key stands for, with NaN keys clamped to -inf / +inf so that
    counting ``x >= pivot`` stays monotone in the key."""
    vkey = tl.minimum(tl.maximum(dense_to_value_key(cand, DENSE), KEY_NEG_INF), KEY_POS_INF)
    return value_of(vkey)


@triton.jit
def pair_kth_largest(xb, xe, kth, DENSE: tl.constexpr):
    """Per-row k-th largest of two [R, N] fp32 tiles as dense keys (``dense_key``), by MSB-first
    bisection on the key bits: 16 rounds for bf16 / fp16, 32 for fp32.

    Each round compares every value with the candidate key's float and counts in fp32 (exact below
    2^24; on a GPU one FSET and one FADD per entry, then the row reduction). Masked entries must
    hold -inf; they can only be counted by a candidate <= -inf, where the answer is unchanged
    whenever at least kth entries are present. Returns the largest key t with
    #{x >= value(t)} >= kth; a row with fewer than kth present entries gets a meaningless key
    (callers check the count themselves).
    """
    BITS: tl.constexpr = 32 if DENSE == 0 else 16
    lo: tl.constexpr = -(2 ** (BITS - 1))
    zero = tl.zeros([xb.shape[0]], tl.float32)
    tb = tl.where(tl.sum((xb >= zero[:, None]).to(tl.float32), axis=1) >= kth, 0, lo)
    te = tl.where(tl.sum((xe >= zero[:, None]).to(tl.float32), axis=1) >= kth, 0, lo)
    for i in tl.static_range(BITS - 1):
        cb = tb | (2 ** (BITS - 2 - i))  # (a constexpr cannot be reassigned inside a loop)
        ce = te | (2 ** (BITS - 2 - i))
        cnt_b = tl.sum((xb >= _pivot(cb, DENSE)[:, None]).to(tl.float32), axis=1)
        cnt_e = tl.sum((xe >= _pivot(ce, DENSE)[:, None]).to(tl.float32), axis=1)
        tb = tl.where(cnt_b >= kth, cb, tb)
        te = tl.where(cnt_e >= kth, ce, te)
    return tb, te


SLOT_NONE = tl.constexpr(-1)  # absent slot of a value-multiset buffer: the bits of a negative NaN


@triton.constexpr_function
def bound_groups(n, k):
    """Groups of a row of n columns whose maxima bound its k-th largest: 2k, at least 256, at most n
    (more groups: a tighter bound but more work per bisection round)."""
    return min(n, max(256, 2 * k))


@triton.jit
def pair_group_bound(gb, ge, kth, ROUNDS: tl.constexpr, DENSE: tl.constexpr):
    """Per-row lower bounds (fp32 values) of the k-th largest entries of two tiles, from the [R, G]
    maxima of G groups of each (``tile_group_max``): the k-th largest group maximum, by MSB-first
    bisection on the top ROUNDS bits of its dense key (``dense_key``; 16 = exact for bf16 / fp16).

    The k groups whose maximum is >= the bound each hold an entry >= it, so at least kth entries
    are >= the bound and it is <= the tile's k-th largest; the entries above it are few (about
    1.1 k for values in random order with G >= 4 k, 1.4 k with G = 2 k). A round is one compare
    and add per group maximum and one reduction, shared by base and expert (16-bit halves).
    Rows with fewer than kth groups holding an entry > -inf get -inf or below (a NaN key clamps to
    -inf / +inf, ``_pivot``). Pass 2's sampling bound (all 32 rounds: exact); pass 1 bisects on
    values instead (``pair_value_bound``: fewer rounds for a bound as tight).
    """
    R: tl.constexpr = gb.shape[0]
    BITS: tl.constexpr = 32 if DENSE == 0 else 16
    kb = dense_key(gb, DENSE)
    ke = dense_key(ge, DENSE)
    tb = tl.full([R], -(2 ** (BITS - 1)), tl.int32)
    te = tl.full([R], -(2 ** (BITS - 1)), tl.int32)
    for i in tl.static_range(ROUNDS):
        if i == 0:
            cb = tl.zeros_like(tb)
            ce = tl.zeros_like(te)
        else:
            cb = tb | (2 ** (BITS - 1 - i))  # (a constexpr cannot be reassigned inside a loop)
            ce = te | (2 ** (BITS - 1 - i))
        cnt = tl.sum(tl.where(kb >= cb[:, None], 1, 0) + tl.where(ke >= ce[:, None], 65536, 0), axis=1)
        tb = tl.where((cnt & 0xFFFF) >= kth, cb, tb)
        te = tl.where((cnt >> 16) >= kth, ce, te)
    return _pivot(tb, DENSE), _pivot(te, DENSE)


@triton.jit
def _sign_bit(x):
    """0 / 1: the sign bit of fp32 x."""
    return (x.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)


# rounds of pass 1's bisection on values (``pair_value_bound``): within 1/1024 of the group maxima's
# spread of the exact k-th largest group maximum (8 let heavy-tailed rows overflow 2k slots now and then)
BOUND_ROUNDS = tl.constexpr(10)
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def pair_value_bound(gb, ge, top_b, top_e, kth, ROUNDS: tl.constexpr, THREADS: tl.constexpr = 128):
    """Per-row lower bounds (fp32 values) of the k-th largest entries of two tiles from the [R, G] maxima
    of G groups of each (``tile_group_max``) and the tiles' maxima ``top_b`` / ``top_e`` [R]: the
    largest value t found by ROUNDS rounds of bisection *on values* between the smallest finite group
    maximum and the largest with #{group maxima >= t} >= kth.

    Like ``pair_group_bound`` every bound has kth groups, so kth entries, at or above it, so it is <=
    the tile's k-th largest; it is within (max - min of the group maxima) / 2^ROUNDS of that function's
    exact k-th largest group maximum, whatever the scale and sign of the values (the bisection on
    key bits needs all 16 rounds for that; a round here costs about the same: a subtraction and an
    add per group maximum, one reduction shared by base and expert). Rows with fewer than kth finite
    group maxima get -inf (rows holding NaN / +inf get something meaningless: their chunk is flagged
    bad). A union chunk's fill stays exact: with kth entries >= any bound b, fewer than kth entries
    > b means b is the k-th largest (``store_union_candidates``).
    """
    lo_b = tl.min(tl.where(gb > float("-inf"), gb, float("inf")), axis=1)
    lo_e = tl.min(tl.where(ge > float("-inf"), ge, float("inf")), axis=1)
    cnt = tl.sum(tl.where(gb >= lo_b[:, None], 1, 0) + tl.where(ge >= lo_e[:, None], 65536, 0), axis=1)
    lo_b = tl.where((cnt & 0xFFFF) >= kth, lo_b, float("-inf"))
    lo_e = tl.where((cnt >> 16) >= kth, lo_e, float("-inf"))
    # the step halves every round; a row left at -inf steps by 0 (lo + step stays -inf); (no overflow at
    # +-3e38, and no -inf - -inf for numpy to warn about)
    live_b = lo_b > float("-inf")
    live_e = lo_e > float("-inf")
    step_b = 0.5 * tl.where(live_b, top_b, 0.0) - 0.5 * tl.where(live_b, lo_b, 0.0)
    step_e = 0.5 * tl.where(live_e, top_e, 0.0) - 0.5 * tl.where(live_e, lo_e, 0.0)
    R: tl.constexpr = gb.shape[0]
    G: tl.constexpr = gb.shape[1]
    SPLIT: tl.constexpr = _thread_split(G, THREADS)
    most_below = G - kth  # a candidate keeps kth maxima at or above it iff at most G - kth lie below
    for _ in tl.static_range(ROUNDS):
        mid_b = lo_b + step_b
        mid_e = lo_e + step_e
        if not COMPILED:
            # g - mid is inf - inf only at mid = -inf (a row left at -inf: it stays there whatever the
            # count) or +inf (a bad row); numpy warns about it, so the interpreter clamps mid finite
            mid_b = tl.minimum(tl.maximum(mid_b, -FLT_MAX), FLT_MAX)
            mid_e = tl.minimum(tl.maximum(mid_e, -FLT_MAX), FLT_MAX)
        # #{g < mid} as the sign bits of g - mid (a subtraction and an add an entry; no compare and
        # select): never more than the true count (-0.0 - +0.0 and (-inf) - (-inf) may set it), so
        # G - it never overstates #{g >= mid} and every accepted mid stays a valid bound
        # (summed inside each thread first, base and expert apart, then packed for one reduction)
        in_b = tl.sum(tl.reshape(_sign_bit(gb - mid_b[:, None]), [R, SPLIT[0], SPLIT[1]]), axis=1)
        in_e = tl.sum(tl.reshape(_sign_bit(ge - mid_e[:, None]), [R, SPLIT[0], SPLIT[1]]), axis=1)
        below = tl.sum(in_b + (in_e << 16), axis=1)
        lo_b = tl.where((below & 0xFFFF) <= most_below, mid_b, lo_b)
        lo_e = tl.where((below >> 16) <= most_below, mid_e, lo_e)
        step_b = step_b * 0.5
        step_e = step_e * 0.5
    return lo_b, lo_e


@triton.constexpr_function
def _thread_split(n, threads):
    """(A, T) with A * T = n: the [A, T] view of a row in which GPU thread t owns columns t, t + T,
    ... (the layout of a row loaded one element per thread by `threads` threads, ``_load_tile``'s
    SCALAR). Correctness never depends on it, only the instruction count does."""
    t = min(threads, n)
    return (n // t, t)


@triton.jit
def tile_group_max(x, G: tl.constexpr):
    """[R, G] maxima of the G strided groups of a [R, N] tile: group j holds columns j, j + G, ...
    (thread-local in the one-element-per-thread layout when G is a multiple of the thread count;
    strided groups keep sorted runs of columns apart)."""
    R: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    return tl.max(tl.reshape(x, [R, N // G, G]), axis=1)


@triton.jit
def compaction_slots(flags, THREADS: tl.constexpr):
    """(position [R, N], count [R]) of the set entries of a [R, N] 0/1 int32 tile: the set entries
    of a row get distinct positions 0 .. count - 1 (the others meaningless ones), in thread-major
    order of the [A, T] view (``_thread_split``): a sequential sum inside each thread, then one scan
    over the T thread totals, instead of a scan over the whole row."""
    R: tl.constexpr = flags.shape[0]
    N: tl.constexpr = flags.shape[1]
    SPLIT: tl.constexpr = _thread_split(N, THREADS)
    f = tl.reshape(flags, [R, SPLIT[0], SPLIT[1]])
    in_thread = tl.cumsum(f, axis=1)
    thread_total = tl.sum(f, axis=1)
    before_thread = tl.cumsum(thread_total, axis=1) - thread_total
    pos = before_thread[:, None, :] + in_thread - 1
    return tl.reshape(pos, [R, N]), tl.sum(thread_total, axis=1)


@triton.jit
def store_union_candidates(ptr, base, row_mask, x, bound, kth, SLOTS: tl.constexpr, THREADS: tl.constexpr = 128):
    """Write a sub-multiset of a tile's values that holds its kth largest values to SLOTS fp32
    slots per row, unsorted: the entries > bound (compacted, ``compaction_slots``), then copies of
    bound up to kth slots, the rest SLOT_NONE. Returns [R] "written": false for rows past the batch
    and for rows with more than SLOTS entries > bound (they write nothing; the caller decides them).

    bound: [R] with at least kth entries >= it (``pair_value_bound``). If kth or more entries
    exceed it, the kth largest are among them; if fewer do, bound is the kth largest value itself
    and the copies complete the multiset. The reduce's k-th largest over all chunks' slots is then
    the row's k-th largest: extra values below a chunk's own kth largest never reach the row's.
    """
    gt = x > bound[:, None]
    pos, n_gt = compaction_slots(gt.to(tl.int32), THREADS)
    written = row_mask & (n_gt <= SLOTS)
    row_ptr = ptr + base
    tl.store(row_ptr[:, None] + pos, x.to(tl.int32, bitcast=True), mask=gt & written[:, None])
    slot = tl.arange(0, SLOTS)[None, :]
    fill = tl.where(slot < kth, bound.to(tl.int32, bitcast=True)[:, None], SLOT_NONE)
    tl.store(row_ptr[:, None] + slot, fill, mask=written[:, None] & (slot >= n_gt[:, None]))
    return written


@triton.jit
def store_topk_multiset(ptr, base, row_mask, x, t, few, kth, DENSE: tl.constexpr, K: tl.constexpr,
                        THREADS: tl.constexpr = 128):
    """Write the multiset of a tile's kth largest values to K fp32 slots per row, unsorted, without
    sorting: slots [0, n_gt) get the values above the k-th largest (compacted by a prefix sum),
    [n_gt, kth) copies of it, the rest SLOT_NONE (n_gt < kth <= K by the choice of t).

    x: [R, N] fp32 (masked entries -inf); t: [R] dense key of the k-th largest
    (``pair_kth_largest``); few: [R] rows with fewer than kth entries, which write every entry
    instead (as many as fit; masked columns then add -infs, which cannot change a k-th largest).
    The comparison is on values, like the bisection's counts: x > value(t) is x >= value(t + 1)
    for values of the storage dtype.
    """
    p_ge = tl.where(few, float("-inf"), _pivot(t + 1, DENSE))
    p_ge = tl.where(row_mask, p_ge, float("nan"))  # rows past the batch write nothing
    gt = x >= p_ge[:, None]
    pos, n_gt = compaction_slots(gt.to(tl.int32), THREADS)
    # the bound only matters for a short chunk's masked columns (and for rows holding NaN / +inf)
    pos = tl.minimum(pos, K - 1)
    row_ptr = ptr + base
    tl.store(row_ptr[:, None] + pos, x.to(tl.int32, bitcast=True), mask=gt)
    slot = tl.arange(0, K)[None, :]
    t_bits = _pivot(t, DENSE).to(tl.int32, bitcast=True)
    fill = tl.where(slot < kth, t_bits[:, None], SLOT_NONE)
    tl.store(row_ptr[:, None] + slot, fill, mask=row_mask[:, None] & (slot >= n_gt[:, None]))


@triton.jit
def _slot_keys(bits, DENSE: tl.constexpr):
    """Dense keys of fp32 slot bit patterns; SLOT_NONE becomes VALUE_NONE (below every key)."""
    return tl.where(bits == SLOT_NONE, VALUE_NONE, dense_key(bits.to(tl.float32, bitcast=True), DENSE))


@triton.jit
def slots_kth_largest(ptr, row_base, row_mask, n_slots, kth, N: tl.constexpr, LOOP: tl.constexpr,
                      DENSE: tl.constexpr):
    """[R] k-th largest value of each row's ``n_slots`` consecutive fp32 slots (absent: SLOT_NONE),
    by bisection on their dense keys (16 or 32 rounds, ``dense_key``). N slots are read per step;
    LOOP re-reads them in steps of N every round (rows with more than N slots), else one load
    serves every round."""
    BITS: tl.constexpr = 32 if DENSE == 0 else 16
    R: tl.constexpr = row_base.shape[0]
    idx = tl.arange(0, N)
    t = tl.full([R], -(2 ** (BITS - 1)), tl.int32)
    if not LOOP:
        keys = _slot_keys(tl.load(ptr + row_base[:, None] + idx[None, :],
                                  mask=row_mask[:, None] & (idx < n_slots)[None, :], other=SLOT_NONE), DENSE)
    for i in tl.static_range(BITS):
        if i == 0:
            cand = tl.zeros_like(t)
        else:
            cand = t | (2 ** (BITS - 1 - i))
        if LOOP:
            cnt = tl.zeros_like(t)
            for start in range(0, n_slots, N):
                keys = _slot_keys(tl.load(ptr + row_base[:, None] + start + idx[None, :],
                                          mask=row_mask[:, None] & ((start + idx) < n_slots)[None, :],
                                          other=SLOT_NONE), DENSE)
                cnt += tl.sum(tl.where(keys >= cand[:, None], 1, 0), axis=1)
        else:
            cnt = tl.sum(tl.where(keys >= cand[:, None], 1, 0), axis=1)
        t = tl.where(cnt >= kth, cand, t)
    return value_of(dense_to_value_key(t, DENSE))


# ----------------------------------------------------------------------------------------------
# threshold selection on int64 order keys (intersection mode: ranks need the token id as well)
#
# Order keys are unique (they hold the token id), so "every key >= the k-th largest" is exactly the
# top-k list of a row, ties broken as torch's stable sort does. The k-th largest comes from a
# 64-round MSB-first bisection (a runtime loop: one copy of the round's code); a row's list is then
# built by comparison and compaction, never by sorting.
# ----------------------------------------------------------------------------------------------


RAW_NONE = tl.constexpr(-1)  # absent slot of a raw (value bits, id) buffer: a NaN with an impossible id


@triton.jit
def raw_key(x, ids):
    """int64 (fp32 bits of x, token id) as pass 1 stores candidates: no arithmetic on the values,
    which the reduce turns into order keys once per stored slot (``raw_to_order_keys``)."""
    return (x.to(tl.int32, bitcast=True).to(tl.int64) << 32) | ids.to(tl.uint32).to(tl.int64)


@triton.jit
def _raw_block_to_order_keys(ptr, row_base, row_mask, n_slots, start, N: tl.constexpr):
    idx = tl.arange(0, N)
    at = ptr + row_base[:, None] + start + idx[None, :]
    mask = row_mask[:, None] & ((start + idx) < n_slots)[None, :]
    raw = tl.load(at, mask=mask, other=RAW_NONE)
    x = (raw >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    keys = order_key(x, (raw & 0x7FFFFFFF).to(tl.int32))
    tl.store(at, tl.where(raw == RAW_NONE, KEY_NONE, keys), mask=mask)


@triton.jit
def raw_to_order_keys(ptr, row_base, row_mask, n_slots, N: tl.constexpr, LOOP: tl.constexpr):
    """Rewrite each row's ``n_slots`` raw keys (``raw_key``; absent RAW_NONE) in place as order keys
    (``order_key``; absent KEY_NONE), N per step (LOOP; else one step covers them). Other threads of
    the program read them next: callers put a barrier after it."""
    if LOOP:
        for start in range(0, n_slots, N):
            _raw_block_to_order_keys(ptr, row_base, row_mask, n_slots, start, N)
    else:
        _raw_block_to_order_keys(ptr, row_base, row_mask, n_slots, 0, N)


@triton.jit
def _key_candidate(t, i):
    """Round i of an MSB-first bisection on signed int64 keys: 0 first, then t with bit 62 - (i - 1) set."""
    bit = tl.full(t.shape, 1, tl.int64) << (63 - i)
    return tl.where(i == 0, tl.zeros_like(t), t | bit)


@triton.jit
def tile_kth_key(keys, kth):
    """[R] k-th largest of the int64 order keys of a [R, N] tile (absent entries KEY_NONE); a row with
    fewer than kth present keys gets KEY_NONE, so that ``keys >= it`` then keeps every present key."""
    t = tl.full([keys.shape[0]], KEY_NONE, tl.int64)
    for i in range(64):
        cand = _key_candidate(t, i)
        t = tl.where(tl.sum((keys >= cand[:, None]).to(tl.int32), axis=1) >= kth, cand, t)
    return t


@triton.jit
def slots_kth_key(ptr, row_base, row_mask, n_slots, kth, N: tl.constexpr, LOOP: tl.constexpr):
    """``tile_kth_key`` over each row's ``n_slots`` consecutive int64 slots (absent: KEY_NONE), N slots
    per load; LOOP re-reads them every round (rows with more than N slots), else one load serves all."""
    R: tl.constexpr = row_base.shape[0]
    if LOOP:
        t = tl.full([R], KEY_NONE, tl.int64)
        for i in range(64):
            cand = _key_candidate(t, i)
            cnt = tl.zeros([R], tl.int32)
            for start in range(0, n_slots, N):
                keys = _load_slot_keys(ptr, row_base, row_mask, n_slots, start, N)
                cnt += tl.sum((keys >= cand[:, None]).to(tl.int32), axis=1)
            t = tl.where(cnt >= kth, cand, t)
    else:
        t = tile_kth_key(_load_slot_keys(ptr, row_base, row_mask, n_slots, 0, N), kth)
    return t


@triton.jit
def _compact_block(ptr, row_base, row_mask, n_slots, start, thr, out_ptr, out_base, count, K: tl.constexpr,
                   N: tl.constexpr, THREADS: tl.constexpr):
    keys = _load_slot_keys(ptr, row_base, row_mask, n_slots, start, N)
    take = (keys >= thr[:, None]) & (keys != KEY_NONE)
    pos, n_taken = compaction_slots(take.to(tl.int32), THREADS)
    pos = count[:, None] + pos
    tl.store(out_ptr + out_base[:, None] + pos, keys, mask=take & (pos < K) & row_mask[:, None])
    return count + n_taken


@triton.jit
def compact_top_keys(ptr, row_base, row_mask, n_slots, thr, out_ptr, out_base, K: tl.constexpr, N: tl.constexpr,
                     LOOP: tl.constexpr, THREADS: tl.constexpr = 128):
    """Copy each row's slots holding a key >= thr (its top-K list: at most K unique keys) to K
    consecutive entries at out_ptr + out_base, unsorted, the rest KEY_NONE; N slots per step (LOOP;
    else one step covers them)."""
    R: tl.constexpr = row_base.shape[0]
    count = tl.zeros([R], tl.int32)
    if LOOP:
        for start in range(0, n_slots, N):
            count = _compact_block(ptr, row_base, row_mask, n_slots, start, thr, out_ptr, out_base, count, K, N,
                                   THREADS)
    else:
        count = _compact_block(ptr, row_base, row_mask, n_slots, 0, thr, out_ptr, out_base, count, K, N, THREADS)
    slot = tl.arange(0, K)[None, :]
    tl.store(out_ptr + out_base[:, None] + slot, tl.full([R, K], KEY_NONE, tl.int64),
             mask=row_mask[:, None] & (slot >= count[:, None]))


@triton.jit
def store_raw_candidates(ptr, base, write, x, ids, take, SLOTS: tl.constexpr, THREADS: tl.constexpr = 128):
    """Write the raw (value, id) keys (``raw_key``) of the ``take`` entries of a tile to SLOTS int64
    slots per row, unsorted (compacted, ``compaction_slots``), the rest RAW_NONE. Returns [R]
    "written": the rows of ``write`` with at most SLOTS such entries (the others write nothing)."""
    pos, n_taken = compaction_slots(take.to(tl.int32), THREADS)
    written = write & (n_taken <= SLOTS)
    row_ptr = ptr + base
    tl.store(row_ptr[:, None] + pos, raw_key(x, ids[None, :]), mask=take & written[:, None])
    slot = tl.arange(0, SLOTS)[None, :]
    tl.store(row_ptr[:, None] + slot, tl.full([x.shape[0], SLOTS], RAW_NONE, tl.int64),
             mask=written[:, None] & (slot >= n_taken[:, None]))
    return written


@triton.jit
def store_order_candidates(ptr, base, row_mask, x, ids, bound, SLOTS: tl.constexpr, THREADS: tl.constexpr = 128):
    """``store_raw_candidates`` of a tile's entries >= bound; false for rows past the batch, rows
    whose bound is -inf and rows with more than SLOTS such entries.

    bound: [R] at most the tile's k-th largest value (``pair_value_bound``), so the entries >= it
    hold the tile's top-k list by order key, ties at the k-th value included. The columns past the
    vocabulary hold -inf, below any bound > -inf, so no column mask is needed (it cost 4 instructions
    a logit on sm_90: its predicates crowd the compaction's). A row whose bound is -inf (a chunk
    with fewer than k finite group maxima: a last chunk of fewer than k columns, a row masked to
    -inf almost everywhere) is left to the caller's exact path, which masks the columns."""
    return store_raw_candidates(ptr, base, row_mask & (bound > float("-inf")), x, ids, x >= bound[:, None], SLOTS,
                                THREADS)


@triton.jit
def store_topk_order_keys(ptr, base, write, x, ids, mask, kth, SLOTS: tl.constexpr, THREADS: tl.constexpr = 128):
    """The exact form of ``store_order_candidates`` for the rows in ``write``: the tile's top-kth
    order keys (kth <= SLOTS, so every such row is written), found by bisection (``tile_kth_key``)
    over every entry."""
    keys = tl.where(mask, order_key(x, ids[None, :]), KEY_NONE)
    take = (keys >= tile_kth_key(keys, kth)[:, None]) & (keys != KEY_NONE)
    store_raw_candidates(ptr, base, write, x, ids, take, SLOTS, THREADS)


# ----------------------------------------------------------------------------------------------
# statistics and probabilities
# ----------------------------------------------------------------------------------------------


@triton.jit
def tile_stats(x, mask):
    """Per-row (max, sum exp(x - max), any NaN-or-+inf (0/1), any finite (0/1)) of a [BB, BV] tile.

    Bad entries are left out of max and sum so that the arithmetic of a row stays finite; the row
    is declared invalid from the flags later. Masked entries must hold -inf (weight 0). One
    comparison per entry finds the bad ones (``x < inf`` is false exactly for NaN and +inf), and
    "any finite" is "max > -inf": two reductions per tile, not four.
    """
    ok = x < float("inf")
    xs = tl.where(ok, x, float("-inf"))
    m = tl.max(xs, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.exp(xs - m_safe[:, None]), axis=1)  # exp(-inf) = 0: no select needed
    bad = tl.max(tl.where(mask & ~ok, 1, 0), axis=1)
    return m, s, bad, (m > float("-inf")).to(tl.int32)


@triton.jit
def exp_shifted(x, m):
    """exp(x - m) for x <= m. Compiled: exp2((x - m) log2(e)), which is what ``tl.exp`` compiles to
    (FMUL + MUFU.EX2) minus its fix-up for results below 2^-126 (flushed to 0 here: nothing in a sum
    of terms up to 1); interpreted: ``tl.exp``, exact like the reference."""
    if COMPILED:
        out = tl.exp2((x - m) * 1.4426950408889634)
    else:
        out = tl.exp(x - m)
    return out


@triton.jit
def tile_stats_of_max(x, group_max):
    """``tile_stats`` from the tile's [R, G] group maxima (any grouping, G = 1 included), with
    fewer operations per entry: (max, sum exp(x - max), any NaN-or-+inf (0/1), any finite (0/1)).

    Bad entries are not filtered out: each makes the sum NaN (NaN - m, or +inf - +inf with the max
    +inf), so one test of the sum per row finds them, and such a chunk's max / sum are then
    meaningless (its row is invalid whatever they are). Masked entries must hold -inf.
    """
    m = tl.max(group_max, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(exp_shifted(x, m_safe[:, None]), axis=1)  # exp(-inf) = 0: no select needed
    return m, s, (s != s).to(tl.int32), (m > float("-inf")).to(tl.int32)


@triton.jit
def tile_log_probs(x, row_max, row_log_sum):
    """log_softmax of a tile given the row's max and log(sum exp(x - max)); same order of operations
    as torch's CPU log_softmax, ``(x - max) - log_sum``."""
    log_p = (x - row_max[:, None]) - row_log_sum[:, None]
    return log_p, tl.exp(log_p)


@triton.jit
def tile_divergence_terms(log_pb, pb, log_pe, pe, DIVERGENCE: tl.constexpr):
    """Per-row partial sums (first, second) of the divergence; see reference.divergence_between.

    TV: (sum |pb - pe|, 0) -> 0.5 * first; KL: (sum pb (log pb - log pe), 0) -> first;
    JS: (sum pb (log pb - log m), sum pe (log pe - log m)) -> 0.5 * (first + second).
    """
    if DIVERGENCE == 0:
        first = tl.sum(tl.abs(pb - pe), axis=1)
        second = tl.zeros_like(first)
    elif DIVERGENCE == 1:
        first = tl.sum(tl.where(pb > 0, pb * (log_pb - log_pe), 0.0), axis=1)
        second = tl.zeros_like(first)
    else:
        log_m = tl.log(0.5 * (pb + pe))
        first = tl.sum(tl.where(pb > 0, pb * (log_pb - log_m), 0.0), axis=1)
        second = tl.sum(tl.where(pe > 0, pe * (log_pe - log_m), 0.0), axis=1)
    return first, second


@triton.jit
def tile_union_scores(lb, le, pb, pe, alpha, thr_b, thr_e):
    """Scores of a spiked row in union mode: p_b + alpha (p_e - p_b) on C, p_b elsewhere."""
    in_set = (lb >= thr_b[:, None]) | (le >= thr_e[:, None])
    mixed = pb + alpha[:, None] * (pe - pb)
    return tl.where(in_set, mixed, pb)


# ----------------------------------------------------------------------------------------------
# token choice
# ----------------------------------------------------------------------------------------------


@triton.jit
def _philox_words(groups, seed, offset, row):
    """The four Philox4x32-10 output words for counter (groups, offset lo, offset hi, row) and
    key (seed lo, seed hi); every argument broadcasts to groups' shape."""
    zero = tl.zeros(groups.shape, tl.uint32)
    c0 = groups.to(tl.uint32) + zero
    c1 = (offset & 0xFFFFFFFF).to(tl.uint32) + zero
    c2 = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32) + zero
    c3 = row.to(tl.uint32) + zero
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32) + zero
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32) + zero
    return tl.philox_impl(c0, c1, c2, c3, k0, k1, 10)


@triton.jit
def _uniform_of(word):
    return ((word >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


@triton.jit
def philox_uniform(ids, seed, offset, row):
    """The uniforms of ngsd_kernels/philox.py, bit for bit: u in (0, 1), exact in fp32.

    ids: int32 token ids >= 0 (any shape); seed, offset: int64, row: the row's index in its batch,
    each with a shape that broadcasts to ids. Token i reads word i & 3 of the call with counter
    (i >> 2, offset lo, offset hi, row), key (seed lo, seed hi); u = ((word >> 9) + 0.5) 2^-23.
    For a whole span of consecutive tokens ``philox_gumbel_span`` makes a quarter of the calls.
    """
    x0, x1, x2, x3 = _philox_words(ids >> 2, seed, offset, row)
    w = ids & 3
    return _uniform_of(tl.where(w == 0, x0, tl.where(w == 1, x1, tl.where(w == 2, x2, x3))))


@triton.jit
def philox_gumbel(ids, seed, offset, row):
    """Gumbel noise -log(-log(u)) from ``philox_uniform`` (same formula as the reference)."""
    return -tl.log(-tl.log(philox_uniform(ids, seed, offset, row)))


@triton.jit
def philox_gumbel_span(first, seed, offset, rows, N: tl.constexpr):
    """[R, N] Gumbel noise of tokens first .. first + N - 1 for rows [R] (seed, offset: [R] int64):
    the same numbers as ``philox_gumbel``, from one Philox call per four tokens (first and N
    multiples of 4; other spans fall back to one call per token)."""
    R: tl.constexpr = rows.shape[0]
    if N % 4 == 0:
        groups = first // 4 + tl.arange(0, N // 4)
        x0, x1, x2, x3 = _philox_words(groups[None, :], seed[:, None], offset[:, None], rows[:, None])
        # join(join(x0, x2), join(x1, x3)) is [R, N/4, 2, 2] holding x0, x1, x2, x3 in row-major order
        words = tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), [R, N])
        out = -tl.log(-tl.log(_uniform_of(words)))
    else:
        ids = first + tl.arange(0, N)
        out = philox_gumbel(ids[None, :] + tl.zeros([R, 1], tl.int32), seed[:, None], offset[:, None], rows[:, None])
    return out


@triton.jit
def tile_argmax(values, ids, mask):
    """Per-row (max value, lowest token id holding it) of a [BB, BV] tile; masked entries never win."""
    v = tl.where(mask, values, float("-inf"))
    best = tl.max(v, axis=1)
    hit = mask & (v == best[:, None])
    return best, tl.min(tl.where(hit, ids[None, :], INDEX_NONE), axis=1)


@triton.jit
def rows_temperature(temperature, row_temperature_ptr, rows, row_mask, ROW_T: tl.constexpr):
    """The temperature a launch's rows sample at: the launch's scalar, or -- ROW_T: ``row_temperature_ptr``
    holds fp32 [B] -- each row's own, as [R, 1] (a row at T <= 0 decodes greedily: ``by_temperature``).
    Without ROW_T the pointer is never read (the launcher passes any tensor; the AOT build alpha's)."""
    out = rows_value(temperature, row_temperature_ptr, rows, row_mask, ROW_T)
    if ROW_T:
        out = out[:, None]
    return out


@triton.jit
def rows_value(value, ptr, rows, row_mask, PER_ROW: tl.constexpr):
    """The launch's scalar ``value`` (top-k, top-p), or -- PER_ROW -- each row's own from ``ptr`` ([R]);
    without PER_ROW the pointer is never read."""
    if not PER_ROW:
        out = value
    else:
        out = tl.load(ptr + rows, mask=row_mask, other=value)
    return out


@triton.jit
def by_temperature(scores, log_q, gumbel, temperature, PER_ROW: tl.constexpr):
    """log_q / T + gumbel, the Gumbel-max values; with PER_ROW temperatures ([R, 1]) a row at T <= 0 gets
    its greedy ``scores`` instead (same arg-max rule: the largest, then the lowest id)."""
    if PER_ROW:
        sampled = temperature > 0.0
        out = tl.where(sampled, log_q / tl.where(sampled, temperature, 1.0) + gumbel, scores)
    else:
        out = log_q / temperature + gumbel
    return out


@triton.jit
def tile_choice_values(scores, gumbel, temperature, SAMPLE: tl.constexpr, PER_ROW: tl.constexpr = False):
    """What the arg-max runs over: the scores (greedy) or log(max(s, 0)) / T + Gumbel noise
    (``by_temperature``: T a scalar, or [R, 1] PER_ROW)."""
    if SAMPLE == 0:
        out = scores
    else:
        out = by_temperature(scores, tl.log(tl.maximum(scores, 0.0)), gumbel, temperature, PER_ROW)
    return out


@triton.jit
def _load_slot_keys(ptr, row_base, row_mask, n_slots, start, N: tl.constexpr):
    idx = start + tl.arange(0, N)
    return tl.load(ptr + row_base[:, None] + idx[None, :], mask=row_mask[:, None] & (idx < n_slots)[None, :],
                   other=KEY_NONE)


@triton.jit
def tempered_weights(q, t, m):
    """q^(1/T) relative to the row's largest, as ``reference.tempered_weights`` computes it: exp(log(q) / t - m)
    where q > 0, else 0. q: [R, N] >= 0; t: a scalar or [R, 1] (> 0); m: [R], the row's largest log(q) / t."""
    positive = q > 0.0
    return tl.where(positive, tl.exp(tl.log(tl.where(positive, q, 1.0)) / t - m[:, None]), 0.0)


@triton.jit
def top_p_weights(q, kth_q, temperature, top, TEMPERED: tl.constexpr):
    """What top-p measures of the q kept by top-k (q > 0 and q >= kth_q; the others 0): q itself, or TEMPERED
    q^(1/T) relative to the row's largest (``tempered_weights``; top: its largest log(q) / T)."""
    kept = (q > 0.0) & (q >= kth_q[:, None])
    if TEMPERED:
        out = tl.where(kept, tempered_weights(q, temperature, top), 0.0)
    else:
        out = tl.where(kept, q, 0.0)
    return out


@triton.jit
def kept_log_max(q, kth_q, t):
    """Per row of a [R, N] tile of q >= 0: the largest log(q) / t over the q that top-k keeps (q > 0 and
    q >= kth_q), -inf where it keeps none: the scale of ``tempered_weights``; t a scalar or [R, 1] (> 0)."""
    kept = (q > 0.0) & (q >= kth_q[:, None])
    return tl.max(tl.where(kept, tl.log(tl.where(kept, q, 1.0)) / t, float("-inf")), axis=1)


@triton.jit
def log_tempered_mass(q, t):
    """Per row of a [R, N] tile of q >= 0: log(sum of q^(1/t) over q > 0), -inf when no q is positive. A sum
    of logs, so no temperature overflows it and chunks combine without knowing the row's largest q
    (``combine_log_masses``); t: a scalar or [R, 1] (> 0)."""
    positive = q > 0.0
    scaled = tl.where(positive, tl.log(tl.where(positive, q, 1.0)) / t, float("-inf"))
    top = tl.max(scaled, axis=1)
    shift = tl.where(top > float("-inf"), top, 0.0)
    return shift + tl.log(tl.sum(tl.exp(scaled - shift[:, None]), axis=1))


@triton.jit
def log_tempered_mass_below(log_q, log_top, t):
    """``log_tempered_mass`` from log(q) [R, N] (-inf: q = 0) and the row's largest log(q), log_top [R] (known
    beforehand: no maximum to find, and the terms are at most 1, so none overflows); t a scalar or [R, 1]."""
    shift = log_top[:, None] / t
    return tl.log(tl.sum(tl.exp(log_q / t - shift), axis=1)) + tl.max(shift, axis=1)


@triton.jit
def combine_log_masses(logs):
    """log(sum(exp(logs))) along the last axis of [R, C] (-inf entries: empty chunks)."""
    top = tl.max(logs, axis=1)
    shift = tl.where(top > float("-inf"), top, 0.0)
    return shift + tl.log(tl.sum(tl.exp(logs - shift[:, None]), axis=1))


@triton.jit
def positive_temperature(temperature, PER_ROW: tl.constexpr):
    """The temperature top-p tempers q with: a per-row [R, 1] temperature of a greedy row (T <= 0) read as 1
    (such a row takes its arg-max, ``by_temperature``, which top-k and top-p always keep)."""
    if PER_ROW:
        out = tl.where(temperature > 0.0, temperature, 1.0)
    else:
        out = temperature
    return out


@triton.jit
def _slot_stat(keys, kth_q, at, WHAT: tl.constexpr, t=1.0):
    """Per-row statistic of a [R, N] block of candidate order keys; kept: q > 0 and q >= kth_q.
    WHAT 0: #{kept q >= at}; 1: max log(q) / t over the kept q (-inf: none)."""
    q = tl.where(keys != KEY_NONE, key_value(keys), 0.0)
    if WHAT == 0:
        out = tl.sum((tl.where((q > 0.0) & (q >= kth_q[:, None]), q, 0.0) >= at[:, None]).to(tl.float32), axis=1)
    else:
        out = kept_log_max(q, kth_q, t)
    return out


@triton.jit
def _slots_stat(ptr, row_base, row_mask, n_slots, keys, kth_q, at, WHAT: tl.constexpr, N: tl.constexpr,
                LOOP: tl.constexpr, t=1.0):
    """``_slot_stat`` over all of a row's slots: the preloaded ``keys`` block, or (LOOP) N at a time."""
    if LOOP:
        if WHAT == 0:
            out = tl.zeros_like(at)
        else:
            out = tl.full(at.shape, float("-inf"), tl.float32)
        for start in range(0, n_slots, N):
            part = _slot_stat(_load_slot_keys(ptr, row_base, row_mask, n_slots, start, N), kth_q, at, WHAT, t)
            if WHAT == 0:
                out += part
            else:
                out = tl.maximum(out, part)
    else:
        out = _slot_stat(keys, kth_q, at, WHAT, t)
    return out


@triton.jit
def fold_gumbel_max(q, keep, ids, seed, offset, rows, temperature, best, best_id, PER_ROW: tl.constexpr = False):
    """One block of a Gumbel-max draw folded into the running (best [R], best_id [R]): the kept
    entries' log(q) / T + the reference's Gumbel noise of their token ids (``philox_gumbel``);
    equal maxima keep the lowest id, whatever order the blocks come in. q, keep: [R, N]; ids:
    [R, N] or [1, N]; seed, offset, rows: [R]; temperature: a scalar, or [R, 1] PER_ROW (a row at
    T <= 0 takes the largest q: ``by_temperature``)."""
    gumbel = philox_gumbel(ids, seed[:, None], offset[:, None], rows[:, None])
    values = by_temperature(q, tl.log(tl.where(keep, q, 1.0)), gumbel, temperature, PER_ROW)
    perturbed = tl.where(keep, values, float("-inf"))
    block_best = tl.max(perturbed, axis=1)
    block_id = tl.min(tl.where(keep & (perturbed == block_best[:, None]), ids, INDEX_NONE), axis=1)
    best_id = tl.where(block_best > best, block_id,
                       tl.where(block_best == best, tl.minimum(best_id, block_id), best_id))
    return tl.maximum(best, block_best), best_id


@triton.jit
def slots_sample(
    ptr, row_base, row_mask, n_slots, total_mass, floor, seed, offset, rows, temperature, top_k, top_p,
    USE_TOPK: tl.constexpr, USE_TOPP: tl.constexpr, N: tl.constexpr, LOOP: tl.constexpr, PER_ROW: tl.constexpr = False,
    TEMPERED: tl.constexpr = False, weights_ptr=0, weights_base=0,
):
    """Top-k / top-p filtering and the Gumbel-max draw over a row's unsorted candidate order keys
    (``store_sample_candidates``), with no sorting: the rules of reference.sampling_mask by MSB-first
    bisection on value keys, as ``fused_select._sample_fallback_kernel`` does over a whole row.

    ptr + row_base: each row's ``n_slots`` keys (KEY_NONE: absent), read N at a time (LOOP) or at once;
    total_mass: [R] sum of q over the whole row (the top-p normaliser without top-k; TEMPERED: the log of
    the sum of q^(1/T), ``log_tempered_mass``); floor: [R] the largest certainty floor of the row's chunks
    (every token with q >= floor is a candidate). TEMPERED: top-p reads q^(1/T), as the reference does
    (``reference.tempered_weights``), else q itself (T = 1). With top-p and LOOP the candidates' weights are
    computed once and kept as fp32 at weights_ptr + weights_base ([R]; n_slots each), which the bisection
    rounds read instead of the keys.
    Returns (token [R] int32, overflow [R] bool): overflow when a threshold fell below the floor, where
    tokens that are not candidates could change the answer (the caller decides such rows another way).
    """
    if LOOP:
        keys = 0
    else:
        keys = _load_slot_keys(ptr, row_base, row_mask, n_slots, 0, N)
    return _candidates_sample(ptr, row_base, row_mask, n_slots, keys, total_mass, floor, seed, offset, rows,
                              temperature, top_k, top_p, USE_TOPK, USE_TOPP, N, LOOP, PER_ROW, TEMPERED, weights_ptr,
                              weights_base)


@triton.jit
def keys_sample(keys, total_mass, seed, offset, rows, temperature, top_k, top_p,
                USE_TOPK: tl.constexpr, USE_TOPP: tl.constexpr, PER_ROW: tl.constexpr = False,
                TEMPERED: tl.constexpr = False):
    """``slots_sample`` over a [R, N] register tile of candidate order keys of q that holds every
    token with q > 0 (so nothing can overflow). Returns token [R] int32."""
    N: tl.constexpr = keys.shape[1]
    token, _ = _candidates_sample(0, 0, rows >= 0, N, keys, total_mass, tl.zeros_like(total_mass), seed, offset,
                                  rows, temperature, top_k, top_p, USE_TOPK, USE_TOPP, N, False, PER_ROW, TEMPERED)
    return token


@triton.jit
def _kept_weights(keys, kth_q, temperature, top, TEMPERED: tl.constexpr):
    """``top_p_weights`` of a [R, N] block of candidate keys (absent slots: 0)."""
    return top_p_weights(tl.where(keys != KEY_NONE, key_value(keys), 0.0), kth_q, temperature, top, TEMPERED)


@triton.jit
def _weight_stat(w, norm, at, WHAT: tl.constexpr):
    """Per-row statistic of a [R, N] block of kept weights (0: not kept): WHAT 1 sum w; 2 sum of p = w / norm
    over p > at; 3 max p."""
    if WHAT == 1:
        out = tl.sum(w, axis=1)
    elif WHAT == 2:
        p = w / norm[:, None]
        out = tl.sum(tl.where(p > at[:, None], p, 0.0), axis=1)
    else:
        out = tl.max(w / norm[:, None], axis=1)
    return out


@triton.jit
def _load_weights(weights_ptr, weights_base, row_mask, n_slots, start, N: tl.constexpr):
    idx = start + tl.arange(0, N)
    return tl.load(weights_ptr + weights_base[:, None] + idx[None, :],
                   mask=row_mask[:, None] & (idx < n_slots)[None, :], other=0.0)


@triton.jit
def _top_p_stat(row_mask, n_slots, norm, at, WHAT: tl.constexpr, N: tl.constexpr, LOOP: tl.constexpr, weights,
                weights_ptr, weights_base):
    """A top-p statistic (``_weight_stat``) of a row's candidates' weights (``_kept_weights``): a register tile
    (``weights``) or, LOOP, kept at weights_ptr + weights_base."""
    if LOOP:
        out = tl.zeros_like(norm)
        for start in range(0, n_slots, N):
            part = _weight_stat(_load_weights(weights_ptr, weights_base, row_mask, n_slots, start, N), norm, at, WHAT)
            if WHAT == 3:
                out = tl.maximum(out, part)
            else:
                out += part
    else:
        out = _weight_stat(weights, norm, at, WHAT)
    return out


@triton.jit
def _candidates_sample(
    ptr, row_base, row_mask, n_slots, keys, total_mass, floor, seed, offset, rows, temperature, top_k, top_p,
    USE_TOPK: tl.constexpr, USE_TOPP: tl.constexpr, N: tl.constexpr, LOOP: tl.constexpr, PER_ROW: tl.constexpr = False,
    TEMPERED: tl.constexpr = False, weights_ptr=0, weights_base=0,
):
    """``slots_sample`` with the keys already loaded when not LOOP (``keys_sample`` passes a register tile)."""
    zero = tl.zeros_like(total_mass)
    one = zero + 1.0
    # top-k: the k-th largest q (the largest value key t with #{q >= value(t)} >= k; q >= 0), else 0
    kth_q = zero
    if USE_TOPK:
        t = tl.zeros(total_mass.shape, tl.int32)
        for i in range(31):  # a runtime loop: one copy of the round's code
            cand = t | (1 << (30 - i))
            cnt = _slots_stat(ptr, row_base, row_mask, n_slots, keys, zero, value_of(cand), 0, N, LOOP)
            t = tl.where(cnt >= top_k, cand, t)
        kth_q = value_of(t)
        overflow = kth_q < floor  # tokens outside the candidates could reach the k-th largest
    else:
        overflow = zero != zero
    floor_p = zero
    norm = one
    temper = positive_temperature(temperature, PER_ROW)
    top = zero
    weights = 0
    if USE_TOPP:
        if TEMPERED:  # the row's largest log(q) / T (its largest q is always a candidate): the weights' scale
            top = _slots_stat(ptr, row_base, row_mask, n_slots, keys, kth_q, zero, 1, N, LOOP, temper)
            top = tl.where(top > float("-inf"), top, 0.0)
        # the candidates' weights once, not once a bisection round: fp32 reads instead of int64 keys to decode
        # (and, TEMPERED, no exp and log per candidate and round)
        if LOOP:
            for start in range(0, n_slots, N):
                idx = start + tl.arange(0, N)
                block = _load_slot_keys(ptr, row_base, row_mask, n_slots, start, N)
                tl.store(weights_ptr + weights_base[:, None] + idx[None, :], _kept_weights(block, kth_q, temper, top, TEMPERED),
                         mask=row_mask[:, None] & (idx < n_slots)[None, :])
            tl.debug_barrier()  # the rounds below read what other threads of the program stored
        else:
            weights = _kept_weights(keys, kth_q, temper, top, TEMPERED)
        if USE_TOPK:
            norm = _top_p_stat(row_mask, n_slots, one, zero, 1, N, LOOP, weights, weights_ptr, weights_base)
        elif TEMPERED:
            norm = tl.exp(total_mass - top)
        else:
            norm = total_mass
        norm = tl.maximum(norm, 1e-30)
        # the largest key whose probability mass strictly above it is still >= top_p
        t = tl.zeros(total_mass.shape, tl.int32)
        for i in range(31):  # a runtime loop: one copy of the round's code
            cand = t | (1 << (30 - i))
            mass = _top_p_stat(row_mask, n_slots, norm, value_of(cand), 2, N, LOOP, weights, weights_ptr, weights_base)
            t = tl.where(mass >= top_p, cand, t)
        mass0 = _top_p_stat(row_mask, n_slots, norm, zero, 2, N, LOOP, weights, weights_ptr, weights_base)
        p_max = _top_p_stat(row_mask, n_slots, norm, zero, 3, N, LOOP, weights, weights_ptr, weights_base)
        # first key past it: its value is the smallest kept probability
        floor_p = tl.where(mass0 >= top_p, tl.minimum(value_of(t + 1), p_max), 0.0)
        if not USE_TOPK:  # with top-k every kept token is >= kth_q >= floor already
            if TEMPERED:
                floor_w = tl.max(tempered_weights(floor[:, None], temper, top), axis=1)
            else:
                floor_w = floor
            # p_max == 0: no candidate at all (a chunk tied past its slots stores none), which the floor test
            # misses once the floor's weight underflows against an empty row's scale (top = 0)
            overflow = (value_of(t) < floor_w / norm) | (p_max == 0.0)
    # Gumbel-max over the kept candidates, the reference's noise; equal maxima: the lowest id
    best = tl.full(total_mass.shape, float("-inf"), tl.float32)
    best_id = tl.full(total_mass.shape, INDEX_NONE, tl.int32)
    for start in range(0, n_slots, N):
        if LOOP:
            block = _load_slot_keys(ptr, row_base, row_mask, n_slots, start, N)
        else:
            block = keys
        q = tl.where(block != KEY_NONE, key_value(block), 0.0)
        keep = (q > 0.0) & (q >= kth_q[:, None])
        if USE_TOPP:
            if LOOP:
                w = _load_weights(weights_ptr, weights_base, row_mask, n_slots, start, N)
            else:
                w = weights
            keep = keep & (w / norm[:, None] >= floor_p[:, None])
        best, best_id = fold_gumbel_max(q, keep, key_index(block), seed, offset, rows, temperature, best, best_id,
                                        PER_ROW)
    token = tl.where(best == float("-inf"), 0, best_id)  # nothing kept: torch.argmax of all -inf is 0
    return token, overflow


# ----------------------------------------------------------------------------------------------
# whole-pass tile bodies (load logits however you like, then call these)
# ----------------------------------------------------------------------------------------------


@triton.jit
def pass1_store_tile(
    lb, le, rows, row_mask, cols, col_mask, chunk, n_chunks,
    stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr,
    K: tl.constexpr, KEYS: tl.constexpr, kth=1, n_present=0, DENSE: tl.constexpr = 0,
    SLOTS: tl.constexpr = 0, FALLBACK: tl.constexpr = True, THREADS: tl.constexpr = 128,
):
    """Pass 1 on a [BB, BV] tile pair: chunk statistics and the chunk's candidates -> scratch.
    Masked entries (``row_mask``, ``col_mask``) must hold -inf.

    KEYS: 0 no keys (gate shut); 2 (intersection ranks) SLOTS int64 slots per row holding the raw
    keys of the chunk's entries >= its group-maxima bound for K, a superset of its top-K list by
    order key (``store_order_candidates``; rows with more than SLOTS such entries are rewritten by
    ``store_topk_order_keys`` when FALLBACK); 1 union thresholds: SLOTS (>= K; 0 means K and the exact path below) fp32 slots per row holding a
    sub-multiset of the chunk's values that
    contains its kth largest (``store_union_candidates`` above the group-maxima bound
    ``pair_value_bound``; no sorting). A row with more than SLOTS entries above its bound is
    rewritten exactly by bisection over all its entries (``pair_kth_largest`` +
    ``store_topk_multiset``: 16 / 32 rounds over every entry) when FALLBACK (always, except in
    the kernel report's fast-path count). n_present = columns of this chunk inside the
    vocabulary; DENSE the logits' storage dtype as in ``dense_key``. THREADS: the program's thread
    count, a layout hint for ``compaction_slots`` (correct whatever it is).
    """
    mask = row_mask[:, None] & col_mask[None, :]  # masked entries hold -inf already (the loads' `other`)
    if KEYS != 0 and SLOTS != 0:
        G: tl.constexpr = bound_groups(lb.shape[1], K)
        gb = tile_group_max(lb, G)
        ge = tile_group_max(le, G)
    else:
        gb = tl.max(lb, axis=1, keep_dims=True)
        ge = tl.max(le, axis=1, keep_dims=True)
    m_b, s_b, bad_b, fin_b = tile_stats_of_max(lb, gb)
    m_e, s_e, bad_e, fin_e = tile_stats_of_max(le, ge)
    store_pass1_partials(rows, row_mask, chunk, n_chunks, stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr,
                         m_b, s_b, bad_b, fin_b, m_e, s_e, bad_e, fin_e, 0, 0, K, 0)
    if KEYS == 1 and SLOTS == 0:
        # K slots per chunk (csrc_triton's AOT build): the exact k-th largest by bisection over every entry
        tb, te = pair_kth_largest(lb, le, kth, DENSE)
        few = (n_present < kth) | (rows < 0)  # a short last chunk: all of it is a candidate
        base = (rows.to(tl.int64) * n_chunks + chunk) * K
        store_topk_multiset(keys_b_ptr, base, row_mask, lb, tb, few, kth, DENSE, K, THREADS)
        store_topk_multiset(keys_e_ptr, base, row_mask, le, te, few, kth, DENSE, K, THREADS)
    elif KEYS == 1:
        bound_b, bound_e = pair_value_bound(gb, ge, m_b, m_e, kth, BOUND_ROUNDS, THREADS)
        base = (rows.to(tl.int64) * n_chunks + chunk) * SLOTS
        done_b = store_union_candidates(keys_b_ptr, base, row_mask, lb, bound_b, kth, SLOTS, THREADS)
        done_e = store_union_candidates(keys_e_ptr, base, row_mask, le, bound_e, kth, SLOTS, THREADS)
        if FALLBACK:
            if tl.sum((row_mask & ~(done_b & done_e)).to(tl.int32), axis=0) > 0:  # rare: see pair_value_bound
                tb, te = pair_kth_largest(lb, le, kth, DENSE)
                few = (n_present < kth) | (rows < 0)  # a short last chunk: all of it is a candidate
                store_topk_multiset(keys_b_ptr, base, row_mask & ~done_b, lb, tb, few, kth, DENSE, SLOTS, THREADS)
                store_topk_multiset(keys_e_ptr, base, row_mask & ~done_e, le, te, few, kth, DENSE, SLOTS, THREADS)
    elif KEYS == 2:
        # intersection: each chunk's top-K list by (value, id) order key, K = the buffer (ranks < K)
        bound_b, bound_e = pair_value_bound(gb, ge, m_b, m_e, K, BOUND_ROUNDS, THREADS)
        base = (rows.to(tl.int64) * n_chunks + chunk) * SLOTS
        done_b = store_order_candidates(keys_b_ptr, base, row_mask, lb, cols, bound_b, SLOTS, THREADS)
        done_e = store_order_candidates(keys_e_ptr, base, row_mask, le, cols, bound_e, SLOTS, THREADS)
        if FALLBACK:
            # rare: see pair_value_bound; and chunks whose bound is -inf (``store_order_candidates``)
            if tl.sum((row_mask & ~(done_b & done_e)).to(tl.int32), axis=0) > 0:
                store_topk_order_keys(keys_b_ptr, base, row_mask & ~done_b, lb, cols, mask, K, SLOTS, THREADS)
                store_topk_order_keys(keys_e_ptr, base, row_mask & ~done_e, le, cols, mask, K, SLOTS, THREADS)


@triton.jit
def store_pass1_partials(
    rows, row_mask, chunk, n_chunks, stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr,
    m_b, s_b, bad_b, fin_b, m_e, s_e, bad_e, fin_e, top_b, top_e,
    K: tl.constexpr, KEYS: tl.constexpr,
):
    """Write one chunk's pass-1 partials of both rows (max, sum-exp, bad and finite counts, top-K keys)."""
    slot = (rows.to(tl.int64) * n_chunks + chunk) * 4
    tl.store(stats_ptr + slot, m_b, mask=row_mask)
    tl.store(stats_ptr + slot + 1, s_b, mask=row_mask)
    tl.store(stats_ptr + slot + 2, m_e, mask=row_mask)
    tl.store(stats_ptr + slot + 3, s_e, mask=row_mask)
    tl.store(counts_ptr + slot, bad_b, mask=row_mask)
    tl.store(counts_ptr + slot + 1, fin_b, mask=row_mask)
    tl.store(counts_ptr + slot + 2, bad_e, mask=row_mask)
    tl.store(counts_ptr + slot + 3, fin_e, mask=row_mask)
    if KEYS != 0:
        kslot = tl.arange(0, K)
        base = (rows.to(tl.int64) * n_chunks + chunk) * K
        if KEYS == 1:
            # value keys -> the fp32 bit patterns the reduce reads (VALUE_NONE maps to SLOT_NONE)
            top_b = value_of(top_b).to(tl.int32, bitcast=True)
            top_e = value_of(top_e).to(tl.int32, bitcast=True)
        else:
            # order keys -> the raw keys the reduce reads (``raw_to_order_keys``)
            top_b = tl.where(top_b == KEY_NONE, RAW_NONE, raw_key(key_value(top_b), key_index(top_b)))
            top_e = tl.where(top_e == KEY_NONE, RAW_NONE, raw_key(key_value(top_e), key_index(top_e)))
        tl.store(keys_b_ptr + base[:, None] + kslot[None, :], top_b, mask=row_mask[:, None])
        tl.store(keys_e_ptr + base[:, None] + kslot[None, :], top_e, mask=row_mask[:, None])


@triton.jit
def pass2_store_tile(
    lb, le, rows, row_mask, cols, col_mask, chunk, n_chunks,
    rowinfo_ptr, alpha_ptr, seed_ptr, seed_stride, offset_ptr, offset_stride, temperature,
    div_ptr, best_ptr, besti_ptr, keys2_ptr, mass_ptr,
    DIVERGENCE: tl.constexpr, SAMPLE: tl.constexpr, K: tl.constexpr,
    NEED_V0: tl.constexpr, NEED_V1: tl.constexpr, THREADS: tl.constexpr = 128, row_temperature_ptr=0,
    ROW_T: tl.constexpr = 0, TEMPERED: tl.constexpr = False,
):
    """Pass 2 on a [BB, BV] tile pair: partial divergence and partial choices of both gate outcomes.

    SAMPLE: 0 greedy, 1 plain temperature sampling, 2 top-k/top-p sampling (keys2 + mass: the
    chunk's candidates above the K-th largest of its group maxima, ``store_sample_candidates``;
    nothing is sorted). NEED_V0 / NEED_V1: compute the no-spike outcome (s = p_b) / the spiked
    union outcome. Masked entries (``row_mask``, ``col_mask``) must hold -inf.
    ROW_T: the rows' own temperatures at ``row_temperature_ptr`` instead of ``temperature``.
    TEMPERED (top-p at T != 1, or per-row temperatures): each chunk's mass is the log of its sum of q^(1/T)
    (``log_tempered_mass``), what the finalize's tempered top-p normalises by.
    """
    mask = row_mask[:, None] & col_mask[None, :]  # masked entries hold -inf already (the loads' `other`)
    if SAMPLE == 2:
        # redundant, but without these selects ptxas spills a few bytes in some sm_80 top-k / top-p
        # variants (and with them in fp32 temperature sampling): kernel report
        lb = tl.where(mask, lb, float("-inf"))
        le = tl.where(mask, le, float("-inf"))
    info = rows.to(tl.int64) * 8
    m_b = tl.load(rowinfo_ptr + info, mask=row_mask, other=0.0)
    ls_b = tl.load(rowinfo_ptr + info + 1, mask=row_mask, other=0.0)
    m_e = tl.load(rowinfo_ptr + info + 2, mask=row_mask, other=0.0)
    ls_e = tl.load(rowinfo_ptr + info + 3, mask=row_mask, other=0.0)
    log_pb, pb = tile_log_probs(lb, m_b, ls_b)
    log_pe, pe = tile_log_probs(le, m_e, ls_e)
    first, second = tile_divergence_terms(log_pb, pb, log_pe, pe, DIVERGENCE)
    dslot = (rows.to(tl.int64) * n_chunks + chunk) * 2
    tl.store(div_ptr + dslot, first, mask=row_mask)
    tl.store(div_ptr + dslot + 1, second, mask=row_mask)

    if SAMPLE == 1:
        seed = tl.load(seed_ptr + rows * seed_stride, mask=row_mask, other=0)
        offset = tl.load(offset_ptr + rows * offset_stride, mask=row_mask, other=0)
        BV: tl.constexpr = cols.shape[0]
        gumbel = philox_gumbel_span(chunk * BV, seed, offset, rows, BV)
        row_t = rows_temperature(temperature, row_temperature_ptr, rows, row_mask, ROW_T)
    else:
        gumbel = 0.0
        if TEMPERED:
            row_t = positive_temperature(rows_temperature(temperature, row_temperature_ptr, rows, row_mask, ROW_T),
                                         ROW_T)
        else:
            row_t = temperature
    # outcome slots: [row, outcome, chunk]
    oslot = rows.to(tl.int64) * 2 * n_chunks + chunk
    if SAMPLE == 2:
        # q = max(s, 0) of both outcomes; one bisection finds both bounds (the K-th largest group maxima)
        q0 = tl.where(mask, pb, 0.0)  # p_b >= 0 already
        if NEED_V1:
            mixed = _union_scores_of_rows(lb, le, pb, pe, rows, row_mask, info, alpha_ptr, rowinfo_ptr)
            q1 = tl.where(mask, tl.maximum(mixed, 0.0), 0.0)
        else:
            q1 = q0  # its bound is computed alongside but never used
        G: tl.constexpr = bound_groups(lb.shape[1], K)
        # all 32 rounds: an exact group maximum, so ties at it are recognised (store_sample_candidates)
        bound0, bound1 = pair_group_bound(tile_group_max(q0, G), tile_group_max(q1, G), K, 32, 0)
        S: tl.constexpr = sample_slots(lb.shape[1], K)
        if NEED_V0:
            if TEMPERED:  # p_b's largest log is -log(sum exp) (the reduce's): no log of q, no maximum to find
                # (only where p_b itself is > 0: an underflowed p_b is no candidate and weighs 0 in the reference)
                mass0 = log_tempered_mass_below(tl.where(mask & (q0 > 0.0), log_pb, float("-inf")), -ls_b, row_t)
            else:
                mass0 = tl.sum(q0, axis=1)
            store_sample_candidates(keys2_ptr, mass_ptr, oslot, row_mask, q0, cols, tl.maximum(bound0, 0.0), mass0,
                                    S, THREADS)
        if NEED_V1:
            if TEMPERED:
                mass1 = log_tempered_mass(q1, row_t)
            else:
                mass1 = tl.sum(q1, axis=1)
            store_sample_candidates(keys2_ptr, mass_ptr, oslot + n_chunks, row_mask, q1, cols,
                                    tl.maximum(bound1, 0.0), mass1, S, THREADS)
    else:
        # the no-spike outcome first: the mixture's tile is computed after pb's arg-max (fewer live registers)
        if NEED_V0:
            _store_outcome(pb, gumbel, row_t, cols, mask, row_mask, oslot, best_ptr, besti_ptr, SAMPLE,
                           ROW_T)
        if NEED_V1:
            mixed = _union_scores_of_rows(lb, le, pb, pe, rows, row_mask, info, alpha_ptr, rowinfo_ptr)
            _store_outcome(mixed, gumbel, row_t, cols, mask, row_mask, oslot + n_chunks, best_ptr, besti_ptr,
                           SAMPLE, ROW_T)


@triton.jit
def _union_scores_of_rows(lb, le, pb, pe, rows, row_mask, info, alpha_ptr, rowinfo_ptr):
    """``tile_union_scores`` with the rows' alpha and union thresholds loaded (rowinfo slots 4, 5)."""
    alpha = tl.load(alpha_ptr + rows, mask=row_mask, other=0.0)
    thr_b = tl.load(rowinfo_ptr + info + 4, mask=row_mask, other=0.0)
    thr_e = tl.load(rowinfo_ptr + info + 5, mask=row_mask, other=0.0)
    return tile_union_scores(lb, le, pb, pe, alpha, thr_b, thr_e)


@triton.jit
def _store_outcome(scores, gumbel, temperature, cols, mask, row_mask, slot, best_ptr, besti_ptr,
                   SAMPLE: tl.constexpr, PER_ROW: tl.constexpr = False):
    best, besti = tile_argmax(tile_choice_values(scores, gumbel, temperature, SAMPLE, PER_ROW), cols, mask)
    tl.store(best_ptr + slot, best, mask=row_mask)
    tl.store(besti_ptr + slot, besti, mask=row_mask)


@triton.constexpr_function
def sample_slots(block_v, k):
    """Candidate slots per chunk and gate outcome of top-k / top-p sampling: room for the ~1.1-1.4 k
    entries above a group-maxima bound (``pair_group_bound``), at most the chunk."""
    return min(2 * k, block_v)


@triton.jit
def store_sample_candidates(keys2_ptr, mass_ptr, slot, row_mask, q, cols, bound, mass, SLOTS: tl.constexpr,
                            THREADS: tl.constexpr = 128):
    """One chunk's sampling candidates of one gate outcome, unsorted: the (q, id) order keys of the
    entries >= bound (or, when those do not fit in SLOTS slots or bound <= 0, of the entries > bound),
    compacted (``compaction_slots``), the rest KEY_NONE; plus mass_ptr[2 slot] = ``mass`` [R], the chunk's
    sum of q (top-p at T != 1: the log of its sum of q^(1/T), ``log_tempered_mass``) and
    mass_ptr[2 slot + 1] = its *certainty floor*: every entry with q >= it is among the stored ones (bound,
    the next float above bound, or +inf when even the entries > bound do not fit: then the first SLOTS of
    them are stored). ``slots_sample`` is exact wherever its thresholds stay at or
    above the largest floor of the row, and flags the row otherwise.

    q: [R, N] fp32 >= 0, masked entries 0; slot: [R] int64 index of (row, outcome, chunk).
    """
    above = q > bound[:, None]
    n_gt = tl.sum(above.to(tl.int32), axis=1)
    with_ties = (bound > 0.0) & (tl.sum((q >= bound[:, None]).to(tl.int32), axis=1) <= SLOTS)
    take = above | ((q == bound[:, None]) & with_ties[:, None])
    pos, n_taken = compaction_slots(take.to(tl.int32), THREADS)
    base = keys2_ptr + slot * SLOTS
    tl.store(base[:, None] + pos, order_key(q, cols[None, :]), mask=take & (pos < SLOTS) & row_mask[:, None])
    free = tl.arange(0, SLOTS)[None, :]
    tl.store(base[:, None] + free, tl.full([q.shape[0], SLOTS], KEY_NONE, tl.int64),
             mask=row_mask[:, None] & (free >= n_taken[:, None]))
    next_up = value_of(value_key(bound) + 1)  # q > bound is q >= the next float (bound >= 0)
    floor = tl.where(with_ties, bound, tl.where(n_gt <= SLOTS, next_up, float("inf")))
    tl.store(mass_ptr + 2 * slot, mass, mask=row_mask)
    tl.store(mass_ptr + 2 * slot + 1, floor, mask=row_mask)
