"""`ngsd train-expert` / `python -m ngsd.experts.training`: the arguments and `run(args)`.

Light at import (no torch, no transformers): the training modules are imported by `run` only, so
building the `ngsd` parser and `--help` stay fast.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any, Sequence

from ..shipped import EXPERT_NAME
from .config import BENIGN_LOSSES, RECIPES, REFUSAL_SOURCES, SAVE_DTYPES, TrainExpertConfig

DESCRIPTION = "Train the LoRA safety expert of the default model (SafeDecoding recipe + deep alignment, spec section 6)."

# Config field -> command-line flag, for the options `cli_args` writes back.
_FLAGS = {"model": "--model", "data_dir": "--data-dir", "out": "--out", "epochs": "--epochs", "lr": "--lr",
          "batch_size": "--batch-size", "targets": "--targets", "r": "--rank", "lora_alpha": "--lora-alpha",
          "dropout": "--dropout", "refusal_source": "--refusal-source", "refusals_per_prompt": "--refusals-per-prompt",
          "advbench_prompts": "--advbench-prompts", "recovery_per_prompt": "--recovery-per-prompt",
          "benign_loss": "--benign-loss", "kl_weight": "--kl-weight", "save_dtype": "--save-dtype",
          "threads": "--threads",
          "examples": "--examples", "top_layers": "--top-layers", "recipe": "--recipe",
          "harmful_requests": "--harmful-requests", "recovery_examples": "--recovery-examples",
          "lookalike_examples": "--lookalike-examples", "everyday_examples": "--everyday-examples",
          "validation_share": "--validation-share", "forms_per_unit": "--forms-per-unit",
          "alpaca_benign_prompts": "--alpaca-benign-prompts", "alpaca_benign_tokens": "--alpaca-benign-tokens",
          "distill_from": "--distill-from", "teacher_prompts": "--teacher-prompts"}


# the options of the data step (building the examples), which --examples replaces
DATA_OPTIONS = ("refusal_source", "refusals_per_prompt", "advbench_prompts", "recovery_per_prompt", "harmful_requests",
                "recovery_examples", "lookalike_examples", "everyday_examples", "forms_per_unit",
                "alpaca_benign_prompts", "alpaca_benign_tokens")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainExpertConfig()
    parser.add_argument("--model", default=None, help="base model: 'smollm2' (default), a local folder or a hub id")
    parser.add_argument("--data-dir", default=None, help="benchmark data folder (default: $NGSD_DATA_DIR or <repo>/../shared/data)")
    parser.add_argument("--out", default=None, help=f"adapter folder (default: the shipped {EXPERT_NAME})")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of sampling, data order and LoRA init")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training examples")
    parser.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="training examples per optimizer step")
    parser.add_argument("--targets", default=d.targets, help="'attention+mlp' (NGSD), 'qv' (SafeDecoding) or a comma-separated module list")
    parser.add_argument("--rank", type=int, default=d.r, help="LoRA rank r")
    parser.add_argument("--top-layers", type=int, default=d.top_layers,
                        help="adapt only the top n decoder layers: guarded decoding then runs the layers below once")
    parser.add_argument("--lora-alpha", type=int, default=d.lora_alpha,
                        help="LoRA scaling alpha (the update is scaled by alpha / r)")
    parser.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout")
    parser.add_argument("--recipe", default=d.recipe, choices=RECIPES,
                        help="'broad': harmful requests across the harm taxonomy in many surface forms, recovery "
                        "after the base's own openings, harmless look-alikes, epoch chosen on a validation split "
                        "(issue 15; use with --epochs 1); 'seed': the v4 recipe (seed prompts + AdvBench); "
                        "'seed+broad': both sets together (the broad set without its everyday requests)")
    parser.add_argument("--harmful-requests", type=int, default=d.harmful_requests,
                        help="broad recipe: harmful requests with a refusal example")
    parser.add_argument("--recovery-examples", type=int, default=d.recovery_examples,
                        help="broad recipe: recovery examples after a compliant opening of 1-20 tokens")
    parser.add_argument("--lookalike-examples", type=int, default=d.lookalike_examples,
                        help="broad recipe: harmless look-alike requests answered as the base answers")
    parser.add_argument("--everyday-examples", type=int, default=d.everyday_examples,
                        help="broad recipe: everyday harmless requests answered as the base answers")
    parser.add_argument("--forms-per-unit", type=int, default=d.forms_per_unit,
                        help="broad recipe: surface forms each harmful or harmless topic appears in (more forms: a "
                        "larger pool of requests and look-alikes to draw from; the held-apart topics stay the same)")
    parser.add_argument("--validation-share", type=float, default=d.validation_share,
                        help="broad recipe: share of topics held apart to choose the epoch (0: keep the last)")
    parser.add_argument("--refusal-source", default=d.refusal_source, choices=REFUSAL_SOURCES,
                        help="where the refusal answers come from: the model itself, SafeDecoding's Vicuna "
                        "refusals, or both")
    parser.add_argument("--refusals-per-prompt", type=int, default=d.refusals_per_prompt,
                        help="refusal examples per seed prompt")
    parser.add_argument("--advbench-prompts", type=int, default=d.advbench_prompts,
                        help="seed recipe: extra harmful prompts drawn from AdvBench ids >= 130 for refusal/recovery examples")
    parser.add_argument("--alpaca-benign-prompts", type=int, default=d.alpaca_benign_prompts,
                        help="seed recipe: the first N AlpacaEval even-id instructions (a training split) answered "
                        "as the base answers, under the benign loss; the remaining even ids stay held apart")
    parser.add_argument("--alpaca-benign-tokens", type=int, default=d.alpaca_benign_tokens,
                        help="keep only the first N tokens of those answers (1: the KL falls on the first token only)")
    parser.add_argument("--recovery-per-prompt", type=int, default=d.recovery_per_prompt,
                        help="recovery examples (compliant start, then a refusal) per harmful prompt")
    parser.add_argument("--benign-loss", default=d.benign_loss, choices=BENIGN_LOSSES,
                        help="loss on benign answers: kl (stay close to the base) or ce (the base's tokens)")
    parser.add_argument("--kl-weight", type=float, default=d.kl_weight,
                        help="weight of the KL (benign) examples' loss against the refusals' CE (1: the shipped recipe)")
    parser.add_argument("--save-dtype", default=d.save_dtype, choices=SAVE_DTYPES, help="dtype of the saved adapter")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation written into the report")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--distill-from", default=None,
                        help="a teacher expert, as guarded decoding's --expert takes it (an adapter folder, 'shipped', "
                        "'nest', a model folder): train every answer position towards its distribution, "
                        "KL(teacher || student), e.g. to move a full-depth expert into --top-layers n")
    parser.add_argument("--teacher-prompts", type=int, default=d.teacher_prompts,
                        help="with --distill-from: more training-split requests (2/3 harmful, 1/3 look-alikes), "
                        "answered by the teacher")
    parser.add_argument("--examples", default=None, help="retrain on a saved training_examples.jsonl instead of building the data")


def config_from_args(args: argparse.Namespace) -> TrainExpertConfig:
    return TrainExpertConfig(
        model=args.model, data_dir=args.data_dir, out=args.out, seed=args.seed, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, targets=args.targets, r=args.rank, lora_alpha=args.lora_alpha,
        dropout=args.dropout, refusal_source=args.refusal_source, refusals_per_prompt=args.refusals_per_prompt,
        advbench_prompts=args.advbench_prompts, recovery_per_prompt=args.recovery_per_prompt,
        benign_loss=args.benign_loss, kl_weight=args.kl_weight, save_dtype=args.save_dtype, evaluate=not args.no_eval,
        threads=args.threads,
        examples=args.examples, top_layers=args.top_layers, recipe=args.recipe,
        harmful_requests=args.harmful_requests, recovery_examples=args.recovery_examples,
        lookalike_examples=args.lookalike_examples, everyday_examples=args.everyday_examples,
        validation_share=args.validation_share, forms_per_unit=args.forms_per_unit,
        alpaca_benign_prompts=args.alpaca_benign_prompts,
        alpaca_benign_tokens=args.alpaca_benign_tokens,
        distill_from=args.distill_from, teacher_prompts=args.teacher_prompts,
    )


def cli_args(cfg: TrainExpertConfig) -> list[str]:
    """The command-line options that reproduce `cfg` (only those that differ from the defaults)."""
    d = TrainExpertConfig()
    args = ["--seed", str(cfg.seed)]
    for name, flag in _FLAGS.items():
        if getattr(cfg, name) != getattr(d, name):
            args += [flag, str(getattr(cfg, name))]
    if not cfg.evaluate:
        args.append("--no-eval")
    return args


def check_arguments(args: argparse.Namespace) -> None:
    """The checks that need no model, so a wrong value fails at once, not after minutes of data building."""
    from ...cli import UsageError, check_expert, check_model, check_output_folder, check_threads
    from ...loading import is_default_model

    check_threads(args.threads)
    import importlib.util

    if importlib.util.find_spec("peft") is None:  # the LoRA training itself; found only after the data was built
        raise UsageError("train-expert needs peft, which is not installed: pip install peft accelerate "
                         "(or, in the ngsd checkout, pip install -e '.[train]')")
    if args.model is not None:
        check_model(args.model)
    if args.distill_from is not None:
        try:
            check_expert(args.distill_from)
        except UsageError as error:
            raise UsageError(str(error).replace("--expert", "--distill-from", 1)) from error
    if args.examples is not None and not Path(args.examples).expanduser().is_file():
        raise UsageError(f"--examples: {args.examples!r} is not a file; pass the training_examples.jsonl an earlier "
                         "run wrote into its --out folder")
    if args.examples is not None:
        # they shape the data step, which --examples skips: accepted, they were recorded in the report and its
        # "reproduce" line as if they applied
        defaults, cfg = TrainExpertConfig(), config_from_args(args)
        ignored = [_FLAGS[name] for name in DATA_OPTIONS if getattr(cfg, name) != getattr(defaults, name)]
        if ignored:
            raise UsageError(f"{', '.join(ignored)}: these build the training data, and --examples reuses saved data "
                             "instead; drop them, or drop --examples to build the data with them")
        from .examples import holds_no_examples, no_examples_message

        if holds_no_examples(Path(args.examples).expanduser()):  # before the model loads
            raise UsageError(no_examples_message(args.examples))
        from .broad_examples import examples_split_mismatch

        mismatch = examples_split_mismatch(cfg)
        if mismatch is not None:
            raise UsageError(mismatch)
    check_output_folder("--out", args.out, " for the adapter", model=args.model)
    # the default folder is the shipped expert of the default model (full depth), as train-nest's rule for its delta
    if args.out is None and (not is_default_model(args.model) or args.top_layers is not None):
        raise UsageError("--out: required with another --model or with --top-layers (without it the adapter would "
                         "replace the shipped SmolLM2 expert inside the package); pass a folder for the adapter")


def run(args: argparse.Namespace) -> int:
    """Train with the parsed arguments; the report records the command that reproduces the run."""
    from .trainer import train_expert

    check_arguments(args)
    cfg = config_from_args(args)
    train_expert(cfg, command="ngsd train-expert " + " ".join(shlex.quote(a) for a in cli_args(cfg)))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the `train-expert` subcommand to the `ngsd` command line."""
    parser = subparsers.add_parser(
        "train-expert", help="train the LoRA safety expert (SafeDecoding recipe + deep alignment)",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ngsd.experts.training ARGS`: exactly `ngsd train-expert ARGS` (the same parser, with no prefix
    matching of options, and the same runner: a user error is one line and exit status 2, not a traceback)."""
    import sys

    from ...cli import main as ngsd_main

    return ngsd_main(["train-expert", *(sys.argv[1:] if argv is None else argv)])
