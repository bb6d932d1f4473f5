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

from .checks import (FLOAT_DTYPES, check_hidden_inputs, check_row_sampling, check_row_vectors, check_tensor_arguments,
                     require_triton)
from .ops.cpu_select import cpu_guarded_select
from .ops.hidden_torch import pair_logits
from .params import CandidateMode, StepParams
from .reference import guarded_select_reference
from .select import BACKENDS, Outputs, default_seed_offset, expert_bias


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
        self._hidden_launches: dict[bool, object] = {}  # shared head? -> HiddenLaunch (Triton path)

    def plan(self, batch: int, vocab: int, dtype: torch.dtype, device: torch.device | str) -> "GuardedSelector":
        """Fix the batch size, vocabulary, logits dtype and device; choose launch constants and allocate scratch."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            # "cuda" means the current device, which tensors report with its index (first GPU run: cuda != cuda:0)
            device = torch.device("cuda", torch.cuda.current_device())
        if batch < 1 or vocab < 1:
            raise ValueError(f"batch and vocab must be >= 1, got {batch} and {vocab}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self._shape = (batch, vocab, dtype, device)
        # the default seed / offset, made once here: no fill kernel per token
        self._zero = torch.zeros(1, dtype=torch.int64, device=device)
        self._launch = None
        self._hidden_launches = {}
        if self.backend == "triton" or (self.backend == "auto" and device.type == "cuda"):
            require_triton()
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

    @property
    def planned_for_triton(self) -> bool:
        """``plan()`` chose the Triton kernels (a CUDA device, or ``backend="triton"``)."""
        return self._launch is not None

    @property
    def hidden_step_reads_host(self) -> bool:
        """``run_from_hidden`` reads the rows its kernels could not decide back to the host and recomputes
        them (the fused hidden-state kernels in intersection mode): a step a CUDA graph cannot hold."""
        if self._launch is None:
            return False
        plan = self._launch[0]
        if not (plan.mode == CandidateMode.INTERSECTION and plan.need_keys):
            return False
        from .ops.hidden_select import hidden_materialises

        batch, vocab, _, device = self._shape
        return not hidden_materialises(batch, vocab, self.params, on_gpu=device.type == "cuda")

    def warm_up(self, hidden_size: int | None = None, shared_head: bool = True) -> "GuardedSelector":
        """Run the planned step once on placeholder inputs, so that every kernel specialisation the
        loop will launch is compiled (and, for ``hidden_size``, the hidden-state launch planned) now
        rather than inside the first generated token: Triton compiles a variant at its first launch.

        All-equal logits make every top-k / top-p row take the device-side fallback too, so its
        kernel is compiled with the rest. Returns ``self``; a no-op off the Triton path.
        """
        if self._shape is None:
            raise RuntimeError("call plan(batch, vocab, dtype, device) before warm_up()")
        if self._launch is None:
            return self
        batch, vocab, dtype, device = self._shape
        potential = torch.zeros(batch, dtype=torch.float32, device=device)
        alpha = torch.zeros(batch, dtype=torch.float32, device=device)
        logits = torch.zeros(batch, vocab, dtype=dtype, device=device)
        self.run(logits, logits, potential, alpha)
        if hidden_size is not None:
            states = torch.zeros(batch, hidden_size, dtype=dtype, device=device)
            head = torch.zeros(vocab, hidden_size, dtype=dtype, device=device)
            self.run_from_hidden(states, states, head, None if shared_head else head, potential, alpha)
        return self

    def _seed_offset(self, seed: Tensor | int | None, offset: Tensor | int | None) -> tuple[Tensor, Tensor]:
        """None: the planned zero (no allocation a step); a Python int as `guarded_select` takes it."""
        if (seed is None or isinstance(seed, Tensor)) and (offset is None or isinstance(offset, Tensor)):
            return (self._zero if seed is None else seed), (self._zero if offset is None else offset)
        return default_seed_offset(seed, offset, self._zero.device)

    def run(self, base_logits: Tensor, expert_logits: Tensor, potential: Tensor, alpha: Tensor,
            seed: Tensor | int | None = None, offset: Tensor | int | None = None,
            row_temperature: Tensor | None = None, row_top_k: Tensor | None = None,
            row_top_p: Tensor | None = None) -> Outputs:
        """One step on the planned shapes; returns ``(tokens, new_potential, spike, divergence)``.
        ``row_temperature`` / ``row_top_k`` / ``row_top_p``: each row's own (``guarded_select``)."""
        if self._shape is None:
            raise RuntimeError("call plan(batch, vocab, dtype, device) before run()")
        batch, vocab, dtype, device = self._shape
        check_tensor_arguments(base_logits=base_logits, expert_logits=expert_logits)
        if base_logits.shape != (batch, vocab) or expert_logits.shape != (batch, vocab) or (
            base_logits.dtype != dtype or expert_logits.dtype != dtype or base_logits.device != device
        ):
            raise ValueError(
                f"this selector was planned for {dtype} logits [{batch}, {vocab}] on {device}, got "
                f"{base_logits.dtype} {tuple(base_logits.shape)} / {tuple(expert_logits.shape)} on "
                f"{base_logits.device}; plan() again for a new shape"
            )
        seed, offset = self._seed_offset(seed, offset)
        check_row_vectors(batch, potential, alpha, seed, offset, base_logits, expert_logits)
        check_row_sampling(row_temperature, row_top_k, row_top_p, batch, vocab, device,
                           self.params.temperature, self.params.top_k, self.params.top_p)
        per_row = dict(row_temperature=row_temperature, row_top_k=row_top_k, row_top_p=row_top_p)
        if self._launch is not None:
            from .ops.fused_select import LogitsPasses
            from .ops.launcher import select_exact

            plan, scratch = self._launch
            source = LogitsPasses.of(base_logits, expert_logits)
            return select_exact(source, plan, scratch, potential, alpha, seed, offset, self.params,
                                **per_row)
        if self.backend == "torch":
            return guarded_select_reference(base_logits, expert_logits, potential, alpha, seed, offset, self.params,
                                            **per_row)
        return cpu_guarded_select(base_logits, expert_logits, potential, alpha, seed, offset, self.params,
                                  **per_row)

    def run_from_hidden(
        self, base_hidden: Tensor, expert_hidden: Tensor, base_head_weight: Tensor, expert_head_weight: Tensor | None,
        potential: Tensor, alpha: Tensor, seed: Tensor | int | None = None, offset: Tensor | int | None = None,
        base_head_bias: Tensor | None = None, expert_head_bias: Tensor | None = None,
        row_temperature: Tensor | None = None, row_top_k: Tensor | None = None, row_top_p: Tensor | None = None,
    ) -> Outputs:
        """``guarded_select_from_hidden`` on the planned shapes (``dtype``: that of the hidden states and heads).

        The Triton path plans its hidden-state launch and scratch at the first call and reuses them;
        elsewhere one LM-head matmul and the CPU step (``backend="torch"``: the reference).
        """
        if self._shape is None:
            raise RuntimeError("call plan(batch, vocab, dtype, device) before run_from_hidden()")
        batch, vocab, dtype, device = self._shape
        check_tensor_arguments(base_hidden=base_hidden, expert_hidden=expert_hidden,
                               base_head_weight=base_head_weight)
        if base_hidden.shape[0] != batch or base_head_weight.shape[0] != vocab or base_hidden.dtype != dtype or (
            base_hidden.device != device
        ):
            raise ValueError(
                f"this selector was planned for {dtype} hidden states of {batch} rows, vocabulary {vocab}, on "
                f"{device}; got {base_hidden.dtype} {tuple(base_hidden.shape)}, head {tuple(base_head_weight.shape)} "
                f"on {base_hidden.device}; plan() again for a new shape"
            )
        seed, offset = self._seed_offset(seed, offset)
        check_hidden_inputs(base_hidden, expert_hidden, base_head_weight, expert_head_weight, base_head_bias,
                            expert_head_bias, potential, alpha, seed, offset)
        check_row_sampling(row_temperature, row_top_k, row_top_p, batch, vocab, device,
                           self.params.temperature, self.params.top_k, self.params.top_p)
        per_row = dict(row_temperature=row_temperature, row_top_k=row_top_k, row_top_p=row_top_p)
        heads = (base_head_weight, expert_head_weight, base_head_bias,
                 expert_bias(expert_head_weight, base_head_bias, expert_head_bias))
        if self._launch is not None:
            from .ops.hidden_select import HiddenLaunch

            shared = expert_head_weight is None
            if shared not in self._hidden_launches:
                self._hidden_launches[shared] = HiddenLaunch.build(batch, vocab, self.params, device, shared=shared)
            return self._hidden_launches[shared].run(base_hidden, expert_hidden, *heads, potential, alpha, seed,
                                                     offset, self.params, **per_row)
        base_logits, expert_logits = pair_logits(base_hidden, expert_hidden, *heads)
        step = guarded_select_reference if self.backend == "torch" else cpu_guarded_select
        return step(base_logits, expert_logits, potential, alpha, seed, offset, self.params, **per_row)
