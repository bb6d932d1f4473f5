"""Could the divergence check read a better signal than the first-step total variation? (training side only)

On the shipped probe's validation split (`training_split_of` its training report; no evaluation set),
decode K tokens with the base alone (greedy), then run base and shipped expert over the prompt plus
those tokens and record, per request: the TV at each of steps 1..K along the base's path, KL both
ways and the expert's and the base's step-1 probability of a refusal opener (`refusal_openers`: the tokens that
open the expert's own refusal examples and not its benign ones). Each signal's
threshold is set the way `fit_divergence_check` sets it (the value that keeps `recall` of the single
harmful requests at or above it); the summary counts the benign requests in the check's band that
it would still guard, and the harmful ones in the band it keeps.

    python bench/probe_check_signals.py --threads 2       # ~17 min on 2 threads; writes bench/results/probe_check_signals.json
    python bench/probe_check_signals.py --steps 1 --out bench/results/probe_check_signals_step1.json  # step 1 only
    python bench/probe_check_signals.py --steps 1 --rollout 8 --out bench/results/probe_check_rollout.json

`--rollout K` also lets the expert answer each request alone, greedily, for K tokens, and records whether
that opening refuses (the keyword judge): does the expert itself refuse the benign requests the check
keeps guarded, or does the first-step divergence mistake a restyled answer for a refusal?
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ngsd.risk.divergence_check import threshold_keeping


def _first_steps(o: dict, steps: int) -> list[float]:
    """The TV of the first `steps` steps; IndexError when the run decoded fewer (the signal is then skipped)."""
    if len(o["tv"]) < steps:
        raise IndexError(f"{steps} steps asked, {len(o['tv'])} decoded")
    return o["tv"][:steps]


SIGNALS = {
    "tv_step1 (shipped)": lambda o: o["tv"][0],
    "tv_step2": lambda o: o["tv"][1],
    "tv_step3": lambda o: o["tv"][2],
    "tv_step4": lambda o: o["tv"][3],
    "tv_mean_steps1-2": lambda o: sum(_first_steps(o, 2)) / 2,
    "tv_max_steps1-4": lambda o: max(_first_steps(o, 4)),
    "tv_mean_steps1-4": lambda o: sum(_first_steps(o, 4)) / 4,
    "kl_expert_base": lambda o: o["kl_eb"],
    "kl_base_expert": lambda o: o["kl_be"],
    # refusal openers: the first answer tokens of the expert's own refusal examples (see `refusal_openers`)
    "expert_opener_mass": lambda o: o["opener_e"],
    "opener_mass_gain": lambda o: o["opener_e"] - o["opener_b"],
    # with --rollout: 1 when the expert's own greedy opening refuses
    "expert_opening_refuses": lambda o: float(o["expert_refuses"]),
}


def refusal_openers(examples_file: Path, tokenizer: Any, min_share: float = 0.05) -> list[int]:
    """Token ids that open at least `min_share` of the expert's refusal examples (those without a prefix) and
    open fewer of its benign examples than that: what the expert says first when it refuses."""
    from collections import Counter

    from ngsd.experts.training.examples import load_examples

    rows = load_examples(examples_file, tokenizer=tokenizer)  # data texts saved by name come back from NGSD_DATA_DIR
    firsts = {kind: Counter(r.response_ids[0] for r in rows if r.kind == kind and not r.prefix_ids
                            and r.response_ids) for kind in ("refusal", "benign")}
    refusals, benign = sum(firsts["refusal"].values()), max(1, sum(firsts["benign"].values()))
    return sorted(t for t, n in firsts["refusal"].items()
                  if n >= min_share * refusals and firsts["benign"][t] < min_share * benign)


def summarise(rows: list[dict], route_below: float, check_above: float, check_divergence: float,
              recalls=(0.98, 0.95)) -> dict:
    single_harmful = [o for o in rows if o["label"] == 1 and o["wrapper"] != "multi_request"]
    band = [o for o in rows if check_above <= o["risk"] < route_below]
    band_benign, band_harmful = [o for o in band if not o["label"]], [o for o in band if o["label"]]
    out = {"single_harmful": len(single_harmful), "band_benign": len(band_benign), "band_harmful": len(band_harmful),
           "signals": {}}
    for name, signal in SIGNALS.items():
        try:
            values = sorted(signal(o) for o in single_harmful)
        except (IndexError, KeyError):  # a run with fewer steps, or raw signals from before this signal existed
            continue
        for recall in recalls:
            threshold = threshold_keeping(values, recall)
            out["signals"][f"{name} @ recall {recall}"] = {
                "threshold": round(threshold, 4),
                "band_benign_guarded": sum(signal(o) >= threshold for o in band_benign),
                "band_harmful_kept": sum(signal(o) >= threshold for o in band_harmful)}
    if all("expert_refuses" in o for o in rows):
        kept_by_tv = [o for o in band_benign if o["tv"][0] >= check_divergence]
        out["expert_opening_refuses"] = {
            "single_harmful": sum(o["expert_refuses"] for o in single_harmful),
            "band_benign": sum(o["expert_refuses"] for o in band_benign),
            "band_benign_kept_by_the_shipped_check": len(kept_by_tv),
            "of_those_the_expert_refuses": sum(o["expert_refuses"] for o in kept_by_tv)}
    return out


@torch.no_grad()
def signals(model, tokenizer, adapter, texts: list[str], steps: int, openers: list[int],
            batch_size: int = 16) -> list[dict]:
    from ngsd.api import encode_prompts
    from ngsd.decoding.pair import positions_from_mask
    from ngsd_kernels import Divergence
    from ngsd_kernels.reference import divergence_between
    from ngsd.risk.divergence_check import total_variation

    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask = encode_prompts(tokenizer, texts[start:start + batch_size])
        rows = ids.shape[0]
        for _ in range(steps - 1):  # the base's own greedy path (no cache: a short, one-off analysis)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        adapter.attach(model)
        try:
            with adapter.rows_from(rows):
                both, both_mask = torch.cat([ids, ids]), torch.cat([mask, mask])
                logits = model(input_ids=both, attention_mask=both_mask,
                               position_ids=positions_from_mask(both_mask)).logits[:, -steps:]
        finally:
            adapter.detach(model)
        base, expert = logits[:rows].float(), logits[rows:].float()
        tv = total_variation(base.flatten(0, 1), expert.flatten(0, 1)).view(rows, steps)
        log_b, log_e = base[:, 0].log_softmax(-1), expert[:, 0].log_softmax(-1)
        kl_eb = divergence_between(log_e, log_b, log_e.exp(), log_b.exp(), Divergence.KL)
        kl_be = divergence_between(log_b, log_e, log_b.exp(), log_e.exp(), Divergence.KL)
        opener_b, opener_e = (log[:, openers].exp().sum(-1) for log in (log_b, log_e))
        out += [{"tv": tv[r].tolist(), "kl_eb": float(kl_eb[r]), "kl_be": float(kl_be[r]),
                 "opener_b": float(opener_b[r]), "opener_e": float(opener_e[r])} for r in range(rows)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rollout", type=int, default=0,
                        help="also let the expert answer K tokens alone and record whether it refuses (0: no)")
    parser.add_argument("--raw", default=None, help="per-request signals: read them from here if it exists, else write")
    parser.add_argument("--out", default="bench/results/probe_check_signals.json")
    args = parser.parse_args(argv)

    from ngsd.risk.probe import RiskProbe, shipped_probe_path

    probe = RiskProbe.load(shipped_probe_path(None))
    started, load_before = time.time(), os.getloadavg()
    if args.raw and Path(args.raw).is_file():
        rows = json.loads(Path(args.raw).read_text())
    else:
        from ngsd.experts.lora import LoraAdapter
        from ngsd.experts.shipped import shipped_expert_path
        from ngsd.loading import load_model
        from ngsd.risk.probe import REPORT_FILE, estimate_risk
        from ngsd.risk.probe_training import training_split_of

        torch.set_num_threads(args.threads)
        report = json.loads((shipped_probe_path(None) / REPORT_FILE).read_text())
        examples, _, val = training_split_of(report["config"])
        held = [examples[i] for i in val]
        texts = [e.text for e in held]
        model, tokenizer = load_model(None)
        risks = estimate_risk(model, tokenizer, texts, probe)
        openers = refusal_openers(shipped_expert_path() / "training_examples.jsonl", tokenizer)
        print(f"refusal openers {openers}: {[tokenizer.decode([t]) for t in openers]}", flush=True)
        adapter = LoraAdapter.load(shipped_expert_path())
        rows = signals(model, tokenizer, adapter, texts, args.steps, openers)
        for row, example, risk in zip(rows, held, risks):
            row.update(label=example.label, wrapper=example.wrapper, chars=len(example.text), risk=risk)
        if args.rollout:
            from ngsd.risk.divergence_check import expert_openings
            from ngsd.risk.estimate import opening_refuses

            for row, opening in zip(rows, expert_openings(model, tokenizer, texts, adapter, args.rollout)):
                row.update(expert_opening=opening, expert_refuses=opening_refuses(opening))
        if args.raw:
            Path(args.raw).write_text(json.dumps(rows))
    report = summarise(rows, probe.route_below, probe.spec.check_above, probe.spec.check_divergence)
    report.update(requests=len(rows), seconds=round(time.time() - started, 1),
                  loadavg={"start": list(load_before), "end": list(os.getloadavg())},
                  command=f"python bench/probe_check_signals.py --threads {args.threads} --steps {args.steps}"
                  + (f" --rollout {args.rollout}" if args.rollout else "")
                  + (f" --raw {args.raw}" if args.raw else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
