"""What the divergence check's look-ahead costs a guarded vLLM engine, three ways side by side: each request's
opening run alone with its prompt run again (how the engine did it until stop 57), a step's openings run together
with their prompts run again, and together from the prompts' keys and values in the expert's paged KV cache (the
engine's default now, `ngsd.vllm.look_ahead`).

Run in the vLLM environment (`bash scripts/vllm_env.sh`):

    .venv-vllm/bin/python bench/vllm_look_ahead.py --out bench/results/vllm_look_ahead.json

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the look-ahead can be timed where the
engine calls it: every call is a stall of the engine's step. MT-Bench's 80 first turns and AlpacaEval's 100 lowest
odd ids (issue 9's benign sets; the same prompts as `bench/vllm_routes.py`), one token each (the look-ahead runs
at the step that decides a request, its first), default engine settings. One engine; the three ways take turns,
`--rounds` each, and must give the same openings and the same routes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
WAYS = ("alone, prompt again", "together, prompt again", "together, paged prompt")


class TimedLookAhead:
    """Stands where the engine calls its look-ahead: runs the real one the chosen way, and times each call."""

    def __init__(self, opening) -> None:
        self.opening, self.way = opening, WAYS[-1]
        self.calls: list[tuple[int, float]] = []
        self.openings: list[list[int]] = []

    @property
    def step_blocks(self):  # the model's forward sets the step's block table here: it belongs to the real one
        return self.opening.step_blocks

    @step_blocks.setter
    def step_blocks(self, table) -> None:
        self.opening.step_blocks = table

    def __call__(self, prompts, first_logits, steps, rows=None):
        start = time.perf_counter()
        if self.way == WAYS[0]:
            result = [self.opening([p], first_logits[i:i + 1], steps)[0] for i, p in enumerate(prompts)]
        else:
            result = self.opening(prompts, first_logits, steps, rows=rows if self.way == WAYS[2] else None)
        self.calls.append((len(prompts), time.perf_counter() - start))
        self.openings += result
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_look_ahead.json"))
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    from vllm import LLM, SamplingParams

    from ngsd.loading import default_cache_dir
    from ngsd.vllm import engine_kwargs
    from ngsd.vllm.channel import CHANNEL
    from vllm_routes import prompts

    _, rows = prompts()
    load_start = os.getloadavg()
    llm = LLM(**engine_kwargs(str(default_cache_dir()), expert="shipped", alpha=0.9, dtype="float32",
                              max_model_len=2048, enforce_eager=True, seed=0, kv_cache_memory_bytes=1 << 30,
                              max_num_seqs=32))
    if CHANNEL.look_ahead is None:
        sys.exit("this engine has no look-ahead (see its log)")
    timed = TimedLookAhead(CHANNEL.look_ahead)
    CHANNEL.look_ahead = timed
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            timed.way, timed.calls, timed.openings = way, [], []
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": row} for row in rows], SamplingParams(max_tokens=1, temperature=0.0),
                         use_tqdm=False)
            runs[way].append({"wall_s": time.perf_counter() - start, "calls": list(timed.calls),
                              "openings": sorted(map(tuple, timed.openings))})
    if not timed.opening.reads_paged:
        sys.exit("the engine stopped reading prompts from its paged cache (see the warning above)")
    reference = runs[WAYS[0]][0]["openings"]
    if any(run["openings"] != reference for way in WAYS for run in runs[way]):
        sys.exit("the three ways decoded different openings")
    table = {}
    for way in WAYS:
        stalls = [sum(t for _, t in run["calls"]) for run in runs[way]]
        table[way] = {"requests_looked_ahead": sum(n for n, _ in runs[way][0]["calls"]),
                      "look_ahead_calls": len(runs[way][0]["calls"]),
                      "stall_s": round(statistics.median(stalls), 3),
                      "longest_call_s": round(statistics.median(max(t for _, t in run["calls"]) for run in runs[way]),
                                              3),
                      "batch_wall_s": round(statistics.median(run["wall_s"] for run in runs[way]), 2)}
        print(f"{way:24s} {table[way]['requests_looked_ahead']} openings in {table[way]['look_ahead_calls']} calls: "
              f"stall {table[way]['stall_s']:.2f} s (longest call {table[way]['longest_call_s']:.2f} s), "
              f"batch {table[way]['batch_wall_s']:.1f} s", flush=True)
    Path(args.out).write_text(json.dumps({
        "command": "python bench/vllm_look_ahead.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds, "prompts": len(rows),
        "load_average": {"start": load_start, "end": os.getloadavg()}, "table": table}, indent=1) + "\n")
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
