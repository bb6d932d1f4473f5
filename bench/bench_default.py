"""The default configuration end to end, risk estimation included, side by side with unguarded `generate`.

Two questions, one run (methods interleaved round by round, a different order each round; medians
over rounds, ratios as the median of per-round ratios):

1. What the default costs (issue: risk in the prefill): the shipped risk probe reads the base
   prefill and routes low-risk rows unguarded (no expert rows), the rest run NGSD with the
   probe's alpha; rows the probe is least sure of get the divergence check (their expert prefill,
   dropped again unless the expert diverges at once): "default", against "default_nocheck" (the
   probe alone). Workloads: all benign (AlpacaEval odd ids: evaluation split) and half harmful
   (AdvBench ids < 130 alternating with AlpacaEval odd ids), at one batch size; and the time to
   first token at batch 1, on one prompt (full runs) and over `--ttft-prompts` prompts one by one
   (a prompt in the check's band pays an expert prefill, so one prompt cannot tell). Compared with
   every row guarded at alpha 0.9 (no risk estimation).
   Two unguarded baselines: `generate` as users call it (its dynamic cache concatenates the whole
   KV cache every step) and `generate(cache_implementation="static")` (preallocated, like the
   guarded loop's growable cache): the ratio against the first is what a user sees, against the
   second the guard's own cost.
2. What the hidden-state step costs against the logits step (issue: the step op from the final
   hidden state): NGSD at alpha 0.9 with the LM head inside the op vs the model's own logits
   (forced by an identity logits processor, which the loop must apply to logits).

    python bench/bench_default.py --batch 32 --new-tokens 64 --rounds 3   # writes bench/results/default.json
    python bench/bench_default.py --quick-ratio                # the unguarded baselines vs the default only: default_quick.json
    python bench/bench_default.py --quick-ratio --stop-at-eos  # rows stop at EOS, as in use: default_quick_eos.json
    python bench/bench_default.py --ttft-sweep-only            # batch-1 time to first token, 20 prompts: ttft_sweep.json

The default model and the shipped expert; greedy; exactly `--new-tokens` tokens per row (no EOS stop), unless
`--stop-at-eos`: then a row stops at the model's end-of-turn token, as users run it (a guarded refusal ends
early, and the loop drops its expert rows). tok/s then counts the tokens asked for (batch x new tokens) over the
wall time, and the ratios are ratios of wall time for the same requests.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from typing import Callable

from harness import RESULTS_DIR, Setup, common_meta, load_setup, median, timed_call, write_json

import torch  # noqa: E402  (after harness)

from ngsd import NGSDConfig, ReflectionConfig, guarded_generate  # noqa: E402


def workload_prompts(kind: str, n: int) -> list[str]:
    from ngsd.data import load_suite

    benign = [p.text for p in load_suite("alpaca_eval", limit=n)]  # odd ids: the evaluation split
    if kind == "benign":
        return benign
    harmful = [p.text for p in load_suite("advbench", limit=130)][:n]
    mixed = [text for pair in zip(harmful, benign) for text in pair]
    return mixed[:n]


def runners(setup: Setup, probe: str | None = None, stop_at_eos: bool = False) -> dict[str, Callable]:
    model, pad = setup.model, setup.pad_id
    eos = setup.tokenizer.eos_token_id if stop_at_eos else None

    def unguarded(ids, mask, new_tokens, streamer, **cache):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad, streamer=streamer, **cache)
        return out[:, ids.shape[1]:]

    def unguarded_static(ids, mask, new_tokens, streamer):
        # generate with a preallocated cache: no per-step concatenation of the KV cache, like the guarded loop's
        # growable cache, so the ratio against it is the guard's own cost
        return unguarded(ids, mask, new_tokens, streamer, cache_implementation="static")

    def guarded(alpha=None, config=None, **extra):
        def run(ids, mask, new_tokens, streamer):
            # the tokenizer lets the probe's routing check the chat template (without it no row is routed)
            out = guarded_generate(model, ids, mask, expert=setup.adapter, config=config or NGSDConfig(), alpha=alpha,
                                   max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad,
                                   streamer=streamer, tokenizer=setup.tokenizer, **extra)
            run.traces = out.traces
            return out.sequences[:, ids.shape[1]:]

        return run

    return {
        "unguarded": unguarded,
        "unguarded_static": unguarded_static,
        # probe + routing (+ its divergence check): risk estimation inside the timing
        "default": guarded(config=NGSDConfig(reflection=ReflectionConfig(probe=probe))),
        "default_nocheck": guarded(config=NGSDConfig(reflection=ReflectionConfig(probe=probe, check=False))),
        "alpha_0.9": guarded(0.9),  # every row guarded, hidden-state step
        "alpha_0.9_logits": guarded(0.9, logits_processor=lambda seq, scores: scores),
    }


def measure(setup: Setup, prompts: list[str], methods: list[str], new_tokens: int, rounds: int, seed: int,
            probe: str | None = None, stop_at_eos: bool = False) -> dict:
    ids, mask = setup.encode(prompts)
    run = runners(setup, probe, stop_at_eos)
    timings: dict[str, list] = {m: [] for m in methods}
    order = list(methods)
    rng = random.Random(seed)
    with torch.no_grad():  # untimed warm-up: first-call costs (probe load, planning, allocator) stay out
        for method in methods:
            run[method](ids, mask, 2, None)
    for _ in range(rounds):
        rng.shuffle(order)
        for method in order:
            with torch.no_grad():
                timings[method].append(timed_call(lambda s: run[method](ids, mask, new_tokens, s), setup.device))
    batch = ids.shape[0]
    result = {}
    for method in methods:
        runs = timings[method]
        result[method] = {
            "tok_s": median([batch * new_tokens / r.seconds for r in runs]),
            "ttft_s": median([r.ttft_s for r in runs]),
            "second_token_s": median([r.step_latencies_s[0] for r in runs if r.step_latencies_s]),
            "cpu_tok_s": median([batch * new_tokens / r.cpu_seconds for r in runs]),
            "seconds": [r.seconds for r in runs],
        }
        if method != "unguarded":
            per_round = [u.seconds / r.seconds for u, r in zip(timings["unguarded"], runs)]
            result[method]["ratio_vs_unguarded"] = median(per_round)
            result[method]["cpu_ratio_vs_unguarded"] = median(
                [u.cpu_seconds / r.cpu_seconds for u, r in zip(timings["unguarded"], runs)])
            result[method]["ttft_ratio_vs_unguarded"] = median(
                [r.ttft_s / u.ttft_s for u, r in zip(timings["unguarded"], runs)])
            if "unguarded_static" in timings and method != "unguarded_static":
                result[method]["ratio_vs_unguarded_static"] = median(
                    [u.seconds / r.seconds for u, r in zip(timings["unguarded_static"], runs)])
            result[method]["tokens_equal_unguarded"] = bool(torch.equal(runs[0].tokens, timings["unguarded"][0].tokens))
        traces = getattr(run[method], "traces", None)
        if traces is not None:
            result[method]["guarded_rows"] = sum(t.guarded for t in traces)
            result[method]["step_path"] = next((t.step_path for t in traces if t.guarded), "")
    if "alpha_0.9" in methods and "alpha_0.9_logits" in methods:
        result["hidden_vs_logits_tokens_equal"] = bool(
            torch.equal(timings["alpha_0.9"][0].tokens, timings["alpha_0.9_logits"][0].tokens))
        result["hidden_over_logits_speed"] = median(
            [b.seconds / a.seconds for a, b in zip(timings["alpha_0.9"], timings["alpha_0.9_logits"])])
    return result


def ttft_sweep(setup: Setup, prompts: list[str], rounds: int, seed: int, probe: str | None = None,
               stop_at_eos: bool = False) -> dict:
    """Time to first token at batch 1 over several benign prompts, default against `generate`: one prompt
    cannot tell, because the check adds an expert prefill to the prompts whose risk falls in its band."""
    rows = []
    for prompt in prompts:
        result = measure(setup, [prompt], ["unguarded", "default"], 2, rounds, seed, probe, stop_at_eos)
        rows.append({"ttft_ms_unguarded": round(1000 * result["unguarded"]["ttft_s"], 1),
                     "ttft_ms_default": round(1000 * result["default"]["ttft_s"], 1),
                     "ratio": round(result["default"]["ttft_ratio_vs_unguarded"], 3),
                     "guarded": result["default"].get("guarded_rows"),
                     # where a checked row's look-ahead went once the first token stopped waiting for it
                     "second_token_ms_unguarded": round(1000 * result["unguarded"]["second_token_s"], 1),
                     "second_token_ms_default": round(1000 * result["default"]["second_token_s"], 1)})
    ratios = [r["ratio"] for r in rows]
    return {"prompts": len(rows), "median_ratio": median(ratios), "mean_ratio": sum(ratios) / len(ratios),
            "max_ratio": max(ratios),
            "max_second_token_ms": {"unguarded": max(r["second_token_ms_unguarded"] for r in rows),
                                    "default": max(r["second_token_ms_default"] for r in rows)},
            "per_prompt": rows}


def default_out(quick_ratio: bool, stop_at_eos: bool, ttft_sweep_only: bool) -> str:
    """The results file of a run given no --out: the full run's is default.json, which the README's Speed table reads."""
    if ttft_sweep_only:
        return "ttft_sweep.json"
    if quick_ratio:
        return "default_quick_eos.json" if stop_at_eos else "default_quick.json"
    return "default_eos.json" if stop_at_eos else "default.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--expert", default=None, help="LoRA adapter folder (default: the shipped expert)")
    parser.add_argument("--probe", default=None,
                        help="risk-probe folder of the default rows, e.g. one whose check was fitted for --expert "
                             "(default: the shipped probe)")
    parser.add_argument("--ttft-prompts", type=int, default=20,
                        help="benign prompts (AlpacaEval odd ids) timed one by one at batch 1 for the time to first "
                             "token")
    parser.add_argument("--out", default=None,
                        help="JSON file (a bare name goes to bench/results/); default: default.json for the full run, "
                             "default_quick.json / default_quick_eos.json for --quick-ratio (with --stop-at-eos), "
                             "ttft_sweep.json for --ttft-sweep-only, so a quick run never replaces the full run's file")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="rows stop at the model's end-of-turn token (default: exactly --new-tokens per row)")
    parser.add_argument("--quick-ratio", action="store_true",
                        help="only the two unguarded baselines vs the default (with and without the probe's divergence "
                             "check) on the two batch workloads (no fixed-alpha rows, no TTFT)")
    parser.add_argument("--ttft-sweep-only", action="store_true",
                        help="only the batch-1 time-to-first-token sweep over --ttft-prompts benign prompts")
    args = parser.parse_args()
    if args.out is None:
        args.out = default_out(args.quick_ratio, args.stop_at_eos, args.ttft_sweep_only)
    torch.set_num_threads(args.threads)
    setup = load_setup(args.model, args.device, expert=args.expert)
    start = time.time()
    report = {"meta": common_meta(setup, args), "workloads": {}}
    report["meta"]["command"] = "python bench/bench_default.py " + " ".join(sys.argv[1:])
    quick = ["unguarded", "unguarded_static", "default", "default_nocheck"]
    all_methods = quick if args.quick_ratio else [*quick, "alpha_0.9", "alpha_0.9_logits"]
    report["meta"]["probe"] = args.probe or "shipped"
    report["meta"]["stop_at_eos"] = args.stop_at_eos
    if args.ttft_sweep_only:
        report["workloads"]["ttft_batch1_sweep"] = ttft_sweep(setup, workload_prompts("benign", args.ttft_prompts),
                                                              args.rounds, args.seed, args.probe, args.stop_at_eos)
        report["wall_seconds"] = time.time() - start
        write_json(args.out, report, RESULTS_DIR)
        print(json.dumps({k: v for k, v in report["workloads"]["ttft_batch1_sweep"].items() if k != "per_prompt"}))
        return
    report["workloads"]["benign"] = measure(setup, workload_prompts("benign", args.batch), all_methods,
                                            args.new_tokens, args.rounds, args.seed, args.probe, args.stop_at_eos)
    report["workloads"]["half_harmful"] = measure(setup, workload_prompts("mixed", args.batch),
                                                  quick if args.quick_ratio else [*quick, "alpha_0.9"],
                                                  args.new_tokens, args.rounds, args.seed, args.probe, args.stop_at_eos)
    if not args.quick_ratio:
        report["workloads"]["ttft_batch1_benign"] = measure(setup, workload_prompts("benign", 1),
                                                            all_methods, args.new_tokens, args.rounds, args.seed,
                                                            args.probe, args.stop_at_eos)
        if args.ttft_prompts:
            report["workloads"]["ttft_batch1_sweep"] = ttft_sweep(setup, workload_prompts("benign", args.ttft_prompts),
                                                                  args.rounds, args.seed, args.probe, args.stop_at_eos)
    report["wall_seconds"] = time.time() - start
    write_json(args.out, report, RESULTS_DIR)
    for name, workload in report["workloads"].items():
        print(f"== {name}")
        for method, row in workload.items():
            if isinstance(row, dict) and "tok_s" in row:
                print(f"  {method:18s} {row['tok_s']:7.1f} tok/s  ratio {row.get('ratio_vs_unguarded', 1):.2f} "
                      f"(cpu {row.get('cpu_ratio_vs_unguarded', 1):.2f})  "
                      f"vs static-cache generate {row.get('ratio_vs_unguarded_static', float('nan')):.2f}  "
                      f"ttft {row['ttft_s']*1000:7.0f} ms (x{row.get('ttft_ratio_vs_unguarded', 1):.2f})  "
                      f"guarded rows {row.get('guarded_rows', '-')}  {row.get('step_path', '')}")
            elif method != "per_prompt":
                print(f"  {method}: {row}")


if __name__ == "__main__":
    main()
