"""The arguments that turn a vLLM engine into a guarded one: offline (`LLM(**engine_kwargs(...))`) or `vllm serve`.

Two things make an engine guarded, and both are needed: the wrapper architecture (through
``hf_overrides``, which also carries the operator's settings to the worker) and the logits
processor (``logits_processors``). The wrapper refuses to load without the processor, so a
half-configured engine fails at start instead of serving unguarded.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .settings import CONFIG_KEY, GuardSettings, expert_folder

ARCHITECTURE = "NGSDGuardedLlamaForCausalLM"
MODEL_CLASS = "ngsd.vllm.model:NGSDGuardedLlamaForCausalLM"
PROCESSOR = "ngsd.vllm.processor:NGSDLogitsProcessor"


def guard_overrides(expert: str = "shipped", alpha: float = 0.9, allow_opt_out: bool = False,
                    gate: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``hf_overrides`` of a guarded engine (validated here, before any engine starts)."""
    settings = GuardSettings(expert=str(expert), alpha=alpha, allow_opt_out=allow_opt_out, gate=dict(gate or {}))
    expert_folder(settings.expert)  # here, not only in the engine's worker, whose failure reads "initialization failed"
    return {"architectures": [ARCHITECTURE], CONFIG_KEY: settings.to_dict()}


def engine_kwargs(model: str, *, expert: str = "shipped", alpha: float = 0.9, allow_opt_out: bool = False,
                  gate: Mapping[str, Any] | None = None, **engine_args: Any) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``EngineArgs``: `model` guarded by `expert` (see `GuardSettings`).

    Other vLLM arguments pass through (``dtype``, ``max_num_seqs``...). Speculative decoding is
    refused by vLLM itself for engines with custom logits processors.
    """
    overrides = dict(engine_args.pop("hf_overrides", None) or {})
    overrides.update(guard_overrides(expert, alpha, allow_opt_out, gate))
    processors = list(engine_args.pop("logits_processors", None) or [])
    return {"model": str(model), "hf_overrides": overrides, "logits_processors": [PROCESSOR, *processors],
            **engine_args}


def serve_args(model: str, *, expert: str = "shipped", alpha: float = 0.9, allow_opt_out: bool = False,
               gate: Mapping[str, Any] | None = None) -> list[str]:
    """The ``vllm serve`` arguments of the same guarded engine (the OpenAI-compatible server).

    >>> serve_args("m", alpha=0.5)[:3]
    ['serve', 'm', '--hf-overrides']
    """
    overrides = guard_overrides(expert, alpha, allow_opt_out, gate)
    return ["serve", str(model), "--hf-overrides", json.dumps(overrides), "--logits-processors", PROCESSOR]
