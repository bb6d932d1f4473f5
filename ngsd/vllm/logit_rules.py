"""A guarded request's own logit rules on its rows, before the guarded choice reads them.

vLLM applies a request's rules to the one row it samples from, the base row here: its masks
(allowed tokens, bad words, min tokens, grammar) and its ``logit_bias`` before this processor, so
the base row arrives with them and `apply_masks_and_bias` gives them to the expert row; its repetition,
presence and frequency penalties only after the processors, on the row the processor has already
forced (one finite logit), where they would change nothing, so `apply_penalties` applies them here to
the base row, with vLLM's own function, as the project's loop applies Hugging Face's penalties to the
base alone (`ngsd.decoding.request_rules`). vLLM applying them again to the forced row keeps its
token: the chosen logit stays finite and every other one stays -inf.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from vllm.utils.torch_utils import make_tensor_with_pad
from vllm.v1.sample.ops.penalties import apply_all_penalties

from .gate_book import GateState


def apply_masks_and_bias(states: Sequence[GateState], base: torch.Tensor, expert: torch.Tensor) -> None:
    """The masks and the logit bias vLLM gave row i of `base`, given to row i of `expert` (in place)."""
    constrained = _positions(states, lambda state: state.constrained, base.device)
    if constrained is not None:  # tokens vLLM masked for a request (-inf) are masked in its expert row too
        expert[constrained] = expert[constrained].masked_fill(torch.isneginf(base[constrained]), float("-inf"))
    add_logit_bias(expert, states)


def apply_penalties(states: Sequence[GateState], base: torch.Tensor) -> None:
    """Each request's repetition, presence and frequency penalties on its base row (in place), which vLLM applies
    only after the processors. Not on the expert row: a penalty would lower the guard's own answer (the refusal's
    tokens are often in the prompt or already said; `ngsd.decoding.request_rules`)."""
    penalized = _positions(states, lambda state: state.penalties is not None, base.device)
    if penalized is not None:
        base[penalized] = penalize(base[penalized], [states[k] for k in penalized.tolist()])


def _positions(states: Sequence[GateState], wanted: Callable[[GateState], bool],
               device: torch.device) -> torch.Tensor | None:
    """The positions of the states `wanted` picks, as an index tensor; None when it picks none."""
    positions = [k for k, state in enumerate(states) if wanted(state)]
    return torch.tensor(positions, dtype=torch.long, device=device) if positions else None


def add_logit_bias(logits: torch.Tensor, states: Sequence[GateState]) -> None:
    """Each state's request's ``logit_bias`` added to its row of `logits`, in place, as vLLM's own logit-bias
    processor adds it to the base row (which has it already when this processor runs)."""
    biased = [(k, token, bias) for k, state in enumerate(states) for token, bias in (state.logit_bias or {}).items()]
    if biased:
        rows, tokens, biases = zip(*biased)
        logits[list(rows), list(tokens)] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)


def penalize(logits: torch.Tensor, states: Sequence[GateState]) -> torch.Tensor:
    """`logits` [len(states), V] with each state's request's penalties applied as vLLM applies them: repetition
    over its prompt and output tokens, presence and frequency over its output tokens (in place; returned)."""
    vocab = logits.shape[1]
    prompts = make_tensor_with_pad([list(state.prompt) for state in states], pad=vocab, dtype=torch.int64,
                                   device=logits.device)
    repetition, presence, frequency = (torch.tensor(values, dtype=torch.float32, device=logits.device)
                                       for values in zip(*(state.penalties for state in states)))
    return apply_all_penalties(logits, prompts, presence, frequency, repetition, [list(state.output) for state in states])
