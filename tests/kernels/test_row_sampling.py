"""Per-row sampling settings: rows sampling at different temperatures (and greedy rows, T = 0), top-k and
top-p in one launch.

Every backend must give each row the token the reference gives it (``guarded_select_reference(...,
row_temperature=..., row_top_k=..., row_top_p=...)``), which is the token a launch of the whole batch
with that row's settings gives it: a row's draw depends on its own seed, offset, row index and settings
only. The kernels run under TRITON_INTERPRET=1 on CPU.
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
        (StepParams(), torch.tensor([0.5, 1.0]), r"temperature=...\) above 0"),
        (StepParams(temperature=1.0), torch.tensor([0.5, -1.0]), "finite and 0"),
        (StepParams(temperature=1.0), torch.tensor([0.5, float("nan")]), "finite and 0"),
        (StepParams(temperature=1.0), torch.tensor([0.5, 1e-40]), "0 \\(greedy\\) or >= 1e-05"),
        (StepParams(temperature=1.0), torch.tensor([0.5, 1.0, 2.0]), "shape \\[2\\]"),
        (StepParams(temperature=1.0), torch.tensor([1, 2]), "a float tensor"),
    ],
    ids=["greedy-step", "negative", "nan", "tiny", "wrong-shape", "integer"],
)
def test_bad_row_temperatures_raise_clear_errors(params, rows, message):
    args = step_inputs(batch=2, vocab=20)
    for backend in ("torch", "auto", "triton"):
        with pytest.raises(ValueError, match=message):
            guarded_select(*args, params=params, backend=backend, row_temperature=rows)


# per-row top-k (within the launch's top_k, the buffer's size) and top-p (each in (0, 1))
TOP_K = torch.tensor([1, 3, 12, 5, 12, 7, 2, 10], dtype=torch.int32)
TOP_P = torch.tensor([0.3, 0.95, 0.6, 0.8, 0.5, 0.99, 0.7, 0.9])


def per_row_launches(args, params: StepParams, temperatures: torch.Tensor, top_k: torch.Tensor | None,
                     top_p: torch.Tensor | None) -> torch.Tensor:
    """Each row's token from a reference launch of the whole batch with that row's settings."""
    tokens = torch.empty(len(temperatures), dtype=torch.int64)
    for row, t in enumerate(temperatures.tolist()):
        own = params.with_(temperature=t)
        if top_k is not None:
            own = own.with_(top_k=int(top_k[row]))
        if top_p is not None:
            own = own.with_(top_p=float(top_p[row]))
        tokens[row] = guarded_select_reference(*args, own)[0][row]
    return tokens


# SafeDecoding's candidate set holds a few tokens: only k of 1 or 2 cuts into it
FEW_K = torch.tensor([1, 2, 1, 1, 2, 1, 2, 1], dtype=torch.int32)

ROW_SETTINGS = {
    "union-top-k": (StepParams(candidate_k=8, gate=GateMode.OPEN, temperature=1.0, top_k=12), TOP_K, None),
    "union-lif-top-p": (StepParams(candidate_k=8, temperature=1.0, top_p=0.9), None, TOP_P),
    "union-top-k-top-p": (StepParams(candidate_k=8, gate=GateMode.OPEN, temperature=1.0, top_k=12, top_p=0.9),
                          TOP_K, TOP_P),
    "intersection-top-k": (StepParams(candidate_k=8, min_candidates=3, gate=GateMode.OPEN, temperature=1.0,
                                      candidate_mode=CandidateMode.INTERSECTION, top_k=12), FEW_K, None),
}


@pytest.mark.parametrize("name", list(ROW_SETTINGS))
def test_kernels_give_every_row_the_token_of_its_own_top_k_and_top_p(name):
    params, top_k, top_p = ROW_SETTINGS[name]
    args = step_inputs()
    want = guarded_select_reference(*args, params, row_temperature=TEMPERATURES, row_top_k=top_k, row_top_p=top_p)
    assert torch.equal(want[0], per_row_launches(args, params, TEMPERATURES, top_k, top_p))
    # the launch's own top-k / top-p for every row gets other tokens: the check below can tell
    assert not torch.equal(guarded_select_reference(*args, params, row_temperature=TEMPERATURES)[0], want[0])
    for backend in ("triton", "auto"):
        got = guarded_select(*args, params=params, backend=backend, row_temperature=TEMPERATURES, row_top_k=top_k,
                             row_top_p=top_p)
        assert torch.equal(got[0], want[0]), (backend, got[0], want[0])


def test_rows_whose_buffer_overflows_keep_their_own_top_p():
    # flat rows: every row overflows its candidates and takes the device-side fallback with its own p
    params = StepParams(candidate_k=8, gate=GateMode.OPEN, temperature=1.0, top_p=0.9)
    base, expert, potential, alpha, seeds, offset = step_inputs()
    args = (base * 0.01, expert * 0.01, potential, alpha, seeds, offset)
    top_p = torch.tensor([0.05, 0.95, 0.02, 0.5, 0.05, 0.99, 0.1, 0.03])  # small nuclei of flat rows bind
    want = guarded_select_reference(*args, params, row_temperature=TEMPERATURES, row_top_p=top_p)
    assert not torch.equal(guarded_select_reference(*args, params, row_temperature=TEMPERATURES)[0], want[0])
    got = guarded_select(*args, params=params, backend="triton", row_temperature=TEMPERATURES, row_top_p=top_p)
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize(
    "params, kwargs, message",
    [
        (StepParams(temperature=1.0), dict(row_top_k=torch.tensor([1, 2])), "top_k in \\[1, 19\\]"),
        (StepParams(top_k=5), dict(row_top_k=torch.tensor([1, 2])), "temperature"),
        (StepParams(temperature=1.0, top_k=5), dict(row_top_k=torch.tensor([1, 6])), "in \\[1, 5\\]"),
        (StepParams(temperature=1.0, top_k=5), dict(row_top_k=torch.tensor([0, 2])), "in \\[1, 5\\]"),
        (StepParams(temperature=1.0, top_k=5), dict(row_top_k=torch.tensor([1.0, 2.0])), "an integer tensor"),
        (StepParams(temperature=1.0), dict(row_top_p=torch.tensor([0.5, 0.9])), "top_p below 1"),
        (StepParams(temperature=1.0, top_p=0.9), dict(row_top_p=torch.tensor([0.5, 1.0])), "in \\(0, 1\\)"),
        (StepParams(temperature=1.0, top_p=0.9), dict(row_top_p=torch.tensor([0.0, 0.5])), "in \\(0, 1\\)"),
    ],
    ids=["top-k-off", "greedy-step", "above-the-step", "zero", "float-k", "top-p-off", "p-one", "p-zero"],
)
def test_bad_row_top_k_and_top_p_raise_clear_errors(params, kwargs, message):
    args = step_inputs(batch=2, vocab=20)
    for backend in ("torch", "auto", "triton"):
        with pytest.raises(ValueError, match=message):
            guarded_select(*args, params=params, backend=backend, **kwargs)
