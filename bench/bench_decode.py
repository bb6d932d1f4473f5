"""End-to-end decoding benchmarks: what guarding costs against plain `generate`, and against the naive decoder.

Subcommands (each writes one JSON file under ``bench/results/``):

- ``e2e``: generated tokens/s, time to first token, per-step latency and peak memory of
  unguarded ``model.generate`` (greedy) and the guarded loop with a LoRA expert in one batched
  forward, a separate (merged) expert model, the gate forced open, SafeDecoding, and the guarded
  loop with the gate off (base only, to isolate the loop's own cost), at several batch sizes.
  Every method runs with the same prompts, greedy, exactly ``--new-tokens`` tokens per row (no
  EOS stop) and an explicit alpha (no self-reflection inside the timing). The methods are
  interleaved round by round (a different order each round) so that load from other processes
  hits all of them alike; the medians over rounds are reported, and the ratio to unguarded is the
  median of the per-round ratios.
- ``naive``: the same guarded decoding against ``naive_reference.py`` (one sequence at a time, no
  KV cache, both models recompute the whole sequence every step: the way the reference code runs), at equal greedy
  output (checked on every timed prompt and reported).
- ``breakdown``, ``rows`` and ``reflection``: see ``bench_breakdown.py``.
- ``report``: plots and ``RESULTS.md`` from the JSON files (``plots.py``).
- ``all``: everything above in one go, then the report.

    python bench/bench_decode.py all                 # full run (about 40 minutes on a 2-core CPU)
    python bench/bench_decode.py e2e --quick         # a smoke run: 2 batch sizes, 8 tokens

Runs on CUDA when available (``--device``); nothing here assumes a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# harness first: it sets the OpenMP wait policy and the import paths before torch is imported
from harness import (
    DEFAULT_ALPHA,
    METHOD_LABELS,
    METHODS,
    RESULTS_DIR,
    RunTiming,
    Setup,
    TimingStreamer,
    benchmark_prompts,
    common_meta,
    cpu_clock,
    default_device,
    expert_sizes,
    load_setup,
    median,
    method_runners,
    positive_int,
    timed_call,
    write_json,
)

import torch  # noqa: E402  (after harness)

NAIVE_MAX_REPEATS = 3  # timed rounds of the naive per-sequence decoder (slow), whatever --repeats asks


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def run_e2e(
    setup: Setup,
    batch_sizes: Sequence[int],
    new_tokens: int,
    repeats: int,
    methods: Sequence[str] = METHODS,
    warmup_tokens: int = 8,
    alpha: float = DEFAULT_ALPHA,
    log: Callable[[str], None] = print,
    on_batch_done: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every method at every batch size; `on_batch_done(batch, summary)` after each batch size
    (the command line saves there, so a run stopped part-way keeps what it finished)."""
    runners = method_runners(setup, alpha)
    unknown = set(methods) - set(runners)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {list(runners)}")
    if "ngsd_model" in methods:
        setup.expert_model  # load before any timing
    prompts = benchmark_prompts(max(batch_sizes))
    results: dict[str, Any] = {"batches": {}}
    for batch in batch_sizes:
        ids, mask = setup.encode(prompts[:batch])
        for name in methods:  # warm-up: allocator, kernels, lazy imports
            runners[name](ids, mask, warmup_tokens, TimingStreamer(setup.device))
        runs: dict[str, list[RunTiming]] = {name: [] for name in methods}
        for round_index in range(repeats):
            shift = round_index % len(methods)
            order = list(methods[shift:]) + list(methods[:shift])
            for name in order:
                timing = timed_call(lambda s, n=name: runners[n](ids, mask, new_tokens, s), setup.device)
                if tuple(timing.tokens.shape) != (batch, new_tokens):
                    raise RuntimeError(f"{name} made {tuple(timing.tokens.shape)} tokens, expected {(batch, new_tokens)}")
                runs[name].append(timing)
                log(
                    f"batch {batch:3d} round {round_index + 1}/{repeats} {name:18s} "
                    f"{batch * new_tokens / timing.seconds:8.1f} tok/s  {timing.seconds:7.2f} s"
                )
        summary = summarise_batch(runs, batch, new_tokens, ids, mask)
        summary["measured"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": list(os.getloadavg())}
        results["batches"][str(batch)] = summary
        if on_batch_done is not None:
            on_batch_done(batch, summary)
    return results


def summarise_batch(
    runs: dict[str, list[RunTiming]], batch: int, new_tokens: int, ids: torch.Tensor, mask: torch.Tensor
) -> dict[str, Any]:
    generated = batch * new_tokens
    out: dict[str, Any] = {
        "prompt_width": int(ids.shape[1]),
        "mean_prompt_tokens": float(mask.sum(-1).float().mean()),
        "methods": {},
    }
    baseline = runs.get("unguarded")
    for name, timings in runs.items():
        seconds = [t.seconds for t in timings]
        summary: dict[str, Any] = {
            "label": METHOD_LABELS.get(name, name),
            "seconds": seconds,
            "tokens_per_s": [generated / s for s in seconds],
            "median_tokens_per_s": generated / median(seconds),
            "median_seconds": median(seconds),
            "median_ttft_s": median([t.ttft_s for t in timings]),
            "median_step_latency_s": median([median(t.step_latencies_s) for t in timings]),
            "per_token_latency_s": median(seconds) / new_tokens,
            "cpu_seconds": [t.cpu_seconds for t in timings],
            "median_tokens_per_cpu_s": generated / median([t.cpu_seconds for t in timings]),
            "median_cpu_step_s": median([median(t.cpu_step_latencies_s) for t in timings]),
            "peak_memory_bytes": max(t.peak_bytes for t in timings),
            "memory_before_bytes": min(t.before_bytes for t in timings),
        }
        if baseline is not None:
            # paired per round: both ran back to back under the same background load
            ratios = [b.seconds / t.seconds for b, t in zip(baseline, timings)]
            summary["ratio_to_unguarded"] = median(ratios)
            summary["ratio_to_unguarded_per_round"] = ratios
            cpu_ratios = [b.cpu_seconds / t.cpu_seconds for b, t in zip(baseline, timings)]
            summary["cpu_ratio_to_unguarded"] = median(cpu_ratios)
            summary["cpu_ratio_to_unguarded_per_round"] = cpu_ratios
            summary["same_tokens_as_unguarded"] = bool(torch.equal(timings[0].tokens, baseline[0].tokens))
        out["methods"][name] = summary
    return out


# ---------------------------------------------------------------------------------------------
# Against the naive per-sequence decoder
# ---------------------------------------------------------------------------------------------


def run_naive(
    setup: Setup,
    n_prompts: int,
    new_tokens: int,
    repeats: int,
    throughput_batch: int = 32,
    alpha: float = DEFAULT_ALPHA,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from naive_reference import TimedForward, naive_reference_decode

    runners = method_runners(setup, alpha)
    guarded = runners["ngsd_lora"]
    prompts = benchmark_prompts(max(n_prompts, throughput_batch))
    base_fn = TimedForward(setup.model)
    expert_fn = TimedForward(setup.expert_model)
    guarded(*setup.encode(prompts[:1]), 4, TimingStreamer(setup.device))  # warm-up
    naive_reference_decode(base_fn, expert_fn, setup.encode(prompts[:1])[0][0].tolist(), alpha=alpha, max_new_tokens=2)

    per_prompt = []
    naive_tokens: list[list[int]] = []
    for index, prompt in enumerate(prompts[:n_prompts]):
        ids, mask = setup.encode([prompt])
        guarded_runs = [timed_call(lambda s: guarded(ids, mask, new_tokens, s), setup.device)]
        base_fn.seconds = expert_fn.seconds = 0.0
        start, cpu_start = time.perf_counter(), cpu_clock()
        tokens, spikes = naive_reference_decode(base_fn, expert_fn, ids[0].tolist(), alpha=alpha, max_new_tokens=new_tokens)
        naive_seconds, naive_cpu = time.perf_counter() - start, cpu_clock() - cpu_start
        forward_seconds = base_fn.seconds + expert_fn.seconds
        for _ in range(max(0, repeats - 1)):
            guarded_runs.append(timed_call(lambda s: guarded(ids, mask, new_tokens, s), setup.device))
        guarded_tokens = guarded_runs[0].tokens[0].tolist()
        # Equal work is the premise of the speed-up: a difference is recorded and reported, not hidden.
        first_difference = next((i for i, (a, b) in enumerate(zip(guarded_tokens, tokens)) if a != b), None)
        guarded_seconds = median([t.seconds for t in guarded_runs])
        guarded_cpu = median([t.cpu_seconds for t in guarded_runs])
        row = {
            "prompt_tokens": int(ids.shape[1]),
            "naive_seconds": naive_seconds,
            "naive_forward_seconds": forward_seconds,
            "naive_python_seconds": naive_seconds - forward_seconds,
            "naive_tokens_per_s": new_tokens / naive_seconds,
            "guarded_seconds": guarded_seconds,
            "guarded_tokens_per_s": new_tokens / guarded_seconds,
            "speedup": naive_seconds / guarded_seconds,
            "naive_cpu_seconds": naive_cpu,
            "guarded_cpu_seconds": guarded_cpu,
            "cpu_speedup": naive_cpu / guarded_cpu,
            "equal_tokens": first_difference is None,
            "first_difference": first_difference,
            "spikes": int(sum(spikes)),
        }
        per_prompt.append(row)
        naive_tokens.append(tokens)
        log(
            f"naive prompt {index}: naive {row['naive_tokens_per_s']:.2f} tok/s "
            f"(forward {forward_seconds:.1f} s of {naive_seconds:.1f} s), guarded b1 {row['guarded_tokens_per_s']:.2f} tok/s, "
            f"speed-up {row['speedup']:.1f}x, "
            + ("equal tokens" if first_difference is None else f"outputs differ from token {first_difference}")
        )

    naive_seconds_per_sequence = statistics.mean(r["naive_seconds"] for r in per_prompt)
    naive_throughput = new_tokens / naive_seconds_per_sequence
    naive_cpu_throughput = new_tokens / statistics.mean(r["naive_cpu_seconds"] for r in per_prompt)

    ids, mask = setup.encode(prompts[:throughput_batch])
    batch_runs = [timed_call(lambda s: guarded(ids, mask, new_tokens, s), setup.device) for _ in range(repeats)]
    batch_seconds = median([t.seconds for t in batch_runs])
    batch_throughput = throughput_batch * new_tokens / batch_seconds
    batch_cpu_throughput = throughput_batch * new_tokens / median([t.cpu_seconds for t in batch_runs])
    rows_equal = [batch_runs[0].tokens[i].tolist() == naive_tokens[i] for i in range(min(n_prompts, throughput_batch))]
    log(
        f"naive throughput {naive_throughput:.2f} tok/s (one sequence at a time), guarded batch {throughput_batch} "
        f"{batch_throughput:.1f} tok/s: {batch_throughput / naive_throughput:.1f}x; "
        f"batch rows equal to naive: {sum(rows_equal)}/{len(rows_equal)}"
    )
    return {
        "new_tokens": new_tokens,
        "alpha": alpha,
        "prompts_timed": n_prompts,
        "per_prompt": per_prompt,
        "batch1": {
            "naive_tokens_per_s": median([r["naive_tokens_per_s"] for r in per_prompt]),
            "guarded_tokens_per_s": median([r["guarded_tokens_per_s"] for r in per_prompt]),
            "speedup": median([r["speedup"] for r in per_prompt]),
            "cpu_speedup": median([r["cpu_speedup"] for r in per_prompt]),
            "naive_forward_share": sum(r["naive_forward_seconds"] for r in per_prompt)
            / sum(r["naive_seconds"] for r in per_prompt),
        },
        "throughput": {
            "batch": throughput_batch,
            "guarded_tokens_per_s": batch_throughput,
            "guarded_seconds": [t.seconds for t in batch_runs],
            "naive_tokens_per_s": naive_throughput,
            "naive_extrapolated_seconds_for_batch": naive_seconds_per_sequence * throughput_batch,
            "speedup": batch_throughput / naive_throughput,
            "cpu_speedup": batch_cpu_throughput / naive_cpu_throughput,
            "batch_rows_equal_to_naive": rows_equal,
            "note": (
                f"the naive decoder handles one sequence at a time; its throughput is {new_tokens} tokens over the "
                f"mean time per sequence measured on the first {n_prompts} prompts, so {throughput_batch} sequences "
                f"are extrapolated as {throughput_batch} x that time (its cost grows with sequence length; the timed "
                "prompts' lengths are listed per prompt)"
            ),
        },
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _earlier_e2e(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Batch sizes an earlier e2e run with the same settings measured ({} if none or different)."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if any(earlier.get(key) != value for key, value in settings.items()):
        return {}
    return dict(earlier.get("batches", {}))


def cmd_e2e(args: argparse.Namespace, setup: Setup | None = None) -> int:
    setup = setup or load_setup(args.model, args.device, args.dtype, args.expert)
    batches = [1, 2] if args.quick else args.batch_sizes
    tokens = 8 if args.quick else args.new_tokens
    repeats = 1 if args.quick else args.repeats
    path = Path(args.out_dir) / (args.out_prefix + "e2e.json")
    settings = {"new_tokens": tokens, "repeats": repeats, "alpha": args.alpha, "methods": list(args.methods),
                "expert": {"path": str(setup.adapter_dir), "source": setup.expert_source, **expert_sizes(setup)},
                "run": {"model": args.model, "device": args.device, "dtype": args.dtype, "threads": args.threads}}
    # With --resume, batch sizes an earlier run with the same settings measured are kept and skipped; without it the
    # file holds what this command measured (it kept the earlier batches under the new run's command and environment)
    done = _earlier_e2e(path, settings) if args.resume else {}
    todo = [b for b in batches if not (args.resume and str(b) in done)]
    meta = common_meta(setup, args)

    def save(batch: int, summary: dict[str, Any]) -> None:
        done[str(batch)] = summary
        meta["environment"]["load_average_at_end"] = list(os.getloadavg())
        ordered = {k: done[k] for k in sorted(done, key=int)}
        write_json(path.name, {**meta, **settings, "batches": ordered}, path.parent)

    if todo:
        run_e2e(setup, todo, tokens, repeats, args.methods, alpha=args.alpha, on_batch_done=save)
    else:
        print(f"e2e: every batch size already in {path} (--resume)")
    return 0


def cmd_naive(args: argparse.Namespace, setup: Setup | None = None) -> int:
    setup = setup or load_setup(args.model, args.device, args.dtype, args.expert)
    n_prompts = 1 if args.quick else args.naive_prompts
    tokens = 8 if args.quick else args.new_tokens
    batch = 2 if args.quick else args.naive_batch
    repeats = 1 if args.quick else min(args.repeats, NAIVE_MAX_REPEATS)
    meta = common_meta(setup, args)  # first: its date and load average are the run's start
    results = {"repeats": repeats, **run_naive(setup, n_prompts, tokens, repeats, batch, alpha=args.alpha)}
    meta["environment"]["load_average_at_end"] = list(os.getloadavg())
    write_json(args.out_prefix + "naive.json", {**meta, **results}, args.out_dir)
    return 0


def cmd_breakdown(args: argparse.Namespace, setup: Setup | None = None) -> int:
    import bench_breakdown

    return bench_breakdown.cmd_breakdown(args, setup or load_setup(args.model, args.device, args.dtype, args.expert))


def cmd_guarded_rows(args: argparse.Namespace, setup: Setup | None = None) -> int:
    import bench_breakdown

    return bench_breakdown.cmd_guarded_rows(args, setup or load_setup(args.model, args.device, args.dtype, args.expert))


def cmd_reflection(args: argparse.Namespace, setup: Setup | None = None) -> int:
    import bench_breakdown

    return bench_breakdown.cmd_reflection(args, setup or load_setup(args.model, args.device, args.dtype, args.expert))


def cmd_report(args: argparse.Namespace, setup: Setup | None = None) -> int:
    import plots

    return plots.write_report(args.out_dir, prefix=args.out_prefix)


def cmd_all(args: argparse.Namespace) -> int:
    """Everything, then the report. With --resume, parts whose JSON exists are skipped (e2e: batch sizes)."""
    setup = load_setup(args.model, args.device, args.dtype, args.expert)
    outputs = {cmd_breakdown: "breakdown.json", cmd_naive: "naive.json", cmd_reflection: "reflection.json"}
    for step in (cmd_breakdown, cmd_e2e, cmd_naive, cmd_reflection, cmd_report):
        name = step.__name__[4:]
        if args.resume and step in outputs and (Path(args.out_dir) / (args.out_prefix + outputs[step])).is_file():
            print(f"== {name}: kept from an earlier run (--resume) ==", flush=True)
            continue
        print(f"== {name} ==", flush=True)
        step(args, setup)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "e2e": (cmd_e2e, "throughput and latency of every method at several batch sizes"),
        "naive": (cmd_naive, "speed-up over the per-sequence no-cache decoder at equal output"),
        "breakdown": (cmd_breakdown, "one decode step: forward vs selection op vs loop overhead"),
        "rows": (cmd_guarded_rows, "one decode forward with R of B rows guarded: their rows vs the LoRA hooks"),
        "reflection": (cmd_reflection, "self-reflection cost per request: generate vs prefill"),
        "report": (cmd_report, "plots and RESULTS.md from the JSON files"),
        "all": (cmd_all, "everything, then the report"),
    }
    for name, (func, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: SmolLM2-135M-Instruct)")
        p.add_argument("--expert", default=None, help="peft LoRA folder (default: shipped expert, else a stand-in)")
        p.add_argument("--device", default=default_device())
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8, 32])
        p.add_argument("--new-tokens", type=positive_int, default=128)
        p.add_argument("--repeats", type=positive_int, default=3,
                       help=f"timed rounds per batch size (median reported; the naive decoder: at most "
                            f"{NAIVE_MAX_REPEATS}, recorded in naive.json)")
        p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
        p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
        p.add_argument("--naive-prompts", type=positive_int, default=3, help="prompts the naive decoder is timed on")
        p.add_argument("--naive-batch", type=positive_int, default=32, help="batch for the throughput comparison")
        p.add_argument("--breakdown-batch", type=positive_int, nargs="+", default=[1, 32])
        p.add_argument("--breakdown-steps", type=positive_int, default=32)
        p.add_argument("--rows-batch", type=positive_int, default=32, help="batch of the `rows` command")
        p.add_argument("--guarded-rows", type=positive_int, nargs="+", default=[1, 4, 16, 32],
                       help="guarded rows the `rows` command times (each against the batch's plain forward)")
        p.add_argument("--reflection-requests", type=positive_int, default=8)
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one round")
        p.add_argument("--resume", action="store_true",
                       help="keep results an interrupted run already wrote (e2e: per batch size) and do the rest")
        p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
        p.add_argument("--out-prefix", default="", help="prefix for the JSON names (e.g. 'quick_')")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
