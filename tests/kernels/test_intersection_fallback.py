"""The GPU-side exact fallback for spiked intersection rows (ngsd_kernels/ops/intersection_fallback.py).

Rows whose grown intersection needs k' beyond the top-K buffers are flagged by the intersection
kernel; on the logits path ``_intersection_fallback_kernel`` decides them from the full logits rows,
so the step needs no host read (``torch.nonzero`` is patched to raise, as in test_fused_select's
``no_host_read``). Tokens must equal the reference's: greedy and sampling (temperature, top-k,
top-p), ties in the logits, k' far beyond the buffer, mixed batches where only some rows overflow.
Kernels run under TRITON_INTERPRET=1 with small vocabularies and buffers.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ngsd_kernels import CandidateMode, GateMode, StepParams, guarded_select_reference  # noqa: E402
from ngsd_kernels.ops import fused_select, intersection_fallback, launcher  # noqa: E402
from ngsd_kernels.ops.fused_select import (  # noqa: E402
    LogitsPasses,
    fused_guarded_select,
    fused_guarded_select_with_overflow,
    plan_select,
)
from ngsd_kernels.ops.intersection_fallback import _kth_order_keys  # noqa: E402
from ngsd_kernels.ops.launcher import RowVectors, Scratch, launch_select, select_exact  # noqa: E402
from ngsd_kernels.reference import descending_rank  # noqa: E402
from tests.kernels.steps import assert_same_step  # noqa: E402

if not fused_select.INTERPRETED and not torch.cuda.is_available():  # pragma: no cover
    # TRITON_INTERPRET=0 without a GPU; bench/gpu_check.sh sets 0 on a CUDA machine to run them compiled
    pytest.skip("these tests need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture
def no_host_read(monkeypatch):
    """Fails the test if the launcher reads overflow flags on the host (select_exact's torch.nonzero)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of the overflow flags")

    monkeypatch.setattr(launcher.torch, "nonzero", forbidden)


def inter(**changes) -> StepParams:
    values = dict(candidate_mode=CandidateMode.INTERSECTION, candidate_k=4, min_candidates=4, gate=GateMode.OPEN)
    values.update(changes)
    return StepParams(**values)


def spiked_overflow(base: torch.Tensor, expert: torch.Tensor, need: int, buffer: int) -> torch.Tensor:
    """[B] bool: rows with fewer than `need` tokens in both top-`buffer` lists (k' > buffer)."""
    worst = torch.maximum(descending_rank(base.float()), descending_rank(expert.float()))
    return torch.kthvalue(worst, need, dim=-1).values >= buffer


def run_step(base, expert, params, buffer, seed=None, offset=None, potential=None, alpha=0.7):
    batch = base.shape[0]
    seed = torch.arange(batch) * 7 + 1 if seed is None else seed
    offset = torch.arange(batch) + 3 if offset is None else offset
    potential = torch.zeros(batch) if potential is None else potential
    args = (base, expert, potential, torch.full((batch,), alpha), seed, offset)
    want = guarded_select_reference(*args, params)
    got = fused_guarded_select(*args, params, buffer_size=buffer)
    assert_same_step(got, want)
    return args, got, want


def mixed_rows(vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows: opposite orders (k' ~ V/2), nearly the same order (fits), an independent expert
    (k' ~ sqrt(need V)), and an expert that demotes the base's top 40 tokens (k' just past 40)."""
    base = torch.randn(4, vocab, generator=gen)
    expert = -base
    expert[1] = base[1] + 0.01 * torch.randn(vocab, generator=gen)
    expert[2] = torch.randn(vocab, generator=gen)
    expert[3] = base[3] - 10.0 * (descending_rank(base[3:4])[0] < 40).float()
    return base, expert


# ----------------------------------------------------------------------------------------------
# the k-th largest order key, without sorting
# ----------------------------------------------------------------------------------------------


@triton.jit
def _kth_keys_kernel(lb_ptr, le_ptr, n_vocab, ks_ptr, out_ptr, id_rounds, R: tl.constexpr, BT: tl.constexpr):
    i = tl.program_id(0)
    one = tl.zeros([1], tl.int32)
    k = tl.load(ks_ptr + i + one)
    tb, te = _kth_order_keys(lb_ptr, le_ptr, 0, 0, 0, n_vocab, k, id_rounds, R, BT)
    tl.store(out_ptr + 2 * i + one, tb)
    tl.store(out_ptr + 2 * i + 1 + one, te)


@pytest.mark.parametrize("radix_bits", [1, 2, 8])  # 4: every other test (the interpreter's default)
def test_kth_order_key_is_the_token_of_rank_k_minus_one(radix_bits):
    gen = torch.Generator().manual_seed(3)
    vocab = 250
    base = torch.randint(-3, 4, (vocab,), generator=gen).float() / 2  # 13 values: ties everywhere
    base[::17] = float("-inf")
    base[5], base[6] = -0.0, 0.0  # equal in torch: the lower id first
    expert = torch.randn(vocab, generator=gen)
    expert[100:140] = 0.25  # one long run of ties
    ks = torch.tensor([1, 37, 101, 150, 249, 250], dtype=torch.int32)
    out = torch.empty(2 * len(ks), dtype=torch.int64)
    id_rounds = -(-(vocab - 1).bit_length() // radix_bits)
    _kth_keys_kernel[(len(ks),)](base, expert, vocab, ks, out, id_rounds, R=radix_bits, BT=128)
    for row, keys in ((base, out[0::2]), (expert, out[1::2])):
        order = torch.sort(row, descending=True, stable=True).indices
        ids = 0x7FFFFFFF - (keys & 0x7FFFFFFF)
        assert ids.tolist() == order[ks.long() - 1].tolist()


# ----------------------------------------------------------------------------------------------
# tokens against the reference, no host read
# ----------------------------------------------------------------------------------------------


def test_greedy_mixed_batch_only_overflowing_rows_fall_back(no_host_read):
    gen = torch.Generator().manual_seed(11)
    base, expert = mixed_rows(1000, gen)
    params = inter()
    flags = fused_guarded_select_with_overflow(base, expert, torch.zeros(4), torch.full((4,), 0.7),
                                               torch.tensor([0]), torch.tensor([0]), params, buffer_size=16)[4]
    assert flags.tolist() == spiked_overflow(base, expert, 4, 16).tolist() == [True, False, True, True]
    run_step(base, expert, params, 16)
    # a larger min_candidates grows k' further; alpha > 1 (SafeDecoding's 3 amplifies the expert)
    run_step(base, expert, inter(min_candidates=9, candidate_k=2), 16, alpha=3.0)


def test_opposite_orders_grow_k_to_half_the_vocabulary(no_host_read):
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(2, 3000, generator=gen)
    expert = -base  # the intersection first holds 4 tokens around rank V/2
    assert spiked_overflow(base, expert, 4, 16).all()
    run_step(base, expert, inter(), 16)
    run_step(base, expert, inter(temperature=0.8, top_p=0.9), 16)


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.9),
    dict(temperature=1.3, top_k=3),
    dict(temperature=0.7, top_k=12),  # top-k wider than the grown intersection: keeps all of C
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=0.6, top_k=6, top_p=0.8),
])
def test_sampling_matches_the_reference(no_host_read, sampling):
    gen = torch.Generator().manual_seed(13)
    base, expert = mixed_rows(400, gen)
    params = inter(min_candidates=6, candidate_k=3, **sampling)
    run_step(base, expert, params, 16, seed=torch.arange(4) * 101 + 5, offset=torch.arange(4) * 3)


def test_ties_in_the_logits(no_host_read):
    gen = torch.Generator().manual_seed(14)
    vocab = 700
    base = torch.randint(-4, 5, (3, vocab), generator=gen).float() / 4  # 17 values: long runs of ties
    expert = -base.clone()
    expert[1] = torch.randint(-4, 5, (vocab,), generator=gen).float() / 4
    expert[2] = base[2].clone()  # equal rows: every rank ties across, the order is by id
    base[2, 300:] = 1.0  # ... and most of the row ties at the top
    expert[2, 300:] = 1.0
    base[0, ::9] = float("-inf")
    expert[0, ::11] = float("-inf")
    base[1, 3], base[1, 4] = -0.0, 0.0
    flags = spiked_overflow(base, expert, 5, 16)
    assert flags[0] and flags[1]
    for params in (inter(min_candidates=5), inter(min_candidates=5, temperature=1.1, top_k=4),
                   inter(min_candidates=5, temperature=0.9, top_p=0.6)):
        run_step(base, expert, params, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(no_host_read, dtype):
    gen = torch.Generator().manual_seed(15)
    base, expert = mixed_rows(500, gen)
    run_step(base.to(dtype), expert.to(dtype), inter(temperature=0.8, top_k=5, top_p=0.9), 16)


def test_lif_gate_spiked_and_quiet_rows_with_top_p_overflow(no_host_read):
    """Spiked rows overflow the intersection (this kernel), quiet rows the top-p buffer
    (``_sample_fallback_kernel``): both decided on the GPU in one step."""
    gen = torch.Generator().manual_seed(16)
    base, expert = mixed_rows(800, gen)
    base = base * 0.3  # flat rows: the quiet rows' 0.95-nucleus holds hundreds of tokens
    expert = expert * 0.3
    potential = torch.tensor([5.0, 0.0, 0.0, 5.0])  # rows 0 and 3 fire, 1 and 2 stay quiet
    params = inter(gate=GateMode.LIF, temperature=1.0, top_p=0.95)
    args, got, _ = run_step(base, expert, params, 16, potential=potential)
    assert got[2].tolist() == [True, False, False, True]
    flags = fused_guarded_select_with_overflow(*args, params, buffer_size=16)[4]
    assert flags.all()  # every row needed a fallback


@pytest.mark.parametrize("radix_bits", [1, 2])
def test_other_radix_widths(no_host_read, monkeypatch, radix_bits):
    """The GPU default (2 bits per round) and plain bisection (1) give the interpreter's answers."""
    monkeypatch.setattr(intersection_fallback, "RADIX_BITS", radix_bits)
    gen = torch.Generator().manual_seed(17)
    base, expert = mixed_rows(300, gen)
    base, expert = base[2:], expert[2:]  # two overflowing rows
    run_step(base, expert, inter(temperature=0.9, top_k=5, top_p=0.8) if radix_bits == 2 else inter(), 16)


# ----------------------------------------------------------------------------------------------
# wiring
# ----------------------------------------------------------------------------------------------


def _launch(source, params, batch, vocab):
    plan = plan_select(batch, vocab, params, buffer_size=16)
    rows = RowVectors.of(torch.zeros(batch), torch.full((batch,), 0.7), torch.tensor([1]), torch.tensor([2]))
    return plan, launch_select(source, plan, Scratch.allocate(plan, torch.device("cpu")), rows, params)


class _HostFallbackSource:
    """A source with passes and row_logits only (like the hidden-state path): select_exact reads the flags."""

    def __init__(self, inner: LogitsPasses):
        self.inner = inner
        self.pass1, self.pass2, self.row_logits = inner.pass1, inner.pass2, inner.row_logits


def test_logits_path_returns_no_flags_and_other_sources_keep_the_host_fallback():
    gen = torch.Generator().manual_seed(18)
    base, expert = mixed_rows(400, gen)
    for params in (inter(), inter(temperature=0.9, top_p=0.7)):
        _, out = _launch(LogitsPasses.of(base, expert), params, 4, 400)
        assert out[4] is None
        plan, out = _launch(_HostFallbackSource(LogitsPasses.of(base, expert)), params, 4, 400)
        assert out[4] is not None and out[4].any()
        args = (base, expert, torch.zeros(4), torch.full((4,), 0.7), torch.tensor([1]), torch.tensor([2]))
        got = select_exact(_HostFallbackSource(LogitsPasses.of(base, expert)), plan,
                           Scratch.allocate(plan, torch.device("cpu")), *args[2:], params)
        assert_same_step(got, guarded_select_reference(*args, params))


def masked_rows(vocab: int, gen: torch.Generator, rows: int = 4, allowed: int = 6, shared: int = 2):
    """Top-k filtered logits (everything else -inf), each model allowing `allowed` tokens, `shared` of them both;
    the shared ones the expert finds unlikely, so SafeDecoding's amplified mixture floors them."""
    base = torch.full((rows, vocab), float("-inf"))
    expert = torch.full((rows, vocab), float("-inf"))
    for row in range(rows):
        ids = torch.randperm(vocab, generator=gen)[: 2 * allowed - shared]
        base_ids, expert_ids = ids[:allowed], ids[allowed - shared:]
        base[row, base_ids] = torch.randn(allowed, generator=gen) + 3.0
        expert[row, expert_ids] = torch.randn(allowed, generator=gen)
        expert[row, base_ids[allowed - shared:]] -= 4.0
    return base, expert


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0)])
def test_tokens_both_models_mask_are_never_chosen_in_the_kernel_or_its_fallback(no_host_read, sampling):
    """A grown intersection took tokens -inf in both models (by id among the ties); at the floor they tied the real
    candidates and the lowest id won (a helper's hunt, stop 50): greedy picked token 0, sampling drew such tokens
    half the time. They now score 0, on every backend, in the intersection kernel and its fallback alike."""
    gen = torch.Generator().manual_seed(11)
    params = inter(candidate_k=4, min_candidates=5, **sampling)
    overflowed = 0
    for _ in range(3):
        base, expert = masked_rows(256, gen)
        args, got, want = run_step(base, expert, params, buffer=8, alpha=3.0)
        chosen = want[0]
        assert bool((base.gather(1, chosen[:, None]).isfinite() | expert.gather(1, chosen[:, None]).isfinite()).all())
        overflowed += int(spiked_overflow(base, expert, 5, 8).sum())
    assert overflowed > 0, "the fallback kernel must decide some of these rows"
