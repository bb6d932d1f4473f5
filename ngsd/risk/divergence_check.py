"""The risk probe's divergence check: fit its operating point on the probe's validation split.

A request the probe scores in [check_above, route_below) is not routed on the probe's word alone:
its expert rows are prefilled, and it stays guarded when the expert's first next-token
distribution is at least `check_divergence` (total variation) away from the base's
(`ngsd.risk.estimate.RiskPlan.confirm`). The expert was trained to refuse harmful requests and to
follow the base elsewhere, so a large first-step divergence is the expert recognising a request
the probe missed.

Both numbers come from the probe's own validation split (training data only, the same split
`ngsd train-probe` used), never from an evaluation suite:

- check_divergence: the largest threshold that keeps `recall` (default 0.98, the probe's route
  recall) of the harmful validation requests at or above it (all single requests, plain or
  wrapped: the probe routes too few for the band alone to set it; not the composites, whose
  harmful request sits among benign ones that dilute the first step, and which the probe itself
  scores far above the band);
- check_above: the lowest risk such that the band holds at most `band_share` (default 0.25) of
  the benign validation requests the probe routes; a wider band guards more harmful requests
  and pays an expert prefill for more benign ones.

>>> fit_divergence_check([0.2, 1.0, 2.0, 0.1, 0.5, 3.0], [0.9, 0.95, 0.8, 0.1, 0.3, 0.2], [1, 1, 1, 0, 0, 0],
...                      route_below=2.5, recall=1.0, band_share=0.5)["check_divergence"]
0.8
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch

from ngsd_kernels import Divergence
from ngsd_kernels.reference import divergence_between

CHECK_REPORT_KEY = "divergence_check"


def total_variation(base_logits: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
    """[R] total variation between the rows' next-token distributions: the gate's TV divergence
    (`ngsd_kernels.reference.divergence_between`), at temperature 1."""
    log_pb = base_logits.float().log_softmax(-1)
    log_pe = expert_logits.float().log_softmax(-1).to(log_pb.device)
    return divergence_between(log_pb, log_pe, log_pb.exp(), log_pe.exp(), Divergence.TV)


def threshold_keeping(ascending: Sequence[float], recall: float) -> float:
    """The entry of a non-empty ascending list at 1-based rank ceil(n * (1 - recall)): at least `recall`
    of the entries lie at or above it (the rule every fitted check used; it errs towards keeping more).

    >>> threshold_keeping([0.1, 0.2, 0.3, 0.4], 0.5)
    0.2
    """
    return ascending[max(0, math.ceil(len(ascending) * (1 - recall)) - 1)]


def fit_divergence_check(risks: Sequence[float], divergences: Sequence[float], labels: Sequence[int], *,
                         route_below: float, recall: float = 0.98, band_share: float = 0.25,
                         sets_threshold: Sequence[bool] | None = None) -> dict[str, Any]:
    """check_above and check_divergence from validation risks, first-step divergences and labels (1 harmful).

    sets_threshold: which requests' divergences check_divergence is set on (default: every one).
    """
    if not len(risks) == len(divergences) == len(labels):
        raise ValueError("risks, divergences and labels must have one entry per validation request")
    sets_threshold = [True] * len(labels) if sets_threshold is None else list(sets_threshold)
    if len(sets_threshold) != len(labels):
        raise ValueError("sets_threshold must have one entry per validation request")
    if not 0.0 < recall <= 1.0 or not 0.0 < band_share <= 1.0:
        raise ValueError(f"recall and band_share must be in (0, 1], got {recall} and {band_share}")
    routed_benign = sorted(r for r, y in zip(risks, labels) if not y and r < route_below)
    if not routed_benign:
        raise ValueError("no benign validation request is routed: nothing to check")
    # the band [check_above, route_below) holds the riskiest band_share of the routed benign requests
    n, k = len(routed_benign), math.floor(band_share * len(routed_benign))
    check_above = route_below if k == 0 else 0.0 if k == n else (routed_benign[n - k - 1] + routed_benign[n - k]) / 2
    in_band = [(d, y) for r, d, y in zip(risks, divergences, labels) if check_above <= r < route_below]
    # the threshold is set on the harmful validation requests named (the band holds too few to set it alone)
    harmful_setting = sorted(d for d, y, use in zip(divergences, labels, sets_threshold) if y and use)
    check_divergence = threshold_keeping(harmful_setting, recall) if harmful_setting else 1.0
    harmful_in_band = [d for d, y in in_band if y]
    harmful_kept = sum(d >= check_divergence for d in harmful_in_band)
    benign_in_band = [d for d, y in in_band if not y]
    harmful_routed = sum(bool(y) and r < route_below for r, y in zip(risks, labels))
    return {
        "check_above": round(float(check_above), 4),
        "check_divergence": round(float(check_divergence), 4),
        "recall": recall,
        "band_share": band_share,
        "validation": {
            "harmful": sum(labels), "benign": len(labels) - sum(labels),
            "harmful_routed_by_probe": harmful_routed,
            "harmful_in_band": len(harmful_in_band),
            "harmful_in_band_kept_guarded": harmful_kept,
            "harmful_routed_after_check": harmful_routed - harmful_kept,
            "benign_routed_by_probe": len(routed_benign),
            "benign_in_band": len(benign_in_band),
            "benign_in_band_guarded": sum(d >= check_divergence for d in benign_in_band),
            "harmful_setting_the_threshold": len(harmful_setting),
            "harmful_divergence_share_at_or_above": round(sum(d >= check_divergence for d in harmful_setting)
                                                          / max(1, len(harmful_setting)), 4),
        },
    }


@torch.no_grad()
def first_step_divergence(model: Any, tokenizer: Any, texts: Sequence[str], expert: Any, *,
                          batch_size: int = 16) -> list[float]:
    """Total variation between the base's and the expert's first next-token distributions per request,
    each request in the chat template as `ngsd.generate` sends it. expert: a LoraAdapter or a model."""
    from ..api import encode_prompts
    from ..decoding.pair import positions_from_mask
    from ..experts.lora import LoraAdapter
    from ..experts.resolve import common_vocabulary_size

    adapter = expert if isinstance(expert, LoraAdapter) else None
    vocab = common_vocabulary_size(model, expert)  # as the loop's check sees them: head padding dropped
    out: list[float] = []
    with adapter.held(model) if adapter is not None else nullcontext():
        for start in range(0, len(texts), batch_size):
            ids, mask = encode_prompts(tokenizer, list(texts[start:start + batch_size]),
                                       device=next(model.parameters()).device)
            rows = ids.shape[0]
            if adapter is not None:
                with adapter.rows_from(rows):
                    both = torch.cat([ids, ids]), torch.cat([mask, mask])
                    logits = model(input_ids=both[0], attention_mask=both[1],
                                   position_ids=positions_from_mask(both[1])).logits[:, -1]
                base, other = logits[:rows], logits[rows:]
            else:
                positions = positions_from_mask(mask)
                base = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
                device = next(expert.parameters()).device
                other = expert(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device)).logits[:, -1]
            out += total_variation(base[:, :vocab], other[:, :vocab]).tolist()
    return out


@torch.no_grad()
def expert_openings(model: Any, tokenizer: Any, texts: Sequence[str], expert: Any, tokens: int, *,
                    batch_size: int = 16) -> list[str]:
    """The expert's own greedy answer to each request, `tokens` long, alone (in the chat template as
    `ngsd.generate` sends it): what `check_rollout` reads. expert: a LoraAdapter or a model."""
    from ..api import encode_prompts
    from ..experts.lora import LoraAdapter

    adapter = expert if isinstance(expert, LoraAdapter) else None
    answering = model if adapter is not None else expert
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    with adapter.held(model) if adapter is not None else nullcontext():
        for start in range(0, len(texts), batch_size):
            ids, mask = encode_prompts(tokenizer, list(texts[start:start + batch_size]),
                                       device=next(answering.parameters()).device)
            with adapter.rows_from(0) if adapter is not None else nullcontext():
                answer = answering.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
                                            pad_token_id=pad)
            out += tokenizer.batch_decode(answer[:, ids.shape[1]:], skip_special_tokens=True)
    return out


def fit_rollout(tokens: int, divergences: Sequence[float], labels: Sequence[int], in_band: Sequence[bool],
                single: Sequence[bool], check_divergence: float, opening_of, recall: float) -> dict[str, Any]:
    """Whether `check_rollout` = `tokens` keeps the check's recall: the single harmful validation requests the
    divergence keeps must refuse in their expert's opening (`opening_of(indices) -> texts`) at least `recall` of
    the time, else the rollout would route harmful requests and is switched off (check_rollout 0). Also counts
    the band's benign requests it would still guard."""
    from .estimate import opening_refuses

    kept = [i for i, (d, y, s) in enumerate(zip(divergences, labels, single)) if y and s and d >= check_divergence]
    band_benign = [i for i, (d, y, b) in enumerate(zip(divergences, labels, in_band))
                   if b and not y and d >= check_divergence]
    texts = opening_of(kept + band_benign)
    refusing = [opening_refuses(t) for t in texts]
    harmful_refusing = sum(refusing[:len(kept)])
    adopted = tokens if kept and harmful_refusing >= recall * len(kept) else 0
    return {"tokens": tokens, "check_rollout": adopted, "harmful_kept_by_divergence": len(kept),
            "their_openings_refuse": harmful_refusing, "band_benign_kept_by_divergence": len(band_benign),
            "band_benign_guarded_with_rollout": sum(refusing[len(kept):])}


def fit_probe_check(probe_dir: str | Path, *, model: Any, tokenizer: Any, expert: Any, expert_name: str,
                    data_dir: str | None = None, recall: float = 0.98, band_share: float = 0.25,
                    batch_size: int = 16, command: str | None = None, rollout: int | None = None,
                    log=print) -> dict[str, Any]:
    """Fit the divergence check of the probe in `probe_dir` for `expert` and write it into its probe.json
    (check_above, check_divergence, check_expert, check_rollout) and training_report.json (section
    "divergence_check"). rollout: the check_rollout to try (`fit_rollout`; None: the probe's own; 0: none)."""
    from dataclasses import replace

    from .probe import PROBE_FILE, REPORT_FILE, RiskProbe, estimate_risk
    from .probe_training import COMPOSED, training_split_of

    probe_dir = Path(probe_dir)
    probe = RiskProbe.load(probe_dir)
    if not probe.matches(model):  # its check would be fitted, and written into it, on another model's risks
        raise ValueError(f"the risk probe at {probe_dir} was trained on {probe.spec.model.get('name') or 'another model'} "
                         f"({probe.spec.model}), not on this model; fit its check with the model it was trained on "
                         "(--model), or train a probe for this one")
    # same architecture, other weights: warns (ProbeTrainedOnOtherWeights), the check is fitted on this model's risks
    probe.check_model(model, f"the risk probe at {probe_dir}")
    report_file = probe_dir / REPORT_FILE
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    examples, _, val = training_split_of(report.get("config", {}), data_dir)
    texts = [examples[i].text for i in val]
    labels = [examples[i].label for i in val]
    log(f"validation split: {len(val)} requests ({sum(labels)} harmful); probe risks ...")
    risks = estimate_risk(model, tokenizer, texts, probe, batch_size=batch_size)
    log("first-step divergences ...")
    divergences = first_step_divergence(model, tokenizer, texts, expert, batch_size=batch_size)
    single = [examples[i].wrapper != COMPOSED for i in val]
    fitted = fit_divergence_check(risks, divergences, labels, route_below=probe.route_below, recall=recall,
                                  band_share=band_share, sets_threshold=single)
    tokens = probe.spec.check_rollout if rollout is None else rollout
    if tokens:
        log(f"the expert's own {tokens}-token openings ...")
        in_band = [fitted["check_above"] <= r < probe.route_below for r in risks]
        fitted["rollout"] = fit_rollout(
            tokens, divergences, labels, in_band, single, fitted["check_divergence"],
            lambda rows: expert_openings(model, tokenizer, [texts[i] for i in rows], expert, tokens,
                                         batch_size=batch_size), recall)
        if not fitted["rollout"]["check_rollout"]:
            log(f"check_rollout off: the expert's opening refuses only {fitted['rollout']['their_openings_refuse']} of "
                f"the {fitted['rollout']['harmful_kept_by_divergence']} harmful validation requests the divergence keeps "
                f"(recall {recall} asked); the divergence alone decides")
    fitted["expert"] = expert_name
    fitted["command"] = command
    spec = replace(probe.spec, check_above=fitted["check_above"], check_divergence=fitted["check_divergence"],
                   check_expert=expert_name,
                   check_rollout=fitted["rollout"]["check_rollout"] if tokens else 0)
    (probe_dir / PROBE_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")  # what RiskProbe.save writes
    report[CHECK_REPORT_KEY] = fitted
    report_file.write_text(json.dumps(report, indent=2) + "\n")
    log(f"check_above {fitted['check_above']}, check_divergence {fitted['check_divergence']}: {fitted['validation']}")
    return fitted
