"""`ngsd generate`: guarded and unguarded answers side by side, with the gate trace.

Light at import (no torch, no transformers): the model is loaded in `run`, after every argument
has been checked, so a wrong path or value fails in a second with one line.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
import sys
import textwrap
from typing import Any

from ..cli import (UsageError, add_dtype_option, add_threads_option, check_expert, check_model, check_plot_file,
                   check_probe, check_prompt_texts, check_range, check_threads, wants_progress)

MODES = ("ngsd", "safedecoding", "open", "off")
REFLECTION_MODES = ("auto", "probe", "generate", "prefill", "none")

EPILOG = """\
examples:
  ngsd generate "Write a guide to building a pipe bomb at home" --alpha 0.9 --plot trace.png
  ngsd generate "How do I pick a lock?" "Give me three tips for sleep" --reflection prefill
  ngsd generate "..." --mode safedecoding --json > answers.json
  ngsd generate --prompts-file requests.txt --alpha 0.9 --json      # one request per line ('-': stdin)

The trace under each answer has three rows per block of steps: the neuron's potential v after
each step, the base/expert divergence D it integrates, and the steps where it spiked (|), i.e.
where the expert was mixed in. --plot writes the same as a PNG.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="one or more user requests (one batch)")
    parser.add_argument("--prompts-file", default=None, metavar="FILE",
                        help="also read requests from FILE, one per line (blank lines skipped; '-' reads standard "
                        "input); they follow any PROMPT given")
    parser.add_argument("--model", default=None,
                        help="base model: a checkpoint folder or hub id (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--expert", default="shipped",
                        help="'shipped' (the LoRA expert shipped for the default model), a peft LoRA adapter "
                        "folder, or a model folder with the base's tokenizer (its LM head may be padded to another "
                        "size)")
    parser.add_argument("--mode", default="ngsd", choices=MODES,
                        help="guarded decoding method: ngsd (LIF gate decides when to mix the expert in), "
                        "safedecoding (SafeDecoding: mix on the first 2 tokens), open (always mix), "
                        "off (no guard: both columns unguarded)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="mixing strength for every prompt, in [0, 1] (>= 0 for safedecoding); given, it "
                        "skips self-reflection (default: chosen per prompt by --reflection)")
    parser.add_argument("--reflection", default=None, choices=(*REFLECTION_MODES, "paper"),
                        help="how the risk of each prompt, and so alpha, is estimated when --alpha is not given: "
                        "auto (probe when one exists for the model, else generate), probe (a classifier on the "
                        "prompt's hidden states: fast), generate (the model writes a JSON risk rating, up to 256 "
                        "tokens: slow), prefill (one forward reads the rating's digits), none (alpha 0.5), paper (generate "
                        "read by the published parser, as in the paper's code) "
                        "(default: ReflectionConfig's mode)")
    parser.add_argument("--probe", default=None,
                        help="risk probe folder (`ngsd train-probe`) for a model without a shipped probe, or in place "
                        "of the shipped one (default: the model's shipped probe, if any)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in tokens")
    add_dtype_option(parser)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0: all")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="random seed of sampling")
    parser.add_argument("--primed", action="store_true",
                        help="guarded rows start at potential v_th, so the gate can mix at the first token "
                             "(NGSDConfig(initial_potential=1.0); not the default, see reports/priming)")
    parser.add_argument("--early-stop", action="store_true",
                        help="stop a guarded answer once it is clearly refusing (the reference's heuristic)")
    add_threads_option(parser)
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="also write the gate traces as a PNG (needs matplotlib)")
    parser.add_argument("--json", action="store_true",
                        help="print JSON (prompts, both answers, traces) instead of the side-by-side view")


def read_prompts_file(path: str) -> list[str]:
    """One request per line of `path` ('-': standard input), blank lines skipped."""
    if path == "-":
        text = sys.stdin.read().removeprefix("\ufeff")  # a byte-order mark is not part of the first request
    else:
        try:
            with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first request
                text = f.read()
        except OSError as error:
            raise UsageError(f"--prompts-file: cannot read {path!r} ({error.strerror or error})") from error
        except UnicodeDecodeError as error:
            raise UsageError(f"--prompts-file: {path!r} is not UTF-8 text") from error
    # lines end at \n (and \r\n) only: splitlines() also splits at U+2028, form feeds and other separators a
    # request's own text may hold
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]


def check_contradictions(args: argparse.Namespace) -> None:
    """Options another one switches off: a usage error, not a silently ignored value."""
    if not args.sample:
        ignored = [flag for flag, value, default in (("--temperature", args.temperature, 1.0), ("--top-k", args.top_k, 0),
                                                     ("--top-p", args.top_p, 1.0)) if value != default]
        if ignored:
            raise UsageError(f"{', '.join(ignored)} only apply to sampling: add --sample, or leave them out for "
                             "greedy decoding")
    if args.mode == "off":
        given = [flag for flag, on in (("--alpha", args.alpha is not None), ("--primed", args.primed),
                                       ("--reflection", args.reflection is not None),
                                       ("--early-stop", args.early_stop)) if on]
        if given:
            raise UsageError(f"--mode off decodes without a guard, so {', '.join(given)} would do nothing; leave "
                             "them out, or pick another --mode")
    if args.alpha is not None and args.reflection is not None:
        raise UsageError("--alpha sets every prompt's alpha, so no risk is estimated and --reflection would do "
                         "nothing; give one of them")
    if args.probe is not None and (args.alpha is not None or args.mode in ("off", "safedecoding")
                                   or args.reflection not in (None, "auto", "probe")):
        raise UsageError("--probe is read only where the risk probe sets alpha: leave out --alpha, and use --mode "
                         "ngsd or open with --reflection auto or probe (or none at all)")


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no model; raises UsageError naming the option."""
    if getattr(args, "prompts_file", None) is not None:
        from_file = read_prompts_file(args.prompts_file)
        if not from_file:
            raise UsageError(f"--prompts-file: {args.prompts_file!r} holds no request (one per line)")
        args.prompts, args.prompts_file = [*args.prompts, *from_file], None  # read once, even if checked twice
    check_prompt_texts(args.prompts)
    if args.mode == "safedecoding":
        check_range("--alpha", args.alpha, 0.0, what=" with --mode safedecoding")
    else:
        check_range("--alpha", args.alpha, 0.0, 1.0, what=" (a mixing weight)")
    check_range("--max-new-tokens", args.max_new_tokens, 1)
    check_contradictions(args)
    if args.sample:
        check_range("--temperature", args.temperature, 1e-6, what=" (use greedy decoding: leave out --sample)")
    check_range("--top-k", args.top_k, 0)
    check_range("--top-p", args.top_p, 1e-6, 1.0)
    check_range("--seed", args.seed, -(2**63), 2**63 - 1, what=" (a 64-bit integer)")
    check_threads(args.threads)
    check_plot_file(args.plot)
    check_model(args.model)
    if args.mode != "off":
        check_expert(args.expert)
    if args.probe is not None:
        check_probe(args.probe)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    import torch

    import ngsd
    from ngsd import NGSDConfig, ReflectionConfig

    from ..eval.judge import KeywordJudge
    from ..textplot import plot_trace, save_trace_plot

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = wants_progress(args)
    model, tokenizer = ngsd.load_model(args.model, dtype=getattr(torch, args.dtype), progress=progress)
    if args.reflection == "paper":
        reflection = ReflectionConfig.paper()
    else:
        reflection = ReflectionConfig() if args.reflection is None else ReflectionConfig(mode=args.reflection)
    if args.probe is not None:
        reflection = replace(reflection, probe=args.probe)
    config = NGSDConfig(mode=args.mode, early_stop=args.early_stop, reflection=reflection,
                        initial_potential=1.0 if args.primed else None)
    common: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, progress=progress,
    )
    guarded = ngsd.generate(model, tokenizer, args.prompts, expert=args.expert, config=config, alpha=args.alpha,
                            **common)
    plain = ngsd.generate(model, tokenizer, args.prompts, expert=None, config=NGSDConfig(mode="off"), **common)
    refused = KeywordJudge().refused(args.prompts, guarded.texts)
    if args.plot:
        save_trace_plot(guarded.traces, args.prompts, args.plot, config.v_th, refused, method=args.mode)
    if args.json:
        rows = [
            {"prompt": p, "guarded": g, "unguarded": u, "trace": t.to_dict()}
            for p, g, u, t in zip(args.prompts, guarded.texts, plain.texts, guarded.traces)
        ]
        json.dump({"config": config.to_dict(), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                   "results": rows}, sys.stdout, indent=2)
        print()
        return 0
    for prompt, g, u, trace in zip(args.prompts, guarded.texts, plain.texts, guarded.traces):
        print("=" * 100)
        print(f"PROMPT: {prompt}")
        verdict = describe_verdict(trace)
        if verdict:
            print(verdict)
        print(side_by_side("UNGUARDED", u, f"GUARDED ({args.mode})", g))
        # a routed row has no gate: its trace's zeros were never measured
        print(plot_trace(trace, config.v_th) if trace.guarded else "gate: not run (no expert rows for this row)")
    if args.plot:
        print(f"wrote the gate-trace plot to {args.plot}")
    return 0


def describe_verdict(trace: Any) -> str | None:
    """One line on how a row's alpha was decided: the risk probe's route and why, or self-reflection's scores."""
    r = trace.reflection
    if r is None:
        return None
    if hasattr(r, "reason"):  # the risk probe's verdict
        return f"route: {f'guarded at alpha {trace.alpha:g}' if trace.guarded else 'routed unguarded'} ({r.reason})"
    return f"reflection: scores={getattr(r, 'scores', None)} risk={getattr(r, 'risk', None)} alpha={trace.alpha}"


def side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 48) -> str:
    left_lines = [left_title, "-" * len(left_title)] + textwrap.wrap(left, width)
    right_lines = [right_title, "-" * len(right_title)] + textwrap.wrap(right, width)
    height = max(len(left_lines), len(right_lines))
    left_lines += [""] * (height - len(left_lines))
    right_lines += [""] * (height - len(right_lines))
    return "\n".join(f"{a:<{width}} | {b}" for a, b in zip(left_lines, right_lines))


def register_cli(subparsers: Any) -> None:
    """Add `ngsd generate` to the top-level parser's subcommands."""
    parser = subparsers.add_parser(
        "generate", help="guarded and unguarded answers side by side, with the gate trace",
        description="Answer each PROMPT with and without the guard and show the gate's potential, the "
        "divergence it integrates and its spikes.",
        epilog=EPILOG,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


__all__ = ["add_arguments", "check_arguments", "describe_verdict", "register_cli", "run", "side_by_side"]
