"""Checks of the step's tensor inputs: a ValueError that names the argument and the fix."""

from __future__ import annotations

import torch
from torch import Tensor

from .params import MIN_SAMPLING_TEMPERATURE

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# what each step argument is, for the error that a non-tensor (a Python float alpha, None, a numpy array) gets
_TENSOR_HINTS = {
    "potential": "the gate's potential, float32 [B] (torch.zeros(B) at the first step, then the step's new_potential)",
    "alpha": "each row's mixing weight, float32 [B] (e.g. torch.full((B,), 0.9))",
}


def require_triton() -> None:
    """Before the lazy import of the Triton kernels: Triton is an optional extra, and its absence was a bare
    "No module named 'triton'"."""
    import importlib.util

    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ModuleNotFoundError(
            "the Triton kernels need Triton, which is not installed: pip install 'ngsd[kernels]' (or triton); "
            "or use backend='torch' (PyTorch, any device)", name="triton")


def check_tensor_arguments(**arguments: object) -> None:
    """Each named argument is a torch.Tensor: a TypeError naming the first that is not, and what it should be."""
    for name, value in arguments.items():
        if not isinstance(value, Tensor):
            what = _TENSOR_HINTS.get(name, "a torch.Tensor")
            raise TypeError(f"{name} must be {what}, got {type(value).__name__}"
                            + ("" if name in _TENSOR_HINTS else " (convert it with torch.as_tensor)"))


def check_seed_offset(batch: int, seed: torch.Tensor, offset: torch.Tensor) -> None:
    """The sampling stream's ``seed`` and ``offset``: int64, 1 or ``batch`` values each."""
    for name, tensor in (("seed", seed), ("offset", offset)):
        if tensor.dtype != torch.int64:
            raise ValueError(f"{name} must be {torch.int64}, got {tensor.dtype}")
    if seed.numel() not in (1, batch) or offset.numel() not in (1, batch):
        raise ValueError(f"seed and offset must hold 1 or {batch} values")


def check_one_device(*tensors: torch.Tensor | None) -> None:
    """Every given tensor (None: absent) on one device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all step inputs must be on one device, got {sorted(map(str, devices))}")


def check_row_vectors(batch: int, potential: torch.Tensor, alpha: torch.Tensor, seed: torch.Tensor,
                      offset: torch.Tensor, *others: torch.Tensor | None) -> None:
    """The per-row state of a step (and that every tensor, `others` included, is on one device). The entry points
    check the tensors they read before this (`check_tensor_arguments`); potential and alpha are checked here."""
    check_tensor_arguments(potential=potential, alpha=alpha)
    for name, tensor in (("potential", potential), ("alpha", alpha)):
        if tensor.dtype != torch.float32:
            raise ValueError(f"{name} must be {torch.float32}, got {tensor.dtype}")
    check_seed_offset(batch, seed, offset)
    if potential.shape != (batch,) or alpha.shape != (batch,):
        raise ValueError(
            f"potential and alpha must have shape [{batch}], got {tuple(potential.shape)} and {tuple(alpha.shape)}"
        )
    check_one_device(potential, alpha, seed, offset, *others)


def check_row_sampling(row_temperature: Tensor | None, row_top_k: Tensor | None, row_top_p: Tensor | None,
                       batch: int, vocab: int, device: torch.device, temperature: float, top_k: int,
                       top_p: float) -> None:
    """Per-row sampling settings of a sampled step (``temperature`` > 0), each [B] and replacing the
    step's own value: temperatures (float, finite, 0: that row decodes greedily, else at least
    MIN_SAMPLING_TEMPERATURE); top-k (integers in [1, top_k]) in a top-k step (0 < ``top_k`` < vocab:
    the launch's buffer holds the largest); top-p (float, in (0, 1)) in a top-p step (``top_p`` < 1).
    Values are read only from CPU tensors: device tensors are not synchronised on."""
    sampled = temperature > 0.0
    for name, tensor, on, floating, step_needs in (
        ("row_temperature", row_temperature, sampled, True, "StepParams(temperature=...) above 0"),
        ("row_top_k", row_top_k, sampled and 0 < top_k < vocab, False,
         f"StepParams(temperature=...) above 0 and top_k in [1, {vocab - 1}], the largest k of the rows"),
        ("row_top_p", row_top_p, sampled and top_p < 1.0, True,
         "StepParams(temperature=...) above 0 and top_p below 1"),
    ):
        if tensor is None:
            continue
        if not on:
            raise ValueError(f"{name} needs a step that uses it: set {step_needs} (the rows' own values replace it)")
        if tensor.is_floating_point() != floating or tensor.is_complex() or tensor.dtype == torch.bool or (
            tensor.shape != (batch,)
        ):
            kind = "a float" if floating else "an integer"
            raise ValueError(
                f"{name} must be {kind} tensor of shape [{batch}], got {tensor.dtype} {tuple(tensor.shape)}"
            )
        if tensor.device != device:
            raise ValueError(f"{name} must be on {device} like the other step inputs, got {tensor.device}")
        if tensor.device.type != "cpu":
            continue
        if name == "row_temperature":
            bad = ~(((tensor == 0) | (tensor >= MIN_SAMPLING_TEMPERATURE)) & tensor.isfinite())
            rule = f"finite and 0 (greedy) or >= {MIN_SAMPLING_TEMPERATURE:g}"
        elif name == "row_top_k":
            bad, rule = (tensor < 1) | (tensor > top_k), f"in [1, {top_k}] (the step's top_k)"
        else:
            bad, rule = ~((tensor > 0) & (tensor < 1)), "in (0, 1)"
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name} must be {rule}, got {tensor[row].item()} at row {row} ({int(bad.sum())} such rows)"
            )


def check_logits_pair(first: Tensor, second: Tensor, names: tuple[str, str], same_vocabulary: str) -> None:
    """Two models' logits [B, V] of one shape and one float dtype; ``names`` as the caller calls them
    (("base", "expert")), ``same_vocabulary`` the fix when the shapes differ."""
    if first.dim() != 2:
        raise ValueError(f"{names[0]}_logits must be [batch, vocab], got shape {tuple(first.shape)}")
    if second.shape != first.shape:
        raise ValueError(f"{names[0]} and {names[1]} logits differ in shape: {tuple(first.shape)} vs "
                         f"{tuple(second.shape)}; {same_vocabulary}")
    if first.dtype not in FLOAT_DTYPES or second.dtype != first.dtype:
        raise ValueError(f"logits must both be float32, float16 or bfloat16, got {first.dtype} and {second.dtype}")


def check_step_inputs(base_logits: torch.Tensor, expert_logits: torch.Tensor, potential: torch.Tensor,
                      alpha: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> None:
    """Inputs of the logits step: base and expert logits [B, V] of one float dtype, and the row vectors."""
    check_logits_pair(base_logits, expert_logits, ("base", "expert"),
                      "the expert must share the base model's vocabulary (same tokenizer, same LM-head size)")
    check_row_vectors(base_logits.shape[0], potential, alpha, seed, offset, base_logits, expert_logits)


def check_hidden_inputs(
    base_hidden: Tensor, expert_hidden: Tensor, base_head_weight: Tensor, expert_head_weight: Tensor | None,
    base_head_bias: Tensor | None, expert_head_bias: Tensor | None, potential: Tensor, alpha: Tensor, seed: Tensor,
    offset: Tensor,
) -> None:
    """Inputs of the hidden-state step: final hidden states, LM head(s) in nn.Linear layout, the row vectors."""
    if base_hidden.dim() != 2:
        raise ValueError(
            f"base_hidden must be [batch, hidden], got shape {tuple(base_hidden.shape)}; "
            "pass the last position's hidden state, e.g. outputs.hidden_states[-1][:, -1]"
        )
    if expert_hidden.dim() != 2 or expert_hidden.shape[0] != base_hidden.shape[0]:
        raise ValueError(
            f"expert_hidden must be [batch, hidden] with the base's batch size, got {tuple(expert_hidden.shape)} "
            f"for base_hidden {tuple(base_hidden.shape)}"
        )
    batch, hidden = base_hidden.shape
    expert_size = expert_hidden.shape[1]
    if expert_head_weight is None and expert_size != hidden:
        raise ValueError(
            f"the expert's hidden size {expert_size} differs from the base's {hidden}, so it cannot share the "
            "base LM head; pass the expert's own head as expert_head_weight"
        )
    weights = [("base_head_weight", base_head_weight, hidden)]
    if expert_head_weight is not None:
        weights.append(("expert_head_weight", expert_head_weight, expert_size))
    for name, weight, size in weights:
        if weight.dim() != 2 or weight.shape[1] != size:
            raise ValueError(f"{name} must be [vocab, {size}] (nn.Linear layout), got {tuple(weight.shape)}")
    vocab = base_head_weight.shape[0]
    if expert_head_weight is not None and expert_head_weight.shape[0] != vocab:
        raise ValueError(
            f"base and expert LM heads differ in vocabulary size: {vocab} vs {expert_head_weight.shape[0]}; "
            "the expert must share the base model's vocabulary"
        )
    if vocab < 1 or hidden < 1 or expert_size < 1:
        raise ValueError(f"empty LM head: vocab {vocab}, hidden sizes {hidden} and {expert_size}")
    if vocab >= 2**31 - 1:
        raise ValueError(f"vocabularies of 2**31 - 1 tokens or more are not supported, got {vocab}")
    dtype = base_hidden.dtype
    for name, tensor in [("expert_hidden", expert_hidden)] + [(n, w) for n, w, _ in weights]:
        if tensor.dtype != dtype or dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"hidden states and LM-head weights must share one dtype among float32/float16/bfloat16; "
                f"base_hidden is {dtype}, {name} is {tensor.dtype} (cast one of them)"
            )
    for name, bias in (("base_head_bias", base_head_bias), ("expert_head_bias", expert_head_bias)):
        if bias is not None and (bias.shape != (vocab,) or bias.dtype not in FLOAT_DTYPES):
            raise ValueError(f"{name} must be a float tensor of shape [{vocab}], got {bias.dtype} {tuple(bias.shape)}")
    check_row_vectors(batch, potential, alpha, seed, offset, base_hidden, expert_hidden, base_head_weight,
                      expert_head_weight, base_head_bias, expert_head_bias)
