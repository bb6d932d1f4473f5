"""The divergence check's look-ahead inside a guarded vLLM engine: the expert's own greedy opening of a request.

The library (`ngsd.decoding.loop.expert_openings`, `check_rollout`) keeps a checked request guarded only if the
expert, answering alone, opens with a refusal; it decodes that opening on a copy of the expert rows' cache. The
engine's expert stack keeps its cache in vLLM's paged blocks, which hold the request's real answer, and the
scheduler owns every forward through them. So the opening is computed here, beside the scheduler: the expert
stack's own modules (embedding, projections, norms, rotary embedding, MLP, LM head) over the prompt and the
opening, with a dense cache of its own and plain scaled-dot-product attention in place of vLLM's paged kernels.
It runs only for requests whose first-step divergence would keep them guarded (a few), once, at the step that
decides them, and writes nothing vLLM reads.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Sequence

import torch
from torch.nn import functional as F


def look_ahead_unsupported(vllm_config: Any, stack: Any) -> str | None:
    """Why this engine's expert stack cannot decode an opening beside the scheduler (None: it can)."""
    if vllm_config.parallel_config.tensor_parallel_size > 1:
        return "tensor parallelism (each rank holds a shard of the stack, and only the scheduler steps them together)"
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        return "pipeline parallelism"
    model = stack.model
    for layer in islice(model.layers, model.start_layer, model.end_layer):
        attention = getattr(layer, "self_attn", None)
        if attention is None or not all(hasattr(attention, name) for name in ("qkv_proj", "o_proj", "rotary_emb")):
            return f"a decoder layer without Llama's attention ({type(layer).__name__})"
        if getattr(attention.attn, "sliding_window", None):
            return "sliding-window attention"
    return None


class ExpertOpening:
    """`opening(prompt, first, steps)`: the expert stack's greedy tokens after `prompt`, `first` being the argmax of
    its first-step logits (which the engine already has), `steps` tokens in all, as `_CachedModel.greedy` gives
    them in the library."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        model = stack.model
        self.layers = list(islice(model.layers, model.start_layer, model.end_layer))
        # an opening that runs past the model's window repeats its last position, as the library's does
        # (`_CachedModel.step`): the rotary table has no row beyond it
        window = getattr(self.layers[0].self_attn.rotary_emb, "max_position_embeddings", None) if self.layers else None
        self.last_position = window - 1 if isinstance(window, int) and window > 0 else None

    @torch.inference_mode()
    def __call__(self, prompt: Sequence[int], first: int, steps: int) -> list[int]:
        device = self.stack.model.embed_tokens.weight.device
        tokens = [int(first)]
        ids = torch.tensor([*prompt, first], dtype=torch.long, device=device)
        positions = self._in_window(torch.arange(ids.numel(), device=device))
        cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        for _ in range(steps - 1):
            hidden = self._forward(ids, positions, cache)
            logits = self.stack.compute_logits(hidden[-1:])
            tokens.append(int(logits[0].argmax()))
            ids = torch.tensor([tokens[-1]], dtype=torch.long, device=device)
            positions = self._in_window(positions[-1:] + 1)
        return tokens

    def _in_window(self, positions: torch.Tensor) -> torch.Tensor:
        return positions if self.last_position is None else positions.clamp_max(self.last_position)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor,
                 cache: list[tuple[torch.Tensor, torch.Tensor] | None]) -> torch.Tensor:
        """`LlamaModel.forward` and `LlamaDecoderLayer.forward`, step for step, but attention over `cache`."""
        model = self.stack.model
        hidden, residual = model.embed_tokens(ids), None
        past = 0 if cache[0] is None else cache[0][0].shape[1]
        # causal over the whole context: new position j sees the `past` cached ones and the new ones up to itself
        allowed = torch.ones(ids.numel(), past + ids.numel(), dtype=torch.bool, device=ids.device).tril(past)
        for i, layer in enumerate(self.layers):
            if residual is None:
                residual, hidden = hidden, layer.input_layernorm(hidden)
            else:
                hidden, residual = layer.input_layernorm(hidden, residual)
            hidden = self._attention(layer.self_attn, positions, hidden, cache, i, allowed)
            hidden, residual = layer.post_attention_layernorm(hidden, residual)
            hidden = layer.mlp(hidden)
        hidden, _ = model.norm(hidden, residual)
        return hidden

    @staticmethod
    def _attention(attention: Any, positions: torch.Tensor, hidden: torch.Tensor,
                   cache: list[tuple[torch.Tensor, torch.Tensor] | None], i: int, allowed: torch.Tensor) -> torch.Tensor:
        qkv, _ = attention.qkv_proj(hidden)
        q, k, v = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
        q, k = attention.rotary_emb(positions, q, k)
        heads, kv_heads, size = attention.num_heads, attention.num_kv_heads, attention.head_dim
        k = k.reshape(-1, kv_heads, size).transpose(0, 1)
        v = v.reshape(-1, kv_heads, size).transpose(0, 1)
        if cache[i] is not None:
            k, v = torch.cat([cache[i][0], k], dim=1), torch.cat([cache[i][1], v], dim=1)
        cache[i] = (k, v)
        q = q.reshape(-1, heads, size).transpose(0, 1)
        new = q.shape[1]
        groups = heads // kv_heads
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0),
                                             attn_mask=allowed, scale=attention.scaling)
        out, _ = attention.o_proj(out.transpose(0, 1).reshape(new, heads * size))
        return out
