"""The hidden-state step in PyTorch (any device): LM head(s) as one matmul, then the logits step.

With a shared head (LoRA / NeST experts) the base and expert rows are stacked and multiplied
by the weight once, ``cat([h_b, h_e]) @ W.T``: one pass over W for both models, the same work a
model does when it runs its LM head on the 2B rows of a guarded batch. The logits then go to the
CPU step (``cpu_select.py``), exactly as if the model had returned them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..params import StepParams
from ..reference import Outputs
from .cpu_select import cpu_guarded_select

_CHUNK = 8192  # vocabulary rows upcast per matmul for fp16/bf16 heads (bounds the fp32 weight copy)


def hidden_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits ``hidden @ weight.T + bias`` computed in fp32 (what the kernels compute), [B, V].

    An fp16/bf16 weight is upcast a chunk of vocabulary rows at a time, so a bf16 LM head never
    needs a full fp32 copy.
    """
    hidden32 = hidden.float()
    bias32 = None if bias is None else bias.float()
    if weight.dtype == torch.float32:
        return F.linear(hidden32, weight, bias32)
    vocab = weight.shape[0]
    out = torch.empty((hidden.shape[0], vocab), dtype=torch.float32, device=hidden.device)
    for start in range(0, vocab, _CHUNK):
        stop = min(vocab, start + _CHUNK)
        torch.matmul(hidden32, weight[start:stop].float().T, out=out[:, start:stop])
    if bias32 is not None:
        out += bias32
    return out


def pair_logits(base_hidden: Tensor, expert_hidden: Tensor, base_head_weight: Tensor, expert_head_weight: Tensor | None,
                base_head_bias: Tensor | None, expert_head_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """fp32 base and expert logits; a shared head (``expert_head_weight=None``) is read once for both."""
    if expert_head_weight is None and (expert_head_bias is base_head_bias):
        stacked = hidden_logits(torch.cat([base_hidden, expert_hidden]), base_head_weight, base_head_bias)
        batch = base_hidden.shape[0]
        return stacked[:batch], stacked[batch:]
    expert_weight = base_head_weight if expert_head_weight is None else expert_head_weight
    return (
        hidden_logits(base_hidden, base_head_weight, base_head_bias),
        hidden_logits(expert_hidden, expert_weight, expert_head_bias),
    )


def torch_select_from_hidden(*hidden_and_heads: Tensor | None, potential: Tensor, alpha: Tensor, seed: Tensor,
                             offset: Tensor, params: StepParams, row_temperature: Tensor | None = None,
                             row_top_k: Tensor | None = None, row_top_p: Tensor | None = None) -> Outputs:
    """The hidden-state step's PyTorch body: ``pair_logits(*hidden_and_heads)`` (its six arguments; biases
    already resolved, None meaning no bias), then the CPU step."""
    base_logits, expert_logits = pair_logits(*hidden_and_heads)
    return cpu_guarded_select(base_logits, expert_logits, potential, alpha, seed, offset, params, row_temperature,
                              row_top_k, row_top_p)
