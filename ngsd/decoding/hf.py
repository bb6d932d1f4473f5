"""Guarded decoding behind Hugging Face's own `generate`, through its `custom_generate` hook.

transformers (5.x; tested from 5.19) accepts a callable as ``custom_generate``: ``generate`` prepares inputs,
generation config and stopping criteria as usual, then hands the decoding loop to the callable.
`decoding_method` builds such a callable; `apply` makes it the default for one model object so
that existing ``model.generate(...)`` calls become guarded, and `remove` undoes it.

>>> import ngsd
>>> model, tokenizer = ngsd.load_model()                                     # doctest: +SKIP
>>> ngsd.apply(model, expert="shipped", tokenizer=tokenizer)                  # doctest: +SKIP
>>> out = model.generate(**tokenizer(["How do I pick a lock?"], return_tensors="pt"),
...                      max_new_tokens=32, return_dict_in_generate=True)     # doctest: +SKIP
>>> out.ngsd_traces[0].spikes                                                 # doctest: +SKIP
>>> ngsd.remove(model)                                                        # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable

import torch
from torch import nn
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..config import NGSDConfig
from ..experts.resolve import ExpertLike, check_step_dtypes, resolve_expert
from .loop import RowTrace, guarded_generate
from ..experts.lora import LoraAdapter

_STATE_ATTR = "_ngsd_guard"


@dataclass
class GuardedGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate(..., return_dict_in_generate=True)` output with the gate trace of every row."""

    ngsd_traces: list[RowTrace] | None = None


def _generation_eos_ids(generation_config) -> list[int] | None:
    """The eos ids of the generation config `generate` prepared for this call (None: no eos stop)."""
    eos = getattr(generation_config, "_eos_token_tensor", None)
    if eos is not None:
        return eos.flatten().tolist()
    eos = generation_config.eos_token_id
    if eos is None:
        return None
    return [eos] if isinstance(eos, int) else list(eos)


# Settings guarded decoding cannot honour: refused by name rather than dropped.
_UNSUPPORTED = (
    ("num_beams", lambda v: v is not None and v > 1, "beam search; use num_beams=1"),
    ("num_return_sequences", lambda v: v is not None and v > 1, "repeat the prompt in the batch instead"),
    ("num_beam_groups", lambda v: v is not None and v > 1, "group beam search"),
    ("diversity_penalty", lambda v: bool(v), "group beam search"),
    ("penalty_alpha", lambda v: v is not None and v > 0, "contrastive search"),
    ("constraints", lambda v: bool(v), "constrained beam search"),
    ("force_words_ids", lambda v: bool(v), "constrained beam search"),
    ("guidance_scale", lambda v: v is not None and v != 1, "classifier-free guidance needs its own forward"),
    ("min_p", lambda v: v is not None and v > 0.0, "use top_k / top_p"),
    ("typical_p", lambda v: v is not None and v < 1.0, "use top_k / top_p"),
    ("epsilon_cutoff", lambda v: v is not None and v > 0.0, "use top_k / top_p"),
    ("eta_cutoff", lambda v: v is not None and v > 0.0, "use top_k / top_p"),
    ("top_h", lambda v: v is not None, "use top_k / top_p"),
    ("watermarking_config", lambda v: v is not None, "watermarking"),
    ("dola_layers", lambda v: v is not None, "DoLa contrasts the model's own layers, not an expert"),
    ("prompt_lookup_num_tokens", lambda v: v is not None, "prompt-lookup (assisted) decoding drafts tokens the guard "
     "did not choose"),
    ("assistant_early_exit", lambda v: v is not None, "self-speculative decoding drafts tokens the guard did not "
     "choose"),
    ("output_scores", lambda v: bool(v), "the trace in ngsd_traces has the gate's per-step values"),
    ("output_logits", lambda v: bool(v), "the trace in ngsd_traces has the gate's per-step values"),
    ("output_attentions", lambda v: bool(v), "not collected by guarded decoding"),
    ("output_hidden_states", lambda v: bool(v), "not collected by guarded decoding"),
)


def check_generation_config(generation_config) -> None:
    """Refuse, by name, each setting of `generation_config` that guarded decoding cannot honour."""
    for name, unsupported, hint in _UNSUPPORTED:
        value = getattr(generation_config, name, None)
        if unsupported(value):
            raise ValueError(f"guarded decoding does not support {name}={value!r} ({hint}); call ngsd.remove(model) "
                             "for plain generate")


def step_processors(logits_processor, generation_config):
    """The processors HF built for this call minus the sampling warpers the step op applies itself
    (temperature, top-k, top-p from the same generation config) and min_p 0 (a no-op, which HF builds
    anyway); None when nothing is left. Any other warper left is refused by the loop."""
    from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    gc = generation_config

    def native(processor) -> bool:
        if not gc.do_sample:
            return False
        return (
            isinstance(processor, TemperatureLogitsWarper) and processor.temperature == gc.temperature
            or isinstance(processor, TopKLogitsWarper) and processor.top_k == max(gc.top_k or 0, 1)
            or isinstance(processor, TopPLogitsWarper) and processor.top_p == gc.top_p
            or isinstance(processor, MinPLogitsWarper) and processor.min_p == 0.0 == gc.min_p
        )

    kept = [processor for processor in (logits_processor or []) if not native(processor)]
    return LogitsProcessorList(kept) if kept else None


def _check_config(config: Any, name: str) -> NGSDConfig:
    if not isinstance(config, NGSDConfig):
        raise TypeError(f"{name} must be an NGSDConfig, got {config!r} ({type(config).__name__})")
    return config


def _check_tokenizer(tokenizer: Any, name: str) -> None:
    """None, or a tokenizer object: a name ("gpt2") passed where the object belongs switched the chat-template
    check off without a word and failed later with an AttributeError."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(f"{name} must be the tokenizer object (e.g. AutoTokenizer.from_pretrained({str(tokenizer)!r}) "
                        "or the one ngsd.load_model returns), not its name")
    if not callable(getattr(tokenizer, "batch_decode", None)):
        raise TypeError(f"{name} must be a Hugging Face tokenizer (with batch_decode), got {type(tokenizer).__name__}")


def decoding_method(expert: ExpertLike, config: NGSDConfig | None = None, tokenizer=None) -> Callable[..., Any]:
    """A `custom_generate` callable running guarded decoding with this expert and config.

    Per call, ``generate`` also takes ``ngsd_alpha`` (float or one per row), ``ngsd_requests``
    (the request texts self-reflection judges; default: each prompt's user turn, read back through the
    tokenizer's chat template, else the decoded prompt), ``ngsd_seed``, ``ngsd_streamer``,
    ``ngsd_tokenizer``, ``ngsd_stop_strings`` and ``ngsd_config``.
    """
    config = _check_config(config or NGSDConfig(), "config")
    _check_tokenizer(tokenizer, "tokenizer")

    def ngsd_decoding(
        model: nn.Module,
        input_ids: torch.Tensor,
        logits_processor=None,
        stopping_criteria=None,
        generation_config=None,
        ngsd_alpha=None,
        ngsd_requests=None,
        ngsd_seed=None,
        ngsd_streamer=None,
        ngsd_tokenizer=None,
        ngsd_stop_strings=None,
        ngsd_config: NGSDConfig | None = None,
        **model_kwargs: Any,
    ):
        call_config = config if ngsd_config is None else _check_config(ngsd_config, "ngsd_config")
        gc = generation_config
        check_generation_config(gc)
        if model_kwargs.get("inputs_embeds") is not None:
            raise ValueError("guarded decoding does not support inputs_embeds (the expert rows need the token ids); "
                             "pass input_ids, or call ngsd.remove(model) for plain generate")
        call_tokenizer = ngsd_tokenizer or tokenizer
        _check_tokenizer(call_tokenizer, "tokenizer")
        resolved = resolve_expert(expert, model, required=call_config.mode != "off", tokenizer=call_tokenizer)
        max_new = gc.max_length - input_ids.shape[1] if gc.max_length is not None else 20
        pad = getattr(gc, "_pad_token_tensor", None)
        output = guarded_generate(
            model,
            input_ids,
            model_kwargs.get("attention_mask"),
            expert=resolved,
            config=call_config,
            alpha=ngsd_alpha,
            max_new_tokens=max(1, max_new),
            do_sample=bool(gc.do_sample),
            temperature=gc.temperature if gc.temperature is not None else 1.0,
            top_k=gc.top_k or 0,
            logits_processor=step_processors(logits_processor, gc),
            top_p=gc.top_p if gc.top_p is not None else 1.0,
            seed=ngsd_seed,
            eos_token_id=_generation_eos_ids(gc),
            pad_token_id=int(pad) if pad is not None else gc.pad_token_id,
            stop_strings=ngsd_stop_strings,
            tokenizer=call_tokenizer,
            streamer=ngsd_streamer,
            stopping_criteria=stopping_criteria,
            requests=ngsd_requests,
        )
        if gc.return_dict_in_generate:
            return GuardedGenerateOutput(sequences=output.sequences, ngsd_traces=output.traces)
        return output.sequences

    return ngsd_decoding


@dataclass(frozen=True)
class _Guard:
    expert: LoraAdapter | nn.Module | None  # None: applied with mode="off", the base alone
    method: Callable[..., Any]
    holds_hooks: bool  # apply holds the LoRA expert's hooks (`LoraAdapter.hold`) until `remove`

    # a copy of the model would keep a `generate` bound to the original (it would decode with the original model)
    def __deepcopy__(self, memo: dict) -> "_Guard":
        raise TypeError(_NOT_COPYABLE)

    def __reduce_ex__(self, protocol: int):
        raise TypeError(_NOT_COPYABLE)


_NOT_COPYABLE = ("a model guarded by ngsd.apply cannot be copied or pickled (its generate is bound to this object): "
                 "call ngsd.remove(model) first, copy or save the model, then ngsd.apply each copy")


def apply(
    model: nn.Module, expert: ExpertLike = "shipped", config: NGSDConfig | None = None, tokenizer=None
) -> nn.Module:
    """Make `model.generate(...)` guarded (for this model object only). Returns the model.

    The usual `generate` arguments and `GenerationConfig` keep working; `streamer`, `tokenizer`
    and `stop_strings` are forwarded to the guarded loop. ``ngsd_alpha=...`` sets alpha per call.
    """
    if config is not None:
        _check_config(config, "config")  # before anything is attached
    _check_tokenizer(tokenizer, "tokenizer")
    if "generate" in vars(model) and not is_applied(model):
        raise ValueError("this model object has a generate of its own (a hub custom_generate, or a patch), which "
                         "ngsd.apply would bypass; load the model without it, or call ngsd.guarded_generate directly")
    # the new expert is resolved and checked before an earlier guard is removed: a failure leaves the model as it was
    resolved = resolve_expert(expert, model, required=(config or NGSDConfig()).mode != "off", tokenizer=tokenizer)
    check_step_dtypes(model, resolved)
    reflection = (config or NGSDConfig()).reflection
    if reflection.probe is not None and reflection.mode in ("auto", "probe"):
        from ..risk.estimate import load_probe

        load_probe(model, reflection)  # a missing, damaged or foreign probe fails here, not at the first generate
    if is_applied(model):
        remove(model)
    method = decoding_method(resolved, config, tokenizer)
    holds_hooks = isinstance(resolved, LoraAdapter) and resolved.hold(model)
    unguarded_generate = type(model).generate
    parameters = _positional_names(unguarded_generate)

    def generate(*args: Any, **kwargs: Any):
        kwargs = _as_keywords(parameters, args, kwargs)
        if kwargs.get("custom_generate") is not None:
            raise ValueError("this model's generate is guarded by ngsd; call ngsd.remove(model) to use custom_generate")
        for name in ("assistant_model", "negative_prompt_ids"):
            if kwargs.get(name) is not None:
                raise ValueError(f"guarded decoding does not support {name}; call ngsd.remove(model) for plain generate")
        _refuse_continuous_batching(kwargs)
        _refuse_token_healing(model, kwargs)
        for name in ("streamer", "tokenizer", "stop_strings"):
            if kwargs.get(name) is not None:
                kwargs[f"ngsd_{name}"] = kwargs.pop(name)
        _check_lengths(kwargs)
        _move_configured_stop_strings(model, kwargs)
        return unguarded_generate(model, custom_generate=method, **kwargs)

    generate.__doc__ = f"Guarded by ngsd. {unguarded_generate.__doc__ or ''}"
    # first: a copy or pickle meets its clear error first
    setattr(model, _STATE_ATTR, _Guard(resolved, method, holds_hooks))
    model.generate = generate
    for name in _UNGUARDED_ENTRY_POINTS:
        if hasattr(type(model), name):
            setattr(model, name, _refused(name))
    return model


# HF's continuous batching decodes outside `generate`: on a guarded model it would answer unguarded
_UNGUARDED_ENTRY_POINTS = ("generate_batch", "init_continuous_batching", "continuous_batching_context_manager")


def _refused(name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"{name} runs HF's continuous batching, which decodes without the guard; use the guarded "
                         "model.generate (or ngsd.vllm to serve), or call ngsd.remove(model) first")

    return refuse


def _positional_names(unguarded_generate: Callable[..., Any]) -> list[str]:
    """The names of `generate`'s positional parameters after `self`, in order."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(unguarded_generate).parameters.values() if p.kind in kinds][1:]


def _as_keywords(parameters: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """`generate`'s positional arguments by name, so that every check below sees them (a generation_config or
    a streamer passed by position, as plain `generate` allows)."""
    if len(args) > len(parameters):
        raise TypeError(f"generate takes at most {len(parameters)} positional arguments, got {len(args)}")
    named = dict(zip(parameters, args))
    twice = sorted(set(named) & set(kwargs))
    if twice:
        raise TypeError(f"generate got {twice} both by position and by name")
    return {**named, **kwargs}


def _refuse_continuous_batching(kwargs: dict[str, Any]) -> None:
    """cache_implementation="paged" makes HF's `generate` run continuous batching before it looks at
    `custom_generate`: the guard would be skipped without a word."""
    if kwargs.get("cache_implementation") == "paged":
        raise ValueError("guarded decoding does not support cache_implementation='paged' (HF's continuous batching "
                         "runs without the guard); use the default cache, or ngsd.vllm for continuous batching")


def _refuse_token_healing(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """HF heals the prompt with the call's tokenizer, which it does not keep for a `custom_generate` callable
    (transformers 5.x): token healing would fail with "you must pass the model's tokenizer" although it was."""
    healing = kwargs.get("token_healing")
    for config in (kwargs.get("generation_config"), model.generation_config):  # HF fills a None from the next
        if healing is None:
            healing = getattr(config, "token_healing", None)
    if healing:
        raise ValueError("guarded decoding does not support token_healing (HF drops the tokenizer it needs before "
                         "the guarded loop); heal the prompt first (model.heal_tokens(input_ids, tokenizer)), then "
                         "generate without it")


def _check_lengths(kwargs: dict[str, Any]) -> None:
    """Length arguments that are not whole numbers, refused by name: HF's own check compares them with 0
    first and fails with a bare "'<=' not supported between instances of 'str' and 'int'"."""
    for name in ("max_new_tokens", "min_new_tokens", "max_length", "min_length"):
        value = kwargs.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        kwargs[name] = int(value)  # HF's own checks want a Python int (numpy's int64 is one in value only)


def _move_configured_stop_strings(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Stop strings set in a GenerationConfig (the call's or the model's) go to the guarded loop too.

    HF builds their stopping criterion only with a tokenizer, and it never hands `tokenizer=` on to a
    `custom_generate` callable, so left in the config they fail with "could not locate a tokenizer".
    """
    given = kwargs.get("generation_config")
    configured = getattr(given, "stop_strings", None)
    if configured is None:
        configured = getattr(model.generation_config, "stop_strings", None)
    if configured is None:
        return
    if "ngsd_stop_strings" not in kwargs and "stop_strings" not in kwargs:  # stop_strings=None: the caller's "none"
        kwargs["ngsd_stop_strings"] = configured
    if getattr(given, "stop_strings", None) is not None:
        given = copy.deepcopy(given)
        given.stop_strings = None
        kwargs["generation_config"] = given
    if getattr(model.generation_config, "stop_strings", None) is not None:
        kwargs["stop_strings"] = None  # else HF fills the model's back in


def is_applied(model: nn.Module) -> bool:
    return hasattr(model, _STATE_ATTR)


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`: plain `generate` again, LoRA hooks detached."""
    guard = getattr(model, _STATE_ATTR, None)
    if guard is None:
        return model
    if guard.holds_hooks:  # calls still decoding in other threads keep them until they finish
        guard.expert.release(model)
    for name in ("generate", *_UNGUARDED_ENTRY_POINTS):
        if name in vars(model):
            delattr(model, name)
    delattr(model, _STATE_ATTR)
    return model
