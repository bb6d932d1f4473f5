"""Per-row temperatures: rows sampling at different temperatures (and greedy rows, T = 0) in one launch.

Every backend must give each row the token the reference gives it (``guarded_select_reference(...,
row_temperature=...)``), which is the token a launch of the whole batch at that row's temperature
gives it: a row's draw depends on its own seed, offset, row index and temperature only. The kernels
run under TRITON_INTERPRET=1 on CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ngsd_kernels import (  # noqa: E402
    CandidateMode, GateMode, GuardedSelector, StepParams, guarded_select, guarded_select_from_hidden,
    guarded_select_reference,
)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on -inf rows

# greedy rows, cold and hot ones: far enough apart that a kernel reading one temperature for all
# rows picks other tokens for most of them
TEMPERATURES = torch.tensor([0.0, 0.3, 1.0, 2.5, 0.0, 6.0, 0.7, 1.3])

SETTINGS = {
    "union-temperature": StepParams(candidate_k=8, gate=GateMode.OPEN, temperature=1.0),
    "union-lif-top-k": StepParams(candidate_k=8, temperature=1.0, top_k=12),
    "union-top-p": StepParams(candidate_k=8, gate=GateMode.OPEN, temperature=1.0, top_p=0.8),
    "intersection-top-p": StepParams(candidate_k=8, min_candidates=3, gate=GateMode.OPEN,
                                     candidate_mode=CandidateMode.INTERSECTION, temperature=1.0, top_p=0.9),
}


def step_inputs(batch: int = 8, vocab: int = 300, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, vocab, generator=gen) * 2.0
    expert = base + torch.randn(batch, vocab, generator=gen) * 1.5
    potential = torch.rand(batch, generator=gen)
    alpha = torch.full((batch,), 0.9)
    seeds = torch.arange(100, 100 + batch, dtype=torch.int64)
    offset = torch.tensor([5], dtype=torch.int64)
    return base, expert, potential, alpha, seeds, offset


def per_temperature_launches(args, params: StepParams, temperatures: torch.Tensor) -> torch.Tensor:
    """Each row's token from a reference launch of the whole batch at that row's temperature."""
    tokens = torch.empty(len(temperatures), dtype=torch.int64)
    for t in temperatures.unique().tolist():
        at = temperatures == t
        tokens[at] = guarded_select_reference(*args, params.with_(temperature=t))[0][at]
    return tokens


@pytest.mark.parametrize("name", list(SETTINGS))
def test_kernels_give_every_row_the_token_of_its_own_temperature(name):
    params = SETTINGS[name]
    args = step_inputs()
    want = guarded_select_reference(*args, params, row_temperature=TEMPERATURES)
    assert torch.equal(want[0], per_temperature_launches(args, params, TEMPERATURES))
    # one launch at a single temperature gets other tokens: the check below can tell
    assert not torch.equal(guarded_select_reference(*args, params)[0], want[0])
    for backend in ("triton", "auto"):
        got = guarded_select(*args, params=params, backend=backend, row_temperature=TEMPERATURES)
        assert torch.equal(got[0], want[0]), (backend, got[0], want[0])
        assert torch.equal(got[2], want[2])
        torch.testing.assert_close(got[1], want[1])


def test_rows_whose_buffer_overflows_keep_their_own_temperature():
    # flat rows: every top-p row overflows its candidates and is decided by the device-side fallback
    params = StepParams(candidate_k=8, gate=GateMode.OPEN, temperature=1.0, top_p=0.95)
    base, expert, potential, alpha, seeds, offset = step_inputs()
    base, expert = base * 0.01, expert * 0.01
    args = (base, expert, potential, alpha, seeds, offset)
    want = guarded_select_reference(*args, params, row_temperature=TEMPERATURES)
    got = guarded_select(*args, params=params, backend="triton", row_temperature=TEMPERATURES)
    assert torch.equal(got[0], want[0])


def test_hidden_state_kernels_and_the_planned_selector():
    gen = torch.Generator().manual_seed(4)
    batch, hidden, vocab = 8, 16, 200
    weight = torch.randn(vocab, hidden, generator=gen)
    hb = torch.randn(batch, hidden, generator=gen)
    he = hb + 0.8 * torch.randn(batch, hidden, generator=gen)
    _, _, potential, alpha, seeds, offset = step_inputs(batch)
    params = StepParams(candidate_k=8, gate=GateMode.OPEN, temperature=1.0)
    want = guarded_select_from_hidden(hb, he, weight, None, potential, alpha, seeds, offset, params, backend="torch",
                                      row_temperature=TEMPERATURES)
    assert not torch.equal(want[0], guarded_select_from_hidden(hb, he, weight, None, potential, alpha, seeds, offset,
                                                               params, backend="torch")[0])
    got = guarded_select_from_hidden(hb, he, weight, None, potential, alpha, seeds, offset, params, backend="triton",
                                     row_temperature=TEMPERATURES)
    assert torch.equal(got[0], want[0])
    selector = GuardedSelector(params, backend="triton").plan(batch, vocab, torch.float32, "cpu")
    logits = hb @ weight.T, he @ weight.T
    expected = guarded_select_reference(*logits, potential, alpha, seeds, offset, params, row_temperature=TEMPERATURES)
    assert torch.equal(selector.run(*logits, potential, alpha, seeds, offset, row_temperature=TEMPERATURES)[0],
                       expected[0])


def test_custom_op_takes_row_temperature_and_passes_opcheck():
    base, expert, potential, alpha, seeds, offset = step_inputs(batch=3, vocab=40)
    params = StepParams(candidate_k=4, gate=GateMode.OPEN, temperature=1.0)
    rows = torch.tensor([0.0, 0.5, 2.0])
    args = (base, expert, potential, alpha, seeds, offset, *params.flat())
    want = guarded_select_reference(base, expert, potential, alpha, seeds, offset, params, row_temperature=rows)
    for op in (torch.ops.ngsd.guarded_select, torch.ops.ngsd.guarded_select_triton):
        assert torch.equal(op(*args, row_temperature=rows)[0], want[0])
        torch.library.opcheck(op.default, args, dict(row_temperature=rows))


@pytest.mark.parametrize(
    "params, rows, message",
    [
        (StepParams(), torch.tensor([0.5, 1.0]), "needs a sampled step"),
        (StepParams(temperature=1.0), torch.tensor([0.5, -1.0]), "finite and >= 0"),
        (StepParams(temperature=1.0), torch.tensor([0.5, float("nan")]), "finite and >= 0"),
        (StepParams(temperature=1.0), torch.tensor([0.5, 1.0, 2.0]), "shape \\[2\\]"),
        (StepParams(temperature=1.0), torch.tensor([1, 2]), "float tensor"),
    ],
    ids=["greedy-step", "negative", "nan", "wrong-shape", "integer"],
)
def test_bad_row_temperatures_raise_clear_errors(params, rows, message):
    args = step_inputs(batch=2, vocab=20)
    for backend in ("torch", "auto", "triton"):
        with pytest.raises(ValueError, match=message):
            guarded_select(*args, params=params, backend=backend, row_temperature=rows)
