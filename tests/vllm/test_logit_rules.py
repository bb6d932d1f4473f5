"""The request rules the processor applies to a guarded request's rows itself (no engine, no model)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; run with .venv-vllm/bin/python (scripts/vllm_env.sh)")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.ops.penalties import apply_all_penalties  # noqa: E402

from ngsd.vllm.gate_book import GateState, penalties_of  # noqa: E402
from ngsd.vllm.logit_rules import apply_masks_and_bias, apply_penalties  # noqa: E402
from ngsd.vllm.settings import RequestPolicy  # noqa: E402


def _state(**fields) -> GateState:
    return GateState(policy=RequestPolicy(guarded=True, alpha=0.9), potential=0.0, **fields)


def test_each_row_pair_gets_its_own_requests_rules():
    """Row 0: vLLM masked token 1 in the base row, and a logit bias; row 1: repetition penalty 2 (prompt token 0, output token 2) and
    frequency penalty 0.5; row 2: no rules. Masks and the bias reach the expert row, penalties the base row only (on
    the expert's they lowered the guard's own answer until stop 55)."""
    base = torch.tensor([[1.0, float("-inf"), 3.0], [4.0, 5.0, -6.0], [1.0, 2.0, 3.0]])
    expert = torch.tensor([[7.0, 8.0, 9.0], [4.0, 5.0, -6.0], [3.0, 2.0, 1.0]])
    states = [_state(constrained=True, logit_bias={0: -1.5, 2: 100.0}, output=[]),
              _state(penalties=(2.0, 0.0, 0.5), prompt=[0], output=[2, 2]), _state(output=[0])]
    apply_masks_and_bias(states, base, expert)
    apply_penalties(states, base)
    assert expert[0].tolist() == [5.5, float("-inf"), 109.0]
    assert base[0].tolist() == [1.0, float("-inf"), 3.0]  # vLLM biased the base row before the processor
    assert base[1].tolist() == [2.0, 5.0, -13.0]  # -6 x 2 - 0.5 x 2
    assert expert[1].tolist() == [4.0, 5.0, -6.0]
    assert base[2].tolist() == [1.0, 2.0, 3.0] and expert[2].tolist() == [3.0, 2.0, 1.0]


def test_vllms_penalties_after_the_processor_keep_the_forced_token():
    """vLLM penalises the row the processor returns once more: one finite logit (0 at the chosen token) stays the
    only finite one, whatever the penalties and whichever tokens the prompt and output hold."""
    vocab, chosen = 16, 5
    forced = torch.full((3, vocab), float("-inf"))
    forced[:, chosen] = 0.0
    prompt = torch.tensor([[chosen, 1, 2], [3, vocab, vocab], [chosen, chosen, 4]])  # padded with the vocab size
    output = [[chosen, chosen, 7], [chosen], []]
    penalised = apply_all_penalties(forced, prompt, presence_penalties=torch.tensor([2.0, -2.0, 0.0]),
                                    frequency_penalties=torch.tensor([2.0, -2.0, 1.0]),
                                    repetition_penalties=torch.tensor([2.0, 0.5, 1.0]), output_token_ids=output)
    assert torch.isfinite(penalised).sum(dim=1).tolist() == [1, 1, 1]
    assert penalised.argmax(dim=1).tolist() == [chosen] * 3


def test_penalties_are_read_only_where_a_request_sets_one():
    assert penalties_of(SamplingParams()) is None
    assert penalties_of(SamplingParams(repetition_penalty=1.3)) == (1.3, 0.0, 0.0)
    assert penalties_of(SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25)) == (1.0, 0.5, -0.25)
