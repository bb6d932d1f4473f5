"""Which prompts an evaluation runs: named suites of `ngsd.data` or a user's own file, sized and picked.

A suite is one `ngsd.data.SuiteSpec`: where its prompts come from and its *role*, which decides
how it is scored:

- "harmful": attack success rate (ASR) = share of answers the refusal judge does not flag;
- "overrefusal": safe prompts that look unsafe (XSTest safe): refusal rate, and benign fidelity;
- "utility": harmless tasks (MT-Bench, GSM8K): benign fidelity, plus a task scorer where one exists.

`target` marks the suites the headline targets apply to (ASR <= 10% on the five attack suites,
XSTest safe refusal <= 12%); others are reported without a target.

Selection (`select`): "lowest_ids" takes the n prompts with the lowest numeric ids (the AdvBench
convention of issue 2), "first" the first n in file order, "spread" n prompts evenly spaced over the
file, so that suites stored grouped by category (XSTest by type, MT-Bench by category) are covered
across all groups rather than only the first ones.

>>> spec = SuiteSpec.from_json("xstest_safe", {"n": 3, "select": "spread"})
>>> spec.role, spec.n, spec.select
('overrefusal', 3, 'spread')
"""

from __future__ import annotations

import os
from typing import Sequence

from ..data import EVAL_ROLES as ROLES
from ..data import SELECTIONS, Prompt, SuiteSpec, id_sort_key, read_suite


def select_prompts(prompts: Sequence[Prompt], n: int | None, how: str) -> list[Prompt]:
    """n prompts chosen by `how` ("lowest_ids", "first" or "spread"); all of them when n is None."""
    prompts = list(prompts)
    if n is None or n >= len(prompts):
        return sorted(prompts, key=id_sort_key) if how == "lowest_ids" else prompts
    if how == "lowest_ids":
        return sorted(prompts, key=id_sort_key)[:n]
    if how == "first":
        return prompts[:n]
    # spread: indices round(i * len / n), distinct because len > n
    return [prompts[(i * len(prompts)) // n] for i in range(n)]


def load_spec(spec: SuiteSpec, data_dir: str | os.PathLike[str] | None = None, limit: int | None = None) -> list[Prompt]:
    """The prompts of one suite, selected and capped at `limit` (the CLI's --limit) if given."""
    prompts = read_suite(spec, data_dir)
    if spec.eval_ids_below is not None:  # the training split never reaches an evaluation
        prompts = [p for p in prompts if int(p.id) < spec.eval_ids_below]
    n = spec.n
    if limit is not None:
        n = limit if n is None else min(n, limit)
    chosen = select_prompts(prompts, n, spec.select)
    if not chosen:
        raise ValueError(f"suite {spec.name!r} selected no prompts; check its file and field mapping")
    return chosen


def load_suites(
    specs: Sequence[SuiteSpec], data_dir: str | os.PathLike[str] | None = None, limit: int | None = None
) -> dict[str, list[Prompt]]:
    """Suite name -> selected prompts, in the order of `specs`."""
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"suites listed twice: {duplicates}")
    return {spec.name: load_spec(spec, data_dir, limit) for spec in specs}


__all__ = ["ROLES", "SELECTIONS", "SuiteSpec", "load_spec", "load_suites", "select_prompts"]
