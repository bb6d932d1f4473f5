"""Issue 13 acceptance: the public API either answers well-formed or refuses by name.

Hypothesis draws prompts, batch composition, alpha (NaN, inf, negative, strings...), config fields
and sampling settings for `ngsd.generate`, `guarded_generate` and `apply` + `model.generate` on a
tiny random model. Every call must return token ids inside the vocabulary, or raise a
ValueError/TypeError whose message names an argument; nothing else (no IndexError).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ngsd
from ngsd import NGSDConfig, ReflectionConfig, guarded_generate

from .conftest import tiny_lora_expert, tiny_model

VOCAB = 96
# Every argument and config field a refusal may name.
NAMES = (
    "alpha", "prompts", "max_new_tokens", "temperature", "top_k", "top_p", "do_sample", "tau", "v_th", "v_reset",
    "initial_potential", "rho", "candidate_k", "mode", "divergence", "score_floor", "safedecoding", "input_ids",
    "attention_mask", "early_stop", "backend", "seed",
)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(-3, 3),
    st.sampled_from([0.0, 0.5, 1.0, 3.0]),
)
alphas = st.one_of(
    st.none(), numbers, st.booleans(), st.text(max_size=3), st.lists(numbers, min_size=1, max_size=4),
    st.lists(st.text(max_size=2), min_size=1, max_size=2),
)
config_fields = st.fixed_dictionaries(
    {},
    optional={
        "mode": st.sampled_from(["ngsd", "open", "off", "safedecoding", "sometimes"]),
        "tau": numbers,
        "v_th": numbers,
        "v_reset": numbers,
        "initial_potential": st.one_of(st.none(), numbers),
        "rho": numbers,
        "candidate_k": st.one_of(st.integers(-1, 200), st.floats(0, 10), st.booleans()),
        "divergence": st.sampled_from(["tv", "kl", "js", "l2"]),
        "score_floor": numbers,
        "safedecoding_alpha": numbers,
    },
)
sampling = st.fixed_dictionaries(
    {},
    optional={
        "do_sample": st.booleans(),
        "temperature": st.one_of(numbers, st.just(0.7)),
        "top_k": st.one_of(st.integers(-2, 120), st.just(5)),
        "top_p": st.one_of(numbers, st.just(0.9)),
    },
)
max_new = st.one_of(st.integers(0, 4), st.sampled_from([2.7, 2.0, True, "3"]))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    model = tiny_model("llama", vocab_size=VOCAB)
    return model, tiny_lora_expert(model, tmp_path_factory.mktemp("lora_props"))


def _make_config(fields: dict) -> NGSDConfig:
    return NGSDConfig(**fields, reflection=ReflectionConfig(mode="none"))


def _check_refusal(error: Exception) -> None:
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    message = str(error)
    assert any(name in message for name in NAMES), f"the refusal names no argument: {message!r}"


def _check_ids(sequences: torch.Tensor, rows: int) -> None:
    assert sequences.dtype == torch.long and sequences.shape[0] == rows
    assert int(sequences.min()) >= 0 and int(sequences.max()) < VOCAB


def _batch(lengths: list[int], data) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        tokens = data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=length, max_size=length))
        ids[row, width - length :] = torch.tensor(tokens)
        mask[row, width - length :] = 1
    return ids, mask


def _answers_or_refuses(run, check) -> None:
    """`check(result)` when `run()` returns; else the error must be a refusal naming an argument."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the identical-logits warning on degenerate settings
        try:
            out = run()
        except Exception as error:  # noqa: BLE001 - the property is about which errors escape
            _check_refusal(error)
            return
    check(out)


# A call on raw ids: batch composition, alpha, config fields, sampling settings, length.
RAW_CALLS = given(data=st.data(), lengths=st.lists(st.integers(1, 5), min_size=1, max_size=3), alpha=alphas,
                  fields=config_fields, samp=sampling, new=max_new)


@SETTINGS
@RAW_CALLS
def test_guarded_generate_answers_or_refuses_by_name(pair, data, lengths, alpha, fields, samp, new):
    model, folder = pair
    ids, mask = _batch(lengths, data)

    def run():
        return guarded_generate(model, ids, mask, expert=folder, config=_make_config(fields), alpha=alpha,
                                max_new_tokens=new, eos_token_id=2, pad_token_id=0, seed=1, **samp)

    def check(out) -> None:
        _check_ids(out.sequences, len(lengths))
        for trace in out.traces:
            assert all(0 <= t < VOCAB for t in trace.tokens) and 1 <= len(trace.tokens) <= new

    _answers_or_refuses(run, check)


@SETTINGS
@RAW_CALLS
def test_apply_then_generate_answers_or_refuses_by_name(pair, data, lengths, alpha, fields, samp, new):
    model, folder = pair
    ids, mask = _batch(lengths, data)

    def run():
        ngsd.apply(model, expert=folder, config=_make_config(fields))
        try:
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, ngsd_alpha=alpha,
                                  ngsd_seed=1, pad_token_id=0, eos_token_id=2, **samp)
        finally:
            ngsd.remove(model)

    _answers_or_refuses(run, lambda out: _check_ids(out, len(lengths)))
    assert not ngsd.is_applied(model)


prompt_items = st.one_of(st.text(min_size=0, max_size=12), st.integers(), st.binary(max_size=4), st.none())
prompts = st.one_of(prompt_items, st.lists(prompt_items, min_size=0, max_size=3),
                    st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=3))


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    from ngsd.loading import default_cache_dir, is_converted

    if not is_converted():
        pytest.skip(f"the default model's tokenizer is not converted yet at {default_cache_dir()}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_cache_dir())
    model = tiny_model("llama", vocab_size=len(tokenizer), max_positions=1024)
    return model, tokenizer, tiny_lora_expert(model, tmp_path_factory.mktemp("lora_props_text"))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(prompt=prompts, alpha=alphas, fields=config_fields, new=max_new, chat=st.booleans())
def test_text_generate_answers_or_refuses_by_name(text_pair, prompt, alpha, fields, new, chat):
    model, tokenizer, folder = text_pair

    def run():
        return ngsd.generate(model, tokenizer, prompt, expert=folder, config=_make_config(fields), alpha=alpha,
                             max_new_tokens=new, chat=chat, seed=1)

    def check(out) -> None:
        assert len(out.texts) == len(out.prompts) == len(out.traces) >= 1
        assert all(0 <= t < len(tokenizer) for trace in out.traces for t in trace.tokens)

    _answers_or_refuses(run, check)
