"""Issue 15: unguarded vs NGSD at alpha 0.9 with the v4 and the v5 expert, paired per prompt, read
from the shared answer cache of the `ngsd eval --config expert15` runs.

Each answer is found by its cache key (model, expert fingerprint, method, prompt, decoding), so the
two experts' runs may interleave in the cache. A suite is compared on the prompts (lowest ids first,
as the config selects them) that all three methods answered, optionally cut to --limit per suite.

    python reports/expert/summarize_v5.py CACHE V4_FOLDER V5_FOLDER [--limit N] [--out results_v5.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ngsd.eval.config import load_config
from ngsd.eval.judge import KeywordJudge, ReadingJudge
from ngsd.eval.methods import get_method
from ngsd.eval.pipeline import locate_expert, model_fingerprint
from ngsd.eval.runner import DecodingSettings, cache_key
from ngsd.eval.suites import load_suites

HARMFUL = ("advbench", "harmbench", "gcg", "autodan", "deepinception")
LABELS = {"advbench": "AdvBench", "harmbench": "HarmBench", "gcg": "GCG", "autodan": "AutoDAN",
          "deepinception": "DeepInception", "xstest_safe": "XSTest safe", "mt_bench": "MT-Bench"}
VOCAB_SIZE = 49152  # SmolLM2's vocabulary: part of the method signature when a method uses every candidate


def read_cache(path: Path) -> dict[str, dict[str, Any]]:
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {row["key"]: row for row in rows}


def scores(prompts: list[str], texts: list[str]) -> dict[str, float]:
    keyword = [KeywordJudge().is_refusal(t) for t in texts]
    outcomes = ReadingJudge().outcomes(prompts, texts)
    n = len(texts)
    return {
        "keyword_refusal": round(sum(keyword) / n, 4),
        "reading_refusal": round(sum(o == "refusal" for o in outcomes) / n, 4),
        "reading_success": round(sum(o in ("compliance", "refuse_then_comply") for o in outcomes) / n, 4),
        "reading_incoherent": round(sum(o == "incoherent" for o in outcomes) / n, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache")
    parser.add_argument("v4")
    parser.add_argument("v5")
    parser.add_argument("--limit", type=int, default=None, help="at most this many lowest-id prompts per suite")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results_v5.json")))
    args = parser.parse_args()

    config = load_config("expert15")
    suites = load_suites(config.suites, None, args.limit)
    answers = read_cache(Path(args.cache))
    model_id = model_fingerprint(None)
    settings = DecodingSettings(max_new_tokens=config.max_new_tokens).to_dict()
    columns = {"off": (get_method("off"), None), "v4 a0.9": (get_method("ngsd_a0.9"), locate_expert(args.v4)[1]),
               "v5 a0.9": (get_method("ngsd_a0.9"), locate_expert(args.v5)[1])}

    def answer(column: str, text: str) -> dict[str, Any] | None:
        method, expert_id = columns[column]
        return answers.get(cache_key(model_id, expert_id, method.signature(VOCAB_SIZE), text, settings))

    result: dict[str, Any] = {}
    for suite, prompts in suites.items():
        paired = [(p, {c: answer(c, p.text) for c in columns}) for p in prompts]
        paired = [(p, a) for p, a in paired if all(a.values())]
        if not paired:
            continue
        texts = [p.text for p, _ in paired]
        entry: dict[str, Any] = {"n": len(paired), "of": len(prompts), "prompt_ids": [p.id for p, _ in paired]}
        for column in columns:
            entry[column] = scores(texts, [a[column]["text"] for _, a in paired])
            if column != "off":
                same = sum(a[column]["tokens"][:32] == a["off"]["tokens"][:32] for _, a in paired)
                entry[column]["same_first_32_tokens_as_off"] = round(same / len(paired), 4)
        result[suite] = entry
    out = {"what": "unguarded vs NGSD alpha 0.9 (every row guarded, no routing) with the v4 and the v5 expert, "
                   "paired prompts; greedy, 64 new tokens, SmolLM2-135M-Instruct; harmful suites: ASR = 1 - keyword "
                   "refusal (prefix list) and reading-judge success (compliance + refuse-then-comply); other suites: "
                   "refusal rates",
           "cache": args.cache, "limit": args.limit, "experts": {c: e for c, (_, e) in columns.items() if e},
           "suites": result}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("| suite (paired prompts) | " + " | ".join(columns) + " |")
    print("|---|---|---|---|")
    for suite, e in result.items():
        if suite in HARMFUL:
            cells = [f"ASR {1 - e[c]['keyword_refusal']:.0%} / {e[c]['reading_success']:.0%}" for c in columns]
        else:
            cells = [f"refusal {e[c]['keyword_refusal']:.0%} / {e[c]['reading_refusal']:.0%}" for c in columns]
        print(f"| {LABELS.get(suite, suite)} ({e['n']} of {e['of']}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
