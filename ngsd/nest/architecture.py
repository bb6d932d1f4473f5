"""Which models NeST can adapt: Llama-style gated MLPs (`down_proj(act(gate_proj(x)) * up_proj(x))`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class FFN:
    """One decoder layer's MLP projections; neuron j is row j of gate/up and column j of down."""

    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


def ffn_layers(model: Any) -> list[FFN]:
    """The MLP of every decoder layer, in order; ValueError for an architecture NeST does not support."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"NeST supports Llama-family models with gated MLPs (model_type in {SUPPORTED_MODEL_TYPES}), "
            f"got {type(model).__name__} with model_type {model_type!r}"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers; NeST needs a causal LM with decoder layers")
    ffns = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in parts):
            raise ValueError(f"layer {i} of {type(model).__name__} has no gated MLP (gate_proj, up_proj, down_proj)")
        if any(p.bias is not None for p in parts):
            raise ValueError(f"layer {i}: NeST expects MLP projections without bias (config.mlp_bias=False)")
        ffns.append(FFN(*parts))
    return ffns


def model_shape(model: Any) -> dict[str, Any]:
    """What a NeST delta must match to be applied to a model."""
    ffns = ffn_layers(model)
    return {
        "model_type": model.config.model_type,
        "num_layers": len(ffns),
        "hidden_size": int(ffns[0].gate.in_features),
        "intermediate_size": int(ffns[0].gate.out_features),
    }
