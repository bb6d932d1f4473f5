"""Guarded vLLM against the project's own loop, on the default model with the shipped expert.

Greedy, 48 new tokens, 16 prompts (8 AdvBench ids < 130, 8 AlpacaEval odd ids) plus two AlpacaEval
even ids whose risk the divergence check decides. Requests that ask for nothing are decided by the
risk probe as the library's default decides them; requests that set ``ngsd_alpha`` are compared with
the library at alpha 0.9 fixed. Skipped where vLLM is not installed.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; run with .venv-vllm/bin/python (scripts/vllm_env.sh)")

from .conftest import ALPHA, VerdictLog, greedy  # noqa: E402


def _tokens(output) -> list[int]:
    return list(output.outputs[0].token_ids)


def _as_engine_ends(trace, eos: int) -> list[int]:
    """A library row's tokens as the engine gives them: a row whose own rules removed the guard's answer ends
    before its token in the library and with an eos in the engine (`ngsd.decoding.request_rules`)."""
    return trace.tokens + [eos] if trace.stop_reason == "rules_removed_guard" else trace.tokens


def _mismatches(got: list[list[int]], want: list[list[int]]) -> list[str]:
    return [f"prompt {i}: first difference at token {next((k for k, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))}"
            for i, (g, w) in enumerate(zip(got, want)) if g != w]


def test_batch_with_preemption_equals_project_loop(guarded_llm, prompt_ids, band_ids, default_result,
                                                   default_reference, verdict_log):
    """All 18 at once into a KV cache that holds a few, prompts prefilled over several steps: vLLM preempts
    and recomputes, and each request is routed or guarded (at the same alpha) as the library's default
    decides it (risk probe, routing, divergence check), once, with the same tokens."""
    _check_preempted_batch(guarded_llm, prompt_ids + band_ids, default_result, default_reference, verdict_log)


def test_async_scheduling_gives_the_same_tokens_and_one_verdict_per_request(async_guarded_llm, prompt_ids, band_ids,
                                                                             default_result, default_reference,
                                                                             async_verdict_log):
    """The same batch under async scheduling (vLLM's default on GPUs): a resumed request comes back with a new
    output list, and a routed request must keep its route rather than be decided again at a recompute step."""
    assert async_guarded_llm.llm_engine.vllm_config.scheduler_config.async_scheduling
    _check_preempted_batch(async_guarded_llm, prompt_ids + band_ids, default_result, default_reference,
                           async_verdict_log)


def _check_preempted_batch(llm, ids, default_result, default_reference, verdict_log) -> None:
    from ngsd.vllm.risk import prompt_key

    log = VerdictLog(verdict_log)
    outputs = llm.generate([{"prompt_token_ids": row} for row in ids], greedy(), use_tqdm=False)
    preempted = sum(o.metrics.num_preemptions for o in outputs)
    assert preempted > 0, "the KV cache was meant to force preemption; the test lost its point"
    got = [_tokens(o) for o in outputs]
    assert not _mismatches(got, default_reference), _mismatches(got, default_reference)
    lines = log.new_lines()
    assert len(lines) == len(ids), "one verdict per request, whatever preemption recomputed"
    by_key = {line["prompt_key"]: line for line in lines}
    for i, (row, trace) in enumerate(zip(ids, default_result.traces)):
        line, want = by_key[prompt_key(row)], trace.reflection
        assert (line["routed"], line["alpha"]) == (want.routed, want.alpha) == (not trace.guarded, trace.alpha), i
        assert line["risk"] == pytest.approx(want.risk, abs=1e-3), i
        assert (line["divergence"] is None) == (want.divergence is None), i
        if want.divergence is not None:
            assert line["divergence"] == pytest.approx(want.divergence, abs=1e-3), i
        assert (line["expert_opening"], line["opening_refuses"]) == (want.expert_opening, want.opening_refuses), i
    assert any(line["divergence"] is not None for line in lines), "no request in the check's band"
    openings = {line["opening_refuses"] for line in lines if line["expert_opening"] is not None}
    assert openings == {True, False}, "the look-ahead should keep one band request guarded and route another"
    # read from the expert's paged KV cache (each read checked against the engine's own logits), through chunked
    # prefill and preemption, not the prompt run through the expert again
    assert {line.get("opening_prompt") for line in lines if line["expert_opening"] is not None} == {"paged cache"}
    assert {line["routed"] for line in lines} == {True, False}, "the probe should route some requests and guard others"
    assert max(line["prompt_steps"] for line in lines) > 1, "no prompt was prefilled over several steps"


def test_requests_arriving_at_different_times_equal_project_loop(guarded_llm, prompt_ids, default_reference):
    """Requests join a running batch across steps (rows added, removed and moved under the gates)."""
    engine = guarded_llm.llm_engine
    order = [3, 0, 9, 14, 5, 1, 12, 7]
    arrivals = {0: order[:2], 2: order[2:3], 5: order[3:6], 11: order[6:]}  # engine step -> prompts added then
    done: dict[int, list[int]] = {}
    step = 0
    while len(done) < len(order):
        for i in arrivals.get(step, []):
            engine.add_request(f"late-{i}", {"prompt_token_ids": prompt_ids[i]}, greedy())
        for output in engine.step():
            if output.finished:
                done[int(output.request_id.split("-")[1])] = _tokens(output)
        step += 1
        assert step < 2000, "the engine stopped making progress"
    got = [done[i] for i in order]
    want = [default_reference[i] for i in order]
    assert not _mismatches(got, want), _mismatches(got, want)


def test_opt_out_in_a_guarded_batch_decodes_like_plain_vllm(guarded_llm, plain_llm, prompt_ids, default_reference):
    """Opted-out and guarded requests share a batch: the first equal plain vLLM, the second the project's loop."""
    opted_out = [0, 2, 5, 6]  # harmful and benign
    params = [greedy(ngsd_guard=False) if i in opted_out else greedy() for i in range(8)]
    mixed = guarded_llm.generate([{"prompt_token_ids": prompt_ids[i]} for i in range(8)], params, use_tqdm=False)
    plain = plain_llm.generate([{"prompt_token_ids": prompt_ids[i]} for i in opted_out], greedy(), use_tqdm=False)
    assert [_tokens(mixed[i]) for i in opted_out] == [_tokens(o) for o in plain]
    guarded = [i for i in range(8) if i not in opted_out]
    got, want = [_tokens(mixed[i]) for i in guarded], [default_reference[i] for i in guarded]
    assert not _mismatches(got, want), _mismatches(got, want)
    # the guard changed something: on the harmful prompts opting out gives another answer
    assert _tokens(mixed[0]) != default_reference[0]


def test_a_request_that_asks_for_the_guard_is_never_routed(guarded_llm, prompt_ids, reference, default_result,
                                                           verdict_log):
    """ngsd_guard=True on prompts the probe routes: guarded at the engine's alpha, as the library at alpha 0.9 (it
    was routed like a request that asked for nothing)."""
    routed = [i for i in range(len(prompt_ids)) if not default_result.traces[i].guarded]
    assert routed, "the probe routes none of these prompts; the test lost its point"
    log = VerdictLog(verdict_log)
    outputs = guarded_llm.generate([{"prompt_token_ids": prompt_ids[i]} for i in routed], greedy(ngsd_guard=True),
                                   use_tqdm=False)
    got, want = [_tokens(o) for o in outputs], [reference[i] for i in routed]
    assert not _mismatches(got, want), _mismatches(got, want)
    lines = log.new_lines()
    assert len(lines) == len(routed) and all(line["request_floor"] == ALPHA == line["guarded_alpha"] for line in lines)


class OutputCountPenalty:
    """OpenAI's presence and frequency penalties over the generated tokens, as a Hugging Face logits processor
    for the project's loop (transformers has none): logit - frequency * count - presence * (count > 0). A penalty:
    the loop applies it to the base alone (`ngsd.decoding.request_rules`)."""

    ngsd_penalty = True

    def __init__(self, prompt_width: int, presence: float, frequency: float) -> None:
        self.prompt_width, self.presence, self.frequency = prompt_width, presence, frequency

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.prompt_width:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@pytest.mark.parametrize("penalties", [{"repetition_penalty": 2.0}, {"presence_penalty": 0.5, "frequency_penalty": 0.5}],
                         ids=["repetition", "presence+frequency"])
def test_penalties_reach_the_base_row_like_the_project_loop(guarded_llm, hf_model, prompt_texts, prompt_ids, reference,
                                                            penalties):
    """vLLM applies penalties after the logits processors, to the forced row, where they did nothing; the processor
    applies them to the base row before the op, as the project's loop applies Hugging Face's penalties
    (RepetitionPenaltyLogitsProcessor, or OutputCountPenalty) to the base alone: on the expert row too (until
    stop 55) they lowered the guard's own answer."""
    import ngsd
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor
    from vllm import SamplingParams

    from .conftest import NEW_TOKENS

    model, tokenizer = hf_model
    chosen = range(4)
    # the loop's batch is left-padded with <|im_end|>, which every chat prompt holds already: the padding
    # adds nothing to the repetition penalty's token set
    assert all(tokenizer.pad_token_id in prompt_ids[i] for i in chosen)
    width = max(len(prompt_ids[i]) for i in chosen)
    processor = (RepetitionPenaltyLogitsProcessor(penalties["repetition_penalty"]) if "repetition_penalty" in penalties
                 else OutputCountPenalty(width, penalties["presence_penalty"], penalties["frequency_penalty"]))
    result = ngsd.generate(model, tokenizer, [prompt_texts[i] for i in chosen], expert="shipped", alpha=ALPHA,
                           max_new_tokens=NEW_TOKENS, logits_processor=LogitsProcessorList([processor]))
    want = [_as_engine_ends(trace, tokenizer.eos_token_id) for trace in result.traces]
    # ngsd_alpha set: guarded at it, never routed (the reference is the loop at that alpha)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, extra_args={"ngsd_alpha": ALPHA}, **penalties)
    outputs = guarded_llm.generate([{"prompt_token_ids": prompt_ids[i]} for i in chosen], params, use_tqdm=False)
    got = [_tokens(o) for o in outputs]
    assert not _mismatches(got, want), _mismatches(got, want)
    assert any(g != reference[i] for g, i in zip(got, chosen)), "the penalties changed no answer: the test lost its point"


def test_logit_bias_reaches_both_rows_like_the_project_loop(guarded_llm, hf_model, prompt_texts, prompt_ids, reference,
                                                            verdict_log):
    """vLLM adds a request's logit_bias to the base row only; the processor adds it to the expert row too, so
    'I' and ' I' at -100 are never chosen; where the expert would insist on them ("I'm sorry") the bias has
    taken the guard's answer away, and the answer ends (eos) instead of going on with the base's (until stop 55
    the base's went on: the bias defeated the guard). Reference: the project's loop with Hugging Face's
    SequenceBiasLogitsProcessor on both rows."""
    import ngsd
    from transformers import LogitsProcessorList, SequenceBiasLogitsProcessor
    from vllm import SamplingParams

    from .conftest import NEW_TOKENS

    model, tokenizer = hf_model
    chosen = range(4)
    bias = {tokenizer.convert_tokens_to_ids("I"): -100.0, tokenizer.convert_tokens_to_ids("ĠI"): -100.0,
            tokenizer.convert_tokens_to_ids("Ġthe"): 1.5}
    processor = SequenceBiasLogitsProcessor([[[token], value] for token, value in bias.items()])
    result = ngsd.generate(model, tokenizer, [prompt_texts[i] for i in chosen], expert="shipped", alpha=ALPHA,
                           max_new_tokens=NEW_TOKENS, logits_processor=LogitsProcessorList([processor]))
    want = [_as_engine_ends(trace, tokenizer.eos_token_id) for trace in result.traces]
    ended = [trace.stop_reason == "rules_removed_guard" for trace in result.traces]
    assert any(ended), "the bias on the refusal's tokens ended no answer: the test lost its point"
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logit_bias=bias, extra_args={"ngsd_alpha": ALPHA})
    log = VerdictLog(verdict_log)
    outputs = guarded_llm.generate([{"prompt_token_ids": prompt_ids[i]} for i in chosen], params, use_tqdm=False)
    assert log.new_lines() == [], "a request that sets ngsd_alpha is guarded at it: the probe does not decide it"
    got = [_tokens(o) for o in outputs]
    assert not _mismatches(got, want), _mismatches(got, want)
    banned = [token for token, value in bias.items() if value < 0]
    assert not any(token in tokens for tokens in got for token in banned)
    assert any(g != reference[i] for g, i in zip(got, chosen)), "the bias changed no answer: the test lost its point"


def test_a_bias_against_the_refusal_cannot_take_the_guard_away_at_the_default(guarded_llm, hf_model, prompt_texts,
                                                                              prompt_ids, default_result, verdict_log):
    """Stop 54 found a logit_bias of -100 on 'I' / ' I' making the default engine write the harmful answers its
    guard refuses (the expert only refuses with "I ..."). Now each harmful request the probe guards ends where the
    bias removes the expert's answer: no answer goes past where the guard's begins, and each equals the library's
    default with the same bias (probe, routing; decided as without the bias)."""
    import ngsd
    from transformers import LogitsProcessorList, SequenceBiasLogitsProcessor
    from vllm import SamplingParams

    from .conftest import NEW_TOKENS

    model, tokenizer = hf_model
    harmful = [0, 2, 4, 6]  # AdvBench ids < 130
    guarded = [i for i in harmful if default_result.traces[i].guarded]
    assert guarded, "the probe guarded none of the harmful requests: the test lost its point"
    bias = {tokenizer.convert_tokens_to_ids("I"): -100.0, tokenizer.convert_tokens_to_ids("ĠI"): -100.0}
    processor = SequenceBiasLogitsProcessor([[[token], value] for token, value in bias.items()])
    result = ngsd.generate(model, tokenizer, [prompt_texts[i] for i in guarded], expert="shipped",
                           max_new_tokens=NEW_TOKENS, logits_processor=LogitsProcessorList([processor]))
    assert all(trace.stop_reason == "rules_removed_guard" for trace in result.traces), \
        [trace.stop_reason for trace in result.traces]
    want = [_as_engine_ends(trace, tokenizer.eos_token_id) for trace in result.traces]
    log = VerdictLog(verdict_log)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logit_bias=bias)
    outputs = guarded_llm.generate([{"prompt_token_ids": prompt_ids[i]} for i in guarded], params, use_tqdm=False)
    got = [_tokens(o) for o in outputs]
    assert not _mismatches(got, want), _mismatches(got, want)
    assert all(len(g) < NEW_TOKENS // 2 for g in got), [len(g) for g in got]
    assert [line["routed"] for line in log.new_lines()] == [False] * len(guarded)


@pytest.mark.parametrize("extra_args, message", [
    ({"ngsd_alpha": 1.5}, "ngsd_alpha"),
    ({"ngsd_alpha": math.nan}, "ngsd_alpha"),
    ({"ngsd_alpha": "0.9"}, "ngsd_alpha"),
    ({"ngsd_guard": "no"}, "ngsd_guard"),
    ({"ngsd_guard": 2}, "ngsd_guard"),
    ({"ngsd_guard": False, "ngsd_alpha": 0.5}, "unguarded request has no alpha"),
    ({"ngsd_alhpa": 1.0}, "unknown ngsd arguments"),  # misspelled: was decoded at the engine's alpha, silently
    ({"NGSD_ALPHA": 1.0}, "unknown ngsd arguments"),  # other case or a stray space: silently ignored until stop 54
    ({" ngsd_alpha": 1.0}, "unknown ngsd arguments"),
])
def test_bad_extra_args_are_refused_at_admission(guarded_llm, prompt_ids, extra_args, message):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((VLLMValidationError, ValueError, TypeError), match=message):
        guarded_llm.llm_engine.add_request("bad", {"prompt_token_ids": prompt_ids[0]}, greedy(**extra_args))


def test_min_p_on_a_guarded_request_is_refused_at_admission(guarded_llm, prompt_ids):
    """vLLM applies min_p after the processor has forced the token, so on a guarded request it did nothing."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    sampled = dict(max_tokens=2, temperature=0.8)
    with pytest.raises((VLLMValidationError, ValueError), match=r"min_p=0.5 .*use top_k / top_p"):
        guarded_llm.llm_engine.add_request("min-p", {"prompt_token_ids": prompt_ids[0]},
                                           SamplingParams(min_p=0.5, **sampled))
    # min_p 0 (vLLM's default: off) passes, and so does min_p on a request that opted out (plain vLLM decodes it)
    allowed = [SamplingParams(min_p=0.0, **sampled), SamplingParams(min_p=0.5, extra_args={"ngsd_guard": False}, **sampled)]
    outputs = guarded_llm.generate([{"prompt_token_ids": prompt_ids[0]}] * 2, allowed, use_tqdm=False)
    assert [len(_tokens(o)) for o in outputs] == [2, 2]


def test_beam_search_is_refused_and_a_row_left_without_a_token_is_not_forced_to_the_last_id(guarded_llm, prompt_ids):
    """Beam search decoded unguarded (beams ranked by the base's logprobs, before the guard); a guarded row whose own
    masks leave no valid token (allowed ids = [eos], which min_tokens masks) was forced to id -1, the vocabulary's
    last token, every step."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import BeamSearchParams

    with pytest.raises((VLLMValidationError, ValueError), match="beam search is not supported on a guarded engine"):
        guarded_llm.beam_search([{"prompt_token_ids": prompt_ids[0]}], BeamSearchParams(beam_width=1, max_tokens=4))
    eos = guarded_llm.get_tokenizer().eos_token_id
    last = guarded_llm.llm_engine.model_config.get_vocab_size() - 1
    masked = SamplingParams(max_tokens=4, temperature=0.0, allowed_token_ids=[eos], min_tokens=3,
                            extra_args={"ngsd_alpha": 1.0})
    tokens = _tokens(guarded_llm.generate([{"prompt_token_ids": prompt_ids[0]}], masked, use_tqdm=False)[0])
    assert last not in tokens


def test_a_seeded_sampled_request_does_not_depend_on_its_sampled_neighbours(sampling_llm, prompt_ids):
    """Top-p sampling: a request with a seed decodes the same alone and among sampled requests without one,
    which share one op launch a step (``gate_book.sampled_launches``), each at its own temperature and
    top-p (the op's ``row_temperature`` / ``row_top_p``); theirs are full answers as well."""
    from vllm import SamplingParams

    from .conftest import NEW_TOKENS

    def sampled(temperature: float = 0.8, top_p: float = 0.9, **seed):
        return SamplingParams(max_tokens=NEW_TOKENS, temperature=temperature, top_p=top_p, ignore_eos=True,
                              extra_args={"ngsd_alpha": ALPHA}, **seed)  # guarded, whatever the probe would say

    alone = sampling_llm.generate([{"prompt_token_ids": prompt_ids[1]}], sampled(seed=1234), use_tqdm=False)
    params = [sampled(1.3), sampled(seed=1234), sampled(0.4, 0.5), sampled(), sampled(2.0, 0.7)]
    batch = sampling_llm.generate([{"prompt_token_ids": prompt_ids[i]} for i in (0, 1, 2, 1, 3)], params,
                                 use_tqdm=False)
    assert _tokens(batch[1]) == _tokens(alone[0])
    vocab = sampling_llm.llm_engine.model_config.get_vocab_size()
    for output in (batch[0], *batch[2:]):
        tokens = _tokens(output)
        assert len(tokens) == NEW_TOKENS and all(0 <= t < vocab for t in tokens)
    # the same prompt without a seed draws its own noise: not the seeded answer
    assert _tokens(batch[3]) != _tokens(batch[1])
