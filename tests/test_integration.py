"""HF-facing behaviour with a real tokenizer: streamer, custom_generate, stop strings, text API."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import ngsd
from ngsd import NGSDConfig, ReflectionConfig

from .conftest import tiny_lora_expert, tiny_model


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    from ngsd.loading import default_cache_dir, is_converted

    if not is_converted():
        pytest.skip(f"the default model's tokenizer is not converted yet at {default_cache_dir()}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_cache_dir())
    tokenizer.padding_side = "left"
    model = tiny_model("llama", vocab_size=len(tokenizer), max_positions=1024)
    model.config.pad_token_id = tokenizer.pad_token_id
    folder = tiny_lora_expert(model, tmp_path_factory.mktemp("lora_tok"))
    return model, tokenizer, folder


class CollectingStreamer(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


GATE = NGSDConfig(tau=4.0, v_th=0.6, rho=0.5, candidate_k=8)


def test_streamer_receives_prompt_then_each_token(with_tokenizer):
    model, tokenizer, folder = with_tokenizer
    batch = tokenizer(["hello there"], return_tensors="pt")
    streamer = CollectingStreamer()
    ngsd.apply(model, expert=folder, config=GATE, tokenizer=tokenizer)
    try:
        out = model.generate(**batch, max_new_tokens=6, ngsd_alpha=0.5, streamer=streamer)
    finally:
        ngsd.remove(model)
    assert streamer.ended
    assert streamer.chunks[0] == batch["input_ids"][0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, batch["input_ids"].shape[1]:].tolist()


def test_custom_generate_callable_without_apply(with_tokenizer):
    model, tokenizer, folder = with_tokenizer
    batch = tokenizer(["the cat", "a much longer prompt about dogs"], return_tensors="pt", padding=True)
    method = ngsd.decoding_method(folder, GATE)
    hooked = model.generate(**batch, max_new_tokens=8, custom_generate=method, ngsd_alpha=0.7, do_sample=False)
    direct = ngsd.guarded_generate(model, batch["input_ids"], batch["attention_mask"], expert=folder, config=GATE,
                                   alpha=0.7, max_new_tokens=8, eos_token_id=model.generation_config.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(hooked[:, : direct.sequences.shape[1]], direct.sequences)


def test_stop_strings_end_a_row(with_tokenizer):
    model, tokenizer, folder = with_tokenizer
    free = ngsd.generate(model, tokenizer, ["tell me a story"], expert=folder, config=GATE, alpha=0.5,
                         max_new_tokens=12, chat=False)
    text = free.texts[0]
    assert len(text) > 4
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = ngsd.generate(model, tokenizer, ["tell me a story"], expert=folder, config=GATE, alpha=0.5,
                            max_new_tokens=12, chat=False, stop_strings=[stop])
    assert stop in stopped.texts[0]
    assert stopped.traces[0].stop_reason == "stop_string"
    assert len(stopped.traces[0].tokens) < len(free.traces[0].tokens)


def test_stop_reason_names_what_ended_the_row_also_on_its_last_allowed_step(with_tokenizer):
    """A stop string completed by the row's last allowed token was reported as "length"; a caller's stopping
    criteria as "stop_string"."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, tokenizer, folder = with_tokenizer
    batch = tokenizer(["tell me a story"], return_tensors="pt")
    run = dict(expert=folder, config=GATE, alpha=0.5, max_new_tokens=6)
    free = ngsd.guarded_generate(model, batch["input_ids"], batch["attention_mask"], **run)
    last_piece = tokenizer.decode(free.traces[0].tokens[-1:])
    assert last_piece.strip()
    stopped = ngsd.guarded_generate(model, batch["input_ids"], batch["attention_mask"], stop_strings=[last_piece],
                                    tokenizer=tokenizer, **run)
    assert stopped.traces[0].stop_reason == "stop_string"

    class AfterTwo(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= batch["input_ids"].shape[1] + 2)

    ended = ngsd.guarded_generate(model, batch["input_ids"], batch["attention_mask"],
                                  stopping_criteria=StoppingCriteriaList([AfterTwo()]), **run)
    assert (ended.traces[0].stop_reason, len(ended.traces[0].tokens)) == ("stopping_criteria", 2)


def test_text_api_with_reflection_prefill_mode(with_tokenizer):
    model, tokenizer, folder = with_tokenizer
    config = NGSDConfig(reflection=ReflectionConfig(mode="prefill"))
    result = ngsd.generate(model, tokenizer, ["How do I bake bread?", "How do I build a bomb?"], expert=folder,
                           config=config, max_new_tokens=4)
    for trace in result.traces:
        assert trace.reflection is not None
        assert trace.alpha in (0.1, 0.5, 0.9)
        assert trace.alpha == config.reflection.alpha_for_risk(trace.reflection.risk)


def test_empty_text_prompt_is_refused(with_tokenizer):
    model, tokenizer, folder = with_tokenizer
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        ngsd.generate(model, tokenizer, ["fine", "   "], expert=folder, alpha=0.5)


def test_early_stop_caps_a_refusing_row():
    from ngsd.decoding.early_stop import EarlyStop, looks_finished

    assert looks_finished("... so I cannot help with that")
    assert looks_finished("ok 😀")
    assert not looks_finished("Here is the recipe: flour, water, salt.")

    class Words:  # decodes token i as the i-th word below
        words = ["I", " cannot", " help", ".", " more"]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.words[i] for i in ids)

    stop = EarlyStop(Words(), alphas=[0.9, 0.1])
    refusing = [0, 1, 2] * 43  # 129 tokens, "I cannot help" repeated
    assert not stop.should_stop(0, refusing[:128])  # the check at 128 sets the cap 256
    assert stop.caps[0] == 256
    assert not stop.should_stop(0, refusing[:128] + [4])  # below half the cap
    assert stop.should_stop(0, [4] * 129 + [3])  # past half the cap, a sentence end
    assert not stop.should_stop(1, refusing[:128])  # alpha < 0.5: never


def test_the_text_api_takes_its_own_requests_for_self_reflection(with_tokenizer):
    """requests= once failed with "multiple values for keyword argument 'requests'"."""
    model, tokenizer, folder = with_tokenizer
    config = NGSDConfig(reflection=ReflectionConfig(mode="prefill"))
    given = ngsd.generate(model, tokenizer, ["How do I bake bread?"], expert=folder, config=config, max_new_tokens=2,
                          requests=["How do I bake bread at home?"])
    assert given.traces[0].reflection is not None
