"""The hand-off of the expert's final hidden states from the wrapper model to the logits processor.

Both live in the same worker process (with tensor parallelism: in every worker, each with its
own pair). vLLM calls the model's `compute_logits` for the rows it is about to sample, then the
sampler, whose processors see those same rows in the same order. The model runs the LM head once
on the base and expert rows stacked (one GEMM streams the head's weight once, where two would
stream it twice: at 128 rows and V = 49,152 on one CPU core, 358 ms instead of 404) and leaves
the expert's logits of those rows here for the processor. A take that finds nothing, or another
row count, is an error: never a silent unguarded step.

With the risk probe on (`risk.py`) two more things travel: the probe's scores of every token of the
step (`ProbeTokens`, from the model's forward), and the first-step total variation of the rows the
processor names in `check_rows` (undecided requests), computed on the raw logits in `compute_logits`.
For the guarded rows whose requests have token rules of their own (`ruled_rows`), the base logits from
before vLLM applies those rules travel too (`ngsd.decoding.request_rules` compares them with after).
The model also leaves the divergence check's look-ahead here (`look_ahead.py`: the expert's own greedy
openings of requests), which the processor calls when it decides diverging requests, and gives it each
deciding step's block table (where those prompts' expert keys and values lie).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .look_ahead import ExpertOpening
    from .risk import ProbeTokens


@dataclass
class ExpertRows:
    all_logits: torch.Tensor  # [rows, vocab] the expert's logits, in the sampler's row order
    divergence: dict[int, float] = field(default_factory=dict)  # row -> first-step TV (the rows in check_rows)
    base_before_rules: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> raw base logits (ruled_rows)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """The expert logits of `rows` (sorted, unique), which the caller may write: after `take` it owns them."""
        if rows.numel() == self.all_logits.shape[0]:  # every row, in order (rows are sorted and unique)
            return self.all_logits
        return self.all_logits[rows]


class ExpertChannel:
    def __init__(self) -> None:
        self._pending: ExpertRows | None = None
        self._probe: "ProbeTokens | None" = None
        self.check_rows: list[int] = []  # set by the processor each step: rows whose divergence check may be due
        self.ruled_rows: list[int] = []  # set by the processor each step: guarded rows whose requests have token rules
        # set by the model at load (`look_ahead.ExpertOpening`): (prompts' ids, the expert's first-step logits of
        # each, tokens, rows=their rows in the step's batch) -> the expert's own greedy openings; None: the engine
        # cannot decode one (tensor parallelism...) or its probe has no look-ahead
        self.look_ahead: "ExpertOpening | None" = None

    def put_probe(self, tokens: "ProbeTokens | None") -> None:
        self._probe = tokens

    def take_probe(self) -> "ProbeTokens":
        tokens, self._probe = self._probe, None
        if tokens is None:
            raise RuntimeError("ngsd: no risk-probe scores for this step: the guarded model's forward did not score "
                               "the step's tokens (no attention metadata in vLLM's forward context?)")
        return tokens

    def put(self, rows: ExpertRows) -> None:
        self._pending = rows

    def take(self, rows: int) -> ExpertRows:
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError(
                "ngsd: no expert outputs for this step: the guarded model's compute_logits did not run before the "
                "sampler (is the engine's model NGSDGuardedLlamaForCausalLM, and speculative decoding off?)"
            )
        if pending.all_logits.shape[0] != rows:
            raise RuntimeError(f"ngsd: the expert has {pending.all_logits.shape[0]} rows this step, the sampler {rows}")
        return pending


CHANNEL = ExpertChannel()
