"""The step op for greedy decoding in few passes over the logits, for CPU (and any non-Triton device).

The reference materialises a dozen [B, V] temporaries (log-softmax, masks, the full mixture);
on a CPU that is most of the op's time. For greedy decoding with total variation and union
candidates (the NGSD default) the choice only ever involves a handful of tokens per row: the
mixture changes scores on the candidate set C = top-k(base) ∪ top-k(expert), and outside C the
best token is the best base token not in C, which sits among the base's top 2k+1 tokens. So
after two softmaxes and the divergence, this path works on [B, 3k+1] gathered scores.

Passes over [B, V]: softmax x2, |p_b - p_e| and its sum, top-(2k+1) of the base, top-(k+1) of
the expert. Results equal the reference's; where a row has tokens tied across a top-k boundary,
or the settings are not greedy/TV/union, the reference runs instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..params import CandidateMode, Divergence, GateMode, StepParams
from ..reference import Outputs, alpha_is_valid, guarded_select_reference, lif_step


def fast_path_applies(params: StepParams) -> bool:
    return (
        params.temperature <= 0.0 and params.candidate_mode == CandidateMode.UNION and params.divergence == Divergence.TV
    )


def _lowest_id_argmax(scores: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    best = scores.max(dim=-1, keepdim=True).values
    return torch.where(scores == best, ids, torch.full_like(ids, vocab)).min(dim=-1).values


def cpu_guarded_select(base_logits: Tensor, expert_logits: Tensor, potential: Tensor, alpha: Tensor, seed: Tensor,
                       offset: Tensor, params: StepParams) -> Outputs:
    """Same signature and results as `guarded_select_reference`."""
    if not fast_path_applies(params):
        return guarded_select_reference(base_logits, expert_logits, potential, alpha, seed, offset, params)
    lb = base_logits.float()
    le = expert_logits.float()
    batch, vocab = lb.shape
    k = max(1, min(params.candidate_k, vocab))
    base_list = min(2 * k + 1, vocab)
    expert_list = min(k + 1, vocab)

    top_b = torch.topk(lb, base_list, dim=-1)
    top_e = torch.topk(le, expert_list, dim=-1)
    threshold_b = top_b.values[:, k - 1 : k]
    threshold_e = top_e.values[:, k - 1 : k]
    # A tie across a top-k boundary widens the candidate set past k tokens, and then the base list
    # may hold no non-candidate; such (rare) steps go to the reference, which is exact for them.
    tied = top_b.values[:, k : k + 1] >= threshold_b if base_list > k else torch.zeros_like(threshold_b, dtype=torch.bool)
    if expert_list > k:
        tied = tied | (top_e.values[:, k : k + 1] >= threshold_e)
    if bool(tied.any()):
        return guarded_select_reference(base_logits, expert_logits, potential, alpha, seed, offset, params)

    pb = torch.softmax(lb, dim=-1)
    pe = torch.softmax(le, dim=-1)
    gap = pb - pe
    divergence = 0.5 * gap.abs_().sum(-1)
    # NaN or +inf anywhere, or a row of only -inf, makes its softmax (hence D) NaN.
    alpha = alpha.float()
    valid = ~torch.isnan(divergence) & alpha_is_valid(alpha, params.candidate_mode)
    divergence = torch.where(valid, divergence, torch.full_like(divergence, float("nan")))
    alpha = torch.where(valid, alpha, torch.zeros_like(alpha))

    potential = potential.float()
    new_potential, fired = lif_step(potential, divergence, params.tau, params.v_th, params.v_reset, params.rho)
    gate = params.gate
    spike = fired if gate == GateMode.LIF else torch.full_like(fired, gate == GateMode.OPEN)

    ids = torch.cat([top_b.indices, top_e.indices[:, :k]], dim=-1)
    pb_listed = pb.gather(1, ids)
    pe_listed = pe.gather(1, ids)
    in_set = (lb.gather(1, ids) >= threshold_b) | (le.gather(1, ids) >= threshold_e)
    mixed = pb_listed + alpha[:, None] * (pe_listed - pb_listed)
    guarded = torch.where(in_set, mixed, pb_listed)
    scores = torch.where(spike[:, None], guarded, pb_listed)
    tokens = _lowest_id_argmax(scores, ids, vocab)

    tokens = torch.where(valid, tokens, torch.full_like(tokens, -1))
    new_potential = torch.where(valid, new_potential, potential)
    return tokens, new_potential, spike & valid, divergence
