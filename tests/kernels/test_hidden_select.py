"""The hidden-state step (ngsd_kernels/ops/hidden_select.py kernels, the custom op, the public wrapper)
against the PyTorch reference.

The Triton kernels run under TRITON_INTERPRET=1 on CPU (set before triton is imported). Every
kernel result is compared with ``guarded_select_reference`` applied to logits computed in float64
from the same hidden states and weights: identical tokens and spike flags, potential and
divergence within 1e-5 relative.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from ngsd_kernels import (  # noqa: E402
    CandidateMode, Divergence, GateMode, StepParams, guarded_select_from_hidden, guarded_select_reference,
)
from ngsd_kernels.ops import hidden_select, hidden_torch  # noqa: E402
from ngsd_kernels.ops.hidden_select import fused_select_from_hidden  # noqa: E402
from ngsd_kernels.ops.hidden_torch import hidden_logits  # noqa: E402
from tests.kernels.steps import assert_same_step as assert_same_outputs  # noqa: E402

# numpy warnings of Triton's CPU interpreter on the -inf/NaN rows and masked tiles these tests feed on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - set above unless the caller overrode it
    pytest.skip("these tests run the kernels interpreted (TRITON_INTERPRET=1)", allow_module_level=True)

TAU = 8.0
V_TH = 1.0


def exact_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits rounded once from a float64 product (the kernels accumulate in fp32)."""
    out = hidden.double() @ weight.double().T
    if bias is not None:
        out = out + bias.double()
    return out.float()


def reference(hb, he, wb, we, bias_b, bias_e, potential, alpha, seed, offset, **params):
    return guarded_select_reference(
        exact_logits(hb, wb, bias_b), exact_logits(he, we, bias_e), potential, alpha, seed, offset,
        StepParams(**params),
    )


def assert_same_step(got, want, potential, params):
    assert_same_outputs(got, want, atol=1e-7)
    r_div = want[3]
    if params.get("gate", GateMode.LIF) == GateMode.LIF:
        # the data must not sit on the firing threshold, or the spike comparison would be luck
        pre = (1.0 - 1.0 / TAU) * potential + r_div
        finite = torch.isfinite(pre)
        assert ((pre[finite] - V_TH).abs() > 1e-4).all(), "test data too close to v_th; change the seed"


def make_case(batch, hidden, vocab, *, dtype=torch.float32, shared=True, bias=False, expert_bias=False,
              expert_hidden=None, seed=0, spread=0.6):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    he_size = expert_hidden or hidden
    wb = randn(vocab, hidden) * 0.3
    we = None if shared else randn(vocab, he_size) * 0.3
    hb = randn(batch, hidden)
    he = hb + spread * randn(batch, hidden) if he_size == hidden else randn(batch, he_size)
    bias_b = randn(vocab) * 0.5 if bias else None
    bias_e = randn(vocab) * 0.5 if expert_bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(hb=cast(hb), he=cast(he), wb=cast(wb), we=cast(we), bias_b=bias_b, bias_e=bias_e)


def run_both(case, potential, alpha, seed, offset, num_splits=None, **params):
    """(the Triton kernels with `num_splits` vocabulary splits, the reference on exact logits)."""
    # the public convention: an expert sharing the base head shares its bias too
    bias_e = case["bias_b"] if case["bias_e"] is None and case["we"] is None else case["bias_e"]
    got = fused_select_from_hidden(
        case["hb"], case["he"], case["wb"], case["we"], case["bias_b"], bias_e, potential, alpha, seed, offset,
        StepParams(**params), num_splits=num_splits,
    )
    we = case["wb"] if case["we"] is None else case["we"]
    want = reference(case["hb"], case["he"], case["wb"], we, case["bias_b"], bias_e, potential, alpha, seed, offset,
                     **params)
    return got, want


POTENTIAL = torch.tensor([0.0, 0.95, 0.5])
ALPHA = torch.tensor([0.9, 0.5, 0.1])
SEED = torch.tensor([7, 8, 9])
OFFSET = torch.tensor([3, 3, 4])

GREEDY_CASES = {
    # name: (case kwargs, step params, num_splits)
    "shared-fp32-default-k": (dict(hidden=40, vocab=300), dict(), 3),
    "separate-heads-biases-open": (
        dict(hidden=37, vocab=301, shared=False, bias=True, expert_bias=True),
        dict(gate=GateMode.OPEN, candidate_k=8), 2,
    ),
    "shared-fp16-base-bias-open": (
        dict(hidden=33, vocab=200, dtype=torch.float16, bias=True), dict(gate=GateMode.OPEN, candidate_k=8), 2,
    ),
    "separate-bf16-other-hidden-size-kl": (
        dict(hidden=40, vocab=150, dtype=torch.bfloat16, shared=False, expert_hidden=24, seed=3),
        dict(divergence=Divergence.KL, candidate_k=8), 2,
    ),
    "js-intersection-open": (
        dict(hidden=20, vocab=130, seed=1),
        dict(divergence=Divergence.JS, gate=GateMode.OPEN, candidate_mode=CandidateMode.INTERSECTION, candidate_k=4,
             min_candidates=5), 2,
    ),
    "gate-closed-one-split": (dict(hidden=50, vocab=257, seed=2), dict(gate=GateMode.CLOSED), 1),
}


@pytest.mark.parametrize("name", list(GREEDY_CASES))
def test_greedy_matches_reference(name):
    case_kwargs, params, splits = GREEDY_CASES[name]
    case = make_case(3, **case_kwargs)
    got, want = run_both(case, POTENTIAL, ALPHA, SEED, OFFSET, num_splits=splits, **params)
    assert_same_step(got, want, POTENTIAL, params)


SAMPLING_CASES = {
    "plain-temperature": dict(temperature=0.8, candidate_k=8),
    "top-k-open": dict(temperature=1.2, top_k=5, gate=GateMode.OPEN, candidate_k=8),
    "top-k-top-p": dict(temperature=1.0, top_k=20, top_p=0.7, gate=GateMode.OPEN, candidate_k=8),
    "top-p-only": dict(temperature=0.9, top_p=0.6, gate=GateMode.CLOSED),
}


@pytest.mark.parametrize("name", list(SAMPLING_CASES))
def test_sampling_bit_identical_for_same_seed_and_offset(name):
    params = SAMPLING_CASES[name]
    case = make_case(3, hidden=24, vocab=200, seed=5, spread=1.0)
    got, want = run_both(case, POTENTIAL, ALPHA, SEED, OFFSET, num_splits=2, **params)
    assert_same_step(got, want, POTENTIAL, params)
    # the draw really depends on the counter: another offset moves at least one of a few rows
    other = guarded_select_from_hidden(case["hb"], case["he"], case["wb"], None, POTENTIAL, ALPHA, SEED,
                                       OFFSET + 101, StepParams(**params), backend="torch")
    more = guarded_select_from_hidden(case["hb"], case["he"], case["wb"], None, POTENTIAL, ALPHA, SEED + 5, OFFSET,
                                      StepParams(**params), backend="torch")
    assert not (torch.equal(other[0], want[0]) and torch.equal(more[0], want[0]))


def test_rows_spanning_several_row_blocks_with_one_shared_seed():
    # 19 rows: three row blocks of 8 (shared head, interpreter plan); one seed/offset for every row
    batch = 19
    generator = torch.Generator().manual_seed(12)
    case = make_case(batch, hidden=20, vocab=140, seed=12, spread=0.8)
    potential = torch.rand(batch, generator=generator) * 0.6
    alpha = torch.rand(batch, generator=generator)
    seed, offset = torch.tensor([123]), torch.tensor([77])
    for params in (dict(candidate_k=8), dict(temperature=0.9, top_k=6, gate=GateMode.OPEN, candidate_k=8)):
        got, want = run_both(case, potential, alpha, seed, offset, num_splits=2, **params)
        assert_same_step(got, want, potential, params)


def test_invalid_rows_and_banned_tokens():
    case = make_case(3, hidden=16, vocab=100, bias=True, seed=4)
    case["bias_b"][10:40] = float("-inf")  # banned tokens: valid rows, zero probability there
    case["hb"][0, 3] = float("nan")  # NaN logits in row 0
    case["he"][1, 5] = float("inf")  # +-inf / NaN logits in row 1
    params = dict(gate=GateMode.OPEN, candidate_k=8)
    got, want = run_both(case, POTENTIAL, ALPHA, SEED, OFFSET, num_splits=2, **params)
    assert got[0].tolist()[:2] == [-1, -1] and got[0][2] >= 0
    assert not (10 <= int(got[0][2]) < 40)
    assert_same_step(got, want, POTENTIAL, params)


def test_ties_pick_the_lowest_token_id():
    # only 5 distinct weight rows: every logit value is shared by many tokens
    generator = torch.Generator().manual_seed(6)
    distinct = torch.randn(5, 12, generator=generator)
    rows = torch.randint(0, 5, (90,), generator=generator)
    weight = distinct[rows]
    hb = torch.randn(3, 12, generator=generator)
    case = dict(hb=hb, he=hb + 0.8 * torch.randn(3, 12, generator=generator), wb=weight, we=None, bias_b=None,
                bias_e=None)
    for params in (dict(gate=GateMode.OPEN, candidate_k=3), dict(gate=GateMode.CLOSED)):
        got, want = run_both(case, POTENTIAL, ALPHA, SEED, OFFSET, num_splits=2, **params)
        assert_same_step(got, want, POTENTIAL, params)
        chosen = want[0]
        for row in range(3):
            same_value = (rows == rows[chosen[row]]).nonzero().flatten()
            assert int(chosen[row]) == int(same_value.min()), "reference tie rule: lowest id"


def test_equal_base_and_expert_rows_never_fire():
    case = make_case(3, hidden=16, vocab=120, seed=7)
    case["he"] = case["hb"].clone()
    got, want = run_both(case, POTENTIAL, ALPHA, SEED, OFFSET, num_splits=2)
    assert_same_step(got, want, POTENTIAL, {})
    # stacked rows of one dot may round differently in the last bit (BLAS edge kernels), so ~0, not 0
    assert float(got[3].abs().max()) < 1e-6 and not got[2].any()


def test_overflowing_buffers_fall_back_to_exact_rows():
    # intersection: the expert ranks tokens in the opposite order, so the two top-K lists are disjoint
    case = make_case(3, hidden=16, vocab=300, seed=8)
    case["he"] = -case["hb"]
    params = dict(gate=GateMode.OPEN, candidate_mode=CandidateMode.INTERSECTION, candidate_k=4, min_candidates=5)
    got, want = run_both(case, POTENTIAL, ALPHA, SEED, OFFSET, num_splits=2, **params)
    assert_same_step(got, want, POTENTIAL, params)
    # top-k sampling where 60 tokens tie at the k-th score: more than the top-K buffer holds
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(5, 12, generator=generator)[torch.arange(300) % 5]
    hb = torch.randn(3, 12, generator=generator)
    tied = dict(hb=hb, he=hb.clone(), wb=weight, we=None, bias_b=None, bias_e=None)
    params = dict(temperature=1.0, top_k=3, gate=GateMode.CLOSED)
    got, want = run_both(tied, POTENTIAL, ALPHA, SEED, OFFSET, num_splits=2, **params)
    assert_same_step(got, want, POTENTIAL, params)


def test_strided_inputs():
    generator = torch.Generator().manual_seed(10)
    states = torch.randn(3, 4, 24, generator=generator)  # [B, T, H]: the last position is a strided view
    expert_states = states + 0.5 * torch.randn(3, 4, 24, generator=generator)
    weight = (torch.randn(24, 140, generator=generator) * 0.3).T  # [V, H] with strides (1, V)
    hb, he = states[:, -1], expert_states[:, -1]
    assert not hb.is_contiguous() and not weight.is_contiguous()
    case = dict(hb=hb, he=he, wb=weight, we=None, bias_b=None, bias_e=None)
    got, want = run_both(case, POTENTIAL, ALPHA, SEED, OFFSET, num_splits=2, candidate_k=8)
    assert_same_step(got, want, POTENTIAL, {})


def test_torch_backend_and_cpu_auto_dispatch(monkeypatch):
    case = make_case(3, hidden=16, vocab=50, bias=True)
    want = reference(case["hb"], case["he"], case["wb"], case["wb"], case["bias_b"], case["bias_b"], POTENTIAL,
                     ALPHA, SEED, OFFSET)

    def no_kernels(*args, **kwargs):
        raise AssertionError("the CPU default must not launch the kernels")

    monkeypatch.setattr(hidden_select, "fused_select_from_hidden", no_kernels)
    for backend in ("torch", "auto"):
        got = guarded_select_from_hidden(case["hb"], case["he"], case["wb"], None, POTENTIAL, ALPHA, SEED, OFFSET,
                                         base_head_bias=case["bias_b"], backend=backend)
        assert_same_step(got, want, POTENTIAL, {})


def test_fallback_logits_are_chunked_fp32(monkeypatch):
    monkeypatch.setattr(hidden_torch, "_CHUNK", 7)
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, 9, generator=generator).bfloat16()
    weight = torch.randn(30, 9, generator=generator).bfloat16()
    bias = torch.randn(30, generator=generator)
    got = hidden_logits(hidden, weight, bias)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, exact_logits(hidden, weight, bias), rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    hb, wb = torch.randn(2, 8), torch.randn(20, 8)
    pot, alpha = torch.zeros(2), torch.full((2,), 0.5)
    call = lambda **kw: guarded_select_from_hidden(  # noqa: E731
        kw.pop("hb", hb), kw.pop("he", hb), kw.pop("wb", wb), kw.pop("we", None), kw.pop("pot", pot),
        kw.pop("alpha", alpha), **kw
    )
    with pytest.raises(ValueError, match="hidden size"):
        call(he=torch.randn(2, 6))
    with pytest.raises(ValueError, match="vocabulary"):
        call(we=torch.randn(21, 8))
    with pytest.raises(ValueError, match=r"\[vocab, 8\]"):
        call(wb=torch.randn(20, 9))
    with pytest.raises(ValueError, match="dtype"):
        call(he=hb.half())
    with pytest.raises(ValueError, match="base_head_bias"):
        call(base_head_bias=torch.zeros(19))
    with pytest.raises(ValueError, match="potential"):
        call(pot=torch.zeros(3))
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda")
    big = torch.randn(1500, 8)
    with pytest.raises(ValueError, match="buffer cap"):
        call(wb=big, backend="triton", params=StepParams(candidate_k=1100))
    # the same settings are fine on the PyTorch path, which "auto" picks on CPU anyway
    tokens, *_ = call(wb=big, params=StepParams(candidate_k=1100))
    assert tokens.shape == (2,)


def test_top_k_top_p_sampling_always_runs_on_materialised_logits():
    """The fused hidden-state passes keep no sampling candidates: top-k / top-p steps take the GEMM +
    logits kernels on any device, and forcing the fused passes is a clear error."""
    step = StepParams(temperature=0.9, top_k=5, gate=GateMode.OPEN, candidate_k=8)
    assert not hidden_select.fused_hidden_supports(300, step) and hidden_select.fused_hidden_supports(
        300, StepParams(temperature=0.9, gate=GateMode.OPEN, candidate_k=8))
    assert hidden_select.HiddenLaunch.build(3, 300, step, torch.device("cpu"), shared=True).materialise
    with pytest.raises(ValueError, match="materialise=False"):
        hidden_select.HiddenLaunch.build(3, 300, step, torch.device("cpu"), shared=True, materialise=False)


@pytest.mark.parametrize("params", [dict(candidate_k=200, gate=GateMode.OPEN),
                                    dict(temperature=0.9, top_k=150, gate=GateMode.OPEN, candidate_k=8)])
def test_buffers_above_the_fused_cap_run_gemm_and_the_logits_kernels(params):
    """A GPU plan whose top-K buffer exceeds HIDDEN_MAX_BUFFER materialises the logits (one GEMM on the
    stacked rows) and runs the logits kernels: the reference on those fp32 logits, exactly."""
    step = StepParams(**params)
    case = make_case(3, hidden=24, vocab=300, seed=4)
    assert not hidden_select.fused_hidden_fits(3, 300, step)
    launch = hidden_select.HiddenLaunch.build(3, 300, step, torch.device("cpu"), shared=True, materialise=True)
    assert launch.materialise and launch.plan.buffer == 256
    got = launch.run(case["hb"], case["he"], case["wb"], None, None, None, POTENTIAL, ALPHA, SEED, OFFSET, step)
    logits = hidden_torch.pair_logits(case["hb"], case["he"], case["wb"], None, None, None)
    want = guarded_select_reference(*logits, POTENTIAL, ALPHA, SEED, OFFSET, step)
    assert_same_step(got, want, POTENTIAL, params)


@pytest.mark.parametrize("batch", [1, 2])
def test_small_batches_reduce_inside_pass_1_step_after_step(batch):
    """B <= HIDDEN_FOLD_ROWS: the hidden-state pass 1 reduces its row block in the last split to finish
    (``_hs_pass1_reduce_kernel``) and resets the block's ticket, so one planned launch serves every
    step: three steps of one HiddenLaunch, three splits, against the reference; tickets 0 after each."""
    from ngsd_kernels.ops.hidden_select import HIDDEN_FOLD_ROWS, HiddenLaunch

    assert batch <= HIDDEN_FOLD_ROWS
    params = dict(gate=GateMode.OPEN, candidate_k=8)
    device = POTENTIAL.device  # CUDA under bench/gpu_check.sh
    launch = HiddenLaunch.build(batch, 300, StepParams(**params), device, shared=True, num_splits=3)
    assert launch.plan.fold_reduce and launch.plan.n_chunks == 3
    potential, alpha = POTENTIAL[:batch], ALPHA[:batch]
    seed, offset = SEED[:batch], OFFSET[:batch]
    for step in range(3):
        case = make_case(batch, hidden=40, vocab=300, seed=20 + step)
        got = launch.run(case["hb"], case["he"], case["wb"], None, None, None, potential, alpha, seed, offset,
                         StepParams(**params))
        want = reference(case["hb"], case["he"], case["wb"], case["wb"], None, None, potential, alpha, seed, offset,
                         **params)
        assert_same_step(got, want, potential, params)
        assert launch.scratch.tickets.tolist() == [0]
    unfolded = HiddenLaunch.build(HIDDEN_FOLD_ROWS + 1, 300, StepParams(**params), device, shared=True)
    assert not unfolded.plan.fold_reduce and unfolded.scratch.tickets is None
