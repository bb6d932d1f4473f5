"""`ngsd eval`: run an evaluation configuration, write the report and print a summary table.

    ngsd eval --config demo                       # 3 methods x 3 small suites, a few minutes on a CPU
    ngsd eval --config advbench50                 # guarded vs unguarded on the 50 lowest-id AdvBench prompts
    ngsd eval --config smoke --out eval_runs/smoke
    ngsd eval --config full --out reports/eval
    ngsd eval --config my.json --methods off,ngsd,ngsd_a0.9 --limit 10 --expert path/to/adapter

Also runnable without the top-level CLI as `python -m ngsd.eval ...`. Light at import (no torch):
the harness is imported after the arguments are checked.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from ..cli import (
    CommandParser, UsageError, add_common_options, add_dtype_option, check_expert, check_model, check_probe, check_range,
    check_threads, run_command, wants_progress,
)
from .configs import CONFIG_DIR, config_names

THREADS_ENV = "NGSD_EVAL_THREADS"
EXAMPLE_METHODS = "off, ngsd, ngsd_prefill, ngsd_a0.9, safedecoding, expert"


def _command_line(argv: Sequence[str] | None) -> str:
    """The command as a user would retype it: `ngsd eval` plus the given arguments."""
    if argv is None:
        argv = sys.argv[1:]
        if "eval" in argv:
            argv = argv[argv.index("eval") + 1 :]
    return " ".join(["ngsd", "eval", *(shlex.quote(a) for a in argv)])


def _env_threads() -> int | None:
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"${THREADS_ENV} must be a positive integer, got {value!r}")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    named = ", ".join(config_names())
    parser.add_argument("--config", default="smoke",
                        help=f"a named configuration ({named}; the JSON files in ngsd/eval/configs) or the "
                        "path of a JSON file with the same fields")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the benchmark files (default: $NGSD_DATA_DIR, else <repo>/../shared/data)")
    parser.add_argument("--out", default=None, help="output folder (default: eval_runs/<config name>)")
    parser.add_argument("--model", default=None,
                        help="base model: checkpoint folder or hub id (default: the config's, else the offline "
                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--expert", default=None,
                        help="expert: 'shipped', a peft adapter folder, a model folder, or 'none' (default: the config's)")
    parser.add_argument("--probe", default=None,
                        help="risk probe folder (`ngsd train-probe`) for the methods that read one, e.g. one "
                        "whose divergence check was fitted for --expert (default: the config's, else the model's "
                        "shipped probe)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per generate call (default: the config's)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many prompts per suite")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated methods to compare, e.g. {EXAMPLE_METHODS} (default: the config's; "
                        "an unknown name is an error that lists the known ones)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override the config's token budget")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch CPU threads for the run (default: ${THREADS_ENV} if set, else the config's, else "
                        "torch's own choice; on a CPU shared with other jobs 1 thread is much faster than 2)")
    parser.add_argument("--cache", default=None, help="generation cache file (default: <out>/cache/generations.jsonl)")
    add_dtype_option(parser, default=None, help="load the model in this dtype (default: the config's, else float32); "
                     "answers are cached per dtype")
    add_common_options(parser)


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no model (UsageError naming the option)."""
    config = Path(args.config).expanduser()
    if not (CONFIG_DIR / f"{args.config}.json").is_file() and not config.is_file():
        if config.suffix.lower() == ".json" or len(config.parts) > 1:
            raise UsageError(f"--config: no such file {str(config)!r}; pass an existing JSON file or one of the "
                             f"named configurations {', '.join(config_names())}")
        raise UsageError(f"--config: no configuration named {args.config!r}; use one of "
                         f"{', '.join(config_names())} or the path of a JSON file")
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit),
                        ("--max-new-tokens", args.max_new_tokens)):
        check_range(flag, value, 1)
    check_threads(args.threads)
    if args.model is not None:
        check_model(args.model)
    if args.expert is not None and args.expert.lower() != "none":
        check_expert(args.expert)
    if args.probe is not None:
        check_probe(args.probe)
    from ..textplot import require_matplotlib

    try:  # before any answer is generated: the plots come last, after the whole run
        require_matplotlib("ngsd eval (its report's plots)")
    except ImportError as error:
        raise UsageError(str(error)) from error


def _check_config_values(args: argparse.Namespace, config: Any) -> None:
    """The --config file's model, expert and probe get the checks their flags get, before any answer is generated
    (a misspelled expert went to the hub; a missing probe folder failed after a whole method had run)."""
    checks = (("model", check_model), ("expert", check_expert), ("probe", check_probe))
    for name, check in checks:
        value = getattr(config, name, None)
        if getattr(args, name) is not None or value is None or (name == "expert" and str(value).lower() == "none"):
            continue  # given as a flag (checked already), or not set
        try:
            check(value)
        except UsageError as error:
            raise UsageError(f"--config {args.config}: its {name} {value!r}: {error}") from None


def _evaluate(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    check_arguments(args)
    from .config import load_config, parse_methods
    from .pipeline import run_evaluation
    from .report import headline_table

    config = load_config(args.config)
    changes: dict[str, Any] = {}
    if args.model is not None:
        changes["model"] = args.model
    if args.expert is not None:
        changes["expert"] = args.expert
    if args.probe is not None:
        changes["probe"] = str(Path(args.probe).expanduser())  # the folder check_probe accepted
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    if args.methods is not None:
        changes["methods"] = parse_methods(args.methods)
    if args.max_new_tokens is not None:
        changes["max_new_tokens"] = args.max_new_tokens
    if args.dtype is not None:
        changes["dtype"] = args.dtype
    threads = args.threads if args.threads is not None else _env_threads()
    if threads is not None:
        changes["threads"] = threads
    overridden = sorted(name for name in changes if name != "threads") + (["limit"] if args.limit is not None else [])
    if overridden and config.description:
        # the report opens with the description: it must not claim sizes or methods this run changed
        changes["description"] = (f"{config.description} (This run overrides the configuration's "
                                  f"{', '.join(overridden)}: see the command below.)")
    if changes:
        config = config.with_(**changes)
    _check_config_values(args, config)
    out = Path(args.out) if args.out else Path("eval_runs") / config.name
    outcome = run_evaluation(
        config,
        out_dir=out,
        data_dir=args.data_dir,
        limit=args.limit,
        cache_path=args.cache,
        progress=wants_progress(args),
        command=getattr(args, "command_line", None) or _command_line(argv),
    )
    print(headline_table(config, outcome.metrics, config.resolved_methods()))
    print()
    print(f"wrote {outcome.report_md}, {outcome.results_json}, {outcome.readme_table}"
          + "".join(f", {p}" for p in outcome.plots))
    print(f"{outcome.generated} answers generated, {outcome.reused} reused from the cache, "
          f"{outcome.wall_seconds / 60:.1f} min")
    return 0


def run_cli(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run `ngsd eval` with parsed arguments; a user error prints one line and returns 2."""
    return run_command(lambda a: _evaluate(a, argv), args, getattr(args, "prog", "ngsd eval"))


def register_cli(subparsers: Any) -> None:
    """Add `ngsd eval` to the top-level parser's subcommands."""
    parser = subparsers.add_parser(
        "eval",
        help="compare decoding methods on safety and utility suites and write a report",
        description="Run every method of an evaluation configuration on the same prompts (greedy), score "
        "ASR, over-refusal, benign fidelity, GSM8K accuracy, gate statistics and speed, and write "
        "results.json, REPORT.md, README_TABLE.md and PNG plots. Generations are cached, so an "
        "interrupted run resumes where it stopped.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run_cli)


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="ngsd eval", description="NGSD evaluation harness (same as `ngsd eval`)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_cli(args, argv if argv is not None else sys.argv[1:])


__all__ = ["add_arguments", "check_arguments", "main", "register_cli", "run_cli"]
