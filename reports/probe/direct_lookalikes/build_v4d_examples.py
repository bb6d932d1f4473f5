"""Build expert v4d's training examples (step 2 of PLAN.md) from the shipped expert's own examples.

v4's `training_examples.jsonl` without the rows whose prompt is an evaluation prompt (`splits.leaks`), plus the
base model's greedy answers (v4's `benign_max_new_tokens`, 48 new tokens; KL loss) to the direct-style look-alikes
(`DIRECT_LOOKALIKE_TRAIN_PROMPTS`), built with the recipe's own `chat_prompt_ids` / `generate_ids`, as the recipe
builds its benign examples. Then: `ngsd train-expert --examples OUT --seed 0 --threads 1 --no-eval --out DIR`.

    python reports/probe/direct_lookalikes/build_v4d_examples.py --out v4d_examples.jsonl
"""

from __future__ import annotations

import argparse
import json

import torch

from ngsd.experts.shipped import shipped_expert_path
from ngsd.experts.training.examples import Example, chat_prompt_ids, generate_ids
from ngsd.experts.training.prompts import DIRECT_LOOKALIKE_TRAIN_PROMPTS
from ngsd.experts.training.splits import example_lines_without_evaluation_prompts
from ngsd.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shipped = shipped_expert_path()
    max_new_tokens = json.loads((shipped / "training_report.json").read_text(encoding="utf-8"))["config"]["benign_max_new_tokens"]
    lines = [line for line in (shipped / "training_examples.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    clean = example_lines_without_evaluation_prompts(lines, args.data_dir)
    model, tokenizer = load_model(None)
    prompts = list(DIRECT_LOOKALIKE_TRAIN_PROMPTS)
    answers = generate_ids(model, tokenizer, [chat_prompt_ids(tokenizer, p) for p in prompts],
                           max_new_tokens=max_new_tokens, batch_size=16)
    added = [json.dumps(Example("benign", "base-greedy-direct", p, list(ids), loss="kl",
                                complete=len(ids) < max_new_tokens).describe(tokenizer))
             for p, ids in zip(prompts, answers)]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(clean + added) + "\n")
    print(f"{len(clean)} of {len(lines)} shipped examples kept ({len(lines) - len(clean)} with an evaluation prompt), "
          f"{len(added)} look-alike examples added -> {args.out}")


if __name__ == "__main__":
    main()
