"""What the operator sets when building a guarded engine, and what one request may ask for.

The operator's settings travel inside the model config (``hf_overrides={"ngsd": {...}}``), so the
wrapper model (which loads the expert) and the logits processor (which runs the gate) read one
source in the worker process, and ``vllm serve --hf-overrides`` sets them without code.

A request asks through ``SamplingParams.extra_args``:

- ``"ngsd_alpha"``: its mixing strength, a number in [0, 1]. Without it the engine's ``alpha``.
- ``"ngsd_guard": False``: decode unguarded, exactly as plain vLLM would.

Nothing a request says may weaken its own guard unless the operator allowed it: with
``allow_opt_out=False`` (the default) `request_policy` refuses an alpha below the engine's
``alpha`` and ``ngsd_guard=False`` with a ValueError. Admission (the front end, HTTP 400) checks
only the form of the arguments (`check_admission`: it cannot see the engine's settings), and refuses
``min_p`` on a guarded request; inside the engine such a request is guarded at the engine's alpha
and a warning is logged (`policy_or_guarded`), never served unguarded or weaker.

Which requests the engine guards, and at what alpha, is the library's default (`ngsd.generate`):
with ``risk="auto"`` (the default) an engine of the default model with the shipped expert runs
the shipped risk probe on every request that asks for nothing, routes the ones it calls harmless
(unguarded, as plain vLLM) and guards the rest, with the divergence check in between (see
`ngsd.vllm.risk`). A request that sets ``ngsd_alpha`` or ``ngsd_guard=True`` is never routed; it is
guarded at its alpha (the engine's for ``ngsd_guard=True``), and where the engine does not allow opting
out, at the probe's alpha when that is higher (`RequestPolicy.at_least`): asking for a guard never gives
a request less of one than asking for nothing.
Any other model or expert (or ``risk="off"``): every request guarded at ``alpha``.

>>> settings = GuardSettings.from_mapping({"alpha": 0.9})
>>> settings.request_policy({"ngsd_alpha": 1.0})
RequestPolicy(guarded=True, alpha=1.0, default=False, at_least=True)
>>> settings.request_policy({"ngsd_guard": False})
Traceback (most recent call last):
...
ValueError: extra_args['ngsd_guard']=False: this engine does not allow opting out of the guard (start it with allow_opt_out=True)
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields
from numbers import Real
from pathlib import Path
from typing import Any, Mapping

from ..config import NGSDConfig, ReflectionConfig
from ..experts.shipped import shipped_expert_path

logger = logging.getLogger(__name__)
CONFIG_KEY = "ngsd"  # the model-config attribute (hf_overrides key) that holds the settings
ALPHA_ARG = "ngsd_alpha"
GUARD_ARG = "ngsd_guard"
REQUEST_ARGS = (ALPHA_ARG, GUARD_ARG)
GATE_FIELDS = ("mode", "tau", "v_th", "v_reset", "rho", "initial_potential", "prime_divergence", "candidate_k",
               "divergence", "safedecoding_alpha", "safedecoding_steps", "safedecoding_k", "safedecoding_min_candidates",
               "score_floor")
RISK_MODES = ("auto", "probe", "off")
# ReflectionConfig fields that shape the probe's decision (the rest are self-reflection's)
REFLECTION_FIELDS = ("route", "route_below", "guarded_alpha", "check", "check_above", "check_divergence",
                     "check_rollout", "high_risk_above", "low_risk_below", "alpha_high", "alpha_mid", "alpha_low")


@dataclass(frozen=True)
class RequestPolicy:
    """How one request is decoded: guarded at `alpha`, or (opt-out) not guarded at all.

    default: the request asked for nothing (no ``ngsd_alpha``, no ``ngsd_guard``): with the risk probe
    on, the probe decides its route and alpha (`alpha` is then only the fallback).
    at_least: the request asked for its guard (``ngsd_guard=True``, or its own ``ngsd_alpha`` on an engine
    that does not allow opting out): it is never routed, and with the risk probe on it gets the larger
    of `alpha` and the probe's alpha, so asking never guards a request less than asking for nothing.
    """

    guarded: bool
    alpha: float
    default: bool = False
    at_least: bool = False


@dataclass(frozen=True)
class GuardSettings:
    """The operator's settings of a guarded engine.

    expert: a peft LoRA adapter folder for the base model, or "shipped" (the default model's
    expert); it is merged into a full copy of the base when the engine loads.
    alpha: the mixing strength of every request that does not set its own.
    alpha: the mixing strength of every request that does not set its own, where the risk probe is
    off; with it on, of the requests the probe cannot decide (a prompt given as embeddings). Also the
    floor of a request's own ``ngsd_alpha`` (unless allow_opt_out).
    allow_opt_out: let requests decode unguarded (``ngsd_guard=False``) or below `alpha`.
    gate: NGSDConfig gate fields (mode, tau, v_th, v_reset, rho, candidate_k, divergence, ...).
    risk: "auto" (the default): the risk probe when one applies (the default model with the shipped
    expert and its shipped probe, or the folder `probe` names), else every request at `alpha`;
    "probe": the probe, and an error where none applies; "off": every request at `alpha`.
    probe: a risk-probe folder (`ngsd train-probe`; token_max probes only); None: the shipped one.
    reflection: ReflectionConfig fields of the probe's decision (REFLECTION_FIELDS: route, route_below,
    guarded_alpha, check, check_above, check_divergence, check_rollout and the risk-to-alpha thresholds); the
    library's defaults otherwise, so the engine decides as `ngsd.generate` does.
    verdict_log: a file the worker appends one JSON line to per request the probe decides
    (`ngsd.vllm.risk.verdict_record`); None: none (the verdict is logged at INFO level either way).
    """

    expert: str = "shipped"
    alpha: float = 0.9
    allow_opt_out: bool = False
    gate: dict[str, Any] = field(default_factory=dict)
    risk: str = "auto"
    probe: str | None = None
    reflection: dict[str, Any] = field(default_factory=dict)
    verdict_log: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.expert, str) or not self.expert:
            raise TypeError(f"ngsd expert must be a LoRA adapter folder or 'shipped', got {self.expert!r}")
        object.__setattr__(self, "alpha", _alpha("ngsd alpha", self.alpha))
        if not isinstance(self.allow_opt_out, bool):
            raise TypeError(f"ngsd allow_opt_out must be True or False, got {self.allow_opt_out!r}")
        if not isinstance(self.gate, Mapping):
            raise TypeError(f"ngsd gate must be a dict of NGSDConfig fields, got {type(self.gate).__name__}")
        unknown = sorted(set(self.gate) - set(GATE_FIELDS))
        if unknown:
            raise ValueError(f"ngsd gate has unknown fields {unknown}; known: {list(GATE_FIELDS)}")
        if self.risk not in RISK_MODES:
            raise ValueError(f"ngsd risk must be one of {RISK_MODES}, got {self.risk!r}")
        if self.probe is not None and (not isinstance(self.probe, str) or not self.probe):
            raise TypeError(f"ngsd probe must be a risk-probe folder or None, got {self.probe!r}")
        if self.probe is not None and self.risk == "off":
            raise ValueError(f"ngsd probe={self.probe!r} with risk='off': the probe would never run; "
                             "drop one of them")
        if not isinstance(self.reflection, Mapping):
            raise TypeError(f"ngsd reflection must be a dict of ReflectionConfig fields, got "
                            f"{type(self.reflection).__name__}")
        unknown = sorted(set(self.reflection) - set(REFLECTION_FIELDS))
        if unknown:
            raise ValueError(f"ngsd reflection has unknown fields {unknown}; known: {list(REFLECTION_FIELDS)}")
        if self.reflection and self.risk == "off":
            raise ValueError("ngsd reflection shapes the risk probe's decision, and risk='off' runs no probe; "
                             "drop one of them")
        if self.verdict_log is not None and (not isinstance(self.verdict_log, str) or not self.verdict_log):
            raise TypeError(f"ngsd verdict_log must be a file path or None, got {self.verdict_log!r}")
        if self.verdict_log is not None and self.risk == "off":
            raise ValueError("ngsd verdict_log records the risk probe's verdicts, and risk='off' runs no probe; drop "
                             "one of them")
        self.reflection_config()
        config = self.config()  # validates the gate fields now, at engine start, not at the first request
        if config.prime_divergence == "check" and self.risk == "off":
            raise ValueError("ngsd gate prime_divergence='check' takes the risk probe's divergence check, and "
                             "risk='off' runs no probe; give prime_divergence a number (the first-step divergence "
                             "that fires the gate at once), or leave risk 'auto' on an engine the probe applies to")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> "GuardSettings":
        """Settings from the model config's ``ngsd`` entry (a dict, or an object with the same attributes)."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raw = dict(vars(raw))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"hf_overrides['{CONFIG_KEY}'] has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**dict(raw))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def config(self) -> NGSDConfig:
        """The gate as the project's own loop runs it (`NGSDConfig`), so both read the same parameters."""
        return NGSDConfig(**dict(self.gate))

    def reflection_config(self) -> ReflectionConfig:
        """The probe's decision rules as the library's `ReflectionConfig` (its defaults, changed by `reflection`)."""
        return ReflectionConfig(mode="probe", **dict(self.reflection))

    def request_policy(self, extra_args: Mapping[str, Any] | None) -> RequestPolicy:
        """The policy of one request from its ``extra_args``; ValueError/TypeError names the bad argument."""
        guard, alpha = parse_request(extra_args)
        if not guard:
            if not self.allow_opt_out:
                raise ValueError(
                    f"extra_args['{GUARD_ARG}']=False: this engine does not allow opting out of the guard "
                    "(start it with allow_opt_out=True)"
                )
            return RequestPolicy(guarded=False, alpha=0.0)
        if alpha is None:
            # ngsd_guard=True asks for the guard: never routed (it was routed like a request that asked nothing)
            asked = GUARD_ARG in (extra_args or {})
            return RequestPolicy(guarded=True, alpha=self.alpha, default=not asked, at_least=asked)
        if self.gate.get("mode") == "safedecoding":
            raise ValueError(f"extra_args['{ALPHA_ARG}']: this engine runs SafeDecoding, which amplifies at its "
                             "safedecoding_alpha for every guarded request; drop ngsd_alpha")
        if alpha < self.alpha and not self.allow_opt_out:
            raise ValueError(
                f"extra_args['{ALPHA_ARG}']={alpha} is below this engine's alpha {self.alpha}: a request may not weaken "
                "its own guard (start the engine with allow_opt_out=True, or a lower alpha)"
            )
        return RequestPolicy(guarded=True, alpha=alpha, at_least=not self.allow_opt_out)

    def policy_or_guarded(self, extra_args: Mapping[str, Any] | None) -> RequestPolicy:
        """`request_policy`, but a refused request is guarded at the engine's alpha (logged), never unguarded.

        Inside the engine an exception would fail the whole batch; requests are checked at
        admission (`check_admission` via the processor's validate_params), so this is the fallback
        for what admission could not know (the engine's own settings).
        """
        try:
            return self.request_policy(extra_args)
        except (TypeError, ValueError) as refusal:
            logger.warning("ngsd: %s; the request is guarded at alpha %s (or the risk probe's, if higher) instead",
                           refusal, self.alpha)
            return RequestPolicy(guarded=True, alpha=self.alpha, at_least=True)


def expert_folder(expert: str) -> Path:
    """The peft LoRA folder `expert` names ("shipped": the default model's); FileNotFoundError if it is not one."""
    path = shipped_expert_path() if expert == "shipped" else Path(expert).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"ngsd expert {expert!r}: {path} is not a peft LoRA adapter folder")
    return path


def check_admission(params: Any) -> None:
    """What the front end refuses of a request (HTTP 400 on the server): malformed ``extra_args``; vLLM's beam search,
    which ranks beams by logprobs from before the guard; a ``logit_bias`` of +inf or NaN, which leaves the guard's
    step no valid token; and on a guarded request ``min_p``, which vLLM applies after the guard has forced the token, where it
    does nothing.

    >>> from types import SimpleNamespace
    >>> check_admission(SimpleNamespace(extra_args={"ngsd_guard": False}, min_p=0.5))  # unguarded: plain vLLM
    >>> check_admission(SimpleNamespace(extra_args=None, min_p=0.5))
    Traceback (most recent call last):
    ...
    ValueError: min_p=0.5 has no effect on a guarded request (vLLM applies it after the guard has chosen the token); use top_k / top_p instead, or extra_args['ngsd_guard']=False where the engine allows opting out
    """
    guard, _ = parse_request(getattr(params, "extra_args", None))
    # also with ngsd_guard=False: this check cannot see whether the engine allows opting out, and on one that does not
    # the request is guarded, so beam search would bypass the guard there
    if _is_beam_search_step(params):
        raise ValueError("beam search is not supported on a guarded engine: vLLM's beam search sends one-token requests "
                         "(max_tokens=1, logprobs=2*beam_width, detokenize=False) and ranks beams by the base model's "
                         "logprobs, taken before the guard, so its beams decode unguarded; use greedy or sampled "
                         "requests (ngsd's model.generate refuses num_beams > 1 alike)")
    bias = getattr(params, "logit_bias", None) or {}
    # +inf or NaN leaves the guard's step no valid row (it chose no token); -inf is a mask, which the guard applies
    bad_bias = {token: value for token, value in bias.items() if math.isnan(float(value)) or float(value) == math.inf}
    if bad_bias:
        raise ValueError(f"logit_bias {bad_bias} is +inf or NaN; give finite values (vLLM's server clamps them to "
                         "+-100), or allowed_token_ids to force tokens")
    min_p = float(getattr(params, "min_p", 0.0) or 0.0)
    if guard and min_p > 0.0:
        raise ValueError(f"min_p={min_p} has no effect on a guarded request (vLLM applies it after the guard has chosen "
                         f"the token); use top_k / top_p instead, or extra_args['{GUARD_ARG}']=False where the engine "
                         "allows opting out")


def _is_beam_search_step(params: Any) -> bool:
    """The signature of vLLM's beam search requests (`BeamSearchOfflineMixin` / the server's `beam_search`): one
    token, 2 x beam width logprobs, no detokenizing; no other client asks for that combination."""
    logprobs = getattr(params, "logprobs", None)
    return (getattr(params, "max_tokens", None) == 1 and isinstance(logprobs, int) and logprobs >= 2
            and getattr(params, "detokenize", True) is False)


def parse_request(extra_args: Mapping[str, Any] | None) -> tuple[bool, float | None]:
    """(guard, alpha or None) from a request's ``extra_args``, checked for type and range only.

    >>> parse_request({"ngsd_alpha": 0.5})
    (True, 0.5)
    >>> parse_request({"ngsd_alpha": float("nan")})
    Traceback (most recent call last):
    ...
    ValueError: extra_args['ngsd_alpha'] must be a finite number in [0, 1] (a mixing weight), got nan
    """
    extra_args = extra_args or {}
    if not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args must be a dict, got {type(extra_args).__name__}")
    unknown = sorted(str(key) for key in extra_args
                     if str(key).strip().lower().startswith("ngsd") and key not in REQUEST_ARGS)
    if unknown:  # a misspelled ngsd_alpha (NGSD_ALPHA, " ngsd_alpha") would be decoded at the engine's alpha silently
        raise ValueError(f"extra_args has unknown ngsd arguments {unknown}; known: {list(REQUEST_ARGS)}")
    guard = extra_args.get(GUARD_ARG, True)
    # the OpenAI server's vllm_xargs turns JSON false into 0, so 0 and 1 count as false and true
    if not isinstance(guard, int) or guard not in (0, 1):
        raise TypeError(f"extra_args['{GUARD_ARG}'] must be true or false, got {guard!r} ({type(guard).__name__})")
    guard = bool(guard)
    if ALPHA_ARG not in extra_args:
        return guard, None
    if not guard:
        raise ValueError(f"extra_args sets both '{GUARD_ARG}'=False and '{ALPHA_ARG}'; an unguarded request has no alpha")
    return guard, _alpha(f"extra_args['{ALPHA_ARG}']", extra_args[ALPHA_ARG])


def _alpha(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a finite number in [0, 1] (a mixing weight), got {value}")
    return value
