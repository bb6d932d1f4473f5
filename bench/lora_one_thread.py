"""What running the expert rows' small LoRA updates on one thread saves where threads sleep, side by side in one
process: each update split over the OpenMP threads (until stop 60) against the calling thread alone
(`ngsd.experts.row_products.one_thread`, for 9 to `ONE_THREAD_MAX` rows times positions, the default now).

    python bench/lora_one_thread.py --out lora_one_thread.json

Under `OMP_WAIT_POLICY=PASSIVE` (which every benchmark here sets: spinning threads slow a busy machine 10-20x) a
product split over the threads waits for the sleeping one to wake, 300-400 us for a rank-16 update that takes
~50 us on one thread, and a half-guarded decode step runs 180 such products. Three measurements, the two forms
taking turns in every round (order alternating), default model, shipped expert, fp32, 2 threads
(`lora_siblings.py`'s, with its forms swapped for these):

- one guarded decode forward of 32 base rows and 16 expert rows over an 80-position cache (`--step-rounds`);
- the expert's prefill of one 50-token prompt alone (2 x `--step-rounds`): what a batch-1 request in the
  divergence check's band pays before its first token;
- `bench_default.py`'s half-harmful workload end to end (default configuration, batch 32, 64 new tokens), with
  unguarded `generate` in the same rounds (`--rounds`); both forms must give the same tokens.

The two-thread form is the same code with `ONE_THREAD_MAX` set to 0, so the two differ in nothing else.
"""

from __future__ import annotations

from typing import Callable

import harness  # noqa: F401  (sets OMP_WAIT_POLICY before torch is imported)
from lora_siblings import compare  # noqa: E402

from ngsd.experts import row_products  # noqa: E402

FORMS = ("one_thread", "two_threads")
_LIMIT = row_products.ONE_THREAD_MAX


def use(form: str) -> None:
    """The hooks' updates of up to the default's rows on one thread, or on all of them."""
    row_products.ONE_THREAD_MAX = _LIMIT if form == "one_thread" else 0


def _attached(setup) -> Callable[[str], None]:
    setup.adapter.attach(setup.model)
    return use


def main() -> None:
    compare(__doc__, "lora_one_thread", FORMS, _attached, use,
            meta={"threads_sleep": row_products.threads_sleep(), "one_thread_max": _LIMIT})


if __name__ == "__main__":
    main()
