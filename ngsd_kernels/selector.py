"""`GuardedSelector`: plan a decode loop's step once, then run it every token (FlashInfer-style plan / run).

``guarded_select`` is self-contained: every call checks its inputs, chooses launch constants and,
on the Triton path, allocates the kernels' scratch buffers. A decode loop calls it with the same
batch size, vocabulary, dtype, device and parameters every token, so the selector does that work
once in ``plan()`` and ``run()`` only launches:

>>> import torch
>>> from ngsd_kernels import GuardedSelector, StepParams
>>> selector = GuardedSelector(StepParams(candidate_k=4)).plan(batch=2, vocab=10, dtype=torch.float32,
...                                                             device=torch.device("cpu"))
>>> base, expert = torch.randn(2, 10), torch.randn(2, 10)
>>> tokens, v, spike, d = selector.run(base, expert, torch.zeros(2), torch.full((2,), 0.9))
>>> tokens.shape
torch.Size([2])

What ``run`` executes: the fused Triton kernels with the planned ``SelectPlan`` and one reused
``Scratch`` on CUDA (or with ``backend="triton"``), the CPU step (``ops/cpu_select.py``) on any
other device, the PyTorch reference with ``backend="torch"``. Results equal ``guarded_select``'s.
The scratch is reused, so two ``run`` calls of one selector must not overlap (one stream).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import FLOAT_DTYPES, check_row_vectors
from .ops.cpu_select import cpu_guarded_select
from .params import StepParams
from .reference import guarded_select_reference
from .select import BACKENDS, Outputs, default_seed_offset


class GuardedSelector:
    """The guarded step for one setting: ``plan(batch, vocab, dtype, device)`` once, then ``run(...)`` per token."""

    def __init__(self, params: StepParams = StepParams(), backend: str = "auto") -> None:
        if not isinstance(params, StepParams):
            raise TypeError(f"params must be an ngsd_kernels.StepParams, got {type(params).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.params = params
        self.backend = backend
        self._shape: tuple | None = None
        self._launch = None  # (SelectPlan, Scratch) on the Triton path

    def plan(self, batch: int, vocab: int, dtype: torch.dtype, device: torch.device | str) -> "GuardedSelector":
        """Fix the batch size, vocabulary, logits dtype and device; choose launch constants and allocate scratch."""
        device = torch.device(device)
        if batch < 1 or vocab < 1:
            raise ValueError(f"batch and vocab must be >= 1, got {batch} and {vocab}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self._shape = (batch, vocab, dtype, device)
        self._launch = None
        if self.backend == "triton" or (self.backend == "auto" and device.type == "cuda"):
            from .ops.launcher import Scratch, check_triton_device, plan_select

            if not self.params.score_floor > 0.0:
                raise ValueError(
                    f"score_floor must be > 0 for the Triton backend, got {self.params.score_floor}; "
                    "use backend='torch'"
                )
            check_triton_device(torch.empty(0, device=device))
            plan = plan_select(batch, vocab, self.params)
            self._launch = (plan, Scratch.allocate(plan, device))
        return self

    def run(self, base_logits: Tensor, expert_logits: Tensor, potential: Tensor, alpha: Tensor,
            seed: Tensor | None = None, offset: Tensor | None = None) -> Outputs:
        """One step on the planned shapes; returns ``(tokens, new_potential, spike, divergence)``."""
        if self._shape is None:
            raise RuntimeError("call plan(batch, vocab, dtype, device) before run()")
        batch, vocab, dtype, device = self._shape
        if base_logits.shape != (batch, vocab) or expert_logits.shape != (batch, vocab) or (
            base_logits.dtype != dtype or expert_logits.dtype != dtype or base_logits.device != device
        ):
            raise ValueError(
                f"this selector was planned for {dtype} logits [{batch}, {vocab}] on {device}, got "
                f"{base_logits.dtype} {tuple(base_logits.shape)} / {tuple(expert_logits.shape)} on "
                f"{base_logits.device}; plan() again for a new shape"
            )
        seed, offset = default_seed_offset(seed, offset, device)
        check_row_vectors(batch, potential, alpha, seed, offset, base_logits, expert_logits)
        if self._launch is not None:
            from .ops.fused_select import LogitsPasses
            from .ops.launcher import select_exact

            plan, scratch = self._launch
            source = LogitsPasses.of(base_logits, expert_logits)
            return select_exact(source, plan, scratch, potential, alpha, seed, offset, self.params)
        if self.backend == "torch":
            return guarded_select_reference(base_logits, expert_logits, potential, alpha, seed, offset, self.params)
        return cpu_guarded_select(base_logits, expert_logits, potential, alpha, seed, offset, self.params)
