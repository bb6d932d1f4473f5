"""How the LoRA hooks multiply the few rows of a guarded decode step on this CPU, measured once per process.

A guarded row adds ``(x @ down_t) @ up_t`` (rank 16) to each of the default model's 210 adapted layers every
step. Alone these products take a few microseconds, unless BLAS splits one over its OpenMP threads: then each
call waits for a sleeping thread (``OMP_WAIT_POLICY=PASSIVE``, which the benchmarks set, or any busy machine),
~100-250 us on the 2-core CPUs measured here. Which shapes get split depends on the CPU and the BLAS build:
on stop 43's machine one-row products were split and two-row ones were not; on stop 51's (AVX-512) the reverse,
and there the form chosen for the other machine cost a quarter of a decode step with one guarded row in 32
(+46 ms on a 190 ms forward). So the form is not assumed but measured, on the first adapted layer's shapes:

- ``paired``: one row as the two-row product of the row before it and itself (rows are independent in a
  product, so row 1 of it is that row's update); several rows in one product.
- ``alone``: one row as a one-row product; several rows in one product.
- ``one-by-one``: up to ``ONE_BY_ONE_MAX`` rows each as a one-row product (more rows in one product), for
  machines where every multi-row product waits for a thread and one-row products do not.

The three give equal results up to float rounding. A measured choice can differ between machines; on one
machine the margins are 4-50x, so it does not flip from run to run. ``NGSD_LORA_ROW_PLAN=<plan>`` pins it
(e.g. to compare runs across machines bit for bit). Only CPU tensors are measured; elsewhere one product
serves every row count.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import torch

PLANS = ("paired", "alone", "one-by-one")
PLAN_ENV = "NGSD_LORA_ROW_PLAN"
ONE_BY_ONE_MAX = 8
# a multi-row product "waits for a thread" when it costs this many one-row products plus this many microseconds:
# a wake-up costs ~100+ us; without one, two rows cost 1-4 one-row products (measured 3.7x with spinning threads)
_WAIT_FACTOR, _WAIT_MARGIN_S = 4.0, 20e-6
_REPEATS = 15

_plans: dict[tuple, str] = {}
_lock = threading.Lock()


def choose_plan(one_row_s: float, two_rows_s: float) -> str:
    """The plan for measured median times of one one-row and one two-row update (seconds)."""
    if two_rows_s > _WAIT_FACTOR * one_row_s + _WAIT_MARGIN_S:
        return "one-by-one"
    return "alone" if one_row_s <= two_rows_s else "paired"


def pinned_plan() -> str | None:
    value = os.environ.get(PLAN_ENV, "").strip()
    if not value or value == "auto":
        return None
    if value not in PLANS:
        raise ValueError(f"{PLAN_ENV}={value!r} is not a LoRA row plan: use one of {', '.join(PLANS)} or auto "
                         "(measured once per process), or unset it")
    return value


def _median_seconds(product: Callable[[], torch.Tensor]) -> float:
    product()  # the first call pays one-off allocation
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def plan_for(x: torch.Tensor, down_t: torch.Tensor, up_t: torch.Tensor) -> str:
    """The plan for this process, dtype and thread count: pinned, or measured on these shapes the first time."""
    pinned = pinned_plan()
    if pinned is not None:
        return pinned
    if x.device.type != "cpu":
        return "alone"  # no OpenMP wake-ups to dodge: one product for every row count
    key = (x.dtype, torch.get_num_threads())
    plan = _plans.get(key)
    if plan is None:
        with _lock, torch.no_grad():
            plan = _plans.get(key)
            if plan is None:
                # not torch.randn: measuring must not move the global generator seeded sampling reads
                rows = torch.full((2, down_t.shape[0]), 0.5, dtype=x.dtype)
                one_row_s = _median_seconds(lambda: (rows[1:] @ down_t) @ up_t)
                two_rows_s = _median_seconds(lambda: (rows @ down_t) @ up_t)
                plan = _plans[key] = choose_plan(one_row_s, two_rows_s)
    return plan


def measured_plans() -> dict[str, str]:
    """What this process measured, for benchmark records: {"float32 x 2 threads": plan}."""
    return {f"{str(dtype).removeprefix('torch.')} x {threads} threads": plan
            for (dtype, threads), plan in _plans.items()}
