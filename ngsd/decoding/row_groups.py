"""Prefill a left-padded batch in groups of rows of similar length, so that its padding is not computed.

A batch is as wide as its longest prompt. Batch 32 of AlpacaEval's chat prompts (34 to 80 tokens) is 43% padding,
and on a CPU a prefill costs about the same per position, padding or not: the prefill is most of a batch's time to
first token and about a quarter of a 64-token answer's time. `plan_row_groups` sorts the rows by length and splits
them into contiguous groups, each prefilled only as wide as its longest prompt, when the positions saved pay for
the extra forwards; `merge_row_groups` puts the groups' outputs (last-position outputs, hidden states) back into
the batch's rows and columns, and `kv_cache.place_cache_rows` their caches, one group at a time (a prefill in
groups holds at most the batch's cache and one group's).

Positions come from the mask, and the columns a group leaves out are padding in all its rows, so each row sees the
same positions, the same mask over its own tokens and the same cache as in one padded forward (zeros under a 0
mask where the padded forward wrote what padding computed). Outputs agree up to float rounding (other matrix
shapes); transformers' `generate` prefills the padding.

Only on a CPU: on a GPU a padded prefill is one set of kernel launches and the padding runs in parallel with the
rest, so the trade is another one (never measured there: those calls keep one padded forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# What one extra forward costs, in prompt positions: on this project's 2-core CPU (SmolLM2-135M, 2 threads) a
# position of a batch-32 prefill costs ~1.5-2 ms (~4 ms at batch 1), and a one-token forward, nearly all of it the
# fixed part of a forward (every weight read once, every layer's small ops), ~70 ms.
GROUP_OVERHEAD_POSITIONS = 32
MAX_WIDTHS = 64  # the plan's dynamic programme runs over at most this many distinct widths (rounded up above it)


@dataclass(frozen=True)
class RowGroup:
    """Batch rows (ascending) prefilled together from column `start` on: every column before it is padding in them."""

    rows: torch.Tensor
    start: int


def row_widths(attention_mask: torch.Tensor) -> list[int]:
    """How many columns each row needs: from its first real token to the batch's last column."""
    real = attention_mask.bool()
    first = real.long().argmax(-1)
    width = attention_mask.shape[-1]
    return [width - int(f) if bool(r) else 0 for f, r in zip(first.tolist(), real.any(-1).tolist())]


def plan_row_groups(attention_mask: torch.Tensor, overhead: int | None = None) -> list[RowGroup] | None:
    """The row groups that prefill `attention_mask`'s batch cheapest, counting a forward as its rows times its width
    plus `overhead` positions (default `GROUP_OVERHEAD_POSITIONS`); None when one forward over the whole padded
    batch is as cheap (then nothing changes)."""
    overhead = GROUP_OVERHEAD_POSITIONS if overhead is None else overhead
    batch, width = attention_mask.shape
    widths = row_widths(attention_mask)
    if batch == 0 or min(widths) == 0:
        return None
    distinct = sorted(set(widths))
    if len(distinct) > MAX_WIDTHS:  # round widths up onto a coarser grid: the plan stays a few thousand steps
        low, high = distinct[0], distinct[-1]
        step = -(-(high - low) // (MAX_WIDTHS - 1))
        rounded = {w: min(high, low + -(-(w - low) // step) * step) for w in distinct}
    else:
        rounded = {w: w for w in distinct}
    grid = sorted(set(rounded.values()))
    counts = [0] * len(grid)
    index_of = {g: i for i, g in enumerate(grid)}
    for w in widths:
        counts[index_of[rounded[w]]] += 1
    # best[j]: the cheapest prefill of the rows of the j narrowest widths; a group ends at its widest row
    best, cut = [0] + [None] * len(grid), [0] * (len(grid) + 1)
    for j in range(1, len(grid) + 1):
        rows = 0
        for i in range(j, 0, -1):
            rows += counts[i - 1]
            cost = best[i - 1] + rows * grid[j - 1] + overhead
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i - 1
    if best[-1] >= batch * width + overhead:
        return None
    bounds, j = [], len(grid)
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    groups = []
    for lo, hi in reversed(bounds):
        members = [row for row, w in enumerate(widths) if grid[lo] <= rounded[w] <= grid[hi - 1]]
        group_width = max(widths[row] for row in members)
        groups.append(RowGroup(torch.tensor(members, dtype=torch.long, device=attention_mask.device),
                               width - group_width))
    return groups


def merge_row_groups(parts: Sequence[torch.Tensor], groups: Sequence[RowGroup], batch: int,
                     width: int | None = None) -> torch.Tensor:
    """The batch's tensor from one part per group: [rows, ...] last-position outputs (width None), or
    [rows, columns, ...] per-position ones (hidden states), placed at the group's rows and, right-aligned, its
    columns; zeros elsewhere (padding)."""
    first = parts[0]
    if width is None:
        merged = first.new_empty((batch, *first.shape[1:]))
        for part, group in zip(parts, groups):
            merged[group.rows] = part
        return merged
    merged = first.new_zeros((batch, width, *first.shape[2:]))
    for part, group in zip(parts, groups):
        merged[group.rows, group.start:] = part
    return merged
