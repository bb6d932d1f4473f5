"""Gate traces for people: a labelled terminal plot and a PNG (what `ngsd generate` shows and `--plot` writes).

Terminal layout, one block per `width` decoding steps:

    alpha=0.90  spikes=5/64  first spike=3  v_th=1 (potential scale 0..1.20)
    steps 0-63
      potential v  ▁▂▄▆█▂▃...   membrane potential after the step (scaled to 0..max(v_th, peak))
      divergence D ▃▅▆▇▇▅▄...   base/expert divergence fed to the neuron (0..1)
      spikes       ···|··|...   | where the neuron fired and the expert was mixed in
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .decoding.loop import RowTrace

_BLOCKS = " ▁▂▃▄▅▆▇█"
_LABEL_WIDTH = len("divergence D")


def sparkline(values: list[float], top: float) -> str:
    """One block character per value, scaled so that `top` is a full block."""
    if top <= 0:
        top = 1.0
    levels = len(_BLOCKS) - 1
    return "".join(_BLOCKS[min(levels, max(0, round(v / top * levels)))] for v in values)


def plot_trace(trace: RowTrace, v_th: float = 1.0, width: int = 64) -> str:
    """Rows of `width` steps: potential v (scaled to max(v_th, peak)), divergence D (0..1), spikes (|)."""
    if not trace.potential:
        return "(no steps)"
    top = max(v_th, max(trace.potential))
    lines = [f"alpha={trace.alpha:.2f}  spikes={sum(trace.spikes)}/{len(trace.spikes)}  "
             f"first spike={trace.first_spike}  v_th={v_th:g} (potential scale 0..{top:.2f})"]
    for start in range(0, len(trace.potential), width):
        end = min(start + width, len(trace.potential))
        lines.append(f"steps {start}-{end - 1}")
        lines.append(f"  {'potential v':<{_LABEL_WIDTH}} {sparkline(trace.potential[start:end], top)}")
        lines.append(f"  {'divergence D':<{_LABEL_WIDTH}} {sparkline(trace.divergence[start:end], 1.0)}")
        lines.append(f"  {'spikes':<{_LABEL_WIDTH}} {''.join('|' if s else '·' for s in trace.spikes[start:end])}")
    return "\n".join(lines)


class MatplotlibMissingError(ModuleNotFoundError):
    """The PNG plot needs matplotlib, which is an optional extra."""


def require_matplotlib(what: str = "the trace plot") -> None:
    """Raise MatplotlibMissingError with the install command when matplotlib is absent (`what` needs it)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise MatplotlibMissingError(
            f"{what} needs matplotlib, which is not installed: pip install matplotlib "
            "(or, in the ngsd checkout, pip install -e '.[eval]')",
            name="matplotlib",
        )


def save_trace_plot(
    traces: Sequence[RowTrace],
    prompts: Sequence[str],
    path: str | Path,
    v_th: float = 1.0,
    refused: Sequence[bool] | None = None,
    method: str = "ngsd",
) -> Path:
    """Write the gate traces of guarded answers as a PNG (one panel per prompt); returns the path."""
    require_matplotlib()
    from .eval.plots import plot_gate_traces

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"the trace plot is written as PNG; give a file name ending in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for row, (trace, prompt) in enumerate(zip(traces, prompts)):
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        records.append({
            "key": row,
            "title": f"{short!r}  alpha={trace.alpha:g}",
            "potential": list(trace.potential),
            "divergence": list(trace.divergence),
            "spike_steps": [i for i, s in enumerate(trace.spikes) if s],
            "alpha": trace.alpha,
        })
    flags = {row: bool(r) for row, r in enumerate(refused)} if refused is not None else {}
    written = plot_gate_traces(records, method, path, v_th, flags)
    if written is None:
        raise ValueError("no traces to plot: give at least one prompt")
    return written


__all__ = ["MatplotlibMissingError", "plot_trace", "require_matplotlib", "save_trace_plot", "sparkline"]
