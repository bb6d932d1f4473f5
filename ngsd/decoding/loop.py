"""The guarded generation loop: prefill base and expert once, then one selection op per token.

Per call: risk per row (an alpha given, self-reflection, or the risk probe reading the base
prefill), the guarded rows (the probe routes low-risk rows unguarded: no expert rows at all),
then per token one forward of base + guarded expert rows and one selection op (`step.py`).
Everything a call needs (caches, potential, alpha, stop state) lives in this function's locals,
so concurrent calls on one model never share gate state; the hooks that read the prompt's hidden states
for the probe, and the LoRA hooks, act only for the thread that runs the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn
from torch.profiler import record_function

from ..caller_warning import warn_at_caller
from ..config import NGSDConfig
from ..experts.lora import LoraAdapter
from ..experts.resolve import ExpertLike, check_step_dtypes, common_vocabulary_size, resolve_expert
from ..risk.estimate import plan_risk, warn_if_check_fitted_for_another_expert
from .arguments import check_prompt_texts, check_sampling, check_seed, per_row_ints, token_ids
from .early_stop import EarlyStop
from .heads import HeadSplit, split_head
from .pair import AdapterPair, BaseOnly, ForwardPair, ModelPair
from .request_rules import STOP_REASON, check_processors
from .shared_trunk import SharedTrunkPair, shared_trunk_unsupported
from .step import GuardedStep


@dataclass
class RowTrace:
    """What the gate did for one row: one entry per generated token."""

    alpha: float
    divergence: list[float] = field(default_factory=list)
    potential: list[float] = field(default_factory=list)
    spikes: list[bool] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    # "eos", "stop_string", "stopping_criteria" (the caller's), "early_stop", "length", or "rules_removed_guard" (the
    # call's logits processors took the guard's answer away: `request_rules`)
    stop_reason: str = "length"
    reflection: Any = None
    guarded: bool = True  # False: routed unguarded (no expert rows, gate closed) or mode "off"
    step_path: str = ""  # how the step ran: "hidden states" (LM head in the op) or "logits (<why>)"

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
            "guarded": self.guarded,
            "step_path": self.step_path,
        }


@dataclass
class GuardedOutput:
    """`sequences` is [B, prompt width + steps]: the (left-padded) prompt, then new tokens, pad after a stop."""

    sequences: torch.Tensor
    traces: list[RowTrace]
    prompt_width: int


def pair_for(model: nn.Module, expert: LoraAdapter | nn.Module | None, mode: str, *, on_logits: str | None = None
             ) -> tuple[ForwardPair, GuardedStepHeads]:
    """The forward pair of a call, returning final hidden states wherever the LM head can move into the step op.

    `on_logits`: a reason to stay on logits regardless (e.g. logits processors need them).
    """
    base_head = split_head(model) if on_logits is None else on_logits
    if mode == "off" or expert is None:
        heads = GuardedStepHeads.of(base_head, base_head, shared=True)
        return BaseOnly(model, heads.base), heads
    if isinstance(expert, LoraAdapter):
        if isinstance(base_head, HeadSplit) and expert.targets_lm_head():
            base_head = "the LoRA adapter changes the LM head"
        heads = GuardedStepHeads.of(base_head, base_head, shared=True)
        if shared_trunk_unsupported(model, expert) is None:  # a top-layers adapter: run the layers below it once
            return SharedTrunkPair(model, expert, heads.base), heads
        return AdapterPair(model, expert, heads.base), heads
    expert_head = split_head(expert) if on_logits is None else on_logits
    vocab = common_vocabulary_size(model, expert)
    heads = GuardedStepHeads.of(base_head, expert_head, shared=False).first_rows(vocab)
    return ModelPair(model, expert, heads.base, heads.expert, vocab=vocab), heads


@dataclass(frozen=True)
class GuardedStepHeads:
    """The LM heads the step op runs (both, or neither: then the pair returns logits), and why not."""

    base: HeadSplit | None
    expert: HeadSplit | None
    shared: bool
    why_logits: str | None

    @classmethod
    def of(cls, base: HeadSplit | str, expert: HeadSplit | str, shared: bool) -> "GuardedStepHeads":
        for split in (base, expert):
            if isinstance(split, str):
                return cls(None, None, shared, split)
        return cls(base, expert, shared, None)

    def first_rows(self, rows: int) -> "GuardedStepHeads":
        """Both heads scoring only the ids below `rows` (`HeadSplit.first_rows`)."""
        if self.base is None:
            return self
        return replace(self, base=self.base.first_rows(rows), expert=self.expert.first_rows(rows))

    @property
    def path(self) -> str:
        return "hidden states" if self.why_logits is None else f"logits ({self.why_logits})"


def check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new: list[int], model: nn.Module) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(f"input_ids must be an integer tensor [batch, length], got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError("empty prompt: input_ids must be [batch, length] with batch >= 1 and length >= 1")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(
            f"input_ids holds token ids outside the model's vocabulary 0..{vocab - 1} "
            f"(min {int(input_ids.min())}, max {int(input_ids.max())}); was it encoded with another tokenizer?"
        )
    lengths = attention_mask.sum(-1)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty prompt in rows {empty}: every row needs at least one token (check the padding)")
    right_padded = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
    if right_padded:  # the next token would be read from a pad position
        raise ValueError(f"right-padded rows {right_padded}: guarded decoding needs a left-padded batch (the last "
                         "column real tokens); set tokenizer.padding_side = 'left'")
    if any(m < 1 for m in max_new):
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    window = getattr(model.config, "max_position_embeddings", None)
    if window is not None:  # each row against its own length: a finished row's positions stop at the window
        needed = [int(length) + new for length, new in zip(lengths.tolist(), max_new)]
        row = max(range(len(needed)), key=needed.__getitem__)
        if needed[row] > window:
            raise ValueError(
                f"prompt too long: row {row} has {int(lengths[row])} prompt tokens + {max_new[row]} new tokens, "
                f"more than the model's context window of {window}; shorten the prompt or lower max_new_tokens"
            )


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
    logits_processor=None,
    cuda_graph: bool = False,
) -> GuardedOutput:
    """Guarded decoding of a left-padded batch. See `ngsd.generate` for a text-in, text-out API.

    logits_processor: Hugging Face logits processors (repetition penalty, bad words, min new
    tokens...; what `generate` builds from a GenerationConfig), applied each step to the base and
    the expert logits alike before the gate and the mixture, so their constraints hold for the
    guarded output too.
    tokenizer: the base's. Self-reflection, stop strings and early stop need it; the shipped risk probe routes a
    row only when the tokenizer shows the prompt is chat-templated, so without it every row is guarded (warning).
    stopping_criteria: Hugging Face stopping criteria, called each step as `generate` calls them when no
    scores are kept: ``criteria(sequences, None)`` (a guarded `generate` refuses output_scores).
    pad_token_id: what fills a row's positions after it stopped (default: the first eos id, else 0; a row
    ended early by stop strings or stopping criteria needs one of them).
    cuda_graph: run the selection step (every row guarded) as a CUDA graph of the planned Triton op,
    captured at the first token (``ngsd_kernels.StepGraph``): one replay a token instead of the op's
    launches and checks. Needs the model on a CUDA device and the Triton backend; the model's forward
    passes stay eager. Run on a GPU once: a tiny Llama with a LoRA expert decoded the same tokens with and
    without it (``bench/ROOFLINE.md``, "First GPU run").
    """
    config = config or NGSDConfig()
    if not isinstance(config, NGSDConfig):
        raise TypeError(f"config must be an NGSDConfig, got {type(config).__name__}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be an integer tensor [batch, length], got {type(input_ids).__name__}")
    device = input_ids.device
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    max_new = per_row_ints(max_new_tokens, batch, "max_new_tokens")
    check_prompts(input_ids, attention_mask, max_new, model)
    sampling = check_sampling(do_sample, temperature, top_k, top_p)
    check_processors(logits_processor)
    seed = check_seed(seed)
    if requests is not None:  # one request text per row, whether or not this call's risk estimate reads them
        requests = check_prompt_texts(requests, "requests")
        if len(requests) != batch:
            raise ValueError(f"requests has {len(requests)} texts for a batch of {batch}; give one per row")
    if cuda_graph and (device.type != "cuda" or config.backend == "torch"):
        raise ValueError(f"cuda_graph=True captures the Triton step op in a CUDA graph: it needs the model and inputs "
                         f"on a CUDA device (got {device}) and backend 'auto' or 'triton' (got {config.backend!r}); "
                         "drop cuda_graph elsewhere")
    resolved = resolve_expert(expert, model, required=config.mode != "off", tokenizer=tokenizer)
    check_step_dtypes(model, resolved)
    risk = plan_risk(model, config, alpha, batch, tokenizer, requests, input_ids, progress, attention_mask)
    warn_if_check_fitted_for_another_expert(risk, resolved)

    eos_ids = torch.tensor(token_ids(eos_token_id, "eos_token_id"), dtype=torch.long, device=device)
    # A row that stops before the others is filled with the pad (else eos, else 0) id; see the stop check below.
    pad_given = pad_token_id is not None or eos_ids.numel() > 0
    pad = pad_token_id if pad_token_id is not None else (int(eos_ids[0]) if eos_ids.numel() else 0)
    embeddings = model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and not 0 <= int(pad) < vocab:  # a finished row's filler goes back into the model
        raise ValueError(f"pad_token_id {pad} is not a token id of this model (0..{vocab - 1}); pass the "
                         "tokenizer's pad_token_id (or eos_token_id)")
    if stop_strings:
        from transformers import StopStringCriteria

        if tokenizer is None:
            raise ValueError("stop_strings need the tokenizer; pass tokenizer=...")
        stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        stop_criterion = StopStringCriteria(tokenizer, stop_strings)
    else:
        stop_criterion = None
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    # one seed for the batch: row i samples from Philox keyed by the seed with i in the counter
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    max_new_t = torch.tensor(max_new, device=device)
    start_potential = config.start_potential_for(risk.check_divergence)
    potential = torch.full((batch,), start_potential, dtype=torch.float32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    no_row = torch.zeros_like(finished)  # no row: e.g. the stop-string hits of a call without stop strings

    pair, heads = pair_for(model, resolved, config.mode,
                           on_logits="logits processors need the logits" if logits_processor is not None else None)
    # the parameters change with the step only in SafeDecoding (mixing, then base decoding)
    mixing_steps = config.safedecoding_steps if config.mode == "safedecoding" else 0
    selection = GuardedStep(lambda step: config.step_params(step, **sampling), mixing_steps, config.backend,
                            heads.base, heads.expert, heads.shared, logits_processor, cuda_graph=cuda_graph)
    identical = _IdenticalOutputsWatch(enabled=not isinstance(pair, BaseOnly), device=device)
    first_step = None  # step 0, when it was computed (and streamed) before the check's look-ahead
    try:
        with record_function("ngsd.prefill"):
            guard_now = [] if isinstance(pair, BaseOnly) else None if risk.probe else list(range(batch))
            prefill = pair.prefill(input_ids, attention_mask, guard_rows=guard_now, capture=risk.layers)
            if risk.probe is not None:  # the probe reads this prefill; low-risk rows get no expert rows at all
                prefill.expert = pair.guard(risk.decide(prefill.hidden_states, attention_mask))
                if risk.to_check:  # rows the probe is unsure of stay guarded if the expert diverges at once
                    selection.set_rows(pair.rows, batch)
                    first_logits = selection.guarded_row_logits(prefill.base, prefill.expert)
                    openings = expert_openings(pair, tokenizer, risk.check_rollout, model)
                    if (streamer is not None and openings is not None and logits_processor is None and not cuda_graph
                            and risk.will_look_ahead(pair.rows, *first_logits)):
                        first_step = _first_step_on_either_route(selection, prefill, pair.rows, risk, potential,
                                                                 seed_t, input_ids)
                        if first_step is not None:  # the look-ahead cannot change it: the caller sees it now
                            streamer.put(input_ids.cpu())
                            streamer.put(first_step[0][0].cpu())
                    kept = pair.keep(risk.confirm(pair.rows, *first_logits, openings=openings))
                    prefill.expert = prefill.expert[kept] if kept.numel() else None
        selection.set_rows(pair.rows, batch)
        if first_step is not None:  # each row's step 0 as computed on the route the check gave it
            on_kept_route = torch.zeros(batch, dtype=torch.bool, device=device)
            on_kept_route[pair.rows] = True
            first_step = tuple(torch.where(on_kept_route, kept_part, routed_part)
                               for kept_part, routed_part in zip(*first_step))
        guarding = pair.rows.tolist()  # kept on the host: read every step, changed only when rows retire
        guarded_rows = set(guarding)
        base_out, expert_out = prefill.base, prefill.expert
        alphas, verdicts = risk.alphas, risk.verdicts
        alpha_t = torch.tensor(alphas, dtype=torch.float32, device=device)
        early_stop = EarlyStop(tokenizer, alphas) if config.early_stop and config.mode != "off" else None
        sequences = input_ids
        history: list[tuple[torch.Tensor, ...]] = []
        stop_reasons = ["length"] * batch
        streamed_first = first_step is not None
        if streamer is not None and not streamed_first:
            streamer.put(input_ids.cpu())

        steps = range(max(max_new))
        if progress:
            from tqdm.auto import tqdm

            guarded = pair.rows.numel()
            label = f"guarded decoding ({config.mode}, {guarded}/{batch} rows)" if guarded else "unguarded decoding"
            steps = tqdm(steps, desc=label, unit="tok")
        for step in steps:
            active = ~finished
            offset = torch.full((1,), step, dtype=torch.int64, device=device)
            identical.observe(base_out, expert_out, pair.rows, active)
            if step == 0 and first_step is not None:
                tokens, new_potential, spike, divergence = first_step
            else:
                with record_function("ngsd.select"):
                    tokens, new_potential, spike, divergence = selection.run(
                        step, base_out, expert_out, potential, alpha_t, seed_t, offset, sequences
                    )
            removed_guard = no_row
            if selection.removed_guard is not None:  # rows whose rules removed the guard's answer end before its token
                removed_guard = selection.removed_guard & active
                active = active & ~removed_guard
                finished |= removed_guard
            tokens = torch.where(active, tokens, torch.full_like(tokens, pad))
            potential = torch.where(active, new_potential, potential)
            history.append((active, tokens, divergence, potential, spike & active))
            sequences = torch.cat([sequences, tokens[:, None]], dim=-1)

            hit_eos = torch.isin(tokens, eos_ids) & active
            hit_string = no_row if stop_criterion is None else stop_criterion(sequences, None).to(device) & active
            done = hit_eos | hit_string | (max_new_t <= step + 1)
            if stopping_criteria is not None:
                done |= stopping_criteria(sequences, None).to(device)
            new_done = done & active
            finished |= done
            # one host round-trip per step: invalid logits, newly finished rows (and why), all done
            invalid_rows, done_rows, eos_rows, string_rows, finished_rows, removed_rows = _sync(
                tokens < 0, active, new_done, hit_eos, hit_string, finished, removed_guard)
            if invalid_rows:
                _raise_invalid(invalid_rows, step, *selection.logits(base_out, expert_out))
            for row in removed_rows:
                stop_reasons[row] = STOP_REASON
            for row in done_rows:  # what ended the row, also when it was its last allowed step
                stop_reasons[row] = ("eos" if row in eos_rows else "stop_string" if row in string_rows
                                     else "length" if step + 1 >= max_new[row] else "stopping_criteria")
            if early_stop is not None:
                generated = sequences[:, input_ids.shape[1] :].tolist()
                for row in set(range(batch)) - finished_rows:
                    if early_stop.should_stop(row, generated[row]):
                        finished[row] = True
                        finished_rows.add(row)
                        stop_reasons[row] = "early_stop"
            if not pad_given and len(finished_rows) < batch:
                # Plain generate keeps decoding a row its stopping criteria or stop strings ended when there is
                # no pad id; token 0 as the filler would be a silent difference. (Per-row lengths are ngsd's own.)
                stopped = [row for row in done_rows if stop_reasons[row] in ("stop_string", "stopping_criteria")]
                if stopped:
                    raise ValueError(f"row {stopped[0]} was stopped (stop string or stopping criteria) at new token "
                                     f"{step + 1}, before the others, and its later positions need a filler: this "
                                     "model has neither a pad_token_id nor an eos_token_id; pass pad_token_id=... "
                                     "(the tokenizer's pad or eos id)")
            if streamer is not None and not (step == 0 and streamed_first):
                streamer.put(tokens.cpu())
            if len(finished_rows) == batch:
                break
            # Finished guarded rows stop costing an expert forward. Not under cuda_graph: its graph is captured
            # with every row guarded, and a replay is worth more on a GPU than the rows a finished one would save.
            if not cuda_graph and not finished_rows.isdisjoint(guarding):
                steps_left = max(max_new[row] for row in range(batch) if row not in finished_rows) - step - 1
                retired = _rows_to_retire(guarding, finished_rows, steps_left)
                if retired:
                    guarding = [row for row in guarding if row not in retired]
                    pair.keep(guarding)
                    selection.set_rows(pair.rows, batch)
            with record_function("ngsd.forward"):
                base_out, expert_out = pair.step(tokens)
    finally:
        pair.close()

    if streamer is not None:
        streamer.end()
    identical.warn_if_stuck()
    traces = _collect_traces(history, alphas, verdicts, stop_reasons, guarded_rows,
                             heads.path + getattr(pair, "note", ""))
    return GuardedOutput(sequences=sequences, traces=traces, prompt_width=input_ids.shape[1])


def _rows_to_retire(guarded: list[int], finished: set[int], steps_left: int) -> set[int]:
    """The finished guarded rows whose expert copies to drop before the next forward (none: keep them all).

    A finished row's expert copy is computed for nothing until the call ends. Dropping it moves the
    cache rows of the guarded rows after it, each about one row's forward on a CPU; so they go when the
    row-steps saved are at least the rows moved (at once when nothing moves, the last rows finishing).
    """
    done = [j for j, row in enumerate(guarded) if row in finished]
    if not done or steps_left < 1:
        return set()
    moved = len(guarded) - done[0] - len(done)
    return {guarded[j] for j in done} if len(done) * steps_left >= moved else set()


IDENTICAL_LOGITS_STEPS = 8


class _IdenticalOutputsWatch:
    """Counts consecutive steps in which every guarded row's expert output equals its base output (up to float noise).

    A real expert differs from the base somewhere; equal logits (or final hidden states) step after
    step mean the expert is not applied at all (e.g. LoRA hooks missing), so the gate can never
    fire. Counted on the device and read once, at the end of the call.
    """

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.run = torch.zeros((), dtype=torch.long, device=device)
        self.longest = torch.zeros((), dtype=torch.long, device=device)

    def observe(self, base: torch.Tensor, expert: torch.Tensor | None, rows: torch.Tensor, active: torch.Tensor) -> None:
        # hidden states of another width (a smaller model of the family as the expert) come from another
        # model: they cannot be the base's outputs, and cannot be subtracted from them
        if not self.enabled or expert is None or expert.shape[-1] != base.shape[-1]:
            return
        base = base[rows].float()
        # Equal up to float noise (base and expert rows of one batched forward can differ in the last
        # bits), measured as a relative L2 distance: a hidden state's few large outlier dimensions
        # must not hide a small but real expert shift in the others.
        noise = 1e-5 if expert.dtype == torch.float32 else 1e-2
        distance = (base - expert.float()).norm(dim=-1)
        live = active[rows]  # once every guarded row has finished there is nothing left to compare
        same = ((distance <= noise * base.norm(dim=-1).clamp_min(1e-12)) | ~live).all() & live.any()
        self.run = (self.run + 1) * same
        self.longest = torch.maximum(self.longest, self.run)

    def warn_if_stuck(self) -> None:
        if self.enabled and int(self.longest) >= IDENTICAL_LOGITS_STEPS:
            warn_at_caller(
                f"the expert's outputs equalled the base model's on every guarded row for {int(self.longest)} "
                "consecutive steps: the expert is most likely not applied (LoRA hooks missing or detached, or the "
                "expert is the base model itself), so guarded decoding cannot differ from plain decoding",
                RuntimeWarning,
            )


def _first_step_on_either_route(selection: GuardedStep, prefill: Any, rows: torch.Tensor, risk: Any,
                                potential: torch.Tensor, seed: torch.Tensor, sequences: torch.Tensor
                                ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None:
    """Step 0 twice, before the check's look-ahead: every checked row kept guarded (at a kept row's alpha), and
    every checked row routed. When each row picks the same first token both ways, whatever the look-ahead
    decides, that token can reach the streamer before the expert answers ahead: None otherwise.

    Under the default gate this is the rule, not luck: the potential starts at v_reset and one step's
    divergence cannot reach v_th, so no row mixes at its first token (a primed gate can, and then waits).
    Returns (kept-route outputs, routed-route outputs) for each row to take its own route's."""
    batch = prefill.base.shape[0]
    offset = torch.zeros(1, dtype=torch.int64, device=potential.device)
    checked = set(risk.to_check)
    alphas = [risk.checked_alpha if row in checked else alpha for row, alpha in enumerate(risk.alphas)]
    kept_alpha = torch.tensor(alphas, dtype=torch.float32, device=potential.device)
    kept = selection.run(0, prefill.base, prefill.expert, potential, kept_alpha, seed, offset, sequences)
    stay = torch.tensor([j for j, row in enumerate(rows.tolist()) if row not in checked], dtype=torch.long,
                        device=rows.device)
    selection.set_rows(rows[stay], batch)
    routed_alpha = torch.tensor(risk.alphas, dtype=torch.float32, device=potential.device)
    routed = selection.run(0, prefill.base, prefill.expert[stay.to(prefill.expert.device)] if stay.numel() else None,
                           potential, routed_alpha, seed, offset, sequences)
    selection.set_rows(rows, batch)
    if not torch.equal(kept[0], routed[0]) or bool((kept[0] < 0).any()):  # (a negative token: invalid logits)
        return None
    return kept, routed


def expert_openings(pair: Any, tokenizer: Any, tokens: int, model: Any):
    """What `RiskPlan.confirm` calls for the expert's own greedy openings of some guarded rows (text, cut at
    the model's first end-of-answer token); None when the check reads none, or cannot (no tokenizer, or a pair
    without a look-ahead). The model's own ends (`eos_token_ids`: the tokenizer's and the generation config's, as
    the fit that chose the check read them), not the call's `eos_token_id`: a request that named "'m" an eos cut
    the refusal "I'm sorry, but I cannot..." to "I" and was routed unguarded (nothing a request says may lower
    its guard)."""
    if not tokens or tokenizer is None or not hasattr(pair, "expert_openings"):
        return None
    from ..loading import eos_token_ids

    stops = set(eos_token_ids(model, tokenizer))

    def openings(index: torch.Tensor, first_logits: torch.Tensor) -> list[str]:
        texts = []
        for ids in pair.expert_openings(index, first_logits, tokens).tolist():
            ended = [i for i, token in enumerate(ids) if token in stops]
            texts.append(tokenizer.decode(ids[:ended[0]] if ended else ids, skip_special_tokens=True))
        return texts

    return openings


def _sync(invalid, active, new_done, hit_eos, hit_string, finished, removed_guard
          ) -> tuple[list[int], list[int], set[int], set[int], set[int], list[int]]:
    packed = torch.stack([invalid & active, new_done, hit_eos, hit_string, finished, removed_guard]).cpu()
    rows = [mask.nonzero().flatten().tolist() for mask in packed]
    return rows[0], rows[1], set(rows[2]), set(rows[3]), set(rows[4]), rows[5]


def _raise_invalid(rows: list[int], step: int, base_logits: torch.Tensor, expert_logits: torch.Tensor) -> None:
    def bad(logits: torch.Tensor) -> bool:
        row = logits[rows].float()
        return bool((torch.isnan(row) | (row == float("inf"))).any() or (~torch.isfinite(row).any(-1)).any())

    models = [("base", base_logits)]
    if expert_logits is not base_logits:  # (without expert rows the expert's logits are the base's)
        models.append(("expert", expert_logits))
    which = [name for name, logits in models if bad(logits)]
    raise FloatingPointError(
        f"non-finite logits from the {' and '.join(which) or 'base/expert'} model at step {step} in rows {rows} "
        "(NaN, +inf, or every token -inf). Common causes: fp16 overflow (load the model in bf16 or fp32), "
        "a broken adapter, or a logits processor that masks every token"
    )


def _collect_traces(history, alphas, verdicts, stop_reasons, guarded_rows: set[int], step_path: str) -> list[RowTrace]:
    def trace(row: int, **per_step) -> RowTrace:
        guarded = row in guarded_rows
        return RowTrace(alpha=alphas[row], reflection=verdicts[row], stop_reason=stop_reasons[row], guarded=guarded,
                        step_path=step_path if guarded else "", **per_step)

    if not history:
        return [trace(row) for row in range(len(alphas))]
    active, tokens, divergence, potential, spikes = (torch.stack(parts, dim=1).cpu() for parts in zip(*history))
    return [
        trace(row, divergence=divergence[row][keep].tolist(), potential=potential[row][keep].tolist(),
              spikes=spikes[row][keep].tolist(), tokens=tokens[row][keep].tolist())
        for row, keep in enumerate(active)
    ]
