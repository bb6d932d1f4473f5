"""The step op's gate and mixture math against hand-computed cases (NGSD_SPEC.md section 3)."""

from __future__ import annotations

import math

import pytest
import torch

from ngsd_kernels import CandidateMode, Divergence, GateMode, StepParams, guarded_select


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(probs, dtype=torch.float64)).float()


def step(base, expert, v, alpha, **kwargs):
    tokens, new_v, spike, d = guarded_select(
        base[None], expert[None], torch.tensor([v]), torch.tensor([alpha]), params=StepParams(**kwargs), backend="torch"
    )
    return int(tokens[0]), float(new_v[0]), bool(spike[0]), float(d[0])


def test_total_variation_of_two_known_distributions():
    base = logits_of([0.5, 0.3, 0.2])
    expert = logits_of([0.2, 0.3, 0.5])
    _, _, _, d = step(base, expert, 0.0, 0.5)
    assert d == pytest.approx(0.3, rel=1e-5)  # 0.5 * (0.3 + 0 + 0.3)


def test_kl_and_js_options():
    pb, pe = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]
    kl = sum(a * math.log(a / b) for a, b in zip(pb, pe))
    m = [(a + b) / 2 for a, b in zip(pb, pe)]
    js = 0.5 * sum(a * math.log(a / c) for a, c in zip(pb, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(pe, m))
    _, _, _, d_kl = step(logits_of(pb), logits_of(pe), 0.0, 0.5, divergence=Divergence.KL)
    _, _, _, d_js = step(logits_of(pb), logits_of(pe), 0.0, 0.5, divergence=Divergence.JS)
    assert d_kl == pytest.approx(kl, rel=1e-5)
    assert d_js == pytest.approx(js, rel=1e-5)


def test_spike_timing_and_soft_reset_under_constant_input():
    """D = 0.3 each step, tau 8: v = 0.3, 0.5625, 0.7922, 0.9931, 1.1689 -> first spike at step 5."""
    base = logits_of([0.5, 0.3, 0.2])
    expert = logits_of([0.2, 0.3, 0.5])
    v, expected_v, fired_at = 0.0, 0.0, []
    for n in range(1, 9):
        _, v, spike, d = step(base, expert, v, 0.9)
        expected_v = (1 - 1 / 8) * expected_v + 0.3
        if expected_v >= 1.0:
            expected_v = 0.6 * expected_v  # soft reset towards v_reset = 0 with rho = 0.6
        assert v == pytest.approx(expected_v, rel=1e-5)
        if spike:
            fired_at.append(n)
    assert fired_at[0] == 5
    assert v < 1.0


@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
def test_an_infinite_kl_current_with_rho_0_resets_the_potential_instead_of_poisoning_it(backend):
    """The expert rules out a token the base allows: KL is inf. A hard reset (rho = 0) must give v_reset,
    not v_reset + 0 * inf = NaN, after which the neuron would never fire again."""
    params = StepParams(divergence=Divergence.KL, rho=0.0)
    lb = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    le = torch.tensor([[2.0, 1.0, 0.0, -float("inf")]])
    _, v, spike, d = guarded_select(lb, le, torch.zeros(1), torch.full((1,), 0.9), params=params, backend=backend)
    assert math.isinf(float(d[0])) and bool(spike[0]) and float(v[0]) == 0.0
    far_b, far_e = logits_of([0.97, 0.01, 0.01, 0.01]), logits_of([0.01, 0.01, 0.01, 0.97])
    _, v, spike, _ = guarded_select(far_b[None], far_e[None], v, torch.full((1,), 0.9), params=params, backend=backend)
    assert bool(spike[0]) and float(v[0]) == 0.0  # still firing on a large finite current


def test_steady_state_fires_only_above_one_over_tau():
    """Constant D settles near tau * D: D = 0.12 < 1/8 never fires, D = 0.13 does."""
    for tv, fires in ((0.12, False), (0.13, True)):
        base = logits_of([0.5, 0.5])
        expert = logits_of([0.5 - tv, 0.5 + tv])
        v, any_spike = 0.0, False
        for _ in range(200):
            _, v, spike, _ = step(base, expert, v, 0.5)
            any_spike |= spike
        assert any_spike == fires


def test_mixture_on_union_candidates_only():
    """k = 1: candidates are the base's top token (0) and the expert's top token (3)."""
    pb = [0.40, 0.35, 0.15, 0.10]
    pe = [0.10, 0.15, 0.05, 0.70]
    base, expert = logits_of(pb), logits_of(pe)
    # alpha 0.5: s0 = 0.25, s3 = 0.40, s1 stays 0.35 (not a candidate) -> token 3
    token, _, spike, _ = step(base, expert, 5.0, 0.5, candidate_k=1)
    assert spike and token == 3
    # alpha 0.2: s0 = 0.34, s3 = 0.22, s1 = 0.35 untouched -> token 1, outside the candidate set
    token, _, _, _ = step(base, expert, 5.0, 0.2, candidate_k=1)
    assert token == 1
    # no spike: base argmax
    token, _, spike, _ = step(base, expert, 0.0, 0.9, candidate_k=1)
    assert not spike and token == 0


def test_ties_pick_the_lowest_token_id_and_ties_join_the_candidate_set():
    base = logits_of([0.3, 0.3, 0.3, 0.1])
    expert = logits_of([0.1, 0.1, 0.1, 0.7])
    token, _, _, _ = step(base, base, 0.0, 0.5)
    assert token == 0
    # k = 1 still admits all three tied base tokens; alpha = 1 turns them into expert probabilities
    token, _, _, _ = step(base, expert, 5.0, 1.0, candidate_k=1, gate=GateMode.OPEN)
    assert token == 3


def test_gate_modes_open_and_closed():
    base = logits_of([0.6, 0.4])
    expert = logits_of([0.1, 0.9])
    assert step(base, expert, 0.0, 0.9, gate=GateMode.OPEN)[0] == 1
    assert step(base, expert, 50.0, 0.9, gate=GateMode.CLOSED)[0] == 0


def test_safedecoding_intersection_grows_until_c_tokens():
    """Top-1 lists {0} and {3} do not meet; k grows until the intersection holds c = 2 tokens."""
    pb = [0.40, 0.30, 0.20, 0.10]
    pe = [0.05, 0.30, 0.25, 0.40]
    token, _, spike, _ = step(
        logits_of(pb), logits_of(pe), 0.0, 3.0,
        candidate_mode=CandidateMode.INTERSECTION, candidate_k=1, min_candidates=2, gate=GateMode.OPEN,
    )
    # base ranks 0,1,2,3 / expert ranks 3,1,2,0: at k=3 the intersection is {1, 2}
    # s1 = 0.30 + 3 * 0 = 0.30, s2 = 0.20 + 3 * 0.05 = 0.35 -> token 2 (token 0, the base favourite, is excluded)
    assert spike and token == 2


def test_invalid_rows_are_flagged_not_decoded():
    good = logits_of([0.5, 0.5])
    bad = torch.tensor([float("nan"), 0.0])
    all_masked = torch.full((2,), -float("inf"))
    tokens, v, spike, d = guarded_select(
        torch.stack([good, bad, all_masked]), torch.stack([good, good, good]), torch.full((3,), 0.25),
        torch.full((3,), 0.5), backend="torch",
    )
    assert tokens.tolist()[1:] == [-1, -1]
    assert torch.isnan(d[1:]).all() and not torch.isnan(d[0])
    assert v[1:].tolist() == [0.25, 0.25]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tau=0.0), "tau"),
        (dict(rho=-0.1), "rho"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=1e-40), "temperature must be 0 \\(greedy\\) or >= 1e-05"),  # log(q) / T: all -inf
        (dict(candidate_k=0), "candidate_k"),
    ],
)
def test_op_rejects_invalid_parameters(kwargs, message):
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=message):
        guarded_select(x, x, torch.zeros(1), torch.zeros(1), params=StepParams(**kwargs))


def test_op_rejects_mismatched_vocabularies_and_dtypes():
    with pytest.raises(ValueError, match="vocabulary"):
        guarded_select(torch.zeros(1, 4), torch.zeros(1, 5), torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        guarded_select(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1),
                       torch.zeros(1))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy on masked lanes (log 0)
@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
def test_top_p_is_applied_to_the_tempered_distribution(backend):
    """Spec 3.5 (and transformers' order): top-p reads q ∝ s^(1/T). s = [.5, .3, .2]: at T = 0.5, q = [.66, .24, .11]
    and a top-p of 0.6 keeps token 0 alone (read at T = 1 it kept tokens 0 and 1); at T = 1.5 a top-p of 0.5 keeps
    tokens 0 and 1. Per-row temperatures and top-p values follow the same rule."""
    rows = 400
    base = logits_of([0.5, 0.3, 0.2])[None].expand(rows, -1).contiguous()
    seed, offset = torch.tensor([7]), torch.tensor([0])
    potential, alpha = torch.zeros(rows), torch.zeros(rows)

    def drawn(params, **per_row):
        return set(guarded_select(base, base, potential, alpha, seed, offset, params=params, backend=backend,
                                  **per_row)[0].tolist())

    closed = dict(gate=GateMode.CLOSED)
    assert drawn(StepParams(temperature=0.5, top_p=0.6, **closed)) == {0}
    assert drawn(StepParams(temperature=1.5, top_p=0.5, **closed)) == {0, 1}
    assert drawn(StepParams(temperature=1.0, top_p=0.6, **closed)) == {0, 1}
    half = torch.tensor([0.5, 1.5]).repeat_interleave(rows // 2)
    tokens = guarded_select(base, base, potential, alpha, seed, offset, backend=backend,
                            params=StepParams(temperature=1.0, top_p=0.99, **closed), row_temperature=half,
                            row_top_p=torch.tensor([0.6, 0.5]).repeat_interleave(rows // 2))[0]
    assert set(tokens[: rows // 2].tolist()) == {0} and set(tokens[rows // 2:].tolist()) == {0, 1}
