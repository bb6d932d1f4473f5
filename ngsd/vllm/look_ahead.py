"""The divergence check's look-ahead inside a guarded vLLM engine: the expert's own greedy opening of a request.

The library (`ngsd.decoding.loop.expert_openings`, `check_rollout`) keeps a checked request guarded only if the
expert, answering alone, opens with a refusal; it decodes that opening on a copy of the expert rows' cache. The
engine's expert stack keeps its cache in vLLM's paged blocks, which hold the request's real answer, and the
scheduler owns every forward through them. So the opening is computed here, beside the scheduler: the expert
stack's own modules (embedding, projections, norms, rotary embedding, MLP, LM head), with plain
scaled-dot-product attention in place of vLLM's paged kernels, over a dense cache of its own. That cache starts
from the prompt's keys and values as the engine's step just wrote them to the expert's paged blocks (read, never
written), where this engine's cache layout is known (`PagedPrompt`); elsewhere the prompt is run again. A read is
trusted only if the expert's distribution after the prompt, computed from it, is the one the engine's step gave;
otherwise the engine logs why and runs prompts again from then on. It runs only for requests whose first-step
divergence would keep them guarded (a few), once, at the step that decides them, all of that step's together,
and writes nothing vLLM reads.
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any, Sequence

import torch
from torch.nn import functional as F

from ..risk.divergence_check import total_variation

logger = logging.getLogger(__name__)


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


# where the engine's step left the prompt's keys and values: the same distribution after the prompt, to this
# total variation (the engine's batched kernels and these dense ones round differently; a wrong read differs a lot)
READ_AGREES = 0.01


class PagedPrompt:
    """A request's prompt keys and values ([kv heads, tokens, head size] each, after the rotary embedding) read from
    one attention layer's paged cache, for the backends whose layout is known here: vLLM's CPU backend with its
    portable kernels (isa "vec": [blocks, kv heads, block size, 2 * head size], per block and head its keys
    transposed, [head size, block size], then its values, [block size, head size]) and the CUDA backends'
    ([2, blocks, block size, kv heads, head size] for FLASH_ATTN, [blocks, 2, ...] for FlashInfer and Triton).
    `for_layer` is None for any other. The CUDA layouts were never read on a GPU here: the look-ahead checks every
    read against the engine's own logits and stops reading where one disagrees (`ExpertOpening`)."""

    LAYOUTS = {"CPU_ATTN": "cpu", "FLASH_ATTN": "kv_first", "FLASHINFER": "blocks_first", "TRITON_ATTN": "blocks_first"}
    CPU_ISAS = ("vec",)  # the CPU kernels' key layouts verified here; AMX, NEON... pack keys otherwise

    def __init__(self, layout: str, cache: torch.Tensor) -> None:
        self.layout, self.cache = layout, cache
        self.block_size = cache.shape[2]

    @classmethod
    def for_layer(cls, attention: Any) -> "PagedPrompt | None":
        layer = attention.attn
        cache = getattr(layer, "kv_cache", None)
        backend = getattr(getattr(layer, "attn_backend", None), "get_name", lambda: None)()
        layout = cls.LAYOUTS.get(backend)
        if layout is None or not isinstance(cache, torch.Tensor) or cache.dim() < 4 or \
                getattr(layer, "kv_cache_dtype", "auto") != "auto":
            return None
        if layout == "cpu" and getattr(layer, "isa", None) not in cls.CPU_ISAS:
            return None
        return cls(layout, cache)

    def read(self, blocks: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = blocks[: -(-length // self.block_size)].to(self.cache.device, torch.long)
        if self.layout == "cpu":
            count, heads, size, doubled = self.cache.shape
            head = doubled // 2
            paged = self.cache.view(count, heads, 2 * size, head)[blocks]  # [n, heads, 2 * size, head]
            k = paged[:, :, :size].reshape(-1, heads, head, size).transpose(2, 3)
            v = paged[:, :, size:]
        else:
            k, v = (self.cache[0][blocks], self.cache[1][blocks]) if self.layout == "kv_first" else \
                (self.cache[blocks][:, 0], self.cache[blocks][:, 1])
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [n, heads, size, head]
        return tuple(t.transpose(0, 1).reshape(t.shape[1], -1, t.shape[-1])[:, :length] for t in (k, v))


class ExpertOpening:
    """`opening(prompts, first_logits, steps, rows=...)`: the expert stack's greedy tokens after each prompt, the
    first being the argmax of its first-step logits (which the engine already has), `steps` tokens each, as
    `_CachedModel.greedy` gives them in the library. The openings a step needs are decoded together: every projection and MLP runs once
    on all their tokens (one weight read a step for all of them, where one request after another read the weights
    once each), and each request attends over its own prompt only, so a long prompt does not pad the short ones."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        model = stack.model
        self.layers = list(islice(model.layers, model.start_layer, model.end_layer))
        # an opening that runs past the model's window repeats its last position, as the library's does
        # (`_CachedModel.step`): the rotary table has no row beyond it
        window = getattr(self.layers[0].self_attn.rotary_emb, "max_position_embeddings", None) if self.layers else None
        self.last_position = window - 1 if isinstance(window, int) and window > 0 else None
        # set by the model's forward on steps that may decide a request: the step's block table (a row per request
        # of the batch, as the processor numbers them); None: this step's prompts are run again
        self.step_blocks: torch.Tensor | None = None
        self.reads_paged = True  # False once a read disagreed with the engine (or failed): prompts are run again
        self.last_source = ""  # where the last call found its prompts: "paged cache" or "run again"

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[Sequence[int]], first_logits: torch.Tensor, steps: int,
                 rows: Sequence[int] | None = None) -> list[list[int]]:
        """`first_logits`: [requests, vocab] the expert's raw logits after each prompt, as the engine's step gave
        them; `rows`: the requests' rows in that step's batch (their paged blocks), None to run the prompts again."""
        if len(prompts) != first_logits.shape[0] or (rows is not None and len(rows) != len(prompts)):
            raise ValueError(f"ngsd: {len(prompts)} prompts, {first_logits.shape[0]} first-step logits and "
                             f"{'no' if rows is None else len(rows)} rows for the look-ahead")
        device = self.stack.model.embed_tokens.weight.device
        firsts = first_logits.argmax(dim=-1).tolist()
        openings = [[int(first)] for first in firsts]
        start = self._from_paged_blocks(prompts, first_logits, firsts, rows) if steps > 1 else None
        self.last_source = "run again" if start is None else "paged cache"
        if start is not None:
            hidden, lengths, positions, cache = start
        else:
            lengths = [len(prompt) + 1 for prompt in prompts]
            ids = torch.tensor([token for prompt, first in zip(prompts, firsts) for token in (*prompt, first)],
                               dtype=torch.long, device=device)
            positions = self._in_window(torch.cat([torch.arange(n, device=device) for n in lengths]))
            # per layer, per request: its keys and values so far ([kv heads, tokens, head size] each)
            cache = [[] for _ in self.layers]
            hidden = self._forward(ids, positions, lengths, cache) if steps > 1 else None
        for step in range(steps - 1):
            if step:
                hidden = self._forward(ids, positions, lengths, cache)
            last = torch.tensor(lengths, device=device).cumsum(0) - 1
            chosen = self.stack.compute_logits(hidden[last]).argmax(dim=-1)
            for opening, token in zip(openings, chosen.tolist()):
                opening.append(int(token))
            ids, positions, lengths = chosen.to(torch.long), self._in_window(positions[last] + 1), [1] * len(lengths)
        return openings

    def _from_paged_blocks(self, prompts: Sequence[Sequence[int]], first_logits: torch.Tensor, firsts: list[int],
                           rows: Sequence[int] | None):
        """The opening's first forward over the prompts' keys and values read from the engine's paged cache: each
        request's last prompt token again (to check the read) and its first token. None where no read is possible
        or a read disagrees with the engine's own first-step logits (then every later look-ahead runs prompts
        again, after a warning)."""
        if rows is None or self.step_blocks is None or not self.reads_paged or any(len(p) < 2 for p in prompts):
            return None
        readers = [PagedPrompt.for_layer(layer.self_attn) for layer in self.layers]
        if any(reader is None for reader in readers):
            self._stop_reading("the engine's attention backend or KV-cache dtype has a layout not known here")
            return None
        device = self.stack.model.embed_tokens.weight.device
        try:
            blocks = self.step_blocks[torch.tensor(list(rows), dtype=torch.long, device=self.step_blocks.device)]
            cache = [[reader.read(blocks[r], len(prompt) - 1) for r, prompt in enumerate(prompts)]
                     for reader in readers]
        except Exception as error:  # noqa: BLE001 - the prompts can still be run again
            self._stop_reading(f"a read failed: {error!r}")
            return None
        ids = torch.tensor([token for prompt, first in zip(prompts, firsts) for token in (prompt[-1], first)],
                           dtype=torch.long, device=device)
        positions = self._in_window(torch.tensor([p for prompt in prompts for p in (len(prompt) - 1, len(prompt))],
                                                 device=device))
        hidden = self._forward(ids, positions, [2] * len(prompts), cache)
        after_prompt = self.stack.compute_logits(hidden[0::2])
        disagreement = float(total_variation(after_prompt, first_logits.to(after_prompt.device)).max())
        if disagreement > READ_AGREES:
            self._stop_reading(f"the expert's distribution after a prompt read from it differs from the engine's by "
                               f"{disagreement:.3g} (total variation)")
            return None
        return hidden, [2] * len(prompts), positions, cache

    def _stop_reading(self, why: str) -> None:
        self.reads_paged = False
        logger.warning("ngsd: the look-ahead no longer reads prompts from the expert's paged KV cache (%s); it runs "
                       "each checked prompt through the expert again, which stalls the engine's step longer", why)

    def _in_window(self, positions: torch.Tensor) -> torch.Tensor:
        return positions if self.last_position is None else positions.clamp_max(self.last_position)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, lengths: list[int],
                 cache: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
        """`LlamaModel.forward` and `LlamaDecoderLayer.forward`, step for step, on the requests' new tokens packed
        one after another (`lengths` each), but attention over `cache`."""
        model = self.stack.model
        hidden, residual = model.embed_tokens(ids), None
        pasts = [0] * len(lengths) if not cache[0] else [k.shape[1] for k, _ in cache[0]]
        # causal over each request's whole context: its new position j sees its `past` cached ones and its new ones
        # up to itself
        allowed = [torch.ones(new, past + new, dtype=torch.bool, device=ids.device).tril(past)
                   for new, past in zip(lengths, pasts)]
        for i, layer in enumerate(self.layers):
            if residual is None:
                residual, hidden = hidden, layer.input_layernorm(hidden)
            else:
                hidden, residual = layer.input_layernorm(hidden, residual)
            hidden = self._attention(layer.self_attn, positions, hidden, lengths, cache[i], allowed)
            hidden, residual = layer.post_attention_layernorm(hidden, residual)
            hidden = layer.mlp(hidden)
        hidden, _ = model.norm(hidden, residual)
        return hidden

    @staticmethod
    def _attention(attention: Any, positions: torch.Tensor, hidden: torch.Tensor, lengths: list[int],
                   cache: list[tuple[torch.Tensor, torch.Tensor]], allowed: list[torch.Tensor]) -> torch.Tensor:
        qkv, _ = attention.qkv_proj(hidden)
        q, k, v = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
        q, k = attention.rotary_emb(positions, q, k)
        heads, kv_heads, size = attention.num_heads, attention.num_kv_heads, attention.head_dim
        groups = heads // kv_heads
        outs = []
        for r, (q_r, k_r, v_r) in enumerate(zip(q.split(lengths), k.split(lengths), v.split(lengths))):
            k_r = k_r.reshape(-1, kv_heads, size).transpose(0, 1)
            v_r = v_r.reshape(-1, kv_heads, size).transpose(0, 1)
            if r < len(cache):
                k_r, v_r = torch.cat([cache[r][0], k_r], dim=1), torch.cat([cache[r][1], v_r], dim=1)
                cache[r] = (k_r, v_r)
            else:
                cache.append((k_r, v_r))
            q_r = q_r.reshape(-1, heads, size).transpose(0, 1)
            out = F.scaled_dot_product_attention(q_r, k_r.repeat_interleave(groups, 0),
                                                 v_r.repeat_interleave(groups, 0), attn_mask=allowed[r],
                                                 scale=attention.scaling)
            outs.append(out.transpose(0, 1).reshape(-1, heads * size))
        out, _ = attention.o_proj(torch.cat(outs))
        return out
