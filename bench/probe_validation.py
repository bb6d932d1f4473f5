"""Compare risk probes on the probe's own validation split of the TRAINING data (no evaluation set is read).

The split is `ngsd.risk.probe_training.training_split` (seed 0, the default validation share, with
composites: 2-4 benign requests in one prompt, or one harmful request among benign ones), so every
probe trained with seed 0 held these requests out. Per probe: AUROC (all, plain, wrapped,
composed), the share of harmful requests it would route unguarded, and for benign requests by
length tercile the mean risk and the share it would guard or check. This is how a new probe is
chosen over the shipped one; the evaluation splits are measured afterwards (probe_auroc.py).

    python bench/probe_validation.py --probe shipped --probe /path/to/new/probe   # ~3 min a probe, one thread
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probe", action="append", required=True,
                        help="probe folder, or 'shipped'; repeat to compare several")
    parser.add_argument("--compose-rate", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="bench/results/probe_validation.json")
    args = parser.parse_args(argv)

    from ngsd.loading import load_model
    from ngsd.risk.probe import RiskProbe, estimate_risk, shipped_probe_path
    from ngsd.risk.probe_training import COMPOSED, auroc, benign_risk_by_length, training_split

    torch.set_num_threads(args.threads)
    started, load_before = time.time(), os.getloadavg()
    examples, _, val = training_split(args.data_dir, seed=0, compose_rate=args.compose_rate)
    rows = [examples[i] for i in val]
    texts, labels = [e.text for e in rows], torch.tensor([e.label for e in rows])
    kinds = {"plain": [not e.wrapper for e in rows],
             "wrapped": [bool(e.wrapper) and e.wrapper != COMPOSED for e in rows],
             "composed": [e.wrapper == COMPOSED for e in rows]}
    model, tokenizer = load_model(None)
    report = {"split": {"requests": len(rows), "harmful": int(labels.sum()), "compose_rate": args.compose_rate},
              "probes": {}}
    for name in args.probe:
        folder = shipped_probe_path(None) if name == "shipped" else Path(name)
        probe = RiskProbe.load(folder)
        risks = torch.tensor(estimate_risk(model, tokenizer, texts, probe))
        entry = {"folder": str(folder), "route_below": probe.route_below, "check_above": probe.spec.check_above,
                 "auroc": round(auroc(risks, labels), 4)}
        for kind, mask in kinds.items():
            mask = torch.tensor(mask)
            if len(set(labels[mask].tolist())) == 2:
                entry[f"auroc_{kind}"] = round(auroc(risks[mask], labels[mask]), 4)
        harmful = risks[labels == 1]
        entry["harmful_routed"] = round(float((harmful < probe.route_below).float().mean()), 4)
        benign_idx = [i for i, e in enumerate(rows) if e.label == 0]
        entry["benign_guarded"] = round(float((risks[benign_idx] >= probe.route_below).float().mean()), 4)
        for kind, mask in kinds.items():
            idx = [i for i in benign_idx if mask[i]]
            entry[f"benign_{kind}_by_length"] = benign_risk_by_length(
                [len(texts[i]) for i in idx], risks[idx], labels[idx], probe.route_below, probe.spec.check_above)
        report["probes"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
    report["seconds"] = round(time.time() - started, 1)
    report["loadavg"] = {"start": list(load_before), "end": list(os.getloadavg())}
    report["command"] = "python bench/probe_validation.py " + " ".join(f"--probe {p}" for p in args.probe)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
