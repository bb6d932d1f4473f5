"""Per-row risk and alpha for one guarded call, from whichever source the configuration names.

Before the prefill (`plan_risk`): an alpha given per call, `ReflectionConfig(mode="none")`'s
default, or self-reflection (the base model judges each request in extra forwards). With the
risk probe (`mode="probe"`, or `"auto"` when the model has one) the verdict comes after the
prefill instead (`RiskPlan.decide`): the probe reads the base rows' own hidden states of the
prompt, and rows under the routing threshold are decoded unguarded, without expert rows. Rows
the probe is least sure of (risk in [check_above, route_below)) are checked first
(`RiskPlan.confirm`): their expert rows are prefilled with the guarded ones, and a row stays
guarded when the expert's first-step distribution diverges from the base's, else its expert
rows are dropped. With `check_rollout` a diverging row must also be refused by the expert's own
greedy opening (the expert answers alone, on a copy of its cache): a restyled answer is routed.
The check only adds guarded rows; nothing in it can unguard a row the probe guards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..caller_warning import warn_at_caller
from ..config import NGSDConfig, ReflectionConfig
from ..decoding.arguments import per_row_alphas
from .divergence_check import total_variation


def _apart(value: float, threshold: float, digits: int = 2) -> tuple[str, str]:
    """Both numbers at `digits` decimals, or at as many more (up to 6) as tell them apart: a risk of 4.5326 read
    "risk 4.53 < route_below 4.53" next to the shipped probe's 4.5327."""
    for places in range(digits, 7):
        shown = f"{value:.{places}f}", f"{threshold:.{places}f}"
        if shown[0] != shown[1] or value == threshold:
            return shown
    return shown


def opening_refuses(text: str) -> bool:
    """Whether the expert's own opening of an answer refuses (the default keyword judge's refusal phrases; an
    empty opening counts as one, so a row whose expert says nothing stays guarded)."""
    from ..eval.judge import DEFAULT_JUDGE

    return DEFAULT_JUDGE.is_refusal(text)


@dataclass(frozen=True)
class ProbeVerdict:
    """The probe's verdict on one request, kept in the row's trace."""

    risk: float
    alpha: float
    routed: bool
    route_below: float | None
    check_above: float | None = None
    divergence: float | None = None  # first-step total variation, for the rows the check looked at
    check_divergence: float | None = None
    untemplated: bool = False  # the prompt is not in the chat template the probe was calibrated on: never routed
    expert_opening: str | None = None  # the expert's own greedy opening, for the rows the check let it answer
    opening_refuses: bool | None = None

    @property
    def reason(self) -> str:
        """Why the row took its route, in words."""
        if self.untemplated:
            return ("prompt not in the model's chat template (the probe's routing is calibrated on templated prompts): "
                    "guarded")
        if self.route_below is None:
            return "no routing: every row guarded"
        if not self.routed and self.divergence is None:
            risk, limit = _apart(self.risk, self.route_below)
            return f"risk {risk} >= route_below {limit}"
        if self.divergence is None:
            name, threshold = (("check_above", self.check_above) if self.check_above is not None
                               else ("route_below", self.route_below))
            risk, limit = _apart(self.risk, threshold)
            return f"risk {risk} < {name} {limit}"
        relation = ">=" if not self.routed or self.opening_refuses is not None else "<"
        divergence, limit = _apart(self.divergence, self.check_divergence, digits=3)
        reason = (f"risk {self.risk:.2f} in [check_above, route_below): first-step divergence "
                  f"{divergence} {relation} check_divergence {limit}")
        if self.opening_refuses is None:
            return reason
        return reason + (", and the expert's own opening refuses" if self.opening_refuses
                         else ", but the expert's own opening does not refuse")

    def to_dict(self) -> dict[str, Any]:
        return {"source": "probe", "risk": self.risk, "alpha": self.alpha, "routed": self.routed,
                "route_below": self.route_below, "check_above": self.check_above, "divergence": self.divergence,
                "check_divergence": self.check_divergence, "untemplated": self.untemplated,
                "expert_opening": self.expert_opening, "opening_refuses": self.opening_refuses, "reason": self.reason}


@dataclass
class RiskPlan:
    """Alphas known before the prefill, or the probe that decides them after it."""

    alphas: list[float] | None
    verdicts: list[Any]
    probe: Any = None  # ngsd.risk.probe.RiskProbe
    route_below: float | None = None
    reflection: ReflectionConfig | None = None
    check_above: float | None = None  # with check_divergence: the divergence check (None: no check)
    check_divergence: float | None = None
    to_check: list[int] = field(default_factory=list)
    check_rollout: int = 0  # tokens of the expert's own opening that a diverging checked row must refuse in (0: none)
    untemplated: frozenset[int] = frozenset()  # rows whose prompt is not in the chat template: never routed

    @property
    def layers(self) -> tuple[int, ...]:
        """Hidden-state indices the prefill must capture for the probe."""
        return tuple(self.probe.spec.layers) if self.probe is not None else ()

    def decide(self, hidden_states: dict[int, torch.Tensor], attention_mask: torch.Tensor) -> list[int]:
        """Set alphas and verdicts from the probe; returns the rows to prefill expert rows for: the
        guarded ones (all of them without routing) and the ones to check (`to_check`, see `confirm`)."""
        states = [hidden_states.get(i) for i in range(max(self.layers) + 1)]
        risks = self.probe.risk(self.probe.features(states, attention_mask)).tolist()
        alphas, verdicts, guarded, self.to_check = [], [], [], []
        for row, risk in enumerate(risks):
            verdict, check = self.verdict_for(risk, untemplated=row in self.untemplated)
            if check:
                self.to_check.append(row)
            alphas.append(verdict.alpha)
            verdicts.append(verdict)
            if not verdict.routed:
                guarded.append(row)
        self.alphas, self.verdicts = alphas, verdicts
        return sorted(guarded + self.to_check)

    def verdict_for(self, risk: float, untemplated: bool = False) -> tuple[ProbeVerdict, bool]:
        """One request's verdict from its risk, and whether the divergence check must confirm it (`checked`).
        `untemplated`: the prompt is not in the chat template, where the probe's risk is not calibrated: the row
        is guarded as a risky one, whatever its risk."""
        if untemplated and self.route_below is not None:
            return ProbeVerdict(risk=float(risk), alpha=self._risky_alpha(), routed=False, route_below=self.route_below,
                                check_above=self.check_above, untemplated=True), False
        routed = self.route_below is not None and risk < self.route_below
        check = routed and self.check_above is not None and risk >= self.check_above
        alpha = 0.0 if routed else self.guarded_alpha(risk)
        return ProbeVerdict(risk=float(risk), alpha=alpha, routed=routed, route_below=self.route_below,
                            check_above=self.check_above), check

    def _risky_alpha(self) -> float:
        return self.reflection.guarded_alpha if self.reflection.guarded_alpha is not None else self.reflection.alpha_high

    def checked(self, verdict: ProbeVerdict, divergence: float, opening: str | None = None) -> ProbeVerdict:
        """A checked request's verdict given its first-step total variation: guarded (at the guarded alpha of
        a risky row) when the divergence reaches check_divergence, else routed as the probe said. `opening`:
        the expert's own greedy opening of a diverging row (`check_rollout`), which must then also refuse."""
        guard = not divergence < self.check_divergence  # NaN fails closed: guarded, and the step then reports it
        refuses = None
        if guard and opening is not None and math.isfinite(divergence):
            refuses = opening_refuses(opening)
            guard = refuses
        high = self._risky_alpha()
        return replace(verdict, alpha=high if guard else verdict.alpha, routed=not guard, divergence=float(divergence),
                       check_divergence=self.check_divergence, expert_opening=opening, opening_refuses=refuses)

    def guarded_alpha(self, risk: float) -> float:
        if self.route_below is not None and self.reflection.guarded_alpha is not None:
            return self.reflection.guarded_alpha
        return self.reflection.alpha_for_risk(risk)

    @property
    def checked_alpha(self) -> float:
        """The alpha of a checked row the check keeps guarded (that of a risky row)."""
        return self._risky_alpha()

    def looks_ahead(self, divergence: float) -> bool:
        """Whether a checked row of this first-step divergence needs the expert's own opening: a look-ahead is set
        and the divergence alone would keep the row guarded (the opening can then route it)."""
        return bool(self.check_rollout) and divergence >= self.check_divergence

    def will_look_ahead(self, rows: torch.Tensor, base_logits: torch.Tensor, expert_logits: torch.Tensor) -> bool:
        """Whether `confirm` will ask for expert openings: a look-ahead is set and a checked row diverges."""
        if not (self.to_check and self.check_rollout):
            return False
        return any(self.looks_ahead(value) for value in self._check_divergences(rows, base_logits, expert_logits))

    def _check_divergences(self, rows: torch.Tensor, base_logits: torch.Tensor, expert_logits: torch.Tensor
                           ) -> list[float]:
        """First-step total variation of each checked row (`to_check` order)."""
        position = {row: j for j, row in enumerate(rows.tolist())}
        checked = torch.tensor([position[row] for row in self.to_check], dtype=torch.long, device=expert_logits.device)
        base = base_logits[torch.tensor(self.to_check, device=base_logits.device)]
        return total_variation(base, expert_logits[checked]).tolist()

    def confirm(self, rows: torch.Tensor, base_logits: torch.Tensor, expert_logits: torch.Tensor,
                openings: Callable[[torch.Tensor, torch.Tensor], list[str]] | None = None) -> list[int]:
        """After the expert prefill of `rows` (= `decide`'s rows; `expert_logits` their first-step logits,
        `base_logits` the whole batch's): the rows to keep guarded. A checked row joins them, at the
        guarded alpha of a risky row, when its first-step total variation reaches check_divergence and,
        with `check_rollout` tokens and `openings` (positions in `rows`, their first-step logits -> the
        expert's own greedy openings as text), when the expert's own opening refuses the request."""
        if not self.to_check:
            return rows.tolist()
        position = {row: j for j, row in enumerate(rows.tolist())}
        divergence = self._check_divergences(rows, base_logits, expert_logits)
        texts: dict[int, str] = {}
        if self.check_rollout and openings is not None:
            # only rows the divergence would guard: the expert's own answer can then route them
            diverging = [row for row, value in zip(self.to_check, divergence) if self.looks_ahead(value)]
            if diverging:
                index = torch.tensor([position[row] for row in diverging], dtype=torch.long, device=expert_logits.device)
                texts = dict(zip(diverging, openings(index, expert_logits[index])))
        keep = set(rows.tolist()) - set(self.to_check)
        for row, value in zip(self.to_check, divergence):
            self.verdicts[row] = self.checked(self.verdicts[row], value, texts.get(row))
            self.alphas[row] = self.verdicts[row].alpha
            if not self.verdicts[row].routed:
                keep.add(row)
        return sorted(keep)


def plan_risk(
    model: nn.Module,
    config: NGSDConfig,
    alpha: float | Sequence[float] | torch.Tensor | None,
    batch: int,
    tokenizer,
    requests: list[str] | None,
    input_ids: torch.Tensor,
    progress: bool = False,
    attention_mask: torch.Tensor | None = None,
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
            plan = probe_plan(probe, reflection, batch, config.mode)
            unchecked = template_unchecked(probe, tokenizer) if plan.route_below is not None else None
            if unchecked is not None:
                plan.untemplated = frozenset(range(batch))
                warn_at_caller(
                    f"the risk probe routes only chat-templated prompts, and {unchecked}, so every row is guarded; pass "
                    "the model's tokenizer (tokenizer= to ngsd.apply or generate) to route the harmless ones unguarded",
                    UserWarning)
            elif plan.route_below is not None and tokenizer is not None:
                plan.untemplated = frozenset(untemplated_rows(tokenizer, input_ids, attention_mask))
                if plan.untemplated:
                    warn_at_caller(
                        f"{len(plan.untemplated)} of {batch} prompts are not in the model's chat template; the risk "
                        "probe's routing is calibrated on templated prompts, so they are guarded whatever their risk. "
                        "Encode prompts with the chat template (ngsd.generate(chat=True), "
                        "tokenizer.apply_chat_template) to route the harmless ones", UserWarning)
            return plan
    if tokenizer is None:
        raise ValueError(
            "self-reflection needs the tokenizer (pass tokenizer=...), or pass alpha=... per request, "
            "or set ReflectionConfig(mode='none')"
        )
    from .reflection import reflect

    if requests is None:
        requests = requests_of(tokenizer, input_ids, attention_mask)
    generative = reflection if reflection.mode != "auto" else _as_generate(reflection)
    reflections = reflect(model, tokenizer, list(requests), generative, progress=progress)
    return RiskPlan([r.alpha for r in reflections], reflections)


_REQUEST_SLOT = "NGSD_REQUEST_SLOT_5f2c"


def requests_of(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
    """Each prompt's user request, as self-reflection reads it (spec section 2: the long-request rule measures the raw
    request, not a chat-templated text): the text between the tokenizer's chat-template prefix and suffix where the
    prompt is one user turn of that template, else the prompt decoded without special tokens."""
    rows = list(input_ids) if attention_mask is None else [ids[m.bool()] for ids, m in zip(input_ids, attention_mask)]
    plain = tokenizer.batch_decode(rows, skip_special_tokens=True)
    around = _template_around_request(tokenizer)
    if around is None:
        return plain
    prefix, suffix = around
    requests = []
    for text, fallback in zip(tokenizer.batch_decode(rows, skip_special_tokens=False,
                                                     clean_up_tokenization_spaces=False), plain):
        one_turn = text.startswith(prefix) and text.endswith(suffix) and len(text) >= len(prefix) + len(suffix)
        requests.append(text[len(prefix):len(text) - len(suffix)] if one_turn else fallback)
    return requests


def untemplated_rows(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[int]:
    """Rows whose prompt does not end with the chat template's opening of the assistant's turn (raw text, e.g.
    ``ngsd.generate(chat=False)`` or ``tokenizer(text)`` ids): the probe was trained and calibrated on templated
    prompts only. None of them for a tokenizer without a chat template (its probe reads plain text)."""
    opening = assistant_opening(tokenizer)
    if opening is None:
        return []
    rows = list(input_ids) if attention_mask is None else [ids[m.bool()] for ids, m in zip(input_ids, attention_mask)]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return [row for row, text in enumerate(texts) if not text.rstrip().endswith(opening)]


def template_unchecked(probe, tokenizer) -> str | None:
    """Why no prompt can be shown to be chat-templated, for a probe calibrated on templated prompts only
    (`ProbeSpec.chat_template`): no tokenizer, or one without a chat template (raw `tokenizer(text)` ids would be
    routed as if templated, and the probe routes raw harmful text far more often). None: each row can be checked
    (`untemplated_rows`), or the probe reads plain text. The library and the vLLM engine (`EngineRisk`) share it."""
    if not probe.spec.chat_template:
        return None
    if tokenizer is None:
        return "without the tokenizer ngsd cannot check the template"
    if not getattr(tokenizer, "chat_template", None):
        return "this tokenizer has no chat template"
    return None


def assistant_opening(tokenizer) -> str | None:
    """The text a chat-templated prompt ends with: what follows the user's turn up to the assistant's answer (a custom
    system prompt or earlier turns change the start, never this end); None without a chat template."""
    around = _template_around_request(tokenizer)
    if around is None:
        return None
    return around[1].strip() or None


def _template_around_request(tokenizer) -> tuple[str, str] | None:
    """The chat template's text before and after one user request (None without a template, or one that drops it)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _REQUEST_SLOT}], tokenize=False,
                                             add_generation_prompt=True)
    prefix, found, suffix = rendered.partition(_REQUEST_SLOT)
    return (prefix, suffix) if found else None


def probe_plan(probe, reflection: ReflectionConfig, batch: int = 0, mode: str = "ngsd") -> RiskPlan:
    """The plan of a call the probe decides: its routing threshold and divergence check from `reflection`,
    else the probe's own (also what a vLLM engine decides each request by, `ngsd.vllm.risk`). `mode`: the
    gate's; forced open ("always mix"), the probe sets the alphas and routes no row."""
    if mode == "open":
        reflection = replace(reflection, route=False)
    route_below = (probe.route_below if reflection.route_below is None else reflection.route_below) \
        if reflection.route else None
    check_above, check_divergence = divergence_check(probe, reflection, route_below)
    rollout = probe.spec.check_rollout if reflection.check_rollout is None else reflection.check_rollout
    return RiskPlan(None, [None] * batch, probe=probe, route_below=route_below, reflection=reflection,
                    check_above=check_above, check_divergence=check_divergence,
                    check_rollout=rollout if check_divergence is not None else 0)


def divergence_check(probe, reflection: ReflectionConfig, route_below: float | None
                     ) -> tuple[float | None, float | None]:
    """(check_above, check_divergence) of the call: the configuration's, else the probe's; (None, None)
    without routing, with `check=False`, when either is unknown, or when the band is empty."""
    if route_below is None or not reflection.check:
        return None, None
    if reflection.check_above is not None and reflection.check_above > route_below:
        # refused as ReflectionConfig refuses it when route_below is given (it was dropped without a word)
        raise ValueError(f"check_above ({reflection.check_above}) must not exceed route_below ({route_below}, the "
                         "probe's own): the check's band [check_above, route_below) would be empty; lower check_above "
                         "or set check=False")
    above = reflection.check_above if reflection.check_above is not None else probe.spec.check_above
    divergence = reflection.check_divergence if reflection.check_divergence is not None else probe.spec.check_divergence
    if above is None or divergence is None or above >= route_below:
        return None, None
    return float(above), float(divergence)


class CheckFittedForAnotherExpert(UserWarning):
    """The probe's divergence check was fitted for another expert than the one decoding now."""


def expert_name(expert: Any) -> str:
    """The folder name an expert was loaded from ("" when unknown): what `ngsd train-probe` records as check_expert."""
    source = getattr(expert, "source", "") or getattr(getattr(expert, "config", None), "name_or_path", "") or ""
    return Path(str(source)).name if source else ""


def check_fitted_for_another_expert(plan: "RiskPlan", expert: Any) -> str | None:
    """The name of the expert the probe's own check_divergence was fitted for, when that is not `expert`; None
    when the names match, when either is unknown, when the plan runs no check, or when the call sets
    check_divergence itself (what `warn_if_check_fitted_for_another_expert` warns of, and `ngsd eval` reports)."""
    if plan.probe is None or plan.check_divergence is None or plan.reflection is None:
        return None
    # `ngsd train-probe --expert PATH` records the path as given; the folder's name is what identifies it
    fitted_for, running = Path(plan.probe.spec.check_expert).name, expert_name(expert)
    if plan.reflection.check_divergence is not None or not fitted_for or not running or fitted_for == running:
        return None
    return fitted_for


def warn_if_check_fitted_for_another_expert(plan: "RiskPlan", expert: Any) -> None:
    """Warn when the probe's own check_divergence was fitted for an expert other than `expert`.

    The threshold is a total variation of one expert's first step: another expert diverges more or
    less, so the check guards more or fewer rows than it was fitted to (measured: 0.41 for the
    shipped expert v4c, 0.71 for a broader one, reports/expert/REPORT_v10_default.md). Silent only when the
    names match, when either is unknown, or when the call sets check_divergence itself.
    """
    fitted_for = check_fitted_for_another_expert(plan, expert)
    if fitted_for is None:
        return
    running = expert_name(expert)
    warn_at_caller(
        f"the risk probe's divergence check (check_divergence {plan.check_divergence:.4f}) was fitted for the expert "
        f"{fitted_for!r}, but this call decodes with {running!r}: it may guard more or fewer rows than intended. Fit "
        f"one for this expert with `ngsd train-probe --check-only --expert <its folder> --out <a copy of the probe>` "
        f"and pass ReflectionConfig(probe=<that copy>), or set ReflectionConfig(check_divergence=...)",
        CheckFittedForAnotherExpert)


def load_probe(model: nn.Module, reflection: ReflectionConfig):
    """The probe the configuration names, or the one shipped for `model`; None in "auto" mode without one."""
    from .probe import RiskProbe

    if reflection.probe is not None:
        probe = RiskProbe.load(reflection.probe)
        # another architecture: ValueError; same architecture, other weights (a fine-tune): ProbeTrainedOnOtherWeights
        probe.check_model(model, f"the risk probe at {reflection.probe}")
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
    probe = _PROBES[str(path)]
    if not _named_as_hub_checkpoint(model):
        # named like the default model, but its weights may have been changed in memory (a merged fine-tune)
        probe.check_model(model, f"the risk probe shipped for {probe.spec.model.get('name') or 'the default model'}")
    return probe


def _named_as_hub_checkpoint(model: nn.Module) -> bool:
    """A model loaded from the hub checkpoint of the default model: the original weights, which the shipped probe's
    GGUF (Q4_1) weights were quantised from, so they differ from its fingerprint by design."""
    from ..loading import DEFAULT_HUB_ID

    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return name.strip().lower() == DEFAULT_HUB_ID.lower()


def _as_generate(reflection: ReflectionConfig) -> ReflectionConfig:
    from dataclasses import replace

    return replace(reflection, mode="generate")
