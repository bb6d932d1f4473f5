"""Shared-trunk experts: an adapter on the top layers runs the layers below it once, with AdapterPair's results."""

from __future__ import annotations

import copy

import pytest
import torch

from ngsd import NGSDConfig, ReflectionConfig, guarded_generate
from ngsd.decoding import loop
from ngsd.decoding.pair import AdapterPair
from ngsd.decoding.shared_trunk import SharedTrunkPair, lowest_adapted_layer
from ngsd.experts.lora import LoraAdapter
from tests.conftest import mixed_length_batch, tiny_lora_expert, tiny_model
from tests.test_routing import _probe_splitting

FAMILIES = ["llama", "qwen2", "gemma"]
LAYERS = 4
SPLIT = 2


def top_layers_expert(model, folder, top: int, seed: int = 1, strength: float = 0.5) -> LoraAdapter:
    """A real peft LoRA on the top `top` decoder layers only (peft's layers_to_transform), random weights."""
    layers = model.config.num_hidden_layers
    tiny_lora_expert(model, folder, seed=seed, strength=strength, layers=list(range(layers - top, layers)))
    return LoraAdapter.load(folder)


def _full_depth(monkeypatch):
    """Make the loop pick AdapterPair (the full-depth reference) for the same adapter."""
    monkeypatch.setattr(loop, "shared_trunk_unsupported", lambda model, adapter: "reference run")


def _assert_same_runs(shared, full):
    assert torch.equal(shared.sequences, full.sequences)
    for a, b in zip(shared.traces, full.traces):
        assert a.guarded == b.guarded and a.spikes == b.spikes and a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(a.divergence), torch.tensor(b.divergence), rtol=1e-4, atol=1e-5)


def test_lowest_adapted_layer_reads_the_module_names(tmp_path):
    model = tiny_model("llama", layers=LAYERS)
    assert lowest_adapted_layer(top_layers_expert(model, tmp_path / "top", top=2)) == 2
    assert lowest_adapted_layer(LoraAdapter.load(tiny_lora_expert(model, tmp_path / "all"))) == 0
    outside = LoraAdapter(pairs={"lm_head": None, "model.layers.3.mlp.up_proj": None}, scale=1.0)
    assert lowest_adapted_layer(outside) is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("logits", [False, True], ids=["hidden", "logits"])
def test_shared_trunk_equals_the_full_depth_expert(family, logits, tmp_path, monkeypatch):
    model = tiny_model(family, layers=LAYERS)
    adapter = top_layers_expert(model, tmp_path / "lora", top=LAYERS - SPLIT)
    ids, mask, _ = mixed_length_batch([6, 4, 7], model.config.vocab_size, seed=3)
    kwargs = dict(expert=adapter, config=NGSDConfig(tau=2.0, v_th=0.3), alpha=0.9, max_new_tokens=10)
    if logits:  # a processor that changes nothing forces the logits path
        kwargs["logits_processor"] = lambda seq, scores: scores
    shared = guarded_generate(model, ids, mask, **kwargs)
    assert shared.traces[0].step_path.endswith(f"shared trunk below layer {SPLIT}")
    assert shared.traces[0].step_path.startswith("logits" if logits else "hidden states")
    _full_depth(monkeypatch)
    full = guarded_generate(model, ids, mask, **kwargs)
    assert "shared trunk" not in full.traces[0].step_path
    _assert_same_runs(shared, full)
    assert any(any(t.spikes) for t in shared.traces), "the gate must fire for this comparison to mean something"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_trunk_with_risk_routing_equals_the_full_depth_expert(family, tmp_path, monkeypatch):
    model = tiny_model(family, layers=LAYERS)
    adapter = top_layers_expert(model, tmp_path / "lora", top=LAYERS - SPLIT)
    ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=2)
    _, threshold = _probe_splitting(model, ids, mask, tmp_path / "probe")
    reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=threshold)
    kwargs = dict(expert=adapter, config=NGSDConfig(tau=2.0, v_th=0.3, reflection=reflection), max_new_tokens=10)
    shared = guarded_generate(model, ids, mask, **kwargs)
    _full_depth(monkeypatch)
    full = guarded_generate(model, ids, mask, **kwargs)
    assert sum(t.guarded for t in shared.traces) == 2
    _assert_same_runs(shared, full)
    assert any(any(t.spikes) for t in shared.traces if t.guarded)


def test_shared_trunk_drops_the_rows_the_divergence_check_routes_like_the_full_depth_expert(tmp_path, monkeypatch):
    model = tiny_model("llama", layers=LAYERS)
    adapter = top_layers_expert(model, tmp_path / "lora", top=LAYERS - SPLIT)
    ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=2)
    _probe_splitting(model, ids, mask, tmp_path / "probe")

    def run(check_divergence):
        reflection = ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"), route_below=10.0, check_above=0.0,
                                      check_divergence=check_divergence)
        return guarded_generate(model, ids, mask, expert=adapter, max_new_tokens=10,
                                config=NGSDConfig(tau=2.0, v_th=0.3, reflection=reflection))

    divergences = [t.reflection.divergence for t in run(0.0).traces]
    threshold = sorted(divergences)[2]
    shared = run(threshold)
    assert shared.traces[0].step_path.endswith(f"shared trunk below layer {SPLIT}")
    assert [t.guarded for t in shared.traces] == [d >= threshold for d in divergences]
    _full_depth(monkeypatch)
    _assert_same_runs(shared, run(threshold))


def _rows_per_layer(model, run) -> list[list[int]]:
    seen: list[list[int]] = [[] for _ in model.model.layers]
    handles = [layer.register_forward_pre_hook(lambda m, args, kwargs, i=i: seen[i].append(args[0].shape[0]),
                                               with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_lower_layers_see_the_base_rows_and_upper_layers_the_expert_copies_too(tmp_path):
    model = tiny_model("llama", layers=LAYERS)
    adapter = top_layers_expert(model, tmp_path / "lora", top=LAYERS - SPLIT)
    ids, mask, _ = mixed_length_batch([6, 4, 7, 5], model.config.vocab_size, seed=2)
    every_row = _rows_per_layer(model, lambda: guarded_generate(model, ids, mask, expert=adapter, alpha=0.5,
                                                                max_new_tokens=5))
    assert every_row[:SPLIT] == [[4] * 5] * SPLIT and every_row[SPLIT:] == [[8] * 5] * (LAYERS - SPLIT)

    _, threshold = _probe_splitting(model, ids, mask, tmp_path / "probe")
    config = NGSDConfig(reflection=ReflectionConfig(mode="probe", probe=str(tmp_path / "probe"),
                                                    route_below=threshold))
    routed = _rows_per_layer(model, lambda: guarded_generate(model, ids, mask, expert=adapter, config=config,
                                                             max_new_tokens=5))
    # prefill of the 4 base rows; the 2 guarded rows' expert prefill touches the upper layers only; then 4 / 4 + 2
    assert routed[:SPLIT] == [[4] * 5] * SPLIT
    assert routed[SPLIT:] == [[4, 2] + [6] * 4] * (LAYERS - SPLIT)


def test_an_unsupported_family_is_refused_and_the_loop_keeps_the_full_depth_pair(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=4, n_head=4)).eval()
    adapter = LoraAdapter(pairs={"model.layers.3.mlp.up_proj": None}, scale=1.0)
    with pytest.raises(ValueError, match="'gpt2'.*supported: gemma, llama, qwen2"):
        SharedTrunkPair(gpt2, adapter)

    model = tiny_model("llama", layers=LAYERS)
    every_layer = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "all"))
    with pytest.raises(ValueError, match="layer 0"):
        SharedTrunkPair(model, every_layer)
    pair, _ = loop.pair_for(model, every_layer, "ngsd")
    try:
        assert isinstance(pair, AdapterPair)
    finally:
        pair.close()


def test_train_expert_top_layers_adapts_only_the_top_decoder_layers(tmp_path):
    import argparse

    from ngsd.experts.training import cli, config, trainer

    parser = argparse.ArgumentParser()
    cli.register_cli(parser.add_subparsers(dest="command"))
    cfg = cli.config_from_args(parser.parse_args(["train-expert", "--top-layers", "2", "--rank", "4"]))
    assert cfg.top_layers == 2
    assert cli.config_from_args(parser.parse_args(["train-expert", *cli.cli_args(cfg)])) == cfg

    model = tiny_model("llama", layers=LAYERS)
    peft_model = trainer.make_lora_model(copy.deepcopy(model), cfg)
    peft_model.save_pretrained(str(tmp_path / "top"))
    assert lowest_adapted_layer(LoraAdapter.load(tmp_path / "top")) == LAYERS - 2
    with pytest.raises(ValueError, match="exceeds the model's 4 decoder layers"):
        trainer.make_lora_model(copy.deepcopy(model), config.TrainExpertConfig(top_layers=5))
    with pytest.raises(ValueError, match="top_layers must be >= 1"):
        config.TrainExpertConfig(top_layers=0)
