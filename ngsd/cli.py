"""`ngsd` command line: generate (guarded vs unguarded side by side), reflect, train-expert, eval."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Sequence

# Modules that add a subcommand through `register_cli(subparsers)`.
_SUBCOMMAND_MODULES = ("ngsd.risk.reflection", "ngsd.experts.train_expert", "ngsd.eval.cli")


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="guarded and unguarded answers side by side, with the gate trace",
        description="Answer PROMPT(s) with and without the guard; show the gate's potential and spikes.",
    )
    parser.add_argument("prompts", nargs="+", help="one or more user requests")
    parser.add_argument("--model", default=None, help="model folder or hub id (default: offline SmolLM2-135M-Instruct)")
    parser.add_argument("--expert", default="shipped", help="LoRA adapter folder, expert model, or 'shipped'")
    parser.add_argument("--mode", default="ngsd", choices=["ngsd", "safedecoding", "open", "off"])
    parser.add_argument("--alpha", type=float, default=None, help="fixed alpha (skips self-reflection)")
    parser.add_argument("--reflection", default="generate", choices=["generate", "prefill", "none"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--early-stop", action="store_true", help="the reference's 'already refusing' early stop")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import ngsd
    from ngsd import NGSDConfig, ReflectionConfig
    from ngsd.textplot import plot_trace

    model, tokenizer = ngsd.load_model(args.model)
    config = NGSDConfig(mode=args.mode, early_stop=args.early_stop, reflection=ReflectionConfig(mode=args.reflection))
    common = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, progress=not args.json,
    )
    guarded = ngsd.generate(model, tokenizer, args.prompts, expert=args.expert, config=config, alpha=args.alpha,
                            **common)
    plain = ngsd.generate(model, tokenizer, args.prompts, expert=None, config=NGSDConfig(mode="off"), **common)
    if args.json:
        rows = [
            {"prompt": p, "guarded": g, "unguarded": u, "trace": t.to_dict()}
            for p, g, u, t in zip(args.prompts, guarded.texts, plain.texts, guarded.traces)
        ]
        json.dump({"config": config.to_dict(), "results": rows}, sys.stdout, indent=2)
        print()
        return 0
    for prompt, g, u, trace in zip(args.prompts, guarded.texts, plain.texts, guarded.traces):
        print("=" * 100)
        print(f"PROMPT: {prompt}")
        if trace.reflection is not None:
            r = trace.reflection
            print(f"reflection: scores={getattr(r, 'scores', None)} risk={getattr(r, 'risk', None)} alpha={trace.alpha}")
        print(_side_by_side("UNGUARDED", u, "GUARDED (ngsd)", g))
        print(plot_trace(trace, config.v_th))
    return 0


def _side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 48) -> str:
    import textwrap

    left_lines = [left_title, "-" * len(left_title)] + textwrap.wrap(left, width)
    right_lines = [right_title, "-" * len(right_title)] + textwrap.wrap(right, width)
    height = max(len(left_lines), len(right_lines))
    left_lines += [""] * (height - len(left_lines))
    right_lines += [""] * (height - len(right_lines))
    return "\n".join(f"{a:<{width}} | {b}" for a, b in zip(left_lines, right_lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ngsd", description="Neuron-guided safe decoding for Hugging Face models")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as error:  # an optional extra (e.g. eval plots) is not installed
            if error.name and error.name.startswith("ngsd"):
                raise
            continue
        module.register_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
