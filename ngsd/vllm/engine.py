"""The arguments that turn a vLLM engine into a guarded one: offline (`LLM(**engine_kwargs(...))`) or `vllm serve`.

Two things make an engine guarded, and both are needed: the wrapper architecture (through
``hf_overrides``, which also carries the operator's settings to the worker) and the logits
processor (``logits_processors``). The wrapper refuses to load without the processor, so a
half-configured engine fails at start instead of serving unguarded.

The settings are checked here, in the front-end process, before any engine starts (the worker's
own failure reads only "Engine core initialization failed"): the expert folder, and whether the
risk probe runs (`ngsd.vllm.risk.probe_folder`). With the probe on, prefix caching is switched off
(the probe must see every prompt token's forward; an explicit ``enable_prefix_caching=True`` is
refused).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from .settings import CONFIG_KEY, GuardSettings, expert_folder

ARCHITECTURE = "NGSDGuardedLlamaForCausalLM"
MODEL_CLASS = "ngsd.vllm.model:NGSDGuardedLlamaForCausalLM"
PROCESSOR = "ngsd.vllm.processor:NGSDLogitsProcessor"
PROCESSED_LOGPROBS_MODES = ("processed_logits", "processed_logprobs")  # vLLM's names for logprobs after the processors


def guard_settings(expert: str = "shipped", alpha: float = 0.9, allow_opt_out: bool = False,
                   gate: Mapping[str, Any] | None = None, risk: str = "auto", probe: str | None = None,
                   reflection: Mapping[str, Any] | None = None, verdict_log: str | None = None) -> GuardSettings:
    return GuardSettings(expert=str(expert), alpha=alpha, allow_opt_out=allow_opt_out, gate=dict(gate or {}),
                         risk=risk, probe=None if probe is None else str(probe), reflection=dict(reflection or {}),
                         verdict_log=None if verdict_log is None else str(verdict_log))


def guard_overrides(model: str, settings: GuardSettings) -> tuple[dict[str, Any], bool]:
    """The ``hf_overrides`` of a guarded engine of `model`, and whether its risk probe runs (validated here,
    before any engine starts)."""
    from .risk import EngineRisk, model_config_of, probe_folder

    # here, not only in the engine's worker, whose failure reads "Engine core initialization failed"
    check_expert_fits(model, expert_folder(settings.expert))
    if settings.verdict_log is not None:
        log_dir = Path(settings.verdict_log).expanduser().resolve().parent
        if not log_dir.is_dir() or not os.access(log_dir, os.W_OK):
            raise ValueError(f"ngsd verdict_log {settings.verdict_log!r}: its folder {log_dir} does not exist or cannot "
                             "be written; create it, or give another path")
    folder = probe_folder(settings, model_config_of(model))
    if folder is None and (settings.reflection or settings.verdict_log):
        # both shape or record the probe's decisions: without a probe they were accepted and ignored
        raise ValueError(f"ngsd reflection / verdict_log apply to the risk probe, and no probe runs for {model!r} with "
                         f"expert {settings.expert!r} and gate mode {settings.config().mode!r} (risk='auto' runs the "
                         "shipped probe for the default model with the shipped expert only); drop them, or give "
                         "risk='probe' with a probe folder")
    if folder is not None:
        EngineRisk(folder, settings)  # a probe that loads, and a prime_divergence="check" it can serve
    elif settings.config().prime_divergence == "check":
        raise ValueError(f"ngsd gate prime_divergence='check' takes the risk probe's divergence check, and no probe "
                         f"runs for {model!r} with expert {settings.expert!r} (risk='auto' runs the shipped probe for "
                         "the default model with the shipped expert only); give prime_divergence a number, or "
                         "risk='probe' with a probe folder")
    return {"architectures": [ARCHITECTURE], CONFIG_KEY: settings.to_dict()}, folder is not None


def check_expert_fits(model: str, expert: Path) -> None:
    """The expert loads and fits `model` (a local folder: checked on a weightless copy of its architecture; a hub id
    is checked by the worker)."""
    from ..experts.lora import LoraAdapter

    adapter = LoraAdapter.load(expert)
    config_file = Path(str(model)).expanduser() / "config.json"
    if not config_file.is_file():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_file.parent)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    try:
        adapter.fitting_layers(skeleton)  # raises naming the layer that does not fit, and the model it was trained for
    except ValueError as error:
        raise ValueError(f"ngsd expert {str(expert)!r} does not fit {model!r}: {error}") from None


def engine_kwargs(model: str, *, expert: str = "shipped", alpha: float = 0.9, allow_opt_out: bool = False,
                  gate: Mapping[str, Any] | None = None, risk: str = "auto", probe: str | None = None,
                  reflection: Mapping[str, Any] | None = None, verdict_log: str | None = None,
                  **engine_args: Any) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` / ``EngineArgs``: `model` guarded by `expert` (see `GuardSettings`).

    Other vLLM arguments pass through (``dtype``, ``max_num_seqs``...). Speculative decoding is
    refused by vLLM itself for engines with custom logits processors.
    """
    settings = guard_settings(expert, alpha, allow_opt_out, gate, risk, probe, reflection, verdict_log)
    guard, probe_on = guard_overrides(model, settings)
    if probe_on:
        if engine_args.get("enable_prefix_caching"):
            raise ValueError("enable_prefix_caching=True: the risk probe reads every prompt token's hidden state, "
                             "and prefix caching skips cached ones; leave it unset (off), or set risk='off'")
        engine_args["enable_prefix_caching"] = False
    if engine_args.get("logprobs_mode") in PROCESSED_LOGPROBS_MODES:
        raise ValueError(f"logprobs_mode={engine_args['logprobs_mode']!r}: vLLM takes such logprobs after the logits "
                         "processors, where the guard has forced the chosen token (0 for it, -inf for the rest); leave "
                         "the default 'raw_logprobs' (the base model's) or use 'raw_logits'")
    user_overrides = engine_args.pop("hf_overrides", None) or {}
    if not isinstance(user_overrides, Mapping):
        raise TypeError(f"hf_overrides must be a dict with a guarded engine (ngsd adds its own keys to it), got "
                        f"{type(user_overrides).__name__}; give the config changes as a dict")
    overrides = {**user_overrides, **guard}
    user_processors = engine_args.pop("logits_processors", None) or []
    if isinstance(user_processors, (str, type)):
        user_processors = [user_processors]  # one processor given alone (a string was split into characters)
    # the guard's processor once: named again, its second instance found the step's expert rows taken and the engine died
    processors = [p for p in user_processors if not is_guard_processor(p)]
    return {"model": str(model), "hf_overrides": overrides, "logits_processors": [PROCESSOR, *processors],
            **engine_args}


def is_guard_processor(processor: Any) -> bool:
    """`processor` (a "module:Class" name or the class) is ngsd's logits processor."""
    if not isinstance(processor, str):
        processor = f"{getattr(processor, '__module__', '')}:{getattr(processor, '__qualname__', '')}"
    return processor == PROCESSOR


def serve_args(model: str, *, expert: str = "shipped", alpha: float = 0.9, allow_opt_out: bool = False,
               gate: Mapping[str, Any] | None = None, risk: str = "auto", probe: str | None = None,
               reflection: Mapping[str, Any] | None = None, verdict_log: str | None = None) -> list[str]:
    """The ``vllm serve`` arguments of the same guarded engine (the OpenAI-compatible server).

    >>> serve_args("m", alpha=0.5)[:3]
    ['serve', 'm', '--hf-overrides']
    """
    settings = guard_settings(expert, alpha, allow_opt_out, gate, risk, probe, reflection, verdict_log)
    overrides, probe_on = guard_overrides(model, settings)
    args = ["serve", str(model), "--hf-overrides", json.dumps(overrides), "--logits-processors", PROCESSOR]
    return args + (["--no-enable-prefix-caching"] if probe_on else [])
