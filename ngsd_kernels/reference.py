"""The guarded decode step in plain PyTorch: the definition every other backend is tested against.

One call decides the next token of every row of a batch (NGSD_SPEC.md sections 3 and 7):

1. ``p_b = softmax(l_b)``, ``p_e = softmax(l_e)`` (fp32 math whatever the input dtype);
2. divergence ``D`` (total variation; KL(p_b || p_e) and Jensen-Shannon as options);
3. leaky integrate-and-fire: ``v = (1 - 1/tau) v + D``; fires when ``v >= v_th``; soft reset
   ``v = v_reset + rho (v - v_reset)`` on a spike;
4. scores ``s``: ``p_b`` where the gate is shut; where it is open, on the candidate set ``C``
   ``s = p_b + alpha (p_e - p_b)`` and elsewhere ``p_b`` (union mode), or, SafeDecoding's
   intersection mode, ``max(p_b + alpha (p_e - p_b), floor)`` on ``C`` and 0 elsewhere (and 0 on a
   token of ``C`` that is -inf in both models, unless every token of ``C`` is; ``scored_intersection``);
5. choice: greedy ``argmax s`` (ties: lowest id), or a draw from ``q ∝ max(s, 0)^(1/T)`` after
   top-k / top-p on ``q``, by the Gumbel-max trick with counter-based uniforms (``philox.py``).

Set definitions that make every backend agree exactly (ties included):

- top-k candidates of a row: every token whose logit is >= the k-th largest logit of that row;
- intersection candidates: with ``rank`` a token's position in its row sorted by descending
  logit (ties by token id), ``C = {i : max(rank_b(i), rank_e(i)) < k'}`` where ``k'`` is the
  smallest value >= k for which ``C`` holds at least ``min_candidates`` tokens (SafeDecoding
  grows k one by one until the intersection is large enough);
- sampling top-k: tokens with ``q >= `` the k-th largest ``q``;
- sampling top-p: tokens whose probability mass strictly above their own ``q`` is < p.

Rows whose logits hold NaN or +inf, or that are all -inf, are invalid: they get token -1,
divergence NaN, no spike and their potential unchanged. So are rows whose alpha is not finite,
or, in union mode, outside [0, 1] (``alpha_is_valid``). Callers raise on them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .philox import philox_uniform
from .params import CandidateMode, Divergence, GateMode, StepParams

_TINY = 1e-30
Outputs = tuple[Tensor, Tensor, Tensor, Tensor]  # (tokens int64, new potential fp32, spike bool, divergence fp32)


def row_is_valid(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: no NaN, no +inf, and at least one finite entry."""
    return ~(torch.isnan(logits) | (logits == float("inf"))).any(-1) & torch.isfinite(logits).any(-1)


def alpha_is_valid(alpha: torch.Tensor, candidate_mode: int) -> torch.Tensor:
    """[B] bool: a finite alpha, in [0, 1] in union mode (NGSD mixes p_b and p_e convexly there);
    SafeDecoding's intersection mode amplifies the expert (alpha 3 by default) and renormalises."""
    ok = torch.isfinite(alpha)
    if candidate_mode == CandidateMode.UNION:
        ok &= (alpha >= 0.0) & (alpha <= 1.0)
    return ok


def divergence_between(
    log_pb: torch.Tensor, log_pe: torch.Tensor, pb: torch.Tensor, pe: torch.Tensor, kind: int
) -> torch.Tensor:
    """Per-row divergence between two distributions given as probabilities and log-probabilities."""
    if kind == Divergence.TV:
        return 0.5 * (pb - pe).abs().sum(-1)
    if kind == Divergence.KL:
        # 0 * log 0 = 0; a token the expert rules out while the base allows it makes KL infinite.
        terms = torch.where(pb > 0, pb * (log_pb - log_pe), torch.zeros_like(pb))
        return terms.sum(-1)
    if kind == Divergence.JS:
        log_m = torch.log(0.5 * (pb + pe))
        kl_b = torch.where(pb > 0, pb * (log_pb - log_m), torch.zeros_like(pb)).sum(-1)
        kl_e = torch.where(pe > 0, pe * (log_pe - log_m), torch.zeros_like(pe)).sum(-1)
        return 0.5 * (kl_b + kl_e)
    raise ValueError(f"unknown divergence kind {kind}; use one of {list(Divergence)}")


def leaky_sum(potential: torch.Tensor, current: torch.Tensor, tau: float) -> torch.Tensor:
    """(1 - 1/tau) v + D. At tau = 1 the old potential is forgotten, also an infinite one (a spike on an infinite KL
    with rho > 0 keeps it): 0 * inf would make the potential NaN for good."""
    if tau == 1.0:
        return current + torch.zeros_like(potential)
    return (1.0 - 1.0 / tau) * potential + current


def lif_step(
    potential: torch.Tensor, current: torch.Tensor, tau: float, v_th: float, v_reset: float, rho: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One leaky integrate-and-fire update; returns (new potential, fired)."""
    v = leaky_sum(potential, current, tau)
    fired = v >= v_th
    # rho = 0 is a hard reset, also after an infinite current (KL): 0 * inf would make the potential NaN for good
    kept = rho * (v - v_reset) if rho else torch.zeros_like(v)
    return torch.where(fired, v_reset + kept, v), fired


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """[B, 1] k-th largest value of each row (k clipped to the row length)."""
    k = max(1, min(k, values.shape[-1]))
    return torch.topk(values, k, dim=-1).values[:, k - 1 : k]


def union_candidates(lb: torch.Tensor, le: torch.Tensor, k: int) -> torch.Tensor:
    return (lb >= kth_largest(lb, k)) | (le >= kth_largest(le, k))


def descending_rank(values: torch.Tensor) -> torch.Tensor:
    """Position of each entry in its row sorted by descending value, ties by lower index first."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(values.shape[-1], device=values.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def intersection_candidates(lb: torch.Tensor, le: torch.Tensor, k: int, min_candidates: int) -> torch.Tensor:
    worst_rank = torch.maximum(descending_rank(lb), descending_rank(le))
    vocab = lb.shape[-1]
    need = max(1, min(min_candidates, vocab))
    # the `need`-th smallest worst rank + 1 is the k' at which the intersection first holds `need` tokens
    grown = torch.kthvalue(worst_rank, need, dim=-1, keepdim=True).values + 1
    k_eff = torch.clamp(grown, min=min(k, vocab))
    return worst_rank < k_eff


def scored_intersection(in_set: torch.Tensor, lb: torch.Tensor, le: torch.Tensor) -> torch.Tensor:
    """The candidates that get a score (at least the floor): those either model allows (a finite logit). A token
    both models mask (-inf, e.g. after a top-k warper) enters a grown intersection by its id among the ties, and at
    the floor it tied the real candidates and won as the lowest id; it scores 0 now, unless no candidate is allowed
    by either model (then every candidate keeps the floor, as before)."""
    allowed = in_set & (torch.isfinite(lb) | torch.isfinite(le))
    return torch.where(allowed.any(-1, keepdim=True), allowed, in_set)


def sampling_mask(q: torch.Tensor, top_k: int | torch.Tensor, top_p: float | torch.Tensor,
                  rank: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens kept by top-k then top-p over unnormalised non-negative weights `q` [B, V]; ``top_k`` /
    ``top_p`` one value, or [B] tensors (each row's own: k >= 1, p in (0, 1)). ``rank`` [B, V]: what top-k
    ranks by when it is not ``q`` itself (the untempered q when ``q`` holds tempered weights: a temperature
    does not reorder q, but rounding q^(1/T) can merge neighbours and so widen top-k)."""
    keep = q > 0
    rank = q if rank is None else rank
    if isinstance(top_k, torch.Tensor):
        k = top_k.to(torch.int64).clamp(1, q.shape[-1])[:, None]
        keep &= rank >= torch.gather(torch.sort(rank, dim=-1, descending=True).values, -1, k - 1)
    elif top_k > 0:
        keep &= rank >= kth_largest(rank, top_k)
    per_row_p = isinstance(top_p, torch.Tensor)
    if per_row_p or top_p < 1.0:
        p = top_p.float()[:, None] if per_row_p else top_p
        kept_q = torch.where(keep, q, torch.zeros_like(q))
        probs = kept_q / kept_q.sum(-1, keepdim=True).clamp_min(_TINY)
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        kept_count = (mass_before < p).sum(-1, keepdim=True).clamp_min(1)
        threshold = torch.gather(sorted_probs, -1, kept_count - 1)
        keep &= probs >= threshold
    return keep


def tempered_weights(positive: torch.Tensor, log_q: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """q ∝ positive^(1/T) as weights in [0, 1] (the row's largest is 1, so no T overflows them); rows at T = 1
    keep ``positive`` itself, bit for bit (as the kernels' untempered top-p does: ``tempered_top_p``)."""
    top = log_q.amax(dim=-1, keepdim=True)
    tempered = torch.exp(log_q - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    if not isinstance(t, torch.Tensor):
        return positive if t == 1.0 else tempered
    return torch.where(t == 1.0, positive, tempered)


def tempered_top_p(params_temperature: float, params_top_p: float, row_temperature: torch.Tensor | None,
                   row_top_p: torch.Tensor | None) -> bool:
    """A sampled step whose top-p reads q at a temperature other than 1 (or rows with their own temperature).
    The Triton kernels then measure top-p on q^(1/T) (``TEMPERED``: each chunk's mass is a log-sum,
    ``select_tiles.log_tempered_mass``, the weights ``select_tiles.tempered_weights``); the AOT extension
    compiles only the untempered top-p and refuses such steps."""
    sampled = params_temperature > 0.0
    top_p_on = row_top_p is not None or params_top_p < 1.0
    return sampled and top_p_on and (row_temperature is not None or params_temperature != 1.0)


def choose_tokens(
    scores: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    row_ids: torch.Tensor | None = None,
    row_temperature: torch.Tensor | None = None,
    row_top_k: torch.Tensor | None = None,
    row_top_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy (temperature <= 0) or Gumbel-max sampling from q ∝ max(s, 0)^(1/T), top-k / top-p applied to q
    (spec section 3.5, and transformers' order: temperature, then top-k, then top-p).

    ``row_temperature`` [B]: each row's own T instead of ``temperature`` (a row at T <= 0 takes the
    greedy arg-max of its scores, the others sample; top-k / top-p apply to every sampled row).
    ``row_top_k`` / ``row_top_p`` [B]: each row's own k / p instead of ``top_k`` / ``top_p``."""
    if row_temperature is None and temperature <= 0.0:
        return torch.argmax(scores, dim=-1)
    positive = scores.clamp_min(0.0)
    if row_temperature is None:
        t: float | torch.Tensor = temperature
    else:
        sampled_rows = row_temperature.float() > 0.0
        t = torch.where(sampled_rows, row_temperature.float(), torch.ones_like(row_temperature.float()))[:, None]
    log_q = torch.log(positive) / t
    top_p_rows = top_p if row_top_p is None else row_top_p
    weights = positive  # top-k keeps the same tokens under any temperature; top-p does not
    if isinstance(top_p_rows, torch.Tensor) or top_p_rows < 1.0:
        weights = tempered_weights(positive, log_q, t)
    keep = sampling_mask(weights, top_k if row_top_k is None else row_top_k, top_p_rows, rank=positive)
    rows = torch.arange(scores.shape[0], device=scores.device) if row_ids is None else row_ids
    u = philox_uniform(seed, offset, scores.shape[-1], rows)
    gumbel = -torch.log(-torch.log(u))
    perturbed = torch.where(keep, log_q + gumbel, torch.full_like(log_q, -float("inf")))
    sampled = torch.argmax(perturbed, dim=-1)
    if row_temperature is None:
        return sampled
    return torch.where(sampled_rows, sampled, torch.argmax(scores, dim=-1))


class StepScores(NamedTuple):
    """The reference step up to the token choice (``step_scores``)."""

    scores: Tensor  # [B, V] fp32: p_b, or the guarded scores where the gate opened
    spike: Tensor  # [B] bool, before invalid rows are masked
    valid: Tensor  # [B] bool
    pre_reset: Tensor  # [B] fp32 (1 - 1/tau) v + D, what the gate compares with v_th
    new_potential: Tensor  # [B] fp32 after the reset
    current: Tensor  # [B] fp32 divergence D


def step_scores(base_logits: Tensor, expert_logits: Tensor, potential: Tensor, alpha: Tensor,
                params: StepParams = StepParams(), *, exp_error: tuple[Tensor, Tensor] | None = None) -> StepScores:
    """Steps 1-4 of the reference (probabilities, divergence, neuron, scores), before the choice.

    ``exp_error`` (tests only): relative errors ``(e_b, e_e)`` [B, V] applied to the two
    probability vectors, ``p * (1 + e)``, to model a GPU's approximate ``exp`` (``MUFU.EX2``, about
    2 ulp); ``tests/kernels/steps.near_tie_rows`` says which rows such errors may change.
    """
    lb = base_logits.float()
    le = expert_logits.float()
    alpha = alpha.float()
    valid = row_is_valid(lb) & row_is_valid(le) & alpha_is_valid(alpha, params.candidate_mode)
    # Invalid rows are computed on zeros so that nothing non-finite leaks into valid rows' math.
    lb = torch.where(valid[:, None], lb, torch.zeros_like(lb))
    le = torch.where(valid[:, None], le, torch.zeros_like(le))
    alpha = torch.where(valid, alpha, torch.zeros_like(alpha))

    log_pb = torch.log_softmax(lb, dim=-1)
    log_pe = torch.log_softmax(le, dim=-1)
    pb, pe = log_pb.exp(), log_pe.exp()
    if exp_error is not None:
        pb, pe = pb * (1.0 + exp_error[0]), pe * (1.0 + exp_error[1])
    current = divergence_between(log_pb, log_pe, pb, pe, params.divergence)

    potential = potential.float()
    pre_reset = leaky_sum(potential, current, params.tau)
    new_potential, fired = lif_step(potential, current, params.tau, params.v_th, params.v_reset, params.rho)
    if params.gate == GateMode.LIF:
        spike = fired
    elif params.gate == GateMode.OPEN:
        spike = torch.ones_like(fired)
    else:
        spike = torch.zeros_like(fired)

    mixed = pb + alpha.float()[:, None] * (pe - pb)
    if params.candidate_mode == CandidateMode.UNION:
        in_set = union_candidates(lb, le, params.candidate_k)
        guarded = torch.where(in_set, mixed, pb)
    else:
        in_set = scored_intersection(intersection_candidates(lb, le, params.candidate_k, params.min_candidates), lb, le)
        guarded = torch.where(in_set, mixed.clamp_min(params.score_floor), torch.zeros_like(mixed))
        guarded = guarded / guarded.sum(-1, keepdim=True)
    scores = torch.where(spike[:, None], guarded, pb)
    return StepScores(scores, spike, valid, pre_reset, new_potential, current)


def empty_outputs(batch: int, potential: Tensor) -> Outputs:
    """The step's outputs where no row can hold a finite logit (V = 0), or there is no row (B = 0): every row
    invalid (token -1, divergence NaN, potential kept, no spike)."""
    device = potential.device
    return (
        torch.full((batch,), -1, dtype=torch.int64, device=device),
        potential.float().clone(),
        torch.zeros(batch, dtype=torch.bool, device=device),
        torch.full((batch,), float("nan"), dtype=torch.float32, device=device),
    )


def guarded_select_reference(base_logits: Tensor, expert_logits: Tensor, potential: Tensor, alpha: Tensor, seed: Tensor,
                             offset: Tensor, params: StepParams = StepParams(), *,
                             row_ids: Tensor | None = None, exp_error: tuple[Tensor, Tensor] | None = None,
                             row_temperature: Tensor | None = None, row_top_k: Tensor | None = None,
                             row_top_p: Tensor | None = None) -> Outputs:
    """Returns (tokens int64 [B], new potential fp32 [B], spike bool [B], divergence fp32 [B]).

    Row ``i`` samples from the Philox stream (seed of row i, row i, offset of row i); ``row_ids``
    gives the rows' indices when they are a subset of a larger batch (default 0..B-1).
    ``row_temperature`` / ``row_top_k`` / ``row_top_p`` [B]: each row's own temperature, top-k and top-p
    (``choose_tokens``), instead of the ``params`` ones. ``exp_error``: see ``step_scores`` (tests only).
    """
    if base_logits.shape[0] == 0 or base_logits.shape[-1] == 0:
        return empty_outputs(base_logits.shape[0], potential)
    step = step_scores(base_logits, expert_logits, potential, alpha, params, exp_error=exp_error)
    valid = step.valid
    tokens = choose_tokens(step.scores, seed, offset, params.temperature, params.top_k, params.top_p, row_ids,
                           row_temperature, row_top_k, row_top_p)

    tokens = torch.where(valid, tokens, torch.full_like(tokens, -1))
    new_potential = torch.where(valid, step.new_potential, potential.float())
    spike = step.spike & valid
    current = torch.where(valid, step.current, torch.full_like(step.current, float("nan")))
    return tokens, new_potential, spike, current
