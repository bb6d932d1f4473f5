"""Turn whatever the user passed as `expert=` into a LoRA adapter or a separate model, checked."""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

from ngsd_kernels.checks import FLOAT_DTYPES

from .lora import LoraAdapter

if TYPE_CHECKING:
    from ..nest.update import NestUpdate

ExpertLike = Union[str, Path, LoraAdapter, nn.Module, None]
_ADAPTER_CACHE: dict[tuple, LoraAdapter] = {}  # `_folder_key` -> adapter


def resolve_expert(expert: ExpertLike, base: nn.Module, *, required: bool = True,
                   tokenizer=None) -> LoraAdapter | nn.Module | None:
    """A peft adapter folder or LoraAdapter -> LoraAdapter; a model, model folder or hub id -> model.

    "shipped" names the LoRA expert shipped for the default model; "nest" the NeST delta shipped for
    it, and a folder holding only a NeST delta (nest_delta.safetensors) becomes its exact LoRA form
    (`ngsd.nest.as_lora`): expert rows in the base's own forward, no folded copy of the base.
    tokenizer: the base's, when known. A model folder's own tokenizer must then map tokens as it does (for
    a loaded model too, when its config names the local folder it came from), and a separate expert whose
    LM head is padded to another row count than the base's is accepted when both heads cover it
    (`check_same_vocabulary`).
    """
    if hasattr(base, "peft_config") and callable(getattr(base, "get_base_model", None)):
        # its layers are peft's wrappers: the expert's hooks found no Linear of the adapter's names ("trained for
        # another architecture"), and its own adapter would run on the base rows too
        raise ValueError("the base model is wrapped by peft (a PeftModel): merge its adapter into the weights "
                         "first (model = model.merge_and_unload()), then guard the merged model; a safety adapter "
                         "goes in expert=")
    if expert is None:
        if required:
            raise ValueError(
                "guarded decoding needs an expert: a peft LoRA adapter folder, a LoraAdapter, a model with the "
                "same vocabulary, or 'shipped' for the expert shipped with ngsd for SmolLM2-135M-Instruct"
            )
        return None
    if isinstance(expert, (LoraAdapter, nn.Module)):
        resolved = expert
        if isinstance(expert, nn.Module):
            check_loaded_expert_tokenizer(expert, tokenizer)
    elif isinstance(expert, (str, os.PathLike)):
        resolved = _load(os.fspath(expert), base, tokenizer)
    else:  # str() of anything else became a hub id ('123'), looked up with network retries
        raise TypeError(f"expert must be a folder or hub id (str or path), a LoraAdapter, a model, 'shipped' or "
                        f"'nest', got {type(expert).__name__}")
    if isinstance(resolved, nn.Module):
        check_same_vocabulary(base, resolved, tokenizer)
    return resolved


def check_step_dtypes(base: nn.Module, expert: "LoraAdapter | nn.Module | None") -> None:
    """The step op reads float32, float16 or bfloat16 logits (or hidden states), one dtype for base and expert:
    refuse any other before a forward runs, naming the model and the fix (the op's own error names its inputs)."""

    def head_dtype(model: nn.Module) -> torch.dtype | None:
        return getattr(getattr(model.get_output_embeddings(), "weight", None), "dtype", None)

    dtype = head_dtype(base)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"the base model is {dtype}; guarded decoding runs float32, float16 or bfloat16 models: load "
                         "it with torch_dtype=torch.float32 (or call .float() on it)")
    other = head_dtype(expert) if isinstance(expert, nn.Module) else None
    if dtype is not None and other is not None and other != dtype:
        raise ValueError(f"the base model is {dtype} and the expert {other}: load both in one dtype "
                         f"(e.g. expert.to({dtype}))")


def _load(name: str, base: nn.Module, tokenizer) -> LoraAdapter | nn.Module:
    from ..nest.shipped import is_nest_delta, shipped_nest_path
    from .shipped import check_keyword_not_shadowing

    check_keyword_not_shadowing(name, "expert")
    if name == "nest":
        name = str(shipped_nest_path())
    if is_nest_delta(name):
        return _nest_adapter(name, base)
    if name == "shipped":
        from .shipped import shipped_expert_path

        name = str(shipped_expert_path())
    if (Path(name) / "adapter_config.json").is_file():
        key = _folder_key(name)
        if key not in _ADAPTER_CACHE:
            _ADAPTER_CACHE[key] = LoraAdapter.load(name)
        return _ADAPTER_CACHE[key]
    from ..loading import is_default_model, load_model

    if is_default_model(name):
        raise ValueError(f"expert {name!r} names the default base model itself, which would guard nothing; pass "
                         "'shipped' for the expert shipped for it, or an adapter / model folder")

    model, expert_tokenizer = load_model(name)
    check_same_tokenizer(tokenizer, expert_tokenizer)
    return model


_NEST_CACHE: dict[tuple, tuple["NestUpdate", LoraAdapter, str]] = {}  # `_folder_key` -> (delta, adapter, fingerprint)


def _folder_key(folder: str) -> tuple:
    """A cache key that changes with the folder: its resolved path (a relative path names another folder from
    another working directory) and each file's size and modification time (a retrained adapter is another)."""
    path = Path(folder).resolve()
    files = sorted((item.name, item.stat().st_size, item.stat().st_mtime_ns) for item in path.iterdir()
                   if item.is_file())
    return (str(path), tuple(files))


def _nest_adapter(folder: str, base: nn.Module) -> LoraAdapter:
    """A NeST delta folder as its LoRA adapter, converted once per folder and checked against `base` each time."""
    from ..nest.as_lora import nest_lora_adapter
    from ..nest.update import FOLDED_ATTR, NestUpdate

    key = _folder_key(folder)
    if key not in _NEST_CACHE:
        update = NestUpdate.load(folder)
        _NEST_CACHE[key] = (update, nest_lora_adapter(update, source=folder), update.fingerprint())
    update, adapter, fingerprint = _NEST_CACHE[key]
    update.check_model(base)  # a delta made for another model: a clear error before any hook is attached
    if fingerprint in base.__dict__.get(FOLDED_ATTR, ()):
        raise ValueError(f"the base model already has the NeST delta {folder} folded into its weights "
                         "(ngsd.nest.load_nest_model, apply_delta): as the expert it would add it twice; guard the "
                         "unmodified base model with it, or use this model as a separate expert")
    return adapter


def vocabulary_size(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head); it is not a causal LM")
    return int(head.weight.shape[0])


def common_vocabulary_size(base: nn.Module, expert: ExpertLike) -> int:
    """How many token ids the base and expert distributions are taken over: the base's LM head rows, or
    fewer where a separate expert's head is padded to fewer rows (`check_same_vocabulary` made sure that
    every row past the smaller head is padding, which no text maps to)."""
    if isinstance(expert, nn.Module):
        return min(vocabulary_size(base), vocabulary_size(expert))
    return vocabulary_size(base)


def check_same_vocabulary(base: nn.Module, expert: nn.Module, tokenizer=None) -> None:
    """Refuse a separate expert whose next-token distribution is not over the base's token ids.

    The two distributions are mixed id by id. Heads with different row counts can still pair: families
    pad the head past the tokenizer's vocabulary to a size that varies per model (Qwen2.5: 151936 rows at
    0.5B, 152064 at 7B, for 151665 tokens), and when both heads cover every id the tokenizer can produce,
    the rows past the smaller head are padding, dropped from both distributions (`common_vocabulary_size`).
    """
    base_rows, expert_rows = vocabulary_size(base), vocabulary_size(expert)
    if base_rows == expert_rows:
        return
    sizes = f"vocabulary mismatch: the base model scores {base_rows} tokens, the expert {expert_rows}"
    if tokenizer is None:
        raise ValueError(
            f"{sizes}. Heads padded to different sizes pair only when both cover the tokenizer's vocabulary, and "
            "no tokenizer was given: pass the base's tokenizer (tokenizer= to ngsd.apply, ngsd.decoding_method or "
            "guarded_generate; ngsd_tokenizer= to generate with custom_generate), or use an expert of the same "
            "family with the same head size, or a LoRA adapter trained on the base (`ngsd train-expert`)"
        )
    tokens = len(tokenizer)
    short = [name for name, rows in (("base", base_rows), ("expert", expert_rows)) if rows < tokens]
    if short:
        raise ValueError(
            f"{sizes}, and the tokenizer has {tokens}: the {short[0]}'s head leaves tokens out, so the two models do "
            "not share the tokenizer's ids. Use an expert of the base's family (same tokenizer) or a LoRA adapter "
            "trained on the base (`ngsd train-expert`)"
        )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# base tokenizer -> the expert folders whose tokenizer was found to match it (checked once per pair, not per call)
_MATCHING_FOLDERS: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()


def check_loaded_expert_tokenizer(expert: nn.Module, tokenizer) -> None:
    """A loaded expert's own tokenizer must map tokens as the base's `tokenizer` does, where it can be found.

    A model passed as an object carries no tokenizer, but one loaded with ``from_pretrained(folder)``
    names that folder in its config, and the folder usually holds its tokenizer. A hub id, or a model
    built in memory, names no local folder: then only the head sizes are compared
    (`check_same_vocabulary`), as nothing here downloads.
    """
    if tokenizer is None:
        return
    name = str(getattr(getattr(expert, "config", None), "_name_or_path", "") or "")
    folder = Path(name)
    if not name or not folder.is_dir() or not any((folder / file).is_file() for file in _TOKENIZER_FILES):
        return  # Path("") is the working directory: a model built in memory must not be checked against it
    key = str(folder.resolve())
    try:
        checked = _MATCHING_FOLDERS.setdefault(tokenizer, set())
    except TypeError:  # a tokenizer that cannot be weakly referenced: checked on every call
        checked = set()
    if key in checked:
        return
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError):  # a folder whose tokenizer files do not load: nothing to compare with
        return
    check_same_tokenizer(tokenizer, own)
    checked.add(key)


def check_same_tokenizer(base_tokenizer, expert_tokenizer) -> None:
    if base_tokenizer is None or expert_tokenizer is None:
        return
    if base_tokenizer.get_vocab() != expert_tokenizer.get_vocab():
        raise ValueError(
            "vocabulary mismatch: base and expert tokenizers map tokens to different ids; "
            "use an expert of the same model family"
        )
