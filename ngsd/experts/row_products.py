"""How the LoRA hooks multiply the few rows of a guarded decode step on this CPU, measured once per process.

A guarded row adds ``(x @ down_t) @ up_t`` (rank 16) to each of the default model's 210 adapted layers every
step. Alone these products take a few microseconds, unless BLAS splits one over its OpenMP threads: then each
call waits for a sleeping thread (``OMP_WAIT_POLICY=PASSIVE``, which the benchmarks set because spinning threads
slow a busy machine 10-20x), 40-250 us on the 2-core CPUs measured here. Which shapes get split depends on the CPU and the BLAS build:
on stop 43's machine one-row products were split and two-row ones were not; on stop 51's (AVX-512) the reverse,
and there the form chosen for the other machine cost a quarter of a decode step with one guarded row in 32
(+46 ms on a 190 ms forward). So the form is not assumed but measured, on the first adapted layer's shapes:

- ``paired``: one row as the two-row product of the row before it and itself (rows are independent in a
  product, so row 1 of it is that row's update); several rows in one product.
- ``alone``: one row as a one-row product; several rows in one product.
- ``one-by-one``: up to ``ONE_BY_ONE_MAX`` rows each as a one-row product (more rows in one product), for
  machines where every multi-row product waits for a thread and one-row products do not.

The three give equal results up to float rounding (so a guarded row's divergence can differ in its last bits
between plans; tokens only at a near-tie). Only passive waiting makes a thread wait (``threads_sleep``): without
it (libgomp's default, one thread, a GPU) the plan is ``alone``, unmeasured; with it the plan is measured and a
form other than ``alone`` taken only on an unmistakable wait (3x and 10 us; 7-40x seen), so the choice does not
flip from run to run on one machine. ``NGSD_LORA_ROW_PLAN=<plan>`` pins it (to compare runs bit for bit across
machines or wait policies).

More rows than the plans cover, up to ``ONE_THREAD_MAX`` (a decode step's guarded rows, a short prompt's prefill),
run their update on the calling thread alone where threads sleep (``one_thread``): no product waits then.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

PLANS = ("paired", "alone", "one-by-one")
PLAN_ENV = "NGSD_LORA_ROW_PLAN"
ONE_BY_ONE_MAX = 8
# More rows (times positions) than that, up to ONE_THREAD_MAX, run their update on the calling thread alone where
# threads sleep (`one_thread`): a half-guarded batch-32 decode forward (16 expert rows) was 8% faster so, a one-prompt
# expert prefill (~50 positions) 12%, the half-harmful workload end to end 11-15% (docs/SPEED.md, stop 60). Past a
# few hundred rows the second thread pays for its wake-up again (the expert prefill of 16 prompts of 50 tokens, 800
# positions, was 7-13% slower on one thread; of one 256-512-token prompt 4-10%).
ONE_THREAD_MAX = 128
# Threads wait between parallel regions only under passive waiting (OMP_WAIT_POLICY=PASSIVE; libgomp's default
# spins first): there a split product costs a wake-up, 40-240 us against ~5 us for the product itself, whatever the
# load; with spinning threads two rows cost 1-3 one-row products. A form other than "alone" is chosen only on
# such a wait, with a margin; everywhere else "alone", unmeasured (a plain measurement flipped between runs on a busy
# machine: stop 51's review).
_WAIT_FACTOR, _WAIT_MARGIN_S = 3.0, 10e-6
_REPEATS = 21

_plans: dict[tuple, str] = {}
_lock = threading.Lock()


def choose_plan(one_row_s: float, two_rows_s: float) -> str:
    """The plan for the measured (median) times of one one-row and one two-row update, in seconds."""
    if two_rows_s > _WAIT_FACTOR * one_row_s + _WAIT_MARGIN_S:
        return "one-by-one"  # multi-row products wait for a thread, one-row ones do not
    if one_row_s > _WAIT_FACTOR * two_rows_s + _WAIT_MARGIN_S:
        return "paired"  # one-row products wait (stop 43's machine), two-row ones do not
    return "alone"


def threads_sleep() -> bool:
    """Several torch threads under passive waiting: the only setting in which a split product waits."""
    return torch.get_num_threads() > 1 and os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"


def runs_on_one_thread(x: torch.Tensor, count: int) -> bool:
    """Whether an update of `count` rows (times positions) of `x` runs on one thread (`one_thread`): more than
    the row plans cover, at most ONE_THREAD_MAX, on a CPU whose threads sleep between parallel regions."""
    return ONE_BY_ONE_MAX < count <= ONE_THREAD_MAX and x.device.type == "cpu" and threads_sleep()


@contextmanager
def one_thread() -> Iterator[None]:
    """The calling thread's torch ops on one OpenMP / MKL thread within the block, then its own count again.
    `torch.set_num_threads` sets the calling thread's OpenMP and MKL counts (a thread already running keeps its
    own); only a thread that starts its first parallel op inside the block would take 1 as its default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    if x.device.type != "cpu" or not threads_sleep():
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
