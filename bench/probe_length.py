"""Does the risk probe's risk grow with prompt length on benign prompts? (report only)

The shipped probe takes the maximum of per-token risks over the prompt, so a longer prompt has more
chances of one high token. Per benign set, split into length terciles (the request's own tokens,
without the chat template): the mean risk and the share of rows the default would guard (risk >= route_below) or check (risk in
[check_above, route_below)). AlpacaEval even ids are the probe's own training prompts; AlpacaEval odd
ids and MT-Bench are evaluation sets, read here for the diagnosis only.

    python bench/probe_length.py            # ~2 min on one CPU thread; writes bench/results/probe_length.json
"""

from __future__ import annotations

import argparse

from harness import RESULTS_DIR, load_setup, write_json

import torch  # noqa: E402  (after harness)


def terciles(name: str, texts: list[str], risks: list[float], tokenizer, route_below: float,
             check_above: float | None) -> list[dict]:
    from ngsd.risk.probe_training import benign_risk_by_length

    lengths = [len(tokenizer(text).input_ids) for text in texts]
    return [{"set": name, **row} for row in benign_risk_by_length(
        lengths, torch.tensor(risks), torch.zeros(len(risks)), route_below, check_above, unit="tokens")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--training-prompts", type=int, default=300, help="AlpacaEval even ids read (first N)")
    parser.add_argument("--probe", default=None, help="probe folder (default: the shipped probe of the default model)")
    parser.add_argument("--out", default="probe_length.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from ngsd.data import load_suite
    from ngsd.experts.training.splits import alpaca_even_prompts
    from ngsd.risk.probe import RiskProbe, estimate_risk, probe_for

    setup = load_setup()
    probe = RiskProbe.load(args.probe) if args.probe else probe_for(setup.model)
    if probe is None:
        raise SystemExit("no risk probe ships for this model")
    sets = {
        "alpaca_even (training)": alpaca_even_prompts()[: args.training_prompts],
        "alpaca_odd (evaluation)": [p.text for p in load_suite("alpaca_eval", limit=100)],
        "mt_bench (evaluation)": [p.text for p in load_suite("mt_bench")],
    }
    report = {"probe": args.probe or "shipped", "route_below": probe.route_below,
              "check_above": probe.spec.check_above, "sets": []}
    for name, texts in sets.items():
        risks = estimate_risk(setup.model, setup.tokenizer, texts, probe)
        for row in terciles(name, texts, risks, setup.tokenizer, probe.route_below, probe.spec.check_above):
            report["sets"].append(row)
            print(f"{row['set']:26s} tokens {row['tokens'][0]:3d}-{row['tokens'][1]:3d}  n {row['n']:3d}  "
                  f"mean risk {row['mean_risk']:.2f}  guarded {row['guarded']:2d}  checked {row.get('checked', 0):2d}")
    write_json(args.out, report, RESULTS_DIR)


if __name__ == "__main__":
    main()
