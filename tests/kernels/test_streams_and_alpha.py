"""Sampling streams and alpha rules, the same on every backend (issue 13, items 3 and 5).

- Row ``i`` of a batch samples from Philox keyed by its seed with ``i`` in the counter, so distinct
  (seed, row) pairs never share a stream, and one (seed, row, offset) names the same draws on the
  reference, the CPU op, the Triton kernels (interpreted here), the hidden-state op and the selector.
- A row whose alpha is not finite, or outside [0, 1] in union mode, is invalid exactly like a row of
  invalid logits: token -1, divergence NaN, no spike, potential unchanged; the other rows are untouched.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ngsd_kernels import (  # noqa: E402
    CandidateMode, GateMode, GuardedSelector, StepParams, guarded_select, guarded_select_from_hidden, philox_uniform,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - set above unless the caller overrode it
    pytest.skip("these tests run the kernels interpreted (TRITON_INTERPRET=1)", allow_module_level=True)

VOCAB, HIDDEN = 48, 16


def hidden_case(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.3
    base = torch.randn(batch, HIDDEN, generator=gen)
    expert = base + 0.8 * torch.randn(batch, HIDDEN, generator=gen)
    return base, expert, weight


def logits_of(base, expert, weight):
    return base @ weight.T, expert @ weight.T


def run_logits(backend: str):
    def run(base, expert, weight, potential, alpha, seed, offset, params):
        lb, le = logits_of(base, expert, weight)
        return guarded_select(lb, le, potential, alpha, seed, offset, params, backend=backend)

    return run


def run_hidden(backend: str):
    def run(base, expert, weight, potential, alpha, seed, offset, params):
        return guarded_select_from_hidden(base, expert, weight, None, potential, alpha, seed, offset, params,
                                          backend=backend)

    return run


def run_selector(backend: str):
    def run(base, expert, weight, potential, alpha, seed, offset, params):
        lb, le = logits_of(base, expert, weight)
        selector = GuardedSelector(params, backend).plan(lb.shape[0], lb.shape[1], lb.dtype, lb.device)
        return selector.run(lb, le, potential, alpha, seed, offset)

    return run


def run_hidden_selector(backend: str):
    def run(base, expert, weight, potential, alpha, seed, offset, params):
        selector = GuardedSelector(params, backend).plan(base.shape[0], weight.shape[0], base.dtype, base.device)
        return selector.run_from_hidden(base, expert, weight, None, potential, alpha, seed, offset)

    return run


BACKENDS = {
    "reference": run_logits("torch"),
    "cpu-op": run_logits("auto"),
    "triton": run_logits("triton"),
    "hidden-cpu": run_hidden("auto"),
    "hidden-triton": run_hidden("triton"),
    "selector-cpu": run_selector("auto"),
    "selector-triton": run_selector("triton"),
    "hidden-selector-cpu": run_hidden_selector("auto"),
    "hidden-selector-triton": run_hidden_selector("triton"),
}


# ----------------------------------------------------------------------------------------------
# streams
# ----------------------------------------------------------------------------------------------


def test_seed_and_row_name_distinct_streams():
    offset = torch.tensor([3])
    seed5_row1 = philox_uniform(torch.tensor([5]), offset, 256, torch.tensor([1]))
    seed6_row0 = philox_uniform(torch.tensor([6]), offset, 256, torch.tensor([0]))
    assert not torch.equal(seed5_row1, seed6_row0)
    # one seed for the batch: rows differ, and each row is its own stream
    batch = philox_uniform(torch.tensor([5]), offset, 256, torch.arange(3))
    assert torch.equal(batch[1:2], seed5_row1)
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[1], batch[2])


@pytest.mark.parametrize("backend", ["reference", "triton", "hidden-triton"])
def test_seed_5_row_1_draws_differently_from_seed_6_row_0(backend):
    # two identical rows with flat scores: what each draws is decided by its stream alone
    base, expert, weight = hidden_case(1, seed=3)
    base, expert = base.expand(2, -1) * 0.05, expert.expand(2, -1) * 0.05
    params = StepParams(temperature=1.0, gate=GateMode.CLOSED)
    run = BACKENDS[backend]
    draws = {}
    for seed in (5, 6):
        tokens = [run(base, expert, weight, torch.zeros(2), torch.full((2,), 0.5), torch.tensor([seed]),
                      torch.tensor([step]), params)[0] for step in range(12)]
        draws[seed] = torch.stack(tokens, dim=1)  # [row, step]
    assert not torch.equal(draws[5][1], draws[6][0])  # with seed + row as the key these were equal
    assert not torch.equal(draws[5][0], draws[5][1])


@pytest.mark.parametrize(
    "params",
    [
        StepParams(temperature=0.8, candidate_k=8, gate=GateMode.OPEN),
        StepParams(temperature=1.1, top_k=10, top_p=0.9, candidate_k=8),
        StepParams(temperature=0.9, candidate_mode=CandidateMode.INTERSECTION, candidate_k=4, gate=GateMode.OPEN),
    ],
    ids=["plain-open", "topk-topp-lif", "intersection"],
)
def test_same_seed_and_offset_give_the_same_draws_on_every_backend(params):
    base, expert, weight = hidden_case(5, seed=1)
    potential, alpha = torch.tensor([0.0, 0.9, 0.3, 1.5, 0.7]), torch.tensor([0.9, 0.5, 0.1, 1.0, 0.0])
    seed, offset = torch.tensor([2**40 + 11]), torch.tensor([7])
    results = {name: run(base, expert, weight, potential, alpha, seed, offset, params) for name, run in BACKENDS.items()}
    want = results["reference"]
    for name, got in results.items():
        assert torch.equal(got[0], want[0]), (name, got[0], want[0])
        assert torch.equal(got[2], want[2]), name
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6, msg=name)
    again = BACKENDS["triton"](base, expert, weight, potential, alpha, seed, offset, params)
    assert torch.equal(again[0], want[0])
    other = BACKENDS["reference"](base, expert, weight, potential, alpha, seed, offset + 1, params)
    later = [BACKENDS["reference"](base, expert, weight, potential, alpha, seed, offset + k, params)[0]
             for k in range(2, 6)]
    assert any(not torch.equal(t, want[0]) for t in [other[0], *later]), "the offset must move the draws"


# ----------------------------------------------------------------------------------------------
# alpha
# ----------------------------------------------------------------------------------------------

BAD_UNION_ALPHAS = [float("nan"), float("inf"), -float("inf"), -0.5, 1.5]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    "params",
    [StepParams(candidate_k=8, gate=GateMode.OPEN), StepParams(temperature=0.9, top_p=0.8, candidate_k=8)],
    ids=["greedy", "sampled"],
)
def test_bad_alpha_in_union_mode_marks_only_its_row_invalid(backend, params):
    rows = len(BAD_UNION_ALPHAS) + 2
    base, expert, weight = hidden_case(rows, seed=4)
    potential = torch.linspace(0.1, 1.4, rows)
    good = torch.full((rows,), 0.7)
    bad = good.clone()
    bad[1 : 1 + len(BAD_UNION_ALPHAS)] = torch.tensor(BAD_UNION_ALPHAS)
    seed, offset = torch.tensor([9]), torch.tensor([2])
    run = BACKENDS[backend]
    tokens, new_v, spike, div = run(base, expert, weight, potential, bad, seed, offset, params)
    ref = run(base, expert, weight, potential, good, seed, offset, params)
    hit = slice(1, 1 + len(BAD_UNION_ALPHAS))
    assert tokens[hit].tolist() == [-1] * len(BAD_UNION_ALPHAS)
    assert torch.isnan(div[hit]).all() and not spike[hit].any()
    assert torch.equal(new_v[hit], potential[hit])
    for keep in (0, rows - 1):  # the rows with a good alpha are exactly what they are without the bad ones
        assert int(tokens[keep]) == int(ref[0][keep]) and bool(spike[keep]) == bool(ref[2][keep])
        assert float(new_v[keep]) == float(ref[1][keep]) and float(div[keep]) == float(ref[3][keep])


@pytest.mark.parametrize("backend", ["reference", "cpu-op", "triton", "hidden-cpu", "hidden-triton"])
def test_intersection_mode_takes_any_finite_alpha_but_not_nan(backend):
    base, expert, weight = hidden_case(4, seed=6)
    params = StepParams(candidate_mode=CandidateMode.INTERSECTION, candidate_k=4, gate=GateMode.OPEN)
    alpha = torch.tensor([3.0, float("nan"), -0.5, float("inf")])  # SafeDecoding's default alpha is 3
    zero = torch.zeros(1, dtype=torch.int64)
    tokens, new_v, spike, div = BACKENDS[backend](base, expert, weight, torch.zeros(4), alpha, zero, zero, params)
    assert tokens.tolist()[1] == -1 and tokens.tolist()[3] == -1
    assert tokens[0] >= 0 and tokens[2] >= 0 and spike[0] and spike[2]
    assert torch.isnan(div[[1, 3]]).all() and torch.isfinite(div[[0, 2]]).all()


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_a_planned_selector_runs_step_after_step_like_the_one_shot_ops(backend):
    base, expert, weight = hidden_case(3, seed=8)
    lb, le = logits_of(base, expert, weight)
    params = StepParams(temperature=0.9, top_k=12, candidate_k=8, gate=GateMode.OPEN)
    selector = GuardedSelector(params, backend).plan(3, VOCAB, torch.float32, "cpu")
    potential, alpha, seed = torch.zeros(3), torch.tensor([0.2, 0.6, 1.0]), torch.tensor([21])
    for step in range(3):  # the scratch of step 1 is reused by steps 2 and 3
        offset = torch.tensor([step])
        want = guarded_select(lb, le, potential, alpha, seed, offset, params, backend=backend)
        for got in (selector.run(lb, le, potential, alpha, seed, offset),
                    selector.run_from_hidden(base, expert, weight, None, potential, alpha, seed, offset)):
            assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
        potential = want[1]
        base, expert = base.flip(0), expert.flip(0)  # new hidden states, as the next step brings
        lb, le = logits_of(base, expert, weight)
    with pytest.raises(ValueError, match="planned for"):
        selector.run(lb[:2], le[:2], potential[:2], alpha[:2])


@pytest.mark.parametrize("params", [StepParams(candidate_k=8), StepParams(temperature=0.9, top_k=12, candidate_k=8)],
                         ids=["greedy", "top-k"])
def test_warm_up_runs_every_planned_launch_and_leaves_the_selector_usable(params):
    from ngsd_kernels.ops import launcher

    launched = []
    real = launcher.launch_select

    def counting(*args, **kwargs):
        launched.append(args[1])
        return real(*args, **kwargs)

    base, expert, weight = hidden_case(3, seed=9)
    lb, le = logits_of(base, expert, weight)
    selector = GuardedSelector(params, "triton").plan(3, VOCAB, torch.float32, "cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launcher, "launch_select", counting)
        assert selector.warm_up(hidden_size=base.shape[1]) is selector
    assert len(launched) == 2  # the logits launch and the hidden-state one
    potential, alpha = torch.zeros(3), torch.full((3,), 0.5)
    got = selector.run(lb, le, potential, alpha, torch.tensor([4]), torch.tensor([0]))
    want = guarded_select(lb, le, potential, alpha, torch.tensor([4]), torch.tensor([0]), params, backend="torch")
    assert torch.equal(got[0], want[0])
    with pytest.raises(RuntimeError, match="plan"):
        GuardedSelector(params).warm_up()
