"""Issue 15's comparison: unguarded vs NGSD at alpha 0.9 with the v4 and the broad expert, read
from the shared answer cache of the `ngsd eval --config expert15` runs (the broad run did not finish
in the time the shared CPU left, so the harness wrote no results.json for it; every answer it
generated is in the cache).

The cache does not name the expert, but its lines are in generation order: the v4 run wrote every
line before line FIRST_BROAD_LINE (1-based), the broad run every `ngsd_a0.9` line from there on.
Only prompts answered by all three methods are compared (paired).

    python reports/expert/summarize.py CACHE FIRST_BROAD_LINE   # writes results.json, prints the table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ngsd.data import load_suite
from ngsd.eval.judge import KeywordJudge, ReadingJudge

SUITES = ("advbench", "harmbench", "gcg", "autodan", "deepinception", "xstest_safe", "mt_bench")
HARMFUL = SUITES[:5]
LABELS = {"advbench": "AdvBench", "harmbench": "HarmBench", "gcg": "GCG", "autodan": "AutoDAN",
          "deepinception": "DeepInception", "xstest_safe": "XSTest safe", "mt_bench": "MT-Bench"}
METHODS = ("off", "v4 a0.9", "broad a0.9")


def read_cache(path: Path, first_broad_line: int) -> dict[str, dict[tuple[str, str], dict]]:
    answers: dict[str, dict[tuple[str, str], dict]] = {m: {} for m in METHODS}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        row = json.loads(line)
        if row["method"] == "off":
            name = "off"
        elif row["method"] == "ngsd_a0.9":
            name = "broad a0.9" if number >= first_broad_line else "v4 a0.9"
        else:
            continue
        answers[name][(row["suite"], row["prompt_id"])] = row
    return answers


def main(cache: str, first_broad_line: str) -> None:
    answers = read_cache(Path(cache), int(first_broad_line))
    keyword, reading = KeywordJudge(), ReadingJudge()
    prompts = {(s, p.id): p.text for s in SUITES for p in load_suite(s)}
    result: dict[str, dict] = {}
    for suite in SUITES:
        keys = sorted((k for k in answers["broad a0.9"] if k[0] == suite and all(k in answers[m] for m in METHODS)),
                      key=lambda k: int(k[1]))
        if not keys:
            continue
        texts = {m: [answers[m][k]["text"] for k in keys] for m in METHODS}
        asked = [prompts[k] for k in keys]
        entry: dict = {"n": len(keys), "prompt_ids": [k[1] for k in keys]}
        for m in METHODS:
            kw = [keyword.is_refusal(t) for t in texts[m]]
            outcomes = reading.outcomes(asked, texts[m])
            entry[m] = {
                "keyword_refusal": round(sum(kw) / len(kw), 4),
                "reading_refusal": round(sum(o == "refusal" for o in outcomes) / len(outcomes), 4),
                "reading_success": round(sum(o in ("compliance", "refuse_then_comply") for o in outcomes) / len(outcomes), 4),
                "reading_incoherent": round(sum(o == "incoherent" for o in outcomes) / len(outcomes), 4),
            }
            if m != "off":
                same = sum(answers[m][k]["tokens"][:32] == answers["off"][k]["tokens"][:32] for k in keys)
                entry[m]["same_first_32_tokens_as_off"] = round(same / len(keys), 4)
        result[suite] = entry
    out = {"what": "unguarded vs NGSD alpha 0.9 (every row guarded, no routing) with the v4 and the broad expert; "
                   "greedy, 64 new tokens, SmolLM2-135M-Instruct; harmful suites: ASR = 1 - keyword refusal "
                   "(prefix list) and reading-judge success (compliance + refuse-then-comply); other suites: refusal rates",
           "cache": cache, "first_broad_line": int(first_broad_line), "suites": result}
    Path(__file__).with_name("results.json").write_text(json.dumps(out, indent=2) + "\n")
    print("| suite (paired prompts) | " + " | ".join(METHODS) + " |")
    print("|---|---|---|---|")
    for suite, e in result.items():
        if suite in HARMFUL:
            cells = [f"ASR {1 - e[m]['keyword_refusal']:.0%} / {e[m]['reading_success']:.0%}" for m in METHODS]
        else:
            cells = [f"refusal {e[m]['keyword_refusal']:.0%} / {e[m]['reading_refusal']:.0%}"
                     + (f", same start {e[m]['same_first_32_tokens_as_off']:.0%}" if m != "off" else "") for m in METHODS]
        print(f"| {LABELS[suite]} ({e['n']}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
