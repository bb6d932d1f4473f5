"""What prefilling a batch in groups of rows of similar length saves (`ngsd.decoding.row_groups`), side by side in
one process: the guarded loop's prefill over the padded batch (as until stop 59, and as `generate` does) against
the same loop prefilling each group only as wide as its longest prompt (the default now, on a CPU).

    python bench/prefill_groups.py --out prefill_groups.json

Default model, shipped expert, fp32, 2 threads (OMP_WAIT_POLICY=PASSIVE, as every benchmark here), batch 32, the
workloads of `bench_default.py` (AlpacaEval odd ids; half of them replaced by AdvBench < 130), greedy, 64 new
tokens, the default configuration (risk probe + routing + check), risk estimation inside the timing:

- the base prefill alone (the 32 prompts, no expert rows), both forms alternating (`--prefill-rounds`);
- each workload end to end with unguarded `generate` in the same rounds (`--rounds`), the two forms' order
  alternating: seconds, time to first token, and the ratio to `generate` per round; both forms must give the
  same tokens.

The padded form is the same code with the group plan switched off (`GROUP_OVERHEAD_POSITIONS` so large that one
forward is always cheaper), so the two differ in nothing else.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from harness import TimingStreamer, common_meta, cpu_clock, load_setup, write_json

import torch  # noqa: E402  (after harness)

import ngsd.decoding.row_groups as row_groups  # noqa: E402
from bench_default import runners, workload_prompts  # noqa: E402
from ngsd.decoding.pair import _CachedModel  # noqa: E402

FORMS = ("grouped", "padded")
_OVERHEAD = row_groups.GROUP_OVERHEAD_POSITIONS


def use(form: str) -> None:
    row_groups.GROUP_OVERHEAD_POSITIONS = _OVERHEAD if form == "grouped" else 10**12


def prefill_seconds(setup, ids: torch.Tensor, mask: torch.Tensor, rounds: int) -> dict:
    def prefill(form: str) -> float:
        use(form)
        with torch.no_grad():
            start = time.perf_counter()
            _CachedModel(setup.model).prefill(ids, mask)
            return time.perf_counter() - start

    for form in FORMS:  # warm-up
        prefill(form)
    seconds: dict[str, list[float]] = {form: [] for form in FORMS}
    for index in range(rounds):
        for form in FORMS if index % 2 == 0 else FORMS[::-1]:
            seconds[form].append(prefill(form))
    use("grouped")
    return {"ms": {form: [round(s * 1e3, 1) for s in seconds[form]] for form in FORMS},
            "median_ms": {form: round(statistics.median(seconds[form]) * 1e3, 1) for form in FORMS},
            "speed_grouped_over_padded_median": round(statistics.median(
                [p / g for g, p in zip(seconds["grouped"], seconds["padded"])]), 3),
            "rounds_grouped_faster": sum(p > g for g, p in zip(seconds["grouped"], seconds["padded"])),
            "rounds": rounds}


def end_to_end(setup, ids: torch.Tensor, mask: torch.Tensor, rounds: int, new_tokens: int) -> dict:
    run = runners(setup)

    def timed(method: str, form: str) -> tuple[float, float, float, torch.Tensor, int]:
        use(form)
        streamer = TimingStreamer(setup.device)
        start, cpu_start = time.perf_counter(), cpu_clock()
        out = run[method](ids, mask, new_tokens, streamer)
        seconds, cpu_seconds = time.perf_counter() - start, cpu_clock() - cpu_start
        guarded = sum(t.guarded for t in run[method].traces) if method == "default" else 0
        return seconds, cpu_seconds, streamer.times[1] - start, out, guarded

    warm = {form: timed("default", form) for form in FORMS}
    timed("unguarded", "grouped")
    keys = ("unguarded", *FORMS)
    seconds: dict[str, list[float]] = {key: [] for key in keys}
    cpu: dict[str, list[float]] = {key: [] for key in keys}
    ttft: dict[str, list[float]] = {key: [] for key in keys}
    for index in range(rounds):
        order = [("unguarded", "grouped"), ("default", "grouped"), ("default", "padded")]
        if index % 2:
            order = [order[0], order[2], order[1]]
        for method, form in order:
            key = "unguarded" if method == "unguarded" else form
            s, cpu_s, first, _, _ = timed(method, form)
            seconds[key].append(s)
            cpu[key].append(cpu_s)
            ttft[key].append(first)
    use("grouped")
    ratio = {form: [u / s for u, s in zip(seconds["unguarded"], seconds[form])] for form in FORMS}
    cpu_ratio = {form: [u / s for u, s in zip(cpu["unguarded"], cpu[form])] for form in FORMS}
    return {"batch": ids.shape[0], "new_tokens": new_tokens, "guarded_rows": warm["grouped"][4],
            "prompt_positions": {"padded": ids.numel(), "real": int(mask.sum()),
                                 "grouped": sum(len(g.rows) * (ids.shape[1] - g.start)
                                                for g in row_groups.plan_row_groups(mask) or [])},
            "tokens_equal_grouped_padded": bool(torch.equal(warm["grouped"][3], warm["padded"][3])),
            "seconds": {key: [round(s, 2) for s in values] for key, values in seconds.items()},
            "cpu_seconds": {key: [round(s, 2) for s in values] for key, values in cpu.items()},
            "cpu_ratio_to_unguarded_median": {form: round(statistics.median(cpu_ratio[form]), 3) for form in FORMS},
            "cpu_speed_grouped_over_padded_per_round": [round(p / g, 3) for g, p in zip(cpu["grouped"], cpu["padded"])],
            "ttft_ms_median": {key: round(statistics.median(values) * 1e3) for key, values in ttft.items()},
            "ratio_to_unguarded_per_round": {form: [round(r, 3) for r in ratio[form]] for form in FORMS},
            "ratio_to_unguarded_median": {form: round(statistics.median(ratio[form]), 3) for form in FORMS},
            "speed_grouped_over_padded_per_round": [round(p / g, 3) for g, p in
                                                    zip(seconds["grouped"], seconds["padded"])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill-rounds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="prefill_groups.json", help="JSON file (a bare name goes to bench/results/)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = load_setup()
    report = {"meta": common_meta(setup, args)}
    report["meta"]["command"] = "python bench/prefill_groups.py " + " ".join(sys.argv[1:])
    report["meta"]["group_overhead_positions"] = _OVERHEAD
    for name, kind in (("all_benign", "benign"), ("half_harmful", "mixed")):
        ids, mask = setup.encode(workload_prompts(kind, 32))
        report[name] = {}
        if args.prefill_rounds:
            report[name]["base_prefill"] = prefill_seconds(setup, ids, mask, args.prefill_rounds)
            print(name, "base prefill:", report[name]["base_prefill"]["median_ms"], flush=True)
        if args.rounds:
            report[name]["end_to_end"] = end_to_end(setup, ids, mask, args.rounds, args.new_tokens)
            print(name, "end to end:", report[name]["end_to_end"]["ratio_to_unguarded_median"],
                  "cpu", report[name]["end_to_end"]["cpu_ratio_to_unguarded_median"],
                  "ttft", report[name]["end_to_end"]["ttft_ms_median"], flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
