"""The NeST update: one trainable vector per cluster and projection, shared by the cluster's neurons.

For a selected neuron j of layer l in cluster c, the update adds `gate[c]` to row j of
`gate_proj`, `up[c]` to row j of `up_proj` and `down[c]` to column j of `down_proj` (each a
hidden-size vector). Everything else stays as it is. `attached(model)` applies it on the fly
(forward hooks, differentiable: how it is trained); `fold_into(model)` writes it into the weights
(no overhead at inference); `save`/`load` keep it as a small delta file that re-applies it to the base.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .architecture import ffn_layers, model_shape

DELTA_FILE = "nest_delta.safetensors"
FOLDED_ATTR = "_ngsd_nest_folded"  # model.__dict__[FOLDED_ATTR]: fingerprints of the deltas folded into its weights
PROJECTIONS = ("gate", "up", "down")


class NestUpdate(nn.Module):
    """Cluster-shared updates of the selected neurons (see the module docstring); starts at zero."""

    def __init__(self, layer: torch.Tensor, neuron: torch.Tensor, cluster: torch.Tensor, shape: dict[str, Any]) -> None:
        super().__init__()
        layer, neuron, cluster = (torch.as_tensor(t, dtype=torch.long).flatten() for t in (layer, neuron, cluster))
        if not len(layer) == len(neuron) == len(cluster) or len(layer) == 0:
            raise ValueError(f"layer, neuron and cluster must be non-empty and equally long, got "
                             f"{len(layer)}, {len(neuron)}, {len(cluster)}")
        if int(layer.min()) < 0 or int(layer.max()) >= shape["num_layers"]:
            raise ValueError(f"layer indices must be in [0, {shape['num_layers']}), got {int(layer.min())}..{int(layer.max())}")
        if int(neuron.min()) < 0 or int(neuron.max()) >= shape["intermediate_size"]:
            raise ValueError(f"neuron indices must be in [0, {shape['intermediate_size']}), got "
                             f"{int(neuron.min())}..{int(neuron.max())}")
        if len(set(zip(layer.tolist(), neuron.tolist()))) != len(layer):
            raise ValueError("a neuron is listed twice; each selected neuron belongs to exactly one cluster")
        # Cluster ids renumbered 0..k-1 (sorted), so any labelling works.
        ids, cluster = cluster.unique(return_inverse=True)
        self.shape = dict(shape)
        self.register_buffer("layer", layer, persistent=False)
        self.register_buffer("neuron", neuron, persistent=False)
        self.register_buffer("cluster", cluster, persistent=False)
        hidden = shape["hidden_size"]
        self.gate = nn.Parameter(torch.zeros(len(ids), hidden))
        self.up = nn.Parameter(torch.zeros(len(ids), hidden))
        self.down = nn.Parameter(torch.zeros(len(ids), hidden))
        self.enabled = True

    @property
    def num_clusters(self) -> int:
        return int(self.gate.shape[0])

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        where = self.layer == layer
        return self.neuron[where], self.cluster[where]

    def check_model(self, model: Any) -> list:
        ffns = ffn_layers(model)
        shape = model_shape(model)
        mismatch = {k: (v, shape[k]) for k, v in self.shape.items() if k in shape and shape[k] != v}
        if mismatch:
            raise ValueError(f"this NeST update was made for another model: (update, model) differ in {mismatch}")
        return ffns

    @contextmanager
    def attached(self, model: Any) -> Iterator["NestUpdate"]:
        """Apply the update on the fly (forward hooks) inside the block; `enabled = False` pauses it."""
        handles = []
        for index, ffn in enumerate(self.check_model(model)):
            neurons, clusters = self._rows(index)
            if len(neurons) == 0:
                continue
            for proj, param in ((ffn.gate, self.gate), (ffn.up, self.up)):
                handles.append(proj.register_forward_hook(self._row_hook(param, neurons, clusters)))
            handles.append(ffn.down.register_forward_hook(self._column_hook(neurons, clusters)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _row_hook(self, param: nn.Parameter, neurons: torch.Tensor, clusters: torch.Tensor):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled:
                return None
            extra = args[0] @ param[clusters].to(output.dtype).T  # [..., n_selected]
            return output.index_add(-1, neurons.to(output.device), extra)
        return hook

    def _column_hook(self, neurons: torch.Tensor, clusters: torch.Tensor):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled:
                return None
            h = args[0].index_select(-1, neurons.to(args[0].device))
            return output + h @ self.down[clusters].to(output.dtype)
        return hook

    def fingerprint(self) -> str:
        """A short hash of the update's index and vectors: the same delta, wherever it was loaded from."""
        digest = hashlib.sha256()
        for name in ("layer", "neuron", "cluster", *PROJECTIONS):
            digest.update(getattr(self, name).detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    @torch.no_grad()
    def fold_into(self, model: Any, *, sign: float = 1.0) -> Any:
        """Add the update to the weights in place (`sign=-1` takes it out again); returns the model.

        The model object records the deltas folded into it: folding one again (it would double silently) is
        refused. A model saved with a folded delta and loaded again carries no record."""
        folded = model.__dict__.setdefault(FOLDED_ATTR, set())
        key = self.fingerprint()
        if sign > 0 and key in folded:
            raise ValueError("this NeST delta is already folded into the model's weights; folding it again would "
                             "double it (fold_into(model, sign=-1) takes it out)")
        ffns = self.check_model(model)
        if sign > 0:
            folded.add(key)
        else:
            folded.discard(key)
        for index, ffn in enumerate(ffns):
            neurons, clusters = self._rows(index)
            if len(neurons) == 0:
                continue
            dev = ffn.gate.weight.device
            neurons = neurons.to(dev)
            for proj, param in ((ffn.gate, self.gate), (ffn.up, self.up)):
                proj.weight.index_add_(0, neurons, (sign * param[clusters]).to(proj.weight.dtype).to(dev))
            ffn.down.weight.index_add_(1, neurons, (sign * self.down[clusters]).T.to(ffn.down.weight.dtype).to(dev))
        return model

    def save(self, folder: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Path:
        """Write `nest_delta.safetensors` (float32 vectors and the neuron/cluster index) into `folder`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().float().cpu().contiguous() for name in PROJECTIONS}
        tensors.update({name: getattr(self, name).cpu().contiguous() for name in ("layer", "neuron", "cluster")})
        meta = {"format": "ngsd-nest-delta/1", "shape": json.dumps(self.shape), "info": json.dumps(metadata or {})}
        path = folder / DELTA_FILE
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "NestUpdate":
        """A delta saved by `save`: a delta file or the folder holding one."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / DELTA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no NeST delta at {path}; train one with `ngsd train-nest` (it writes {DELTA_FILE})")
        damaged = (f"{path} is not a valid NeST delta ({{}}); write it again with `ngsd train-nest --delta-out` "
                   "or restore the file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "ngsd-nest-delta/1":
                    raise ValueError(f"{path} is not an ngsd NeST delta (format {meta.get('format')!r})")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            shape = json.loads(meta["shape"])
            info = json.loads(meta.get("info", "{}"))
        except ValueError:
            raise
        except Exception as error:  # a truncated or rewritten file: safetensors' own error, a JSON error, a KeyError
            raise ValueError(damaged.format(f"{type(error).__name__}: {error}")) from error
        missing = [name for name in (*PROJECTIONS, "layer", "neuron", "cluster") if name not in tensors]
        if missing:
            raise ValueError(damaged.format(f"it lacks the tensors {missing}"))
        update = cls(tensors["layer"], tensors["neuron"], tensors["cluster"], shape)
        for name in PROJECTIONS:
            want = tuple(getattr(update, name).shape)
            if tuple(tensors[name].shape) != want:
                raise ValueError(damaged.format(f"{name} is {tuple(tensors[name].shape)}, its index and shape say {want}"))
            if not bool(torch.isfinite(tensors[name]).all()):
                raise ValueError(damaged.format(f"{name} holds NaN or infinite values"))
        with torch.no_grad():
            for name in PROJECTIONS:
                getattr(update, name).copy_(tensors[name])
        update.info = info
        return update


def apply_delta(model: Any, delta: str | os.PathLike[str] | NestUpdate) -> Any:
    """Fold a saved NeST delta (file, folder or `NestUpdate`) into `model`'s weights in place; returns the model."""
    update = delta if isinstance(delta, NestUpdate) else NestUpdate.load(delta)
    return update.fold_into(model)
