"""The spec's decode step run the way the published reference code runs it: one sequence at a
time, no KV cache (both models recompute the whole sequence every step), PyTorch ops on the full
next-token distributions, a host round trip per step.

This is the baseline `bench_decode.py naive` measures the library against. It is deliberately
simple, not deliberately slow: every step uses vectorised tensor ops, so the gap it shows is the
one a user of the reference code would see (no cache, no batching), not Python loops over the
vocabulary. (`tests/naive_ngsd.py`, the float64 Python-list decoder, is the correctness oracle.)

    >>> # base, expert: causal LMs over one vocabulary; prompt_ids: a list of token ids
    >>> # tokens, spikes = naive_reference_decode(base, expert, prompt_ids, alpha=0.9, max_new_tokens=32)
"""

from __future__ import annotations

import time
from typing import Callable

import torch

LastLogits = Callable[[torch.Tensor], torch.Tensor]


class TimedForward:
    """`model(ids).logits[0, -1]` in float32, keeping the seconds spent inside the forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.seconds = 0.0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        with torch.no_grad():
            logits = self.model(ids.to(self.device)).logits[0, -1].float()
        if logits.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        return logits


def naive_reference_decode(
    base: LastLogits,
    expert: LastLogits,
    prompt_ids: list[int],
    alpha: float,
    max_new_tokens: int,
    tau: float = 8.0,
    v_th: float = 1.0,
    rho: float = 0.6,
    v_reset: float = 0.0,
    top_k: int = 64,
) -> tuple[list[int], list[bool]]:
    """Greedy NGSD (spec section 3, TV divergence, union candidates) for one sequence, exactly
    `max_new_tokens` tokens (no EOS stop, like the benchmark's other methods)."""
    ids = torch.tensor([prompt_ids])
    v = v_reset
    tokens: list[int] = []
    spikes: list[bool] = []
    for _ in range(max_new_tokens):
        p_base = torch.softmax(base(ids), dim=-1)
        p_expert = torch.softmax(expert(ids), dim=-1)
        divergence = 0.5 * (p_base - p_expert).abs().sum().item()
        v = (1.0 - 1.0 / tau) * v + divergence
        spike = v >= v_th
        score = p_base
        if spike:
            v = v_reset + rho * (v - v_reset)
            candidates = torch.cat([p_base.topk(top_k).indices, p_expert.topk(top_k).indices]).unique()
            score = p_base.clone()
            score[candidates] = p_base[candidates] + alpha * (p_expert[candidates] - p_base[candidates])
        token = int(torch.argmax(score))  # first maximum: the lowest id wins a tie
        tokens.append(token)
        spikes.append(spike)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, spikes
