"""Answers for the hand-labelled judge set (`reports/judge/judge_labels.jsonl`), from evaluation prompts only.

The real default model answers a spread of harmful, jailbreak and benign evaluation prompts under three
methods (unguarded, NGSD with alpha fixed at 0.5 and at 0.9), greedy, 64 new tokens, so that refusals,
compliance, refuse-then-comply and incoherent answers all occur. The labels are added afterwards by a
person reading each answer; this script only produces the unlabelled rows. They carry the prompt text for
that reader; a row joins `judge_labels.jsonl` without it (suite and id name the prompt, which
`load_judge_labels` reads from the data folder: the benchmark data is never copied into the project).

    nice -n 5 python3 bench/judge_answers.py --out /tmp/judge_answers.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import ngsd
from ngsd.data import load_suite, resolve_data_dir

METHODS = ("unguarded", "ngsd_a0.5", "ngsd_a0.9")


def spread(items: list, n: int) -> list:
    """`n` items evenly spaced over `items` (all of them when there are fewer)."""
    if n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def selected_prompts(data_dir: Path) -> list[tuple[str, str, str]]:
    """(suite, id, text) for every prompt to answer; evaluation splits only (AdvBench ids < 130, odd AlpacaEval ids)."""
    chosen: list[tuple[str, str, str]] = []
    advbench = [p for p in load_suite("advbench", data_dir) if int(p.id) < 130]
    for suite, pool, n in (
        ("advbench", advbench, 55),
        ("harmbench", load_suite("harmbench", data_dir), 20),
        ("gcg", load_suite("gcg", data_dir), 10),
        ("autodan", load_suite("autodan", data_dir), 10),
        ("deepinception", load_suite("deepinception", data_dir), 10),
        ("xstest_safe", load_suite("xstest_safe", data_dir), 35),
    ):
        chosen += [(suite, p.id, p.text) for p in spread(pool, n)]
    chosen += [("alpaca_eval", p.id, p.text) for p in spread(load_suite("alpaca_eval", data_dir), 20)]
    return chosen


def answer(model, tokenizer, method: str, texts: list[str], max_new_tokens: int) -> list[str]:
    if method == "unguarded":
        result = ngsd.generate(model, tokenizer, texts, expert=None, config=ngsd.NGSDConfig(mode="off"),
                               max_new_tokens=max_new_tokens)
    elif method == "ngsd_default":
        result = ngsd.generate(model, tokenizer, texts, expert="shipped", max_new_tokens=max_new_tokens)
    else:
        alpha = float(method.split("_a")[1])
        result = ngsd.generate(model, tokenizer, texts, expert="shipped", alpha=alpha, max_new_tokens=max_new_tokens)
    return list(result.texts)


def _fixed_alpha(method: str) -> bool:
    if not method.startswith("ngsd_a"):
        return False
    try:
        return 0.0 <= float(method[len("ngsd_a"):]) <= 1.0
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="unguarded, ngsd_default or ngsd_a<alpha>, e.g. ngsd_a0.3 (rotated over the prompts)")
    parser.add_argument("--suites", nargs="+", default=None, help="keep only these suites")
    args = parser.parse_args()
    for method in args.methods:  # before the model loads (an unknown one ended in an IndexError after it)
        if method not in ("unguarded", "ngsd_default") and not _fixed_alpha(method):
            parser.error(f"unknown method {method!r}: use unguarded, ngsd_default or ngsd_a<alpha in [0, 1]>")
    torch.set_num_threads(1)
    prompts = selected_prompts(resolve_data_dir(args.data_dir))
    if args.suites:
        unknown = sorted(set(args.suites) - {row[0] for row in prompts})
        if unknown:  # a misspelt suite kept nothing and exited 0 with an empty file
            parser.error(f"unknown suites {unknown}; known: {sorted({row[0] for row in prompts})}")
        prompts = [row for row in prompts if row[0] in args.suites]
    model, tokenizer = ngsd.load_model()
    # Methods rotate over the prompt list so every suite is seen under every method.
    by_method: dict[str, list[tuple[str, str, str]]] = {m: [] for m in args.methods}
    for i, row in enumerate(prompts):
        by_method[args.methods[i % len(args.methods)]].append(row)
    with args.out.open("a") as out:
        for method, rows in by_method.items():
            for start in range(0, len(rows), args.batch):
                batch = rows[start:start + args.batch]
                texts = answer(model, tokenizer, method, [t for _, _, t in batch], args.max_new_tokens)
                for (suite, pid, prompt), text in zip(batch, texts):
                    out.write(json.dumps({"prompt_suite": suite, "prompt_id": pid, "method": method,
                                          "prompt": prompt, "answer": text}) + "\n")
                out.flush()
                print(method, start + len(batch), "/", len(rows), flush=True)


if __name__ == "__main__":
    main()
