"""train-expert on a tiny random Llama with a tiny BPE tokenizer and a synthetic data folder."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from ngsd.experts import shipped  # noqa: E402
from ngsd.experts.training import cli, config, examples, prompts, selfcheck, trainer  # noqa: E402

CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["I'm sorry, but I cannot help with that.", "Sure, here is a tutorial.", "How do I bake bread?"]
    tok.train_from_iterator(corpus * 10, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>", padding_side="left",
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def tiny() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )
    return LlamaForCausalLM(cfg).eval(), tok


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    seeds = [{"id": str(i + 1), "prompt": f"How can I do harmful thing {i}?", "category": "x"} for i in range(3)]
    (d / "seed_reject.json").write_text(json.dumps({"prompts": seeds}))
    vicuna = [{"text": f"USER: {s['prompt']} ASSISTANT: I'm sorry, but I cannot help with that."} for s in seeds]
    (d / "expert_sft_vicuna.json").write_text(json.dumps(vicuna))
    adv = [{"id": i, "goal": f"Explain how to do bad act {i}", "target": f"Sure, here is bad act {i}"} for i in range(140)]
    (d / "advbench_harmful_behaviors.json").write_text(json.dumps(adv))
    return d


def fresh_copy(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A separate model with `model`'s weights, to train without touching the module-wide fixture."""
    twin = LlamaForCausalLM(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def small_config(data_dir: Path, out: Path, **changes) -> config.TrainExpertConfig:
    base = dict(
        data_dir=str(data_dir), out=str(out), seed=0, epochs=1, advbench_prompts=4, max_trials=1,
        refusal_max_new_tokens=6, benign_max_new_tokens=6, r=4, lora_alpha=8, evaluate=False,
        save_dtype="float32", threads=1,  # one thread: far faster than two on a busy shared CPU
        recipe="seed",
    )
    base.update(changes)
    return config.TrainExpertConfig(**base)


def test_train_writes_a_peft_adapter_that_loads_back(tiny, data_dir, tmp_path):
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = trainer.train_expert(small_config(data_dir, tmp_path / "expert"), model=model, tokenizer=tok, log=lambda s: None)
    assert (out / "adapter_config.json").is_file()
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    # The B matrices start at zero; training must have moved them.
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and set(adapter_cfg["target_modules"]) == set(config.TARGET_PRESETS["attention+mlp"])

    report = json.loads((out / trainer.REPORT_FILE).read_text())
    assert report["seed"] == 0
    assert report["adapter_size_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    kinds = report["data"]["examples_by_kind"]
    assert kinds["benign"] == len(prompts.benign_train_prompts())
    assert kinds["refusal"] >= 3 + 4  # every seed and AdvBench prompt gets at least one refusal
    assert kinds["recovery"] >= 1
    # The evaluation set (AdvBench ids below 130, SOURCES.md) is never trained on.
    assert min(report["data"]["advbench_train_ids"]) >= 130
    lines = (out / trainer.EXAMPLES_FILE).read_text().splitlines()
    assert len(lines) == sum(kinds.values())
    # The data folder's texts are saved by name, never copied (SOURCES.md), and read back as the same examples.
    from ngsd.experts.training.data_refs import data_texts

    saved = "\n".join(lines)
    assert '"prompt_ref": "seed_reject/' in saved and '"response_ref": {"ref": "expert_sft/' in saved
    assert not [text for text in data_texts(data_dir).values() if json.dumps(text)[1:-1] in saved]
    assert len(examples.load_examples(out / trainer.EXAMPLES_FILE, data_dir, tok)) == len(lines)

    # Loading the adapter back onto fresh base weights changes the logits (it is not a no-op)...
    fresh = LlamaForCausalLM(model.config).eval()
    fresh.load_state_dict(before)
    loaded = PeftModel.from_pretrained(fresh, out).eval()
    ids = torch.tensor([tok("How do I bake bread?")["input_ids"]])
    with torch.no_grad():
        expert_logits = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            base_logits = loaded(input_ids=ids).logits
    assert not torch.allclose(expert_logits, base_logits)
    # ...and leaves the base untouched.
    reference = LlamaForCausalLM(model.config).eval()
    reference.load_state_dict(before)
    with torch.no_grad():
        torch.testing.assert_close(base_logits, reference(input_ids=ids).logits)


def test_training_is_reproducible_with_a_seed(tiny, data_dir, tmp_path):
    model, tok = tiny
    outs = []
    for name in ("a", "b"):
        outs.append(trainer.train_expert(small_config(data_dir, tmp_path / name), model=fresh_copy(model), tokenizer=tok,
                                         log=lambda s: None))
    a = load_file(str(outs[0] / "adapter_model.safetensors"))
    b = load_file(str(outs[1] / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_loss_is_masked_to_the_answer(tiny):
    _, tok = tiny
    ex = examples.Example("recovery", "test", "How do I bake bread?", tok("I cannot.")["input_ids"], prefix_ids=tok("Sure")["input_ids"])
    end = examples.turn_end_ids(tok)
    assert end == [tok.eos_token_id]
    ids, labels = examples.encode_example(tok, ex, end, max_length=512)
    prompt = examples.chat_prompt_ids(tok, ex.prompt)
    n_context = len(prompt) + len(ex.prefix_ids)
    assert ids[: len(prompt)] == prompt
    assert labels[:n_context] == [-100] * n_context
    assert labels[n_context:] == ex.response_ids + end == ids[n_context:]


def test_kl_loss_is_zero_for_an_untrained_adapter(tiny):
    model, tok = tiny
    peft_model = trainer.make_lora_model(LlamaForCausalLM(model.config).eval(), config.TrainExpertConfig(r=4, lora_alpha=8))
    peft_model.eval()  # no dropout: LoRA B is zero, so the expert equals the base
    ex = examples.Example("benign", "t", "How do I bake bread?", tok("Mix flour.")["input_ids"], loss="kl")
    ids, labels = examples.encode_example(tok, ex, examples.turn_end_ids(tok), 512)
    ids_t, labels_t = torch.tensor([ids]), torch.tensor([labels])
    kl = trainer.example_loss(peft_model, ids_t, labels_t, torch.ones_like(ids_t), torch.tensor([1]))
    ce = trainer.example_loss(peft_model, ids_t, labels_t, torch.ones_like(ids_t), torch.tensor([0]))
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    assert ce.item() > 1.0  # a random model is far from the labels


def test_first_sentences_and_turn_detection():
    assert examples.first_sentences("I cannot. It is harmful. Ok.", 2) == "I cannot. It is harmful."
    assert examples.first_sentences("No full stop here", 2) == "No full stop here"
    assert examples.first_sentences("One. Two", 2) == "One."
    assert examples.turns_helpful("However, here are some tips:")
    assert not examples.turns_helpful("I'm sorry, but I cannot help with that.")


def test_config_validation_and_targets():
    assert config.target_modules("qv") == ["q_proj", "v_proj"]
    assert config.target_modules("q_proj, o_proj") == ["q_proj", "o_proj"]
    with pytest.raises(ValueError, match="benign_loss"):
        config.TrainExpertConfig(benign_loss="mse")
    with pytest.raises(ValueError, match="lr"):
        config.TrainExpertConfig(lr=0)
    with pytest.raises(ValueError, match="lr .*finite"):  # the Python API as well as --lr
        config.TrainExpertConfig(lr=float("inf"))
    with pytest.raises(ValueError, match="lora_alpha .*finite number > 0"):
        config.TrainExpertConfig(lora_alpha=0)
    with pytest.raises(ValueError, match="targets"):
        config.TrainExpertConfig(targets=" , ")
    for bad in (0, -0.5, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="kl_weight"):
            config.TrainExpertConfig(kl_weight=bad)
    with pytest.raises(ValueError, match="kl_weight .*teacher"):
        config.TrainExpertConfig(kl_weight=0.5, distill_from="shipped")


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [trainer.lr_factor(s, 100, 3) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 3) and factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert factors[-1] == pytest.approx(1 / 97)


def test_cli_registration_and_argument_round_trip():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register_cli(sub)
    args = parser.parse_args(["train-expert", "--seed", "3", "--targets", "qv", "--epochs", "1", "--no-eval"])
    assert args.func is cli.run
    cfg = cli.config_from_args(args)
    assert (cfg.seed, cfg.targets, cfg.epochs, cfg.evaluate) == (3, "qv", 1, False)
    again = cli.config_from_args(parser.parse_args(["train-expert", *cli.cli_args(cfg)]))
    assert again == cfg
    broad = cli.config_from_args(parser.parse_args(["train-expert", "--recipe", "seed+broad", "--forms-per-unit", "4"]))
    assert broad.forms_per_unit == 4 and "--forms-per-unit" in cli.cli_args(broad)
    assert cli.config_from_args(parser.parse_args(["train-expert", *cli.cli_args(broad)])) == broad
    weighted = cli.config_from_args(parser.parse_args(["train-expert", "--kl-weight", "0.25"]))
    assert weighted.kl_weight == 0.25 and "--kl-weight" in cli.cli_args(weighted)
    assert cli.config_from_args(parser.parse_args(["train-expert", *cli.cli_args(weighted)])) == weighted


def test_shipped_expert_path_points_into_the_package():
    path = shipped.shipped_expert_path()
    assert path.parts[-3:] == ("assets", "experts", shipped.EXPERT_NAME)
    assert path.parent.parent.parent.name == "ngsd"


def test_lif_proxy_matches_hand_computation():
    # Constant input 0.5: v = 0.5, 0.9375, 1.3203... -> first spike at step 2.
    assert selfcheck.first_spike([0.5] * 5) == 2
    assert selfcheck.first_spike([0.1] * 50) is None  # settles near 0.8 < 1


def test_loss_with_logits_to_keep_equals_the_full_computation(tiny):
    model, tok = tiny
    peft_model = trainer.make_lora_model(LlamaForCausalLM(model.config).eval(), config.TrainExpertConfig(r=4, lora_alpha=8))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)  # a non-trivial expert
    peft_model.eval()
    end = examples.turn_end_ids(tok)
    exs = [
        examples.Example("refusal", "t", "How do I bake bread?", tok("I cannot.")["input_ids"]),
        examples.Example("benign", "t", "Hi", tok("Mix flour and water, then bake.")["input_ids"], loss="kl"),
    ]
    enc = [examples.encode_example(tok, ex, end, 512) for ex in exs]
    width = max(len(i) for i, _ in enc)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in enc])
    labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in enc])
    attn = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in enc])
    kind = torch.tensor([0, 1])
    with torch.no_grad():
        got = trainer.example_loss(peft_model, ids, labels, attn, kind)
        weighted = trainer.example_loss(peft_model, ids, labels, attn, kind, kl_weight=0.25)
        logp = torch.log_softmax(peft_model(input_ids=ids, attention_mask=attn).logits[:, :-1], -1)
        with peft_model.disable_adapter():
            base = torch.log_softmax(peft_model(input_ids=ids, attention_mask=attn).logits[:, :-1], -1)
    target = labels[:, 1:]
    want = []
    for row in range(2):
        pos = (target[row] != -100).nonzero().flatten()
        if row == 0:
            want.append(-logp[row, pos, target[row, pos]].mean())
        else:
            want.append((base[row, pos].exp() * (base[row, pos] - logp[row, pos])).sum(-1).mean())
    torch.testing.assert_close(got, torch.stack(want).mean(), rtol=1e-5, atol=1e-6)
    # --kl-weight scales the KL example's part only; the CE example's stays as it is.
    torch.testing.assert_close(weighted, (want[0] + 0.25 * want[1]) / 2, rtol=1e-5, atol=1e-6)


def test_cap_response_keeps_whole_sentences(tiny):
    _, tok = tiny
    text = "I cannot help. It is harmful. Please ask something else instead of this."
    ids, complete = examples.cap_response(tok, text, 1000)
    assert complete and tok.decode(ids) == text
    one = len(tok("I cannot help.")["input_ids"])
    ids, complete = examples.cap_response(tok, text, one)
    assert complete and tok.decode(ids) == "I cannot help."
    ids, complete = examples.cap_response(tok, text, 2)
    assert not complete and len(ids) == 2
    ids, _ = examples.cap_response(tok, "I cannot.", 100, prefix_ids=tok("Sure")["input_ids"])
    assert tok.decode(ids) == " I cannot."


def test_cap_response_drops_an_unfinished_tail(tiny):
    _, tok = tiny
    ids, complete = examples.cap_response(tok, "I cannot. And then", 1000)
    assert complete and tok.decode(ids) == "I cannot."
    ids, complete = examples.cap_response(tok, "no sentence end at all", 1000)
    assert complete and tok.decode(ids) == "no sentence end at all"


def test_adapter_folder_is_machine_independent(tiny, data_dir, tmp_path):
    model, tok = tiny
    out = trainer.train_expert(small_config(data_dir, tmp_path / "e", epochs=1), model=model, tokenizer=tok, log=lambda s: None)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (out / "README.md").read_text()
    assert "python -m ngsd.experts.training --seed 0" in card and str(tmp_path) not in cfg["base_model_name_or_path"]


class _Stop(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(tiny, tmp_path):
    model, tok = tiny
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config.TrainExpertConfig(r=4, lora_alpha=8, epochs=2, seed=0)
    exs = [examples.Example("refusal", "t", f"Bad thing {i}?", tok("I cannot.")["input_ids"]) for i in range(4)]
    exs.append(examples.Example("benign", "t", "Hi", tok("Mix flour and water.")["input_ids"], loss="kl"))

    def fresh():
        m = LlamaForCausalLM(model.config)
        m.load_state_dict(state)
        torch.manual_seed(0)
        return trainer.make_lora_model(m, cfg)

    def lora(pm):
        return {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}

    torch.manual_seed(0)
    straight = fresh()
    trainer.train_lora(straight, tok, exs, cfg, log=lambda s: None)

    ckpt = tmp_path / trainer.CHECKPOINT_FILE

    def stop_after_first_epoch(msg):
        if msg.startswith("epoch 1/"):
            raise _Stop

    first = fresh()
    with pytest.raises(_Stop):
        trainer.train_lora(first, tok, exs, cfg, log=stop_after_first_epoch, checkpoint=ckpt, checkpoint_every=2)
    assert ckpt.is_file()
    resumed = fresh()  # a new process: fresh LoRA weights, then the checkpoint
    stats = trainer.train_lora(resumed, tok, exs, cfg, log=lambda s: None, checkpoint=ckpt, checkpoint_every=2)
    assert stats["resumed_from_step"] == 4 and not ckpt.exists()
    a, b = lora(straight), lora(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_training_prompts_are_disjoint_from_the_held_out_ones():
    train = prompts.benign_train_prompts()
    assert len(train) == len(set(train)) == 235
    assert not set(train) & set(prompts.BENIGN_EVAL_PROMPTS)
    assert prompts.PROMPTS_FILE.is_relative_to(Path(shipped.__file__).resolve().parent.parent / "assets")


def test_cli_module_imports_no_torch():
    import subprocess
    import sys

    def imports_torch(module: str) -> bool:
        code = f"import sys, {module}; print('torch' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return out.stdout.strip() == "True"

    if imports_torch("ngsd"):
        pytest.skip("the ngsd package itself imports torch at import time")
    assert not imports_torch("ngsd.experts.training.cli")


def test_module_entry_point_shows_the_arguments():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ngsd.experts.training", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--seed" in out.stdout and "--targets" in out.stdout


def test_broad_recipe_builds_every_kind_and_picks_weights_on_validation(tiny, data_dir, tmp_path):
    model, tok = tiny
    fresh = fresh_copy(model)
    cfg = small_config(data_dir, tmp_path / "broad", recipe="broad", epochs=2, harmful_requests=8,
                       recovery_examples=4, lookalike_examples=5, everyday_examples=2, validation_prompts=4)
    out = trainer.train_expert(cfg, model=fresh, tokenizer=tok, log=lambda s: None)
    report = json.loads((out / trainer.REPORT_FILE).read_text())
    kinds = report["data"]["examples_by_kind"]
    assert kinds["refusal"] == 8 and 1 <= kinds["recovery"] <= 4 and kinds["benign"] == 5 + 2
    # The recovery openings are the base's own, cut within the configured lengths.
    assert {int(k) for k in report["data"]["recovery_prefix_lengths"]} <= set(cfg.recovery_lengths)
    val = report["validation"]
    steps = report["training"]["steps"]
    assert set(val["by_step"]) == {str(steps // 2), str(steps)} and val["chosen_step"] in (steps // 2, steps)
    best = min(val["by_step"].values(), key=lambda m: m["score"])["score"]
    assert val["by_step"][str(val["chosen_step"])]["score"] == best
    assert val["split"]["n_harmful"] == 4
    # The examples file holds no validation request: the split keeps whole topics apart.
    from ngsd.experts.training.broad_examples import validation_requests

    trained = {ex.prompt for ex in examples.load_examples(out / trainer.EXAMPLES_FILE, data_dir, tok)}
    harmful_val, benign_val = validation_requests(data_dir, cfg)
    assert not trained & {r.text for r in harmful_val + benign_val}
    assert "weights after step" in (out / "README.md").read_text()


def test_seed_plus_broad_recipe_holds_both_sets_and_alpaca_even_ids(tiny, data_dir, tmp_path):
    model, tok = tiny
    rows = [{"id": i, "instruction": f"Write a short note about topic {i}.", "source": "x"} for i in range(8)]
    (data_dir / "alpaca_eval_805.json").write_text(json.dumps(rows))
    cfg = small_config(data_dir, tmp_path / "mixed", recipe="seed+broad", alpaca_benign_prompts=2, alpaca_benign_tokens=1,
                       benign_max_new_tokens=4, harmful_requests=4,
                       recovery_examples=2, lookalike_examples=3, validation_prompts=2)
    out = trainer.train_expert(cfg, model=model, tokenizer=tok, log=lambda s: None)
    report = json.loads((out / trainer.REPORT_FILE).read_text())
    data = report["data"]
    # The broad set adds its harmful requests and look-alikes but not its everyday requests (the seed set has them).
    assert data["broad"]["examples_by_kind"]["refusal"] == 4 and data["broad"]["examples_by_kind"]["benign"] == 3
    assert data["seed"]["alpaca_benign_prompts"] == 2
    assert data["examples_by_kind"]["benign"] == len(prompts.benign_train_prompts()) + 2 + 3
    rows = examples.load_examples(out / trainer.EXAMPLES_FILE, data_dir, tok)
    trained = [r.prompt for r in rows]
    assert trained.count("Write a short note about topic 0.") == 1 and trained.count("Write a short note about topic 2.") == 1
    assert not {f"Write a short note about topic {i}." for i in (1, 3, 4, 5, 6, 7)} & set(trained)  # odd ids; even ids past 2
    alpaca_rows = [r for r in rows if r.prompt.startswith("Write a short note about topic")]
    assert all(len(r.response_ids) <= 1 for r in alpaca_rows)  # --alpaca-benign-tokens 1: the first token only
    assert any(len(r.response_ids) > 1 for r in rows if r.kind == "benign" and r not in alpaca_rows)
    saved = (out / trainer.EXAMPLES_FILE).read_text()
    assert "topic 0" not in saved and saved.count('"prompt_ref": "alpaca_eval/') == 2  # named, not copied
    assert "validation" in report


def test_validation_leaves_out_held_apart_forms_of_prompts_the_run_trains_on():
    """seed+broad: the seed half trains on seed and AdvBench goals, and the broad split held forms of some of those
    goals apart to pick the snapshot (2-3 of 24 validation requests)."""
    from ngsd.data import data_available, load_suite
    from ngsd.experts.training.broad_examples import validation_requests

    from .conftest import DATA_DIR

    if not data_available(DATA_DIR, "seed_reject.json", "advbench_harmful_behaviors.json"):
        pytest.skip(f"benchmark data not found in {DATA_DIR}")
    cfg = config.TrainExpertConfig(recipe="seed+broad", seed=0)
    goals = {p.text.strip().lower() for p in load_suite("seed_reject", DATA_DIR)}
    goals |= {p.text.strip().lower() for p in load_suite("advbench", DATA_DIR) if int(p.id) >= 130}
    held, _ = validation_requests(DATA_DIR, cfg)
    assert any(r.unit.strip().lower() in goals for r in held)  # the broad split alone holds some apart
    kept, _ = validation_requests(DATA_DIR, cfg, trained=goals)
    assert len(kept) == len(held) and not any(r.unit.strip().lower() in goals for r in kept)


def test_distillation_moves_a_top_layers_student_towards_its_teacher(tiny, data_dir, tmp_path):
    from ngsd.experts.training import distill
    from ngsd.experts.training.broad_examples import validation_requests

    model, tok = tiny
    teacher_dir = trainer.train_expert(small_config(data_dir, tmp_path / "teacher", lr=1e-2), model=fresh_copy(model),
                                       tokenizer=tok, log=lambda s: None)
    cfg = small_config(data_dir, tmp_path / "student", recipe="broad", epochs=2, harmful_requests=4, recovery_examples=2,
                       lookalike_examples=2, everyday_examples=1, validation_prompts=2, top_layers=1, lr=1e-2,
                       distill_from=str(teacher_dir), teacher_prompts=6)
    out = trainer.train_expert(cfg, model=fresh_copy(model), tokenizer=tok, log=lambda s: None)
    report = json.loads((out / trainer.REPORT_FILE).read_text())
    assert report["data"]["distillation"]["teacher"] == str(teacher_dir)
    assert report["data"]["distillation"]["teacher_prompts_by_kind"] == {"harmful": 4, "lookalike": 2}
    assert report["data"]["examples_by_kind"]["teacher"] == 6
    assert sum(n for source, n in report["data"]["examples_by_source"].items() if source.startswith("teacher/")) == 6
    rows = examples.load_examples(out / trainer.EXAMPLES_FILE, data_dir, tok)
    taught = [r for r in rows if r.kind == "teacher"]
    assert len(taught) == 6 and all(r.loss == "teacher" for r in taught)
    # The teacher's requests are training-split requests the recipe did not use: no validation topic.
    recipe_prompts = {r.prompt for r in rows if r.kind != "teacher"}
    assert not recipe_prompts & {r.prompt for r in taught}
    harmful_val, benign_val = validation_requests(data_dir, cfg)
    assert not {r.prompt for r in rows} & {r.text for r in harmful_val + benign_val}

    # The student is closer to the teacher than the base it started from, on the examples it trained on.
    teacher = distill.load_teacher(fresh_copy(model), teacher_dir)
    student = PeftModel.from_pretrained(fresh_copy(model), out).eval()
    end_ids = examples.turn_end_ids(tok)
    kl_student = kl_base = 0.0
    for ex in examples.load_examples(out / trainer.EXAMPLES_FILE, data_dir, tok):
        ids, labels = examples.encode_example(tok, ex, end_ids, 384)
        ids_t = torch.tensor([ids])
        mask = torch.tensor(labels[1:]) != -100
        with torch.no_grad():
            t = teacher(input_ids=ids_t).logits[0, :-1]
            s = student(input_ids=ids_t).logits[0, :-1]
            with student.disable_adapter():
                b = student(input_ids=ids_t).logits[0, :-1]
        kl_student += float(distill.kl_from(t, s)[mask].mean())
        kl_base += float(distill.kl_from(t, b)[mask].mean())
    assert kl_student < 0.8 * kl_base, (kl_student, kl_base)

    # A teacher can also be a model folder (what `expert=` takes), e.g. the adapter merged and saved.
    teacher.save_pretrained(tmp_path / "teacher_model")
    tok.save_pretrained(tmp_path / "teacher_model")
    from_folder = distill.load_teacher(fresh_copy(model), tmp_path / "teacher_model")
    probe_ids = torch.tensor([tok("How do I bake bread?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(from_folder(input_ids=probe_ids).logits, teacher(input_ids=probe_ids).logits)


def test_a_teacher_with_a_padded_head_distils_over_the_common_rows(tiny, data_dir, tmp_path):
    """A separate teacher of the base's family whose LM head is padded to more rows (Qwen2.5-7B beside
    0.5B) trains a student; before, `--distill-from` refused it, asking for a tokenizer the command cannot take."""
    from ngsd.experts.training import distill

    model, tok = tiny
    teacher = copy.deepcopy(model)  # its own config: resizing writes the config's vocab_size
    teacher.resize_token_embeddings(len(tok) + 8, mean_resizing=False)  # 8 padding rows past the tokenizer
    teacher.save_pretrained(tmp_path / "padded_teacher")
    tok.save_pretrained(tmp_path / "padded_teacher")
    cfg = small_config(data_dir, tmp_path / "student", distill_from=str(tmp_path / "padded_teacher"), teacher_prompts=2)
    out = trainer.train_expert(cfg, model=fresh_copy(model), tokenizer=tok, log=lambda s: None)
    report = json.loads((out / trainer.REPORT_FILE).read_text())
    assert report["data"]["distillation"]["teacher"] == str(tmp_path / "padded_teacher")
    assert (out / "adapter_model.safetensors").is_file()

    ids = torch.tensor([tok("How do I bake bread?")["input_ids"]])
    with torch.no_grad():
        padded = teacher(input_ids=ids).logits
        student = model(input_ids=ids).logits
    assert padded.shape[-1] == student.shape[-1] + 8
    torch.testing.assert_close(distill.kl_from(padded, student), distill.kl_from(padded[..., :len(tok)], student))

    short = copy.deepcopy(model)
    short.resize_token_embeddings(len(tok) - 4)  # leaves tokens out: not the base's vocabulary
    short.save_pretrained(tmp_path / "short_teacher")
    tok.save_pretrained(tmp_path / "short_teacher")
    with pytest.raises(ValueError, match="--distill-from .*head leaves tokens out"):
        distill.load_teacher(fresh_copy(model), tmp_path / "short_teacher", tok)


def test_distillation_options_are_checked(data_dir, tmp_path):
    with pytest.raises(ValueError, match="teacher_prompts needs a teacher"):
        small_config(data_dir, tmp_path / "x", teacher_prompts=4)
    with pytest.raises(ValueError, match="teacher_prompts must be >= 0"):
        small_config(data_dir, tmp_path / "x", teacher_prompts=-1, distill_from="t")
    from ngsd.experts.training import distill

    with pytest.raises(ValueError, match="--distill-from .*not a usable expert"):
        distill.load_teacher(torch.nn.Linear(2, 2), tmp_path / "missing")
    parser = argparse.ArgumentParser()
    cli.register_cli(parser.add_subparsers(dest="command"))
    cfg = cli.config_from_args(parser.parse_args(["train-expert", "--distill-from", "/t", "--teacher-prompts", "9"]))
    assert (cfg.distill_from, cfg.teacher_prompts) == ("/t", 9)
    assert cli.config_from_args(parser.parse_args(["train-expert", *cli.cli_args(cfg)])) == cfg


def test_a_teachers_examples_are_not_trained_without_the_teacher(tiny, data_dir, tmp_path):
    model, tok = tiny
    saved = tmp_path / "taught.jsonl"
    ex = examples.Example("teacher", "teacher/harmful/question", "How can I do harmful thing 9?", tok("No.")["input_ids"],
                          loss="teacher")
    saved.write_text(json.dumps(ex.describe(tok)) + "\n")
    with pytest.raises(ValueError, match="pass --distill-from"):
        trainer.train_expert(small_config(data_dir, tmp_path / "e", examples=str(saved)), model=model, tokenizer=tok,
                             log=lambda s: None)


@pytest.mark.parametrize("argv, words", [
    (["--threads", "-1"], ["--threads", ">= 1"]),  # was a raw RuntimeError traceback from torch
    (["--threads", "0"], ["--threads", ">= 1"]),  # was silently ignored
    (["--lr", "inf"], ["--lr", "finite"]),  # was accepted: a whole run towards NaN weights
    (["--lora-alpha", "0"], ["--lora-alpha", "> 0"]),  # was accepted: an adapter that changes nothing
    (["--distill-from", "/nope"], ["--distill-from", "/nope", "does not exist"]),  # failed after the data step
    (["--examples", "/nope.jsonl"], ["--examples", "/nope.jsonl", "not a file"]),  # failed after loading the model
    (["--out", "README"], ["--out", "is a file"]),  # failed when saving, after the whole training
])
def test_cli_refuses_bad_arguments_before_any_work(argv, words, tmp_path, capsys):
    from ngsd import cli as top

    (tmp_path / "README").write_text("not a folder")
    argv = [str(tmp_path / a) if a == "README" else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "expert")]
    # a missing data folder as well: a check that does not fire ends at once, never in a training run
    assert top.main(["train-expert", *argv, "--data-dir", str(tmp_path / "no-data")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ngsd train-expert: error: "), err
    for word in words:
        assert word in err, (word, err)


def test_unknown_lora_targets_and_too_many_top_layers_fail_before_the_data_step(tiny, tmp_path):
    model, tok = tiny
    missing_data = tmp_path / "no-data"  # never read: the checks come first
    missing_data.mkdir()
    with pytest.raises(ValueError, match="no module named foo_proj"):
        trainer.train_expert(small_config(missing_data, tmp_path / "e", targets="foo_proj,q_proj"), model=model,
                             tokenizer=tok, log=lambda s: None)
    with pytest.raises(ValueError, match="--top-layers 3 exceeds the model's 2 decoder layers"):
        trainer.train_expert(small_config(missing_data, tmp_path / "e", top_layers=3), model=model, tokenizer=tok,
                             log=lambda s: None)
    trainer.check_lora_targets(model, small_config(missing_data, tmp_path / "e", targets="self_attn.q_proj"))


def test_broad_epoch_picking_on_saved_examples_needs_the_split_they_were_built_on(tiny, data_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    """--recipe broad --examples FILE picked the epoch on the split of this run's --seed/--validation-share, whatever
    split built the file: for a file of --seed 3 and a run of --seed 0, 33 of the 48 validation requests came from
    units the file trains on. Now the split must match the one the report beside the file records."""
    model, tok = tiny

    class TrainingStarted(Exception):
        pass

    def no_training(*args, **kwargs):
        raise TrainingStarted

    monkeypatch.setattr(trainer, "train_lora", no_training)
    built = tmp_path / "built"
    built.mkdir()
    saved = built / trainer.EXAMPLES_FILE
    saved.write_text(json.dumps({"kind": "benign", "source": "everyday", "loss": "kl", "prompt": "How do I bake bread?",
                                 "prefix_ids": [], "response_ids": [5, 6, 7], "complete": False}) + "\n")

    def run(report_config, **changes):
        if report_config is not None:
            (built / trainer.REPORT_FILE).write_text(json.dumps({"config": report_config}))
        cfg = small_config(data_dir, tmp_path / "e", recipe="broad", examples=str(saved), **changes)
        trainer.train_expert(cfg, model=fresh_copy(model), tokenizer=tok, log=lambda s: None)

    broad_seed_3 = {"recipe": "broad", "seed": 3, "validation_share": 0.15, "examples": None}
    with pytest.raises(ValueError, match="built by --recipe broad on the split of --seed 3 --validation-share 0.15"):
        run(broad_seed_3, seed=0)
    for accepted in (dict(seed=3), dict(seed=0, validation_share=0.0)):  # the same split, or no pick
        with pytest.raises(TrainingStarted):
            run(broad_seed_3, **accepted)
    with pytest.raises(TrainingStarted):  # seed-recipe examples are built on no split
        run({"recipe": "seed", "seed": 7, "validation_share": 0.15, "examples": None})
    origin = tmp_path / "origin"  # the file is a copy another run reused: the split is the one that built the first
    origin.mkdir()
    (origin / trainer.EXAMPLES_FILE).write_text(saved.read_text())
    (origin / trainer.REPORT_FILE).write_text(json.dumps({"config": broad_seed_3}))
    reused = {"recipe": "seed", "seed": 0, "validation_share": 0.15, "examples": str(origin / trainer.EXAMPLES_FILE)}
    with pytest.raises(ValueError, match="holds the examples of .*origin.* on the split of --seed 3"):
        run(reused, seed=0)
    (built / trainer.REPORT_FILE).unlink()
    with pytest.raises(ValueError, match="does not say which split built its examples"):
        run(None)
    assert cli.main(["--recipe", "broad", "--examples", str(saved), "--out", str(tmp_path / "cli")]) == 2
    assert "--validation-share 0 to keep the last epoch" in capsys.readouterr().err


def test_a_file_that_is_not_training_examples_is_named(tmp_path):
    bad = tmp_path / "notes.jsonl"
    bad.write_text('{"kind": "refusal"}\n')
    with pytest.raises(ValueError, match="notes.jsonl: line 1 is not a training example"):
        examples.load_examples(bad)


def test_data_texts_are_saved_by_name_and_read_back_exactly(tiny, data_dir, tmp_path):
    model, tok = tiny
    refusal = "I'm sorry, but I cannot help with that."
    prefix = tok("Sure, here is bad act 135", add_special_tokens=False)["input_ids"][:3]
    built = [
        examples.Example("refusal", "vicuna", "How can I do harmful thing 1?", examples.cap_response(tok, refusal, 99)[0]),
        examples.Example("recovery", "advbench-target", "Explain how to do bad act 135",
                         examples.cap_response(tok, refusal, 99, prefix)[0], prefix_ids=prefix),
        examples.Example("recovery", "base-start", "How can I do harmful thing 2?",
                         examples.cap_response(tok, refusal, 99, [5, 6])[0], prefix_ids=[5, 6]),
        examples.Example("benign", "base-greedy", "A request of my own", [5, 6, 7], loss="kl", complete=False),
    ]
    examples.name_data_texts(built, tok, data_dir)
    # a Vicuna refusal is named where it answers the example's own prompt (the recipe's only use of them)
    assert [sorted(ex.refs) for ex in built] == [["prompt", "response"], ["prefix", "prompt"], ["prompt", "response"], []]
    saved = tmp_path / "saved.jsonl"
    saved.write_text("".join(json.dumps(ex.describe(tok)) + "\n" for ex in built))
    text = saved.read_text()
    assert "harmful thing" not in text and "bad act" not in text and text.count("cannot help") == 1  # the 2nd row's
    assert "A request of my own" in text  # the project's own texts stay as they are
    assert examples.load_examples(saved, data_dir, tok) == built  # prompts, token ids, flags

    with pytest.raises(ValueError, match="line 1 holds data texts by ref: reading it needs the tokenizer"):
        examples.load_examples(saved, data_dir)
    other = data_dir.parent / "other_data"
    other.mkdir()
    for name in ("seed_reject.json", "advbench_harmful_behaviors.json"):
        (other / name).write_text((data_dir / name).read_text())
    (other / "expert_sft_vicuna.json").write_text((data_dir / "expert_sft_vicuna.json").read_text()
                                                  .replace("I'm sorry, but", "Sorry, but"))
    with pytest.raises(ValueError, match="line 1: expert_sft/1/answer gives other token ids than the examples were "
                                         "trained on \\(another data version, or another tokenizer\\)"):
        examples.load_examples(saved, other, tok)
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(text.replace('"advbench/135"', '"advbench/999"'))
    with pytest.raises(ValueError, match="line 2 names the data text 'advbench/999', which the data folder does not hold"):
        examples.load_examples(renamed, data_dir, tok)
    from ngsd.data import DataNotFoundError

    with pytest.raises(DataNotFoundError):
        examples.load_examples(saved, tmp_path / "absent", tok)


def test_examples_on_evaluation_prompts_are_dropped_and_reported(tiny, data_dir, tmp_path):
    """--examples once trained on any text it held, evaluation prompts included (AdvBench id 0 here)."""
    model, tok = tiny
    saved = tmp_path / "mixed.jsonl"
    rows = [examples.Example("refusal", "t", prompt, tok("I cannot.")["input_ids"])
            for prompt in ("Explain how to do bad act 0", "Explain how to do bad act 135")]
    saved.write_text("".join(json.dumps(ex.describe(tok)) + "\n" for ex in rows))
    said = []
    out = trainer.train_expert(small_config(data_dir, tmp_path / "e", examples=str(saved)), model=model,
                               tokenizer=tok, log=said.append)
    data = json.loads((out / "training_report.json").read_text())["data"]
    assert data["dropped_evaluation_prompts"] == {"advbench<130": 1} and data["advbench_train_ids"] == [135]
    # this folder holds the training files only: the other suites could not be checked, which was not said
    assert "harmbench" in data["evaluation_suites_not_checked"] and "alpaca_eval" in data["evaluation_suites_not_checked"]
    assert any(line.startswith("warning: the data folder lacks") for line in said)


def test_examples_of_another_tokenizer_and_a_checkpoint_of_other_examples_are_not_used(tiny, tmp_path):
    """Ids past the vocabulary ended in a bare IndexError; a leftover checkpoint of other examples (same count and
    settings) was resumed, its weights kept."""
    model, tok = tiny
    cfg = config.TrainExpertConfig(r=4, lora_alpha=8, epochs=2, seed=0)
    foreign = [examples.Example("refusal", "t", "Bad?", [len(tok) + 5])]
    with pytest.raises(ValueError, match="tokenized for another model"):
        trainer.train_lora(trainer.make_lora_model(model, cfg), tok, foreign, cfg, log=lambda s: None)

    def run(word, log):
        exs = [examples.Example("refusal", "t", f"{word} {i}?", tok("I cannot.")["input_ids"]) for i in range(4)]
        torch.manual_seed(0)
        return trainer.train_lora(trainer.make_lora_model(LlamaForCausalLM(model.config), cfg), tok, exs, cfg,
                                  log=log, checkpoint=ckpt, checkpoint_every=2)

    ckpt = tmp_path / trainer.CHECKPOINT_FILE

    def stop_after_first_epoch(msg):
        if msg.startswith("epoch 1/"):
            raise _Stop

    with pytest.raises(_Stop):
        run("Bad thing", stop_after_first_epoch)
    assert ckpt.is_file()
    assert run("Other request", lambda s: None).get("resumed_from_step", 0) == 0


@pytest.mark.filterwarnings("ignore:You are trying to modify a model with PEFT:UserWarning",
                            "ignore:Already found a `peft_config`:UserWarning")  # peft's, on the resumed run's rewrap
def test_a_run_that_stops_leaves_an_adapter_folder_with_the_examples_it_was_trained_on(tiny, data_dir, tmp_path):
    """A run into an existing adapter folder wrote its examples there before training: stopped (or failed), it left
    the old adapter and report beside the new examples (which train-nest reads by default for the shipped one)."""
    model, tok = tiny
    out = tmp_path / "expert"
    trainer.train_expert(small_config(data_dir, out), model=model, tokenizer=tok, log=lambda s: None)
    trained_on = (out / trainer.EXAMPLES_FILE).read_text()

    def stop_in_training(message):
        if message.startswith("epoch 1/"):
            raise _Stop

    with pytest.raises(_Stop):
        trainer.train_expert(small_config(data_dir, out, seed=3, advbench_prompts=2), model=model, tokenizer=tok,
                             log=stop_in_training)
    assert (out / trainer.EXAMPLES_FILE).read_text() == trained_on
    pending = (out / trainer.PENDING_EXAMPLES_FILE).read_text()  # the stopped run's data, for --examples
    assert pending and pending != trained_on


def test_loss_options_a_run_would_ignore_are_refused():
    """--benign-loss with --examples (the file's rows keep their own loss) and --kl-weight with --benign-loss ce
    (no KL example is built) were accepted, ignored, and recorded in the report as if applied."""
    with pytest.raises(ValueError, match="benign_loss shapes the benign examples"):
        config.TrainExpertConfig(examples="x.jsonl", benign_loss="ce")
    with pytest.raises(ValueError, match="benign_loss='ce' builds none"):
        config.TrainExpertConfig(benign_loss="ce", kl_weight=0.25)


def test_nest_refuses_examples_of_another_tokenizer_before_selecting_neurons(tiny, data_dir, tmp_path):
    """train-nest ended in a bare IndexError traceback, after the neuron selection had run."""
    from ngsd.nest.config import NestConfig
    from ngsd.nest.training import training_examples

    model, tok = tiny
    saved = tmp_path / "foreign.jsonl"
    row = {"kind": "refusal", "source": "t", "prompt": "Bad?", "response_ids": [len(tok) + 5], "prefix_ids": [],
           "loss": "ce", "complete": True}
    saved.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="tokenized for another model"):
        training_examples(NestConfig(examples=str(saved)), model, tok, data_dir, log=lambda s: None)


@pytest.mark.parametrize("argv", [["--model", "HuggingFaceTB/SmolLM2-360M-Instruct"], ["--top-layers", "2"]])
def test_without_out_only_the_default_full_depth_run_writes_the_shipped_folder(argv, capsys):
    """Another model's adapter (or a top-layers one) once replaced the shipped SmolLM2 expert inside the package."""
    from ngsd import cli as top

    assert top.main(["train-expert", *argv]) == 2
    assert "--out: required" in capsys.readouterr().err


def test_a_teacher_that_does_not_fit_the_base_is_refused_before_the_data_step(tiny, tmp_path):
    """An adapter of another base (peft's RuntimeError, a traceback) or a model of another vocabulary was found only
    after the data step, where the teacher was loaded; now it is loaded right after the base, with guarded
    decoding's own messages (`ngsd generate --expert` gives the same)."""
    from tests.conftest import tiny_lora_expert, tiny_model

    model, tok = LlamaForCausalLM(tiny[0].config).eval(), tiny[1]  # the module's model may hold an earlier test's LoRA
    missing_data = tmp_path / "no-data"  # never read: the teacher is checked first
    missing_data.mkdir()
    other_base = tiny_lora_expert(tiny_model("llama", hidden_size=48), tmp_path / "other_base_lora")
    with pytest.raises(ValueError, match=r"--distill-from .*other_base_lora: not a usable expert \(LoRA adapter .* "
                                         r"does not fit .*vs layer"):
        trainer.train_expert(small_config(missing_data, tmp_path / "e", distill_from=str(other_base)),
                             model=model, tokenizer=tok, log=lambda s: None)
    assert not any(m._forward_hooks for m in model.modules())  # the fit check left the base as it was
    other_vocab = tiny_model("llama", vocab_size=96)  # the tokenizer has more tokens than its head
    other_vocab.save_pretrained(tmp_path / "other_vocab")
    tok.save_pretrained(tmp_path / "other_vocab")
    with pytest.raises(ValueError, match="--distill-from .*other_vocab: not a usable expert .*vocabulary mismatch"):
        trainer.train_expert(small_config(missing_data, tmp_path / "e", distill_from=str(tmp_path / "other_vocab")),
                             model=model, tokenizer=tok, log=lambda s: None)


def test_module_entry_point_is_ngsd_train_expert(tmp_path, capsys):
    """`python -m ngsd.experts.training` used a plain parser without the runner: a user error was a traceback (exit
    1) and option prefixes were taken (`--epo 0` for --epochs)."""
    out = str(tmp_path / "expert")
    assert cli.main(["--out", out, "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ngsd train-expert: error: ") and err.count("\n") == 1, err
    assert "--threads" in err and ">= 1" in err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--out", out, "--epo", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --epo 0" in err and "--epochs" in err and err.count("\n") == 1, err
    main_file = Path(cli.__file__).with_name("__main__.py").read_text()
    assert "from .cli import main" in main_file and "sys.exit(main())" in main_file
