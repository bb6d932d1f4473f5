"""The public entry points of the guarded decode step, whatever the backend: from logits or from hidden states."""

from __future__ import annotations

import torch
from torch import Tensor

from . import custom_ops  # registers torch.ops.ngsd.*
from .checks import check_hidden_inputs, check_row_sampling, check_step_inputs, check_tensor_arguments
from .ops.hidden_torch import pair_logits
from .params import StepParams
from .reference import Outputs, guarded_select_reference

BACKENDS = ("auto", "torch", "triton")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_params(params: StepParams) -> None:
    if not isinstance(params, StepParams):
        raise TypeError(f"params must be an ngsd_kernels.StepParams, got {type(params).__name__}")


def default_seed_offset(seed: Tensor | int | None, offset: Tensor | int | None,
                        device: torch.device) -> tuple[Tensor, Tensor]:
    """The step's seed and offset as int64 tensors on ``device``: None is 0, a Python int one value for every row."""

    def as_tensor(name: str, value: Tensor | int | None) -> Tensor:
        if value is None:
            return torch.zeros(1, dtype=torch.int64, device=device)
        if isinstance(value, Tensor):
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int64 tensor (1 or one value per row) or a Python int, got "
                            f"{type(value).__name__} {value!r}")
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"{name} must fit int64, got {value}")
        return torch.tensor([value], dtype=torch.int64, device=device)

    return as_tensor("seed", seed), as_tensor("offset", offset)


def expert_bias(expert_head_weight: Tensor | None, base_head_bias: Tensor | None,
                expert_head_bias: Tensor | None) -> Tensor | None:
    """The expert's LM-head bias: its own, or -- when it shares the base head and has none -- the base's."""
    if expert_head_weight is None and expert_head_bias is None:
        return base_head_bias
    return expert_head_bias


def guarded_select(
    base_logits: Tensor, expert_logits: Tensor, potential: Tensor, alpha: Tensor, seed: Tensor | int | None = None,
    offset: Tensor | int | None = None, params: StepParams = StepParams(), backend: str = "auto",
    row_temperature: Tensor | None = None, row_top_k: Tensor | None = None, row_top_p: Tensor | None = None,
) -> Outputs:
    """Choose the next token of every row from base and expert logits.

    Returns ``(tokens, new_potential, spike, divergence)``; see ``reference.py`` for the exact
    definition. ``seed`` and ``offset`` (int64 tensors of 1 or B values, or Python ints) name the sampling
    stream: row ``i`` draws from Philox keyed by its seed with ``i`` in the counter, so one seed serves a
    whole batch.
    ``row_temperature`` (float [B]): each row's own temperature in a sampled step (``params.temperature``
    above 0, the value it replaces; a row at 0 decodes greedily), so requests sampling at different
    temperatures share one launch; ``row_top_k`` (int [B], each in [1, params.top_k]) and ``row_top_p``
    (float [B], in (0, 1), with params.top_p < 1) do the same for top-k and top-p. Dispatch:

    - ``backend="auto"``: the custom op ``torch.ops.ngsd.guarded_select`` -- the fused Triton
      kernels on CUDA tensors, PyTorch on any other device;
    - ``"triton"``: the custom op ``torch.ops.ngsd.guarded_select_triton`` -- always the kernels
      (on CPU only under ``TRITON_INTERPRET=1``, set before Triton is imported);
    - ``"torch"``: the PyTorch reference called directly (plain tensor ops, any device).

    All three are functional (inputs untouched) and usable inside ``torch.compile(fullgraph=True)``.
    A decode loop that runs many steps with one setting should plan once with ``GuardedSelector``.

    >>> import torch
    >>> from ngsd_kernels import guarded_select
    >>> base, expert = torch.randn(2, 10), torch.randn(2, 10)
    >>> tokens, v, spike, d = guarded_select(base, expert, torch.zeros(2), torch.full((2,), 0.9))
    >>> tokens.shape, bool((d >= 0).all() and (d <= 1).all())
    (torch.Size([2]), True)
    """
    _check_params(params)
    _check_backend(backend)
    check_tensor_arguments(base_logits=base_logits, expert_logits=expert_logits)
    seed, offset = default_seed_offset(seed, offset, base_logits.device)
    check_step_inputs(base_logits, expert_logits, potential, alpha, seed, offset)
    if backend == "torch":  # (the ops check the per-row settings themselves)
        check_row_sampling(row_temperature, row_top_k, row_top_p, *base_logits.shape, potential.device,
                           params.temperature, params.top_k, params.top_p)
        return guarded_select_reference(base_logits, expert_logits, potential, alpha, seed, offset, params,
                                        row_temperature=row_temperature, row_top_k=row_top_k,
                                        row_top_p=row_top_p)
    op = torch.ops.ngsd.guarded_select_triton if backend == "triton" else torch.ops.ngsd.guarded_select
    return op(base_logits, expert_logits, potential, alpha, seed, offset, *params.flat(),
              row_temperature=row_temperature, row_top_k=row_top_k, row_top_p=row_top_p)


def guarded_select_from_hidden(
    base_hidden: Tensor, expert_hidden: Tensor, base_head_weight: Tensor, expert_head_weight: Tensor | None,
    potential: Tensor, alpha: Tensor, seed: Tensor | int | None = None, offset: Tensor | int | None = None,
    params: StepParams = StepParams(), base_head_bias: Tensor | None = None, expert_head_bias: Tensor | None = None,
    backend: str = "auto", row_temperature: Tensor | None = None, row_top_k: Tensor | None = None,
    row_top_p: Tensor | None = None,
) -> Outputs:
    """The guarded step from final hidden states, the LM head inside the op.

    Same result as ``guarded_select(h_b @ W_b.T + b_b, h_e @ W_e.T + b_e, ...)`` with fp32 logits.

    - ``base_hidden`` [B, H], ``expert_hidden`` [B, H']: the last position's final hidden state
      (after the model's final norm), e.g. ``outputs.hidden_states[-1][:, -1]``;
    - ``base_head_weight`` [V, H] (``lm_head.weight``, nn.Linear layout); ``expert_head_weight``
      [V, H'], or None when the expert shares the base head (LoRA / NeST experts: then H' = H, the
      weight is read once for both rows, and the expert also shares ``base_head_bias`` unless
      ``expert_head_bias`` is given); an expert with its own head has no bias unless given one;
    - hidden states and weights share one dtype (fp32, fp16 or bf16); math in fp32;
    - ``row_temperature``, ``row_top_k``, ``row_top_p``: each row's own, as in ``guarded_select``.

    Backends: ``"auto"``: the custom op ``torch.ops.ngsd.guarded_select_from_hidden`` (the fused
    hidden-state Triton kernels on CUDA, one LM-head matmul + the CPU step elsewhere); ``"triton"``:
    ``torch.ops.ngsd.guarded_select_from_hidden_triton`` (the kernels; CPU only under
    ``TRITON_INTERPRET=1``; settings they cannot run raise); ``"torch"``: logits, then the PyTorch
    reference.

    >>> import torch
    >>> from ngsd_kernels import guarded_select_from_hidden
    >>> weight = torch.randn(50, 16)
    >>> hb, he = torch.randn(2, 16), torch.randn(2, 16)
    >>> tokens, v, spike, d = guarded_select_from_hidden(hb, he, weight, None, torch.zeros(2), torch.full((2,), 0.9))
    >>> tokens.shape, bool(((d >= 0) & (d <= 1)).all())
    (torch.Size([2]), True)
    """
    _check_params(params)
    _check_backend(backend)
    check_tensor_arguments(base_hidden=base_hidden, expert_hidden=expert_hidden, base_head_weight=base_head_weight)
    seed, offset = default_seed_offset(seed, offset, base_hidden.device)
    check_hidden_inputs(base_hidden, expert_hidden, base_head_weight, expert_head_weight, base_head_bias,
                        expert_head_bias, potential, alpha, seed, offset)
    heads = (base_head_weight, expert_head_weight, base_head_bias,
             expert_bias(expert_head_weight, base_head_bias, expert_head_bias))
    if backend == "torch":  # (the ops check the per-row settings themselves)
        check_row_sampling(row_temperature, row_top_k, row_top_p, base_hidden.shape[0], base_head_weight.shape[0],
                           potential.device, params.temperature, params.top_k, params.top_p)
        base_logits, expert_logits = pair_logits(base_hidden, expert_hidden, *heads)
        return guarded_select_reference(base_logits, expert_logits, potential, alpha, seed, offset, params,
                                        row_temperature=row_temperature, row_top_k=row_top_k,
                                        row_top_p=row_top_p)
    op = (torch.ops.ngsd.guarded_select_from_hidden_triton if backend == "triton"
          else torch.ops.ngsd.guarded_select_from_hidden)
    return op(base_hidden, expert_hidden, *heads, potential, alpha, seed, offset, *params.flat(),
              row_temperature=row_temperature, row_top_k=row_top_k, row_top_p=row_top_p)
