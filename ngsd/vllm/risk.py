"""The risk probe inside a guarded vLLM engine: each request decided as `ngsd.generate` decides it by default.

The library's default (`ngsd.risk.estimate`): the shipped probe scores every prompt token's hidden
state at its layer (token_max), the request's risk is the calibrated maximum, requests under
``check_above`` are routed (decoded unguarded), those in [check_above, route_below) are routed
only if the expert's first next-token distribution is within total variation ``check_divergence``
of the base's (else guarded), and the rest are guarded at the guarded alpha. Here:

- the wrapper model (`model.py`) asks vLLM's base Llama stack for the residual stream at the
  probe's layer (its EAGLE-3 auxiliary hidden states: hidden + residual, which is Hugging Face's
  ``hidden_states[layer]``), scores every token of the step (`EngineRisk.token_logits`) and leaves
  the scores, their positions and each request's token range (the attention metadata's
  ``query_start_loc``) for the processor (`ProbeTokens`, through `channel.py`);
- the processor keeps each undecided request's running maximum over its prompt positions only
  (chunked prefill spreads a prompt over steps; generated tokens do not count) and decides at the
  step that reaches the last prompt token, whose sample is the request's first real token
  (`observe`, `first_verdict`, `checked`); a decision is final (a preempted request recomputed later keeps it);
- the divergence check reads the raw base and expert logits of that step (before vLLM's own masks
  and biases, as the library reads them before its logits processors), computed in the wrapper's
  `compute_logits` for the undecided rows the processor names (`ExpertChannel.check_rows`);
- where the probe's look-ahead (`check_rollout`) must confirm a diverging request, the expert's own greedy
  opening is decoded then, beside the scheduler (`look_ahead.py`), and the request is routed unless it refuses.

Prefix caching would skip the forward of a cached prompt prefix, and with it those tokens' scores:
an engine with the probe on refuses it (`engine_kwargs` / `serve_args` switch it off).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..risk.estimate import ProbeVerdict, RiskPlan, assistant_opening, probe_plan, template_unchecked
from ..risk.probe import RiskProbe, is_probe_folder, shipped_probe_path
from .settings import GuardSettings

logger = logging.getLogger(__name__)
PROBE_MODES = ("ngsd", "open")  # the gate modes the library runs the probe for (plan_risk)


@dataclass
class ProbeTokens:
    """One step's probe scores, from the wrapper's forward to the processor."""

    logits: torch.Tensor  # [tokens] the probe's logistic logit of every token of the step (float32)
    positions: torch.Tensor  # [tokens] each token's position in its request
    starts: torch.Tensor  # [requests + 1] request i's tokens are starts[i]:starts[i + 1] (batch order)


def model_config_of(model: str) -> Any:
    """What the front end knows of `model`: its config.json as an object (with ``_name_or_path``) for a
    local folder, else the name itself (a hub id)."""
    from types import SimpleNamespace

    folder = Path(str(model)).expanduser()
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["_name_or_path"] = str(model)
        return SimpleNamespace(**data)
    return str(model)


def probe_folder(settings: GuardSettings, model_config: Any) -> Path | None:
    """The probe folder this engine decides requests with, or None (every request guarded at alpha).

    model_config: the engine's HF config (the worker), or what `model_config_of` gives (the front end).
    Raises where the settings ask for a probe that cannot run here.
    """
    mode = settings.config().mode
    if settings.risk == "off":
        return None
    if mode not in PROBE_MODES:
        if settings.risk == "probe" or settings.probe is not None:
            raise ValueError(f"ngsd risk='{settings.risk}' with a probe: the library runs the risk probe for gate "
                             f"modes {PROBE_MODES} only, and this engine's gate mode is {mode!r}; set risk='off'")
        return None
    if settings.probe is not None:
        folder = Path(settings.probe).expanduser()
        if not is_probe_folder(folder):
            raise FileNotFoundError(f"ngsd probe {settings.probe!r}: {folder} is not a risk-probe folder (probe.json "
                                    "and probe.safetensors; `ngsd train-probe` writes one)")
        probe = RiskProbe.load(folder)
        if probe.spec.aggregate != "token_max":
            raise ValueError(f"ngsd probe {settings.probe!r} pools its features (aggregate "
                             f"{probe.spec.aggregate!r}); the vLLM engine runs token_max probes only "
                             "(`ngsd train-probe --aggregate token_max`)")
        if not isinstance(model_config, str) and not probe.matches(model_config):
            raise ValueError(f"ngsd probe {settings.probe!r} was trained on another model ({probe.spec.model}); "
                             "train one for this model with `ngsd train-probe`")
        _check_weights(probe, model_config, f"ngsd probe {settings.probe!r}")
        return folder
    shipped = shipped_probe_path(model_config)
    if shipped is not None:
        _check_weights(RiskProbe.load(shipped), model_config, "the ngsd risk probe shipped for the default model")
    if settings.risk == "auto":
        # the shipped probe's check was fitted for the shipped expert: another expert keeps a fixed alpha
        return shipped if shipped is not None and _is_shipped_expert(settings.expert) else None
    if shipped is None:
        raise ValueError("ngsd risk='probe' needs a risk probe for this model, and none ships for it: train one with "
                         "`ngsd train-probe` and give probe=<folder>, or set risk='off' (every request at alpha)")
    return shipped


def _check_weights(probe: RiskProbe, model_config: Any, where: str) -> None:
    """Warn (`ProbeTrainedOnOtherWeights`) when the local model folder's weights are not the ones the probe was
    trained on (a fine-tune of its model); a hub id, or a folder without safetensors files, is not checked."""
    from ..risk.probe import folder_weight_samples

    if isinstance(model_config, str):
        return
    folder = Path(str(getattr(model_config, "_name_or_path", "") or ""))
    samples = folder_weight_samples(folder) if folder.is_dir() else None
    if samples is not None:
        probe.check_model(model_config, where, weights=samples)


def _is_shipped_expert(expert: str) -> bool:
    from ..experts.shipped import shipped_expert_path

    return expert == "shipped" or Path(expert).expanduser().resolve() == shipped_expert_path().resolve()


class EngineRisk:
    """The probe and the library's decision rules (`RiskPlan`) of one engine."""

    def __init__(self, folder: Path, settings: GuardSettings) -> None:
        self.folder = Path(folder)
        self.probe = RiskProbe.load(self.folder)
        if self.probe.spec.aggregate != "token_max":
            raise ValueError(f"ngsd: the vLLM engine runs token_max probes only; {folder} pools its features")
        self.layer = self.probe.spec.layers[0]
        config = settings.config()
        self.plan: RiskPlan = probe_plan(self.probe, settings.reflection_config(), mode=config.mode)
        if config.prime_divergence == "check" and self.plan.check_divergence is None:
            raise ValueError("ngsd gate prime_divergence='check' takes the risk probe's divergence check, and this "
                             f"engine has none (the probe at {folder} has no fitted check, or reflection switched "
                             "routing or the check off); give prime_divergence a number instead")
        self.start_potential = config.start_potential_for(self.plan.check_divergence)
        self.verdict_log = settings.verdict_log
        self.tokenizer = None  # with it, prompts outside the chat template are never routed (`use_tokenizer`)
        self.opening: str | None = None
        self.unchecked = template_unchecked(self.probe, None)

    def use_tokenizer(self, tokenizer: Any) -> None:
        """The engine's tokenizer: a prompt not ending with its chat template's opening of the assistant turn (raw
        text) is guarded whatever its risk, as in the library (the probe is calibrated on templated prompts)."""
        self.tokenizer, self.opening = tokenizer, assistant_opening(tokenizer)
        self.unchecked = template_unchecked(self.probe, tokenizer)

    def templated(self, prompt: Sequence[int]) -> bool:
        if self.unchecked is not None:  # as the library: no prompt can be shown templated, none is routed
            return False
        if self.opening is None:
            return True
        text = self.tokenizer.decode(list(prompt), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text.rstrip().endswith(self.opening)

    @classmethod
    def for_engine(cls, settings: GuardSettings, model_config: Any) -> "EngineRisk | None":
        folder = probe_folder(settings, model_config)
        return None if folder is None else cls(folder, settings)

    @property
    def checks(self) -> bool:
        """Whether some requests need the first-step divergence check."""
        return self.plan.check_divergence is not None

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[tokens, H] hidden states at the probe's layer -> [tokens]: `RiskProbe.token_logits` of every token."""
        if self.probe.mean.device != hidden.device:
            self.probe.to(hidden.device)
        every_token = torch.ones(1, hidden.shape[0], dtype=torch.long, device=hidden.device)
        return self.probe.token_logits(hidden[None], every_token)[0]

    def risk(self, max_logit: float) -> float:
        """A request's calibrated risk from its maximum token logit (`RiskProbe.risk` on the feature)."""
        return float(self.probe.risk(torch.tensor([[max_logit]], dtype=torch.float32, device=self.probe.mean.device)))

    def first_verdict(self, max_logit: float, prompt: Sequence[int]) -> tuple[ProbeVerdict, bool]:
        """The probe's verdict of a request and whether the divergence check must confirm it; `prompt`: its token
        ids, to tell a prompt outside the chat template (`use_tokenizer`, which decodes it)."""
        return self.plan.verdict_for(self.risk(max_logit), untemplated=not self.templated(prompt))

    def wants_opening(self, first: tuple[ProbeVerdict, bool], divergence: float | None) -> bool:
        """Whether `checked` reads this request's expert opening: the check confirms it, and its divergence would
        keep it guarded (`RiskPlan.looks_ahead`). The engine decodes those openings together first."""
        return first[1] and divergence is not None and self.plan.looks_ahead(divergence)

    def checked(self, first: tuple[ProbeVerdict, bool], divergence: float | None,
                opening: str | None = None) -> ProbeVerdict:
        """The request's verdict from its `first_verdict`; `divergence` (its first-step total variation) is read
        when the check needs it; `opening`: the expert's own greedy opening as text (`look_ahead.py`), read only
        where the plan's look-ahead (`check_rollout`) must confirm a diverging request (None: the divergence alone
        decides)."""
        verdict, check = first
        if check:
            if divergence is None:
                raise RuntimeError("ngsd: the divergence check needs this request's first-step divergence, and the "
                                   "model did not compute it (is compute_logits NGSDGuardedLlamaForCausalLM's?)")
            text = opening if self.plan.looks_ahead(divergence) else None
            verdict = self.plan.checked(verdict, divergence, text)
        return verdict

    def record(self, prompt: Sequence[int], verdict: ProbeVerdict, prompt_steps: int, floor: float | None = None,
               alpha: float | None = None, opening_prompt: str | None = None) -> None:
        """Log the probe's verdict; `floor`: the alpha the request asked for at least, `alpha`: the one it got;
        `opening_prompt`: where the look-ahead found the prompt of the request's expert opening ("paged cache":
        read from the expert's KV blocks; "run again": through the expert again, a longer stall)."""
        line = verdict_record(prompt, verdict, prompt_steps)
        if opening_prompt is not None:
            line["opening_prompt"] = opening_prompt
        logger.info("ngsd: request with %d prompt tokens (key %s): %s, alpha %s (%s)", line["prompt_tokens"],
                    line["prompt_key"], "routed" if verdict.routed else "guarded", verdict.alpha, verdict.reason)
        if floor is not None:
            line.update(request_floor=floor, guarded_alpha=alpha)
            logger.info("ngsd: the request asked for alpha %s at least: guarded at %s", floor, alpha)
        if self.verdict_log:
            try:
                with open(self.verdict_log, "a") as out:
                    out.write(json.dumps(line) + "\n")
            except OSError as error:  # a log that cannot be written must not take the engine (and every request) down
                logger.error("ngsd: cannot append to verdict_log %s (%s); serving goes on without it", self.verdict_log,
                             error)


def prompt_key(prompt: Sequence[int]) -> str:
    """A short key of a prompt's token ids, to find a request's line in the verdict log."""
    return hashlib.sha1(",".join(str(int(t)) for t in prompt).encode()).hexdigest()[:16]


def verdict_record(prompt: Sequence[int], verdict: ProbeVerdict, prompt_steps: int) -> dict[str, Any]:
    """One verdict-log line: the prompt's length and key, the steps its prompt spanned, and the verdict
    (`ProbeVerdict.to_dict`: risk, alpha, routed, divergence, reason...)."""
    return {"prompt_tokens": len(prompt), "prompt_key": prompt_key(prompt), "prompt_steps": prompt_steps,
            **verdict.to_dict()}


def observe(state: Any, logits: torch.Tensor, positions: torch.Tensor) -> bool:
    """Fold one step's tokens of an undecided request into its running maximum over prompt positions;
    True when the step reached its last prompt token (the decision is due now)."""
    length = len(state.prompt)
    prompt = positions < length
    if bool(prompt.any()):
        state.probe_max = max(state.probe_max, float(logits[prompt].max()))
        state.prompt_steps += 1
    return bool((positions == length - 1).any())
