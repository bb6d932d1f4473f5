"""When a request's own token rules take the guard's answer away: the test the loop and the vLLM processor share.

A request's token rules (Hugging Face logits processors: bad words, sequence bias, prefix-allowed
tokens, n-gram bans, min length; in vLLM: allowed tokens, bad words, min tokens, logit bias,
structured outputs) bind the guarded row's expert as well as its base, so the guard's choice obeys
them. That lets a request remove the guard itself: a bias of -100 on "I" / " I" leaves an expert
that only refuses with "I ..." nothing to say, and the mixture writes the base's answer (stop 54
found the shipped expert writing a pipe-bomb guide at alpha 1.0 this way).

Rules that shape what both models say (a JSON grammar) remove about as much of the base's
distribution as of the expert's. Rules that single out the guard remove much more of the expert's:
that difference is what this measures, per guarded row and step, as total variation between each
model's distribution before and after the rules. When the rules remove at least `GUARD_REMOVED_AT`
more of the expert's distribution than of the base's, the guard can no longer answer within them,
and the row's answer ends there: no token the request forbade is written, and none the guard would not.

Penalties (repetition, presence, frequency) are neither rules nor counted: they apply to the base
only, and the expert keeps its own distribution. Applied to the expert too (until stop 55), a
repetition penalty of 1.3 turned the shipped expert's refusal of the pipe-bomb request into "However,
you can build a pipe bomb using everyday materials..." (the refusal's " I" and "sorry" are in the
prompt or already said). Counted as rules, a penalty of 1.2 cut short 21 of 40 benign answers guarded
at alpha 0.9 (AlpacaEval training ids): on SmolLM2's large logits it moves the two models'
distributions differently. Hugging Face's repetition penalties are told by type; a processor of one's
own that is a penalty says so with a class attribute ``ngsd_penalty = True``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..risk.divergence_check import total_variation

GUARD_REMOVED_AT = 0.5
"""The share of the expert's distribution (beyond the base's) whose removal by the request's rules ends a guarded
row: past a half, the expert's own choice can no longer hold the majority of what is left to it."""

STOP_REASON = "rules_removed_guard"


def removed_share(raw_logits: torch.Tensor, ruled_logits: torch.Tensor) -> torch.Tensor:
    """[R] total variation between each row's distribution before and after the rules (1 where they leave no token)."""
    share = total_variation(raw_logits, ruled_logits)
    return torch.where(torch.isfinite(ruled_logits).any(-1).to(share.device), share, torch.ones_like(share))


def rules_remove_guard(base_raw: torch.Tensor, base_ruled: torch.Tensor, expert_raw: torch.Tensor,
                       expert_ruled: torch.Tensor) -> torch.Tensor:
    """[R] bool: the rows whose request's rules remove at least `GUARD_REMOVED_AT` more of the expert's next-token
    distribution than of the base's (all four [R, V] logits of the guarded rows, before and after the rules).

    >>> import torch
    >>> base, expert = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0]])
    >>> no_second_token = torch.tensor([[0.0, float("-inf"), 0.0]])
    >>> rules_remove_guard(base, base + no_second_token, expert, expert + no_second_token).tolist()
    [True]
    >>> only_the_third = torch.tensor([[float("-inf"), float("-inf"), 0.0]])  # shapes both answers alike
    >>> rules_remove_guard(base, base + only_the_third, expert, expert + only_the_third).tolist()
    [False]
    """
    removed = removed_share(expert_raw, expert_ruled) - removed_share(base_raw, base_ruled).to(expert_raw.device)
    return removed >= GUARD_REMOVED_AT


def is_penalty(processor: Any) -> bool:
    """Whether a logits processor is a penalty (the base's alone, not a rule): Hugging Face's repetition penalties,
    or a processor whose class says ``ngsd_penalty = True``."""
    from transformers import EncoderRepetitionPenaltyLogitsProcessor, RepetitionPenaltyLogitsProcessor

    return (isinstance(processor, (RepetitionPenaltyLogitsProcessor, EncoderRepetitionPenaltyLogitsProcessor))
            or getattr(processor, "ngsd_penalty", False) is True)


def _listed(processors: Any) -> list[Any]:
    """The processors of a call, as a list (a LogitsProcessorList, or one processor; none for None)."""
    if processors is None:
        return []
    return list(processors) if isinstance(processors, list) else [processors]


def check_processors(logits_processor: Any) -> None:
    """Sampling warpers (Hugging Face's ``*LogitsWarper``) are refused among a guarded call's logits processors: the
    processors run before the gate, and a warper there reshapes the two distributions it compares (a temperature of
    5 flattened both until the guarded answers were the unguarded ones). The step op applies temperature, top-k and
    top-p itself, after the gate."""
    warpers = [type(p).__name__ for p in _listed(logits_processor) if type(p).__name__.endswith("LogitsWarper")]
    if warpers:
        raise ValueError(f"guarded decoding does not take sampling warpers as logits processors "
                         f"({', '.join(warpers)}): they would reshape both distributions before the gate compares "
                         "them; pass do_sample=True with temperature= / top_k= / top_p=, which the step applies after "
                         "the gate")


def rules_of(processors: Any) -> Any:
    """The processors that are a request's rules (they bind the expert too): `processors` itself when none is a
    penalty, a list without the penalties when some are, None when all are (or there are none)."""
    listed = _listed(processors)
    if not listed:
        return None
    rules = [processor for processor in listed if not is_penalty(processor)]
    if len(rules) == len(listed):
        return processors
    if not rules:
        return None
    from transformers import LogitsProcessorList

    return LogitsProcessorList(rules)
