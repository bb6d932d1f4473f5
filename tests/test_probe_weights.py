"""The risk probe's weight fingerprint: a probe is told apart from a model of its shape with other weights.

`RiskProbe.matches` compares the architecture only, so a probe trained on one model ran silently on
another of the same shape (a base model and its instruct version, a fine-tune): its risks meant
nothing there, and harmful requests could be routed unguarded. `ngsd train-probe` now records a
fingerprint of the weights (probe.json, model["weights"]); running on other weights warns
(`ProbeTrainedOnOtherWeights`), naming both models and the fix. Probes without it (trained before)
keep working as they did.
"""

from __future__ import annotations

import copy
import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from ngsd.config import NGSDConfig, ReflectionConfig
from ngsd.risk.probe import (
    WEIGHTS_KEY,
    ProbeSpec,
    ProbeTrainedOnOtherWeights,
    RiskProbe,
    compare_weights,
    folder_weight_samples,
    model_fingerprint,
    shipped_probe_path,
    weight_fingerprint,
)

from .conftest import mixed_length_batch, tiny_model


def _probe_for(model, folder, *, record_weights: bool = True, name: str = "tiny-llama-A"):
    """A random probe (everything routed) 'trained' on `model`: its config fingerprint, and its weights' unless
    `record_weights` is False (a probe written before weight fingerprints were recorded)."""
    hidden = model.config.hidden_size
    info = {**model_fingerprint(model), "name": name}
    if record_weights:
        info[WEIGHTS_KEY] = weight_fingerprint(model)
    spec = ProbeSpec(layer=1, pooling=("mean",), model=info, route_below=10.0)
    torch.manual_seed(0)
    return RiskProbe(spec, torch.zeros(hidden), torch.ones(hidden), torch.randn(hidden) * 0.05,
                     torch.tensor(0.0)).save(folder)


def _lightly_fine_tuned(model, how: str):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if how == "noise":  # every weight * (1 + 1e-3 noise)
            for param in other.parameters():
                param.mul_(1 + 1e-3 * torch.randn(param.shape, generator=g))
        else:  # a rank-2 LoRA merged into one layer's q_proj, 1e-3 of its norm
            weight = other.model.layers[1].self_attn.q_proj.weight
            delta = torch.randn(weight.shape[0], 2, generator=g) @ torch.randn(2, weight.shape[1], generator=g)
            weight.add_(delta * (1e-3 * weight.norm() / delta.norm()))
    return other


def _guarded(model, folder):
    from ngsd.decoding.loop import guarded_generate

    ids, mask, _ = mixed_length_batch([3, 5], model.config.vocab_size)
    config = NGSDConfig(reflection=ReflectionConfig(mode="probe", probe=str(folder)))
    return guarded_generate(model, ids, mask, expert=model, config=config, max_new_tokens=2)


def _caught(call) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if issubclass(w.category, ProbeTrainedOnOtherWeights)]


def test_a_probe_on_a_same_shape_model_with_other_weights_warns_naming_both_and_the_fix(tmp_path):
    trained_on = tiny_model("llama", seed=0)
    folder = _probe_for(trained_on, tmp_path / "probe")
    for other in (tiny_model("llama", seed=1), _lightly_fine_tuned(trained_on, "noise"),
                  _lightly_fine_tuned(trained_on, "lora")):
        other.config._name_or_path = "my/fine-tune"
        probe = RiskProbe.load(folder)
        assert probe.matches(other)  # the architecture is the same: that check alone let it through
        assert probe.same_weights(other) is False
        caught = _caught(lambda: _guarded(other, folder))
        assert len(caught) == 1, [str(w.message) for w in caught]
        message = str(caught[0].message)
        for words in ("tiny-llama-A", "my/fine-tune", "other weights", "ngsd train-probe", str(folder),
                      "ProbeTrainedOnOtherWeights"):
            assert words in message, (words, message)
    # the model it was trained on: no warning
    assert RiskProbe.load(folder).same_weights(trained_on) is True
    assert not _caught(lambda: _guarded(trained_on, folder))


def test_the_fingerprint_holds_across_dtypes_and_the_saved_safetensors(tmp_path):
    model = tiny_model("llama", seed=0)
    recorded = weight_fingerprint(model)
    assert recorded["dtype"] == "float32" and recorded["matrices"] > 0
    for dtype in (torch.bfloat16, torch.float16):
        cast = copy.deepcopy(model).to(dtype)
        assert compare_weights(recorded, cast) is True
        assert compare_weights(weight_fingerprint(cast), model) is True  # recorded in half precision, run in float32
        assert compare_weights(recorded, _lightly_fine_tuned(model, "noise").to(dtype)) is False
    # bfloat16 against float16 rounds twice: it cannot tell, so it says nothing
    assert compare_weights(weight_fingerprint(copy.deepcopy(model).half()), copy.deepcopy(model).bfloat16()) is None
    model.save_pretrained(tmp_path / "saved")
    assert compare_weights(recorded, folder_weight_samples(tmp_path / "saved")) is True
    copy.deepcopy(model).bfloat16().save_pretrained(tmp_path / "saved_bf16")
    assert compare_weights(recorded, folder_weight_samples(tmp_path / "saved_bf16")) is True
    _lightly_fine_tuned(model, "lora").save_pretrained(tmp_path / "tuned")
    assert compare_weights(recorded, folder_weight_samples(tmp_path / "tuned")) is False
    # a weight changed in place after a first comparison is seen (the samples are cached per model)
    assert compare_weights(recorded, model) is True
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    assert compare_weights(recorded, model) is False


def test_a_probe_without_a_weight_fingerprint_keeps_working_silently(tmp_path):
    """Probe files written before the fingerprint (the shipped one was, and users' are) run as before."""
    trained_on = tiny_model("llama", seed=0)
    folder = _probe_for(trained_on, tmp_path / "old", record_weights=False)
    assert WEIGHTS_KEY not in json.loads((folder / "probe.json").read_text())["model"]
    other = tiny_model("llama", seed=1)
    assert RiskProbe.load(folder).same_weights(other) is None
    assert not _caught(lambda: _guarded(other, folder))
    # another architecture is still refused
    with pytest.raises(ValueError, match="trained on another model"):
        _guarded(tiny_model("qwen2"), folder)


def test_fit_probe_check_warns_on_other_weights(tmp_path):
    from ngsd.risk.divergence_check import fit_probe_check

    folder = _probe_for(tiny_model("llama", seed=0), tmp_path / "probe")
    sentinel = RuntimeError("stop after the model checks")

    def stop(*args, **kwargs):
        raise sentinel

    import ngsd.risk.probe_training as probe_training

    original = probe_training.training_split_of
    probe_training.training_split_of = stop
    try:
        caught = []

        def run():
            with pytest.raises(RuntimeError, match="stop after"):
                fit_probe_check(folder, model=tiny_model("llama", seed=1), tokenizer=None, expert=None, expert_name="x")

        caught = _caught(run)
    finally:
        probe_training.training_split_of = original
    assert len(caught) == 1 and str(folder) in str(caught[0].message)


def test_train_probe_records_the_weight_fingerprint(tmp_path, monkeypatch):
    import ngsd.risk.probe_training as probe_training
    from ngsd.risk.probe_training import TrainProbeConfig, train_probe

    model = tiny_model("llama", seed=0)
    examples = [SimpleNamespace(text=f"request {i}", label=i % 2, wrapper="", source="x", group=i) for i in range(4)]
    recorded = {}

    def capture(candidates, y, train, val, cfg, model_info, *args, **kwargs):
        recorded.update(model_info)
        raise RuntimeError("stop before the fit")

    monkeypatch.setattr(probe_training, "training_split", lambda *a, **k: (examples, [0, 1], [2, 3]))
    monkeypatch.setattr(probe_training, "extract_features", lambda *a, **k: {})
    monkeypatch.setattr(probe_training, "pooled_candidates", lambda *a, **k: [])
    monkeypatch.setattr(probe_training, "token_max_candidates", lambda *a, **k: [])
    monkeypatch.setattr(probe_training, "select_and_fit", capture)
    with pytest.raises(RuntimeError, match="stop before the fit"):
        train_probe(TrainProbeConfig(layers=(1,), data_dir=str(tmp_path)), model=model, tokenizer=object(),
                    log=lambda s: None)
    assert recorded[WEIGHTS_KEY] == weight_fingerprint(model)
    assert recorded["hidden_size"] == model.config.hidden_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_shipped_probe_records_the_default_models_weights(dtype):
    """The shipped probe's fingerprint is the default model's (the converted GGUF), in float32 and bfloat16."""
    from ngsd.loading import default_cache_dir, is_converted

    path = shipped_probe_path()
    if path is None or not is_converted():
        pytest.skip(f"needs the shipped probe and the converted default model at {default_cache_dir()}")
    probe = RiskProbe.load(path)
    assert probe.spec.model[WEIGHTS_KEY]["dtype"] == "float32"
    samples = folder_weight_samples(default_cache_dir())  # read without loading the model
    assert compare_weights(probe.spec.model[WEIGHTS_KEY], samples) is True
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_cache_dir(), dtype=dtype)
    assert probe.matches(model) and probe.same_weights(model) is True
    from ngsd.risk.estimate import load_probe

    assert not _caught(lambda: load_probe(model, ReflectionConfig(mode="auto")))
    with torch.no_grad():  # the same model fine-tuned in memory keeps its name: the shipped probe warns
        model.model.layers[5].self_attn.v_proj.weight.mul_(1.01)
    caught = _caught(lambda: load_probe(model, ReflectionConfig(mode="auto")))
    assert len(caught) == 1 and "SmolLM2-135M-Instruct" in str(caught[0].message)
