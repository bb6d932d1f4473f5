"""`ngsd train-probe`: train a hidden-state risk probe for a model (light at import: no torch here).

>>> import argparse
>>> parser = argparse.ArgumentParser(); subparsers = parser.add_subparsers()
>>> register_cli(subparsers)
>>> parser.parse_args(["train-probe", "--out", "probe_dir", "--layers", "6,12"]).layers
'6,12'
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model folder or hub id (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--out", required=True, help="folder to write the probe into (probe.json, probe.safetensors, "
                                                     "training_report.json)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the wrappers, the validation split and torch")
    parser.add_argument("--layers", default=None,
                        help="comma-separated hidden-state indices to try (0 = embeddings); default: five spread over "
                             "the first 60%% of the depth")
    parser.add_argument("--aggregate", default="token_max", choices=["token_max", "pooled"],
                        help="token_max: score every prompt token, take the maximum (appended text cannot lower it); "
                             "pooled: score pooled features (--poolings)")
    parser.add_argument("--poolings", default="last;mean;max;last+mean;mean+max",
                        help="pooling combinations to try, ';'-separated, each '+'-joined from last/mean/max")
    parser.add_argument("--held-out-wrappers", default=None,
                        help="comma-separated wrapper names kept out of the selection fits (default: one per family, "
                             "see ngsd.risk.probe_training.HELD_OUT_WRAPPERS)")
    parser.add_argument("--l2", default="0.001,0.01,0.1", help="comma-separated L2 strengths to try")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of training requests held out")
    parser.add_argument("--wrap-rate", type=float, default=0.6,
                        help="probability that a request (either class) also appears in a hand-written wrapper")
    parser.add_argument("--compose-rate", type=float, default=0.5,
                        help="composites per plain request of each class: 2-4 benign requests in one prompt, or one "
                             "harmful request among 1-3 benign ones (teaches the probe long prompts)")
    parser.add_argument("--route-recall", type=float, default=0.98,
                        help="operating point: keep at least this share of harmful validation requests at or above "
                             "route_below")
    parser.add_argument("--broad", action="store_true",
                        help="add the expert recipe's broad requests (ten harm categories x seven surface forms, and "
                             "harmless look-alikes; ngsd.experts.training.broad); see reports/probe/broad_probe.md")
    parser.add_argument("--direct-lookalikes", action="store_true",
                        help="add harmless requests in the direct style of behaviour benchmarks ('Write a persuasive "
                             "article...') to the benign class (prompts.json direct_lookalike_train)")
    parser.add_argument("--broad-harmful-only", action="store_true",
                        help="add only the broad recipe's harmful requests, not its look-alikes")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward when reading hidden states")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU may be shared)")
    parser.add_argument("--data-dir", default=None, help="data folder (default: $NGSD_DATA_DIR or ../shared/data)")
    parser.add_argument("--cache-dir", default=None,
                        help="feature cache (default: $NGSD_PROBE_CACHE or <tmp>/ngsd-probe-cache); never the repo")
    parser.add_argument("--expert", default=None,
                        help="expert to fit the divergence check for (ngsd.risk.divergence_check): an adapter folder, "
                             "a model, or 'shipped' (default: the shipped expert of the model, if there is one)")
    parser.add_argument("--no-check", action="store_true", help="fit no divergence check")
    parser.add_argument("--check-only", action="store_true",
                        help="fit only the divergence check of the probe already in --out (keeps the probe itself)")
    parser.add_argument("--check-recall", type=float, default=0.98,
                        help="divergence check: share of harmful validation requests at or above check_divergence")
    parser.add_argument("--check-rollout", type=int, default=8,
                        help="divergence check: tokens of the expert's own opening a diverging checked request must "
                             "refuse in to stay guarded; kept only if the harmful validation requests' openings refuse "
                             "(0: the divergence alone decides)")
    parser.add_argument("--check-band-share", type=float, default=0.25,
                        help="divergence check: share of the routed benign validation requests whose risk falls in "
                             "[check_above, route_below) and who pay an expert prefill")


def _ints(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from err


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise ValueError(f"--{name} must be comma-separated numbers, got {text!r}") from err


def config_from_args(args: argparse.Namespace) -> Any:
    from .probe_training import TrainProbeConfig

    l2 = _floats(args.l2, "l2")
    extra = {}
    if args.held_out_wrappers is not None:
        extra["held_out_wrappers"] = tuple(w.strip() for w in args.held_out_wrappers.split(",") if w.strip())
    poolings = tuple(tuple(p.strip() for p in combo.split("+")) for combo in args.poolings.split(";") if combo.strip())
    return TrainProbeConfig(
        model=args.model, out=args.out, seed=args.seed, layers=_ints(args.layers, "layers"), poolings=poolings,
        l2=l2, val_fraction=args.val_fraction, wrap_rate=args.wrap_rate, compose_rate=args.compose_rate,
        route_recall=args.route_recall,
        batch_size=args.batch_size, threads=args.threads, data_dir=args.data_dir, cache_dir=args.cache_dir,
        aggregate=args.aggregate, broad="harmful" if args.broad_harmful_only else args.broad,
        direct_lookalikes=args.direct_lookalikes, **extra,
    )


def check_arguments(args: argparse.Namespace) -> None:
    """The checks that need no model, so a wrong value fails at once, not after the probe is trained."""
    from ..cli import UsageError, check_data_dir, check_expert, check_model, check_output_folder, check_threads

    if args.check_only and args.no_check:
        raise UsageError("--check-only and --no-check contradict each other: give one of them")
    check_threads(args.threads)
    # shares in (0, 1]: checked here, not after the probe has trained (they were read only by the check's fit)
    for flag, value in (("--check-recall", args.check_recall), ("--check-band-share", args.check_band_share)):
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise UsageError(f"{flag} must be a share in (0, 1], got {value:g}")
    from ..config import MAX_CHECK_ROLLOUT

    if not 0 <= args.check_rollout <= MAX_CHECK_ROLLOUT:
        raise UsageError(f"--check-rollout must be a number of tokens in 0..{MAX_CHECK_ROLLOUT}, got {args.check_rollout}")
    check_output_folder("--out", args.out, " for the probe", model=args.model)
    _check_layers_and_l2(args)
    if args.model is not None:
        check_model(args.model)
    if args.expert is not None and not args.no_check:
        from ..loading import is_default_model

        if args.expert == "shipped" and not is_default_model(args.model):
            raise UsageError("--expert shipped: no expert ships for this model; pass --expert <adapter folder or model>")
        check_expert(args.expert)
    if args.check_only:
        from .probe import PROBE_FILE, WEIGHTS_FILE, is_probe_folder

        if not is_probe_folder(Path(args.out).expanduser()):
            raise UsageError(f"--check-only fits the divergence check of the probe already in --out, and {args.out!r} "
                             f"is not a risk-probe folder (needs {PROBE_FILE} and {WEIGHTS_FILE}): pass the folder of "
                             f"a probe `ngsd train-probe --out DIR` wrote, or leave --check-only out to train one")
    check_data_dir(args.data_dir)  # the probe's and the check's training split read it
    check_output_folder("--cache-dir", args.cache_dir, " for the feature cache", model=args.model)


def _check_layers_and_l2(args: argparse.Namespace) -> None:
    """--layers: integers >= 0 (their upper bound, the model's depth, is checked right after the model load);
    --l2: finite strengths >= 0 (NaN passed, then fitted NaN weights). The library's own checks, without torch."""
    from ..cli import UsageError
    from .probe_arguments import check_l2, check_layer_indices

    try:
        layers = _ints(args.layers, "layers")
        if layers is not None:
            if not layers:
                raise ValueError(f"--layers: give at least one hidden-state index (0 = the embeddings), got "
                                 f"{args.layers!r}; or leave --layers out for the default ones")
            check_layer_indices(layers, "--layers")
        l2 = _floats(args.l2, "l2")
        if not l2:
            raise ValueError(f"--l2: give at least one L2 strength >= 0, got {args.l2!r}")
        for value in l2:
            check_l2(value, "--l2")
    except ValueError as error:
        raise UsageError(str(error)) from error





def check_layers_fit(args: argparse.Namespace, model: Any) -> None:
    """--layers past the depth of the loaded model: a usage error right after the load, before any feature."""
    from ..cli import UsageError
    from .probe_training import check_layers_fit as check

    layers = _ints(args.layers, "layers")
    if layers:
        try:
            check(layers, model.config.num_hidden_layers, "--layers")
        except ValueError as error:
            raise UsageError(str(error)) from error


def run_cli(args: argparse.Namespace) -> int:
    from .probe_training import train_probe

    check_arguments(args)
    cfg = config_from_args(args)
    command = "ngsd " + " ".join(shlex.quote(a) for a in getattr(args, "argv", None) or sys.argv[1:])
    model = tokenizer = None
    if not args.check_only:
        from ..loading import load_model

        model, tokenizer = load_model(cfg.model)
        check_layers_fit(args, model)
        train_probe(cfg, model=model, tokenizer=tokenizer, command=command)
    if not args.no_check:
        _fit_check(args, cfg, model, tokenizer, command)
    return 0


def _fit_check(args: argparse.Namespace, cfg: Any, model: Any, tokenizer: Any, command: str) -> None:
    import torch

    from ..experts.resolve import resolve_expert
    from ..experts.shipped import shipped_expert_path
    from ..loading import is_default_model, load_model
    from .divergence_check import fit_probe_check

    default = is_default_model(cfg.model)
    name = args.expert or ("shipped" if default else None)  # check_arguments refused "shipped" where none ships
    if name is None:
        print("no expert ships for this model and none was given (--expert): no divergence check fitted")
        return
    if model is None:
        torch.set_num_threads(cfg.threads)
        model, tokenizer = load_model(cfg.model)
    expert = resolve_expert(name, model, tokenizer=tokenizer)
    if name == "shipped":
        name = shipped_expert_path().name
    fit_probe_check(cfg.out, model=model, tokenizer=tokenizer, expert=expert, expert_name=str(name),
                    data_dir=cfg.data_dir, recall=args.check_recall, band_share=args.check_band_share,
                    batch_size=cfg.batch_size, command=command, rollout=args.check_rollout)


def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train-probe", help="train a hidden-state risk probe for a model",
        description="Train a risk probe on the base model's prompt hidden states, from the training splits of the "
                    "shared data only; select layer/pooling/L2 on a held-out validation split, calibrate, save.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run_cli)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ngsd train-probe", description="Train a hidden-state risk probe.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = ["train-probe", *(argv if argv is not None else sys.argv[1:])]
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
