"""The risk probe's divergence check on the EVALUATION splits (report only; nothing here is tuned on).

The check's operating point (check_above, check_divergence) was fitted on the probe's validation
split of the training data (`ngsd train-probe --check-only`, see `ngsd.risk.divergence_check`).
Here, per evaluation suite: the share the probe alone routes unguarded, the share whose risk falls
in the checked band [check_above, route_below) (they pay an expert prefill), and the share guarded
after the check. The probe's risks are read from `probe_auroc.py`'s output (same probe, same
suites); only the band's rows are run through the base and the expert.

    python bench/probe_check.py --risks reports/probe/probe_eval.json --out reports/probe   # a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from probe_auroc import BENIGN, HARMFUL, add_common_arguments, evaluation_suites


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--risks", default="reports/probe/probe_eval.json", help="probe_auroc.py's output")
    parser.add_argument("--expert", default="shipped", help="the expert the check was fitted for (default: shipped)")
    args = parser.parse_args(argv)

    from ngsd.experts.resolve import resolve_expert
    from ngsd.loading import load_model
    from ngsd.risk.divergence_check import first_step_divergence
    from ngsd.risk.probe import RiskProbe, shipped_probe_path

    torch.set_num_threads(args.threads)
    started, load_before = time.time(), os.getloadavg()
    scored = json.loads(Path(args.risks).read_text())
    probe_path = Path(args.probe) if args.probe else shipped_probe_path(None)
    spec = RiskProbe.load(probe_path).spec
    if spec.route_below != scored["route_below"]:
        raise SystemExit(f"{args.risks} was scored with another probe (route_below {scored['route_below']}); "
                         "rerun probe_auroc.py with this one")
    if spec.check_above is None:
        raise SystemExit(f"the probe at {probe_path} has no divergence check; fit one with "
                         "`ngsd train-probe --check-only --out <probe folder>`")
    model, tokenizer = load_model(None)
    expert = resolve_expert(args.expert, model)
    suites = evaluation_suites(args.data_dir)
    rows = {}
    for name, texts in suites.items():
        risks = scored["risks"][name]
        if len(risks) != len(texts):
            raise SystemExit(f"{name}: {len(risks)} risks for {len(texts)} requests; rerun probe_auroc.py")
        band = [i for i, r in enumerate(risks) if spec.check_above <= r < spec.route_below]
        divergences = first_step_divergence(model, tokenizer, [texts[i] for i in band], expert,
                                            batch_size=args.batch_size) if band else []
        kept = sum(d >= spec.check_divergence for d in divergences)
        n = len(texts)
        routed_by_probe = sum(r < spec.route_below for r in risks)
        rows[name] = {
            "class": "harmful" if name in HARMFUL else "benign", "n": n,
            "routed_by_probe": round(routed_by_probe / n, 4), "in_band": round(len(band) / n, 4),
            "guarded_after_check": round((n - routed_by_probe + kept) / n, 4),
            "routed_after_check": round((routed_by_probe - kept) / n, 4),
            "band_divergences": [round(d, 4) for d in divergences],
        }
        print(f"{name:15s} routed {rows[name]['routed_by_probe']:.1%} -> {rows[name]['routed_after_check']:.1%} "
              f"(band {len(band)}/{n})", flush=True)
    report = {
        "command": "python bench/probe_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "probe": probe_path.name, "route_below": spec.route_below, "check_above": spec.check_above,
        "check_divergence": spec.check_divergence, "check_expert": spec.check_expert, "expert": args.expert,
        "suites": rows, "seconds": round(time.time() - started, 1), "threads": args.threads,
        "loadavg_start": load_before, "loadavg_end": os.getloadavg(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "divergence_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "divergence_check.md").write_text(markdown(report))
    print((out / "divergence_check.md").read_text())
    return 0


def markdown(report: dict) -> str:
    lines = [
        "# The risk probe's divergence check on the evaluation splits",
        "",
        f"Probe `{report['probe']}`: route_below {report['route_below']}; a request with "
        f"{report['check_above']} <= risk < {report['route_below']} is guarded when the expert's first-step "
        f"next-token distribution is at least {report['check_divergence']} (total variation) from the base's, "
        f"routed otherwise (expert `{report['check_expert']}`). Both numbers were fitted on the probe's validation "
        "split of the training data (`ngsd train-probe --check-only`); nothing below was tuned on.",
        "",
        "| suite | class | n | routed by the probe alone | in the checked band | routed after the check | guarded after the check |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["suites"].items():
        lines.append(f"| {name} | {row['class']} | {row['n']} | {row['routed_by_probe']:.1%} | {row['in_band']:.1%} | "
                     f"{row['routed_after_check']:.1%} | {row['guarded_after_check']:.1%} |")
    lines += [
        "",
        f"Harmful suites: {', '.join(HARMFUL)}; benign: {', '.join(BENIGN)}. For harmful suites the routed share is the "
        "share decoded unguarded (the guard cannot act there); for benign suites the guarded share is what may lose "
        "fidelity and what costs expert compute.",
        "",
        f"Command: `{report['command']}` ({report['threads']} torch thread; load average at start "
        f"{report['loadavg_start'][0]:.1f}, at end {report['loadavg_end'][0]:.1f}; {report['seconds']} s including "
        "model load; risks from probe_auroc.py's run, divergences from `ngsd.risk.divergence_check.first_step_divergence` "
        "for the band's requests only).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
