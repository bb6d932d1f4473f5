"""The soups of PLAN_soup.md beside their members, and the plan's rule for soup_v4c, from a validate_guarded.py file.

    python reports/expert/soup_table.py reports/expert/validation_soup.json
"""

from __future__ import annotations

import json
import sys

from seed_spread import cells

SOUPS = {"soup_v4": ("v4", "v4_s1"), "soup_v4c": ("v4c", "v4c_s1")}


def main(path: str) -> int:
    results = json.load(open(path))["results"]
    candidate = True
    for method in ("ngsd", "ngsd_a0.9"):
        print(f"\n## {method}\n")
        print("| set | judge | v4 | v4_s1 | mean | soup_v4 | v4c | v4c_s1 | mean | soup_v4c | soup_v4c - v4 "
              "| soup_v4c - v4 mean | margin | rule |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        experts = [e for soup, pair in SOUPS.items() for e in (*pair, soup)]
        for label, judge, c, margin in cells(results, method, experts):
            v4_mean, v4c_mean = (c["v4"] + c["v4_s1"]) / 2, (c["v4c"] + c["v4c_s1"]) / 2
            worse_single, worse_mean = c["soup_v4c"] - c["v4"], c["soup_v4c"] - v4_mean
            verdict = "-" if margin is None else (
                "met" if worse_single <= margin and worse_mean <= margin else "FAILED")
            candidate &= verdict != "FAILED"
            print(f"| {label} | {judge} | {c['v4']} | {c['v4_s1']} | {v4_mean:g} "
                  f"| {c['soup_v4']} | {c['v4c']} | {c['v4c_s1']} | {v4c_mean:g} | {c['soup_v4c']} "
                  f"| {worse_single:+} | {worse_mean:+g} | {'' if margin is None else f'+{margin}'} | {verdict} |")
    print(f"\nsoup_v4c is {'a CANDIDATE' if candidate else 'NOT a candidate'} by PLAN_soup.md's rule")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
