"""Thresholds by bisection instead of sorting.

Union mode (select_tiles.pair_kth_largest, store_topk_multiset, slots_kth_largest): pass 1 + the
reduce must store each row's k-th largest logit exactly (``reference.kth_largest``). Intersection
mode (store_order_candidates, store_topk_order_keys, slots_kth_key, compact_top_keys): they must
store each row's top-K list by (value, then lower id), exactly the first K of a stable descending
sort. Whatever the values: ties across chunk borders, -inf, both zeros, subnormals, a short last
chunk, k larger than a chunk, every storage dtype (16-bit keys for bf16 / fp16, 32-bit for fp32).
The kernels run under TRITON_INTERPRET=1 on CPU.
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ngsd_kernels.ops.fused_select import LogitsPasses  # noqa: E402
from ngsd_kernels.ops.launcher import INTERPRETED, RowVectors, Scratch, launch_select, plan_select  # noqa: E402
from ngsd_kernels.params import CandidateMode, GateMode, StepParams  # noqa: E402
from ngsd_kernels.reference import kth_largest  # noqa: E402

SPECIALS = (float("-inf"), 0.0, -0.0, 1e-40, -1e-40, 3.0, -3.0, 65504.0, -65504.0)


def launched_scratch(base: torch.Tensor, expert: torch.Tensor, params: StepParams, block_v: int | None,
                     fallback: bool, pass1_widening: int = 1) -> tuple[Scratch, int]:
    """One step's scratch after the launch sequence, and the plan's buffer. Pass 1's slots start as -1
    (SLOT_NONE / RAW_NONE: slots it leaves unwritten hold nothing, deterministically). ``fallback=False``:
    pass 1 without its exact rewrite of rows whose group-maxima bound let too many entries through.
    ``pass1_widening`` > 1: pass 1 and the reduce on chunks that many times pass 2's width (the plan a GPU
    picks for buffers of 1024, ``SelectPlan.pass1_block_v``)."""
    batch, vocab = base.shape
    plan = plan_select(batch, vocab, params, block_v=block_v)
    if pass1_widening > 1:
        plan = plan_select(batch, vocab, params, block_v=block_v, pass1_block_v=pass1_widening * plan.block_v)
        assert plan.pass1_chunks == -(-vocab // (pass1_widening * plan.block_v)) and plan.pass1_bv > plan.block_v
    scratch = Scratch.allocate(plan, base.device)
    scratch.keys_b.fill_(-1)
    scratch.keys_e.fill_(-1)
    zero = torch.zeros(1, dtype=torch.int64)
    source = dataclasses.replace(LogitsPasses.of(base, expert), fallback=fallback)
    launch_select(source, plan, scratch, RowVectors.of(torch.zeros(batch), torch.full((batch,), 0.5), zero, zero),
                  params)
    return scratch, plan.buffer


def stored_thresholds(base: torch.Tensor, expert: torch.Tensor, k: int, block_v: int | None,
                      fallback: bool = True, pass1_widening: int = 1) -> torch.Tensor:
    """[B, 2] (base, expert) union thresholds as the reduce kernel stores them."""
    scratch, _ = launched_scratch(base, expert, StepParams(candidate_k=k, gate=GateMode.OPEN), block_v, fallback,
                                  pass1_widening)
    return scratch.rowinfo[:, 4:6]


def stored_top_lists(base: torch.Tensor, expert: torch.Tensor, k: int, block_v: int | None,
                     fallback: bool = True, pass1_widening: int = 1) -> tuple[list[set[int]], list[set[int]], int]:
    """(base, expert) top-K token-id sets per row as the reduce kernel hands them to the intersection
    kernel (intersection mode, K = the plan's buffer), and K."""
    params = StepParams(candidate_k=k, min_candidates=1, candidate_mode=CandidateMode.INTERSECTION, gate=GateMode.OPEN)
    scratch, buffer = launched_scratch(base, expert, params, block_v, fallback, pass1_widening)
    lists = []
    for top in (scratch.top_b, scratch.top_e):
        present = top != -(2**63)
        ids = 0x7FFFFFFF - (top & 0x7FFFFFFF)
        lists.append([set(ids[r][present[r]].tolist()) for r in range(base.shape[0])])
    return lists[0], lists[1], buffer


def top_list_reference(logits: torch.Tensor, k: int) -> list[set[int]]:
    """The first k ids of each row's stable descending sort (the reference's ranks < k)."""
    order = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return [set(row.tolist()) for row in order]


def entries_above_group_bound(logits: torch.Tensor, k: int, block_v: int, groups: int) -> torch.Tensor:
    """[B, chunks] entries of each chunk above its exact group-maxima bound: the k-th largest maximum of
    the strided groups j, j + groups, ... (select_tiles.pair_value_bound finds it to within 1/1024 of
    the maxima's spread, from below)."""
    batch, vocab = logits.shape
    chunks = logits.float().reshape(batch, vocab // block_v, block_v)
    group_max = chunks.reshape(batch, vocab // block_v, block_v // groups, groups).amax(dim=2)
    bound = group_max.topk(k, dim=-1).values[..., -1:]
    return (chunks > bound).sum(-1)


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 3))
    vocab = draw(st.integers(1, 400))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    levels = draw(st.sampled_from([0, 3, 50]))  # 0: continuous values; else many ties
    x = torch.randn(2, batch, vocab, generator=gen) * scale
    if levels:
        x = torch.round(x * levels / scale) / levels
    n_special = draw(st.integers(0, vocab))
    idx = torch.randint(0, vocab, (n_special,), generator=gen)
    picks = torch.tensor(SPECIALS)[torch.randint(0, len(SPECIALS), (n_special,), generator=gen)]
    x[:, :, idx] = picks
    if dtype == torch.bfloat16 and INTERPRETED:
        # the interpreter's bf16 -> fp32 conversion flushes subnormals to 0 (a GPU converts exactly)
        x = torch.where(x.abs() < 2.0**-126, torch.zeros_like(x), x)
    k = draw(st.integers(1, 70))
    block_v = draw(st.sampled_from([None, 16, 64]))
    pass1_widening = draw(st.sampled_from([1, 2, 4]))
    return x[0].to(dtype), x[1].to(dtype), k, block_v, pass1_widening


# Rows of -inf make the tile statistics compute inf - inf and log(0): the GPU yields NaN / -inf there
# silently (and the kernel discards them), the interpreter's numpy says so with a RuntimeWarning.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_stored_thresholds_are_the_kth_largest_logits(case):
    base, expert, k, block_v, pass1_widening = case
    got = stored_thresholds(base, expert, k, block_v, pass1_widening=pass1_widening)
    for col, logits in enumerate((base, expert)):
        want = kth_largest(logits.float(), k)[:, 0]
        # values, not bits: -0.0 and +0.0 are the same threshold (x >= thr is the same set)
        assert torch.equal(got[:, col] == want, torch.ones_like(want, dtype=torch.bool)), (col, got[:, col], want)


def test_ties_straddling_chunks_and_a_short_last_chunk():
    # 3 chunks of 16: the value 2.0 fills most of the first two chunks, the k-th largest sits in the ties
    vocab = 40
    base = torch.zeros(1, vocab)
    base[0, 3:30] = 2.0
    base[0, 35] = 5.0
    expert = torch.full((1, vocab), float("-inf"))
    expert[0, 39] = 1.0  # one finite entry, in the short last chunk: the 20th largest is -inf
    got = stored_thresholds(base.bfloat16(), expert.bfloat16(), 20, 16)
    assert got[0, 0] == 2.0 and got[0, 1] == float("-inf")


# A chunk of 4096 columns, k = 64: plan buffer 64, 128 slots per chunk, 256 strided groups of 16.
CHUNK, K_UNION, SLOTS, GROUPS = 4096, 64, 128, 256


def test_group_bound_alone_decides_random_rows():
    gen = torch.Generator().manual_seed(7)
    base = (torch.randn(2, 2 * CHUNK, generator=gen) * 3.0).bfloat16()
    expert = (torch.randn(2, 2 * CHUNK, generator=gen) * 3.0).bfloat16()
    for logits in (base, expert):  # the fast path applies to every chunk: no fallback needed
        assert int(entries_above_group_bound(logits, K_UNION, CHUNK, GROUPS).max()) <= SLOTS
    got = stored_thresholds(base, expert, K_UNION, CHUNK, fallback=False)
    for col, logits in enumerate((base, expert)):
        assert torch.equal(got[:, col], kth_largest(logits.float(), K_UNION)[:, 0])


def test_rows_the_group_bound_cannot_decide_take_the_exact_fallback():
    # the largest 256 values sit in 16 of the 256 groups (columns = 0..15 mod 256): the 64th largest group
    # maximum is a small value and 256 > SLOTS entries lie above it in the first chunk
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, 2 * CHUNK, generator=gen)
    cols = torch.arange(CHUNK)
    base[0, :CHUNK][(cols % GROUPS) < 16] += 20.0
    base = base.bfloat16()
    expert = (torch.randn(1, 2 * CHUNK, generator=gen) * 3.0).bfloat16()
    assert int(entries_above_group_bound(base, K_UNION, CHUNK, GROUPS)[0, 0]) > SLOTS
    want = kth_largest(base.float(), K_UNION)[:, 0]
    assert torch.equal(stored_thresholds(base, expert, K_UNION, CHUNK)[:, 0], want)
    # without the fallback the chunk writes nothing: the test above would notice a broken fallback
    assert not torch.equal(stored_thresholds(base, expert, K_UNION, CHUNK, fallback=False)[:, 0], want)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_stored_top_lists_are_the_first_k_of_a_stable_sort(case):
    base, expert, k, block_v, pass1_widening = case
    got_b, got_e, buffer = stored_top_lists(base, expert, k, block_v, pass1_widening=pass1_widening)
    assert got_b == top_list_reference(base, buffer)
    assert got_e == top_list_reference(expert, buffer)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_top_lists_of_rows_the_group_bound_cannot_decide():
    # all-equal rows (every id ties: the lowest ids win) and the clustered row of the union test above
    gen = torch.Generator().manual_seed(5)
    tied = torch.zeros(1, 2 * CHUNK)
    clustered = torch.randn(1, 2 * CHUNK, generator=gen)
    cols = torch.arange(CHUNK)
    clustered[0, :CHUNK][(cols % GROUPS) < 16] += 20.0
    base = torch.cat([tied, clustered]).bfloat16()
    expert = torch.cat([clustered, tied]).bfloat16()
    got_b, got_e, buffer = stored_top_lists(base, expert, 10, CHUNK)
    assert buffer == 64 and got_b == top_list_reference(base, buffer) and got_e == top_list_reference(expert, buffer)
    # without the exact rewrite those chunks write nothing: the check above would notice a broken one
    assert stored_top_lists(base, expert, 10, CHUNK, fallback=False)[0] != top_list_reference(base, buffer)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_top_lists_of_rows_with_more_keys_than_one_load():
    # 258 chunks of 64 columns, 64 slots each: more keys per row than the reduce reads at once, so
    # the conversion, every bisection round and the compaction loop over the row's key blocks
    gen = torch.Generator().manual_seed(11)
    base = (torch.randn(1, 16500, generator=gen) * 3.0).bfloat16()
    expert = torch.round(torch.randn(1, 16500, generator=gen) * 4.0) / 4.0  # ties across blocks
    plan = plan_select(1, 16500, StepParams(candidate_k=10, min_candidates=1, candidate_mode=CandidateMode.INTERSECTION,
                                            gate=GateMode.OPEN), block_v=64)
    assert plan.ncp * plan.slots > plan.key_block  # the looping form of the reduce
    got_b, got_e, buffer = stored_top_lists(base, expert.bfloat16(), 10, 64)
    assert got_b == top_list_reference(base, buffer) and got_e == top_list_reference(expert.bfloat16(), buffer)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("chunk", [64, CHUNK])
def test_top_lists_of_chunks_with_fewer_than_k_finite_group_maxima(chunk):
    # The fast path takes the entries >= the bound without a column mask, which needs a bound above
    # -inf. Here it is -inf: a short last chunk of 5 columns (fewer than k = 64) in every row, and a
    # row with 3 finite entries. Those chunks are retaken with the mask (columns past the vocabulary
    # must not enter the lists, present -inf entries must, lowest ids first). With 64-column chunks
    # every entry of such a chunk fits its 128 slots: taken unmasked, the padding would be listed.
    gen = torch.Generator().manual_seed(13)
    vocab = 2 * chunk + 5
    base = (torch.randn(2, vocab, generator=gen) * 3.0)
    expert = torch.full((2, vocab), float("-inf"))
    expert[0] = torch.randn(vocab, generator=gen)
    expert[1, [7, chunk + 1, 2 * chunk + 2]] = torch.tensor([1.0, 2.0, 3.0])
    base, expert = base.bfloat16(), expert.bfloat16()
    got_b, got_e, buffer = stored_top_lists(base, expert, 10, chunk)
    assert buffer == 64 and got_b == top_list_reference(base, buffer) and got_e == top_list_reference(expert, buffer)
    # without the rewrite those chunks write nothing: the check above would notice a broken one
    assert stored_top_lists(base, expert, 10, chunk, fallback=False)[1] != top_list_reference(expert, buffer)
