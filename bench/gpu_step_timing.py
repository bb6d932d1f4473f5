#!/usr/bin/env python3
"""CUDA timing of the step op: fused Triton kernels (per call, planned selector, selector captured in a
CUDA graph where the mode has no host read) vs the PyTorch path vs FlashInfer's sampler.

Run by ``bench/gpu_check.sh`` on a CUDA machine (exits with a message when none is visible).
Per (B, V, mode): median of CUDA-event timings after a warm-up that also JIT-compiles the kernels.
FlashInfer (when installed) is a reference point for a plain sampler over ONE logits row set (no
expert row, no divergence, no gate), i.e. what a state-of-the-art top-k/top-p sampler costs, not an
equivalent op. bf16 logits.

    python3 bench/gpu_step_timing.py --out bench/results/gpu_step.json
    python3 bench/gpu_step_timing.py --batches 1 32 --vocabs 32768 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

MODES = {
    "greedy_union_tv": dict(),
    "topp_0.9_T0.7": dict(temperature=0.7, top_p=0.9),
    "greedy_intersection": dict(candidate_mode=1),
}


def _time(fn, repeats: int) -> float:
    """Median milliseconds of fn() on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _flashinfer_fns(base: torch.Tensor, mode: dict) -> dict:
    try:
        import flashinfer.sampling as fs
    except ImportError:
        return {}
    fns = {}
    if mode.get("top_p"):
        probs = torch.softmax(base.float() / mode["temperature"], dim=-1)
        fns["flashinfer_top_p_from_probs"] = lambda: fs.top_p_sampling_from_probs(probs, mode["top_p"])
        fns["flashinfer_top_k_top_p_from_logits"] = lambda: fs.top_k_top_p_sampling_from_logits(
            base.float() / mode["temperature"], 64, mode["top_p"])
    else:
        fns["torch_argmax_one_row_set"] = lambda: torch.argmax(base, dim=-1)
    return fns


def _graph_fn(selector, args):
    """The planned step captured in a CUDA graph (``ngsd_kernels.StepGraph``, as the loop's ``cuda_graph``
    runs it): each call copies the inputs into the graph's buffers and replays."""
    from ngsd_kernels import StepGraph

    graph = StepGraph.from_logits(selector, *args)
    return lambda: graph.run(*args)


def run(batches: list[int], vocabs: list[int], repeats: int) -> list[dict]:
    from ngsd_kernels import GuardedSelector, StepParams, guarded_select

    rows = []
    for vocab in vocabs:
        for batch in batches:
            gen = torch.Generator(device="cuda").manual_seed(0)
            base = (torch.randn(batch, vocab, device="cuda", generator=gen) * 2).bfloat16()
            expert = (base.float() + torch.randn(batch, vocab, device="cuda", generator=gen)).bfloat16()
            potential = torch.tensor([0.0 if i % 2 == 0 else 2.0 for i in range(batch)], device="cuda")
            alpha = torch.full((batch,), 0.9, device="cuda")
            zero = torch.zeros(1, dtype=torch.int64, device="cuda")
            for name, fields in MODES.items():
                params = StepParams(**fields)
                fns = {backend: (lambda b=backend: guarded_select(base, expert, potential, alpha, zero, zero,
                                                                  params, backend=b))
                       for backend in ("triton", "torch")}
                args = (base, expert, potential, alpha, zero, zero)
                selector = GuardedSelector(params).plan(batch, vocab, base.dtype, base.device)
                fns["selector"] = lambda s=selector: s.run(*args)
                # the logits path has no host read in any mode: every step can live in a CUDA graph
                try:
                    fns["selector_cuda_graph"] = _graph_fn(GuardedSelector(params).plan(
                        batch, vocab, base.dtype, base.device), args)
                except Exception as exc:
                    print(f"CUDA graph capture failed for {name}: {type(exc).__name__}: {exc}", flush=True)
                fns.update(_flashinfer_fns(base, fields))
                row = dict(batch=batch, vocab=vocab, mode=name, dtype="bf16",
                           bytes_one_pass=2 * batch * vocab * 2)
                for label, fn in fns.items():
                    try:
                        t0 = time.time()
                        fn()  # warm-up: JIT compilation on the first call
                        torch.cuda.synchronize()
                        row[f"{label}_first_call_s"] = round(time.time() - t0, 2)
                        for _ in range(3):
                            fn()
                        row[f"{label}_ms"] = round(_time(fn, repeats), 4)
                    except Exception as exc:  # report and keep going: one failing mode must not hide the others
                        row[f"{label}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                if "triton_ms" in row:
                    row["triton_GBps_of_one_pass"] = round(row["bytes_one_pass"] / row["triton_ms"] / 1e6, 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32768, 131072, 151936])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_step_timing: no CUDA device visible; nothing to time")
        return 0
    rows = run(args.batches, args.vocabs, args.repeats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
