"""Per-step time of the guarded decode step op on CPU: the PyTorch path vs a naive unfused version.

Both are timed in the same run on the same inputs (B in {1, 8, 32, 128}, V = 49152 by default):

- ``op``: ``torch.ops.ngsd.guarded_select`` on CPU tensors, i.e. what ``guarded_select(...,
  backend="auto")`` runs on CPU (the batched PyTorch reference behind the custom op);
- ``naive``: ``bench/naive_select.py``, a per-row Python loop with separate softmaxes, host
  round trips and set operations.

Half the rows spike (potential 0 / 2 alternating, v_th = 1), so both the mixing and the plain
branch are exercised. Before timing, the tokens, spikes and potentials of both are compared.
Prints a Markdown table and writes JSON (``--out``, default ``bench/results/select_op.json``).
The Triton kernels are not timed here: on CPU they only run in the (numpy) interpreter, whose
speed means nothing; see ``bench/ROOFLINE.md`` for their GPU cost model.

``--hidden H`` times instead the hidden-state step on CPU against the logits path it replaces: the
loop's LM head on the 2B stacked base/expert rows (``F.linear``, as ngsd's decode steps run it)
then ``torch.ops.ngsd.guarded_select``, vs ``torch.ops.ngsd.guarded_select_from_hidden`` (and the
public wrapper) on the same hidden states and a shared [V, H] head; tokens are compared first.

``--traffic`` prints instead the memory traffic model behind ROOFLINE.md: for the unfused PyTorch
paths, every aten op they dispatch (counted with a TorchDispatchMode on CPU: bytes of tensor
inputs read and outputs written, view ops free, host synchronisations); for the fused kernels,
the bytes of logits and scratch each launch reads and writes, from the launch plan.

    python3 bench/bench_select_op.py --out bench/results/select_op.json
    python3 bench/bench_select_op.py --traffic
    python3 bench/bench_select_op.py --hidden 576 --batches 1 32 --out bench/results/hidden_op_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from naive_select import naive_guarded_select  # noqa: E402

from ngsd_kernels import CandidateMode, StepParams  # noqa: E402

PARAMS = dict(
    tau=8.0, v_th=1.0, v_reset=0.0, rho=0.6, candidate_k=64, candidate_mode=int(CandidateMode.UNION),
    min_candidates=5, divergence=0, gate=0, temperature=0.0, top_k=0, top_p=1.0, score_floor=1e-8,
)


def make_inputs(batch: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, vocab, generator=gen) * 2.0
    expert = base + torch.randn(batch, vocab, generator=gen)
    potential = torch.tensor([0.0 if i % 2 == 0 else 2.0 for i in range(batch)])
    alpha = torch.full((batch,), 0.9)
    zero = torch.zeros(1, dtype=torch.int64)
    return base, expert, potential, alpha, zero, zero


def time_interleaved(fns: dict, min_repeats: int, min_seconds: float) -> dict:
    """Per-call cost of each callable, calls interleaved so that all see the same machine state.

    Primary: CPU time of the calling thread (``time.thread_time``; with one torch thread all the
    op's work runs there), which does not count time spent waiting for a core on a shared
    machine. Secondary: wall time.
    """
    for fn in fns.values():  # warm-up (allocator, first-call dispatch)
        fn()
        fn()
    cpu = {name: [] for name in fns}
    wall = {name: [] for name in fns}
    start = time.perf_counter()
    while min(len(v) for v in cpu.values()) < min_repeats or time.perf_counter() - start < min_seconds:
        for name, fn in fns.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            fn()
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {
        name: {
            "cpu_median_ms": 1e3 * statistics.median(cpu[name]),
            "cpu_min_ms": 1e3 * min(cpu[name]),
            "wall_median_ms": 1e3 * statistics.median(wall[name]),
            "repeats": len(cpu[name]),
        }
        for name in fns
    }


def run(batches: list[int], vocab: int, min_repeats: int, min_seconds: float) -> list[dict]:
    rows = []
    for batch in batches:
        base, expert, potential, alpha, seed, offset = make_inputs(batch, vocab)
        args = (base, expert, potential, alpha, seed, offset, *StepParams(**PARAMS).flat())
        naive_kwargs = {k: PARAMS[k] for k in ("tau", "v_th", "v_reset", "rho", "candidate_k")}

        def op():
            return torch.ops.ngsd.guarded_select(*args)

        def naive():
            return naive_guarded_select(base, expert, potential, alpha, **naive_kwargs)

        got_op, got_naive = op(), naive()
        agree = (
            torch.equal(got_op[0], got_naive[0])
            and torch.equal(got_op[2], got_naive[2])
            and torch.allclose(got_op[1], got_naive[1], rtol=1e-5, atol=1e-6)
        )
        if not agree:
            raise SystemExit(f"naive and op disagree at B={batch}; the comparison would be meaningless")
        timed = time_interleaved({"op": op, "naive": naive}, min_repeats, min_seconds)
        t_op, t_naive = timed["op"], timed["naive"]
        rows.append(
            {
                "batch": batch,
                "vocab": vocab,
                "spiking_rows": int(got_op[2].sum()),
                "op": t_op,
                "naive": t_naive,
                "speedup_cpu": t_naive["cpu_median_ms"] / t_op["cpu_median_ms"],
                "speedup_wall": t_naive["wall_median_ms"] / t_op["wall_median_ms"],
            }
        )
        print(f"B={batch}: op {t_op['cpu_median_ms']:.2f} ms, naive {t_naive['cpu_median_ms']:.2f} ms (CPU)",
              file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| B | V | spiking rows | naive CPU ms/step | op CPU ms/step | naive / op (CPU) | naive / op (wall) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['vocab']} | {r['spiking_rows']} | {r['naive']['cpu_median_ms']:.2f} | "
            f"{r['op']['cpu_median_ms']:.2f} | {r['speedup_cpu']:.2f}x | {r['speedup_wall']:.2f}x |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# memory traffic model (--traffic)
# ----------------------------------------------------------------------------------------------

TRAFFIC_MODES = {
    "greedy, union, LIF (NGSD)": dict(),
    "greedy, intersection (SafeDecoding)": dict(candidate_mode=1, candidate_k=10, min_candidates=5, gate=1),
    "sampling T=0.7": dict(temperature=0.7),
    "sampling T=0.7, top-p 0.9": dict(temperature=0.7, top_p=0.9),
}


def _tensor_bytes(t: torch.Tensor) -> int:
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def unfused_traffic(fn, *args, **kwargs) -> dict:
    """Bytes read / written by every aten op `fn` dispatches, op count, host synchronisations."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    totals = {"ops": 0, "read": 0, "written": 0, "syncs": 0}
    sync_ops = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default"}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, call_args=(), call_kwargs=None):
            out = func(*call_args, **(call_kwargs or {}))
            name = str(func)
            if name in sync_ops:
                totals["syncs"] += 1
            if func.is_view or name.startswith("aten.lift_fresh") or name.startswith("aten.detach"):
                return out
            totals["ops"] += 1
            tensors_in = [t for t in tree_leaves((call_args, call_kwargs)) if isinstance(t, torch.Tensor)]
            tensors_out = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            totals["read"] += sum(_tensor_bytes(t) for t in tensors_in)
            totals["written"] += sum(_tensor_bytes(t) for t in tensors_out)
            return out

    with Count():
        fn(*args, **kwargs)
    return totals


def fused_traffic(batch: int, vocab: int, elem: int, **params) -> dict:
    """Bytes each fused launch reads and writes (logits and scratch), from the launch plan."""
    from ngsd_kernels.ops.fused_select import plan_select

    p = plan_select(batch, vocab, StepParams(**params))
    B, NC, K = batch, p.n_chunks, p.buffer
    logits = 2 * B * vocab * elem
    stats = 2 * B * NC * 16  # stats fp32 x4 + counts int32 x4
    # union: p.slots fp32 candidate values per chunk; intersection: p.slots int64 raw keys
    keys1 = 2 * B * NC * p.slots * (4 if p.key_kind == 1 else 8) if p.need_keys else 0
    outcomes = int(p.need_v0) + int(p.need_v1)
    if p.sample == 2:
        # per outcome: sample_slots int64 candidate keys + (mass, certainty floor) fp32
        part_w = outcomes * B * NC * (p.sample_slots * 8 + 8)
        part_r = B * NC * (p.sample_slots * 8 + 8)  # finalize reads the outcome that happened (once from DRAM)
    else:
        part_w = outcomes * B * NC * 8  # best fp32 + besti int32 per outcome
        part_r = B * NC * 8
    inter = p.mode == 1 and p.need_keys
    launches = {
        "pass1": (logits, stats + keys1),
        # intersection: the raw keys are rewritten as order keys in place, then read again (bisection
        # rounds after the first come from L2 / registers, counted once) and compacted into the top-K lists
        "reduce": (stats + keys1 * (2 if inter else 1), B * 32 + (keys1 + 2 * B * K * 8 if inter else 0)),
        "intersection": ((2 * B * K * 8 + B * 48, B * 8) if inter else (0, 0)),
        "pass2": (logits + B * 48, B * NC * 8 + part_w),
        "finalize": (B * NC * 8 + part_r + B * 48, B * 21),
    }
    read = sum(r for r, _ in launches.values())
    written = sum(w for _, w in launches.values())
    return {
        "launches": p.launches, "passes_over_logits": 2, "read": read, "written": written, "logits_bytes": logits,
        "block_v": p.block_v, "n_chunks": NC, "buffer": K, "host_syncs": 0,  # flagged rows are decided on the GPU (logits path)
    }


def traffic_table(batches: list[int], vocabs: list[int], dtype: torch.dtype) -> str:
    from ngsd_kernels import guarded_select_reference

    elem = torch.tensor([], dtype=dtype).element_size()
    lines = [
        f"Logits dtype {dtype}; MB = 1e6 bytes; 'one pass' = reading both [B, V] logits once.",
        "",
        "| mode | B | V | unfused ops | unfused MB | unfused syncs | naive ops | naive MB | naive syncs "
        "| fused launches | fused MB | fused / one pass | fused syncs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, overrides in TRAFFIC_MODES.items():
        params = {**PARAMS, **overrides}
        for vocab in vocabs:
            for batch in batches:
                base, expert, potential, alpha, seed, offset = make_inputs(batch, vocab)
                base, expert = base.to(dtype), expert.to(dtype)
                # the batched reference is data-independent: count it on meta tensors (no memory)
                meta = [t.to("meta") for t in (base, expert, potential, alpha, seed, offset)]
                ref = unfused_traffic(guarded_select_reference, *meta, StepParams(**params))
                naive = {"ops": "", "read": None, "syncs": ""}
                if params["temperature"] == 0.0:
                    naive = unfused_traffic(
                        naive_guarded_select, base, expert, potential, alpha,
                        intersection=bool(params["candidate_mode"]),
                        **{k: params[k] for k in ("tau", "v_th", "v_reset", "rho", "candidate_k", "min_candidates")},
                    )
                fused = fused_traffic(batch, vocab, elem, **params)
                fused_mb = (fused["read"] + fused["written"]) / 1e6
                naive_mb = "" if naive["read"] is None else f"{(naive['read'] + naive['written']) / 1e6:.1f}"
                lines.append(
                    f"| {name} | {batch} | {vocab} | {ref['ops']} | {(ref['read'] + ref['written']) / 1e6:.1f} | "
                    f"{ref['syncs']} | {naive['ops']} | {naive_mb} | {naive['syncs']} | {fused['launches']} | "
                    f"{fused_mb:.2f} | {fused_mb / (fused['logits_bytes'] / 1e6):.2f} | {fused['host_syncs']} |"
                )
    return "\n".join(lines)


def run_hidden(batches: list[int], vocab: int, hidden: int, min_repeats: int, min_seconds: float) -> list[dict]:
    from ngsd_kernels import guarded_select_from_hidden

    params = StepParams(**PARAMS)
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        weight = torch.randn(vocab, hidden, generator=gen) * 0.05
        stacked = torch.randn(2 * batch, hidden, generator=gen)  # base rows, then expert rows (one forward)
        hb, he = stacked[:batch], stacked[batch:]
        _, _, potential, alpha, seed, offset = make_inputs(batch, 8)

        def logits_path():
            logits = torch.nn.functional.linear(stacked, weight)
            return torch.ops.ngsd.guarded_select(logits[:batch], logits[batch:], potential, alpha, seed, offset,
                                                 *params.flat())

        def hidden_op():
            return torch.ops.ngsd.guarded_select_from_hidden(hb, he, weight, None, None, None, potential, alpha,
                                                             seed, offset, *params.flat())

        def hidden_wrapper():
            return guarded_select_from_hidden(hb, he, weight, None, potential, alpha, seed, offset, params)

        fns = {"logits_path": logits_path, "hidden_op": hidden_op, "hidden_wrapper": hidden_wrapper}
        outs = {name: fn() for name, fn in fns.items()}
        agree = all(torch.equal(o[0], outs["logits_path"][0]) for o in outs.values())
        timings = time_interleaved(fns, min_repeats, min_seconds)
        rows.append({"batch": batch, "vocab": vocab, "hidden": hidden, "tokens_agree": agree, **timings})
    return rows


def _run_meta(argv: list[str] | None) -> dict:
    """The command, date, commit and load at the start (what the other benchmarks record through harness.py, which
    this one does not import: it would set the OpenMP wait policy this op is timed without)."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    args = argv if argv is not None else sys.argv[1:]
    return {"command": " ".join(["python bench/bench_select_op.py", *args]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "git_commit": commit, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="batch sizes (default 1 8 32 128; with --traffic 1 32 128)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 49152; with --traffic also "
                        "262144)")
    parser.add_argument("--min-repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1: see time_interleaved)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "select_op.json")
    parser.add_argument("--traffic", action="store_true", help="print the memory traffic model instead of timing")
    parser.add_argument("--hidden", type=int, default=0,
                        help="time the hidden-state op against the logits path, with this hidden size")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.traffic:
        # the model's default sizes (ROOFLINE.md's table) unless --batches / --vocab are given (they were ignored)
        print(traffic_table(args.batches or [1, 32, 128], [args.vocab] if args.vocab else [49152, 262144],
                            torch.bfloat16))
        return 0
    args.batches, args.vocab = args.batches or [1, 8, 32, 128], args.vocab or 49152
    run_meta = _run_meta(argv)  # before timing: the start's load average
    if args.hidden:
        rows = run_hidden(args.batches, args.vocab, args.hidden, args.min_repeats, args.min_seconds)
        for row in rows:
            print(f"B={row['batch']} V={row['vocab']} H={row['hidden']} tokens agree: {row['tokens_agree']}")
            for name in ("logits_path", "hidden_op", "hidden_wrapper"):
                t = row[name]
                print(f"  {name:15s} cpu median {t['cpu_median_ms']:8.2f} ms  min {t['cpu_min_ms']:8.2f} ms  "
                      f"wall median {t['wall_median_ms']:8.2f} ms  ({t['repeats']} calls)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {**run_meta, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "load_average_at_end": list(os.getloadavg()), "cpus": os.cpu_count()}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        return 0
    rows = run(args.batches, args.vocab, args.min_repeats, args.min_seconds)
    table = markdown(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        **run_meta,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "params": PARAMS,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpus": os.cpu_count(),
        "note": "CPU only; op and naive calls interleaved; median over the repeats (after 2 warm-up calls each) "
        "of the calling thread's CPU time (primary) and of wall time; op = torch.ops.ngsd.guarded_select",
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
