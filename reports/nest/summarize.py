"""Merge the `ngsd eval --config nest` runs of reports/nest/ into one table (results.json + a markdown table).

    python reports/nest/summarize.py            # reads reports/nest/eval_*/results.json and the answer cache

Rows: unguarded, NeST alone (the folded model run as the base, no guard), the shipped LoRA expert alone
(on the first 20 prompts per suite only: it runs base and expert), NGSD (default probe + routing) with
the NeST expert and with the LoRA expert. Benign fidelity of NeST alone is computed here against the
unguarded answers in the shared cache, exactly as the harness computes it (same first 32 tokens).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

HARMFUL = ("advbench", "harmbench", "gcg", "deepinception")
BENIGN = ("xstest_safe", "mt_bench")
ROWS = (  # (label, run folder, method)
    ("unguarded", "eval_ngsd_lora", "off"),
    ("NeST alone", "eval_nest_alone", "off"),
    ("LoRA expert alone (20 per suite)", "eval_lora_alone20", "expert"),
    ("unguarded (same 20 per suite)", "eval_lora_alone20", "off"),
    ("NGSD + NeST expert", "eval_ngsd_nest", "ngsd"),
    ("NGSD + LoRA expert", "eval_ngsd_lora", "ngsd"),
)


def cached_answers(cache: Path) -> dict[str, dict]:
    out = {}
    for line in cache.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            out[record["key"]] = record
    return out


def fidelity_against(run: dict, other: dict, answers: dict, data_dir: str | None = None) -> dict:
    """Same-first-32-tokens rate and mean overlap of `run`'s "off" answers against `other`'s, on the benign suites."""
    from ngsd.data import load_suite
    from ngsd.eval.methods import get_method
    from ngsd.eval.metrics import same_prefix, token_overlap
    from ngsd.eval.runner import DecodingSettings, cache_key

    settings = DecodingSettings(max_new_tokens=run["config"]["max_new_tokens"]).to_dict()
    signature = get_method("off").signature(49152)
    equal = overlap = n = 0
    for suite in BENIGN:
        ids = set(run["suites"][suite]["ids"])
        for prompt in load_suite(suite, data_dir):
            if prompt.id not in ids:
                continue
            a = answers[cache_key(run["run"]["model_id"], None, signature, prompt.text, settings)]["tokens"]
            b = answers[cache_key(other["run"]["model_id"], None, signature, prompt.text, settings)]["tokens"]
            equal += same_prefix(a, b, 32)
            overlap += token_overlap(a, b, 32)
            n += 1
    return {"n": n, "equal": equal, "rate": equal / n, "mean_overlap": overlap / n}


def same_prompts_row(nest: dict, subset: dict) -> dict:
    """NeST alone scored (keyword judge) on only the prompts of the 20-per-suite run, to compare with the LoRA expert."""
    per_prompt = nest["per_prompt"]["off"]
    refused_at = nest["per_prompt_fields"].index("refused")
    rates = {}
    for suite, info in subset["suites"].items():
        ids = set(info["ids"])
        rows = [r for r in per_prompt[suite] if r[0] in ids]
        rates[suite] = sum(bool(r[refused_at]) for r in rows) / len(rows)
    return {"method": "NeST alone (same 20 per suite)", "run": "eval_nest_alone", "eval_method": "off",
            "asr": {s: 1 - rates[s] for s in HARMFUL}, "xstest_safe_refusal": rates["xstest_safe"],
            "mt_bench_refusal": rates["mt_bench"], "fidelity": {"rate": None}, "tokens_per_second": None,
            "throughput_ratio_in_run": None}


def main() -> None:
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(HERE.glob("eval_*/results.json"))}
    answers = cached_answers(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/nest_run/generations.jsonl"))
    table = []
    for label, folder, method in ROWS:
        if folder not in runs:
            continue
        run = runs[folder]
        m = run["metrics"][method]
        off = run["metrics"]["off"]["summary"]
        row = {"method": label, "run": folder, "eval_method": method,
               "asr": {s: m["suites"][s]["asr"] for s in HARMFUL if s in m["suites"]},
               "asr_reading_judge": {s: m["suites"][s]["reading"]["asr"] for s in HARMFUL if s in m["suites"]},
               "n": {s: m["suites"][s]["n"] for s in HARMFUL + BENIGN if s in m["suites"]},
               "xstest_safe_refusal": m["suites"]["xstest_safe"]["refusal_rate"],
               "mt_bench_refusal": m["suites"]["mt_bench"]["refusal_rate"],
               "fidelity": m["summary"]["fidelity"],
               "tokens_per_second": m["summary"]["tokens_per_second"],
               "throughput_ratio_in_run": m["summary"]["tokens_per_second"] / off["tokens_per_second"]}
        if folder == "eval_nest_alone":
            row["fidelity"] = fidelity_against(run, runs["eval_ngsd_lora"], answers)
            row["throughput_ratio_in_run"] = None  # its "off" is itself; see throughput.json
        table.append(row)
    if "eval_nest_alone" in runs and "eval_lora_alone20" in runs:
        table.insert(3, same_prompts_row(runs["eval_nest_alone"], runs["eval_lora_alone20"]))
    throughput = HERE / "throughput.json"
    result = {"rows": table, "throughput_nest_vs_base": json.loads(throughput.read_text()) if throughput.is_file() else None,
              "training": json.loads((HERE.parents[1] / "ngsd/assets/nest/smollm2-135m-nest/training_report.json").read_text())["parameters"]}
    curve = HERE / "curve.json"
    if curve.is_file():
        result["curve"] = json.loads(curve.read_text())
    (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    print("| method | ASR AdvBench | ASR HarmBench | ASR GCG | ASR DeepInception | refusal XSTest safe | refusal MT-Bench | benign fidelity |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['method']} | " + " | ".join(pct(r["asr"].get(s)) for s in HARMFUL)
              + f" | {pct(r['xstest_safe_refusal'])} | {pct(r['mt_bench_refusal'])} | {pct(r['fidelity']['rate'])} |")


if __name__ == "__main__":
    main()
