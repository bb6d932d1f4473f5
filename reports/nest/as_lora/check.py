"""The shipped NeST delta as a LoRA adapter vs folded into a copy of the base, on the real default model.

Same prompts, same guarded decoding (alpha 0.9 on every row, greedy, 48 new tokens, batch of 16), two ways to run
the expert: a folded copy of the base (`nest_expert`, a second model forward; what `expert="nest"` built until
stop 37) and the exact LoRA form (`ngsd.nest.as_lora`, expert rows in the base's own forward; `expert="nest"` now). Reports the logits' largest difference, the
decoded tokens that agree, the wall time of each (interleaved, best of `--repeats`), and the memory each expert
form holds besides the base.

    python reports/nest/as_lora/check.py --threads 2 --out reports/nest/as_lora/check.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import ngsd
from ngsd.api import encode_prompts
from ngsd.data import load_suite
from ngsd.experts.training.splits import alpaca_training_prompts
from ngsd.nest.as_lora import nest_lora_adapter
from ngsd.nest.shipped import nest_expert, shipped_nest_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = ngsd.load_model()
    # training-side prompts only: AdvBench ids >= 130 and AlpacaEval even ids (SOURCES.md)
    harmful = [p.text for p in load_suite("advbench") if int(p.id) >= 130][:8]
    benign = alpaca_training_prompts(None)[:8]
    prompts = harmful + benign
    folded = nest_expert(model)
    adapter = nest_lora_adapter(shipped_nest_path())

    ids, mask = encode_prompts(tokenizer, prompts, chat=True, device=model.device)
    with torch.no_grad():
        expected = folded(input_ids=ids, attention_mask=mask).logits[:, -1]
        adapter.attach(model)
        try:
            with adapter.rows_from(len(prompts)):
                both = model(input_ids=torch.cat([ids, ids]), attention_mask=torch.cat([mask, mask])).logits[:, -1]
        finally:
            adapter.detach(model)
    logit_diff = float((both[len(prompts):] - expected).abs().max())

    runs: dict[str, list[float]] = {"folded copy": [], "lora": []}
    results = {}
    for _ in range(args.repeats):
        for name, expert in (("folded copy", folded), ("lora", adapter)):
            start = time.perf_counter()
            results[name] = ngsd.generate(model, tokenizer, prompts, expert=expert, alpha=0.9, max_new_tokens=48)
            runs[name].append(time.perf_counter() - start)
    tokens = {name: [t.tokens for t in r.traces] for name, r in results.items()}
    same_rows = sum(a == b for a, b in zip(tokens["folded copy"], tokens["lora"]))
    first_difference = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                        for a, b in zip(tokens["folded copy"], tokens["lora"])]
    extra_bytes = {"folded copy": sum(p.numel() * p.element_size() for p in folded.parameters()),
                   "lora": sum(t.numel() * t.element_size() for pair in adapter.pairs.values() for t in (pair.down, pair.up))}
    report = {
        "command": "python reports/nest/as_lora/check.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "threads": args.threads, "load_average_end": list(os.getloadavg()),
        "prompts": {"harmful (AdvBench ids >= 130)": len(harmful), "benign (AlpacaEval even ids)": len(benign)},
        "last_position_logits_max_abs_difference": logit_diff,
        "rows_with_identical_tokens": f"{same_rows}/{len(prompts)}",
        "first_differing_step_per_row": first_difference,
        "wall_seconds_best": {k: round(min(v), 2) for k, v in runs.items()},
        "wall_seconds_all": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "expert_memory_besides_the_base_mb": {k: round(v / 2**20, 1) for k, v in extra_bytes.items()},
        "lora_rank": max(p.down.shape[0] for p in adapter.pairs.values()), "lora_modules": len(adapter.pairs),
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
