"""Compact terminal plots of a gate trace: potential and divergence as sparklines, spikes as marks."""

from __future__ import annotations

from .decoding.loop import RowTrace

_BLOCKS = " ▁▂▃▄▅▆▇█"


def sparkline(values: list[float], top: float) -> str:
    if top <= 0:
        top = 1.0
    levels = len(_BLOCKS) - 1
    return "".join(_BLOCKS[min(levels, max(0, round(v / top * levels)))] for v in values)


def plot_trace(trace: RowTrace, v_th: float = 1.0, width: int = 64) -> str:
    """Rows of `width` steps: potential (scaled to max(v_th, peak)), divergence (0..1), spikes (|)."""
    if not trace.potential:
        return "(no steps)"
    top = max(v_th, max(trace.potential))
    lines = [f"alpha={trace.alpha:.2f}  spikes={sum(trace.spikes)}/{len(trace.spikes)}  "
             f"first spike={trace.first_spike}  v_th={v_th:g} (potential scale 0..{top:.2f})"]
    for start in range(0, len(trace.potential), width):
        end = start + width
        lines.append(f"{start:>4} v     {sparkline(trace.potential[start:end], top)}")
        lines.append(f"     D     {sparkline(trace.divergence[start:end], 1.0)}")
        lines.append(f"     spike {''.join('|' if s else '·' for s in trace.spikes[start:end])}")
    return "\n".join(lines)
