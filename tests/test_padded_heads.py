"""A separate expert whose LM head is padded to another row count than the base's, one tokenizer for both
(Qwen2.5: 151936 rows at 0.5B, 152064 at 7B, 151665 tokens): both distributions are taken over the rows
the two heads share, which must cover the tokenizer's vocabulary; the pair then decodes exactly as if the
larger head had been cut to the smaller one beforehand."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import ngsd
from ngsd import NGSDConfig, guarded_generate
from ngsd.experts.resolve import resolve_expert

from .conftest import mixed_length_batch, tiny_model
from .test_loading import tiny_tokenizer

GATE = NGSDConfig(tau=4.0, v_th=0.6, rho=0.5, candidate_k=8)  # fires on tiny random models
SMALL, LARGE = 320, 384  # LM head rows; the tokenizer has 275 tokens


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(pad=True)


def head_cut(model: nn.Module, rows: int) -> nn.Module:
    """A copy of `model` whose LM head keeps only its first `rows` rows: the pair padded alike beforehand."""
    cut = copy.deepcopy(model)
    head = nn.Linear(model.lm_head.in_features, rows, bias=False)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight[:rows])
    cut.lm_head = head
    return cut


def prompts(tokenizer):
    return mixed_length_batch([4, 8, 6], len(tokenizer), seed=3)


def run(base, expert, tokenizer, *, logits_path: bool = False, **kwargs):
    ids, mask, _ = prompts(tokenizer)
    forced = {"logits_processor": lambda seq, scores: scores} if logits_path else {}  # a no-op processor: logits path
    return guarded_generate(base, ids, mask, expert=expert, config=GATE, alpha=0.9, max_new_tokens=10,
                            tokenizer=tokenizer, **forced, **kwargs)


def assert_same_decoding(got, expected) -> None:
    assert torch.equal(got.sequences, expected.sequences)
    for row, (a, b) in enumerate(zip(got.traces, expected.traces)):
        assert (a.tokens, a.spikes, a.divergence, a.potential) == (b.tokens, b.spikes, b.divergence, b.potential), row


@pytest.mark.parametrize("base_rows, expert_rows", [(SMALL, LARGE), (LARGE, SMALL)])
@pytest.mark.parametrize("logits_path", [False, True], ids=["hidden states", "logits"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_a_padded_head_decodes_as_if_cut_to_the_common_rows(tokenizer, base_rows, expert_rows, logits_path, sample):
    base = tiny_model("qwen2", vocab_size=base_rows, seed=0)
    expert = tiny_model("qwen2", vocab_size=expert_rows, seed=5)
    larger = base if base_rows > expert_rows else expert
    ids, mask, _ = prompts(tokenizer)
    with torch.no_grad():
        padding_mass = larger(input_ids=ids, attention_mask=mask).logits[:, -1].softmax(-1)[:, SMALL:].sum(-1)
    assert (padding_mass > 0.05).all(), "the padding rows must weigh, or a softmax over them would go unseen"

    sampling = dict(do_sample=True, temperature=1.2, seed=7) if sample else {}
    padded = run(base, expert, tokenizer, logits_path=logits_path, **sampling)
    if base_rows > expert_rows:
        cut = run(head_cut(base, SMALL), expert, tokenizer, logits_path=logits_path, **sampling)
    else:
        cut = run(base, head_cut(expert, SMALL), tokenizer, logits_path=logits_path, **sampling)
    assert_same_decoding(padded, cut)
    assert padded.traces[0].step_path.startswith("logits" if logits_path else "hidden states")
    assert any(any(t.spikes) for t in padded.traces), "the gate never fired; the test would not see mixing"


def test_apply_and_custom_generate_pair_padded_heads_with_the_tokenizer(tokenizer):
    base = tiny_model("qwen2", vocab_size=SMALL, seed=0)
    expert = tiny_model("qwen2", vocab_size=LARGE, seed=5)
    ids, mask, _ = prompts(tokenizer)
    direct = guarded_generate(base, ids, mask, expert=head_cut(expert, SMALL), config=GATE, alpha=0.9,
                              max_new_tokens=8, eos_token_id=2, pad_token_id=0)
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, ngsd_alpha=0.9)
    hooked = base.generate(**call, custom_generate=ngsd.decoding_method(expert, GATE), ngsd_tokenizer=tokenizer)
    assert torch.equal(hooked[:, : direct.sequences.shape[1]], direct.sequences)
    ngsd.apply(base, expert=expert, config=GATE, tokenizer=tokenizer)
    try:
        applied = base.generate(**call)
    finally:
        ngsd.remove(base)
    assert torch.equal(applied[:, : direct.sequences.shape[1]], direct.sequences)


def test_a_head_smaller_than_the_tokenizer_is_refused(tokenizer):
    base = tiny_model("qwen2", vocab_size=SMALL, seed=0)
    short = tiny_model("qwen2", vocab_size=len(tokenizer) - 5, seed=5)
    message = ("vocabulary mismatch: the base model scores 320 tokens, the expert 270, and the tokenizer has 275: "
               "the expert's head leaves tokens out")
    with pytest.raises(ValueError, match=message):
        run(base, short, tokenizer)
    with pytest.raises(ValueError, match="the base's head leaves tokens out"):
        run(short, base, tokenizer)


def test_without_a_tokenizer_padded_heads_are_refused_in_every_entry_point(tokenizer):
    base = tiny_model("qwen2", vocab_size=SMALL, seed=0)
    expert = tiny_model("qwen2", vocab_size=LARGE, seed=5)
    ids, mask, _ = prompts(tokenizer)
    message = r"the base model scores 320 tokens, the expert 384.*no tokenizer was given: pass the base's tokenizer"
    with pytest.raises(ValueError, match=message):
        guarded_generate(base, ids, mask, expert=expert, alpha=0.9, max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        ngsd.apply(base, expert=expert)
    assert not ngsd.is_applied(base)
    with pytest.raises(ValueError, match=message):
        base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, ngsd_alpha=0.9,
                      custom_generate=ngsd.decoding_method(expert))


def save_checkpoint(model: nn.Module, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_cli_pairs_a_padded_expert_folder_and_checks_its_tokenizer(tokenizer, tmp_path, capsys):
    from ngsd import cli

    base = save_checkpoint(tiny_model("qwen2", vocab_size=SMALL, seed=0), tokenizer, tmp_path / "base")
    expert = tiny_model("qwen2", vocab_size=LARGE, seed=5)
    folder = save_checkpoint(expert, tokenizer, tmp_path / "padded")
    requests = ["hello world", "how are you"]
    argv = ["generate", *requests, "--model", base, "--expert", folder, "--alpha", "0.9", "--max-new-tokens", "6",
            "--json", "--no-progress"]
    assert cli.main(argv) == 0
    traces = [row["trace"] for row in json.loads(capsys.readouterr().out)["results"]]
    model, loaded_tokenizer = ngsd.load_model(base)
    cut = ngsd.generate(model, loaded_tokenizer, requests, expert=head_cut(expert, SMALL), alpha=0.9, max_new_tokens=6)
    assert traces == [trace.to_dict() for trace in cut.traces]

    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])  # one more token: not the base's tokenizer
    foreign = save_checkpoint(expert, other, tmp_path / "foreign")
    with pytest.raises(ValueError, match="tokenizers map tokens to different ids"):
        resolve_expert(foreign, model, tokenizer=loaded_tokenizer)


def test_eval_and_the_probe_check_score_the_common_rows(tokenizer):
    from ngsd.eval.runner import Runner
    from ngsd.risk.divergence_check import first_step_divergence

    base = tiny_model("qwen2", vocab_size=LARGE, seed=0)
    expert = tiny_model("qwen2", vocab_size=SMALL, seed=5)
    assert Runner(base, tokenizer, model_id="tiny", expert=expert, progress=False).vocab_size == SMALL
    texts = ["hello world", "how are you"]
    padded = first_step_divergence(base, tokenizer, texts, expert)
    assert padded == first_step_divergence(head_cut(base, SMALL), tokenizer, texts, expert)


def test_a_loaded_expert_is_checked_against_the_tokenizer_of_its_folder(tokenizer, tmp_path, monkeypatch):
    """An expert passed as a loaded model names the folder it came from; that folder's tokenizer is checked
    as a model folder's is. Before, only its head size was."""
    from transformers import AutoModelForCausalLM

    base = tiny_model("qwen2", vocab_size=SMALL, seed=0)
    expert = tiny_model("qwen2", vocab_size=SMALL, seed=5)
    same = AutoModelForCausalLM.from_pretrained(save_checkpoint(expert, tokenizer, tmp_path / "same"))
    assert resolve_expert(same, base, tokenizer=tokenizer) is same
    assert resolve_expert(same, base, tokenizer=tokenizer) is same  # the second call uses the remembered check

    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])  # one more token: not the base's tokenizer
    foreign = AutoModelForCausalLM.from_pretrained(save_checkpoint(expert, other, tmp_path / "foreign"))
    with pytest.raises(ValueError, match="tokenizers map tokens to different ids"):
        resolve_expert(foreign, base, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizers map tokens to different ids"):
        ngsd.generate(base, tokenizer, ["hello world"], expert=foreign, alpha=0.9, max_new_tokens=2)
    # A model built in memory names no folder: its head size is all there is to compare, wherever the caller runs.
    monkeypatch.chdir(tmp_path / "foreign")
    assert resolve_expert(expert, base, tokenizer=tokenizer) is expert
