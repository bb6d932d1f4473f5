"""Plots and the Markdown results table from the JSON files the benchmarks wrote.

    python bench/bench_decode.py report      # or: python bench/plots.py [results folder]

Reads ``e2e.json``, ``naive.json``, ``breakdown.json`` and ``reflection.json`` (whichever exist)
from ``bench/results/`` and writes ``throughput.png``, ``breakdown.png`` and ``RESULTS.md`` there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHOD_ORDER = ("unguarded", "ngsd_off", "ngsd_lora", "ngsd_model", "open_lora", "safedecoding_lora")
SHORT = {
    "unguarded": "unguarded generate",
    "ngsd_off": "loop, gate off",
    "ngsd_lora": "NGSD + LoRA",
    "ngsd_model": "NGSD + expert model",
    "open_lora": "open gate + LoRA",
    "safedecoding_lora": "SafeDecoding + LoRA",
}
TARGETS = {
    "lora_b1": 0.6,
    "lora_b32": 0.5,
    "select_share_b32": 0.03,
    "naive_b1": 4.0,
    "naive_b32": 30.0,
}
FULL_COMMAND = "python bench/bench_decode.py all"


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def plot_throughput(e2e: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted(int(b) for b in e2e["batches"])
    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in METHOD_ORDER:
        points = [(b, e2e["batches"][str(b)]["methods"][name]) for b in batches if name in e2e["batches"][str(b)]["methods"]]
        if not points:
            continue
        xs = [b for b, _ in points]
        ax.plot(xs, [m["median_tokens_per_s"] for _, m in points], marker="o", label=SHORT[name])
        if name != "unguarded" and "ratio_to_unguarded" in points[0][1]:
            ax_ratio.plot(xs, [m["ratio_to_unguarded"] for _, m in points], marker="o", label=SHORT[name])
    for axis in (ax, ax_ratio):
        axis.set_xscale("log", base=2)
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_xlabel("batch size")
        axis.grid(alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("generated tokens / s (median)")
    ax.set_title(f"Throughput, {e2e['new_tokens']} new tokens, {e2e['environment']['device']}")
    ax.legend(fontsize=8)
    ax_ratio.axhline(TARGETS["lora_b1"], color="grey", ls=":", lw=1)
    ax_ratio.axhline(TARGETS["lora_b32"], color="grey", ls="--", lw=1)
    ax_ratio.set_ylabel("throughput / unguarded (median of paired rounds)")
    ax_ratio.set_title("Relative to unguarded (dotted 0.6, dashed 0.5 targets)")
    ax_ratio.set_ylim(0, 1.1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_breakdown(breakdown: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted(int(b) for b in breakdown["batches"])
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4.2), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        entry = breakdown["batches"][str(batch)]
        loop, alone = entry["loop"], entry["forward_alone"]
        bars = {
            "guarded step": [("forward (base+expert rows)", loop["forward_s"]),
                             ("LM heads in the step op", loop.get("lm_head_s", 0.0)),
                             ("selection op", loop["select_s"]), ("loop overhead", loop["overhead_s"])],
            "plain generate step": [("plain step", entry["plain_generate_step_s"])],
            "forward alone: B rows": [("forward", alone["base_rows"])],
            "2B rows, no LoRA": [("forward", alone["base_and_expert_rows_no_lora"])],
            "2B rows, LoRA": [("forward", alone["base_and_expert_rows_lora"])],
        }
        colours = {"forward (base+expert rows)": "C0", "LM heads in the step op": "C1", "selection op": "C3",
                   "loop overhead": "C2",
                   "plain step": "C7", "forward": "C9"}
        seen = set()
        for x, (label, parts) in enumerate(bars.items()):
            bottom = 0.0
            for part, seconds in parts:
                if not seconds:
                    continue
                ax.bar(x, seconds * 1e3, bottom=bottom, color=colours[part],
                       label=part if part not in seen else None)
                seen.add(part)
                bottom += seconds * 1e3
        ax.set_xticks(range(len(bars)), list(bars), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms per decode step (median)")
        ax.set_title(f"batch {batch}: selection op {loop['select_share']:.1%} of a step")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _check(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "not measured"
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "missed"


def _get(data: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def targets_table(e2e, naive, breakdown) -> list[str]:
    """One row per target: wall-clock figure, CPU-time figure (CPU runs), and whether each meets it."""
    naive_b32 = naive if _get(naive, "throughput", "batch") == 32 else None
    rows = [
        ("NGSD + LoRA throughput / unguarded, batch 1", ("batches", "1", "methods", "ngsd_lora"), e2e,
         "ratio_to_unguarded", "cpu_ratio_to_unguarded", TARGETS["lora_b1"], True, "{:.2f}", ">= {:.2f}"),
        ("NGSD + LoRA throughput / unguarded, batch 32", ("batches", "32", "methods", "ngsd_lora"), e2e,
         "ratio_to_unguarded", "cpu_ratio_to_unguarded", TARGETS["lora_b32"], True, "{:.2f}", ">= {:.2f}"),
        ("selection op share of a decode step, batch 32", ("batches", "32", "loop"), breakdown,
         "select_timed_share" if _get(breakdown, "batches", "32", "loop", "select_timed_share") is not None
         else "select_share", "cpu_select_share", TARGETS["select_share_b32"], False, "{:.1%}", "<= {:.0%}"),
        ("speed-up over naive per-sequence decoder, batch 1", ("batch1",), naive,
         "speedup", "cpu_speedup", TARGETS["naive_b1"], True, "{:.1f}x", ">= {:.0f}x"),
        ("throughput over naive decoder, batch 32", ("throughput",), naive_b32,
         "speedup", "cpu_speedup", TARGETS["naive_b32"], True, "{:.1f}x", ">= {:.0f}x"),
    ]
    lines = ["| target | goal | wall clock | status | CPU time | status |", "|---|---|---|---|---|---|"]
    for label, path, source, wall_key, cpu_key, goal, higher, fmt, goal_fmt in rows:
        cells = []
        for key in (wall_key, cpu_key):
            value = _get(source, *path, key)
            cells += [fmt.format(value) if value is not None else "-", _check(value, goal, higher)]
        lines.append(f"| {label} | {goal_fmt.format(goal)} | " + " | ".join(cells) + " |")
    return lines


def e2e_tables(e2e: dict[str, Any]) -> list[str]:
    lines = [
        "| batch | method | tok/s | ratio to unguarded | ratio by CPU time | time to first token (ms) | "
        "step latency (ms) | peak memory (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for batch in sorted(int(b) for b in e2e["batches"]):
        methods = e2e["batches"][str(batch)]["methods"]
        for name in METHOD_ORDER:
            if name not in methods:
                continue
            m = methods[name]
            ratio = f"{m['ratio_to_unguarded']:.2f}" if "ratio_to_unguarded" in m else "-"
            cpu_ratio = f"{m['cpu_ratio_to_unguarded']:.2f}" if "cpu_ratio_to_unguarded" in m else "-"
            lines.append(
                f"| {batch} | {SHORT[name]} | {m['median_tokens_per_s']:.1f} | {ratio} | {cpu_ratio} | "
                f"{_ms(m['median_ttft_s'])} | "
                f"{_ms(m['median_step_latency_s'])} | {_mib(m['peak_memory_bytes'])} |"
            )
    return lines


def naive_table(naive: dict[str, Any]) -> list[str]:
    lines = [
        "| prompt | prompt tokens | naive tok/s | (of which forward) | guarded batch 1 tok/s | speed-up | "
        "speed-up by CPU time | equal tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, row in enumerate(naive["per_prompt"]):
        share = row["naive_forward_seconds"] / row["naive_seconds"]
        lines.append(
            f"| {i} | {row['prompt_tokens']} | {row['naive_tokens_per_s']:.2f} | {share:.0%} | "
            f"{row['guarded_tokens_per_s']:.2f} | {row['speedup']:.1f}x | {row.get('cpu_speedup', float('nan')):.1f}x | "
            f"{'yes' if row['equal_tokens'] else 'NO'} |"
        )
    t = naive["throughput"]
    equal = t["batch_rows_equal_to_naive"]
    lines += [
        "",
        f"Throughput at batch {t['batch']}: guarded {t['guarded_tokens_per_s']:.1f} tok/s against the naive decoder's "
        f"{t['naive_tokens_per_s']:.2f} tok/s = **{t['speedup']:.0f}x** (by CPU time {t.get('cpu_speedup', float('nan')):.0f}x); "
        f"{sum(equal)}/{len(equal)} of the timed "
        f"prompts give the same tokens inside the batch-{t['batch']} run. {t['note']}.",
    ]
    return lines


def breakdown_table(breakdown: dict[str, Any]) -> list[str]:
    lines = [
        "| batch | guarded step (ms) | forward | LM heads in the step op | selection op | loop overhead | "
        "plain generate step (ms) | forward alone: B rows / 2B rows / 2B + LoRA (ms) | selection op alone (ms) | "
        "shares by CPU time: forward / selection / overhead | selection op timed without the profiler (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for batch in sorted(int(b) for b in breakdown["batches"]):
        e = breakdown["batches"][str(batch)]
        loop, alone, sel = e["loop"], e["forward_alone"], e["select_alone"]
        head = (f"{_ms(loop['lm_head_s'])} ({loop['lm_head_share']:.0%})" if "lm_head_s" in loop
                else "- (not measured apart)")
        lines.append(
            f"| {batch} | {_ms(loop['step_s'])} | {_ms(loop['forward_s'])} ({loop['forward_share']:.0%}) | {head} | "
            f"{_ms(loop['select_s'])} ({loop['select_share']:.1%}) | {_ms(loop['overhead_s'])} "
            f"({loop['overhead_share']:.1%}) | {_ms(e['plain_generate_step_s'])} | {_ms(alone['base_rows'])} / "
            f"{_ms(alone['base_and_expert_rows_no_lora'])} / {_ms(alone['base_and_expert_rows_lora'])} | "
            f"{_ms(sel['ngsd_greedy'])} | "
            + (f"{loop['cpu_forward_share']:.0%} / {loop['cpu_select_share']:.1%} / {loop['cpu_overhead_share']:.1%} |"
               if "cpu_select_share" in loop else "- |")
            + (f" {_ms(loop['select_timed_s'])} ({loop['select_timed_share']:.1%}) |" if "select_timed_s" in loop
               else " - |")
        )
    return lines


def reflection_table(reflection: dict[str, Any]) -> list[str]:
    lines = ["| mode | requests per call | s per request | CPU s per request | s per call |",
             "|---|---:|---:|---:|---:|"]
    for mode, entry in reflection["modes"].items():
        for label in ("single", "batch"):
            if label in entry:
                e = entry[label]
                extra = f" (JSON answer ~{e['answer_tokens_mean']:.0f} tokens)" if "answer_tokens_mean" in e else ""
                lines.append(f"| {mode}{extra} | {e['requests']} | {e['seconds_per_request']:.3f} | "
                             f"{e.get('cpu_seconds_per_request', float('nan')):.3f} | {e['median_seconds']:.2f} |")
    return lines


def write_report(folder: Path = RESULTS_DIR, prefix: str = "") -> int:
    folder = Path(folder)
    e2e = _load(folder, prefix + "e2e.json")
    naive = _load(folder, prefix + "naive.json")
    breakdown = _load(folder, prefix + "breakdown.json")
    reflection = _load(folder, prefix + "reflection.json")
    if not any((e2e, naive, breakdown, reflection)):
        print(f"no benchmark JSON in {folder}; run `{FULL_COMMAND}` first", file=sys.stderr)
        return 1
    first = next(x for x in (e2e, naive, breakdown, reflection) if x)
    env = first["environment"]
    parts = [(name, x) for name, x in (("e2e", e2e), ("naive", naive), ("breakdown", breakdown),
                                        ("reflection", reflection)) if x]
    lines = [
        "# Benchmark results",
        "",
        "This file: `python bench/bench_decode.py report`, from each part's JSON; each part as it was measured "
        "(its own command, date, commit and load average at the start):",
        "",
        *[f"- {name}: `{x.get('command', FULL_COMMAND)}`, {x['environment']['date']}, commit "
          f"{x['environment'].get('git', {}).get('commit') or 'unknown'}, load "
          f"{x['environment']['load_average_at_start'][0]:.1f}" for name, x in parts],
        "",
        f"Machine: {env['device']} ({env.get('gpu', env['platform'])}, {env['cpu_count']} CPUs, "
        f"{env['torch_threads']} torch threads), torch {env['torch']}, transformers {env['transformers']}; "
        f"model {first['model']} ({first['dtype']}); expert: {first['expert']['source']}.",
        "",
        "Timings on a shared machine are noisy: every method runs interleaved with the others in the same rounds, "
        "medians are reported, and ratios are medians of per-round ratios. On a CPU, process CPU time (all threads) "
        "is reported beside wall-clock time: it counts the work without the time spent waiting for a core that "
        "other jobs hold, so it is the steadier figure on a busy machine, while wall-clock is what a user waits. "
        "Load average at the start of each "
        "part: " + ", ".join(
            f"{name} {x['environment']['load_average_at_start'][0]:.1f}"
            for name, x in (("e2e", e2e), ("naive", naive), ("breakdown", breakdown), ("reflection", reflection)) if x
        ) + f" (on {env['cpu_count']} CPUs).",
        "",
        "## Targets",
        "",
        *targets_table(e2e, naive, breakdown),
    ]
    if e2e:
        plot_throughput(e2e, folder / (prefix + "throughput.png"))
        lines += [
            "",
            f"## End-to-end decoding ({e2e['new_tokens']} new tokens per row, greedy, alpha {e2e['alpha']}, "
            f"median of {e2e['repeats']} rounds)",
            "",
            *e2e_tables(e2e),
            "",
            f"Peak memory is the process's {'GPU allocation' if env['device'].startswith('cuda') else 'resident set'} "
            "during the call (model weights included). The expert as LoRA adds "
            f"{_mib(first['expert']['lora_adapter_bytes'])} MiB of weights; as a separate model "
            f"{_mib(first['expert']['expert_model_parameter_bytes'])} MiB.",
            "",
            f"![throughput]({prefix}throughput.png)",
        ]
    if naive:
        lines += [
            "",
            f"## Against the naive per-sequence, no-cache decoder ({naive['new_tokens']} new tokens, equal greedy output)",
            "",
            *naive_table(naive),
        ]
    if breakdown:
        plot_breakdown(breakdown, folder / (prefix + "breakdown.png"))
        lines += [
            "",
            f"## One decode step (NGSD + LoRA, mean over {breakdown['steps']} steps, median of rounds)",
            "",
            *breakdown_table(breakdown),
            "",
            "With every row guarded the step runs from final hidden states: the LM heads (base and expert rows) "
            "run inside the step op's range, so they are timed apart (the outermost `aten::linear` / "
            "`aten::matmul` inside it) and left out of the selection op's share, as `generate`'s LM head "
            "is part of its forward.",
            "",
            f"![breakdown]({prefix}breakdown.png)",
        ]
    if reflection:
        lines += ["", "## Self-reflection cost per request", "", *reflection_table(reflection)]
    (folder / (prefix + "RESULTS.md")).write_text("\n".join(lines) + "\n")
    print(f"wrote {folder / (prefix + 'RESULTS.md')}")
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS_DIR, help="results folder (default: %(default)s)")
    sys.exit(write_report(parser.parse_args().results))
