"""ngsd: neuron-guided safe decoding for Hugging Face causal language models.

A cheaply trained expert runs beside the base model; a leaky integrate-and-fire neuron watches
how far their next-token distributions diverge and, when it fires, mixes the expert in.

>>> import ngsd
>>> model, tokenizer = ngsd.load_model()            # SmolLM2-135M-Instruct, offline  # doctest: +SKIP
>>> ngsd.apply(model, expert="shipped", tokenizer=tokenizer)                         # doctest: +SKIP

The public names are imported on first use (module `__getattr__`), so `import ngsd` and the
`ngsd` command's `--help` do not pay for importing torch and transformers.
"""

from __future__ import annotations

from .lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "GuardedResult": ".api",
    "encode_prompts": ".api",
    "generate": ".api",
    "NGSDConfig": ".config",
    "ReflectionConfig": ".config",
    "GuardedOutput": ".decoding.loop",
    "RowTrace": ".decoding.loop",
    "guarded_generate": ".decoding.loop",
    "GuardedGenerateOutput": ".decoding.hf",
    "apply": ".decoding.hf",
    "decoding_method": ".decoding.hf",
    "is_applied": ".decoding.hf",
    "remove": ".decoding.hf",
    "LoraAdapter": ".experts.lora",
    "load_model": ".loading",
    "shipped_expert_path": ".experts.shipped",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
