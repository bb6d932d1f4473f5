"""Does a guarded vLLM engine decide the benign suites as the library does? Fidelity and routes, side by side.

Run in the vLLM environment (`bash scripts/vllm_env.sh`):

    .venv-vllm/bin/python bench/vllm_routes.py --out bench/results/vllm_routes.json

MT-Bench's 80 first turns and AlpacaEval's 100 lowest odd ids (issue 9's benign sets), chat-templated as
`ngsd.generate` encodes them, greedy, 64 new tokens, on three engines, each in a process of its own: plain vLLM,
the guarded engine with its default settings (risk probe, routing, divergence check and its look-ahead), and the
same with the look-ahead off (`reflection={"check_rollout": 0}`, how every engine decided until stop 56).
Fidelity = a request's first 32 tokens equal to plain vLLM's (issue 9's measure). Each engine's guarded requests
are compared with the library's default on the same prompts, read from its committed evaluation
(`reports/routing_full_rollout/results.json`: a row's alpha > 0). Wall time per engine is the batch's, for
orientation only (one run, the look-ahead blocks the engine step it runs in).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_RUN = ROOT / "reports" / "routing_full_rollout" / "results.json"
SUITES = (("mt_bench", 80), ("alpaca_eval", 100))
ENGINES = ("plain", "default", "no_look_ahead")
NEW_TOKENS, FIDELITY_TOKENS = 64, 32


def prompts() -> tuple[list[str], list[list[int]]]:
    import ngsd
    from ngsd.data import load_suite

    _, tokenizer = ngsd.load_model()
    names, texts = [], []
    for suite, limit in SUITES:
        rows = load_suite(suite, limit=limit)
        names += [suite] * len(rows)
        texts += [row.text for row in rows]
    ids, mask = ngsd.encode_prompts(tokenizer, texts)
    return names, [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def run_engine(engine: str, out: Path) -> None:
    """One engine on every prompt (in this process): its tokens, wall time and verdicts."""
    from vllm import LLM, SamplingParams

    from ngsd.loading import default_cache_dir
    from ngsd.vllm import engine_kwargs
    from ngsd.vllm.risk import prompt_key

    names, rows = prompts()
    model = str(default_cache_dir())
    common = dict(dtype="float32", max_model_len=2048, enforce_eager=True, seed=0, kv_cache_memory_bytes=1 << 30,
                  max_num_seqs=32)
    log = out.with_suffix(".verdicts.jsonl")
    log.unlink(missing_ok=True)
    if engine == "plain":
        llm = LLM(model=model, **common)
    else:
        reflection = {"check_rollout": 0} if engine == "no_look_ahead" else None
        llm = LLM(**engine_kwargs(model, expert="shipped", alpha=0.9, verdict_log=str(log), reflection=reflection,
                                  **common))
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": row} for row in rows],
                           SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0), use_tqdm=False)
    wall = time.perf_counter() - start
    verdicts = {}
    if log.exists():
        verdicts = {line["prompt_key"]: line for line in map(json.loads, log.read_text().splitlines()) if line}
    out.write_text(json.dumps({"wall_s": wall, "names": names,
                               "tokens": [list(o.outputs[0].token_ids) for o in outputs],
                               "verdicts": [verdicts.get(prompt_key(row)) for row in rows]}))
    llm.llm_engine.engine_core.shutdown()


def library_guarded() -> dict[str, list[bool]]:
    run = json.loads(LIBRARY_RUN.read_text())
    per_prompt, alpha = run["per_prompt"]["ngsd"], run["per_prompt_fields"].index("alpha")
    return {suite: [row[alpha] > 0 for row in per_prompt[suite][:limit]] for suite, limit in SUITES}


def summary(runs: dict[str, dict]) -> dict[str, dict]:
    plain, library = runs["plain"], library_guarded()
    table: dict[str, dict] = {}
    for engine in ENGINES[1:]:
        run = runs[engine]
        for suite, _ in SUITES:
            rows = [i for i, name in enumerate(run["names"]) if name == suite]
            guarded = [not (run["verdicts"][i] or {}).get("routed", False) for i in rows]
            table[f"{engine}/{suite}"] = {
                "prompts": len(rows),
                "fidelity": sum(run["tokens"][i][:FIDELITY_TOKENS] == plain["tokens"][i][:FIDELITY_TOKENS]
                                for i in rows),
                "guarded": sum(guarded),
                "library_guarded": sum(library[suite]),
                "guarded_as_the_library": sum(g == want for g, want in zip(guarded, library[suite])),
                "look_ahead_ran": sum((run["verdicts"][i] or {}).get("expert_opening") is not None for i in rows),
            }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/vllm_routes.json")
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # one engine, in a child process
    parser.add_argument("--engine-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        run_engine(args.engine, Path(args.engine_out))
        return
    runs, load = {}, {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as scratch:
        for engine in ENGINES:
            out = Path(scratch) / f"{engine}.json"
            subprocess.run([sys.executable, __file__, "--engine", engine, "--engine-out", str(out)], check=True)
            runs[engine] = json.loads(out.read_text())
    load["end"] = os.getloadavg()
    table = summary(runs)
    result = {"command": " ".join(["python", "bench/vllm_routes.py", *sys.argv[1:]]), "load_average": load,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "wall_s": {engine: round(run["wall_s"], 1) for engine, run in runs.items()}, "table": table}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for key, row in table.items():
        print(f"{key}: fidelity {row['fidelity']}/{row['prompts']}, guarded {row['guarded']} (library "
              f"{row['library_guarded']}; same decision on {row['guarded_as_the_library']}), look-ahead ran on "
              f"{row['look_ahead_ran']}")
    print("wall s:", result["wall_s"])


if __name__ == "__main__":
    main()
