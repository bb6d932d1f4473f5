"""Configuration of guarded decoding: gate, mixture, reflection policy, mode. Validated on creation."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ngsd_kernels import CandidateMode, Divergence, GateMode, StepParams

MODES = ("ngsd", "safedecoding", "open", "off")
REFLECTION_MODES = ("auto", "probe", "generate", "prefill", "none")
ALL_ZERO_POLICIES = ("fail", "bump")
REFLECTION_PARSERS = ("robust", "published")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")


def _check_finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


MAX_CHECK_ROLLOUT = 64


def check_rollout_tokens(tokens: int | None, owner: str = "") -> None:
    """None, or the tokens of the expert's opening the divergence check reads: an int in 0..MAX_CHECK_ROLLOUT."""
    if tokens is None:
        return
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 0 <= tokens <= MAX_CHECK_ROLLOUT:
        raise ValueError(f"{owner}check_rollout must be a whole number of tokens in 0..{MAX_CHECK_ROLLOUT} (0: the "
                         f"divergence alone decides), got {tokens!r}")


def check_operating_point_bounds(check_above: float | None, check_divergence: float | None, owner: str = "") -> None:
    """The divergence check's operating point, each part None or in range: check_above a risk in
    [0, 10], check_divergence a total variation in [0, 1]."""
    for name, value, top in (("check_above", check_above, 10.0), ("check_divergence", check_divergence, 1.0)):
        if value is not None:
            _check_finite(owner + name, value)
            if not 0.0 <= value <= top:
                raise ValueError(f"{owner}{name} must be in [0, {top:g}] or None, got {value}")


@dataclass(frozen=True)
class ReflectionConfig:
    """How the base model's own risk judgement becomes a mixing strength alpha (spec section 2).

    mode: "auto" (default: "probe" when a risk probe exists for the model, else "generate"),
    "probe" (a trained classifier on the base model's own hidden states of the prompt, read from
    the prefill decoding runs anyway: spec section 2b), "generate" (the paper's self-reflection: a
    JSON answer at temperature 0), "prefill" (one prefill per dimension, the expected digit under
    the next-token distribution) or "none" (use `default_alpha`, or the alpha given per request).
    probe: folder of a trained probe (`ngsd train-probe`); None: the probe shipped for the model.
    route: with the probe, rows whose risk is below `route_below` decode unguarded: gate closed,
    no expert rows in the forward at all, so they cost what unguarded decoding costs.
    route_below: the routing threshold in risk units (0..10); None: the probe's own operating point.
    guarded_alpha: with routing, the alpha of every row the probe does not route (a row it cannot
    call harmless is guarded fully; the LIF gate still decides when to mix); None: the alpha its
    risk maps to through the thresholds below.
    check: with routing, check the requests the probe is least sure of before routing them: a
    request with `check_above` <= risk < `route_below` gets its expert prefill, and is guarded
    (at `guarded_alpha`, else `alpha_high`) when the expert's first-step next-token distribution
    is at least `check_divergence` (total variation) from the base's, routed otherwise. It only
    ever guards more rows. check_above / check_divergence: None takes the probe's own operating
    point (`ngsd train-probe` fits it for the expert it names); a probe without one checks nothing.
    check_rollout: with the check, a row whose divergence reaches `check_divergence` is guarded only if
    the expert's own greedy answer to it, this many tokens long, refuses (the default keyword judge's
    phrases); else it is routed. The expert answers in the prefill, before the row's first token, on a
    copy of its cache. None: the probe's own (`ngsd.risk.probe.ProbeSpec.check_rollout`); 0: the
    divergence alone decides. Needs the tokenizer (without it the divergence alone decides).
    all_zero: what four zero scores mean, "fail" (risk 10, a failed evaluation) or "bump" (S += 1).
    injection_risk: the lowest risk of a request that tries to dictate its own verdict (types the
    evaluator's delimiters or chat control tokens, writes scores, tells the evaluator to ignore its
    instructions; `ngsd.risk.reflection.injection_signals`); None trusts the model's scores.
    window_chars: a request longer than this is also judged in windows of at most this many
    characters, and its riskiest part decides (padding cannot dilute a harmful core); None: whole only.
    parser: how generated answers are read and combined: "robust" (forgiving small-model mistakes,
    `ngsd.risk.reflection.parse_scores`) or "published" (the paper's code, literally:
    `ngsd.risk.published`). `ReflectionConfig.paper()` is the paper's preset.
    """

    mode: str = "auto"
    probe: str | None = None
    route: bool = True
    route_below: float | None = None
    guarded_alpha: float | None = 0.9
    check: bool = True
    check_above: float | None = None
    check_divergence: float | None = None
    check_rollout: int | None = None
    max_new_tokens: int = 256
    long_request_chars: int = 2000
    long_request_bonus: int = 2
    all_zero: str = "fail"
    fallback_score: int = 7
    strong_dimension: int = 8
    strong_dimension_min_severity: int = 5
    high_risk_above: float = 6.0
    low_risk_below: float = 5.0
    alpha_high: float = 0.9
    alpha_mid: float = 0.5
    alpha_low: float = 0.1
    default_alpha: float = 0.5
    injection_risk: int | None = 10
    window_chars: int | None = 600
    parser: str = "robust"

    @classmethod
    def paper(cls, **changes: Any) -> "ReflectionConfig":
        """The paper's generative self-reflection as published: a greedy JSON answer of up to 256
        tokens, read by the published parser and rules, with no injection defences or windows.

        >>> ReflectionConfig.paper().parser
        'published'
        """
        preset = dict(mode="generate", parser="published", max_new_tokens=256, injection_risk=None, window_chars=None)
        return cls(**{**preset, **changes})

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "long_request_chars", "long_request_bonus", "fallback_score",
                     "strong_dimension", "strong_dimension_min_severity"):
            _check_int(name, getattr(self, name))
        if self.window_chars is not None:
            _check_int("window_chars", self.window_chars)
            if self.window_chars < 1:
                raise ValueError(f"window_chars must be >= 1 or None, got {self.window_chars}")
        if self.injection_risk is not None:
            _check_int("injection_risk", self.injection_risk)
            if not 0 <= self.injection_risk <= 10:
                raise ValueError(f"injection_risk must be in 0..10 or None, got {self.injection_risk}")
        for name in ("high_risk_above", "low_risk_below", "alpha_high", "alpha_mid", "alpha_low", "default_alpha"):
            _check_finite(name, getattr(self, name))
        if self.mode not in REFLECTION_MODES:
            hint = "; the paper's preset is ReflectionConfig.paper()" if self.mode == "paper" else ""
            raise ValueError(f"reflection mode must be one of {REFLECTION_MODES}, got {self.mode!r}{hint}")
        if self.parser not in REFLECTION_PARSERS:
            raise ValueError(f"reflection parser must be one of {REFLECTION_PARSERS}, got {self.parser!r}")
        if self.all_zero not in ALL_ZERO_POLICIES:
            raise ValueError(f"all_zero must be one of {ALL_ZERO_POLICIES}, got {self.all_zero!r}")
        if self.max_new_tokens < 8:
            raise ValueError(f"reflection max_new_tokens must be >= 8 to hold a JSON answer, got {self.max_new_tokens}")
        if not 0 <= self.fallback_score <= 10:
            raise ValueError(f"fallback_score must be in 0..10, got {self.fallback_score}")
        if self.route_below is not None:
            _check_finite("route_below", self.route_below)
            if not 0.0 <= self.route_below <= 10.0:
                raise ValueError(f"route_below must be a risk in [0, 10] or None, got {self.route_below}")
        if self.guarded_alpha is not None:
            _check_finite("guarded_alpha", self.guarded_alpha)
            if not 0.0 <= self.guarded_alpha <= 1.0:
                raise ValueError(f"guarded_alpha must be in [0, 1] (a mixing weight) or None, got {self.guarded_alpha}")
        if not isinstance(self.route, bool):
            raise TypeError(f"route must be True or False, got {self.route!r}")
        if not isinstance(self.check, bool):
            raise TypeError(f"check must be True or False, got {self.check!r}")
        check_operating_point_bounds(self.check_above, self.check_divergence)
        check_rollout_tokens(self.check_rollout)
        if self.probe is not None and not isinstance(self.probe, str):
            object.__setattr__(self, "probe", str(self.probe))
        if not self.low_risk_below <= self.high_risk_above:
            raise ValueError(
                f"low_risk_below ({self.low_risk_below}) must not exceed high_risk_above ({self.high_risk_above})"
            )
        for name in ("alpha_high", "alpha_mid", "alpha_low", "default_alpha"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (a mixing weight), got {value}")
        # scores and risks are 0..10: a rule outside that range, or one that guards a riskier request less, would
        # turn the worst requests into the least guarded ones
        for name, low, high in (("high_risk_above", 0, 10), ("low_risk_below", 0, 10), ("strong_dimension", 1, 10),
                                ("strong_dimension_min_severity", 0, 10), ("long_request_bonus", 0, 10),
                                ("long_request_chars", 1, None)):
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                bounds = f"in {low}..{high}" if high is not None else f">= {low}"
                raise ValueError(f"{name} must be {bounds}, got {value}")
        if not self.alpha_low <= self.alpha_mid <= self.alpha_high:
            raise ValueError(f"alphas must rise with risk: alpha_low <= alpha_mid <= alpha_high, got {self.alpha_low}, "
                             f"{self.alpha_mid}, {self.alpha_high}")
        if self.check_above is not None and self.route_below is not None and self.check_above > self.route_below:
            raise ValueError(f"check_above ({self.check_above}) must not exceed route_below ({self.route_below}): "
                             "the check covers risks in [check_above, route_below)")

    def alpha_for_risk(self, risk: float) -> float:
        if risk > self.high_risk_above:
            return self.alpha_high
        if risk < self.low_risk_below:
            return self.alpha_low
        return self.alpha_mid


@dataclass(frozen=True)
class NGSDConfig:
    """Everything that shapes one guarded `generate` call besides the sampling settings.

    mode: "ngsd" (LIF gate, union candidates), "safedecoding" (intersection candidates, mixing for
    the first `safedecoding_steps` tokens with `safedecoding_alpha`), "open" (always mix),
    "off" (plain base decoding through the same loop, for A/B runs).
    initial_potential: the potential a guarded row starts from; None (the spec) starts at `v_reset`.
    At `v_th` the neuron is *primed*: it fires at the first token whenever the two distributions
    differ by at least 1/tau (the divergence that keeps it firing when sustained), instead of only
    from the second or third token on, so a compliant first word of the base no longer passes unmixed.
    prime_divergence: instead of a potential, the first-step divergence at or above which a guarded
    row's gate fires at once: rows start at `(v_th - d) / (1 - 1/tau)`, kept within [v_reset, v_th]
    (so a value below `v_th / tau` primes fully, one above `v_th` not at all). "check" takes the risk
    probe's divergence check (`check_divergence`, fitted on training data for its expert): a row then
    mixes from its first token exactly when its expert disagrees as much as the check calls risky.

    >>> from ngsd import NGSDConfig
    >>> NGSDConfig(tau=4.0).tau
    4.0
    >>> NGSDConfig(rho=1.5)
    Traceback (most recent call last):
    ...
    ValueError: rho (soft-reset factor) must be in [0, 1), got 1.5
    """

    mode: str = "ngsd"
    tau: float = 8.0
    v_th: float = 1.0
    v_reset: float = 0.0
    rho: float = 0.6
    initial_potential: float | None = None
    prime_divergence: float | str | None = None
    candidate_k: int = 64
    divergence: str = "tv"
    safedecoding_alpha: float = 3.0
    safedecoding_steps: int = 2
    safedecoding_k: int = 10
    safedecoding_min_candidates: int = 5
    score_floor: float = 1e-8
    early_stop: bool = False
    backend: str = "auto"
    reflection: ReflectionConfig = field(default_factory=ReflectionConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.divergence not in ("tv", "kl", "js"):
            raise ValueError(f"divergence must be 'tv', 'kl' or 'js', got {self.divergence!r}")
        for name in ("tau", "v_th", "v_reset", "rho", "safedecoding_alpha", "score_floor"):
            _check_finite(name, getattr(self, name))
        for name in ("candidate_k", "safedecoding_steps", "safedecoding_k", "safedecoding_min_candidates"):
            _check_int(name, getattr(self, name))
        if not isinstance(self.early_stop, bool):
            raise TypeError(f"early_stop must be True or False, got {self.early_stop!r}")
        if not self.v_reset < self.v_th:
            raise ValueError(
                f"v_reset ({self.v_reset}) must be below v_th ({self.v_th}): a potential reset to the threshold "
                "would fire on every step"
            )
        if self.initial_potential is not None:
            _check_finite("initial_potential", self.initial_potential)
            if not self.v_reset <= self.initial_potential <= self.v_th:
                raise ValueError(
                    f"initial_potential must be in [v_reset, v_th] = [{self.v_reset}, {self.v_th}] (v_th primes the "
                    f"neuron to fire at the first divergent token), got {self.initial_potential}; None starts at v_reset"
                )
        if self.prime_divergence is not None:
            if self.initial_potential is not None:
                raise ValueError("give initial_potential or prime_divergence, not both: each sets where guarded "
                                 "rows start")
            if self.prime_divergence == "check" and self.divergence != "tv":
                raise ValueError(f"prime_divergence='check' compares against the probe's check_divergence, a total "
                                 f"variation: it needs divergence='tv', got {self.divergence!r}; give a number instead")
            if self.prime_divergence != "check":
                if isinstance(self.prime_divergence, str):
                    raise ValueError(f"prime_divergence must be a number, 'check' or None, "
                                     f"got {self.prime_divergence!r}")
                _check_finite("prime_divergence", self.prime_divergence)
                if not self.prime_divergence > 0.0:
                    raise ValueError(f"prime_divergence must be > 0 (a divergence that fires the gate), "
                                     f"got {self.prime_divergence}")
            if not self.tau > 1.0:
                raise ValueError(f"prime_divergence needs tau > 1: with tau = {self.tau} the potential does not "
                                 "carry over a step, so where it starts cannot matter")
        if not 0.0 < self.score_floor <= 1.0:  # as the step op's StepParams: 0 renormalises 0 / 0 on some rows
            raise ValueError(f"score_floor must be > 0 and <= 1 (a probability floor), got {self.score_floor}")
        if self.safedecoding_alpha < 0:
            raise ValueError(f"safedecoding_alpha must be >= 0 (it scales the expert-minus-base difference; a "
                             f"negative value pushes away from the expert), got {self.safedecoding_alpha}")
        if not self.tau >= 1.0:
            raise ValueError(f"tau must be >= 1 (the leak factor is 1 - 1/tau), got {self.tau}")
        if not self.v_th > 0.0:
            raise ValueError(f"v_th must be > 0, got {self.v_th}")
        if not 0.0 <= self.rho < 1.0:
            raise ValueError(f"rho (soft-reset factor) must be in [0, 1), got {self.rho}")
        for name in ("candidate_k", "safedecoding_k", "safedecoding_min_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.safedecoding_steps < 0:
            raise ValueError(f"safedecoding_steps must be >= 0, got {self.safedecoding_steps}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {self.backend!r}")
        if isinstance(self.reflection, dict):
            object.__setattr__(self, "reflection", ReflectionConfig(**self.reflection))
        if not isinstance(self.reflection, ReflectionConfig):
            raise TypeError(f"reflection must be a ReflectionConfig or a dict of its fields, got {self.reflection!r}")

    @property
    def start_potential(self) -> float:
        """The potential every row starts from: `initial_potential`, the one `prime_divergence` gives, else
        `v_reset` (the spec). With prime_divergence="check" use `start_potential_for` with the probe's check."""
        if self.prime_divergence == "check":
            raise ValueError("prime_divergence='check' starts where the risk probe's check_divergence says: "
                             "call start_potential_for(check_divergence)")
        return self.start_potential_for(None)

    def start_potential_for(self, check_divergence: float | None) -> float:
        """The start potential of guarded rows when the call's divergence check is `check_divergence`."""
        if self.prime_divergence is None:
            return float(self.v_reset if self.initial_potential is None else self.initial_potential)
        divergence = self.prime_divergence
        if divergence == "check":
            if check_divergence is None:
                raise ValueError(
                    "prime_divergence='check' needs the risk probe's divergence check, and this call has none (an "
                    "alpha given, no probe for the model, routing or the check switched off, or a probe without a "
                    "fitted check_divergence); give prime_divergence a number instead")
            divergence = check_divergence
        start = (self.v_th - float(divergence)) / (1.0 - 1.0 / self.tau)
        return float(min(self.v_th, max(self.v_reset, start)))

    @property
    def divergence_code(self) -> int:
        return int({"tv": Divergence.TV, "kl": Divergence.KL, "js": Divergence.JS}[self.divergence])

    def step_params(self, step: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> StepParams:
        """The step parameters of decode step `step` (0-based) with these sampling settings.

        They change with the step only in SafeDecoding mode (mixing for the first `safedecoding_steps`).
        """
        gate = {"open": GateMode.OPEN, "off": GateMode.CLOSED}.get(self.mode, GateMode.LIF)
        candidate_mode, candidate_k = CandidateMode.UNION, self.candidate_k
        if self.mode == "safedecoding":
            candidate_mode, candidate_k = CandidateMode.INTERSECTION, self.safedecoding_k
            gate = GateMode.OPEN if step < self.safedecoding_steps else GateMode.CLOSED
        return StepParams(
            tau=self.tau,
            v_th=self.v_th,
            v_reset=self.v_reset,
            rho=self.rho,
            candidate_k=candidate_k,
            candidate_mode=candidate_mode,
            min_candidates=self.safedecoding_min_candidates,
            divergence=self.divergence_code,
            gate=gate,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            score_floor=self.score_floor,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> "NGSDConfig":
        return replace(self, **changes)
