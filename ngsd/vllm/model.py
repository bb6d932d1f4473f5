"""`NGSDGuardedLlamaForCausalLM`: the base and its expert as one vLLM model, one request per prompt.

Both are full-depth copies of vLLM's own Llama stack, built under the prefixes ``base`` and
``expert``; the expert's weights are the base checkpoint's with the LoRA delta ``scale * B @ A``
added as they load. Each stack has its own attention layers, so vLLM allocates a paged KV cache
for both and schedules them as one request: chunked prefill, preemption and recompute, prefix
caching and batch reordering treat base and expert alike, and the two always see the same
context. `forward` returns both final hidden states side by side ([tokens, 2 * hidden]);
`compute_logits` runs the (shared) LM head once on both stacks' rows, returns the base logits
(what vLLM's sampler, its built-in processors and opted-out requests see) and leaves the
expert's logits of the same rows for `NGSDLogitsProcessor` (`channel.py`).

With the risk probe on (`risk.py`) the base stack also returns the residual stream at the probe's
layer, and `forward` scores every token of the step with the probe (one dot product a token);
`compute_logits` adds the first-step divergence of the rows the processor is about to decide, and the
expert stack decodes the check's look-ahead (`look_ahead.py`) when the processor asks for one. Both
stacks still run for every request: a routed request saves the guarded step, not the expert's
forward (the two share one vLLM request and one schedule).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.sequence import IntermediateTensors

from ..experts.lora import LoraAdapter
from ..risk.divergence_check import total_variation
from .channel import CHANNEL, ExpertRows
from .engine import ARCHITECTURE, PROCESSED_LOGPROBS_MODES, PROCESSOR, is_guard_processor
from .look_ahead import ExpertOpening, look_ahead_unsupported
from .risk import EngineRisk, ProbeTokens
from .settings import CONFIG_KEY, GuardSettings, expert_folder

logger = logging.getLogger(__name__)


class NGSDGuardedLlamaForCausalLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.settings = GuardSettings.from_mapping(getattr(config, CONFIG_KEY, None))
        _check_engine(vllm_config)
        self.hidden_size = config.hidden_size
        self.base = LlamaForCausalLM(vllm_config=vllm_config, prefix=_join(prefix, "base"))
        self.expert = LlamaForCausalLM(vllm_config=vllm_config, prefix=_join(prefix, "expert"))
        self.adapter = LoraAdapter.load(expert_folder(self.settings.expert))
        self.risk = EngineRisk.for_engine(self.settings, config)
        CHANNEL.look_ahead = None
        if self.risk is not None:
            _check_probe_engine(vllm_config, self.risk)
            # the residual stream entering decoder layer `layer` (hidden + residual): HF's hidden_states[layer]
            self.base.model._set_aux_hidden_state_layers((self.risk.layer,))
            if self.risk.plan.check_rollout:
                why_not = look_ahead_unsupported(vllm_config, self.expert)
                if why_not is None:
                    CHANNEL.look_ahead = ExpertOpening(self.expert)
                else:  # the divergence alone decides: it guards every request the look-ahead would have routed
                    logger.warning("ngsd: the divergence check's look-ahead (check_rollout %d) is off on this engine "
                                   "(%s); a diverging request stays guarded", self.risk.plan.check_rollout, why_not)
        if self.adapter.targets_lm_head() or any(name.split(".")[-1] == "embed_tokens" for name in self.adapter.pairs):
            raise ValueError(f"ngsd: the expert {self.adapter.source} changes the LM head or the embeddings (tied to the "
                             "head); only decoder-layer LoRA adapters are supported in vLLM")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        base = self.base.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        if self.risk is not None:
            base, (probe_hidden,) = base
            CHANNEL.put_probe(self._probe_tokens(probe_hidden, positions))
            if CHANNEL.look_ahead is not None:  # where this step's look-ahead finds the prompts' expert keys, values
                CHANNEL.look_ahead.step_blocks = self._expert_blocks() if CHANNEL.check_rows else None
        expert = self.expert.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        return torch.cat([base, expert], dim=-1)

    def _probe_tokens(self, hidden: torch.Tensor, positions: torch.Tensor) -> ProbeTokens | None:
        """The probe's score of every real token of this step, with positions and each request's range."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
        if isinstance(metadata, list):
            raise ValueError("ngsd: the risk probe cannot split micro-batched steps (ubatching); turn it off")
        starts = next((m.query_start_loc for m in (metadata or {}).values()
                       if getattr(m, "query_start_loc", None) is not None), None)
        if starts is None:  # a profiling or warm-up run: no requests
            return None
        starts = starts.to("cpu", torch.long)
        tokens = int(starts[-1])
        return ProbeTokens(logits=self.risk.token_logits(hidden[:tokens]).cpu(),
                           positions=positions[:tokens].to("cpu", torch.long), starts=starts)

    def _expert_blocks(self) -> torch.Tensor | None:
        """This step's block table of the expert stack's attention (a row per request), None without one."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
        first = self.expert.model.layers[self.expert.model.start_layer].self_attn.attn.layer_name
        table = getattr((metadata or {}).get(first) if isinstance(metadata, dict) else None, "block_table", None)
        return table.clone() if isinstance(table, torch.Tensor) else None

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        base, expert = hidden_states.split(self.hidden_size, dim=-1)
        rows = base.shape[0]
        # The expert's LM head is the base's (the adapter may not touch it: checked at load), so one
        # GEMM on the stacked rows reads the head's weight once for both.
        logits = self.base.compute_logits(torch.cat([base, expert], dim=0))
        if logits is None:  # a tensor-parallel rank the head gathers away from: it does not sample
            return None
        divergence: dict[int, float] = {}
        check = [row for row in CHANNEL.check_rows if row < rows] if self.risk is not None else []
        if check:  # the raw logits, before vLLM's masks and biases touch the base rows
            index = torch.tensor(check, dtype=torch.long, device=logits.device)
            divergence = dict(zip(check, total_variation(logits[index], logits[index + rows]).tolist()))
        # copies: vLLM's rules write the base rows in place
        before_rules = {row: logits[row].clone() for row in CHANNEL.ruled_rows if row < rows}
        CHANNEL.put(ExpertRows(logits[rows:], divergence, before_rules))
        return logits[:rows]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Every checkpoint tensor to the base as is, and to the expert with its LoRA delta merged in."""
        unused = set(self.adapter.pairs)

        def both() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                yield f"base.{name}", tensor
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                pair = self.adapter.pairs.get(module) if module is not None else None
                if pair is not None:
                    tensor = _merged(name, tensor, pair.up, pair.down, self.adapter.scale)
                    unused.discard(module)
                yield f"expert.{name}", tensor

        loaded = AutoWeightsLoader(self).load_weights(both())
        if unused:
            raise ValueError(f"ngsd: the expert {self.adapter.source} adapts modules the checkpoint does not have: "
                             f"{sorted(unused)[:4]}...; it was trained for another model")
        return loaded


def _merged(name: str, weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    if (up.shape[0], down.shape[1]) != tuple(weight.shape):
        raise ValueError(f"ngsd: the expert's LoRA for {name} is {tuple(up.shape)}x{tuple(down.shape)}, the weight "
                         f"{tuple(weight.shape)}; it was trained for another model")
    delta = scale * (up.to(torch.float32) @ down.to(torch.float32))
    return (weight.to(torch.float32) + delta).to(weight.dtype)


def _check_engine(vllm_config: VllmConfig) -> None:
    """Refuse engines that would run this model without the guard doing its job."""
    from .processor import NGSDLogitsProcessor

    processors = vllm_config.model_config.logits_processors or []
    guards = sum(p is NGSDLogitsProcessor or is_guard_processor(p) for p in processors)
    if guards != 1:
        raise ValueError(f"ngsd: {ARCHITECTURE} needs its logits processor exactly once (found {guards}): "
                         f"logits_processors=['{PROCESSOR}'] (ngsd.vllm.engine_kwargs and serve_args add it)")
    mode = getattr(vllm_config.model_config, "logprobs_mode", "raw_logprobs")
    if mode in PROCESSED_LOGPROBS_MODES:
        raise ValueError(f"ngsd: logprobs_mode={mode!r} takes logprobs after the guard has forced each guarded token "
                         "(0 for it, -inf for the rest); use the default 'raw_logprobs' (the base model's)")
    if vllm_config.use_v2_model_runner:
        raise ValueError("ngsd: the guarded model runs on vLLM's V1 model runner (its logits-processor interface); "
                         "set VLLM_USE_V2_MODEL_RUNNER=0")


def _check_probe_engine(vllm_config: VllmConfig, risk: EngineRisk) -> None:
    """Refuse engines in which the probe would not see every prompt token (see `risk.py`)."""
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(f"ngsd: the risk probe ({risk.folder}) reads every prompt token's hidden state, and prefix "
                         "caching skips the forward of cached ones: start the engine with enable_prefix_caching=False "
                         "(ngsd.vllm.engine_kwargs does; vllm serve: --no-enable-prefix-caching), or with the settings' "
                         "risk='off' (every request guarded at alpha)")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("ngsd: the risk probe runs without pipeline parallelism only; set risk='off' or "
                         "pipeline_parallel_size=1")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
