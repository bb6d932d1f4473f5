"""Build expert v4c's training examples (PLAN_v4c.md): the shipped v4 examples without the rows on evaluation prompts.

Every row whose prompt `splits.leaks` finds among the evaluation prompts is dropped (14 rows on 7 AdvBench prompts
with ids 50..129); the other 416 are kept in order, unchanged. Then:

    python reports/expert/build_v4c_examples.py --out v4c_examples.jsonl
    ngsd train-expert --examples v4c_examples.jsonl --seed 0 --threads 1 --no-eval --out V4C
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from ngsd.experts.shipped import shipped_expert_path
from ngsd.experts.training.splits import example_lines_without_evaluation_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default=str(shipped_expert_path() / "training_examples.jsonl"),
                        help="the examples to clean (default: the shipped expert's; v4's until stop 42, git show "
                             "36e46fc:ngsd/assets/experts/smollm2-135m-safety-lora/training_examples.jsonl; since then "
                             "v4c's own, which this leaves unchanged)")
    parser.add_argument("--data-dir", default=None, help="benchmark data folder (default: $NGSD_DATA_DIR)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lines = Path(args.examples).read_text(encoding="utf-8").splitlines()
    kept = example_lines_without_evaluation_prompts(lines, args.data_dir)
    Path(args.out).write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    digest = hashlib.sha256(Path(args.out).read_bytes()).hexdigest()[:16]
    print(f"kept {len(kept)} of {len(lines)} examples ({len(lines) - len(kept)} with an evaluation prompt dropped); "
          f"wrote {args.out} (sha256 {digest})")


if __name__ == "__main__":
    main()
