"""The hidden-state risk probe: features, padding invariance, persistence, training, data hygiene, lookup."""

from __future__ import annotations

import json

import pytest
import torch

from ngsd.config import ReflectionConfig
from ngsd.risk.probe import (
    DEFAULT_PROBE_NAME,
    ProbeSpec,
    RiskProbe,
    decoder_layers,
    estimate_risk,
    pool,
    probe_for,
    prompt_hidden_states,
    shipped_probe_path,
)
from ngsd.risk.probe_training import (
    TrainProbeConfig,
    auroc,
    build_dataset,
    extract_features,
    pooled_candidates,
    route_threshold,
    select_and_fit,
    split_groups,
    token_max_candidates,
    training_split_of,
)

from .conftest import DATA_DIR, forward_from_another_thread, mixed_length_batch, tiny_model

needs_data = pytest.mark.skipif(not (DATA_DIR / "SOURCES.md").is_file(),
                                reason=f"shared data folder absent at {DATA_DIR}")


def random_probe(hidden: int, layer=1, pooling=("last", "mean"), seed: int = 0) -> RiskProbe:
    g = torch.Generator().manual_seed(seed)
    layers = (layer,) if isinstance(layer, int) else layer
    width = hidden * len(pooling) * len(layers)
    spec = ProbeSpec(layer=layer, pooling=pooling, calibration={"scale": 0.7, "shift": -0.2}, route_below=2.5,
                     model={"hidden_size": hidden})
    return RiskProbe(spec, torch.randn(width, generator=g), torch.rand(width, generator=g) + 0.5,
                     torch.randn(width, generator=g), 0.3)


def test_features_shape_and_left_padding_does_not_change_a_row():
    model = tiny_model("llama")
    probe = random_probe(model.config.hidden_size, layer=(1, 2), pooling=("last", "mean"))
    ids, mask, prompts = mixed_length_batch([3, 11, 7], model.config.vocab_size, seed=3)
    states = prompt_hidden_states(model, ids, mask)
    batched = probe.features(states, mask)
    assert batched.shape == (3, 4 * model.config.hidden_size)
    for row, tokens in enumerate(prompts):
        alone_ids = torch.tensor([tokens])
        alone_mask = torch.ones_like(alone_ids)
        alone = probe.features(prompt_hidden_states(model, alone_ids, alone_mask), alone_mask)
        torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-4)
    risks = probe.risk(batched)
    assert risks.shape == (3,) and bool(((risks >= 0) & (risks <= 10)).all())


def test_truncated_prefill_gives_the_full_forwards_hidden_states():
    model = tiny_model("qwen2")
    ids, mask, _ = mixed_length_batch([4, 9], model.config.vocab_size)
    full = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                 output_hidden_states=True).hidden_states
    for upto in (0, 1):
        truncated = prompt_hidden_states(model, ids, mask, upto=upto)
        assert len(truncated) == upto + 1
        for a, b in zip(truncated, full):
            torch.testing.assert_close(a, b)


def test_a_forward_in_another_thread_neither_enters_nor_stops_at_the_prompts_hidden_states():
    """Calls on one model from several threads: the hooks that read the prompt's states sit on shared layers.
    Another thread's forward went into this call's states, and this call's early exit stopped it half way."""
    model = tiny_model("llama")
    ids, mask, _ = mixed_length_batch([4, 9], model.config.vocab_size, seed=1)
    other_ids, other_mask, _ = mixed_length_batch([3, 6, 5], model.config.vocab_size, seed=2)
    expected = prompt_hidden_states(model, ids, mask, upto=1)
    with forward_from_another_thread(model, decoder_layers(model)[0], other_ids, other_mask) as errors:
        states = prompt_hidden_states(model, ids, mask, upto=1)
    assert not errors, errors
    assert len(states) == len(expected)
    for got, want in zip(states, expected):
        torch.testing.assert_close(got, want)


def test_pool_rejects_mismatched_mask_and_empty_rows():
    hidden = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="attention_mask"):
        pool(hidden, torch.ones(2, 5), "mean")
    with pytest.raises(ValueError, match="no real token"):
        pool(hidden, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), "last")
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, torch.ones(2, 4), "median")


def test_save_load_round_trip(tmp_path):
    probe = random_probe(16, layer=2)
    features = torch.randn(5, probe.num_features)
    probe.save(tmp_path / "p", report={"seed": 0})
    loaded = RiskProbe.load(tmp_path / "p")
    assert loaded.layer == 2 and loaded.spec == probe.spec and loaded.route_below == 2.5
    torch.testing.assert_close(loaded.risk(features), probe.risk(features))
    assert json.loads((tmp_path / "p" / "training_report.json").read_text()) == {"seed": 0}
    with pytest.raises(FileNotFoundError, match="train-probe"):
        RiskProbe.load(tmp_path / "missing")


def test_spec_rejects_bad_layers_and_poolings():
    with pytest.raises(ValueError, match="layer"):
        ProbeSpec(layer=-1)
    with pytest.raises(ValueError, match="pooling"):
        ProbeSpec(layer=1, pooling=("median",))
    with pytest.raises(ValueError, match="aggregate"):
        ProbeSpec(layer=1, aggregate="sum")


def test_auroc_and_threshold():
    assert auroc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auroc([0.5, 0.5], [1, 0]) == 0.5
    risks = torch.arange(100, dtype=torch.float32)
    assert route_threshold(risks, 0.98) == 2.0  # rows 0 and 1 fall under it: 98% stay at or above
    benign = torch.arange(100, dtype=torch.float32) - 150  # a gap between the classes: take its middle
    assert route_threshold(risks, 0.98, benign) == pytest.approx((2.0 + -53.0) / 2)  # 98% of benign <= -53
    assert route_threshold(risks, 0.98, benign + 100) == 2.0  # overlap: recall decides
    with pytest.raises(ValueError, match="positive"):
        auroc([0.1], [0])


def test_training_learns_a_planted_signal():
    n, hidden = 400, 12
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(n, generator=g) < 0.4).float()
    signal = torch.randn(n, hidden, generator=g)
    signal[:, 3] += 3.0 * y  # the label lives in one coordinate of layer 2's mean pooling
    noise = {(layer, p): torch.randn(n, hidden, generator=g) for layer in (1, 2) for p in ("last", "mean")}
    noise[(2, "mean")] = signal
    train, val = list(range(300)), list(range(300, 400))
    cfg = TrainProbeConfig(poolings=(("last",), ("mean",)), l2=(1e-2,), route_recall=0.95)
    probe, report = select_and_fit(pooled_candidates(noise, y, [1, 2], cfg), y, train, val, cfg, {"hidden_size": hidden})
    assert probe.layer == 2 and probe.spec.pooling == ("mean",) and probe.spec.aggregate == "pooled"
    assert report["validation"]["val_auroc"] > 0.97
    risks = probe.risk(signal[val])
    assert risks[y[val] == 1].mean() > 7 and risks[y[val] == 0].mean() < 3
    assert report["validation"]["val_harmful_routed"] <= 0.05
    config = ReflectionConfig()
    assert config.alpha_for_risk(float(risks[y[val] == 1].median())) == config.alpha_high


def test_token_max_training_finds_the_one_harmful_token():
    n, hidden = 300, 10
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(n, generator=g) < 0.5).float()
    tokens = []
    for label in y.tolist():
        states = torch.randn(int(torch.randint(3, 12, (1,), generator=g)), hidden, generator=g)
        if label:  # one token somewhere carries the signal; the rest look benign
            states[int(torch.randint(0, len(states), (1,), generator=g)), 5] += 4.0
        tokens.append(states.half())
    feats = {(3, "tokens"): tokens}
    cfg = TrainProbeConfig(l2=(1e-3,), route_recall=0.95)
    probe, report = select_and_fit(token_max_candidates(feats, y, [3], cfg), y, list(range(220)),
                                   list(range(220, n)), cfg, {"hidden_size": hidden})
    assert probe.spec.aggregate == "token_max" and probe.num_features == 1
    assert report["validation"]["val_auroc"] > 0.95
    # The probe's own features path (padded batch) gives the same maxima as training's flat path.
    rows = list(range(220, 230))
    width = max(len(tokens[i]) for i in rows)
    hidden_states = torch.zeros(len(rows), width, hidden)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for k, i in enumerate(rows):
        hidden_states[k, width - len(tokens[i]):] = tokens[i].float()
        mask[k, width - len(tokens[i]):] = 1
    feats_rows = probe.features((hidden_states,) * 4, mask)
    from ngsd.risk.probe_training import token_max_logits

    expected = token_max_logits([tokens[i] for i in rows], (probe.mean, probe.std, probe.weight, probe.bias))
    torch.testing.assert_close(feats_rows[:, 0], expected, atol=1e-4, rtol=1e-4)


def test_token_max_risk_cannot_drop_when_text_is_appended():
    model = tiny_model("llama")
    spec = ProbeSpec(layer=2, pooling=("max",), aggregate="token_max", model={"hidden_size": 32})
    g = torch.Generator().manual_seed(4)
    probe = RiskProbe(spec, torch.randn(32, generator=g), torch.rand(32, generator=g) + 0.5,
                      torch.randn(32, generator=g), -1.0)
    ids, mask, prompts = mixed_length_batch([6, 6, 6], model.config.vocab_size, seed=5)
    plain = probe.risk(probe.features(prompt_hidden_states(model, ids, mask), mask))
    suffix = torch.randint(3, model.config.vocab_size, (3, 9), generator=g)
    longer_ids = torch.cat([ids, suffix], dim=1)
    longer_mask = torch.ones_like(longer_ids)
    longer = probe.risk(probe.features(prompt_hidden_states(model, longer_ids, longer_mask), longer_mask))
    assert bool((longer >= plain - 1e-5).all())
    with pytest.raises(ValueError, match="exactly one layer"):
        ProbeSpec(layer=(1, 2), aggregate="token_max")


@needs_data
def test_no_evaluation_prompt_is_in_the_training_set():
    from ngsd.data import load_suite, read_rows

    evaluation: set[str] = set()
    for suite in ("advbench", "harmbench", "gcg", "autodan", "deepinception", "xstest_safe", "xstest_unsafe",
                  "mt_bench", "gsm8k"):
        for p in load_suite(suite, DATA_DIR):
            if suite == "advbench" and int(p.id) >= 130:
                continue  # AdvBench ids >= 130 are the training split
            evaluation.add(p.text.strip().lower())
            if p.goal:
                evaluation.add(p.goal.strip().lower())
    evaluation |= {r["instruction"].strip().lower() for r in read_rows(DATA_DIR / "alpaca_eval_805.json")
                   if int(r["id"]) % 2 == 1}
    examples = build_dataset(str(DATA_DIR), seed=0)
    assert len(examples) > 1000 and {e.label for e in examples} == {0, 1}
    leaked = [e.text for e in examples if e.text.strip().lower() in evaluation]
    assert leaked == []


@needs_data
def test_wrapped_copies_share_the_split_of_their_request():
    examples = build_dataset(str(DATA_DIR), seed=1)
    train, val = split_groups(examples, 0.2, seed=1)
    train_groups = {examples[i].group for i in train}
    assert not train_groups & {examples[i].group for i in val}
    wrappers = {label: {e.wrapper for e in examples if e.wrapper and e.label == label} for label in (0, 1)}
    assert wrappers[0] == wrappers[1]  # both classes see every wrapper


@needs_data
def test_composites_are_made_within_one_split_from_plain_requests_of_that_split():
    from ngsd.experts.training.splits import leaks
    from ngsd.risk.probe_training import COMPOSED, training_split

    examples, train, val = training_split(str(DATA_DIR), seed=0, compose_rate=0.5)
    composed = {i for i, e in enumerate(examples) if e.wrapper == COMPOSED}
    assert sorted(train + val) == list(range(len(examples))) and not set(train) & set(val)
    plain = {i for i, e in enumerate(examples) if not e.wrapper}
    for rows in (train, val):
        benign = {examples[i].text.lower() for i in rows if i in plain and examples[i].label == 0}
        harmful = {examples[i].text.lower() for i in rows if i in plain and examples[i].label == 1}
        mine = [examples[i] for i in rows if i in composed]
        assert {e.label for e in mine} == {0, 1}
        for e in mine:
            text = e.text.lower()  # parts may start lower-cased ("Also, ...")
            found_benign = sum(t in text for t in benign)
            found_harmful = sum(t in text for t in harmful)
            # a harmful request among benign ones, or only benign ones (short requests can hide in longer ones)
            assert (found_harmful >= 1 and found_benign >= 1) if e.label else (found_harmful == 0 and found_benign >= 2)
        others = {examples[i].text.lower() for i in (val if rows is train else train) if i in plain}
        assert not any(t in e.text.lower() for e in mine for t in others if len(t) > 40)
    # about rate x plain requests of each class, and no evaluation prompt inside any composite
    assert 0.4 < len(composed) / len(plain) < 0.6
    assert leaks([examples[i].text for i in composed], DATA_DIR) == []


def _default_like_config(name: str, hidden: int = 576):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3)
    config._name_or_path = name
    return config


def test_probe_for_finds_the_shipped_probe_only_for_the_default_model(tmp_path):
    from ngsd.loading import DEFAULT_HUB_ID

    shipped = shipped_probe_path()
    if shipped is None:
        pytest.skip("no shipped probe in ngsd/assets/probes yet")
    assert shipped.name == DEFAULT_PROBE_NAME and shipped_probe_path("smollm2") == shipped
    assert shipped_probe_path("some/other-model") is None
    assert shipped_probe_path(_default_like_config(DEFAULT_HUB_ID)) == shipped
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "ngsd_conversion.json").write_text("{}")
    assert shipped_probe_path(_default_like_config(str(converted))) == shipped
    assert shipped_probe_path(_default_like_config(str(tmp_path))) is None  # same shapes, unknown weights
    assert shipped_probe_path(_default_like_config(DEFAULT_HUB_ID, hidden=576 + 9 * 8)) is None
    assert probe_for(tiny_model("llama")) is None


def test_shipped_probe_loads_and_reads_a_middle_layer():
    path = shipped_probe_path()
    if path is None:
        pytest.skip("no shipped probe in ngsd/assets/probes yet")
    probe = RiskProbe.load(path)
    report = json.loads((path / "training_report.json").read_text())
    assert 0 < max(probe.spec.layers) < 30
    if probe.spec.aggregate == "token_max":
        assert probe.num_features == 1 and probe.weight.shape == (576,)
    else:
        assert probe.num_features == 576 * len(probe.spec.pooling) * len(probe.spec.layers)
    assert report["validation"]["val_auroc"] > 0.9 and report["seed"] == 0
    assert 0 <= probe.route_below <= 10


@pytest.fixture(scope="module")
def tokenizer_and_tiny_model():
    from ngsd.loading import default_cache_dir, is_converted

    if not is_converted():
        pytest.skip(f"the default model's tokenizer is not converted yet at {default_cache_dir()}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_cache_dir())
    model = tiny_model("llama", vocab_size=len(tokenizer), max_positions=1024)
    return model, tokenizer


def test_estimate_risk_matches_cached_features_and_keeps_request_order(tokenizer_and_tiny_model, tmp_path):
    model, tokenizer = tokenizer_and_tiny_model
    requests = ["How do I bake bread?", "Write a poem about the sea, in four lines please.", "Hi"]
    probe = random_probe(model.config.hidden_size, layer=1, pooling=("mean",))
    risks = estimate_risk(model, tokenizer, requests, probe, batch_size=2)
    alone = [estimate_risk(model, tokenizer, [r], probe)[0] for r in requests]
    assert risks == pytest.approx(alone, abs=1e-4)
    feats = extract_features(model, tokenizer, requests, [1], batch_size=2, cache_dir=tmp_path)
    again = extract_features(model, tokenizer, requests, [1], batch_size=2, cache_dir=tmp_path)  # from the cache
    torch.testing.assert_close(feats[(1, "mean")], again[(1, "mean")])
    assert probe.risk(feats[(1, "mean")]).tolist() == pytest.approx(risks, abs=1e-4)
    with pytest.raises(TypeError, match="list"):
        estimate_risk(model, tokenizer, "one string", probe)


def test_the_feature_cache_misses_when_weights_past_the_embeddings_change(tokenizer_and_tiny_model, tmp_path):
    """The cache key read the config and a few embedding values: a model retrained in the same folder (same name,
    same embeddings) got the old model's features, and so a probe of the old model."""
    import copy

    model, tokenizer = tokenizer_and_tiny_model
    requests = ["How do I bake bread?", "Hi"]
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.model.layers[0].mlp.down_proj.weight.add_(0.5)
    before, after = {}, {}
    extract_features(model, tokenizer, requests, [1], cache_dir=tmp_path, stats=before)
    extract_features(retrained, tokenizer, requests, [1], cache_dir=tmp_path, stats=after)
    assert after.get("computed_batches") == 1 and not after.get("cached_batches")


def test_cli_module_is_light_and_parses_its_options():
    import subprocess
    import sys

    code = ("import sys, argparse, ngsd.risk.probe_cli as c; assert 'torch' not in sys.modules, 'torch imported'; "
            "p = argparse.ArgumentParser(); c.register_cli(p.add_subparsers()); "
            "a = p.parse_args(['train-probe', '--out', 'x', '--layers', '3,5', '--poolings', 'mean;last+max']); "
            "cfg = c.config_from_args(a); assert cfg.layers == (3, 5) and cfg.poolings == (('mean',), ('last', 'max')); "
            "assert not cfg.direct_lookalikes; "
            "assert c.config_from_args(p.parse_args(['train-probe', '--out', 'x', '--direct-lookalikes'])).direct_lookalikes")
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_data
def test_broad_requests_join_the_probe_data_with_every_form_of_an_act_in_one_split():
    from ngsd.experts.training.splits import evaluation_prompts

    examples = build_dataset(str(DATA_DIR), seed=0, broad=True)
    broad = [e for e in examples if e.source.startswith("broad:") and not e.wrapper]
    assert {e.label for e in broad} == {0, 1}
    assert len({e.source.split(":")[1] for e in broad if e.label == 1}) >= 8  # harm categories
    plain = build_dataset(str(DATA_DIR), seed=0)
    assert len(examples) > len(plain)
    by_group: dict[int, set[str]] = {}
    for e in broad:
        by_group.setdefault(e.group, set()).add(e.source.split(":")[2])
    assert any(len(forms) > 1 for forms in by_group.values()), "an act's surface forms must share a group"
    # a broad form of a plain training goal shares the goal's group (263 rewordings sat in the other split)
    from ngsd.risk.probe_training import broad_training_requests

    group_of_plain = {e.text.strip().lower(): e.group for e in examples if not e.wrapper and
                      not e.source.startswith("broad:")}
    unit_of = {text.strip(): unit for text, _, unit in broad_training_requests(str(DATA_DIR), 0)[1]}
    linked = [(group_of_plain[unit_of[e.text].strip().lower()], e.group) for e in broad
              if e.label == 1 and unit_of[e.text].strip().lower() in group_of_plain]
    assert linked and all(plain_group == group for plain_group, group in linked)
    train, val = split_groups(examples, 0.2, seed=0)
    assert not {examples[i].group for i in train} & {examples[i].group for i in val}
    evaluation = {t.strip().lower() for _, t in evaluation_prompts(str(DATA_DIR))}
    assert [e.text for e in examples if e.text.strip().lower() in evaluation] == []
    # the expert recipe's held-apart topics validate probes too (bench/probe_heldapart.py): never trained on
    from ngsd.experts.training.broad import training_requests

    held = training_requests(str(DATA_DIR), split="validation", seed=0)
    held_texts = {r.text.strip().lower() for r in held.harmful + held.benign}
    assert held_texts and not held_texts & {e.text.strip().lower() for e in broad}
    # "harmful": the same broad harmful requests, none of the look-alikes
    harmful_only = [e for e in build_dataset(str(DATA_DIR), seed=0, broad="harmful")
                    if e.source.startswith("broad:") and not e.wrapper]
    assert {e.label for e in harmful_only} == {1}
    assert sorted(e.text for e in harmful_only) == sorted(e.text for e in broad if e.label == 1)


@needs_data
def test_direct_lookalikes_join_only_the_benign_class_and_leave_the_earlier_split_alone():
    from ngsd.experts.training.prompts import DIRECT_LOOKALIKE_TRAIN_PROMPTS, VALIDATION_BEHAVIOUR_LOOKALIKES

    plain = build_dataset(str(DATA_DIR), seed=0)
    examples = build_dataset(str(DATA_DIR), seed=0, direct_lookalikes=True)
    direct = [e for e in examples if e.source == "direct_lookalike"]
    assert {e.label for e in direct} == {0}
    assert {e.text for e in direct if not e.wrapper} == set(DIRECT_LOOKALIKE_TRAIN_PROMPTS)
    assert not {e.text for e in examples} & set(VALIDATION_BEHAVIOUR_LOOKALIKES)
    # appended after the earlier benign requests: the first probes' requests keep their groups
    earlier = [(e.text, e.group) for e in plain if not e.wrapper]
    assert [(e.text, e.group) for e in examples if not e.wrapper][:len(earlier)] == earlier
    # a probe's training report names the flag, and its split is rebuilt with it
    _, _, val = training_split_of({"direct_lookalikes": True, "compose_rate": 0.5}, str(DATA_DIR))
    _, _, val_plain = training_split_of({"compose_rate": 0.5}, str(DATA_DIR))
    assert len(val) > len(val_plain)


def test_first_step_divergence_is_the_guarded_loops_first_divergence(tokenizer_and_tiny_model, tmp_path):
    from ngsd import guarded_generate
    from ngsd.api import encode_prompts
    from ngsd.experts.lora import LoraAdapter
    from ngsd.risk.divergence_check import first_step_divergence
    from tests.conftest import tiny_lora_expert

    model, tokenizer = tokenizer_and_tiny_model
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    requests = ["How do I bake bread?", "Write a poem about the sea, in four lines please.", "Hi"]
    values = first_step_divergence(model, tokenizer, requests, adapter, batch_size=2)
    ids, mask = encode_prompts(tokenizer, requests)
    out = guarded_generate(model, ids, mask, expert=adapter, alpha=0.5, max_new_tokens=1)
    assert values == pytest.approx([t.divergence[0] for t in out.traces], abs=1e-5)
    assert not adapter.is_attached(model), "the adapter it attached is detached again"
    separate = first_step_divergence(model, tokenizer, requests, model, batch_size=2)
    assert separate == pytest.approx([0.0] * 3, abs=1e-6)  # the base against itself


@needs_data
def test_fit_probe_check_writes_the_operating_point_from_the_validation_split(tokenizer_and_tiny_model, tmp_path):
    from ngsd.experts.lora import LoraAdapter
    from ngsd.risk.divergence_check import fit_probe_check
    from tests.conftest import tiny_lora_expert

    model, tokenizer = tokenizer_and_tiny_model
    probe = random_probe(model.config.hidden_size, layer=1, pooling=("mean",))
    from ngsd.risk.probe import model_fingerprint

    # (nearly) everything routed; trained (as if) on this model: a check is fitted only with the probe's own model
    probe.spec = ProbeSpec(layer=1, pooling=("mean",), route_below=10.0, model=model_fingerprint(model))
    probe.save(tmp_path / "probe", {"config": {"seed": 0, "wrap_rate": 0.6, "val_fraction": 0.2}})
    adapter = LoraAdapter.load(tiny_lora_expert(model, tmp_path / "lora"))
    fitted = fit_probe_check(tmp_path / "probe", model=model, tokenizer=tokenizer, expert=adapter, expert_name="tiny",
                             data_dir=str(DATA_DIR), band_share=0.5, batch_size=32, log=lambda _: None)
    spec = RiskProbe.load(tmp_path / "probe").spec
    assert (spec.check_above, spec.check_divergence, spec.check_expert) == \
        (fitted["check_above"], fitted["check_divergence"], "tiny")
    val = fitted["validation"]
    assert val["benign_routed_by_probe"] > val["benign"] // 2
    assert val["benign_in_band"] == val["benign_routed_by_probe"] // 2  # band_share of the routed benign requests
    assert val["harmful_divergence_share_at_or_above"] >= 0.98
    report = json.loads((tmp_path / "probe" / "training_report.json").read_text())
    assert report["divergence_check"]["expert"] == "tiny" and report["config"]["seed"] == 0


def test_divergence_threshold_is_set_on_the_requests_named_and_keeps_their_recall():
    from ngsd.risk.divergence_check import fit_divergence_check

    risks = [9.0, 9.0, 9.0, 9.0, 0.5, 0.1, 2.0, 1.5]
    divergences = [0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.5, 0.7]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    every = fit_divergence_check(risks, divergences, labels, route_below=3.0, recall=1.0, band_share=0.5)
    single = fit_divergence_check(risks, divergences, labels, route_below=3.0, recall=1.0, band_share=0.5,
                                  sets_threshold=[True, True, False, False, True, True, True, True])
    assert every["check_divergence"] == 0.2 and single["check_divergence"] == 0.8
    assert single["validation"]["harmful_setting_the_threshold"] == 2
    assert single["check_above"] == every["check_above"]  # the band is the benign requests' business
    assert single["validation"]["benign_in_band_guarded"] < every["validation"]["benign_in_band_guarded"]
    with pytest.raises(ValueError, match="one entry per validation request"):
        fit_divergence_check(risks, divergences, labels, route_below=3.0, sets_threshold=[True])


@pytest.mark.parametrize("argv, words", [
    (["--check-only", "--no-check"], ["--check-only and --no-check"]),  # was exit status 1 without 'ngsd train-probe'
    (["--threads", "-1"], ["--threads", ">= 1"]),  # was a raw RuntimeError traceback after loading the model
    (["--threads", "0"], ["--threads", ">= 1"]),
    (["--expert", "/nope"], ["--expert", "/nope", "does not exist"]),  # was found only after training the probe
    (["--model", "/nope"], ["--model", "/nope", "does not exist"]),
])
def test_train_probe_cli_refuses_bad_arguments_before_any_work(argv, words, tmp_path, capsys):
    from ngsd import cli

    # a missing data folder as well: a check that does not fire ends soon, never in a training run
    assert cli.main(["train-probe", "--out", str(tmp_path / "probe"), *argv, "--data-dir", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ngsd train-probe: error: "), err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize("argv, words", [
    # ended in an IndexError traceback after the model load and the data split
    (["--layers", "-1"], ["--layers", ">= 0", "-1"]),
    # a mixed list ran the whole feature extraction before ProbeSpec refused it
    (["--layers=4,-1"], ["--layers", ">= 0", "-1"]),
    (["--layers", ","], ["--layers", "at least one"]),
    # NaN passed `v < 0`: features were read, then the fit gave NaN weights
    (["--l2", "nan"], ["--l2", "finite", "nan"]),
    (["--l2", "0.01,inf"], ["--l2", "finite", "inf"]),
    # both failed only after the model load
    (["--data-dir", "/nonexistent-ngsd-data"], ["--data-dir", "/nonexistent-ngsd-data", "not found"]),
    (["--check-only"], ["--check-only", "not a risk-probe folder", "probe.json"]),
])
def test_train_probe_cli_refuses_layers_l2_data_dir_and_check_only_before_the_model_load(argv, words, tmp_path,
                                                                                          capsys, monkeypatch):
    import ngsd.loading
    from ngsd import cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the argument check")

    monkeypatch.setattr(ngsd.loading, "load_model", no_load)
    (tmp_path / "data").mkdir()
    if not any(a.startswith("--data-dir") for a in argv):
        argv = [*argv, "--data-dir", str(tmp_path / "data")]
    assert cli.main(["train-probe", "--out", str(tmp_path / "probe"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ngsd train-probe: error: "), err
    for word in words:
        assert word in err, (word, err)


def test_layers_past_the_depth_are_refused_right_after_the_model_load(tmp_path, capsys, monkeypatch):
    """The depth check came after the data split; now it comes before it (and before any feature), naming the
    model's layer count, on the command line (exit 2) and in `train_probe`."""
    import ngsd.loading
    import ngsd.risk.probe_training as probe_training
    from ngsd import cli
    from ngsd.risk.probe_training import check_layers_fit, train_probe

    model = tiny_model("llama")  # 2 decoder layers: hidden states 0..2

    def no_data(*args, **kwargs):
        raise AssertionError("the data were read before the layer check")

    monkeypatch.setattr(ngsd.loading, "load_model", lambda *a, **k: (model, object()))
    monkeypatch.setattr(probe_training, "training_split", no_data)
    (tmp_path / "data").mkdir()
    assert cli.main(["train-probe", "--out", str(tmp_path / "probe"), "--layers", "1,3", "--no-check",
                     "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ngsd train-probe: error: --layers: index 3 is past what a probe can read: the model has 2 "
                          "decoder layers"), err
    with pytest.raises(ValueError, match=r"layers: indices 3, 5 are past what a probe can read: the model has 2 decoder "
                                         r"layers, so its probe reads hidden-state indices 0\.\.1"):
        train_probe(TrainProbeConfig(layers=(3, 5), data_dir=str(tmp_path / "data")), model=model,
                    tokenizer=object(), log=lambda s: None)
    check_layers_fit([0, 1], 2)  # the embeddings and the last decoder block's output fit
    # index n is after the final norm: training read it there, decoding before it (a helper's hunt, stop 50)
    with pytest.raises(ValueError, match="after the final norm"):
        check_layers_fit([2], 2)


def test_probe_config_and_fits_refuse_negative_layers_and_non_finite_l2():
    from ngsd.risk.probe_training import fit_logistic, fit_token_max

    for layers in ((-1,), (4, -1)):
        with pytest.raises(ValueError, match=r"layers must be integer hidden-state indices >= 0 .*got -1; count from "
                                             r"the bottom"):
            TrainProbeConfig(layers=layers)
    with pytest.raises(ValueError, match="layers must be integer"):
        TrainProbeConfig(layers=(1.5,))
    for l2 in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="l2 must be a non-empty list of finite, non-negative strengths"):
            TrainProbeConfig(l2=(0.01, l2))
        # the fits themselves: a NaN strength gave NaN weights (and a NaN route_below) without a word
        with pytest.raises(ValueError, match="l2 must be a finite strength >= 0"):
            fit_logistic(torch.randn(6, 3), torch.tensor([0, 1] * 3), l2)
        with pytest.raises(ValueError, match="l2 must be a finite strength >= 0"):
            fit_token_max([torch.randn(2, 3) for _ in range(6)], torch.tensor([0, 1] * 3), l2, steps=1)
    assert TrainProbeConfig(l2=(0.0, 0.1), layers=(0, 3)).l2 == (0.0, 0.1)


def test_a_probe_on_the_normed_last_hidden_state_is_refused_and_never_chosen():
    """Index n (n decoder layers) is the output after the final norm in `output_hidden_states`, which training read,
    but the decoding loop hooks block n-1's output, before the norm: the loop's risks were garbage (10.00 for every
    prompt of a tiny Llama where estimate_risk gave 1.7-8.0). Such a probe is refused; training never picks it."""
    from ngsd.risk.probe_training import default_layers

    with pytest.raises(ValueError, match="after its final norm"):
        ProbeSpec(layer=2, model={"num_hidden_layers": 2})
    ProbeSpec(layer=1, model={"num_hidden_layers": 2})
    assert default_layers(1) == [0] and max(default_layers(2)) == 1 and max(default_layers(30)) < 30


def test_a_damaged_or_non_finite_probe_is_one_error_naming_its_folder(tmp_path):
    """NaN weights gave 'risk nan >= route_below' and the middle alpha, a -inf bias routed every request unguarded
    (risk 0); truncated files, a short weight vector or a JSON list gave raw tracebacks (a helper's hunt, stop 50)."""
    import json

    from safetensors.torch import load_file, save_file

    from ngsd.risk.divergence_check import fit_probe_check
    from ngsd.risk.probe import model_fingerprint

    model = tiny_model("llama")
    hidden = model.config.hidden_size
    spec = ProbeSpec(layer=1, pooling=("mean",), model=model_fingerprint(model))
    good = RiskProbe(spec, torch.zeros(hidden), torch.ones(hidden), torch.randn(hidden), torch.tensor(0.0))
    for damage in ("weight nan", "bias -inf", "short weight", "truncated weights", "json list", "scale nan"):
        folder = good.save(tmp_path / damage.replace(" ", "_"))
        weights, spec_file = folder / "probe.safetensors", folder / "probe.json"
        tensors = load_file(str(weights))
        if damage == "weight nan":
            tensors["weight"][3] = float("nan")
        elif damage == "bias -inf":
            tensors["bias"][0] = float("-inf")
        elif damage == "short weight":
            tensors = {name: t[: hidden // 2] if t.numel() == hidden else t for name, t in tensors.items()}
        save_file(tensors, str(weights))
        if damage == "truncated weights":
            weights.write_bytes(weights.read_bytes()[:40])
        elif damage == "json list":
            spec_file.write_text("[1, 2]")
        elif damage == "scale nan":
            spec_file.write_text(spec_file.read_text().replace('"scale": 1.0', '"scale": NaN'))
        with pytest.raises(ValueError, match=f"{folder} is not a usable risk probe"):
            RiskProbe.load(folder)
    # a check is fitted only with the model the probe was trained on (it was fitted on a Qwen2 for a Llama probe)
    folder = good.save(tmp_path / "llama_probe")
    with pytest.raises(ValueError, match="not on this model"):
        fit_probe_check(folder, model=tiny_model("qwen2"), tokenizer=None, expert=None, expert_name="x")
    assert json.loads((folder / "probe.json").read_text())["check_divergence"] is None
