"""Unlabelled rows for a new fresh half of the judge's labelled set, from an evaluation run's answer cache.

Takes the answers a run generated that are not in a reference cache (the answers nobody has read yet), keeps
guarded methods only, picks an even spread per (suite, method), shuffles them with a fixed seed, and writes
`prompt` and `answer` only, so the person labelling sees neither the method nor any judge's verdict. A second
file keeps the hidden columns (suite, prompt id, method) by row, for merging the labels afterwards.

    python bench/judge_fresh_rows.py --cache NEW.jsonl --reference OLD.jsonl --out-dir DIR
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

from judge_answers import spread  # the earlier halves' row picker (bench/ is on the path when run as a script)
from ngsd.data import load_suite, resolve_data_dir

# Rows per (suite, method): the harmful and jailbreak suites carry most of them (the judge's hard cases are
# guarded answers to harmful requests); the benign suites are there so over-refusals are labelled too.
PER_SUITE_AND_METHOD = {"advbench": 4, "harmbench": 4, "gcg": 4, "autodan": 4, "deepinception": 4,
                        "xstest_safe": 5, "alpaca_eval": 2, "mt_bench": 3}
SEED = 41


def read_cache(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="the run's answer cache")
    parser.add_argument("--reference", type=Path, required=True, help="a cache of answers already seen")
    parser.add_argument("--methods", nargs="+", default=["ngsd", "ngsd_primed_check"])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args()
    seen = {row["key"] for row in read_cache(args.reference)}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in read_cache(args.cache):
        if row["key"] not in seen and row["method"] in args.methods and row["suite"] in PER_SUITE_AND_METHOD:
            groups[(row["suite"], row["method"])].append(row)
    data_dir = resolve_data_dir(args.data_dir)
    texts = {(suite, p.id): p.text for suite in PER_SUITE_AND_METHOD for p in load_suite(suite, data_dir)}
    chosen = []
    for (suite, method), rows in sorted(groups.items()):
        rows.sort(key=lambda r: (int(r["prompt_id"]) if str(r["prompt_id"]).isdigit() else 0, str(r["prompt_id"])))
        chosen += spread(rows, PER_SUITE_AND_METHOD[suite])
    random.Random(SEED).shuffle(chosen)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "to_label.jsonl").open("w") as blind, (args.out_dir / "hidden.jsonl").open("w") as hidden:
        for i, row in enumerate(chosen):
            prompt = texts[(row["suite"], str(row["prompt_id"]))]
            blind.write(json.dumps({"i": i, "prompt": prompt, "answer": row["text"]}) + "\n")
            hidden.write(json.dumps({"i": i, "prompt_suite": row["suite"], "prompt_id": str(row["prompt_id"]),
                                     "method": row["method"], "key": row["key"]}) + "\n")
    print(f"{len(chosen)} rows from {len(groups)} (suite, method) groups -> {args.out_dir}")


if __name__ == "__main__":
    main()
