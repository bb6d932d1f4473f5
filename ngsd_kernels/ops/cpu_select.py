"""The step op for greedy decoding in few passes over the logits, for CPU (and any non-Triton device).

The reference materialises a dozen [B, V] temporaries (log-softmax, masks, the full mixture);
on a CPU that is most of the op's time. For greedy decoding with total variation and union
candidates (the NGSD default) the choice only ever involves a handful of tokens per row:

- a row whose neuron did not fire takes the base's argmax (its scores are the base's
  probabilities), one pass over [B, V];
- a row whose neuron fired changes scores only on the candidate set C = top-k(base) ∪
  top-k(expert), and outside C the best token is the best base token not in C, which sits among
  the base's top 2k+1 tokens. So after the divergence, fired rows work on [F, 3k+1] gathered
  scores; the two top-k searches (the op's most expensive passes after the softmaxes) run only
  on those F rows.

Passes over [B, V]: log-softmax and exp x2 (the reference's rounding), |p_b - p_e| and its sum, the base argmax
(skipped when every row fires);
over [F, V]: top-(2k+1) of the base, top-(k+1) of the expert, each a column maximum then a top-k over the best
columns' values (`top_values`: half the cost of one topk over the row). A batch runs in blocks of ROW_BLOCK
rows, so that these passes stay in cache (at B = 128: 47 -> 33 ms a step). The [B, V] work buffers are kept
between calls (`_Scratch`); the inputs are never written. Results equal the reference's; where a fired row has tokens tied
across a top-k boundary, or its winner is a non-candidate tied with the base list's last token, or the settings
are not greedy/TV/union, the reference runs instead.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from ..params import CandidateMode, Divergence, GateMode, StepParams
from ..reference import Outputs, alpha_is_valid, empty_outputs, guarded_select_reference, lif_step


class _Scratch(threading.local):
    """[B, V] fp32 work buffers kept between calls, one set per thread and device.

    A fresh 25 MB tensor (B = 128, V = 49,152) is fresh pages from the OS, zeroed on first touch;
    at B = 128 that was about a third of the op's time. The buffers grow to the largest batch seen
    and are views for smaller ones; nothing the op returns aliases them.
    """

    def __init__(self) -> None:
        self.buffers: dict[torch.device, Tensor] = {}

    def take(self, count: int, shape: torch.Size, device: torch.device) -> list[Tensor]:
        size = shape.numel()
        buffer = self.buffers.get(device)
        if buffer is None or buffer.numel() < count * size:
            buffer = self.buffers[device] = torch.empty(count * size, dtype=torch.float32, device=device)
        return [buffer[i * size : (i + 1) * size].view(shape) for i in range(count)]


_SCRATCH = _Scratch()
ROW_BLOCK = 32  # rows per pass over the logits (`cpu_guarded_select`)


def fast_path_applies(params: StepParams) -> bool:
    return (
        params.temperature <= 0.0 and params.candidate_mode == CandidateMode.UNION and params.divergence == Divergence.TV
    )


def _lowest_id_argmax(scores: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    best = scores.max(dim=-1, keepdim=True).values
    return torch.where(scores == best, ids, torch.full_like(ids, vocab)).min(dim=-1).values


def cpu_guarded_select(base_logits: Tensor, expert_logits: Tensor, potential: Tensor, alpha: Tensor, seed: Tensor,
                       offset: Tensor, params: StepParams, row_temperature: Tensor | None = None,
                       row_top_k: Tensor | None = None, row_top_p: Tensor | None = None) -> Outputs:
    """Same signature and results as `guarded_select_reference` (per-row sampling settings: its sampling path)."""
    if base_logits.shape[0] == 0 or base_logits.shape[-1] == 0:  # no row, or no token a row could hold
        return empty_outputs(base_logits.shape[0], potential)
    if row_temperature is not None or not fast_path_applies(params):  # (per-row top-k / top-p need a sampled step)
        return guarded_select_reference(base_logits, expert_logits, potential, alpha, seed, offset, params,
                                        row_temperature=row_temperature, row_top_k=row_top_k, row_top_p=row_top_p)
    if base_logits.shape[0] > ROW_BLOCK:
        # rows are independent (and greedy rows draw no random numbers): blocks keep the op's ten passes over
        # [rows, V] in cache; at [128, 49152] one block took 47 ms, four took 33 (one thread)
        blocks = [cpu_guarded_select(base_logits[start : start + ROW_BLOCK], expert_logits[start : start + ROW_BLOCK],
                                     potential[start : start + ROW_BLOCK], alpha[start : start + ROW_BLOCK], seed,
                                     offset, params)
                  for start in range(0, base_logits.shape[0], ROW_BLOCK)]
        return tuple(torch.cat(parts) for parts in zip(*blocks))
    lb = base_logits.float()
    le = expert_logits.float()
    k = max(1, min(params.candidate_k, lb.shape[1]))

    pb, pe, gap, fired_le = _SCRATCH.take(4, lb.shape, lb.device)
    # exp(log_softmax), as the reference computes them: softmax rounds differently, and one ulp
    # decides near-tied tokens (the greedy choice must equal the reference's bit for bit)
    torch.ops.aten._log_softmax.out(lb, -1, False, out=pb).exp_()
    torch.ops.aten._log_softmax.out(le, -1, False, out=pe).exp_()
    # The reference's own reduction (`abs().sum()`, in place): vector_norm(ord=1) sums in plain fp32 and drifts
    # by ~1e-4 at V = 152k, enough to flip a spike near v_th; this is also faster (0.7 against 1.0 ms, [32, 49152])
    divergence = 0.5 * torch.sub(pb, pe, out=gap).abs_().sum(-1)
    # NaN or +inf anywhere, or a row of only -inf, makes its softmax (hence D) NaN.
    valid = ~torch.isnan(divergence) & alpha_is_valid(alpha.float(), params.candidate_mode)
    divergence = torch.where(valid, divergence, torch.full_like(divergence, float("nan")))
    mix_alpha = torch.where(valid, alpha.float(), torch.zeros_like(divergence))

    old_potential = potential.float()
    new_potential, fired = lif_step(old_potential, divergence, params.tau, params.v_th, params.v_reset, params.rho)
    gate = params.gate
    spike = fired if gate == GateMode.LIF else torch.full_like(fired, gate == GateMode.OPEN)

    mixing = (spike & valid).nonzero().squeeze(1)
    every_row = mixing.numel() == lb.shape[0]
    # the base's greedy choice, for the rows that do not mix: first (lowest) id among equal maxima, as the reference
    # (max(dim) documents the same tie rule as argmax and is 3x faster on CPU: 0.75 against 2.2 ms at [32, 49152])
    tokens = None if every_row else pb.max(dim=-1).indices
    if mixing.numel():
        if every_row:
            fired_lb, fired_le = lb, le
        else:  # the fired rows' logits into work buffers (fresh [F, V] tensors would cost page faults);
            # `gap` is free once the divergence is summed
            fired_lb = torch.index_select(lb, 0, mixing, out=gap[: mixing.numel()])
            fired_le = torch.index_select(le, 0, mixing, out=fired_le[: mixing.numel()])
        chosen = _mixed_choice(fired_lb, fired_le, pb, pe, mixing, mix_alpha[mixing], k)
        if chosen is None:
            return guarded_select_reference(base_logits, expert_logits, potential, alpha, seed, offset, params)
        if every_row:
            tokens = chosen
        else:
            tokens[mixing] = chosen

    tokens = torch.where(valid, tokens, torch.full_like(tokens, -1))
    new_potential = torch.where(valid, new_potential, old_potential)
    return tokens, new_potential, spike & valid, divergence


def _mixed_choice(lb: Tensor, le: Tensor, pb: Tensor, pe: Tensor, rows: Tensor, alpha: Tensor, k: int) -> Tensor | None:
    """Greedy tokens of the fired rows (their logits `lb`, `le`; `rows` of the batch's `pb`, `pe`), or None
    when a top-k boundary is tied in one of them."""
    vocab = lb.shape[1]
    base_list = min(2 * k + 1, vocab)
    expert_list = min(k + 1, vocab)
    top_b = top_values(lb, base_list)
    top_e = top_values(le, expert_list)
    threshold_b = top_b.values[:, k - 1 : k]
    threshold_e = top_e.values[:, k - 1 : k]
    # A tie across a top-k boundary widens the candidate set past k tokens, and then the base list
    # may hold no non-candidate; such (rare) steps go to the reference, which is exact for them.
    tied = top_b.values[:, k : k + 1] >= threshold_b if base_list > k else torch.zeros_like(threshold_b, dtype=torch.bool)
    if expert_list > k:
        tied = tied | (top_e.values[:, k : k + 1] >= threshold_e)
    if bool(tied.any()):
        return None
    ids = torch.cat([top_b.indices, top_e.indices[:, :k]], dim=-1)
    pb_listed = pb[rows[:, None], ids]
    pe_listed = pe[rows[:, None], ids]
    in_set = (lb.gather(1, ids) >= threshold_b) | (le.gather(1, ids) >= threshold_e)
    mixed = pb_listed + alpha[:, None] * (pe_listed - pb_listed)
    scores = torch.where(in_set, mixed, pb_listed)
    chosen = _lowest_id_argmax(scores, ids, vocab)
    if base_list < vocab:
        # A winner whose score equals the last listed base token's p_b may tie with an unlisted token of lower id
        # (a listed non-candidate scores at least that p_b, so no unlisted token can beat the winner, only tie):
        # exact only in the reference. The winner may be a candidate too (its mixed score hitting that p_b).
        winner = (ids == chosen[:, None]).int().argmax(dim=-1, keepdim=True)
        last_listed = pb_listed[:, base_list - 1 : base_list]
        if bool((scores.gather(1, winner) <= last_listed).any()):
            return None
    return chosen


def top_values(x: Tensor, count: int) -> torch.return_types.topk:
    """`torch.topk(x, count, dim=-1)` for [R, V] rows: equal values (sorted, largest first), indices equal up to
    the order of tied values (which topk leaves unspecified too).

    On a long row it selects in two levels, because topk's cost on CPU grows with the row and the count
    together: the row is viewed as `c` (about sqrt(V / count)) strips of `n` = V // c tokens, column j being
    tokens j, n + j, 2n + j, ...; the `count` columns with the largest maxima are kept, and the top-`count` is
    taken among their `c * count` values (and the < c tokens past the last strip). A value above the count-th
    largest lies in a kept column, or else `count` kept columns would each hold a larger one: the values are
    exact. At [32, 49152] on one CPU thread: 1.8 against 3.5 ms (count 129), 1.4 against 2.6 ms (count 65).
    """
    rows, vocab = x.shape
    strips = max(2, round(math.sqrt(vocab / max(count, 1))))
    columns = vocab // strips
    if vocab < 8192 or columns < 4 * count:
        return torch.topk(x, count, dim=-1)
    grid = x[:, : strips * columns].view(rows, strips, columns)
    kept = torch.topk(grid.amax(dim=1), count, dim=-1, sorted=False).indices  # [R, count] column ids
    candidates = grid.gather(2, kept[:, None, :].expand(rows, strips, count)).reshape(rows, strips * count)
    ids = (torch.arange(strips, device=x.device)[:, None] * columns + kept[:, None, :]).reshape(rows, strips * count)
    tail = strips * columns
    if tail < vocab:
        candidates = torch.cat([candidates, x[:, tail:]], dim=-1)
        ids = torch.cat([ids, torch.arange(tail, vocab, device=x.device).expand(rows, -1)], dim=-1)
    values, where = torch.topk(candidates, count, dim=-1)
    return torch.return_types.topk((values, ids.gather(1, where)))
