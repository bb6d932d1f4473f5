"""`ngsd train-nest`: the arguments and `run(args)`. Light at import (no torch)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from .config import NestConfig

DESCRIPTION = ("Train a NeST safety update (neuron-selective safety tuning, spec section 6): select FFN neurons "
               "that separate harmful from benign prompts, cluster them, train one shared update per cluster, fold it in.")

_FLAGS = {"model": "--model", "data_dir": "--data-dir", "out": "--out", "delta_out": "--delta-out",
          "probe_prompts": "--probe-prompts", "z_threshold": "--z-threshold", "max_neurons": "--max-neurons",
          "top_layers": "--top-layers",
          "cluster_scope": "--cluster-scope", "k_min": "--k-min", "k_max": "--k-max", "epochs": "--epochs", "lr": "--lr", "max_examples": "--max-examples",
          "examples": "--examples", "threads": "--threads", "train_batch_size": "--batch-size"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = NestConfig()
    parser.add_argument("--model", default=None, help="base model: 'smollm2' (default), a local folder or a hub id")
    parser.add_argument("--data-dir", default=None, help="benchmark data folder (default: $NGSD_DATA_DIR or <repo>/../shared/data)")
    parser.add_argument("--out", default=None, help="also save the folded model here (a normal HF checkpoint)")
    parser.add_argument("--delta-out", default=None,
                        help="folder for the delta and its report (default: the shipped folder for the default model)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of prompt sampling, k-means and example order")
    parser.add_argument("--probe-prompts", type=int, default=d.probe_prompts, help="harmful and benign prompts each for selection")
    parser.add_argument("--z-threshold", type=float, default=d.z_threshold, help="keep neurons whose |probe weight| z-score reaches this")
    parser.add_argument("--max-neurons", type=int, default=d.max_neurons, help="keep at most this many neurons (highest z)")
    parser.add_argument("--top-layers", type=int, default=d.top_layers,
                        help="select neurons in the top n decoder layers only: guarded decoding then runs the layers "
                             "below once for base and expert rows (a shared trunk)")
    parser.add_argument("--cluster-scope", default=d.cluster_scope, choices=("layer", "global"),
                        help="k-means within each decoder layer, or over all selected neurons at once")
    parser.add_argument("--k-min", type=int, default=d.k_min, help="fewest clusters tried")
    parser.add_argument("--k-max", type=int, default=d.k_max, help="most clusters tried (k by silhouette)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training examples")
    parser.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=d.train_batch_size, help="training examples per step")
    parser.add_argument("--max-examples", type=int, default=d.max_examples, help="train on a seeded sample of this many examples")
    parser.add_argument("--examples", default=None, help="a training_examples.jsonl of the expert recipe (default: the shipped expert's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")


def config_from_args(args: argparse.Namespace) -> NestConfig:
    from .shipped import shipped_nest_path
    from ..loading import is_default_model

    delta_out = args.delta_out
    if delta_out is None and is_default_model(args.model) and args.out is None and args.top_layers is None:
        delta_out = str(shipped_nest_path())  # the shipped delta is full depth: a top-layers run never overwrites it
    return NestConfig(model=args.model, data_dir=args.data_dir, out=args.out, delta_out=delta_out, seed=args.seed,
                      probe_prompts=args.probe_prompts, z_threshold=args.z_threshold, max_neurons=args.max_neurons,
                      top_layers=args.top_layers, cluster_scope=args.cluster_scope, k_min=args.k_min, k_max=args.k_max,
                      epochs=args.epochs, lr=args.lr, train_batch_size=args.batch_size,
                      max_examples=args.max_examples, examples=args.examples, threads=args.threads)


def cli_args(cfg: NestConfig) -> list[str]:
    """The options that reproduce `cfg` (those that differ from the defaults)."""
    d = NestConfig()
    args = ["--seed", str(cfg.seed)]
    for name, flag in _FLAGS.items():
        if getattr(cfg, name) != getattr(d, name):
            args += [flag, str(getattr(cfg, name))]
    return args


def run(args: argparse.Namespace) -> int:
    from ..cli import UsageError, check_data_dir, check_model, check_output_folder, check_threads
    from .training import train_nest

    if args.model is not None:
        check_model(args.model)
    check_threads(args.threads)
    if args.examples is not None and not Path(args.examples).expanduser().is_file():
        raise UsageError(f"--examples: {args.examples!r} is not a file; pass a training_examples.jsonl of the expert "
                         "recipe (an expert's --out folder holds one)")
    if args.examples is not None:
        from ..experts.training.examples import holds_no_examples, no_examples_message

        if holds_no_examples(Path(args.examples).expanduser()):  # before the model loads
            raise UsageError(no_examples_message(args.examples))
    check_output_folder("--out", args.out, model=args.model)
    check_output_folder("--delta-out", args.delta_out, model=args.model)
    try:
        cfg = config_from_args(args)
    except ValueError as error:
        raise UsageError(str(error)) from error
    if cfg.out is None and cfg.delta_out is None:
        raise UsageError("give --out (folded checkpoint) and/or --delta-out (delta file): only a full-depth run on the "
                         "default model writes the shipped delta by default")
    check_data_dir(args.data_dir)  # the clustering and the updates read the training splits (it failed after the load)
    train_nest(cfg, command="ngsd train-nest " + " ".join(shlex.quote(a) for a in cli_args(cfg)))
    return 0


def run_to_lora(args: argparse.Namespace) -> int:
    from ..cli import UsageError, check_output_folder
    from .as_lora import recorded_base_model, save_peft_folder
    from .shipped import is_nest_delta, shipped_nest_path

    if not args.out.strip():
        raise UsageError("--out is empty: give the folder to write the adapter into")
    check_output_folder("--out", args.out, " for the adapter", model=args.base, model_flag="--base")
    from ..experts.shipped import check_keyword_not_shadowing

    try:
        check_keyword_not_shadowing(args.delta, "DELTA")
    except ValueError as error:
        raise UsageError(str(error)) from error
    from .update import DELTA_FILE

    delta = shipped_nest_path() if args.delta == "nest" else args.delta
    # a train-nest --out checkpoint holds its delta beside the folded weights: the delta is what converts
    if not (is_nest_delta(delta) or (Path(delta) / DELTA_FILE).is_file()):
        raise UsageError(f"{args.delta!r} holds no NeST delta ({DELTA_FILE}); pass a folder written by "
                         "`ngsd train-nest --delta-out` or --out, or 'nest' for the shipped delta")
    base = args.base if args.base is not None else recorded_base_model(delta)
    if base is None:  # adapter_config.json would say base_model_name_or_path: null, which peft and vLLM cannot load
        raise UsageError(f"{args.delta!r} does not record the base model its delta was trained on (no training "
                         "report beside it); pass --base with that model's hub id or path, for adapter_config.json")
    folder = save_peft_folder(delta, args.out, base_model_name_or_path=base)
    print(f"wrote a peft LoRA adapter (exact, scale 1) to {folder}: use it as --expert {folder}, in peft or in vLLM")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the `train-nest` and `nest-to-lora` subcommands to the `ngsd` command line."""
    parser = subparsers.add_parser("train-nest", help="train a NeST safety update (neuron-selective, folded into the weights)",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)
    to_lora = subparsers.add_parser(
        "nest-to-lora", help="write a NeST delta as an exact peft LoRA adapter (one forward beside the base, vLLM)",
        description="A NeST delta is a LoRA of rank = clusters per layer with scale 1 (ngsd/nest/as_lora.py). "
                    "The adapter runs beside the base in one batched forward instead of a folded copy of the base.")
    to_lora.add_argument("delta", help="a NeST delta folder, or 'nest' for the shipped one")
    to_lora.add_argument("--out", required=True, help="the adapter folder to write")
    to_lora.add_argument("--base", default=None,
                         help="base_model_name_or_path to record in adapter_config.json (default: the base model the "
                         "delta's train-nest run recorded; the default model's hub id for the shipped delta)")
    to_lora.set_defaults(func=run_to_lora)
