"""`ngsd train-nest`: the arguments and `run(args)`. Light at import (no torch)."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from .config import NestConfig

DESCRIPTION = ("Train a NeST safety update (neuron-selective safety tuning, spec section 6): select FFN neurons "
               "that separate harmful from benign prompts, cluster them, train one shared update per cluster, fold it in.")

_FLAGS = {"model": "--model", "data_dir": "--data-dir", "out": "--out", "delta_out": "--delta-out",
          "probe_prompts": "--probe-prompts", "z_threshold": "--z-threshold", "max_neurons": "--max-neurons",
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
    if delta_out is None and is_default_model(args.model) and args.out is None:
        delta_out = str(shipped_nest_path())
    return NestConfig(model=args.model, data_dir=args.data_dir, out=args.out, delta_out=delta_out, seed=args.seed,
                      probe_prompts=args.probe_prompts, z_threshold=args.z_threshold, max_neurons=args.max_neurons,
                      cluster_scope=args.cluster_scope, k_min=args.k_min, k_max=args.k_max, epochs=args.epochs, lr=args.lr, train_batch_size=args.batch_size,
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
    from ..cli import UsageError, check_model
    from .training import train_nest

    if args.model is not None:
        check_model(args.model)
    try:
        cfg = config_from_args(args)
    except ValueError as error:
        raise UsageError(str(error)) from error
    if cfg.out is None and cfg.delta_out is None:
        raise UsageError("give --out (folded checkpoint) and/or --delta-out (delta file) for a model other than the default")
    train_nest(cfg, command="ngsd train-nest " + " ".join(shlex.quote(a) for a in cli_args(cfg)))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the `train-nest` subcommand to the `ngsd` command line."""
    parser = subparsers.add_parser("train-nest", help="train a NeST safety update (neuron-selective, folded into the weights)",
                                   description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(func=run)
