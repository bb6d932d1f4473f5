"""`NGSDLogitsProcessor`: the gate of every guarded request, run with ngsd's step op inside vLLM's sampler.

Per step: the base logits come in (after vLLM's own masks: allowed tokens, bad words, min
tokens, logit bias), the expert's rows come from the wrapper model (`channel.py`), and for the
guarded rows `torch.ops.ngsd.guarded_select` computes divergence, the LIF update, the mixture
where the neuron fires and the choice -- the CPU step on a CPU, the Triton kernels on CUDA.
The chosen token is forced (every other logit -inf), so vLLM's greedy or sampling step takes it.
Opted-out rows are left untouched: they decode exactly as plain vLLM. A token vLLM masked in the
base logits (-inf) is masked in the expert's too, so constraints hold for the guarded choice. The
repetition, presence and frequency penalties, which vLLM applies only after the processors, are
applied here to the base row before the op (``logit_rules``; not to the expert's, whose answer a
penalty would lower). Where a request's masks or bias remove the guard's answer
(``ngsd.decoding.request_rules``) its answer ends: eos from that step on.

Greedy requests of one step go to the op together. A sampled request (temperature > 0) that gave a
seed runs on its own, keyed by its seed and its step, so its draws do not depend on its batch
neighbours; sampled requests without a seed share one launch per kind of sampling (top-k or not, top-p
or not), each with its own drawn seed, step, temperature, top-k and top-p (``gate_book.sampled_launches``;
the op's ``row_temperature`` / ``row_top_k`` / ``row_top_p``).
Logprobs a request asks for are the base model's
(vLLM computes them before any processor).

With the risk probe on (`risk.py`), a request that asked for nothing is decided first, at the step
that reaches its last prompt token: routed (its row left untouched: plain vLLM) or guarded at the
alpha the library's rules give, from that first token on. One that asked for at least an alpha
(`RequestPolicy.at_least`) is decided then too, and guarded at the larger of the two. A prompt that does
not end with the chat template's opening of the assistant turn (raw text) is never routed.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

import ngsd_kernels  # noqa: F401  (registers torch.ops.ngsd)

from ..decoding.request_rules import rules_remove_guard
from .channel import CHANNEL
from .gate_book import GateBook, GateState, sampled_launches
from .logit_rules import apply_masks_and_bias, apply_penalties
from .risk import EngineRisk, observe
from .settings import CONFIG_KEY, GuardSettings, RequestPolicy, check_admission

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

    from ..risk.estimate import ProbeVerdict


class NGSDLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: "SamplingParams") -> None:
        """At admission: malformed ``ngsd_alpha`` / ``ngsd_guard``, or min_p on a guarded request, fail it (HTTP 400)."""
        check_admission(sampling_params)

    def __init__(self, vllm_config: "VllmConfig", device: torch.device, is_pin_memory: bool) -> None:
        raw = getattr(vllm_config.model_config.hf_config, CONFIG_KEY, None)
        if raw is None:
            raise ValueError(f"ngsd: {type(self).__name__} guards the NGSDGuardedLlamaForCausalLM architecture only; "
                             "build the engine with ngsd.vllm.engine_kwargs (or serve_args)")
        self.settings = GuardSettings.from_mapping(raw)
        self.config = self.settings.config()
        self.risk = EngineRisk.for_engine(self.settings, vllm_config.model_config.hf_config)
        tokenizer = _engine_tokenizer(vllm_config)
        if self.risk is not None:
            self.risk.use_tokenizer(tokenizer)
        self.book = GateBook(self.settings, self.risk)
        self.device = device
        self.eos_token_id = _eos_token_id(tokenizer, vllm_config)
        # where an expert opening ends, as in the library (`ngsd.loading.eos_token_ids`): the tokenizer's eos and the
        # generation config's (a chat model's end-of-turn token is often listed there only)
        self.eos_token_ids = {self.eos_token_id, *_generation_eos_ids(vllm_config)}

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the token

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self.book.update(batch_update.removed, batch_update.added, batch_update.moved)
        if self.risk is not None and self.risk.checks:  # before this step's forward: compute_logits reads it
            CHANNEL.check_rows = sorted(index for index, state in self.book.rows.items() if state.awaiting)
        CHANNEL.ruled_rows = self.book.ruled()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        expert = CHANNEL.take(logits.shape[0])
        if self.risk is not None:
            self._decide(expert, logits.shape[0])
        rows = self.book.guarded(logits.shape[0])
        if not rows:
            return logits
        every_row = len(rows) == logits.shape[0]  # rows are sorted by index, so they are 0..n-1
        index = torch.tensor([i for i, _ in rows], dtype=torch.long, device=logits.device)
        base = logits if every_row else logits[index]  # the op does not write its inputs
        expert_logits = expert.logits(index).to(base.dtype)
        # (a row at alpha 0 mixes nothing of the expert: no answer of the guard to take away)
        ruled = [k for k, (_, state) in enumerate(rows) if state.has_rules and not state.ended_by_rules
                 and (state.policy.alpha > 0 or self.config.mode == "safedecoding")]
        for k in [k for k in ruled if rows[k][0] not in expert.base_before_rules]:
            # cannot happen (update_state named the row before this step's forward); unchecked, the rules could
            # take the guard's answer away unseen, so the answer ends
            logger.error("ngsd: no raw base logits for guarded row %d with token rules; its answer ends (eos)",
                         rows[k][0])
            rows[k][1].ended_by_rules = True
        ruled = [k for k in ruled if not rows[k][1].ended_by_rules]
        expert_before_rules = expert_logits[ruled] if ruled else None  # a copy: the rules write expert_logits
        states = [state for _, state in rows]
        apply_masks_and_bias(states, base, expert_logits)
        if ruled:  # before the penalties, which do not count
            self._end_where_rules_remove_guard(rows, ruled, expert, expert_before_rules, base, expert_logits)
        apply_penalties(states, base)
        greedy = [k for k, (_, state) in enumerate(rows) if _temperature(state) == 0.0]
        sampled = [k for k, (_, state) in enumerate(rows) if _temperature(state) > 0.0]
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        potentials = [0.0] * len(rows)
        for group in _by_params(greedy, rows, self.config):
            self._select(group, rows, base, expert_logits, tokens, potentials, seeds=[0], offsets=[0])
        vocab = base.shape[1]
        step_params = lambda state: launch_setting(self.config, state, vocab)  # noqa: E731
        for group in sampled_launches(sampled, rows, step_params, draw_seed):
            states = [rows[k][1] for k in group]
            self._select(group, rows, base, expert_logits, tokens, potentials, seeds=[s.seed for s in states],
                         offsets=[s.step for s in states], per_row=[_own_sampling(s, vocab) for s in states])
        chosen = tokens >= 0  # -1: the step found no valid token (non-finite logits, or every token masked)
        all_chosen = bool(chosen.all())
        if not all_chosen:
            # never index with -1 (it wrapped to the vocabulary's last token): vLLM's own logits decide those rows
            logger.warning("ngsd: %d guarded row(s) had no valid token this step (non-finite logits, or the request's "
                           "own masks leave none); vLLM samples them from its own logits", int((~chosen).sum()))
        ended = [k for k, (_, state) in enumerate(rows) if state.ended_by_rules]
        if ended:  # its answer has ended: eos, whatever the op chose (vLLM stops it, or fills with eos)
            tokens[ended] = self.eos_token_id
            for k in ended:
                potentials[k] = rows[k][1].potential
        for (_, state), token, potential in zip(rows, tokens.tolist(), potentials):
            # a row without a token keeps its potential (no step of the neuron ran on it)
            state.pending = (len(state.output), token, potential) if token >= 0 else (len(state.output), None,
                                                                                       state.potential)
        if all_chosen and every_row:
            logits.fill_(float("-inf"))
        else:
            index, tokens = index[chosen], tokens[chosen]
            logits[index] = float("-inf")
        logits[index, tokens] = 0.0
        return logits

    def _end_where_rules_remove_guard(self, rows: list[tuple[int, GateState]], ruled: list[int], expert,
                                      expert_before_rules: torch.Tensor, base: torch.Tensor,
                                      expert_logits: torch.Tensor) -> None:
        """Mark the rows (positions ``ruled`` in ``rows``) whose request's rules take the guard's answer away
        (`ngsd.decoding.request_rules`): their answer ends with this step's token, an eos."""
        base_before = torch.stack([expert.base_before_rules[rows[k][0]] for k in ruled]).to(base.device, base.dtype)
        removed = rules_remove_guard(base_before, base[ruled], expert_before_rules, expert_logits[ruled]).tolist()
        for k, gone in zip(ruled, removed):
            state = rows[k][1]
            if gone:
                state.ended_by_rules = True
                logger.warning("ngsd: a guarded request's own token rules (allowed tokens, bad words, min tokens, "
                               "logit bias or structured output) removed the guard's answer at its output token %d: "
                               "its answer ends there (eos)", len(state.output or ()))

    def _decide(self, expert, batch_size: int) -> None:
        """Decide the undecided requests whose last prompt token this step's forward reached."""
        awaiting = self.book.awaiting(batch_size)
        if not awaiting:
            CHANNEL.put_probe(None)
            return
        tokens = CHANNEL.take_probe()
        due: list[tuple[int, GateState, float | None, tuple["ProbeVerdict", bool],
                        tuple[tuple[int, ...], int] | None]] = []
        for index, state in awaiting:
            if not state.prompt:  # a prompt given as embeddings: no token ids to tell its end by
                state.awaiting = False
                continue  # guarded at the engine's alpha (its policy as it stands)
            start, end = int(tokens.starts[index]), int(tokens.starts[index + 1])
            if not observe(state, tokens.logits[start:end], tokens.positions[start:end]):
                continue  # a partial prefill: vLLM discards this step's sample, and the row stays untouched
            floor = state.policy.alpha if state.policy.at_least else None
            first = self.risk.first_verdict(state.probe_max, state.prompt)
            # a request that asked for at least the alpha the check would keep it at cannot be routed by an opening
            wants_opening = (floor is None or floor < self.risk.plan.checked_alpha) and CHANNEL.look_ahead is not None \
                and self.risk.wants_opening(first, expert.divergence.get(index))
            key = (tuple(state.prompt), int(expert.all_logits[index].argmax())) if wants_opening else None
            due.append((index, state, floor, first, key))
        # the step's openings decoded together; the children of an n > 1 request share one
        asked: dict[tuple[tuple[int, ...], int], int] = {}  # each prompt's (and first token's) first row
        for index, *_, key in due:
            if key is not None:
                asked.setdefault(key, index)
        openings, source = self._expert_openings(list(asked), expert, [asked[key] for key in asked])
        for index, state, floor, first, key in due:
            verdict = self.risk.checked(first, expert.divergence.get(index), None if key is None else openings[key])
            state.verdict, state.awaiting = verdict, False
            if floor is None:
                state.policy = RequestPolicy(guarded=not verdict.routed, alpha=verdict.alpha)
            else:  # it asked for at least `floor`: never routed, and the probe may only raise it
                state.policy = RequestPolicy(guarded=True, alpha=max(floor, 0.0 if verdict.routed else verdict.alpha))
            self.risk.record(state.prompt, verdict, state.prompt_steps, floor=floor, alpha=state.policy.alpha,
                             opening_prompt=None if key is None else source)

    def _expert_openings(self, keys: list[tuple[tuple[int, ...], int]], expert, rows: list[int]
                         ) -> tuple[dict[tuple[tuple[int, ...], int], str | None], str | None]:
        """The expert's own greedy openings of requests given as (prompt, argmax of the expert's raw first-step
        logits), at `rows` of this step's batch: `check_rollout` tokens each, cut at the first eos, as the library's
        `expert_openings` decodes them. None for each where the look-ahead failed: those requests stay guarded (a
        failed look-ahead must not take the engine down, and the divergence alone then decides). And where the
        look-ahead found their prompts (`ExpertOpening.last_source`), None where it failed."""
        if not keys:
            return {}, None
        try:
            decoded = CHANNEL.look_ahead([prompt for prompt, _ in keys], expert.all_logits[rows],
                                         self.risk.plan.check_rollout, rows=rows)
        except Exception:  # noqa: BLE001 - every request of the engine would fail with it
            logger.exception("ngsd: the divergence check's look-ahead failed for %d request(s) of %s prompt tokens; "
                             "they stay guarded (the divergence alone decides)", len(keys),
                             "/".join(str(len(prompt)) for prompt, _ in keys))
            return dict.fromkeys(keys), None
        return ({key: self._opening_text(ids) for key, ids in zip(keys, decoded)},
                getattr(CHANNEL.look_ahead, "last_source", None))

    def _opening_text(self, ids: list[int]) -> str:
        ended = [i for i, token in enumerate(ids) if token in self.eos_token_ids]
        return self.risk.tokenizer.decode(ids[:ended[0]] if ended else ids, skip_special_tokens=True)

    def _select(self, group: list[int], rows: list[tuple[int, GateState]], base: torch.Tensor, expert: torch.Tensor,
                tokens: torch.Tensor, potentials: list[float], seeds: list[int], offsets: list[int],
                per_row: list[tuple[float, int, float]] | None = None) -> None:
        """One op launch for the rows ``group`` (positions in ``rows``), which share their step parameters;
        ``seeds`` / ``offsets``: one value for all of them, or one each; ``per_row``: sampled rows' own
        (temperature, top_k, top_p), one each, of one kind (``launch_setting``): the op's per-row settings."""
        states = [rows[k][1] for k in group]
        first = states[0]
        if per_row is None:
            params = self.config.step_params(first.step, **_sampling(first))
            row_settings: dict[str, torch.Tensor] = {}
        else:
            # the launch's top_k: the largest of the rows' (its buffer); its top_p: any value below 1
            params = launch_setting(self.config, first, base.shape[1]).with_(
                top_k=max(k for _, k, _ in per_row))
            row_settings = {"row_temperature": torch.tensor([t for t, _, _ in per_row], dtype=torch.float32,
                                                            device=base.device)}
            if params.top_k > 0:
                row_settings["row_top_k"] = torch.tensor([k for _, k, _ in per_row], dtype=torch.int32,
                                                         device=base.device)
            if params.top_p < 1.0:
                row_settings["row_top_p"] = torch.tensor([p for _, _, p in per_row], dtype=torch.float32,
                                                         device=base.device)
        whole = len(group) == base.shape[0]
        at = torch.tensor(group, dtype=torch.long, device=base.device)
        potential = torch.tensor([s.potential for s in states], dtype=torch.float32, device=base.device)
        # SafeDecoding amplifies at the engine's safedecoding_alpha (3 by default, as ngsd.generate), not a weight
        alphas = ([self.config.safedecoding_alpha] * len(states) if self.config.mode == "safedecoding"
                  else [s.policy.alpha for s in states])
        alpha = torch.tensor(alphas, dtype=torch.float32, device=base.device)
        seed_t = torch.tensor(seeds, dtype=torch.int64, device=base.device)
        offset_t = torch.tensor(offsets, dtype=torch.int64, device=base.device)
        chosen, new_potential, _spike, _divergence = torch.ops.ngsd.guarded_select(
            base if whole else base[at], expert if whole else expert[at], potential, alpha, seed_t, offset_t,
            *params.flat(), **row_settings)
        tokens[at] = chosen
        for k, value in zip(group, new_potential.tolist()):
            potentials[k] = value


def _engine_tokenizer(vllm_config: "VllmConfig"):
    """The engine's tokenizer (its folder or hub id, as vLLM loads it), for the probe's chat-template check."""
    from transformers import AutoTokenizer

    model_config = vllm_config.model_config
    return AutoTokenizer.from_pretrained(model_config.tokenizer,
                                         revision=getattr(model_config, "tokenizer_revision", None),
                                         trust_remote_code=bool(getattr(model_config, "trust_remote_code", False)))


def _eos_token_id(tokenizer, vllm_config: "VllmConfig") -> int:
    """The token that ends a request (vLLM stops at its tokenizer's eos): the tokenizer's, else the config's first."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = next(iter(_config_eos_ids(vllm_config)), None)
    if eos is None:
        raise ValueError("ngsd: the engine's tokenizer and config name no eos token, which a guarded answer needs to "
                         "end on; set eos_token_id in the model's config")
    return int(eos)


def _config_eos_ids(vllm_config: "VllmConfig") -> list[int]:
    return _ids(getattr(vllm_config.model_config.hf_config, "eos_token_id", None))


def _generation_eos_ids(vllm_config: "VllmConfig") -> list[int]:
    return _ids(vllm_config.model_config.try_get_generation_config().get("eos_token_id"))


def _ids(eos) -> list[int]:
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]


def draw_seed() -> int:
    """The Philox key of a sampled request without a seed, drawn once per request."""
    return random.getrandbits(62)


def _temperature(state: GateState) -> float:
    return state.sampling[0]


def launch_setting(config, state: GateState, vocab: int):
    """The step parameters a sampled request's launch shares: its kind of sampling only (top-k or not,
    top-p or not; SafeDecoding's step switch). Its temperature, k and p go to the op per row
    (``row_temperature`` / ``row_top_k`` / ``row_top_p``), so requests of one kind share a launch."""
    _, top_k, top_p = _own_sampling(state, vocab)
    return config.step_params(state.step, temperature=1.0, top_k=1 if top_k else 0, top_p=0.5 if top_p < 1.0 else 1.0)


def _own_sampling(state: GateState, vocab: int) -> tuple[float, int, float]:
    """A sampled request's (temperature, top_k, top_p); a top-k of the whole vocabulary or more is off (0)."""
    temperature, top_k, top_p = state.sampling
    return temperature, (top_k if 0 < top_k < vocab else 0), top_p


def _sampling(state: GateState) -> dict[str, float | int]:
    temperature, top_k, top_p = state.sampling
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p}


def _by_params(members: list[int], rows: list[tuple[int, GateState]], config) -> list[list[int]]:
    """Greedy rows grouped by their step parameters (they differ only where the step matters: SafeDecoding)."""
    groups: dict[object, list[int]] = {}
    for k in members:
        groups.setdefault(config.step_params(rows[k][1].step, **_sampling(rows[k][1])), []).append(k)
    return list(groups.values())
