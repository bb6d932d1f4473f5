"""Neuron selection: which FFN neurons separate harmful from benign prompts.

Per prompt and neuron the activation entering `down_proj` (the neuron's output before the down
projection) is max-pooled over the prompt's tokens. One standardised, class-balanced, L2 logistic
probe per layer reads those features; a neuron's score is |its probe weight| (the features are
standardised, so weights compare), turned into a z-score within its layer. Neurons with a z-score
of at least the threshold are selected.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .architecture import ffn_layers


@dataclass
class NeuronSelection:
    """Selected neurons (parallel tensors: decoder layer, index in the MLP, z-score), ordered by layer then index."""

    layer: torch.Tensor
    neuron: torch.Tensor
    z: torch.Tensor

    def __len__(self) -> int:
        return int(self.layer.numel())

    def per_layer(self) -> dict[int, int]:
        return {int(l): int((self.layer == l).sum()) for l in self.layer.unique()}


@contextmanager
def record_ffn_inputs(model: Any) -> Iterator[list[list[torch.Tensor]]]:
    """Within the block, every forward appends each layer's `down_proj` input ([B, T, I]) to `records[layer]`."""
    ffns = ffn_layers(model)
    records: list[list[torch.Tensor]] = [[] for _ in ffns]
    handles = [
        ffn.down.register_forward_pre_hook(lambda _m, args, i=i: records[i].append(args[0].detach().float()))
        for i, ffn in enumerate(ffns)
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def max_pooled_activations(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
    """[n_prompts, n_layers, intermediate]: each neuron's largest activation over the prompt's tokens
    (the prompt in the tokenizer's chat template, up to the start of the answer)."""
    from ..experts.training.examples import chat_prompt_ids

    if not prompts:
        raise ValueError("prompts is empty: neuron selection needs harmful and benign prompts")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return max_pooled_activations_of_ids(model, [chat_prompt_ids(tokenizer, p) for p in prompts], pad=pad,
                                         batch_size=batch_size)


@torch.no_grad()
def max_pooled_activations_of_ids(model: Any, prompt_ids: Sequence[Sequence[int]], *, pad: int = 0,
                                  batch_size: int = 16) -> torch.Tensor:
    """`max_pooled_activations` for prompts given as token ids (right-padded batches; padding is masked out)."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids must be a non-empty list of non-empty token id lists")
    device = next(model.parameters()).device
    pooled = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = [list(p) for p in prompt_ids[start : start + batch_size]]
        width = max(len(c) for c in chunk)
        input_ids = torch.tensor([c + [pad] * (width - len(c)) for c in chunk], device=device)
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chunk], device=device)
        with record_ffn_inputs(model) as records:
            model(input_ids=input_ids, attention_mask=mask)
        acts = torch.stack([r[0] for r in records], dim=1)  # [B, L, T, I]
        acts = acts.masked_fill(~mask.bool()[:, None, :, None], float("-inf"))
        pooled.append(acts.amax(dim=2).cpu())
    return torch.cat(pooled)


def neuron_z_scores(harmful: torch.Tensor, benign: torch.Tensor, *, l2: float = 1e-2) -> torch.Tensor:
    """[n_layers, intermediate] z-scores of |probe weight| within each layer (see the module docstring)."""
    from ..risk.probe_training import fit_logistic

    if harmful.dim() != 3 or benign.dim() != 3 or harmful.shape[1:] != benign.shape[1:]:
        raise ValueError(f"harmful and benign must be [n, layers, neurons] with the same layers and neurons, "
                         f"got {tuple(harmful.shape)} and {tuple(benign.shape)}")
    if len(harmful) < 2 or len(benign) < 2:
        raise ValueError(f"need at least 2 prompts per class, got {len(harmful)} harmful and {len(benign)} benign")
    x = torch.cat([harmful, benign])
    y = torch.cat([torch.ones(len(harmful)), torch.zeros(len(benign))])
    z = torch.empty(x.shape[1:])
    for layer in range(x.shape[1]):
        _, _, weight, _ = fit_logistic(x[:, layer], y, l2)
        score = weight.abs()
        z[layer] = (score - score.mean()) / score.std().clamp_min(1e-12)
    return z


def select_neurons(z: torch.Tensor, *, threshold: float, max_neurons: int | None = None,
                   from_layer: int = 0) -> NeuronSelection:
    """Neurons with z >= threshold in layers `from_layer` and above; with `max_neurons`, only that many
    with the highest z."""
    if not 0 <= from_layer < z.shape[0]:
        raise ValueError(f"from_layer must be in [0, {z.shape[0] - 1}] (the z-scores cover {z.shape[0]} layers), got {from_layer}")
    candidates = z >= threshold
    candidates[:from_layer] = False
    layer, neuron = candidates.nonzero(as_tuple=True)
    scores = z[layer, neuron]
    if max_neurons is not None and len(scores) > max_neurons:
        keep = scores.topk(max_neurons).indices
        layer, neuron, scores = layer[keep], neuron[keep], scores[keep]
    if len(scores) == 0:
        where = f" in layers {from_layer}.." if from_layer else ""
        raise ValueError(f"no neuron{where} has a z-score >= {threshold} (highest {float(z[from_layer:].max()):.2f}); "
                         "lower the threshold")
    order = (layer * z.shape[1] + neuron).argsort()
    return NeuronSelection(layer[order], neuron[order], scores[order])


def activation_profiles(pooled: torch.Tensor, selection: NeuronSelection) -> torch.Tensor:
    """[n_selected, n_prompts]: each selected neuron's max-pooled activation over the prompts,
    standardised per neuron, so clustering groups neurons by which prompts drive them, not by scale."""
    profiles = pooled[:, selection.layer, selection.neuron].T.double()
    profiles = (profiles - profiles.mean(1, keepdim=True)) / profiles.std(1, keepdim=True).clamp_min(1e-12)
    return profiles.float()
