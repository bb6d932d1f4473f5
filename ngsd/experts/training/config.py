"""`TrainExpertConfig`: everything that shapes one `train-expert` run. Imports no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

TARGET_PRESETS = {
    "attention+mlp": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qv": ("q_proj", "v_proj"),
}
REFUSAL_SOURCES = ("self+vicuna", "self", "vicuna")
BENIGN_LOSSES = ("kl", "ce")
SAVE_DTYPES = ("float16", "bfloat16", "float32")
# "broad": issue 15 (broad_examples.py); "seed": the v4 recipe (examples.py); "seed+broad": both sets
# together (the broad set without its everyday requests, which the seed set holds already).
RECIPES = ("broad", "seed", "seed+broad")


@dataclass(frozen=True)
class TrainExpertConfig:
    """Everything that shapes one `train-expert` run (recorded in training_report.json)."""

    model: str | None = None
    data_dir: str | None = None
    out: str | None = None
    seed: int = 0
    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 1
    targets: str = "attention+mlp"
    r: int = 16
    lora_alpha: int = 64
    dropout: float = 0.1
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    refusals_per_prompt: int = 2
    max_trials: int = 2
    refusal_source: str = "self+vicuna"  # "self+vicuna" (self first, Vicuna fills gaps), "self", "vicuna"
    refusal_max_new_tokens: int = 48
    temperature: float = 0.8
    top_p: float = 0.9
    advbench_prompts: int = 48
    prefix_lengths: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    recovery_per_prompt: int = 1
    benign_max_new_tokens: int = 48
    # AlpacaEval rows with an even id (a training split) in id order, answered as the base answers;
    # the rest of the even ids stay apart for checking that the expert starts where the base starts.
    alpaca_benign_prompts: int = 0
    # Keep only the first n tokens of those answers (None: all `benign_max_new_tokens`). 1 puts the whole
    # KL weight of such an example on the answer's first token, which the routing check reads.
    alpaca_benign_tokens: int | None = None
    max_response_tokens: int = 64
    benign_loss: str = "kl"
    # Weight of the KL examples' loss (benign answers and look-alikes, kept at the base) against the CE
    # examples' (refusals, recoveries); 1: the shipped recipe. Below 1 they pull the expert back towards
    # the base less hard than the refusals pull it away, which stop 35's v4d suggests matters.
    kl_weight: float = 1.0
    max_length: int = 384
    save_dtype: str = "float16"
    evaluate: bool = True
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 25
    threads: int | None = None
    examples: str | None = None  # reuse a training_examples.jsonl instead of building the data
    top_layers: int | None = None  # LoRA on the top n decoder layers only (a shared-trunk expert); None: all
    recipe: str = "seed"  # the shipped expert's; "broad" (issue 15) is opt-in until it beats it (reports/expert)
    # The broad recipe (broad_examples.py): how many examples of each kind, and the validation split.
    harmful_requests: int = 200
    recovery_examples: int = 180
    recovery_lengths: tuple[int, ...] = (1, 2, 3, 5, 8, 12, 16, 20)
    lookalike_examples: int = 140
    everyday_examples: int = 80
    forms_per_unit: int = 2
    validation_share: float = 0.15
    validation_prompts: int = 24
    validate_at: tuple[float, ...] = (0.5, 1.0)  # fractions of the training whose weights validation compares
    # Distillation (distill.py): a teacher expert (what `expert=` takes); every answer position is then trained towards
    # its distribution, and it answers `teacher_prompts` more training-split requests.
    distill_from: str | None = None
    teacher_prompts: int = 0

    def __post_init__(self) -> None:
        if self.refusal_source not in REFUSAL_SOURCES:
            raise ValueError(f"refusal_source must be one of {REFUSAL_SOURCES}, got {self.refusal_source!r}")
        if self.benign_loss not in BENIGN_LOSSES:
            raise ValueError(f"benign_loss must be one of {BENIGN_LOSSES}, got {self.benign_loss!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {SAVE_DTYPES}, got {self.save_dtype!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        target_modules(self.targets)  # validates
        if self.alpaca_benign_tokens is not None and self.alpaca_benign_tokens < 1:
            raise ValueError(f"alpaca_benign_tokens must be >= 1 (or None for whole answers), got {self.alpaca_benign_tokens}")
        if self.top_layers is not None and self.top_layers < 1:
            raise ValueError(f"top_layers must be >= 1 (or None for every layer), got {self.top_layers}")
        for name in ("epochs", "batch_size", "r", "max_trials", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("refusals_per_prompt", "advbench_prompts", "recovery_per_prompt", "harmful_requests",
                     "recovery_examples", "lookalike_examples", "everyday_examples", "validation_prompts",
                     "alpaca_benign_prompts", "teacher_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.teacher_prompts and not self.distill_from:
            raise ValueError("teacher_prompts needs a teacher: pass distill_from (--distill-from EXPERT_DIR) as well")
        for name, flag in (("lr", "--lr"), ("lora_alpha", "--lora-alpha")):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} ({flag}) must be a finite number > 0, got {getattr(self, name)}")
        if (isinstance(self.kl_weight, bool) or not isinstance(self.kl_weight, (int, float))
                or not math.isfinite(self.kl_weight) or self.kl_weight <= 0):
            raise ValueError(f"kl_weight must be a finite number > 0, got {self.kl_weight!r}")
        if self.examples and self.benign_loss != "kl":
            raise ValueError("benign_loss shapes the benign examples the recipe builds; examples trains on the file's "
                             "own (each row's loss): drop one of them")
        if self.kl_weight != 1.0 and self.benign_loss == "ce" and not self.examples:
            raise ValueError("kl_weight weighs the KL examples, and benign_loss='ce' builds none: drop one of them")
        if self.kl_weight != 1.0 and self.distill_from:
            raise ValueError("kl_weight weighs KL examples against the base; with distill_from every answer position "
                             "is trained towards the teacher instead: leave kl_weight at 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if any(k < 1 for k in self.prefix_lengths):
            raise ValueError(f"prefix_lengths must be >= 1, got {self.prefix_lengths}")
        if not self.recovery_lengths or any(k < 1 for k in self.recovery_lengths):
            raise ValueError(f"recovery_lengths must be non-empty and >= 1, got {self.recovery_lengths}")
        if self.forms_per_unit < 1:
            raise ValueError(f"forms_per_unit must be >= 1, got {self.forms_per_unit}")
        if not self.validate_at or any(not 0.0 < f <= 1.0 for f in self.validate_at):
            raise ValueError(f"validate_at must be non-empty fractions in (0, 1], got {self.validate_at}")
        if not 0.0 <= self.validation_share < 1.0:
            raise ValueError(f"validation_share must be in [0, 1), got {self.validation_share}")


def target_modules(targets: str) -> list[str]:
    """Module names for a preset ("attention+mlp", "qv") or a comma-separated list of names."""
    if targets in TARGET_PRESETS:
        return list(TARGET_PRESETS[targets])
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ValueError(f"targets must be one of {sorted(TARGET_PRESETS)} or a comma-separated list, got {targets!r}")
    return names


def top_layer_indices(num_layers: int, top_layers: int | None) -> list[int] | None:
    """The top `top_layers` of `num_layers` decoder layers (what `--top-layers n` adapts); None: every layer."""
    if top_layers is None:
        return None
    if top_layers > num_layers:
        raise ValueError(f"--top-layers {top_layers} exceeds the model's {num_layers} decoder layers; "
                         f"pass --top-layers between 1 and {num_layers}")
    return list(range(num_layers - top_layers, num_layers))
