"""A NeST delta as an exact LoRA adapter: one expert model forward instead of a second copy of the base.

NeST adds the cluster vector `gate[c]` to row j of `gate_proj` for every selected neuron j of cluster c (and
`up[c]`, `down[c]` likewise, `down` to column j of `down_proj`). Per layer that is a product of rank k (the
layer's clusters): for the rows, `B = one-hot(neuron -> cluster)` [intermediate, k] times `A = vectors` [k,
hidden]; for the columns, `B = vectors.T` [hidden, k] times `A = one-hot.T` [k, intermediate]. So the delta is a
LoRA of rank max_l k_l with scale 1, exact up to float rounding. As an adapter it runs beside the base in one
batched forward (`AdapterPair`), or above a shared trunk when it touches only top layers, and it loads in peft and
vLLM (`save_peft_folder`), none of which needs a folded copy of the base.

>>> from ngsd.nest.update import NestUpdate
>>> from ngsd.nest.shipped import shipped_nest_path
>>> adapter = nest_lora_adapter(NestUpdate.load(shipped_nest_path()))
>>> adapter.scale, len(adapter.pairs)
(1.0, 90)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..experts.lora import LoraAdapter, _LoraPair
from .update import NestUpdate

_MODULE = "model.layers.{layer}.mlp.{proj}_proj"


def nest_lora_pairs(update: NestUpdate) -> tuple[dict[str, _LoraPair], int]:
    """The LoRA pairs (module name -> A [r, in], B [out, r]) of every layer with selected neurons, and r."""
    rows = {}  # layer -> (its neurons, its clusters, each neuron's cluster renumbered 0..k-1 within the layer)
    for layer in sorted(set(update.layer.tolist())):
        neurons, clusters = update._rows(layer)
        rows[layer] = (neurons, *clusters.unique(return_inverse=True))
    rank = max(len(local) for _, local, _ in rows.values())
    intermediate = update.shape["intermediate_size"]
    pairs: dict[str, _LoraPair] = {}
    with torch.no_grad():
        for layer, (neurons, local, slot) in rows.items():
            selector = torch.zeros(intermediate, rank)
            selector[neurons, slot] = 1.0
            for proj in ("gate", "up"):
                vectors = torch.zeros(rank, update.shape["hidden_size"])
                vectors[: len(local)] = getattr(update, proj)[local].float()
                pairs[_MODULE.format(layer=layer, proj=proj)] = _LoraPair(down=vectors, up=selector.clone())
            columns = torch.zeros(update.shape["hidden_size"], rank)
            columns[:, : len(local)] = update.down[local].float().T
            pairs[_MODULE.format(layer=layer, proj="down")] = _LoraPair(down=selector.T.contiguous(), up=columns)
    return pairs, rank


def nest_lora_adapter(update: NestUpdate | str | os.PathLike[str], source: str | None = None) -> LoraAdapter:
    """The NeST delta (an update, its file or folder) as an in-memory LoRA adapter of scale 1; `source` names
    it (default: the path given, else "nest-as-lora")."""
    if source is None:
        source = "nest-as-lora" if isinstance(update, NestUpdate) else str(update)
    update = update if isinstance(update, NestUpdate) else NestUpdate.load(update)
    pairs, _ = nest_lora_pairs(update)
    return LoraAdapter(pairs=pairs, scale=1.0, source=source)


def loadable_base_name(model: str | None) -> str:
    """A base model as adapter_config.json records it: the offline default (None or an alias) by its hub id, as
    `ngsd train-expert` records it; any other by the name or path it was loaded from."""
    from ..loading import DEFAULT_HUB_ID, is_default_model

    return DEFAULT_HUB_ID if is_default_model(model) else str(model)


def recorded_base_model(delta: str | os.PathLike[str]) -> str | None:
    """The base model a saved NeST delta (its file or folder) was trained on, as peft and vLLM load it: what
    `ngsd train-nest` recorded in the delta ("" there: a model passed in without a name), else, for a delta
    saved before it recorded that, in the training_report.json beside it (its config's model). None when neither
    says."""
    from .training import REPORT_FILE

    path = Path(delta)
    info = NestUpdate.load(path).info
    if "base_model_name_or_path" in info:
        recorded = info["base_model_name_or_path"]
        return recorded if isinstance(recorded, str) and recorded else None
    report = (path if path.is_dir() else path.parent) / REPORT_FILE
    try:
        config = json.loads(report.read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(config, dict) or "model" not in config:
        return None
    return loadable_base_name(config["model"])


def save_peft_folder(update: NestUpdate | str | os.PathLike[str], folder: str | os.PathLike[str],
                     base_model_name_or_path: str | None = None) -> Path:
    """Write the delta as a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors, lora_alpha
    = r so the scale is 1, only the layers with selected neurons), loadable by peft, vLLM and `LoraAdapter.load`.
    `base_model_name_or_path`: recorded in adapter_config.json; default: the base the saved delta records
    (`recorded_base_model`), else none."""
    from safetensors.torch import save_file

    if base_model_name_or_path is None and not isinstance(update, NestUpdate):
        base_model_name_or_path = recorded_base_model(update)
    update = update if isinstance(update, NestUpdate) else NestUpdate.load(update)
    pairs, rank = nest_lora_pairs(update)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, pair in pairs.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = pair.down.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = pair.up.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "bias": "none", "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "layers_to_transform": sorted(set(update.layer.tolist())), "layers_pattern": "layers",
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # peft warns about keys it does not know, so where the adapter came from goes in a file of its own
    origin = {"converted_from": "NeST delta", "shape": update.shape, "info": getattr(update, "info", {})}
    (folder / "ngsd_nest_origin.json").write_text(json.dumps(origin, indent=2) + "\n", encoding="utf-8")
    return folder
