"""vLLM's general plugin (entry point group ``vllm.general_plugins``): registers the guarded architecture.

vLLM runs general plugins in every process it starts (API server, engine core, workers), so
the architecture named in ``hf_overrides`` resolves wherever the model is built. Registering
by name keeps this import light: the model module loads only when an engine builds it.
"""

from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    from .engine import ARCHITECTURE, MODEL_CLASS

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
