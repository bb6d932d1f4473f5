"""The near-tie tolerance of the kernel tests (steps.near_tie_rows), checked on the reference alone.

A GPU computes exp with about 2 ulp of relative error. Modelled here by multiplying the reference's
probabilities by (1 + e), |e| <= 2^-21 (4 ulp): rows whose token or spike changes must all be
flagged by near_tie_rows, some rows must change (the batch holds constructed near-ties, so the
check can fail), and random rows must rarely be flagged (the tolerance is not a blanket excuse).
"""

from __future__ import annotations

import pytest
import torch

from ngsd_kernels.params import GateMode, StepParams
from ngsd_kernels.philox import philox_uniform
from ngsd_kernels.reference import guarded_select_reference
from tests.kernels.steps import NEAR_TIE_RTOL, assert_same_step, near_tie_rows

EXP_ERROR = 2.0**-21
SETTINGS = {
    "greedy": StepParams(gate=GateMode.OPEN, candidate_k=8),
    "greedy-lif": StepParams(gate=GateMode.LIF, v_th=0.5, candidate_k=8),
    # sampled rows are tied through the Gumbel noise, which needs q = p_b: gate shut
    "temperature": StepParams(gate=GateMode.CLOSED, temperature=0.7),
    "top-p": StepParams(gate=GateMode.CLOSED, temperature=0.7, top_p=0.95),
}


def _tie_sampled_rows(base: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor, temperature: float,
                      tie: torch.Tensor) -> None:
    """Move each tied row's runner-up so that log p_b / T + gumbel of the two best tokens are 1e-7 apart."""
    gumbel = -torch.log(-torch.log(philox_uniform(seed, offset, base.shape[-1])))
    value = base / temperature + gumbel
    top = value.topk(2, dim=-1).indices
    a, b = top[:, :1], top[:, 1:]
    moved = base.gather(-1, a) + temperature * (gumbel.gather(-1, a) - gumbel.gather(-1, b)) - 1e-7
    base.scatter_(-1, b, torch.where(tie[:, None], moved, base.gather(-1, b)))


def _batch(gen: torch.Generator, rows: int = 96, vocab: int = 64):
    base = torch.randn(rows, vocab, generator=gen) * 2.0
    expert = torch.randn(rows, vocab, generator=gen) * 2.0
    # a third of the rows: near-ties by construction (top two logits 1e-7 apart, i.e. equal or one
    # fp32 ulp apart, the same in both models)
    tie = torch.arange(rows) % 3 == 0
    for logits in (base, expert):
        top = logits.argmax(-1, keepdim=True)
        runner = (top + 1) % vocab
        logits.scatter_(-1, runner, logits.gather(-1, top) - 1e-7)
    base[~tie] = torch.randn(int((~tie).sum()), vocab, generator=gen) * 2.0
    expert[~tie] = torch.randn(int((~tie).sum()), vocab, generator=gen) * 2.0
    expert[tie] = base[tie]  # then the mixture is p_b, tied like it
    potential = torch.rand(rows, generator=gen)
    alpha = torch.rand(rows, generator=gen)
    seed = torch.randint(0, 2**40, (rows,), generator=gen)
    offset = torch.randint(0, 2**20, (rows,), generator=gen)
    return base, expert, potential, alpha, seed, offset


@pytest.mark.parametrize("name", list(SETTINGS))
def test_perturbed_exp_changes_only_near_tie_rows(name):
    params = SETTINGS[name]
    gen = torch.Generator().manual_seed(7)
    changed_somewhere = False
    flagged = 0
    total = 0
    for trial in range(4):
        args = _batch(gen)
        if params.gate == GateMode.LIF:  # put every third row's v + D within float error of v_th
            exact_step = guarded_select_reference(*args[:2], torch.zeros(len(args[2])), *args[3:],
                                                  params.with_(gate=GateMode.CLOSED))
            decay = 1.0 - 1.0 / params.tau
            on_edge = torch.arange(len(args[2])) % 3 == 1
            args[2][on_edge] = ((params.v_th - exact_step[3]) / decay)[on_edge]
        if params.temperature > 0:
            _tie_sampled_rows(args[0], args[4], args[5], params.temperature, torch.arange(len(args[2])) % 3 == 0)
        exact = guarded_select_reference(*args, params)
        error = tuple((torch.rand(args[0].shape, generator=gen) * 2 - 1) * EXP_ERROR for _ in range(2))
        noisy = guarded_select_reference(*args, params, exp_error=error)
        near = near_tie_rows(*args, params)
        changed = (exact[0] != noisy[0]) | (exact[2] != noisy[2])
        assert not (changed & ~near).any(), f"{name}: rows {torch.nonzero(changed & ~near).flatten().tolist()} " \
                                            f"changed without being near a tie (rtol {NEAR_TIE_RTOL})"
        assert_same_step(noisy, exact, atol=1e-5, near_tie=near)
        changed_somewhere |= bool(changed.any())
        plain = torch.arange(len(near)) % 3 == 2  # rows with no constructed tie
        flagged += int(near[plain].sum())
        total += int(plain.sum())
    assert changed_somewhere, f"{name}: the exp error never changed a token: the check cannot fail"
    assert flagged <= 0.05 * total, f"{name}: {flagged} of {total} random rows flagged as near-ties"


def test_near_tie_rows_leave_clear_rows_unflagged():
    base = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    expert = torch.tensor([[4.0, 2.0, 0.0, -1.0]])
    args = (base, expert, torch.zeros(1), torch.full((1,), 0.5), torch.zeros(1, dtype=torch.int64),
            torch.zeros(1, dtype=torch.int64))
    assert not near_tie_rows(*args, StepParams(gate=GateMode.OPEN)).any()
    tied = (torch.tensor([[5.0, 5.0, 0.0, -1.0]]), torch.tensor([[4.0, 4.0, 0.0, -1.0]]), *args[2:])
    assert near_tie_rows(*tied, StepParams(gate=GateMode.OPEN)).all()
