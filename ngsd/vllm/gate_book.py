"""Per-request gate state inside vLLM's persistent batch: potential, alpha and step, row by row.

vLLM tells a logits processor how its batch changed (``BatchUpdate``: rows removed, added, moved,
in that order) but never names the request. Two facts make the state safe anyway:

- The state lives on the request's ``SamplingParams`` object (vLLM keeps it for the request's
  whole life), in a list with one gate per request that brings that object, found by the
  request's own output token list. Usually each request has its own params object, but the n
  children of a request with ``n > 1`` and no seed share their parent's in a single-process
  engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; across processes each child is deserialised into
  its own), and each child's output list is its own. A request removed from the batch
  (preempted, or simply not scheduled this step) and added back later brings the same params and
  the same output list, so its potential continues where it was (with async scheduling vLLM may
  hand a resumed request a new list: then the gate no row holds whose committed steps match the
  list's length is taken, or, for a request whose steps are never committed (routed, opted out),
  a free gate of that kind: a routed request keeps its route and is not decided again). When the
  request finishes vLLM drops the params object and the state goes with it (with shared params,
  when its last sibling finishes). Nothing here holds a request beyond its life.
- A selection is committed only once the token is really in the request's output. vLLM computes
  logits for a partly prefilled request too and throws that sample away; the chosen token is
  kept pending and committed when the request's (live) output list has grown by it, dropped
  when it has not. With async scheduling (vLLM's default on GPUs; its CPU build switches it off,
  so this path has run only in simulated updates) the list grows by a -1 placeholder first, which
  counts as the token.
- With the risk probe on, a request that asked for nothing, or for at least some guard, starts undecided
  (`GateState.awaiting`):
  it is not guarded until the processor has decided it (`ngsd.vllm.risk`), and the decision is
  kept on the same state, so a preempted request keeps it.

Plain Python, no vLLM import: the main test suite checks it on simulated batch updates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ngsd_kernels.params import MIN_SAMPLING_TEMPERATURE

from .settings import GuardSettings, RequestPolicy

if TYPE_CHECKING:
    from .risk import EngineRisk

logger = logging.getLogger(__name__)
ASYNC_PLACEHOLDER = -1  # vLLM's output id for a token its async scheduling has not copied to the host yet
GATES_ATTRIBUTE = "_ngsd_gates"  # on the request's SamplingParams (a msgspec Struct with a __dict__): its requests' gates


@dataclass
class GateState:
    """One request's gate: the neuron's potential after `step` committed selections."""

    policy: RequestPolicy
    potential: float
    step: int = 0
    output: Sequence[int] | None = None  # the request's live output token list (vLLM's own)
    pending: tuple[int, int | None, float] | None = None  # (output length when chosen, token or None, new potential)
    seed: int | None = None  # sampled requests: the Philox key of this request
    seeded: bool = False  # the request gave its seed (its draws must not depend on its batch neighbours)
    sampling: tuple[float, int, float] = (0.0, 0, 1.0)  # temperature (0: greedy), top_k (0: off), top_p
    constrained: bool = False  # vLLM may mask tokens of this request (allowed ids, bad words, min tokens, grammar)
    penalties: tuple[float, float, float] | None = None  # (repetition, presence, frequency); None: all off
    logit_bias: dict[int, float] | None = None  # token id -> bias, as vLLM added it to the base row
    prompt: Sequence[int] = ()  # the request's prompt token ids (the repetition penalty reads them)
    awaiting: bool = False  # the risk probe has yet to decide this request (not guarded meanwhile)
    probe_max: float = float("-inf")  # the probe's largest token logit over the prompt positions seen so far
    prompt_steps: int = 0  # engine steps whose forward held some of its prompt tokens
    verdict: Any = None  # the probe's ProbeVerdict, once decided
    # the request's own rules removed the guard's answer (`ngsd.decoding.request_rules`): eos from then on
    ended_by_rules: bool = False

    @property
    def has_rules(self) -> bool:
        """Whether the request has token rules that can remove a token: masks or a logit bias (penalties only lower
        one; `ngsd.decoding.request_rules`)."""
        return self.constrained or bool(self.logit_bias)

    def settle(self) -> None:
        """Commit the pending selection if its token reached the output, else drop it (sample discarded)."""
        if self.pending is None or self.output is None:
            return
        length, token, potential = self.pending
        if len(self.output) > length:
            # -1: async scheduling's placeholder for a token sampled but not yet copied back to the host (vLLM
            # fills it in before the request's next sampling; a request leaving the batch keeps it)
            if token is not None and self.output[length] not in (token, ASYNC_PLACEHOLDER):
                # vLLM replaced the token we forced (e.g. a stop rule); the gate followed the token we chose
                logger.warning("ngsd: output token %d differs from the guarded choice %d at step %d",
                               self.output[length], token, self.step)
            self.potential, self.step = potential, self.step + 1
        self.pending = None


class GateBook:
    """Batch index -> `GateState` for the requests the processor currently sees."""

    def __init__(self, settings: GuardSettings, risk: "EngineRisk | None" = None) -> None:
        self.settings = settings
        self.risk = risk
        # with prime_divergence="check" the start depends on the probe's check (EngineRisk validated it)
        self.start_potential = risk.start_potential if risk is not None else settings.config().start_potential
        self.rows: dict[int, GateState] = {}

    def update(self, removed: Iterable[int], added: Iterable[tuple[int, Any, Any, Sequence[int]]],
               moved: Iterable[tuple[int, int, Any]]) -> None:
        """Apply one batch update: removed, then added, then moved (vLLM's documented order).

        `added` rows are (index, params, prompt ids, live output ids); `moved` rows are
        (i, j, directionality) where a directionality named SWAP exchanges i and j and any other
        moves i to j.
        """
        for index in removed:
            state = self.rows.pop(index, None)
            if state is not None:
                state.settle()  # its last token is in the output by now, or never will be
        for index, params, prompt, output in added:
            self.rows[index] = self._state_of(params, output)
            self.rows[index].prompt = prompt or ()  # None: a prompt given as embeddings
        for first, second, direction in moved:
            a, b = self.rows.pop(first, None), self.rows.pop(second, None)
            if getattr(direction, "name", str(direction)) == "SWAP":
                if a is not None:
                    self.rows[second] = a
                if b is not None:
                    self.rows[first] = b
            elif a is not None:
                self.rows[second] = a

    def _state_of(self, params: Any, output: Sequence[int]) -> GateState:
        gates = gates_of(params)
        state = self._returning(gates, output)
        if state is None:  # a new request (the policy was validated at admission)
            state = self._new_state(params)
            gates.append(state)
        state.output = output  # async scheduling may hand a resumed request a new list
        return state

    def _returning(self, gates: list[GateState], output: Sequence[int]) -> GateState | None:
        """The gate of a request back after a preemption or an unscheduled step (settled), or None: a new request.

        Its own output list finds it; failing that (a list replaced on resumption, as async scheduling does),
        a gate of the same params that no row holds: a guarded one whose committed steps are the list's
        length, else one that commits no steps (routed by the risk probe, or opted out: its step stays 0
        however long its output; siblings sharing params share the prompt, hence the route). A new
        request's list is empty, so a new sibling never takes over a preempted one's gate.
        """
        for state in gates:
            if state.output is output:
                state.settle()
                return state
        if not output:
            return None
        held = {id(state) for state in self.rows.values()}
        free = [state for state in gates if id(state) not in held]
        for state in free:
            state.settle()
        decided = [state for state in free if not state.awaiting]
        match = next((state for state in decided if state.policy.guarded and state.step == len(output)), None)
        if match is None:
            match = next((state for state in decided if not state.policy.guarded), None)
        return match

    def _new_state(self, params: Any) -> GateState:
        policy = self.settings.policy_or_guarded(getattr(params, "extra_args", None))
        seed = as_int64_seed(getattr(params, "seed", None))
        return GateState(policy=policy, potential=self.start_potential, seed=seed,
                         seeded=seed is not None, sampling=sampling_of(params), constrained=is_constrained(params),
                         penalties=penalties_of(params), logit_bias=getattr(params, "logit_bias", None) or None,
                         awaiting=self.risk is not None and (policy.default or policy.at_least))

    def guarded(self, batch_size: int) -> list[tuple[int, GateState]]:
        """The guarded rows among the first `batch_size`, each settled, in index order."""
        rows = []
        for index in sorted(self.rows):
            state = self.rows[index]
            if index < batch_size and state.policy.guarded and not state.awaiting:
                state.settle()
                rows.append((index, state))
        return rows

    def ruled(self) -> list[int]:
        """The rows whose request has token rules and is guarded or may be (undecided), in index order: the model
        keeps their base logits from before vLLM's rules for `request_rules`."""
        return sorted(index for index, state in self.rows.items()
                      if state.has_rules and (state.policy.guarded or state.awaiting))

    def awaiting(self, batch_size: int) -> list[tuple[int, GateState]]:
        """The rows among the first `batch_size` that the risk probe has yet to decide, in index order."""
        return [(index, self.rows[index]) for index in sorted(self.rows)
                if index < batch_size and self.rows[index].awaiting]


def as_int64_seed(seed: int | None) -> int | None:
    """vLLM takes any seed torch.Generator does (up to 2**64 - 1; child i of an n > 1 request gets seed + i, so the
    server's cap of 2**63 - 1 gives 2**63): the same 64 bits as the signed int64 the op reads. Philox keys on the
    two 32-bit halves, so the stream is the one those bits name (a larger seed killed the engine)."""
    if seed is None:
        return None
    seed = int(seed) & (2**64 - 1)
    return seed - 2**64 if seed >= 2**63 else seed


def gates_of(params: Any) -> list[GateState]:
    """The gates of the requests that share `params` (one, unless vLLM gave n > 1 children one object)."""
    gates = getattr(params, GATES_ATTRIBUTE, None)
    if gates is None:
        gates = []
        setattr(params, GATES_ATTRIBUTE, gates)
    return gates


GREEDY_BELOW = MIN_SAMPLING_TEMPERATURE  # vLLM treats a smaller temperature as greedy (its _SAMPLING_EPS, 1e-5)


def sampled_launches(members: Sequence[int], rows: Sequence[tuple[int, GateState]], step_params: Any,
                     draw_seed: Any) -> list[list[int]]:
    """The op launches of one step's sampled rows (``members``: positions in ``rows``), as lists of positions.

    A request that gave its seed runs alone, so its Philox stream (its seed, row 0, its step) and its
    tokens do not depend on the batch it shares. The others share a launch per step setting
    (``step_params(state)``: the processor's leaves the temperature out, which the op takes per row; top-k,
    top-p, and SafeDecoding's step switch): each row keeps its own drawn seed and step as the op's per-row
    seed and offset, and only its row index in the
    launch changes from step to step, which an unseeded request cannot tell. One launch for all of
    them instead of one each (on a GPU, 4-6 kernel launches a request a step).
    ``draw_seed()`` gives a request without a seed its key, once.
    """
    launches: list[list[int]] = []
    shared: dict[Any, list[int]] = {}
    for k in members:
        state = rows[k][1]
        if state.seed is None:
            state.seed = draw_seed()
        if state.seeded:
            launches.append([k])
        else:
            shared.setdefault(step_params(state), []).append(k)
    return launches + list(shared.values())


def sampling_of(params: Any) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) of a request as the step op takes them (greedy: temperature 0)."""
    temperature = float(getattr(params, "temperature", 0.0) or 0.0)
    if temperature < GREEDY_BELOW:
        return 0.0, 0, 1.0
    top_k = int(getattr(params, "top_k", 0) or 0)
    return temperature, max(top_k, 0), float(getattr(params, "top_p", 1.0) or 1.0)


def penalties_of(params: Any) -> tuple[float, float, float] | None:
    """(repetition, presence, frequency) penalties of a request, or None when all are off (vLLM's defaults)."""
    penalties = (float(getattr(params, "repetition_penalty", 1.0)), float(getattr(params, "presence_penalty", 0.0)),
                 float(getattr(params, "frequency_penalty", 0.0)))
    return None if penalties == (1.0, 0.0, 0.0) else penalties


def is_constrained(params: Any) -> bool:
    """Whether vLLM may set some of this request's logits to -inf before the processor runs."""
    return bool(getattr(params, "allowed_token_ids", None) or getattr(params, "bad_words", None)
                or getattr(params, "min_tokens", 0) or getattr(params, "structured_outputs", None))
