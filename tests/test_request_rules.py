"""A request's own token rules may shape a guarded answer but not take the guard's answer away (`request_rules`)."""

from __future__ import annotations

import pytest
import torch

import ngsd
from ngsd import NGSDConfig
from ngsd.decoding.request_rules import GUARD_REMOVED_AT, removed_share, rules_of, rules_remove_guard
from ngsd.decoding.step import GuardedStep

NEG = float("-inf")


def _peaked(top: list[int], vocab: int = 8, height: float = 6.0) -> torch.Tensor:
    """[len(top), vocab] logits, each row nearly all its mass (~0.98) on its `top` token."""
    logits = torch.zeros(len(top), vocab)
    logits[torch.arange(len(top)), torch.tensor(top)] = height
    return logits


def _ban(*tokens: int):
    def processor(sequences: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, list(tokens)] = NEG
        return scores

    return processor


def test_removed_share_is_the_mass_a_mask_takes_and_all_of_it_when_no_token_is_left():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]))
    masked = logits.clone()
    masked[:, 0] = NEG
    assert removed_share(logits, masked).tolist() == pytest.approx([0.7, 0.5], abs=1e-6)
    assert removed_share(logits, logits).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert removed_share(logits, torch.full_like(logits, NEG)).tolist() == [1.0, 1.0]


def test_a_bias_that_only_lowers_the_guards_token_counts_as_removing_it():
    base, expert = _peaked([0]), _peaked([1])
    biased = lambda logits: logits + torch.tensor([0.0, -100.0, 0, 0, 0, 0, 0, 0])  # noqa: E731 (finite, not a mask)
    assert rules_remove_guard(base, biased(base), expert, biased(expert)).tolist() == [True]
    mild = lambda logits: logits + torch.tensor([0.0, -1.0, 0, 0, 0, 0, 0, 0])  # noqa: E731 (the expert still insists)
    assert rules_remove_guard(base, mild(base), expert, mild(expert)).tolist() == [False]


def test_rules_that_shape_both_answers_alike_or_take_the_bases_away_do_not_count():
    base, expert = _peaked([0, 0]), _peaked([1, 0])
    only_two = torch.full((2, 8), NEG)
    only_two[:, 2] = 0.0  # a grammar that allows one token: it removes nearly all of both distributions
    assert rules_remove_guard(base, base + only_two, expert, expert + only_two).tolist() == [False, False]
    no_zero = torch.zeros(2, 8)
    no_zero[:, 0] = NEG  # the base's choice: in row 0 the expert's answer is untouched, in row 1 both lose it
    assert rules_remove_guard(base, base + no_zero, expert, expert + no_zero).tolist() == [False, False]
    assert GUARD_REMOVED_AT == 0.5


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy, some rows guarded", "sampling, logits path"])
def test_the_step_names_the_guarded_rows_whose_processors_removed_the_guards_answer(temperature):
    """Rows 0 and 1 guarded, row 2 routed; the expert prefers token 1 in row 0 (the base 0) and agrees in row 1."""
    config = NGSDConfig(candidate_k=8)
    base = _peaked([0, 0, 0])
    expert = _peaked([1, 0])  # the guarded rows' expert logits [R, V]

    def step_with(processor) -> GuardedStep:
        step = GuardedStep(lambda i: config.step_params(i, temperature=temperature), 0, "torch", None, None, False,
                           processor)
        step.set_rows(torch.tensor([0, 1]), 3)
        return step

    inputs = (torch.zeros(3), torch.full((3,), 0.9), torch.tensor([7]), torch.tensor([0]), torch.zeros(3, 2).long())
    removed = step_with(_ban(1))
    tokens = removed.run(0, base, expert, *inputs)[0]
    assert removed.removed_guard.tolist() == [True, False, False]
    assert 1 not in tokens.tolist()  # the rules still bind the step's choice (the loop ends row 0 instead)
    for harmless in (_ban(0), _ban(5)):  # the base's choice (both lose it in row 1), or a token neither wants
        step = step_with(harmless)
        step.run(0, base, expert, *inputs)
        assert step.removed_guard.tolist() == [False, False, False]
    plain = step_with(None)
    plain.run(0, base, expert, *inputs)
    assert plain.removed_guard is None
    at_alpha_zero = step_with(_ban(1))  # a row at alpha 0 mixes nothing of the expert: no guard to take away
    at_alpha_zero.run(0, base, expert, inputs[0], torch.tensor([0.0, 0.9, 0.9]), *inputs[2:])
    assert at_alpha_zero.removed_guard.tolist() == [False, False, False]


def test_penalties_shape_a_guarded_row_but_do_not_count_as_its_rules():
    """A repetition penalty lowers a token by a share of its own logit and never removes it; counted, it cut short 21
    of 40 benign answers guarded at alpha 0.9 (SmolLM2, penalty 1.2)."""
    from transformers import LogitsProcessorList, NoBadWordsLogitsProcessor, RepetitionPenaltyLogitsProcessor

    penalty, bad_words = RepetitionPenaltyLogitsProcessor(1.2), NoBadWordsLogitsProcessor([[5]], eos_token_id=2)
    assert rules_of(None) is None
    assert rules_of(LogitsProcessorList([penalty])) is None
    assert rules_of(penalty) is None
    only_rules = LogitsProcessorList([bad_words])
    assert rules_of(only_rules) is only_rules
    assert list(rules_of(LogitsProcessorList([penalty, bad_words]))) == [bad_words]

    config = NGSDConfig(candidate_k=8)
    base, expert = _peaked([0]), _peaked([1], height=20.0)
    expert[0, 3] = 15.0
    sequences = torch.tensor([[1]])  # the penalty lowers token 1, the expert's choice, to a third of its logit
    penalized = RepetitionPenaltyLogitsProcessor(3.0)
    assert rules_remove_guard(base, penalized(sequences, base.clone()), expert,
                              penalized(sequences, expert.clone())).tolist() == [True]  # were it counted
    for processors, removed in ((LogitsProcessorList([RepetitionPenaltyLogitsProcessor(3.0)]), None),
                                (LogitsProcessorList([RepetitionPenaltyLogitsProcessor(3.0), _ban(4)]), [False]),
                                (LogitsProcessorList([RepetitionPenaltyLogitsProcessor(3.0), _ban(1)]), [True])):
        step = GuardedStep(lambda i: config.step_params(i), 0, "torch", None, None, False, processors)
        step.set_rows(torch.tensor([0]), 1)
        step.run(0, base, expert, torch.zeros(1), torch.full((1,), 0.9), torch.tensor([7]), torch.tensor([0]),
                 sequences)
        assert (step.removed_guard if removed is None else step.removed_guard.tolist()) == removed


@pytest.mark.parametrize("rows", [[0], [0, 1]], ids=["every row guarded", "one of two rows guarded"])
def test_a_penalty_shapes_the_base_and_leaves_the_experts_answer_its_own(rows):
    """Gate open, alpha 0.9: the expert insists on token 1, which the request's repetition penalty lowers below token 3.
    Penalised too (until stop 55), the expert's answer became token 3: a penalty could talk the guard out of its
    refusal, whose tokens are often in the prompt. An unguarded row still gets the penalty (its expert is its base)."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    config = NGSDConfig(mode="open", candidate_k=8)
    base = torch.zeros(2, 8)
    base[:, 1], base[:, 3] = 20.0, 15.0  # the base insists on token 1 too, and the penalty makes it token 3
    expert = torch.zeros(len(rows), 8)
    expert[:, 1], expert[:, 3] = 20.0, 15.0
    step = GuardedStep(lambda i: config.step_params(i), 0, "torch", None, None, False,
                       LogitsProcessorList([RepetitionPenaltyLogitsProcessor(3.0)]))
    step.set_rows(torch.tensor(rows), 2)
    tokens = step.run(0, base, expert, torch.zeros(2), torch.tensor([0.9, 0.9 if len(rows) == 2 else 0.0]),
                      torch.tensor([7]), torch.tensor([0]), torch.tensor([[1], [1]]))[0]
    assert tokens.tolist() == ([1, 1] if len(rows) == 2 else [1, 3])
    assert step.removed_guard is None  # a penalty is not a rule: nothing to end


def test_sampling_warpers_among_the_processors_are_refused_by_name(llama_pair):
    """A temperature warper as a processor ran before the gate: at 5 it flattened both distributions until the guarded
    answers were the unguarded ones. The op applies temperature / top-k / top-p itself, after the gate."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

    from ngsd import guarded_generate

    model, lora_folder = llama_pair
    for processors in (LogitsProcessorList([TemperatureLogitsWarper(5.0)]), TopKLogitsWarper(4)):
        with pytest.raises(ValueError, match="sampling warpers .*(TemperatureLogitsWarper|TopKLogitsWarper)"):
            guarded_generate(model, torch.tensor([[5, 6, 7]]), expert=lora_folder, alpha=0.9, max_new_tokens=2,
                             logits_processor=processors)
    ngsd.apply(model, expert=lora_folder)
    try:  # sampling settings of generate itself are the op's, not processors: accepted
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=True, temperature=0.7, top_k=5,
                       pad_token_id=0, ngsd_alpha=0.9)
        with pytest.raises(ValueError, match="TemperatureLogitsWarper"):
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, pad_token_id=0, ngsd_alpha=0.9,
                           logits_processor=LogitsProcessorList([TemperatureLogitsWarper(5.0)]))
    finally:
        ngsd.remove(model)
