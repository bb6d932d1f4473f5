"""What the kernel tests ask of two step results: the same tokens and spikes, D and v within fp32 rounding.

On a GPU the kernels' ``tl.exp`` / ``tl.log`` compile to the approximate ``MUFU.EX2`` / ``MUFU.LG2``
(about 2 ulp), while the interpreter and PyTorch round correctly. A token or a spike can then
differ from the reference only where the reference itself is within that error of a tie:
``near_tie_rows`` names those rows, with the tolerance ``NEAR_TIE_RTOL`` (2^-16 relative, about
32x the 2-ulp error of one exp, to cover the few roundings a score goes through), and
``assert_same_step(..., near_tie=...)`` exempts exactly them (test_near_ties.py checks both: a
perturbed exp changes only such rows, and such rows exist).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from ngsd_kernels.params import GateMode, StepParams
from ngsd_kernels.philox import philox_uniform
from ngsd_kernels.reference import sampling_mask, step_scores, tempered_weights

NEAR_TIE_RTOL = 2.0**-16


def triton_available() -> bool:
    """The Triton kernels can run here: interpreted (TRITON_INTERPRET=1) or on a CUDA device. Imports nothing:
    a module that imports this one before setting TRITON_INTERPRET must not have triton imported without it."""
    if importlib.util.find_spec("triton") is None:
        return False
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.cuda.is_available()


needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton (CUDA, or TRITON_INTERPRET=1)")


def _top2_gap(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(largest, largest - second largest) per row; a one-column row has no runner-up (gap inf)."""
    if values.shape[-1] < 2:
        return values[:, 0], torch.full_like(values[:, 0], float("inf"))
    top = values.topk(2, dim=-1).values
    return top[:, 0], top[:, 0] - top[:, 1]


def near_tie_rows(base: torch.Tensor, expert: torch.Tensor, potential: torch.Tensor, alpha: torch.Tensor,
                  seed: torch.Tensor, offset: torch.Tensor, params: StepParams,
                  rtol: float = NEAR_TIE_RTOL) -> torch.Tensor:
    """[B] bool: valid rows whose token or spike a relative error of ``rtol`` in exp / log may change.

    - the gate: ``(1 - 1/tau) v + D`` within rtol of v_th (LIF gate only);
    - greedy: the two best scores within rtol of the best;
    - sampling: the two best ``log(q) / T + gumbel`` within rtol (1/T + |best| + 1) (errors of
      log q, of the Gumbel noise's two logs, and of the score);
    - top-k: the k-th and (k+1)-th largest q within rtol; top-p: some token's probability mass
      before it, in the tempered distribution q^(1/T) that top-p reads, within rtol of top_p (rtol x 2/T x
      the smaller of the mass and its complement, when that is larger: the tempering multiplies errors by 1/T).
    """
    step = step_scores(base, expert, potential, alpha, params)
    near = torch.zeros_like(step.valid)
    if params.gate == GateMode.LIF:
        near |= (step.pre_reset - params.v_th).abs() <= rtol * max(1.0, abs(params.v_th))
    scores = step.scores
    if params.temperature <= 0.0:
        best, gap = _top2_gap(scores)
        near |= gap <= rtol * best.abs()
        return near & step.valid
    positive = scores.clamp_min(0.0)
    log_q = torch.log(positive) / params.temperature
    # top-p reads the tempered weights, top-k ranks the untempered q (as `choose_tokens` does)
    weights = tempered_weights(positive, log_q, params.temperature) if params.top_p < 1.0 else positive
    keep = sampling_mask(weights, params.top_k, params.top_p, rank=positive)
    rows = torch.arange(scores.shape[0], device=scores.device)
    u = philox_uniform(seed.to(scores.device), offset.to(scores.device), scores.shape[-1], rows)
    values = torch.where(keep, log_q - torch.log(-torch.log(u)), torch.full_like(positive, float("-inf")))
    best, gap = _top2_gap(values)
    near |= gap <= rtol * (1.0 / params.temperature + best.abs() + 1.0)
    vocab = scores.shape[-1]
    if 0 < params.top_k < vocab:
        kth = positive.topk(params.top_k + 1, dim=-1).values
        near |= (kth[:, -2] - kth[:, -1]) <= rtol * kth[:, -2]
    if params.top_p < 1.0:
        kept = torch.where(keep, weights, torch.zeros_like(weights))
        probs = torch.sort(kept / kept.sum(-1, keepdim=True).clamp_min(1e-30), dim=-1, descending=True).values
        before = torch.cumsum(probs, dim=-1) - probs
        # an error e in q is e / T in q^(1/T): a mass moves by up to 2 e / T times its smaller side
        # (the largest weight is 1 exactly; the weights past a clear winner are ~0 with ~0 error)
        spread = 2.0 / params.temperature * torch.minimum(before, 1.0 - before)
        near |= ((before - params.top_p).abs() <= rtol * spread.clamp_min(1.0)).any(-1)
    return near & step.valid


def assert_same_step(got, want, atol: float = 1e-6, near_tie: torch.Tensor | None = None) -> None:
    """Same tokens and spikes (except on ``near_tie`` rows, when given), D and v within fp32 rounding."""
    tokens, new_v, spike, div = got
    r_tokens, r_new_v, r_spike, r_div = want
    assert tokens.dtype == torch.int64 and spike.dtype == torch.bool
    assert new_v.dtype == torch.float32 and div.dtype == torch.float32
    exact = torch.ones_like(spike) if near_tie is None else ~near_tie.to(spike.device)
    assert torch.equal(spike[exact], r_spike[exact]), (spike, r_spike)
    assert torch.equal(tokens[exact], r_tokens[exact]), (tokens, r_tokens)
    torch.testing.assert_close(div, r_div, rtol=1e-5, atol=atol, equal_nan=True)
    torch.testing.assert_close(new_v[exact], r_new_v[exact], rtol=1e-5, atol=atol, equal_nan=True)


def approximate_exp(t: torch.Tensor) -> bool:
    """True where the kernels run compiled (CUDA): their exp and log are the GPU's approximate ones."""
    return t.device.type == "cuda"
