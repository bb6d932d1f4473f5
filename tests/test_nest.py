"""NeST (ngsd/nest): neuron selection, clustering, the cluster update on the fly vs folded, saving and
re-applying it, and clear errors. Tiny random-weight Llama models built from a config; fast."""

from __future__ import annotations

import copy

import pytest
import torch

from ngsd.nest.architecture import ffn_layers, model_shape
from ngsd.nest.clustering import cluster_by_silhouette, cluster_within_groups, kmeans, silhouette
from ngsd.nest.config import NestConfig
from ngsd.nest.selection import (
    max_pooled_activations_of_ids, neuron_z_scores, select_neurons,
)
from ngsd.nest.update import DELTA_FILE, NestUpdate, apply_delta

from .conftest import tiny_model

TRIGGER = 50
PLANTED = {(0, 5), (0, 17), (1, 40), (1, 9)}


def planted_model():
    """A tiny Llama in which only the PLANTED neurons see the TRIGGER token: its embedding is a large
    vector along one direction v, the planted gate/up rows point along v, v is projected out of every other
    gate/up row, and no attention or MLP output writes along v (so only the embedding carries it)."""
    model = tiny_model("llama", seed=3)
    hidden = model.config.hidden_size
    v = torch.nn.functional.normalize(torch.randn(hidden, generator=torch.Generator().manual_seed(0)), dim=0)
    project_out = torch.eye(hidden) - torch.outer(v, v)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(emb @ project_out)
        emb[TRIGGER] = 4.0 * v
        for layer, block in enumerate(model.model.layers):
            for writer in (block.self_attn.o_proj, block.mlp.down_proj):
                writer.weight.copy_(project_out @ writer.weight)
            for proj in (block.mlp.gate_proj, block.mlp.up_proj):
                proj.weight.copy_(proj.weight @ project_out)
                for (l, j) in PLANTED:
                    if l == layer:
                        proj.weight[j] = 3.0 * v
    return model


def random_prompts(n: int, with_trigger: bool, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(3, 90, (length,), generator=g)
        ids[ids == TRIGGER] = TRIGGER + 1
        if with_trigger:
            ids[int(torch.randint(length, (1,), generator=g))] = TRIGGER
        prompts.append(ids.tolist())
    return prompts


def test_selection_finds_planted_separating_neurons():
    model = planted_model()
    harmful = max_pooled_activations_of_ids(model, random_prompts(40, True, 1))
    benign = max_pooled_activations_of_ids(model, random_prompts(40, False, 2))
    assert harmful.shape == (40, 2, 64)
    z = neuron_z_scores(harmful, benign)
    selection = select_neurons(z, threshold=3.0)
    found = set(zip(selection.layer.tolist(), selection.neuron.tolist()))
    assert found == PLANTED
    top = select_neurons(z, threshold=3.0, max_neurons=2)
    assert len(top) == 2 and set(zip(top.layer.tolist(), top.neuron.tolist())) <= PLANTED


def test_padding_does_not_change_pooled_activations():
    model = planted_model()
    prompts = random_prompts(5, True, 4)
    together = max_pooled_activations_of_ids(model, prompts, batch_size=5)
    alone = torch.cat([max_pooled_activations_of_ids(model, [p]) for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0] * 8, [6.0] * 8, [0.0] * 4 + [6.0] * 4])
    truth = torch.arange(3).repeat_interleave(20)
    return centers[truth] + 0.5 * torch.randn(60, 8, generator=g), truth


def test_clustering_picks_planted_k_by_silhouette_and_is_deterministic():
    x, truth = blobs()
    first = cluster_by_silhouette(x, k_min=2, k_max=6, seed=7)
    again = cluster_by_silhouette(x, k_min=2, k_max=6, seed=7)
    assert first.k == 3 and max(first.silhouettes, key=first.silhouettes.get) == 3
    assert torch.equal(first.labels, again.labels) and torch.equal(first.centers, again.centers)
    # the clusters are the blobs, up to renaming
    pairs = set(zip(truth.tolist(), first.labels.tolist()))
    assert len(pairs) == 3


def test_a_layer_with_no_more_neurons_than_k_min_is_one_cluster():
    """A layer of 4 distinct neurons with --k-min 6 failed the run with "the profiles are identical": no k in
    [k_min, n - 1] was tried. It is one cluster now; a whole set too small for k_min says so by name."""
    x, _ = blobs()
    small = torch.tensor([[0.0] * 8, [17.0] * 8, [0.0] * 4 + [17.0] * 4, [9.0] * 8])
    points = torch.cat([x, small])
    groups = torch.tensor([0] * len(x) + [1] * len(small))
    labels, by_group = cluster_within_groups(points, groups, k_min=4, k_max=6, seed=7)
    assert by_group[1] is None and len(labels[len(x):].unique()) == 1
    assert by_group[0] is not None and by_group[0].k >= 4
    with pytest.raises(ValueError, match="k_min = 6 clusters need at least 7 points"):
        cluster_by_silhouette(small, k_min=6, k_max=8)


def test_silhouette_matches_a_hand_computed_case():
    x = torch.tensor([[0.0], [1.0], [10.0], [12.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # a(0)=1, b(0)=11 -> 10/11; a(1)=1, b(1)=10 -> 0.9; a(2)=2, b(2)=9.5 -> 7.5/9.5; a(3)=2, b(3)=11.5 -> 9.5/11.5
    expected = (10 / 11 + 0.9 + 7.5 / 9.5 + 9.5 / 11.5) / 4
    assert silhouette(x, labels) == pytest.approx(expected)


def test_clustering_within_layers_numbers_clusters_across_layers():
    x, _ = blobs(1)
    groups = torch.tensor([0] * 30 + [1] * 27 + [2] * 3)
    labels, by_group = cluster_within_groups(x, groups, k_max=4, seed=0)
    assert by_group[2] is None and len(set(labels[57:].tolist())) == 1
    for g in (0, 1):
        assert set(labels[groups == g].tolist()).isdisjoint(labels[groups != g].tolist())


def random_update(model, seed: int = 0, strength: float = 0.3, layer=(0, 0, 0, 1, 1), neuron=(3, 7, 60, 7, 30),
                  cluster=(4, 1, 4, 9, 1)) -> NestUpdate:
    g = torch.Generator().manual_seed(seed)
    update = NestUpdate(torch.tensor(layer), torch.tensor(neuron), torch.tensor(cluster), model_shape(model))
    with torch.no_grad():
        for p in update.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * strength)
    return update


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_folded_model_equals_update_on_the_fly_and_only_touches_selected_neurons():
    model = tiny_model("llama")
    update = random_update(model)
    assert update.num_clusters == 3 and update.num_trainable() == 3 * 3 * 32
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    before = logits(model, ids)
    with update.attached(model):
        on_the_fly = logits(model, ids)
        update.enabled = False
        paused = logits(model, ids)
        update.enabled = True
    assert torch.equal(paused, before) and torch.equal(logits(model, ids), before)  # hooks gone
    assert not torch.allclose(on_the_fly, before, atol=1e-3)
    folded = update.fold_into(copy.deepcopy(model))
    torch.testing.assert_close(logits(folded, ids), on_the_fly, atol=1e-5, rtol=1e-5)
    changed = {name for (name, a), (_, b) in zip(model.named_parameters(), folded.named_parameters()) if not torch.equal(a, b)}
    assert changed == {f"model.layers.{l}.mlp.{p}.weight" for l in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")}
    gate = folded.model.layers[0].mlp.gate_proj.weight - model.model.layers[0].mlp.gate_proj.weight
    assert set(gate.abs().sum(1).nonzero().flatten().tolist()) == {3, 7, 60}
    torch.testing.assert_close(gate[3], update.gate[update.cluster[0]].detach())
    down = folded.model.layers[1].mlp.down_proj.weight - model.model.layers[1].mlp.down_proj.weight
    assert set(down.abs().sum(0).nonzero().flatten().tolist()) == {7, 30}


def test_saved_checkpoint_reloads_and_delta_reapplies(tmp_path):
    from transformers import AutoModelForCausalLM

    from ngsd.nest.training import save_folded

    model = tiny_model("llama")
    update = random_update(model, seed=2)
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(3))
    with update.attached(model):
        expected = logits(model, ids)
    save_folded(model, None, update, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "ckpt" / DELTA_FILE).is_file()
    update.save(tmp_path / "delta")
    loaded = NestUpdate.load(tmp_path / "delta")
    assert torch.equal(loaded.cluster, update.cluster) and torch.equal(loaded.down, update.down.detach())
    reapplied = apply_delta(copy.deepcopy(model), tmp_path / "delta")
    for a, b in zip(reapplied.parameters(), reloaded.parameters()):
        assert torch.equal(a, b)
    assert (tmp_path / "delta" / DELTA_FILE).stat().st_size < 10_000


def test_a_delta_folder_is_an_expert(tmp_path):
    from ngsd.experts.resolve import resolve_expert

    from ngsd.experts.lora import LoraAdapter

    model = tiny_model("llama")
    random_update(model, seed=4).save(tmp_path)
    expert = resolve_expert(str(tmp_path), model)
    assert isinstance(expert, LoraAdapter) and resolve_expert(str(tmp_path), model) is expert  # converted once
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(5))
    expected = apply_delta(copy.deepcopy(model), tmp_path)
    expert.attach(model)
    try:
        with torch.no_grad(), expert.rows_from(0):
            torch.testing.assert_close(model(input_ids=ids).logits, logits(expected, ids), atol=1e-5, rtol=1e-5)
    finally:
        expert.detach(model)
    with pytest.raises(ValueError, match="another model"):  # 3 layers, the delta's model had 2
        resolve_expert(str(tmp_path), tiny_model("llama", layers=3))


def test_training_moves_only_the_cluster_vectors():
    model = tiny_model("llama")
    update = random_update(model, strength=0.0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(update.parameters(), lr=0.05)
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(6))
    losses = []
    with update.attached(model):
        for _ in range(20):
            out = model(input_ids=ids, labels=ids)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())
    assert all(float(p.detach().abs().sum()) > 0 for p in update.parameters())


def test_bad_inputs_give_clear_errors(tmp_path):
    model = tiny_model("llama")
    shape = model_shape(model)
    with pytest.raises(ValueError, match="model_type"):
        ffn_layers(tiny_model("gemma"))
    with pytest.raises(ValueError, match="neuron indices"):
        NestUpdate(torch.tensor([0]), torch.tensor([64]), torch.tensor([0]), shape)
    with pytest.raises(ValueError, match="layer indices"):
        NestUpdate(torch.tensor([2]), torch.tensor([0]), torch.tensor([0]), shape)
    with pytest.raises(ValueError, match="listed twice"):
        NestUpdate(torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0, 1]), shape)
    with pytest.raises(ValueError, match="equally long"):
        NestUpdate(torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([0]), shape)
    other = NestUpdate(torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), {**shape, "intermediate_size": 128})
    with pytest.raises(ValueError, match="another model"):
        other.fold_into(model)
    with pytest.raises(FileNotFoundError, match="train-nest"):
        NestUpdate.load(tmp_path)
    with pytest.raises(ValueError, match="lower the threshold"):
        select_neurons(torch.zeros(2, 8), threshold=1.0)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match="same layers"):
        neuron_z_scores(torch.zeros(4, 2, 8), torch.zeros(4, 3, 8))
    with pytest.raises(ValueError, match="k_min"):
        NestConfig(k_min=1)
    with pytest.raises(ValueError, match="cluster_scope"):
        NestConfig(cluster_scope="all")
    with pytest.raises(ValueError, match="lr .*finite"):
        NestConfig(lr=float("inf"))
    with pytest.raises(ValueError, match="z_threshold .*finite"):
        NestConfig(z_threshold=float("nan"))
    with pytest.raises(ValueError, match="top_layers must be >= 1"):
        NestConfig(top_layers=0)
    from ngsd.nest.training import first_selectable_layer

    assert first_selectable_layer(NestConfig(top_layers=4), 30) == 26 and first_selectable_layer(NestConfig(), 30) == 0
    with pytest.raises(ValueError, match="between 1 and 2"):
        first_selectable_layer(NestConfig(top_layers=3), 2)
    with pytest.raises(ValueError, match="from_layer"):
        select_neurons(torch.ones(2, 8), threshold=1.0, from_layer=2)
    with pytest.raises(ValueError, match="in layers 1.. has a z-score"):
        select_neurons(torch.tensor([[5.0] * 8, [0.0] * 8]), threshold=1.0, from_layer=1)


def test_cli_rejects_bad_arguments_before_loading(capsys):
    from ngsd.cli import main

    assert main(["train-nest", "--k-min", "1"]) == 2
    assert "k_min" in capsys.readouterr().err
    assert main(["train-nest", "--model", "/no/such/folder"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["train-nest", "--top-layers", "0"]) == 2
    assert "top_layers" in capsys.readouterr().err
    assert main(["train-nest", "--top-layers", "4"]) == 2  # never overwrites the shipped (full-depth) delta
    assert "--delta-out" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--threads", "-1"], ["--threads", ">= 1"]),  # was a raw RuntimeError traceback from torch
    (["--threads", "0"], ["--threads", ">= 1"]),  # was silently ignored
    (["--lr", "inf"], ["--lr", "finite"]),  # was accepted and trained with
    (["--z-threshold", "nan"], ["--z-threshold", "finite"]),  # was accepted: no neuron can reach nan
    (["--examples", "/nope.jsonl"], ["--examples", "/nope.jsonl", "not a file"]),  # was found after the probe step
    (["--out", "FILE"], ["--out", "is a file"]),  # failed when saving, after the training
])
def test_cli_rejects_bad_numbers_and_paths_before_loading(argv, words, tmp_path, capsys):
    from ngsd.cli import main

    (tmp_path / "FILE").write_text("not a folder")
    argv = [str(tmp_path / a) if a == "FILE" else a for a in argv]
    # --delta-out in tmp and a missing data folder: a check that does not fire never trains nor overwrites
    assert main(["train-nest", *argv, "--delta-out", str(tmp_path / "d"), "--data-dir", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ngsd train-nest: error: "), err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize("out, words", [
    ("", ["--out is empty"]),  # was: the adapter written into the current folder
    ("FILE", ["--out", "is a file"]),  # was: '[Errno 17] File exists'
])
def test_nest_to_lora_refuses_an_empty_or_file_out(out, words, tmp_path, monkeypatch, capsys):
    from ngsd.cli import main

    (tmp_path / "FILE").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    assert main(["nest-to-lora", "nest", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ngsd nest-to-lora: error: "), err
    for word in words:
        assert word in err, (word, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_selection_from_a_layer_keeps_only_that_layer_and_above():
    z = torch.tensor([[4.0, 0.0, 3.5], [0.0, 3.2, 0.0], [3.1, 0.0, 5.0]])
    everywhere = select_neurons(z, threshold=3.0)
    top = select_neurons(z, threshold=3.0, from_layer=1)
    assert list(zip(everywhere.layer.tolist(), everywhere.neuron.tolist())) == [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2)]
    assert list(zip(top.layer.tolist(), top.neuron.tolist())) == [(1, 1), (2, 0), (2, 2)]
    assert select_neurons(z, threshold=3.0, max_neurons=2, from_layer=1).neuron.tolist() == [1, 2]


def test_eval_and_cli_accept_a_delta_folder_as_expert(tmp_path):
    from ngsd.cli import UsageError, check_expert
    from ngsd.eval.pipeline import locate_expert

    model = tiny_model("llama")
    random_update(model).save(tmp_path / "delta")
    check_expert(str(tmp_path / "delta"))  # no error
    source, fingerprint = locate_expert(str(tmp_path / "delta"))
    assert source == str(tmp_path / "delta") and fingerprint.startswith("delta:")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="nest_delta.safetensors"):
        check_expert(str(tmp_path / "empty"))


@pytest.mark.parametrize("top_layers, scope, max_neurons", [(None, "layer", None), (1, "layer", None),
                                                          (None, "global", 2)])
def test_train_nest_end_to_end_on_a_tiny_model(top_layers, scope, max_neurons, tmp_path):
    """The whole run (selection on the training prompts, clustering, a few training steps on the expert
    recipe's examples, delta + folded checkpoint) on a tiny Llama that shares the default tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ngsd.data import data_available
    from ngsd.loading import default_cache_dir, is_converted, prepare_tokenizer
    from ngsd.nest.training import train_nest

    if not data_available(None, "advbench_harmful_behaviors.json", "alpaca_eval_805.json", "seed_reject.json"):
        pytest.skip("the shared data folder is absent")
    if not is_converted():
        pytest.skip("the default model has not been converted yet (its tokenizer is needed)")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(default_cache_dir()))
    model = tiny_model("llama", vocab_size=len(tokenizer), max_positions=512, init=0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    cfg = NestConfig(probe_prompts=12, z_threshold=2.0, k_max=3, max_examples=6, delta_out=str(tmp_path / "delta"),
                     out=str(tmp_path / "ckpt"), max_length=96, top_layers=top_layers, cluster_scope=scope,
                     max_neurons=max_neurons)
    result = train_nest(cfg, model=model, tokenizer=tokenizer, log=lambda _: None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the caller's model is untouched
    # ... and comes back trainable, in train mode (it came back frozen, in eval mode: a helper's hunt, stop 50)
    assert model.training and all(p.requires_grad for p in model.parameters())
    if max_neurons == 2:  # global clustering of fewer than k_min + 1 neurons failed after the selection's prefill
        assert result.update.num_clusters == 1 and result.report["clustering"]["k"] == 1
    report = result.report
    assert report["parameters"]["nest"] == result.update.num_trainable() == result.update.num_clusters * 3 * 32
    assert report["training"]["steps"] == 6 and report["data"]["examples_by_kind"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.tensor([tokenizer("How do I bake bread?")["input_ids"]])
    with result.update.attached(model):
        expected = logits(model, ids)
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)
    assert NestUpdate.load(tmp_path / "delta").num_clusters == result.update.num_clusters
    for folder in ("delta", "ckpt"):  # a model passed in, built in memory: its base is unknown, not the default's
        assert NestUpdate.load(tmp_path / folder).info["base_model_name_or_path"] == ""
    if top_layers is not None:  # only the top layer changes, so guarded decoding shares the layers below
        from ngsd.decoding.shared_trunk import shared_trunk_unsupported
        from ngsd.nest.as_lora import nest_lora_adapter

        last = model.config.num_hidden_layers - 1
        assert set(result.selection.layer.tolist()) == {last} and report["selection"]["from_layer"] == last
        assert shared_trunk_unsupported(model, nest_lora_adapter(result.update)) is None


def top_layer_update(model, seed: int = 6) -> NestUpdate:
    """Selected neurons in the last layer only, in two clusters, so a shared trunk can run below it."""
    last = model.config.num_hidden_layers - 1
    return random_update(model, seed, layer=(last,) * 3, neuron=(2, 11, 40), cluster=(0, 5, 0))


@pytest.mark.parametrize("which", ["two layers", "top layer"])
def test_a_nest_delta_as_lora_equals_the_folded_model(which, tmp_path):
    from peft import PeftModel

    from ngsd.experts.lora import LoraAdapter
    from ngsd.nest.as_lora import nest_lora_adapter, save_peft_folder

    model = tiny_model("llama")
    update = random_update(model, seed=7) if which == "two layers" else top_layer_update(model)
    folded = update.fold_into(copy.deepcopy(model))
    ids = torch.randint(3, 90, (2, 8), generator=torch.Generator().manual_seed(8))
    expected, base = logits(folded, ids), logits(model, ids)
    saved = LoraAdapter.load(save_peft_folder(update, tmp_path / "lora"))
    for adapter in (nest_lora_adapter(update), saved):
        assert adapter.scale == 1.0
        adapter.attach(model)
        try:
            with torch.no_grad(), adapter.rows_from(2):
                both = model(input_ids=torch.cat([ids, ids])).logits
        finally:
            adapter.detach(model)
        torch.testing.assert_close(both[:2], base)  # base rows untouched
        torch.testing.assert_close(both[2:], expected, atol=1e-5, rtol=1e-5)
    with_peft = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(logits(with_peft, ids), expected, atol=1e-5, rtol=1e-5)


def test_guarded_decoding_with_the_nest_lora_matches_the_folded_expert_model(tmp_path):
    from ngsd.config import NGSDConfig
    from ngsd.decoding.loop import guarded_generate
    from ngsd.decoding.shared_trunk import shared_trunk_unsupported
    from ngsd.nest.as_lora import nest_lora_adapter

    model = tiny_model("llama")
    ids = torch.randint(3, 90, (3, 6), generator=torch.Generator().manual_seed(9))
    for update in (random_update(model, seed=10, strength=1.0), top_layer_update(model, seed=11)):
        adapter = nest_lora_adapter(update)
        top_only = update.layer.min().item() > 0
        assert (shared_trunk_unsupported(model, adapter) is None) == top_only  # top layers: the shared trunk runs
        folded = update.fold_into(copy.deepcopy(model))
        config = NGSDConfig(tau=2.0, v_th=0.3)
        as_model = guarded_generate(model, ids, expert=folded, config=config, alpha=0.9, max_new_tokens=6)
        as_lora = guarded_generate(model, ids, expert=adapter, config=config, alpha=0.9, max_new_tokens=6)
        assert torch.equal(as_lora.sequences, as_model.sequences)
        for a, b in zip(as_lora.traces, as_model.traces):
            assert a.spikes == b.spikes
            assert a.divergence == pytest.approx(b.divergence, abs=1e-5)
        assert any(any(t.spikes) for t in as_model.traces), "the gate must fire for the comparison to mean something"


def test_a_nest_delta_distils_as_a_teacher(tmp_path):
    """`train-expert --distill-from` a NeST delta folder: its adapter form has no peft folder, so the teacher is the
    delta folded into a copy of the base (load_teacher called PeftModel.from_pretrained on the delta's folder)."""
    from ngsd.experts.training import distill

    model = tiny_model("llama")
    random_update(model, seed=3).save(tmp_path / "delta")
    teacher = distill.load_teacher(model, tmp_path / "delta")
    folded = apply_delta(copy.deepcopy(model), tmp_path / "delta")
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(logits(teacher, ids), logits(folded, ids))
    assert not torch.equal(logits(teacher, ids), logits(model, ids))  # the base itself is left as it was
    assert not any(p.requires_grad for p in teacher.parameters())


# --- A helper's hunt of NeST (stop 50). ---


def test_folding_a_delta_twice_is_refused_and_a_folded_base_refuses_it_as_expert(tmp_path):
    """A second apply_delta doubled the change silently (W2 - W0 == 2 (W1 - W0)); load_nest_model() then
    expert='nest' guarded with base + 2 delta."""
    from ngsd.experts.resolve import resolve_expert

    model = tiny_model("llama")
    update = random_update(model, seed=4)
    update.save(tmp_path / "delta")
    folded = apply_delta(copy.deepcopy(model), tmp_path / "delta")
    once = [p.detach().clone() for p in folded.parameters()]
    with pytest.raises(ValueError, match="already folded"):
        apply_delta(folded, tmp_path / "delta")
    assert all(torch.equal(a, b) for a, b in zip(once, folded.parameters()))
    with pytest.raises(ValueError, match="add it twice"):
        resolve_expert(str(tmp_path / "delta"), folded)
    update.fold_into(folded, sign=-1)  # taken out, it may go in again
    apply_delta(folded, tmp_path / "delta")
    resolve_expert(str(tmp_path / "delta"), model)  # the unmodified base takes it as its expert


@pytest.mark.parametrize("damage", ["truncated", "wrong width", "missing down", "nan"])
def test_a_damaged_delta_file_is_a_one_line_error(damage, tmp_path):
    """Each gave a raw traceback from the CLI (SafetensorError, a size mismatch) or printed only 'error: down'."""
    from safetensors.torch import load_file, save_file

    from ngsd.cli import main

    model = tiny_model("llama")
    path = random_update(model).save(tmp_path / "delta")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        if damage == "wrong width":
            tensors["up"] = tensors["up"][:, :-1].contiguous()
        elif damage == "missing down":
            del tensors["down"]
        else:
            tensors["gate"][0, 0] = float("nan")
        save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="not a valid NeST delta"):
        NestUpdate.load(tmp_path / "delta")
    assert main(["nest-to-lora", str(tmp_path / "delta"), "--out", str(tmp_path / "lora")]) == 2


def test_a_damaged_lora_weights_file_is_a_one_line_error(tmp_path):
    from ngsd.experts.lora import LoraAdapter

    from .conftest import tiny_lora_expert

    folder = tiny_lora_expert(tiny_model("llama"), tmp_path / "lora")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        LoraAdapter.load(folder)


def test_nest_to_lora_takes_a_train_nest_checkpoint_folder(tmp_path):
    """train-nest --out writes the delta beside the folded weights; nest-to-lora refused the folder (config.json)."""
    from ngsd.cli import main

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "ckpt")
    random_update(model).save(tmp_path / "ckpt")
    assert main(["nest-to-lora", str(tmp_path / "ckpt"), "--out", str(tmp_path / "lora"), "--base", "my/base"]) == 0
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_nest_to_lora_records_the_base_model_the_delta_was_trained_on(tmp_path, capsys):
    """Without --base, adapter_config.json said base_model_name_or_path: null (peft and vLLM cannot load the base
    from it): now the base train-nest recorded, the default model's hub id for the shipped delta, or an error."""
    import json

    from ngsd.cli import main
    from ngsd.loading import DEFAULT_HUB_ID

    def converted(delta: str, *extra: str) -> str:
        out = tmp_path / f"lora{len(list(tmp_path.glob('lora*')))}"
        assert main(["nest-to-lora", delta, "--out", str(out), *extra]) == 0
        return json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]

    assert converted("nest") == DEFAULT_HUB_ID  # its report: trained on the default model (config model null)
    update = random_update(tiny_model("llama"))
    update.save(tmp_path / "recorded", {"base_model_name_or_path": "/models/my-base"})  # as train-nest now writes
    assert converted(str(tmp_path / "recorded")) == "/models/my-base"
    assert converted(str(tmp_path / "recorded"), "--base", "other/base") == "other/base"  # --base wins
    update.save(tmp_path / "older")  # a delta saved before train-nest recorded it, with its report beside it
    (tmp_path / "older" / "training_report.json").write_text(json.dumps({"config": {"model": "org/base-7b"}}))
    assert converted(str(tmp_path / "older")) == "org/base-7b"
    update.save(tmp_path / "unknown")  # nothing says
    capsys.readouterr()
    assert main(["nest-to-lora", str(tmp_path / "unknown"), "--out", str(tmp_path / "lora_unknown")]) == 2
    err = capsys.readouterr().err
    assert "does not record the base model" in err and "pass --base" in err
    assert not (tmp_path / "lora_unknown").exists()
