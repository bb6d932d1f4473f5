"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed).

- `tradeoff.png`: mean ASR over the target harmful suites against the XSTest-safe refusal rate,
  one point per method, the fixed-alpha sweep (no defence = alpha 0, then 0.1 / 0.5 / 0.9)
  joined by a line, and the target region shaded.
- `suites.png`: ASR per harmful suite per method (left), and per method the over-refusal,
  benign fidelity and task accuracy (right).
- `gate_traces.png`: membrane potential, divergence and spikes of the gated method over the
  decoding steps for a few harmful and benign prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from .suites import SuiteSpec

SWEEP = (("off", 0.0), ("ngsd_a0.1", 0.1), ("ngsd_a0.5", 0.5), ("ngsd_a0.9", 0.9))
# Every file name make_plots may write: the plots an evaluation owns in its output folder.
PLOT_NAMES = ("tradeoff.png", "suites.png", "gate_traces.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(metrics: Mapping[str, Any], specs: Sequence[SuiteSpec], path: Path, targets: Mapping[str, float]) -> Path | None:
    overrefusal = next((s.name for s in specs if s.role == "overrefusal"), None)
    methods = metrics["methods"]
    points = {}
    for name, data in methods.items():
        y = data["summary"]["asr_mean_target_suites"]
        if overrefusal is None or y is None:
            continue
        points[name] = (100 * data["summary"]["refusal_rate"][overrefusal], 100 * y)
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.fill_between([-2, 100 * targets["overrefusal_max"]], -2, 100 * targets["asr_max"], color="#cfc", alpha=0.5,
                    lw=0, label="target region")
    ax.axhline(100 * targets["asr_max"], color="#393", ls="--", lw=1, label=f"ASR target {100 * targets['asr_max']:.0f}%")
    ax.axvline(100 * targets["overrefusal_max"], color="#393", ls=":", lw=1,
               label=f"over-refusal target {100 * targets['overrefusal_max']:.0f}%")
    sweep = [(points[m], a) for m, a in SWEEP if m in points]
    if len(sweep) > 1:
        ax.plot([p[0] for p, _ in sweep], [p[1] for p, _ in sweep], "-", color="#888", lw=1, zorder=1,
                label="fixed-alpha sweep")
        for (x, y), a in sweep:
            ax.annotate(f"α={a:g}", (x, y), textcoords="offset points", xytext=(6, -10), fontsize=7, color="#555")
    for i, (name, (x, y)) in enumerate(points.items()):
        ax.scatter([x], [y], s=46, zorder=3, color=f"C{i}", label=name)
    ax.set_xlabel(f"refusal rate on {overrefusal} (%, lower is better)")
    ax.set_ylabel("mean ASR over target harmful suites (%, lower is better)")
    ax.set_xlim(left=-2, right=max(30.0, max(x for x, _ in points.values()) + 5))
    ax.set_ylim(bottom=-2, top=min(105.0, max(y for _, y in points.values()) + 8))
    ax.set_title("Safety vs over-refusal trade-off")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_suites(metrics: Mapping[str, Any], specs: Sequence[SuiteSpec], path: Path, targets: Mapping[str, float]) -> Path | None:
    methods = list(metrics["methods"])
    harmful = [s for s in specs if s.role == "harmful"]
    benign_bars: list[tuple[str, Any]] = []
    for s in specs:
        if s.role == "overrefusal":
            benign_bars.append((f"refusal: {s.label}", lambda d, n=s.name: d["summary"]["refusal_rate"].get(n)))
    benign_bars.append(("benign fidelity", lambda d: (d["summary"]["fidelity"] or {}).get("rate")))
    benign_bars.append(("mean token overlap", lambda d: (d["summary"]["fidelity"] or {}).get("mean_overlap")))
    for s in specs:
        if s.scorer:
            benign_bars.append((f"accuracy: {s.label}", lambda d, n=s.name: d["summary"]["task_accuracy"].get(n)))
    if not methods or (not harmful and not benign_bars):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [max(len(harmful), 1), len(benign_bars)]})
    width = 0.8 / len(methods)
    ax = axes[0]
    for i, m in enumerate(methods):
        values = [100 * metrics["methods"][m]["suites"][s.name]["asr"] for s in harmful]
        ax.bar([j + i * width for j in range(len(harmful))], values, width, label=m, color=f"C{i}")
    ax.axhline(100 * targets["asr_max"], color="k", ls="--", lw=1)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(harmful))])
    ax.set_xticklabels([s.label for s in harmful], rotation=20, fontsize=8)
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(0, 105)
    ax.set_title("ASR per harmful suite (dashed: target)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    for i, m in enumerate(methods):
        data = metrics["methods"][m]
        values = [getter(data) for _, getter in benign_bars]
        ax.bar([j + i * width for j in range(len(benign_bars))], [100 * (v or 0.0) for v in values], width,
               color=f"C{i}", label=m)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(benign_bars))])
    ax.set_xticklabels([label for label, _ in benign_bars], rotation=20, fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title("Harmless prompts")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pick_trace_examples(results: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]], method: str,
                        specs: Sequence[SuiteSpec], count: int = 4) -> list[Mapping[str, Any]]:
    """Up to `count` records of `method`: half from harmful suites, half from benign ones, first prompts first."""
    harmful = [r for s in specs if s.role == "harmful" for r in results[method].get(s.name, [])[:2]]
    benign = [r for s in specs if s.role != "harmful" for r in results[method].get(s.name, [])[:1]]
    half = max(1, count // 2)
    chosen = harmful[:half] + benign[: count - min(half, len(harmful))]
    return chosen[:count]


def plot_gate_traces(records: Sequence[Mapping[str, Any]], method: str, path: Path, v_th: float,
                     flags: Mapping[str, bool]) -> Path | None:
    if not records:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(records), 1, figsize=(7.5, 1.9 * len(records) + 0.6), sharex=True, squeeze=False)
    for ax, record in zip(axes[:, 0], records):
        steps = range(len(record["potential"]))
        ax.plot(steps, record["potential"], color="C0", lw=1.4, label="potential v (after reset)")
        ax.plot(steps, record["divergence"], color="C1", lw=0.9, alpha=0.7, label="divergence D")
        ax.axhline(v_th, color="k", ls="--", lw=0.8, label="v_th")
        spikes = record["spike_steps"]
        if spikes:
            ax.scatter(spikes, [v_th] * len(spikes), marker="|", s=80, color="C3", label="spike", zorder=3)
        title = record.get("title") or f"{record['suite']} #{record['prompt_id']}  alpha={record['alpha']:g}"
        verdict = "refused" if flags.get(record["key"]) else "answered"
        ax.set_title(f"{title}  ({verdict})", fontsize=8)
        ax.set_ylim(0, max(1.6 * v_th, max(record["potential"] or [0]) * 1.1))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=4, loc="upper right")
    axes[-1, 0].set_xlabel("decoding step")
    fig.suptitle(f"Gate of method '{method}'", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_plots(metrics: Mapping[str, Any], results: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
               specs: Sequence[SuiteSpec], gated: Mapping[str, bool], v_th: Mapping[str, float],
               out_dir: str | Path, trace_examples: int = 4) -> list[Path]:
    """Write the PNGs into `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = metrics["targets"]
    written = [
        plot_tradeoff(metrics, specs, out_dir / "tradeoff.png", targets),
        plot_suites(metrics, specs, out_dir / "suites.png", targets),
    ]
    gated_methods = [m for m in results if gated.get(m)]
    if gated_methods and trace_examples > 0:
        method = "ngsd" if "ngsd" in gated_methods else gated_methods[0]
        records = pick_trace_examples(results, method, specs, trace_examples)
        flags = {r["key"]: metrics["flags"][method][suite][i]
                 for suite in results[method] for i, r in enumerate(results[method][suite])}
        written.append(plot_gate_traces(records, method, out_dir / "gate_traces.png", v_th[method], flags))
    written = [p for p in written if p is not None]
    remove_stale_plots(out_dir, written)
    return written


def remove_stale_plots(out_dir: Path, written: Sequence[Path]) -> list[Path]:
    """Delete the plots of PLOT_NAMES this run did not write: a rerun into the same folder whose methods draw no
    gate trace left the previous run's gate_traces.png beside a report that no longer describes it. Other files
    in the folder are never touched. Returns the paths removed."""
    kept = {Path(p).name for p in written}
    removed = []
    for name in PLOT_NAMES:
        path = out_dir / name
        if name not in kept and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


__all__ = ["PLOT_NAMES", "make_plots", "pick_trace_examples", "plot_gate_traces", "plot_suites", "plot_tradeoff",
           "remove_stale_plots"]
