"""The hand-off of the expert's final hidden states from the wrapper model to the logits processor.

Both live in the same worker process (with tensor parallelism: in every worker, each with its
own pair). vLLM calls the model's `compute_logits` for the rows it is about to sample, then the
sampler, whose processors see those same rows in the same order. The model keeps the expert's
hidden states of those rows here with its LM head, and the processor runs the head on the
guarded rows only (opted-out rows cost no expert head). A take that finds nothing, or another
row count, is an error: never a silent unguarded step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class ExpertRows:
    hidden: torch.Tensor  # [rows, hidden] the expert's final hidden states, in the sampler's row order
    head: Callable[[torch.Tensor], torch.Tensor]  # hidden states -> logits (vLLM's gathered LM head)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden[rows])


class ExpertChannel:
    def __init__(self) -> None:
        self._pending: ExpertRows | None = None

    def put(self, rows: ExpertRows) -> None:
        self._pending = rows

    def take(self, rows: int) -> ExpertRows:
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError(
                "ngsd: no expert outputs for this step: the guarded model's compute_logits did not run before the "
                "sampler (is the engine's model NGSDGuardedLlamaForCausalLM, and speculative decoding off?)"
            )
        if pending.hidden.shape[0] != rows:
            raise RuntimeError(f"ngsd: the expert has {pending.hidden.shape[0]} rows this step, the sampler {rows}")
        return pending


CHANNEL = ExpertChannel()
