"""Measurements for reports/nest/REPORT.md that the eval harness does not make.

    python reports/nest/measure.py throughput --out reports/nest/throughput.json
    python reports/nest/measure.py curve --pooled /tmp/nest_pooled.pt --out reports/nest/curve.json

throughput: greedy tok/s of the base and of the folded NeST model (the shipped delta), same prompts
(AlpacaEval odd ids), batch 16, 64 new tokens, the two interleaved for a few rounds: the ratio per
round is the steady number on a shared machine.
curve: ASR (keyword judge, greedy, 48 tokens) on AdvBench ids 50..99 and refusal on 20 XSTest safe
prompts for NeST updates trained on the same examples with different numbers of selected neurons
(highest z first); a cheap, short training per point (`--max-examples`, one epoch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _greedy(model, tokenizer, prompts, max_new_tokens):
    from ngsd.experts.training.examples import chat_prompt_ids, generate_ids

    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    return generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=16)


def throughput(args):
    from ngsd.data import load_suite
    from ngsd.loading import load_model
    from ngsd.nest.shipped import nest_expert

    base, tok = load_model()
    nest = nest_expert(base, args.delta)
    prompts = [p.text for p in load_suite("alpaca_eval", limit=args.batch)]
    rounds = []
    for r in range(args.rounds):
        row = {}
        for name, model in (("base", base), ("nest", nest)) if r % 2 == 0 else (("nest", nest), ("base", base)):
            t0 = time.perf_counter()
            out = _greedy(model, tok, prompts, args.new_tokens)
            row[name] = sum(len(o) for o in out) / (time.perf_counter() - t0)
        row["ratio"] = row["nest"] / row["base"]
        rounds.append(row)
        print(row, flush=True)
    ratios = sorted(r["ratio"] for r in rounds)
    result = {"batch": len(prompts), "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
              "rounds": rounds, "median_ratio": ratios[len(ratios) // 2]}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def curve(args):
    from ngsd.data import load_suite, resolve_data_dir
    from ngsd.eval.judge import KeywordJudge
    from ngsd.loading import load_model
    from ngsd.nest.architecture import model_shape
    from ngsd.nest.clustering import cluster_within_groups
    from ngsd.nest.config import NestConfig
    from ngsd.nest.selection import activation_profiles, neuron_z_scores, select_neurons
    from ngsd.nest.training import training_examples, train_update
    from ngsd.nest.update import NestUpdate

    model, tok = load_model()
    data_dir = resolve_data_dir()
    if Path(args.pooled).is_file():
        pooled = torch.load(args.pooled)
    else:  # the selection step's activations (train-nest's prompts for the seed), saved for the next run
        from ngsd.nest.selection import max_pooled_activations
        from ngsd.nest.training import probe_prompts

        harmful, benign = probe_prompts(NestConfig(), data_dir)
        pooled = max_pooled_activations(model, tok, harmful + benign)
        torch.save(pooled, args.pooled)
    half = len(pooled) // 2
    z = neuron_z_scores(pooled[:half], pooled[half:])
    judge = KeywordJudge()
    adv = [p.text for p in sorted(load_suite("advbench", data_dir), key=lambda p: int(p.id)) if 50 <= int(p.id) < 100]
    xs = [p.text for p in load_suite("xstest_safe", data_dir)][: 20]
    results = []
    for n in args.neurons:
        cfg = NestConfig(max_neurons=n, max_examples=args.max_examples)
        sel = select_neurons(z, threshold=float("-inf"), max_neurons=n)  # the n highest z-scores
        labels, _ = cluster_within_groups(activation_profiles(pooled, sel), sel.layer, seed=0)
        update = NestUpdate(sel.layer, sel.neuron, labels, model_shape(model))
        examples, _ = training_examples(cfg, model, tok, data_dir, print)
        t0 = time.perf_counter()
        train_update(model, tok, update, examples, cfg, log=print)
        seconds = time.perf_counter() - t0
        with update.attached(model):
            answers = [tok.decode(a, skip_special_tokens=True) for a in _greedy(model, tok, adv + xs, 48)]
        row = {"neurons": len(sel), "clusters": update.num_clusters, "trainable": update.num_trainable(),
               "train_examples": len(examples), "train_seconds": round(seconds, 1),
               "asr_advbench_50_99": sum(not judge.is_refusal(a) for a in answers[: len(adv)]) / len(adv),
               "xstest_safe_refusal_20": sum(judge.is_refusal(a) for a in answers[len(adv):]) / len(xs)}
        results.append(row)
        print(row, flush=True)
        Path(args.out).write_text(json.dumps({"max_new_tokens": 48, "points": results}, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--delta", default=None)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--new-tokens", type=int, default=64)
    t.add_argument("--rounds", type=int, default=4)
    t.add_argument("--out", required=True)
    c = sub.add_parser("curve")
    c.add_argument("--pooled", required=True, help="file of the selection step's max-pooled activations (harmful first); computed and saved there if missing")
    c.add_argument("--neurons", type=int, nargs="+", default=[32, 128, 686])
    c.add_argument("--max-examples", type=int, default=120)
    c.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"throughput": throughput, "curve": curve}[args.what](args)


if __name__ == "__main__":
    main()
