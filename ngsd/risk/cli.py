"""`ngsd reflect "prompt" ...`: the self-reflection scores, risk and alpha of prompts.

Light at import (no torch): the model and `ngsd.risk.reflection` are loaded by `run` only, so
building the `ngsd` parser and `--help` stay fast. Defaults left as None come from `ReflectionConfig`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

def format_reflection(request: str, r: Any) -> str:
    """A few human-readable lines for one request's `Reflection`."""
    from .reflection import DIMENSION_NAMES
    head = request if len(request) <= 70 else request[:67] + "..."
    if r.mode == "none":
        return f"{head}\n  reflection off: alpha {r.alpha:g}"
    number = "{:.1f}" if r.mode == "prefill" else "{}"  # prefill scores are expected values
    scores = "  ".join(f"{DIMENSION_NAMES[d]} {number.format(r.scores[d])}" for d in DIMENSION_NAMES)
    if not r.parsed:
        note = "  (answer not parsed: fallback scores)"
    elif r.missing:
        note = f"  (fallback for {', '.join(r.missing)})"
    else:
        note = ""
    lines = [head, f"  {scores}", f"  risk {r.risk}  alpha {r.alpha:g}{note}"]
    if r.mode == "generate":
        lines.append(f"  answer: {r.raw.strip()!r}")
    return "\n".join(lines)


def check_device(value: str) -> None:
    """--device: a torch device string whose device torch can use (UsageError otherwise; imports torch)."""
    import torch

    from ..cli import UsageError

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device: {value!r} is not a torch device; use cpu, cuda or cuda:N") from error
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {value}: torch sees no CUDA device here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {value}: torch sees {count} CUDA device(s), numbered from 0")


def run(args: argparse.Namespace) -> int:
    """Load the model, reflect on every prompt in one batch, print the result (text or JSON)."""
    import torch

    from ..cli import wants_progress
    from ..config import ReflectionConfig
    from ..loading import load_model
    from .reflection import reflect

    from ..cli import check_model, check_prompt_texts, check_threads

    check_prompt_texts(args.prompt)
    check_threads(args.threads)
    check_model(args.model)
    check_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    given = {"max_new_tokens": args.max_new_tokens, "all_zero": args.all_zero}
    config = ReflectionConfig(mode=args.mode, **{k: v for k, v in given.items() if v is not None})
    progress = wants_progress(args)
    model, tokenizer = load_model(args.model, dtype=dtype, device=args.device, progress=progress)
    reflections = reflect(model, tokenizer, args.prompt, config, progress=progress)
    if args.json:
        json.dump([dict(request=p, **r.to_dict()) for p, r in zip(args.prompt, reflections)], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print("\n".join(format_reflection(p, r) for p, r in zip(args.prompt, reflections)))
    return 0


def register_cli(subparsers: Any) -> None:
    """Add `ngsd reflect "prompt" [...]`: the four scores, the risk and alpha of each prompt."""
    from ..cli import add_dtype_option, add_threads_option

    parser = subparsers.add_parser(
        "reflect",
        help="show the self-reflection risk scores and alpha of prompts",
        description="Ask the model to rate each prompt (severity, actionability, evasion, targeting 0..10) "
        "and show the combined risk and the alpha it maps to. Several prompts run as one batch.",
    )
    parser.add_argument("prompt", nargs="+", help="the request(s) to judge")
    parser.add_argument("--model", default=None, help="model path or hub id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--mode", choices=("generate", "prefill"), default="generate",
                        help="generate: greedy JSON answer (the reference); prefill: expected value of the "
                        "next-token distribution over the digits, no generation")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="token limit of the generated answer (generate mode; default: ReflectionConfig's)")
    parser.add_argument("--all-zero", choices=("fail", "bump"), default=None,
                        help="what four zero scores mean: fail (risk 10, the default) or bump (severity + 1)")
    parser.add_argument("--device", default="cpu", help="torch device of the model, e.g. cpu or cuda")
    add_dtype_option(parser)
    add_threads_option(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=run)
