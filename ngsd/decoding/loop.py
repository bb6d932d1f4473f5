"""The guarded generation loop: prefill base and expert once, then one selection op per token.

Everything a call needs (caches, potential, alpha, stop state) lives in this function's locals,
so concurrent calls on one model never share gate state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.profiler import record_function

from ngsd_kernels import GuardedSelector

from ..config import NGSDConfig
from .early_stop import EarlyStop
from ..experts.resolve import ExpertLike, resolve_expert
from ..experts.lora import LoraAdapter
from .pair import AdapterPair, BaseOnly, ForwardPair, ModelPair


@dataclass
class RowTrace:
    """What the gate did for one row: one entry per generated token."""

    alpha: float
    divergence: list[float] = field(default_factory=list)
    potential: list[float] = field(default_factory=list)
    spikes: list[bool] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    stop_reason: str = "length"
    reflection: Any = None

    @property
    def spike_rate(self) -> float:
        return sum(self.spikes) / len(self.spikes) if self.spikes else 0.0

    @property
    def first_spike(self) -> int | None:
        return next((i for i, s in enumerate(self.spikes) if s), None)

    def to_dict(self) -> dict[str, Any]:
        reflection = self.reflection
        if reflection is not None and hasattr(reflection, "to_dict"):
            reflection = reflection.to_dict()
        return {
            "alpha": self.alpha,
            "divergence": self.divergence,
            "potential": self.potential,
            "spikes": self.spikes,
            "tokens": self.tokens,
            "stop_reason": self.stop_reason,
            "spike_rate": self.spike_rate,
            "first_spike": self.first_spike,
            "reflection": reflection,
        }


@dataclass
class GuardedOutput:
    """`sequences` is [B, prompt width + steps]: the (left-padded) prompt, then new tokens, pad after a stop."""

    sequences: torch.Tensor
    traces: list[RowTrace]
    prompt_width: int


def pair_for(model: nn.Module, expert: LoraAdapter | nn.Module | None, mode: str) -> ForwardPair:
    if mode == "off" or expert is None:
        return BaseOnly(model)
    if isinstance(expert, LoraAdapter):
        return AdapterPair(model, expert)
    return ModelPair(model, expert)


def _per_row(value: float | Sequence[float] | torch.Tensor, batch: int, name: str) -> list[float]:
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, (int, float)):
        return [float(value)] * batch
    values = [float(v) for v in value]
    if len(values) != batch:
        raise ValueError(f"{name} has {len(values)} values for a batch of {batch}")
    return values


def check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new: list[int], model: nn.Module) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("empty prompt: input_ids must be [batch, length] with length >= 1")
    lengths = attention_mask.sum(-1)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty prompt in rows {empty}: every row needs at least one token (check the padding)")
    if any(m < 1 for m in max_new):
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    window = getattr(model.config, "max_position_embeddings", None)
    longest = int(lengths.max())
    if window is not None and longest + max(max_new) > window:
        raise ValueError(
            f"prompt too long: {longest} prompt tokens + {max(max_new)} new tokens exceed the model's context "
            f"window of {window}; shorten the prompt or lower max_new_tokens"
        )


def resolve_alphas(
    model: nn.Module,
    config: NGSDConfig,
    alpha: float | Sequence[float] | torch.Tensor | None,
    batch: int,
    tokenizer,
    requests: list[str] | None,
    input_ids: torch.Tensor,
    progress: bool = False,
) -> tuple[list[float], list[Any]]:
    if config.mode == "off":
        return [0.0] * batch, [None] * batch
    if config.mode == "safedecoding":
        return _per_row(config.safedecoding_alpha if alpha is None else alpha, batch, "alpha"), [None] * batch
    if alpha is not None:
        return _per_row(alpha, batch, "alpha"), [None] * batch
    if config.reflection.mode == "none":
        return [config.reflection.default_alpha] * batch, [None] * batch
    if tokenizer is None:
        raise ValueError(
            "self-reflection needs the tokenizer (pass tokenizer=...), or pass alpha=... per request, "
            "or set ReflectionConfig(mode='none')"
        )
    from ..risk.reflection import reflect

    if requests is None:
        requests = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    reflections = reflect(model, tokenizer, list(requests), config.reflection, progress=progress)
    return [r.alpha for r in reflections], reflections


@torch.no_grad()
def guarded_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    expert: ExpertLike = None,
    config: NGSDConfig | None = None,
    alpha: float | Sequence[float] | torch.Tensor | None = None,
    max_new_tokens: int | Sequence[int] = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    streamer=None,
    stopping_criteria=None,
    requests: list[str] | None = None,
    progress: bool = False,
) -> GuardedOutput:
    """Guarded decoding of a left-padded batch. See `ngsd.generate` for a text-in, text-out API."""
    config = config or NGSDConfig()
    device = input_ids.device
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    max_new = [int(m) for m in _per_row(max_new_tokens, batch, "max_new_tokens")]
    check_prompts(input_ids, attention_mask, max_new, model)
    if do_sample and not temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}; use do_sample=False for greedy")
    resolved = resolve_expert(expert, model, required=config.mode != "off")
    alphas, reflections = resolve_alphas(model, config, alpha, batch, tokenizer, requests, input_ids, progress)

    eos_ids = torch.tensor(
        [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)),
        dtype=torch.long,
        device=device,
    )
    pad = pad_token_id if pad_token_id is not None else (int(eos_ids[0]) if eos_ids.numel() else 0)
    if stop_strings:
        from transformers import StopStringCriteria

        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer; pass tokenizer=...")
        stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        stop_criterion = StopStringCriteria(tokenizer, stop_strings)
    else:
        stop_criterion = None
    early_stop = EarlyStop(tokenizer, alphas) if config.early_stop and config.mode != "off" else None

    alpha_t = torch.tensor(alphas, dtype=torch.float32, device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    # one seed for the batch: row i samples from Philox keyed by the seed with i in the counter
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    max_new_t = torch.tensor(max_new, device=device)
    potential = torch.zeros(batch, dtype=torch.float32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    sampling = dict(temperature=float(temperature) if do_sample else 0.0, top_k=int(top_k or 0), top_p=float(top_p))

    pair = pair_for(model, resolved, config.mode)
    try:
        with record_function("ngsd.prefill"):
            base_logits, expert_logits = pair.prefill(input_ids, attention_mask)
        # planned once per call; the parameters change with the step only in SafeDecoding (mixing, then base)
        mixing_steps = config.safedecoding_steps if config.mode == "safedecoding" else 0
        selectors = [
            GuardedSelector(config.step_params(step, **sampling), config.backend).plan(
                batch, base_logits.shape[-1], base_logits.dtype, device
            )
            for step in sorted({0, mixing_steps})
        ]
        sequences = input_ids
        history: list[tuple[torch.Tensor, ...]] = []
        stop_reasons = ["length"] * batch
        if streamer is not None:
            streamer.put(input_ids.cpu())

        steps = range(max(max_new))
        if progress:
            from tqdm.auto import tqdm

            guarded = config.mode != "off" and resolved is not None
            label = f"guarded decoding ({config.mode})" if guarded else "unguarded decoding"
            steps = tqdm(steps, desc=label, unit="tok")
        for step in steps:
            active = ~finished
            offset = torch.full((1,), step, dtype=torch.int64, device=device)
            selector = selectors[0] if step < mixing_steps else selectors[-1]
            with record_function("ngsd.select"):
                tokens, new_potential, spike, divergence = selector.run(
                    base_logits, expert_logits, potential, alpha_t, seed_t, offset
                )
            tokens = torch.where(active, tokens, torch.full_like(tokens, pad))
            potential = torch.where(active, new_potential, potential)
            history.append((active, tokens, divergence, potential, spike & active))
            sequences = torch.cat([sequences, tokens[:, None]], dim=-1)

            hit_eos = torch.isin(tokens, eos_ids) & active
            done = hit_eos | (max_new_t <= step + 1)
            if stopping_criteria is not None:
                done |= stopping_criteria(sequences, None).to(device)
            if stop_criterion is not None:
                done |= stop_criterion(sequences, None).to(device)
            new_done = done & active
            finished |= done
            # one host round-trip per step: invalid logits, newly finished rows, all done
            invalid_rows, done_rows, eos_rows, finished_rows = _sync(tokens < 0, active, new_done, hit_eos, finished)
            if invalid_rows:
                _raise_invalid(invalid_rows, step, base_logits, expert_logits)
            for row in done_rows:
                stop_reasons[row] = "eos" if row in eos_rows else ("length" if step + 1 >= max_new[row] else "stop_string")
            if early_stop is not None:
                generated = sequences[:, input_ids.shape[1] :].tolist()
                for row in set(range(batch)) - finished_rows:
                    if early_stop.should_stop(row, generated[row]):
                        finished[row] = True
                        finished_rows.add(row)
                        stop_reasons[row] = "early_stop"
            if streamer is not None:
                streamer.put(tokens.cpu())
            if len(finished_rows) == batch:
                break
            with record_function("ngsd.forward"):
                base_logits, expert_logits = pair.step(tokens)
    finally:
        pair.close()

    if streamer is not None:
        streamer.end()
    traces = _collect_traces(history, alphas, reflections, stop_reasons)
    return GuardedOutput(sequences=sequences, traces=traces, prompt_width=input_ids.shape[1])


def _sync(invalid, active, new_done, hit_eos, finished) -> tuple[list[int], list[int], set[int], set[int]]:
    packed = torch.stack([invalid & active, new_done, hit_eos, finished]).cpu()
    rows = [mask.nonzero().flatten().tolist() for mask in packed]
    return rows[0], rows[1], set(rows[2]), set(rows[3])


def _raise_invalid(rows: list[int], step: int, base_logits: torch.Tensor, expert_logits: torch.Tensor) -> None:
    def bad(logits: torch.Tensor) -> bool:
        row = logits[rows].float()
        return bool((torch.isnan(row) | (row == float("inf"))).any() or ~torch.isfinite(row).any(-1).any())

    which = [name for name, logits in (("base", base_logits), ("expert", expert_logits)) if bad(logits)]
    raise FloatingPointError(
        f"non-finite logits from the {' and '.join(which) or 'base/expert'} model at step {step} in rows {rows} "
        "(NaN, +inf, or every token -inf). Common causes: fp16 overflow (load the model in bf16 or fp32), "
        "a broken adapter, or a logits processor that masks every token"
    )


def _collect_traces(history, alphas, reflections, stop_reasons) -> list[RowTrace]:
    if not history:
        return [RowTrace(alpha=a, reflection=r) for a, r in zip(alphas, reflections)]
    active, tokens, divergence, potential, spikes = (torch.stack(parts, dim=1).cpu() for parts in zip(*history))
    traces = []
    for row, (row_alpha, reflection) in enumerate(zip(alphas, reflections)):
        keep = active[row]
        traces.append(
            RowTrace(
                alpha=row_alpha,
                divergence=divergence[row][keep].tolist(),
                potential=potential[row][keep].tolist(),
                spikes=spikes[row][keep].tolist(),
                tokens=tokens[row][keep].tolist(),
                stop_reason=stop_reasons[row],
                reflection=reflection,
            )
        )
    return traces
