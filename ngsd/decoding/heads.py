"""Split a causal LM into its trunk (embeddings .. final norm) and its LM head, where that is exact.

The guarded step can take the last position's final hidden states and run the LM head inside the
op (`ngsd_kernels.guarded_select_from_hidden`): on a GPU the logits are then never written to
memory, and a shared head is read once for the base and the expert rows. That is only the same
computation as the model's own forward when the model's logits are exactly
``lm_head(trunk(input).last_hidden_state)``. Families that scale or soft-cap their logits, or
models whose head is not a plain `nn.Linear`, keep the logits path; `split_head` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# model_type values whose *ForCausalLM.forward is `logits = self.lm_head(self.model(...).last_hidden_state)`
# with nothing after it (checked against transformers' modeling code; tests compare the logits).
PLAIN_HEAD_FAMILIES = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma", "olmo", "olmo2", "smollm3", "phi3"})
# config fields that change the logits after the LM head in some families
_LOGIT_CHANGING_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class HeadSplit:
    """A model's trunk (returns `last_hidden_state`, after the final norm) and its LM head weight/bias."""

    trunk: nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None

    def first_rows(self, rows: int) -> "HeadSplit":
        """The head scoring only the ids below `rows`: a separate expert's head padded to another size is cut
        to the rows both heads share. A slice of leading rows keeps the weight contiguous (no copy)."""
        if rows == self.weight.shape[0]:
            return self
        bias = None if self.bias is None else self.bias[:rows]
        return HeadSplit(trunk=self.trunk, weight=self.weight[:rows], bias=bias)


def split_head(model: nn.Module) -> HeadSplit | str:
    """The trunk and LM head of `model`, or a one-line reason why its logits must come from its own forward."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in PLAIN_HEAD_FAMILIES:
        return f"model family {family!r} is not one whose logits are known to be lm_head(final hidden state)"
    changed = [name for name in _LOGIT_CHANGING_FIELDS if getattr(config, name, None) not in (None, 1.0)]
    if changed:
        return f"{family} config sets {changed[0]}, which changes the logits after the LM head"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return "the LM head is not a plain nn.Linear (or has hooks, e.g. an adapter on lm_head)"
    trunk = model.get_decoder() if hasattr(model, "get_decoder") else None
    if trunk is None or trunk is model:
        return "the model does not expose its decoder trunk (get_decoder)"
    return HeadSplit(trunk=trunk, weight=head.weight, bias=head.bias)
