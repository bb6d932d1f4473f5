"""`NestConfig`: everything that shapes one `train-nest` run. Imports no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class NestConfig:
    """Everything that shapes one `train-nest` run (recorded in its training report).

    Selection: `probe_prompts` harmful and as many benign training prompts; a neuron is kept when
    the z-score of |probe weight| within its layer is at least `z_threshold` (`max_neurons` keeps
    the highest z overall); with `top_layers=n` only neurons of the top n decoder layers are candidates,
    so the update leaves the layers below unchanged and guarded decoding can share them.
    Clustering: k-means with k in [k_min, k_max] chosen by silhouette, within each decoder layer
    (`cluster_scope="layer"`: a shared row update then acts on one layer's input space) or over all
    selected neurons at once ("global").
    Training: the expert recipe's examples (training splits only), AdamW, linear schedule.
    """

    model: str | None = None
    data_dir: str | None = None
    out: str | None = None
    delta_out: str | None = None
    seed: int = 0
    probe_prompts: int = 160
    probe_l2: float = 1e-2
    z_threshold: float = 3.0
    max_neurons: int | None = None
    top_layers: int | None = None  # select neurons in the top n decoder layers only (a shared trunk then runs below them)
    cluster_scope: str = "layer"  # "layer": k-means within each decoder layer; "global": over all selected neurons
    k_min: int = 2
    k_max: int = 12
    kmeans_restarts: int = 4
    epochs: int = 1  # one pass: about 15 minutes for the default model on one loaded CPU thread
    lr: float = 3e-3
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.03
    max_length: int = 384
    max_examples: int | None = None
    examples: str | None = None
    threads: int | None = None
    probe_batch_size: int = 16
    train_batch_size: int = 1

    def __post_init__(self) -> None:
        if self.probe_prompts < 2:
            raise ValueError(f"probe_prompts must be >= 2 (prompts per class for the probe), got {self.probe_prompts}")
        if not self.probe_l2 > 0:
            raise ValueError(f"probe_l2 must be > 0, got {self.probe_l2}")
        if self.top_layers is not None and self.top_layers < 1:
            raise ValueError(f"top_layers must be >= 1 (or None for every layer), got {self.top_layers}")
        if self.cluster_scope not in ("layer", "global"):
            raise ValueError(f"cluster_scope must be 'layer' or 'global', got {self.cluster_scope!r}")
        if self.max_neurons is not None and self.max_neurons < 1:
            raise ValueError(f"max_neurons must be >= 1 (or None for every neuron over the threshold), got {self.max_neurons}")
        if not 2 <= self.k_min <= self.k_max:
            raise ValueError(f"need 2 <= k_min <= k_max (silhouette needs two clusters), got {self.k_min}, {self.k_max}")
        for name in ("kmeans_restarts", "epochs", "max_length", "probe_batch_size", "train_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr (--lr) must be a finite number > 0, got {self.lr}")
        if not math.isfinite(self.z_threshold):
            raise ValueError(f"z_threshold (--z-threshold) must be a finite number, got {self.z_threshold}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 (or None for all), got {self.max_examples}")
