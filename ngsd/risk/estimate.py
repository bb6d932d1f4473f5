"""Per-row risk and alpha for one guarded call, from whichever source the configuration names.

Before the prefill (`plan_risk`): an alpha given per call, `ReflectionConfig(mode="none")`'s
default, or self-reflection (the base model judges each request in extra forwards). With the
risk probe (`mode="probe"`, or `"auto"` when the model has one) the verdict comes after the
prefill instead (`RiskPlan.decide`): the probe reads the base rows' own hidden states of the
prompt, and rows under the routing threshold are decoded unguarded, without expert rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..config import NGSDConfig, ReflectionConfig
from ..decoding.arguments import per_row_alphas


@dataclass(frozen=True)
class ProbeVerdict:
    """The probe's verdict on one request, kept in the row's trace."""

    risk: float
    alpha: float
    routed: bool
    route_below: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"source": "probe", "risk": self.risk, "alpha": self.alpha, "routed": self.routed,
                "route_below": self.route_below}


@dataclass
class RiskPlan:
    """Alphas known before the prefill, or the probe that decides them after it."""

    alphas: list[float] | None
    verdicts: list[Any]
    probe: Any = None  # ngsd.risk.probe.RiskProbe
    route_below: float | None = None
    reflection: ReflectionConfig | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        """Hidden-state indices the prefill must capture for the probe."""
        return tuple(self.probe.spec.layers) if self.probe is not None else ()

    def decide(self, hidden_states: dict[int, torch.Tensor], attention_mask: torch.Tensor) -> list[int]:
        """Set alphas and verdicts from the probe; returns the rows to guard (all of them without routing)."""
        states = [hidden_states.get(i) for i in range(max(self.layers) + 1)]
        risks = self.probe.risk(self.probe.features(states, attention_mask)).tolist()
        alphas, verdicts, guarded = [], [], []
        for row, risk in enumerate(risks):
            routed = self.route_below is not None and risk < self.route_below
            if routed:
                alpha = 0.0
            elif self.route_below is not None and self.reflection.guarded_alpha is not None:
                alpha = self.reflection.guarded_alpha
            else:
                alpha = self.reflection.alpha_for_risk(risk)
            alphas.append(alpha)
            verdicts.append(ProbeVerdict(risk=float(risk), alpha=alpha, routed=routed, route_below=self.route_below))
            if not routed:
                guarded.append(row)
        self.alphas, self.verdicts = alphas, verdicts
        return guarded


def plan_risk(
    model: nn.Module,
    config: NGSDConfig,
    alpha: float | Sequence[float] | torch.Tensor | None,
    batch: int,
    tokenizer,
    requests: list[str] | None,
    input_ids: torch.Tensor,
    progress: bool = False,
) -> RiskPlan:
    if alpha is not None:  # checked in every mode, so a bad value never passes unnoticed
        # SafeDecoding's alpha scales the expert-minus-base difference (default 3): any finite value >= 0.
        alpha = per_row_alphas(alpha, batch, upper=None if config.mode == "safedecoding" else 1.0)
    if config.mode == "off":
        return RiskPlan([0.0] * batch, [None] * batch)
    if config.mode == "safedecoding":
        return RiskPlan(alpha or [config.safedecoding_alpha] * batch, [None] * batch)
    if alpha is not None:
        return RiskPlan(alpha, [None] * batch)
    reflection = config.reflection
    if reflection.mode == "none":
        return RiskPlan([reflection.default_alpha] * batch, [None] * batch)
    if reflection.mode in ("auto", "probe"):
        probe = load_probe(model, reflection)
        if probe is not None:
            route_below = (probe.route_below if reflection.route_below is None else reflection.route_below) \
                if reflection.route else None
            return RiskPlan(None, [None] * batch, probe=probe, route_below=route_below, reflection=reflection)
    if tokenizer is None:
        raise ValueError(
            "self-reflection needs the tokenizer (pass tokenizer=...), or pass alpha=... per request, "
            "or set ReflectionConfig(mode='none')"
        )
    from .reflection import reflect

    if requests is None:
        requests = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    generative = reflection if reflection.mode != "auto" else _as_generate(reflection)
    reflections = reflect(model, tokenizer, list(requests), generative, progress=progress)
    return RiskPlan([r.alpha for r in reflections], reflections)


def load_probe(model: nn.Module, reflection: ReflectionConfig):
    """The probe the configuration names, or the one shipped for `model`; None in "auto" mode without one."""
    from .probe import RiskProbe

    if reflection.probe is not None:
        probe = RiskProbe.load(reflection.probe)
        if not probe.matches(model):
            raise ValueError(
                f"the risk probe at {reflection.probe} was trained on another model "
                f"({probe.spec.model}); train one for this model with `ngsd train-probe`"
            )
    else:
        probe = _cached_probe_for(model)
    if probe is None and reflection.mode == "probe":
        raise ValueError(
            "ReflectionConfig(mode='probe') needs a risk probe for this model: none ships for it. Train one with "
            "`ngsd train-probe --model ...` and pass ReflectionConfig(probe=<folder>), or use mode='generate'"
        )
    if probe is not None:
        probe.to(next(model.parameters()).device)
    return probe


_PROBES: dict[str, Any] = {}


def _cached_probe_for(model: nn.Module):
    """The probe shipped for `model`, loaded once per folder."""
    from .probe import RiskProbe, shipped_probe_path

    path = shipped_probe_path(model)
    if path is None:
        return None
    if str(path) not in _PROBES:
        _PROBES[str(path)] = RiskProbe.load(path)
    return _PROBES[str(path)]


def _as_generate(reflection: ReflectionConfig) -> ReflectionConfig:
    from dataclasses import replace

    return replace(reflection, mode="generate")
