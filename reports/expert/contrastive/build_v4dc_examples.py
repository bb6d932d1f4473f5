"""Build expert v4dc's training examples (PLAN.md beside this file): v4d's plus harmful requests in the same framing.

Stop 35's v4d (v4's clean examples + the base's answers to the 72 direct-style look-alikes, KL) learned the framing,
not the content: it answered direct-style harmful requests too. v4dc pairs every look-alike with one harmful request
of that framing: 72 more AdvBench training goals (ids >= 130, SOURCES.md) that v4 did not train on, each treated as
v4's recipe treats its AdvBench goals: one refusal (the model's own greedy continuation of the refusal opening under
the safety system prompt) and one recovery (the base's own greedy compliant start, cut at one of v4's prefix lengths,
then that refusal). Goals are excluded when the broad recipe holds them apart for validation (its val_harmful set),
when they leak an evaluation prompt, or when v4 already trained on them.

    python reports/expert/contrastive/build_v4dc_examples.py --v4d V4D_EXAMPLES --out v4dc_examples.jsonl
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from ngsd.data import id_sort_key, load_suite
from ngsd.experts.shipped import shipped_expert_path
from ngsd.experts.training.broad import ADVBENCH_TRAIN_MIN_ID, training_requests
from ngsd.experts.training.config import TrainExpertConfig
from ngsd.experts.training.examples import Example, cap_response, chat_prompt_ids, generate_ids, opening_refusals
from ngsd.experts.training.prompts import DIRECT_LOOKALIKE_TRAIN_PROMPTS
from ngsd.experts.training.splits import leaks, saved_prompts
from ngsd.eval.judge import KeywordJudge
from ngsd.loading import load_model


def paired_goals(data_dir: str | None, trained: set[str], n: int, seed: int) -> list[str]:
    """`n` AdvBench training goals (seeded draw) outside v4's data, the broad validation split and the evaluation side."""
    held = {r.unit for r in training_requests(data_dir, split="validation").harmful}
    goals = [p.text for p in sorted(load_suite("advbench", data_dir), key=id_sort_key)
             if int(p.id) >= ADVBENCH_TRAIN_MIN_ID and p.text not in held and p.text not in trained]
    leaked = {text for text, _, _ in leaks(goals, data_dir)}
    pool = [g for g in goals if g not in leaked]
    return sorted(random.Random(f"v4dc-{seed}").sample(pool, n), key=pool.index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--v4d", required=True, help="v4d's 488 examples (build_v4d_examples.py)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shipped = json.loads((shipped_expert_path() / "training_report.json").read_text(encoding="utf-8"))["config"]
    cfg = TrainExpertConfig(seed=args.seed, prefix_lengths=tuple(shipped["prefix_lengths"]),
                            refusal_max_new_tokens=shipped["refusal_max_new_tokens"],
                            max_response_tokens=shipped["max_response_tokens"])
    lines = [line for line in open(args.v4d, encoding="utf-8").read().splitlines() if line.strip()]
    trained = set(saved_prompts([json.loads(line) for line in lines], args.data_dir))  # by name since stop 51
    goals = paired_goals(args.data_dir, trained, len(DIRECT_LOOKALIKE_TRAIN_PROMPTS), args.seed)
    model, tokenizer = load_model(None)
    refusals = opening_refusals(model, tokenizer, goals, cfg)
    starts = generate_ids(model, tokenizer, [chat_prompt_ids(tokenizer, g) for g in goals],
                          max_new_tokens=max(cfg.prefix_lengths), batch_size=cfg.eval_batch_size * 2)
    rng, judge, added = random.Random(f"v4dc-recovery-{args.seed}"), KeywordJudge(), []
    for goal, start in zip(goals, starts):
        ids, complete = cap_response(tokenizer, refusals[goal], cfg.max_response_tokens)
        added.append(Example("refusal", "opening-paired", goal, ids, complete=complete))
        if start and not judge.is_refusal(tokenizer.decode(start)):
            prefix = list(start[: min(rng.choice(cfg.prefix_lengths), len(start))])
            ids, complete = cap_response(tokenizer, refusals[goal], cfg.max_response_tokens, prefix)
            added.append(Example("recovery", "base-start-paired", goal, ids, prefix_ids=prefix, complete=complete))
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines + [json.dumps(e.describe(tokenizer)) for e in added]) + "\n")
    kinds = {k: sum(e.kind == k for e in added) for k in ("refusal", "recovery")}
    print(f"{len(lines)} v4d examples + {len(goals)} paired goals ({kinds}) -> {args.out}")


if __name__ == "__main__":
    main()
