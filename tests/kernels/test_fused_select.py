"""The fused Triton step kernels (ngsd_kernels/ops/fused_select.py) against the PyTorch reference.

The kernels run under TRITON_INTERPRET=1 on CPU (set here before triton is imported). Inputs are
drawn by hypothesis (shapes, dtypes, step parameters, and a seed for the row contents, which mix
plain rows, rows with ties, -inf entries, base == expert, and invalid rows). What is asserted:

- greedy: identical tokens and spike flags; potential and divergence within 1e-5 relative
  (plus 1e-6 absolute: a divergence that is 0 in exact arithmetic comes out as +-1e-7 noise in
  both implementations, e.g. for an expert equal to the base up to a constant shift);
- sampling: identical tokens to the reference for the same seed and offset (both use the same
  Philox uniforms; a different token would need two Gumbel-perturbed scores within float
  rounding of each other), bit-identical repeat draws, and a chi-square test of many draws
  against the distribution the reference defines.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ngsd_kernels import (  # noqa: E402
    CandidateMode, Divergence, GateMode, StepParams, guarded_select, guarded_select_reference,
)
from ngsd_kernels.ops import fused_select  # noqa: E402
from ngsd_kernels.ops.fused_select import (  # noqa: E402
    MAX_BUFFER,
    fused_guarded_select,
    fused_guarded_select_with_overflow,
    plan_select,
)
from ngsd_kernels.ops.select_tiles import philox_uniform as philox_uniform_tile  # noqa: E402
from ngsd_kernels.philox import philox_uniform  # noqa: E402
from tests.kernels.steps import approximate_exp, assert_same_step, near_tie_rows  # noqa: E402
from ngsd_kernels.reference import (  # noqa: E402
    intersection_candidates, row_is_valid, sampling_mask, union_candidates,
)

if not fused_select.INTERPRETED and not torch.cuda.is_available():  # pragma: no cover
    # TRITON_INTERPRET=0 without a GPU; bench/gpu_check.sh sets 0 on a CUDA machine to run them compiled
    pytest.skip("these tests need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

# the interpreter's numpy emulation warns on the NaN / inf arithmetic of invalid rows
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEFAULTS = dict(
    tau=8.0, v_th=1.0, v_reset=0.0, rho=0.6, candidate_k=64, candidate_mode=0, min_candidates=5, divergence=0,
    gate=0, temperature=0.0, top_k=0, top_p=1.0, score_floor=1e-8,
)


def step_params(values: dict) -> StepParams:
    return StepParams(**values)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VALID_KINDS = ("normal", "peaked", "grid", "equal", "shifted", "neg_inf", "kl_inf")
INVALID_KINDS = ("nan", "pos_inf", "all_neg_inf")


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def make_row(kind: str, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One (base, expert) logits row of the given kind."""
    randn = lambda scale=1.0: torch.randn(vocab, generator=gen) * scale  # noqa: E731
    if kind == "normal":
        return randn(3.0), randn(3.0)
    if kind == "peaked":  # a realistic LM step: one dominant token, a few plausible ones
        base, expert = randn(2.0), randn(2.0)
        base[torch.randint(vocab, (3,), generator=gen)] += 8.0
        expert[torch.randint(vocab, (3,), generator=gen)] += 8.0
        return base, expert
    if kind == "grid":  # many exact ties, in both rows
        return (
            torch.randint(-3, 4, (vocab,), generator=gen).float() / 2,
            torch.randint(-3, 4, (vocab,), generator=gen).float() / 2,
        )
    if kind == "equal":
        base = randn(2.0)
        return base, base.clone()
    if kind == "shifted":  # same distribution, different logits
        base = randn(2.0)
        return base, base + 3.0
    if kind in ("neg_inf", "kl_inf"):
        base, expert = randn(2.0), randn(2.0)
        holes = torch.rand(vocab, generator=gen) < 0.3
        holes[torch.randint(vocab, (1,), generator=gen)] = False  # keep one finite entry
        base[holes] = float("-inf")
        if kind == "neg_inf":
            expert[holes] = float("-inf")
        else:  # the expert rules out tokens the base allows: KL is infinite
            expert[torch.rand(vocab, generator=gen) < 0.3] = float("-inf")
            expert[torch.randint(vocab, (1,), generator=gen)] = 0.0
        return base, expert
    base, expert = randn(), randn()
    if kind == "nan":
        row = base if torch.rand(1, generator=gen) < 0.5 else expert
        row[torch.randint(vocab, (1,), generator=gen)] = float("nan")
    elif kind == "pos_inf":
        expert[torch.randint(vocab, (1,), generator=gen)] = float("inf")
    elif kind == "all_neg_inf":
        base[:] = float("-inf")
    return base, expert


def make_batch(kinds, vocab, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = [make_row(kind, vocab, gen) for kind in kinds]
    base = torch.stack([r[0] for r in rows]).to(dtype)
    expert = torch.stack([r[1] for r in rows]).to(dtype)
    potential = torch.rand(len(kinds), generator=gen) * 3.0
    seeds = torch.randint(-(2**62), 2**62, (len(kinds),), generator=gen)
    offsets = torch.randint(0, 2**40, (len(kinds),), generator=gen)
    return base, expert, potential, seeds, offsets


def gpu_near_ties(got, args, params):
    """Rows exempt from exact token / spike equality: none in the interpreter (exact exp); on a GPU the
    reference's near-ties (steps.near_tie_rows: MUFU.EX2 / LG2 are ~2 ulp)."""
    return near_tie_rows(*args, step_params(params)) if approximate_exp(got[0]) else None


def pre_spike_potential(base, expert, potential, params):
    """(1 - 1/tau) v + D of the reference, to keep test data off the firing threshold."""
    _, _, _, current = guarded_select_reference(
        base, expert, potential, torch.zeros_like(potential), torch.zeros(1, dtype=torch.int64),
        torch.zeros(1, dtype=torch.int64), params=step_params({**params, "gate": GateMode.CLOSED, "temperature": 0.0}),
    )
    return (1.0 - 1.0 / params["tau"]) * potential + current


# ----------------------------------------------------------------------------------------------
# random numbers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _uniform_kernel(seed_ptr, offset_ptr, out_ptr, V: tl.constexpr):
    row = tl.program_id(0)
    ids = tl.arange(0, V)
    seed = tl.load(seed_ptr + row)
    offset = tl.load(offset_ptr + row)
    tl.store(out_ptr + row * V + ids, philox_uniform_tile(ids, seed, offset, row))


def test_kernel_uniforms_are_bit_identical_to_philox_py():
    seeds = torch.tensor([0, 1, -1, 2**40 + 7, -(2**62)], dtype=torch.int64)
    offsets = torch.tensor([0, 5, 2**33 + 1, 123456789, 2**40], dtype=torch.int64)
    out = torch.empty(5, 64)
    _uniform_kernel[(5,)](seeds, offsets, out, V=64)
    want = philox_uniform(seeds, offsets, 64)  # row i: key seeds[i], counter (token, offsets[i], i)
    assert torch.equal(out, want)
    assert bool((out > 0).all() and (out < 1).all())


# ----------------------------------------------------------------------------------------------
# greedy: hypothesis against the reference
# ----------------------------------------------------------------------------------------------


@st.composite
def greedy_cases(draw):
    batch = draw(st.integers(1, 5))
    vocab = draw(st.one_of(st.integers(1, 40), st.integers(41, 300)))
    kinds = draw(st.lists(st.sampled_from(VALID_KINDS + INVALID_KINDS), min_size=batch, max_size=batch))
    params = dict(
        DEFAULTS,
        candidate_mode=draw(st.sampled_from(list(CandidateMode))),
        gate=draw(st.sampled_from(list(GateMode))),
        divergence=draw(st.sampled_from(list(Divergence))),
        candidate_k=draw(st.integers(1, 40)),
        min_candidates=draw(st.integers(1, 12)),
        tau=draw(st.sampled_from([1.0, 2.0, 8.0])),
        v_th=draw(st.sampled_from([0.05, 0.5, 1.0])),
        rho=draw(st.sampled_from([0.0, 0.6, 0.95])),
        v_reset=draw(st.sampled_from([0.0, -0.25])),
    )
    alpha = torch.tensor(
        draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0, 3.0, -0.5]), min_size=batch, max_size=batch))
    )
    return dict(
        kinds=kinds,
        vocab=vocab,
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
        alpha=alpha,
        params=params,
        block_v=draw(st.sampled_from([None, 64, 128])),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=greedy_cases())
def test_greedy_matches_reference(case):
    base, expert, potential, seeds, offsets = make_batch(case["kinds"], case["vocab"], case["dtype"], case["seed"])
    params = case["params"]
    pre = pre_spike_potential(base, expert, potential, params)
    # a potential within float rounding of v_th would make the spike comparison a coin flip
    assume(bool(((pre - params["v_th"]).abs() > 1e-4 * max(1.0, params["v_th"]))[torch.isfinite(pre)].all()))
    args = (base, expert, potential, case["alpha"], seeds, offsets)
    want = guarded_select_reference(*args, params=step_params(params))
    assume(not decided_by_rounding(base, expert, case["alpha"], want[2], params))
    got = fused_guarded_select(*args, block_v=case["block_v"], params=step_params(params))
    assert_same_step(got, want, near_tie=gpu_near_ties(got, args, params))
    # inputs are never written
    assert torch.equal(potential, make_batch(case["kinds"], case["vocab"], case["dtype"], case["seed"])[2])


def test_greedy_large_vocab_small_batch():
    """V = 50000 split over several vocabulary chunks, the realistic shape of a decode step."""
    gen = torch.Generator().manual_seed(3)
    vocab = 50_000
    base = torch.randn(2, vocab, generator=gen)
    expert = base + torch.randn(2, vocab, generator=gen) * 0.3
    base[:, 17] += 14.0  # the base wants token 17 ...
    expert[:, 40_001] += 16.0  # ... the expert token 40001
    potential = torch.tensor([0.0, 2.0])  # the second row fires
    alpha = torch.tensor([0.9, 0.9])
    zero = torch.zeros(1, dtype=torch.int64)
    for mode in CandidateMode:
        params = dict(DEFAULTS, candidate_mode=mode, candidate_k=10 if mode else 64)
        want = guarded_select_reference(base, expert, potential, alpha, zero, zero, params=step_params(params))
        got = fused_guarded_select(base, expert, potential, alpha, zero, zero, params=step_params(params))
        assert_same_step(got, want)
        assert want[2].tolist() == [False, True] and want[0][0] == 17
        # union mode takes the expert's favourite; the intersection holds only tokens both rank high
        assert (want[0][1] == 40_001) == (mode == CandidateMode.UNION)


def test_pass1_on_wider_chunks_than_pass2():
    """SelectPlan.pass1_block_v (a GPU's plan for buffers of 1024, where pass 1 and the reduce run on
    [1, 8192] tiles and pass 2 on [1, 4096]), at a small scale: pass 1 on chunks 4x pass 2's, a short
    last pass-1 chunk, union and intersection, greedy and top-k sampling, against the reference."""
    gen = torch.Generator().manual_seed(11)
    vocab = 3000
    base = torch.randn(3, vocab, generator=gen) * 2.0
    expert = base + torch.randn(3, vocab, generator=gen)
    potential = torch.tensor([0.0, 2.0, 2.0])  # rows 1 and 2 fire
    alpha = torch.tensor([0.9, 0.9, 0.5])
    seed, offset = torch.tensor([5]), torch.tensor([9])
    for mode, sampling in ((0, {}), (1, {}), (0, dict(temperature=0.8, top_k=100))):
        params = step_params(dict(DEFAULTS, candidate_mode=mode, candidate_k=100, min_candidates=100, **sampling))
        plan = plan_select(3, vocab, params, block_v=256, pass1_block_v=1024)
        assert (plan.n_chunks, plan.pass1_chunks, plan.pass1_bv) == (12, 3, 1024)
        want = guarded_select_reference(base, expert, potential, alpha, seed, offset, params=params)
        got = fused_guarded_select(base, expert, potential, alpha, seed, offset, params, block_v=256,
                                   pass1_block_v=1024)
        assert_same_step(got, want)
        assert want[2].tolist() == [False, True, True]


@pytest.mark.parametrize("candidate_k, block_v, vocab", [(12, 512, 2100), (40, 64, 2560)])
def test_folded_reduce_resets_its_tickets_for_the_next_step(candidate_k, block_v, vocab):
    """Pass 1 with the reduce folded in (SelectPlan.fold_reduce): the last program of each row block to
    take its ticket reduces the block and sets the ticket back to 0, so one scratch serves step after
    step. Three row blocks (the last one short), three steps of one plan and scratch, each against the
    reference; the tickets read 0 after every step (5 and 40 chunks a row block)."""
    from ngsd_kernels.ops.fused_select import LogitsPasses
    from ngsd_kernels.ops.launcher import Scratch, select_exact

    gen = torch.Generator().manual_seed(3)
    batch = 5
    params = step_params(dict(DEFAULTS, candidate_k=candidate_k))
    plan = plan_select(batch, vocab, params, block_v=block_v, block_b=2)
    assert plan.fold_reduce and plan.launches == 3 and plan.block_b == 2
    potential = torch.tensor([0.0, 2.0, 2.0, 0.5, 2.0])  # rows 1, 2 and 4 fire
    scratch = Scratch.allocate(plan, potential.device)  # CUDA under bench/gpu_check.sh
    alpha = torch.full((batch,), 0.9)
    seed, offset = torch.tensor([1]), torch.tensor([0])
    for _ in range(3):
        base = torch.randn(batch, vocab, generator=gen) * 2.0
        expert = base + torch.randn(batch, vocab, generator=gen)
        got = select_exact(LogitsPasses.of(base, expert), plan, scratch, potential, alpha, seed, offset, params)
        want = guarded_select_reference(base, expert, potential, alpha, seed, offset, params=params)
        assert_same_step(got, want)
        assert want[2].tolist() == [False, True, True, False, True]
        assert scratch.tickets.tolist() == [0, 0, 0]


@pytest.mark.skipif(fused_select.INTERPRETED, reason="a GPU check (bench/gpu_check.sh): the interpreter runs programs "
                    "one after another, so it cannot race; 20 steps of [64, 131072] would take it hours")
def test_folded_reduce_under_a_full_gpu_grid():
    """The ticket's memory ordering on a GPU: thousands of pass-1 programs at once, each row's reduce run
    by whichever of its 32 programs finishes last, 20 steps on one scratch; every step against the
    reference (a reduce that read a chunk's partials before they landed gives wrong thresholds or
    log-sum-exps, so wrong spikes, divergences or tokens)."""
    from ngsd_kernels.ops.fused_select import LogitsPasses
    from ngsd_kernels.ops.launcher import Scratch, select_exact

    gen = torch.Generator().manual_seed(5)
    batch, vocab = 64, 131072
    params = step_params(dict(DEFAULTS, candidate_k=64))
    plan = plan_select(batch, vocab, params)
    assert plan.fold_reduce and plan.pass1_chunks == 32
    potential = torch.rand(batch, generator=gen) * 1.6
    alpha = torch.full((batch,), 0.9)
    seed, offset = torch.tensor([1]), torch.tensor([0])
    scratch = Scratch.allocate(plan, potential.device)
    for _ in range(20):
        base = (torch.randn(batch, vocab, generator=gen) * 3.0).to(torch.bfloat16)
        expert = (base.float() + torch.randn(batch, vocab, generator=gen)).to(torch.bfloat16)
        got = select_exact(LogitsPasses.of(base, expert), plan, scratch, potential, alpha, seed, offset, params)
        want = guarded_select_reference(base, expert, potential, alpha, seed, offset, params=params)
        assert_same_step(got, want)
        assert int(scratch.tickets.abs().sum()) == 0


def test_rows_do_not_depend_on_the_other_rows():
    base, expert, potential, seeds, offsets = make_batch(["peaked", "normal", "neg_inf", "nan", "grid"], 200,
                                                         torch.float32, 11)
    alpha = torch.full((5,), 0.9)
    other_base, other_expert, other_potential, _, _ = make_batch(["normal"] * 5, 200, torch.float32, 12)
    for params in (dict(DEFAULTS, gate=GateMode.OPEN), dict(DEFAULTS, temperature=0.8, top_k=20, top_p=0.9)):
        together = fused_guarded_select(base, expert, potential, alpha, seeds, offsets, params=step_params(params))
        for row in range(5):
            # the same row at the same position (its index names its sampling stream) among other rows
            keep = torch.arange(5) == row
            mixed = [torch.where(keep[:, None], a, b) for a, b in ((base, other_base), (expert, other_expert))]
            pot = torch.where(keep, potential, other_potential)
            alone = fused_guarded_select(*mixed, pot, alpha, seeds, offsets, params=step_params(params))
            if params["temperature"] == 0.0:  # greedy rows do not even depend on their position
                alone = fused_guarded_select(
                    base[row : row + 1], expert[row : row + 1], potential[row : row + 1], alpha[row : row + 1],
                    seeds[row : row + 1], offsets[row : row + 1], params=step_params(params),
                )
                alone = [out.expand(5) for out in alone]
            for batch_out, row_out in zip(together, alone):
                torch.testing.assert_close(batch_out[row], row_out[row], rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------


@st.composite
def sampling_cases(draw):
    batch = draw(st.integers(1, 4))
    # no "grid" rows: with exact ties, whether a token sits inside the top-p nucleus can hinge on
    # the last bit of a cumulative sum, which legitimately differs between implementations
    kinds = draw(st.lists(st.sampled_from(("normal", "peaked", "equal", "neg_inf") + INVALID_KINDS),
                          min_size=batch, max_size=batch))
    params = dict(
        DEFAULTS,
        candidate_mode=draw(st.sampled_from(list(CandidateMode))),
        gate=draw(st.sampled_from(list(GateMode))),
        candidate_k=draw(st.integers(1, 30)),
        min_candidates=draw(st.integers(1, 8)),
        v_th=0.5,
        temperature=draw(st.sampled_from([0.3, 0.7, 1.0, 1.7])),
        top_k=draw(st.sampled_from([0, 1, 3, 10, 50])),
        top_p=draw(st.sampled_from([1.0, 0.9, 0.5])),
    )
    return dict(
        kinds=kinds,
        vocab=draw(st.integers(2, 260)),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
        alpha=torch.tensor(draw(st.lists(st.sampled_from([0.1, 0.5, 0.9, 2.0]), min_size=batch, max_size=batch))),
        params=params,
        block_v=draw(st.sampled_from([None, 64])),
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=sampling_cases())
def test_sampling_matches_reference_for_same_seed_and_offset(case):
    base, expert, potential, seeds, offsets = make_batch(case["kinds"], case["vocab"], case["dtype"], case["seed"])
    params = case["params"]
    pre = pre_spike_potential(base, expert, potential, params)
    assume(bool(((pre - params["v_th"]).abs() > 1e-4)[torch.isfinite(pre)].all()))
    args = (base, expert, potential, case["alpha"], seeds, offsets)
    want = guarded_select_reference(*args, params=step_params(params))
    got = fused_guarded_select(*args, block_v=case["block_v"], params=step_params(params))
    assert_same_step(got, want, near_tie=gpu_near_ties(got, args, params))
    again = fused_guarded_select(*args, block_v=case["block_v"], params=step_params(params))
    assert torch.equal(got[0], again[0])


def row_scores(base, expert, alpha, spike, params):
    """[1, V] scores s of one row, from the reference's own definitions."""
    lb, le = base.float()[None], expert.float()[None]
    pb, pe = torch.softmax(lb, -1), torch.softmax(le, -1)
    scores = pb
    if spike:
        mixed = pb + alpha * (pe - pb)
        if params["candidate_mode"] == CandidateMode.UNION:
            scores = torch.where(union_candidates(lb, le, params["candidate_k"]), mixed, pb)
        else:
            in_set = intersection_candidates(lb, le, params["candidate_k"], params["min_candidates"])
            guarded = torch.where(in_set, mixed.clamp_min(params["score_floor"]), torch.zeros_like(mixed))
            scores = guarded / guarded.sum()
    return scores


def decided_by_rounding(base, expert, alpha, spike, params) -> bool:
    """A row whose best score is within float rounding of the score of a token with other logits (say
    p_b + (p_e - p_b) for two tokens of equal p_e, alpha 1): its arg-max depends on how each backend
    rounds, not on the tie rule, so token equality cannot be asked of it."""
    for row in range(base.shape[0]):
        lb, le = base[row].float(), expert[row].float()
        if not bool(row_is_valid(torch.stack([lb, le])).all()):
            continue
        scores = row_scores(base[row], expert[row], float(alpha[row]), bool(spike[row]), params)[0]
        best = int(torch.argmax(scores))
        near = (scores - scores[best]).abs() <= 1e-6 * scores[best].abs() + 1e-12
        other_logits = (lb != lb[best]) | (le != le[best])
        if bool((near & other_logits).any()):
            return True
    return False


def reference_distribution(base, expert, alpha, spike, params):
    """q ∝ max(s, 0)^(1/T) on the kept set, for one row, from the reference's own definitions."""
    scores = row_scores(base, expert, alpha, spike, params)
    positive = scores.clamp_min(0.0).double()
    keep = sampling_mask(positive.float(), params["top_k"], params["top_p"])
    weights = torch.where(keep, positive ** (1.0 / params["temperature"]), torch.zeros_like(positive))
    return (weights / weights.sum())[0]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(gate=GateMode.CLOSED, temperature=1.3),
        dict(gate=GateMode.OPEN, temperature=0.7, top_k=6, candidate_k=4),
        dict(gate=GateMode.OPEN, temperature=1.0, top_p=0.8, candidate_mode=CandidateMode.INTERSECTION,
             candidate_k=3, min_candidates=4),
    ],
    ids=["plain", "union-topk", "intersection-topp"],
)
def test_sampling_distribution_chi_square(overrides):
    """4000 draws (one row repeated, offsets 0..3999) against the reference distribution."""
    gen = torch.Generator().manual_seed(5)
    vocab, draws = 24, 4000
    base_row = torch.randn(vocab, generator=gen) * 1.5
    expert_row = torch.randn(vocab, generator=gen) * 1.5
    params = dict(DEFAULTS, **overrides)
    probs = reference_distribution(base_row, expert_row, 0.9, params["gate"] == GateMode.OPEN, params)
    base, expert = base_row.expand(draws, vocab), expert_row.expand(draws, vocab)
    tokens = fused_guarded_select(
        base, expert, torch.zeros(draws), torch.full((draws,), 0.9), torch.tensor([1234]),
        torch.arange(draws), params=step_params(params),
    )[0]
    counts = torch.bincount(tokens, minlength=vocab).double()
    expected = probs * draws
    assert counts[expected == 0].sum() == 0, "drew a token the reference gives probability 0"
    # pool the bins the chi-square approximation cannot carry (expected count < 5)
    small = (expected > 0) & (expected < 5)
    obs = torch.cat([counts[expected >= 5], counts[small].sum()[None]])
    exp = torch.cat([expected[expected >= 5], expected[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    assert dof >= 2, "the case should keep several tokens"
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))
    assert p_value > 1e-3, (stat, dof, p_value)
    # and the same seed and offsets give the reference's draws
    want = guarded_select_reference(
        base, expert, torch.zeros(draws), torch.full((draws,), 0.9), torch.tensor([1234]), torch.arange(draws),
        params=step_params(params),
    )[0]
    assert torch.equal(tokens, want)


# ----------------------------------------------------------------------------------------------
# bounded buffers: overflow detection and the exact fallback (top-k / top-p and intersection rows
# on the GPU, without a host read)
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_host_read(monkeypatch):
    """Fails the test if the launcher reads overflow flags on the host (its fallback's torch.nonzero)."""
    from ngsd_kernels.ops import launcher

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of the overflow flags")

    monkeypatch.setattr(launcher.torch, "nonzero", forbidden)


def test_top_p_nucleus_larger_than_buffer_falls_back_exactly(no_host_read):
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(6, 1000, generator=gen) * 0.3  # flat: the 0.9-nucleus holds hundreds of tokens
    base[3] *= 40.0  # ... except in this row
    expert = torch.randn(6, 1000, generator=gen) * 0.3
    params = dict(DEFAULTS, candidate_k=8, gate=GateMode.OPEN, temperature=1.0, top_p=0.9)
    args = (base, expert, torch.zeros(6), torch.full((6,), 0.5), torch.arange(6), torch.tensor([9]))
    raw = fused_guarded_select_with_overflow(*args, buffer_size=16, block_v=64, params=step_params(params))
    overflow = raw[4]
    assert overflow.tolist() == [True, True, True, False, True, True]
    want = guarded_select_reference(*args, params=step_params(params))
    assert raw[0][3] == want[0][3]  # the row that fit is exact without the fallback
    assert_same_step(fused_guarded_select(*args, buffer_size=16, block_v=64, params=step_params(params)), want)


def test_top_k_ties_past_the_buffer_fall_back_exactly(no_host_read):
    base = torch.zeros(2, 300)  # every token ties: the top-5 set is the whole row
    base[1, :10] = torch.arange(10.0)  # distinct leaders: the top-5 set fits
    expert = base.clone()
    params = dict(DEFAULTS, candidate_k=4, gate=GateMode.CLOSED, temperature=1.0, top_k=5)
    args = (base, expert, torch.zeros(2), torch.full((2,), 0.5), torch.tensor([3]), torch.tensor([4]))
    step = step_params(params)
    assert fused_guarded_select_with_overflow(*args, step, buffer_size=16)[4].tolist() == [True, False]
    assert_same_step(fused_guarded_select(*args, step, buffer_size=16), guarded_select_reference(*args, step))


def test_top_p_after_top_k_ties_past_the_buffer_is_flagged_and_exact(no_host_read):
    # top-k = 12 keeps 3 leaders and 60 tokens tied at the 12th value: 63 > 16 slots. Top-p then keeps
    # only leaders, but its normaliser is the mass of all 63; the buffer sees 16 of them, so the row must
    # be flagged even though its final kept set ends before the last slot (it was not, before 2026-12-02)
    base = torch.full((2, 300), -5.0)
    base[:, :3] = torch.tensor([2.0, 1.9, 1.8])
    base[:, 3:63] = 1.0
    base[1, 3:63] = -5.0
    base[1, 3:12] = torch.linspace(1.0, 0.5, 9)  # row 1: a top-12 set of distinct values, which fits
    expert = base.clone()
    params = dict(DEFAULTS, candidate_k=4, gate=GateMode.CLOSED, temperature=1.0, top_k=12, top_p=0.3)
    args = (base, expert, torch.zeros(2), torch.full((2,), 0.5), torch.tensor([5]), torch.tensor([6]))
    step = step_params(params)
    assert fused_guarded_select_with_overflow(*args, step, buffer_size=16)[4].tolist() == [True, False]
    for seed in range(8):
        args = args[:4] + (torch.tensor([seed]), args[5])
        assert_same_step(fused_guarded_select(*args, step, buffer_size=16), guarded_select_reference(*args, step))


def test_intersection_growing_past_the_buffer_falls_back_exactly(no_host_read):
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(3, 400, generator=gen)
    expert = -base  # opposite orders: the intersection only fills up around rank V/2
    expert[1] = base[1] + 0.01 * torch.randn(400, generator=gen)  # nearly the same order: fits
    params = dict(DEFAULTS, candidate_mode=CandidateMode.INTERSECTION, candidate_k=5, min_candidates=5,
                  gate=GateMode.OPEN)
    args = (base, expert, torch.zeros(3), torch.full((3,), 0.7), torch.tensor([0]), torch.tensor([0]))
    step = step_params(params)
    assert fused_guarded_select_with_overflow(*args, step, buffer_size=64)[4].tolist() == [True, False, True]
    assert_same_step(fused_guarded_select(*args, step, buffer_size=64), guarded_select_reference(*args, step))
    sampled = dict(params, temperature=0.9, top_p=0.7)
    assert_same_step(
        fused_guarded_select(*args, step_params(sampled), buffer_size=64),
        guarded_select_reference(*args, step_params(sampled)),
    )


# ----------------------------------------------------------------------------------------------
# layouts and bad input
# ----------------------------------------------------------------------------------------------


def test_row_strided_views_are_read_in_place_without_touching_the_padding():
    """Logits as a column slice of a wider buffer whose padding is NaN: any read past V shows."""
    gen = torch.Generator().manual_seed(2)
    wide_b = torch.full((3, 137), float("nan"))
    wide_e = torch.full((3, 137), float("nan"))
    wide_b[:, :100] = torch.randn(3, 100, generator=gen)
    wide_e[:, :100] = torch.randn(3, 100, generator=gen)
    base, expert = wide_b[:, :100], wide_e[:, :100]
    assert base.stride() == (137, 1)
    args = (base, expert, torch.zeros(3), torch.full((3,), 0.9), torch.tensor([1]), torch.tensor([2]))
    for params in (dict(DEFAULTS, gate=GateMode.OPEN), dict(DEFAULTS, temperature=0.9, top_p=0.8)):
        want = guarded_select_reference(base.contiguous(), expert.contiguous(), *args[2:], params=step_params(params))
        assert_same_step(fused_guarded_select(*args, block_v=32, params=step_params(params)), want)


def test_non_unit_vocab_stride_is_copied_and_exact():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(50, 3, generator=gen).T  # stride (1, 3)
    expert = torch.randn(50, 3, generator=gen).T
    args = (base, expert, torch.zeros(3), torch.full((3,), 0.9), torch.tensor([1]), torch.tensor([2]))
    params = StepParams(gate=GateMode.OPEN, candidate_k=5)
    assert_same_step(fused_guarded_select(*args, params), guarded_select_reference(*args, params))


def test_invalid_rows_follow_the_reference():
    base = torch.randn(4, 30)
    expert = torch.randn(4, 30)
    base[0, 3] = float("nan")
    expert[1, 7] = float("inf")
    base[2] = float("-inf")
    potential = torch.tensor([0.5, 0.6, 0.7, 0.8])
    zero = torch.zeros(1, dtype=torch.int64)
    tokens, new_v, spike, div = fused_guarded_select(base, expert, potential, torch.full((4,), 0.9), zero, zero,
                                                     StepParams(gate=GateMode.OPEN))
    assert tokens[:3].tolist() == [-1, -1, -1] and tokens[3] >= 0
    assert spike.tolist() == [False, False, False, True]
    assert torch.isnan(div[:3]).all() and torch.isfinite(div[3])
    assert torch.equal(new_v[:3], potential[:3])


def test_empty_batch_and_vocabulary():
    zero = torch.zeros(1, dtype=torch.int64)
    out = fused_guarded_select(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0), torch.zeros(0), zero, zero)
    assert [t.shape[0] for t in out] == [0, 0, 0, 0]
    sampled = StepParams(temperature=0.5)  # philox_uniform over 0 rows: a reshape once failed on it
    for backend in ("torch", "triton"):
        out = guarded_select(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0), torch.zeros(0), zero, zero,
                             sampled, backend=backend)
        assert [t.shape[0] for t in out] == [0, 0, 0, 0]
    tokens, new_v, spike, div = fused_guarded_select(
        torch.zeros(2, 0), torch.zeros(2, 0), torch.ones(2), torch.zeros(2), zero, zero
    )
    assert tokens.tolist() == [-1, -1] and new_v.tolist() == [1.0, 1.0] and not spike.any() and div.isnan().all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "expert_logits": a["expert_logits"][:, :-1]}, "differ in shape"),
        (lambda a: {**a, "base_logits": a["base_logits"][0]}, r"\[batch, vocab\]"),
        (lambda a: {**a, "expert_logits": a["expert_logits"].half()}, "float32, float16 or bfloat16"),
        (lambda a: {**a, "base_logits": a["base_logits"].long(), "expert_logits": a["expert_logits"].long()},
         "float32, float16 or bfloat16"),
        (lambda a: {**a, "potential": a["potential"].double()}, "potential must be torch.float32"),
        (lambda a: {**a, "alpha": a["alpha"][:1]}, "must have shape"),
        (lambda a: {**a, "seed": torch.zeros(3, dtype=torch.int64)}, "seed and offset"),
        (lambda a: {**a, "offset": torch.zeros(1, dtype=torch.int32)}, "offset must be torch.int64"),
        (lambda a: {**a, "potential": a["potential"].to("meta")}, "one device"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    args = dict(
        base_logits=torch.randn(2, 10), expert_logits=torch.randn(2, 10), potential=torch.zeros(2),
        alpha=torch.zeros(2), seed=torch.zeros(1, dtype=torch.int64), offset=torch.zeros(1, dtype=torch.int64),
    )
    with pytest.raises(ValueError, match=message):
        fused_guarded_select(**change(args))


def test_buffer_caps_and_floor_raise_clear_errors():
    big = torch.randn(1, 3000)
    zero = torch.zeros(1, dtype=torch.int64)
    args = (big, big, torch.zeros(1), torch.zeros(1), zero, zero)
    with pytest.raises(ValueError, match=f"candidate_k={MAX_BUFFER + 1} exceeds"):
        fused_guarded_select(*args, StepParams(candidate_k=MAX_BUFFER + 1))
    with pytest.raises(ValueError, match="top_k=2000 exceeds"):
        fused_guarded_select(*args, StepParams(temperature=1.0, top_k=2000))
    with pytest.raises(ValueError, match="score_floor must be > 0"):
        fused_guarded_select(*args, StepParams(score_floor=0.0))
    # k above the vocabulary is clipped like the reference, not refused
    small = torch.randn(2, 30)
    zero2 = (small, small.flip(-1), torch.zeros(2), torch.ones(2), zero, zero)
    params = StepParams(candidate_k=5000, top_k=5000, temperature=1.0, gate=GateMode.OPEN)
    assert_same_step(fused_guarded_select(*zero2, params), guarded_select_reference(*zero2, params))


def test_plan_counts_launches_and_buffers():
    greedy = plan_select(8, 49152, StepParams())
    assert greedy.launches == 3 and greedy.fold_reduce and greedy.buffer == 64 and not greedy.may_overflow
    assert greedy.sample == 0
    inter = plan_select(8, 49152, StepParams(candidate_k=10, candidate_mode=1, gate=1))
    assert inter.launches == 5 and not inter.fold_reduce and inter.may_overflow and not inter.need_v0
    closed = plan_select(8, 49152, StepParams(gate=2, temperature=0.7))
    assert not closed.need_keys and closed.sample == 1 and not closed.need_v1 and closed.fold_reduce
    # a shut gate needs no intersection: its reduce folds in intersection mode too
    assert plan_select(8, 49152, StepParams(candidate_mode=1, gate=2)).launches == 3


def test_public_entry_triton_backend_matches_torch_backend():
    base, expert, potential, seeds, offsets = make_batch(["peaked", "normal", "equal"], 77, torch.bfloat16, 21)
    alpha = torch.tensor([0.9, 0.5, 0.1])
    for params in (dict(gate=GateMode.LIF, v_th=0.3), dict(temperature=0.8, top_p=0.9, gate=GateMode.OPEN)):
        assert_same_step(
            guarded_select(base, expert, potential, alpha, seeds, offsets, step_params(params), backend="triton"),
            guarded_select(base, expert, potential, alpha, seeds, offsets, step_params(params), backend="torch"),
        )
