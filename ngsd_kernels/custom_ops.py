"""The guarded decode step as ``torch.library`` custom ops (namespace ``ngsd``).

Four functional ops (no input is mutated; the new potential is a new tensor), two per input kind:

- ``torch.ops.ngsd.guarded_select(base_logits, expert_logits, potential, alpha, seed, offset, *step)``:
  dispatch by device. CUDA runs the fused Triton kernels (``ops/fused_select.py``); every other
  device runs PyTorch: the few-pass greedy path of ``ops/cpu_select.py``, which hands every other
  setting to the reference (``reference.py``).
- ``torch.ops.ngsd.guarded_select_from_hidden(base_hidden, expert_hidden, base_head_weight,
  expert_head_weight?, base_head_bias?, expert_head_bias?, potential, alpha, seed, offset, *step)``:
  the same step with the LM head inside. CUDA runs the hidden-state Triton kernels
  (``ops/hidden_select.py``; settings they cannot run go to the logits kernels), every other device
  one LM-head matmul and the CPU step (``ops/hidden_torch.py``). ``expert_head_weight=None``: the
  expert shares the base head; the biases are taken as given (None: no bias).
- ``..._triton`` twins of both: always the Triton kernels -- on CUDA, or on CPU under
  ``TRITON_INTERPRET=1`` (how the tests check the kernels without a GPU). On CPU without the
  interpreter they raise a ValueError saying so.

``*step`` are the fields of ``StepParams`` as plain floats and ints, in field order
(``StepParams.flat()``); the schemas are built from that one list. The last, optional
``row_temperature`` (fp32 [B]), ``row_top_k`` (int [B]) and ``row_top_p`` (fp32 [B]) give each row its
own temperature (a row at 0 decodes greedily), top-k and top-p in a sampled step that uses them
(``checks.check_row_sampling``), so that rows sampling with different settings share one launch.
Every op returns
``(tokens int64 [B], new_potential fp32 [B], spike bool [B], divergence fp32 [B])``; one fake gives
``torch.compile`` and ``torch.library.opcheck`` that metadata for all four.

>>> import torch
>>> from ngsd_kernels import StepParams
>>> base, expert = torch.randn(2, 16), torch.randn(2, 16)
>>> zero = torch.zeros(1, dtype=torch.int64)
>>> tokens, v, spike, d = torch.ops.ngsd.guarded_select(
...     base, expert, torch.zeros(2), torch.full((2,), 0.9), zero, zero, *StepParams(candidate_k=4).flat())
>>> tokens.dtype, spike.dtype, tuple(d.shape)
(torch.int64, torch.bool, (2,))
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_hidden_inputs, check_row_sampling, check_step_inputs, require_triton
from .params import StepParams, step_schema
from .ops.cpu_select import cpu_guarded_select
from .ops.hidden_torch import torch_select_from_hidden
from .reference import Outputs


_OUT = "-> (Tensor, Tensor, Tensor, Tensor)"
_ROWS = "Tensor potential, Tensor alpha, Tensor seed, Tensor offset"
_PER_ROW = "Tensor? row_temperature=None, Tensor? row_top_k=None, Tensor? row_top_p=None"
LOGITS_SCHEMA = f"(Tensor base_logits, Tensor expert_logits, {_ROWS}, {step_schema()}, {_PER_ROW}) {_OUT}"
HIDDEN_SCHEMA = (
    "(Tensor base_hidden, Tensor expert_hidden, Tensor base_head_weight, Tensor? expert_head_weight, "
    f"Tensor? base_head_bias, Tensor? expert_head_bias, {_ROWS}, {step_schema()}, {_PER_ROW}) {_OUT}"
)
_LOGITS_TENSORS = 6  # positional tensors before the step scalars
_HIDDEN_TENSORS = 10
_STEP_SCALARS = len(StepParams().flat())
_PER_ROW_NAMES = ("row_temperature", "row_top_k", "row_top_p")


def _split(args: tuple, n_tensors: int) -> tuple[tuple, StepParams, dict]:
    """(the leading tensors, the step's parameters, the per-row sampling settings as keyword arguments,
    checked) of a step op's arguments."""
    end = n_tensors + _STEP_SCALARS
    per_row = dict(zip(_PER_ROW_NAMES, tuple(args[end:]) + (None,) * 3))
    params = StepParams.from_flat(args[n_tensors:end])
    if any(t is not None for t in per_row.values()):
        potential = args[n_tensors - 4]
        vocab = args[0].shape[-1] if n_tensors == _LOGITS_TENSORS else args[2].shape[0]
        check_row_sampling(*per_row.values(), potential.shape[0], vocab, potential.device, params.temperature,
                           params.top_k, params.top_p)
    return args[:n_tensors], params, per_row


def _logits_torch(*args) -> Outputs:
    tensors, params, per_row = _split(args, _LOGITS_TENSORS)
    check_step_inputs(*tensors)  # as the Triton twin does: a direct call of the op gets the same errors
    return cpu_guarded_select(*tensors, params, **per_row)


def _logits_triton(*args) -> Outputs:
    require_triton()
    from .ops.fused_select import fused_guarded_select  # lazy: Triton is optional on CPU

    tensors, params, per_row = _split(args, _LOGITS_TENSORS)
    return fused_guarded_select(*tensors, params, **per_row)


def _hidden_torch(*args) -> Outputs:
    tensors, params, per_row = _split(args, _HIDDEN_TENSORS)
    check_hidden_inputs(*tensors)
    potential, alpha, seed, offset = tensors[6:]
    return torch_select_from_hidden(*tensors[:6], potential=potential, alpha=alpha, seed=seed, offset=offset,
                                    params=params, **per_row)


def _hidden_triton(*args) -> Outputs:
    require_triton()
    from .ops.hidden_select import fused_select_from_hidden  # lazy: Triton is optional on CPU
    from .ops.launcher import check_triton_device, unsupported_reason

    tensors, params, per_row = _split(args, _HIDDEN_TENSORS)
    check_hidden_inputs(*tensors)  # a direct call of this op (or the CUDA body) is checked as the others are
    check_triton_device(*tensors)
    reason = unsupported_reason(args[0].shape[0], args[2].shape[0], params)
    if reason is not None:
        raise ValueError(f"the fused hidden-state kernels do not support these settings: {reason}")
    return fused_select_from_hidden(*tensors, params, **per_row)


def _hidden_cuda(*args) -> Outputs:
    """CUDA: the hidden-state kernels, or -- for settings they cannot run -- logits and the logits op."""
    require_triton()
    from .ops.launcher import unsupported_reason

    _, params, _ = _split(args, _HIDDEN_TENSORS)
    if unsupported_reason(args[0].shape[0], args[2].shape[0], params) is None:
        return _hidden_triton(*args)
    return _hidden_torch(*args)


def _fake(rows_like: Tensor, *rest) -> Outputs:
    """Output metadata of every step op: four [B] vectors, B the first tensor's leading dimension."""
    batch = rows_like.shape[0]
    return (
        rows_like.new_empty((batch,), dtype=torch.int64),
        rows_like.new_empty((batch,), dtype=torch.float32),
        rows_like.new_empty((batch,), dtype=torch.bool),
        rows_like.new_empty((batch,), dtype=torch.float32),
    )


def _outputs_without_gradient(ctx, inputs, output) -> None:
    # A token choice has no gradient; without this, inputs that require grad (an lm_head's weight, logits
    # computed outside no_grad) made the float outputs require grad and torch.compile fail for want of a formula.
    ctx.mark_non_differentiable(*output)


def _no_backward(ctx, *grads):
    raise RuntimeError("the guarded decode step is not differentiable (its outputs are marked so)")


def _define(name: str, schema: str, default, cuda) -> None:
    op = torch.library.custom_op(f"ngsd::{name}", default, mutates_args=(), schema=schema)
    if cuda is not None:
        op.register_kernel("cuda")(cuda)
    op.register_fake(_fake)
    op.register_autograd(_no_backward, setup_context=_outputs_without_gradient)


_define("guarded_select", LOGITS_SCHEMA, _logits_torch, _logits_triton)
_define("guarded_select_triton", LOGITS_SCHEMA, _logits_triton, None)
_define("guarded_select_from_hidden", HIDDEN_SCHEMA, _hidden_torch, _hidden_cuda)
_define("guarded_select_from_hidden_triton", HIDDEN_SCHEMA, _hidden_triton, None)
