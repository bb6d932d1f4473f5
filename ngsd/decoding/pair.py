"""Base and expert forward passes for one generate call, each with its own KV cache.

Three shapes of expert, one interface (`prefill` once, then `step` one token at a time, both
returning the last-position logits of base and expert):

- `AdapterPair`: the expert is a LoRA adapter on the base; base rows and expert rows run as
  one batch of 2B rows through one forward and one cache.
- `ModelPair`: the expert is a separate model with the same vocabulary; two forwards.
- `BaseOnly`: no expert (gate off); the "expert" logits are the base logits.

A pair object belongs to one call. What it adds to the models for the call (the LoRA hooks, the
decode-time linear forwards of `decode_linear`) it takes off again in `close()`, which the loop
calls when the call ends, also on an error: the models are left as they were found.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch
from torch import nn

from . import decode_linear
from .kv_cache import cache_kwargs, returned_cache
from ..experts.lora import LoraAdapter

# LoRA hooks attached by guarded calls, counted per (adapter, model): calls running at the same
# time share them, and the last one to finish takes them off.
_hooks_lock = threading.Lock()
_hook_users: dict[tuple[int, int], int] = {}


def _hold_lora_hooks(adapter: LoraAdapter, model: nn.Module) -> bool:
    """Attach the adapter's hooks for one call; False when someone else (`ngsd.apply`) keeps them on."""
    key = (id(adapter), id(model))
    with _hooks_lock:
        if key not in _hook_users:
            if adapter.is_attached(model):
                return False
            adapter.attach(model)
            _hook_users[key] = 0
        _hook_users[key] += 1
    return True


def _release_lora_hooks(adapter: LoraAdapter, model: nn.Module) -> None:
    key = (id(adapter), id(model))
    with _hooks_lock:
        _hook_users[key] -= 1
        if _hook_users[key] == 0:
            del _hook_users[key]
            adapter.detach(model)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class _CachedModel:
    """One causal LM with its cache, attention mask and next positions, fed token by token."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cache = None
        self.attention_mask: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None
        self._linear_layers: list[nn.Linear] = []

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Every decode step has as many rows as the prompt batch: attach only if those can go skinny.
        self._linear_layers = decode_linear.attach(self.model, rows=input_ids.shape[0])
        positions = positions_from_mask(attention_mask)
        self.attention_mask = attention_mask
        self.next_position = positions[:, -1:] + 1
        return self._forward(input_ids, positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        ones = self.attention_mask.new_ones((self.attention_mask.shape[0], 1))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        positions = self.next_position
        self.next_position = positions + 1
        return self._forward(tokens[:, None], positions)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with decode_linear.decoding():
            out = self.model(
                input_ids=input_ids,
                attention_mask=self.attention_mask,
                position_ids=positions,
                **cache_kwargs(self.model, self.cache),
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache = returned_cache(out)
        return out.logits[:, -1, :]

    def close(self) -> None:
        decode_linear.detach(self._linear_layers)
        self._linear_layers = []
        self.cache = None


class ForwardPair(Protocol):
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def close(self) -> None: ...


class BaseOnly:
    def __init__(self, model: nn.Module) -> None:
        self._base = _CachedModel(model)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._base.prefill(input_ids, attention_mask)
        return logits, logits

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._base.step(tokens)
        return logits, logits

    def close(self) -> None:
        self._base.close()


class ModelPair:
    def __init__(self, model: nn.Module, expert: nn.Module) -> None:
        self._base = _CachedModel(model)
        self._expert = _CachedModel(expert)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        expert_ids = input_ids.to(self._expert.model.device)
        expert_mask = attention_mask.to(self._expert.model.device)
        base = self._base.prefill(input_ids, attention_mask)
        return base, self._expert.prefill(expert_ids, expert_mask).to(base.device)

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base = self._base.step(tokens)
        return base, self._expert.step(tokens.to(self._expert.model.device)).to(base.device)

    def close(self) -> None:
        self._base.close()
        self._expert.close()


class AdapterPair:
    def __init__(self, model: nn.Module, adapter: LoraAdapter) -> None:
        self._holds_hooks = _hold_lora_hooks(adapter, model)
        self._adapter = adapter
        self._both = _CachedModel(model)
        self._batch = 0

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._batch = input_ids.shape[0]
        with self._adapter.rows_from(self._batch):
            logits = self._both.prefill(torch.cat([input_ids, input_ids]), torch.cat([attention_mask, attention_mask]))
        return logits[: self._batch], logits[self._batch :]

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._adapter.rows_from(self._batch):
            logits = self._both.step(torch.cat([tokens, tokens]))
        return logits[: self._batch], logits[self._batch :]

    def close(self) -> None:
        self._both.close()
        if self._holds_hooks:
            _release_lora_hooks(self._adapter, self._both.model)
            self._holds_hooks = False
