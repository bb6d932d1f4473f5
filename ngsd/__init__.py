"""ngsd: neuron-guided safe decoding for Hugging Face causal language models.

A cheaply trained expert runs beside the base model; a leaky integrate-and-fire neuron watches
how far their next-token distributions diverge and, when it fires, mixes the expert in.

>>> import ngsd
>>> model, tokenizer = ngsd.load_model()            # SmolLM2-135M-Instruct, offline  # doctest: +SKIP
>>> ngsd.apply(model, expert="shipped", tokenizer=tokenizer)                         # doctest: +SKIP
"""

from .api import GuardedResult, encode_prompts, generate
from .config import NGSDConfig, ReflectionConfig
from .decoding.loop import GuardedOutput, RowTrace, guarded_generate
from .decoding.hf import GuardedGenerateOutput, apply, decoding_method, is_applied, remove
from .experts.lora import LoraAdapter


def load_model(*args, **kwargs):
    """See `ngsd.loading.load_model`."""
    from .loading import load_model as _load_model

    return _load_model(*args, **kwargs)


def shipped_expert_path():
    """Folder of the LoRA safety expert shipped for SmolLM2-135M-Instruct."""
    from .experts.shipped import shipped_expert_path as _path

    return _path()


__all__ = [
    "GuardedGenerateOutput",
    "GuardedOutput",
    "GuardedResult",
    "LoraAdapter",
    "NGSDConfig",
    "ReflectionConfig",
    "RowTrace",
    "apply",
    "decoding_method",
    "encode_prompts",
    "generate",
    "guarded_generate",
    "is_applied",
    "load_model",
    "remove",
    "shipped_expert_path",
]
__version__ = "0.1.0"
