"""Plain vLLM vs guarded vLLM (NGSD inside the engine), side by side, and the same work on the project's loop.

Run in the vLLM environment (`bash scripts/vllm_env.sh`):

    .venv-vllm/bin/python bench/bench_vllm.py --concurrency 32 128 --new-tokens 64 --rounds 2

Workload: N requests at once (`--workload mixed`: half AdvBench ids < 130, half AlpacaEval odd ids;
`benign`: AlpacaEval odd ids only; chat-templated exactly as `ngsd.generate` encodes them), greedy, a
fixed number of new tokens per request (EOS ignored). Three engines: plain vLLM, the guarded engine
with every request at alpha 0.9 (`risk="off"`), and the guarded engine with its default settings
(`risk="auto"`: the risk probe routes, the divergence check confirms, the rest guarded at 0.9). Prefix
caching is off in all three (the probe needs it off, and the rounds repeat the same prompts, which a
prefix cache would serve from memory). Throughput = generated tokens / wall time of
the whole batch (prefill included). Both engines stay loaded and run in turn within each round;
the ratio is taken per round, then the median (the steadier number on a shared machine). The
project's own loop (`guarded_generate`, shipped LoRA in the base's batch, and plain HF
`generate`) runs the same prompts on one torch thread, as vLLM's CPU worker does here (it binds
one core and leaves the other to the front end).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from harness import environment, median, write_json  # noqa: E402  (sets OMP_WAIT_POLICY before torch)

import torch  # noqa: E402

ALPHA = 0.9
MAX_MODEL_LEN = 512
BLOCK = 32  # KV block size in tokens (vLLM's CPU default, 128, wastes most of a block on short requests)


def prompt_ids(n: int, workload: str = "mixed") -> list[list[int]]:
    from bench_default import workload_prompts

    import ngsd

    _, tokenizer = ngsd.load_model()
    ids, mask = ngsd.encode_prompts(tokenizer, workload_prompts(workload, n))
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def build_engines(model_path: str, kv_bytes: int, max_num_seqs: int):
    from vllm import LLM

    from ngsd.vllm import engine_kwargs

    common = dict(dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0, kv_cache_memory_bytes=kv_bytes, block_size=BLOCK,
                  max_num_seqs=max_num_seqs, enforce_eager=True, disable_log_stats=False, enable_prefix_caching=False)
    before = descendant_pids()
    plain = LLM(model=model_path, **common)
    plain.ngsd_bench_pids = descendant_pids() - before  # its engine core and worker
    guarded = LLM(**engine_kwargs(model_path, expert="shipped", alpha=ALPHA, risk="off", **common))  # no routing
    guarded.ngsd_bench_pids = descendant_pids() - before - plain.ngsd_bench_pids
    default = LLM(**engine_kwargs(model_path, expert="shipped", alpha=ALPHA, **common))  # risk="auto": routing
    default.ngsd_bench_pids = descendant_pids() - before - plain.ngsd_bench_pids - guarded.ngsd_bench_pids
    return {"plain_vllm": plain, "guarded_vllm": guarded, "default_vllm": default}


def descendant_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def time_vllm(llm, prompts: list[list[int]], new_tokens: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    load = os.getloadavg()[0]
    cpu = cpu_s(llm.ngsd_bench_pids)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    cpu = cpu_s(llm.ngsd_bench_pids) - cpu
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    preemptions = sum(o.metrics.num_preemptions for o in outputs if o.metrics is not None)
    return {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "tok_per_s": tokens / wall, "tok_per_cpu_s": tokens / cpu,
            "load_1min": load, "preemptions": preemptions}


def cpu_s(pids: set[int]) -> float:
    """CPU seconds of this process and the engine's own processes (not the other engine's idle ones).

    On a machine other jobs keep busy, CPU time is the steadier measure of work than wall time.
    """
    import psutil

    total = time.process_time()
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def time_loop(prompts: list[list[int]], new_tokens: int, guarded: bool) -> dict:
    import ngsd
    from ngsd.api import left_pad

    model, tokenizer = ngsd.load_model()
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
    # warm-up outside the timing, as the engines get: the adapter's load (cached after) and first-call allocations
    if guarded:
        ngsd.guarded_generate(model, ids[:2], mask[:2], expert="shipped", alpha=ALPHA, max_new_tokens=2,
                              eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    else:
        model.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=2, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    load = os.getloadavg()[0]
    cpu = time.process_time()
    start = time.perf_counter()
    if guarded:
        out = ngsd.guarded_generate(model, ids, mask, expert="shipped", alpha=ALPHA, max_new_tokens=new_tokens,
                                    eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        tokens = sum(len(t.tokens) for t in out.traces)
    else:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    return {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "tok_per_s": tokens / wall, "tok_per_cpu_s": tokens / cpu,
            "load_1min": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workload", choices=("mixed", "benign"), default="mixed")
    parser.add_argument("--no-loop", action="store_true", help="skip the project's own loop")
    parser.add_argument("--out", default="vllm.json")
    args = parser.parse_args()

    from ngsd.loading import default_cache_dir

    torch.set_num_threads(1)
    env = environment("cpu")
    prompts = {n: prompt_ids(n, args.workload) for n in args.concurrency}
    longest = max(len(ids) for batch in prompts.values() for ids in batch) + args.new_tokens
    # room for every request at once in both engines, so neither preempts: whole blocks of both stacks' KV
    # (2 stacks x 30 layers x K,V x 3 heads x 64 x fp32 per token); the plain engine gets the same bytes
    blocks = max(args.concurrency) * (-(-longest // BLOCK) + 1)
    blocks = max(blocks, MAX_MODEL_LEN // BLOCK + 1)  # vLLM refuses a cache that cannot hold one full-length request
    kv_bytes = blocks * BLOCK * 2 * 30 * 2 * 3 * 64 * 4
    engines = build_engines(str(default_cache_dir()), kv_bytes, max(args.concurrency))
    for name, llm in engines.items():  # warm-up: first-call allocations stay out of the timing
        time_vllm(llm, prompts[min(args.concurrency)][:4], 4)

    results: dict[str, dict] = {}
    for n in args.concurrency:
        rounds = []
        for r in range(args.rounds):
            row = {name: time_vllm(llm, prompts[n], args.new_tokens) for name, llm in engines.items()}
            row["ratio"] = row["guarded_vllm"]["tok_per_s"] / row["plain_vllm"]["tok_per_s"]
            row["ratio_cpu"] = row["guarded_vllm"]["tok_per_cpu_s"] / row["plain_vllm"]["tok_per_cpu_s"]
            row["ratio_default"] = row["default_vllm"]["tok_per_s"] / row["plain_vllm"]["tok_per_s"]
            row["ratio_default_cpu"] = row["default_vllm"]["tok_per_cpu_s"] / row["plain_vllm"]["tok_per_cpu_s"]
            print(f"N={n} round {r}: plain {row['plain_vllm']['tok_per_s']:.1f} tok/s, guarded "
                  f"{row['guarded_vllm']['tok_per_s']:.1f} tok/s, ratio {row['ratio']:.2f} (CPU time "
                  f"{row['ratio_cpu']:.2f}), default {row['default_vllm']['tok_per_s']:.1f} tok/s, ratio "
                  f"{row['ratio_default']:.2f} (CPU time {row['ratio_default_cpu']:.2f}), preemptions "
                  f"{row['guarded_vllm']['preemptions']} / {row['default_vllm']['preemptions']}", flush=True)
            rounds.append(row)
        summary = {
            "plain_vllm_tok_per_s": median([r["plain_vllm"]["tok_per_s"] for r in rounds]),
            "guarded_vllm_tok_per_s": median([r["guarded_vllm"]["tok_per_s"] for r in rounds]),
            "ratio_guarded_over_plain": median([r["ratio"] for r in rounds]),
            "ratio_by_cpu_time": median([r["ratio_cpu"] for r in rounds]),
            "default_vllm_tok_per_s": median([r["default_vllm"]["tok_per_s"] for r in rounds]),
            "ratio_default_over_plain": median([r["ratio_default"] for r in rounds]),
            "ratio_default_by_cpu_time": median([r["ratio_default_cpu"] for r in rounds]),
            "rounds": rounds,
        }
        if not args.no_loop:
            for name, guarded in (("loop_unguarded_hf_generate", False), ("loop_guarded_ngsd", True)):
                summary[name] = time_loop(prompts[n], args.new_tokens, guarded)
                print(f"N={n} {name}: {summary[name]['tok_per_s']:.1f} tok/s", flush=True)
            summary["guarded_vllm_over_guarded_loop"] = (summary["guarded_vllm_tok_per_s"]
                                                        / summary["loop_guarded_ngsd"]["tok_per_s"])
        results[str(n)] = summary

    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()
    env["load_average_at_end"] = list(os.getloadavg())
    write_json(args.out, {
        "command": ".venv-vllm/bin/python bench/bench_vllm.py " + " ".join(sys.argv[1:]),
        "environment": env,
        "vllm": __import__("vllm").__version__,
        "setup": {"model": "SmolLM2-135M-Instruct (default, fp32)", "expert": "shipped LoRA, merged (full depth)",
                  "alpha": ALPHA, "new_tokens": args.new_tokens, "greedy": True, "ignore_eos": True,
                  "vllm_worker_threads": "1 (vLLM binds one core, reserves the other)", "loop_threads": 1,
                  "enforce_eager": True, "prefix_caching": False, "default_engine": "risk='auto' (probe, routing, check)",
                  "workload": {"mixed": "half AdvBench ids < 130, half AlpacaEval odd ids",
                               "benign": "AlpacaEval odd ids"}[args.workload]},
        "results": results,
    })


if __name__ == "__main__":
    main()
