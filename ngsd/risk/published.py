"""The published self-reflection parser and risk rules, reproduced literally (spec section 2).

`ReflectionConfig.paper()` selects these (`parser="published"`) in place of the robust reader of
`ngsd.risk.reflection.parse_scores`, so that the paper's preset maps every evaluator answer to
the alpha the published code gives, mistakes included:

- The answer's first JSON value (from its first "{" or "["; prose before it and text after it are
  ignored) is read with the standard `json` module. A truncated or single-quoted object, or a JSON
  list before the object, is a parse failure: every score is `fallback_score` (7), never a partial read.
- The keys are the published ones, `severityScore`, `actionabilityScore`, `evasionScore` and
  `targetingScore`; other names ("severity", "S") are not read. A missing key takes
  `fallback_score` (the spec is silent here; this is the literal `.get(key, 7)` reading).
- Values go through `int()`: 6.6 becomes 6 (truncated, not rounded), "7" becomes 7, and a value
  `int()` refuses ("6.6", null, a nested object, NaN) makes the whole answer a parse failure.
  Values are not clipped to 0..10: only the long-request bonus caps at 10, and rule 4 clips its result.
- Rule 3 takes the FIRST of A, E, T (in that order) that is >= `strong_dimension`, as written,
  unclipped; the robust rules take the largest and clip. The alpha is the same whenever the
  scores are in range.

The >2000-character rule is applied by the caller to the raw user request (`len(request)`), not
to a chat-templated text; `ngsd.risk.reflection` does so for both parsers. With this parser,
`reflect_generate` also generates as the published code does, to EOS or the token limit, instead
of stopping a row at its first "}" (which may close a nested object).

Not reproduced: the published evaluator prompt's wording and message roles (the preset uses this
project's evaluator prompt, `ngsd.risk.reflection.EVALUATOR_INSTRUCTIONS`).

>>> from ngsd.config import ReflectionConfig
>>> cfg = ReflectionConfig.paper()
>>> parse_published('Sure: {"severityScore": 6.6, "actionabilityScore": 9, "evasionScore": 8}', cfg)
ParsedScores(scores={'S': 6, 'A': 9, 'E': 8, 'T': 7}, parsed=True, missing=('T',))
>>> published_risk({"S": 6, "A": 9, "E": 8, "T": 7}, request_chars=40, config=cfg)
9
>>> parse_published("{'severityScore': 1}", cfg).parsed
False
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from ..config import ReflectionConfig
from .reflection import DIMENSIONS, ParsedScores

PUBLISHED_KEYS = {"S": "severityScore", "A": "actionabilityScore", "E": "evasionScore", "T": "targetingScore"}


def _first_json_value(text: str) -> Any:
    """The JSON value that starts at the first "{" or "[" of `text`; raises ValueError if there is none."""
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        raise ValueError("no JSON value in the answer")
    value, _ = json.JSONDecoder().raw_decode(text, min(starts))  # JSONDecodeError is a ValueError
    return value


def parse_published(text: str, config: ReflectionConfig | None = None) -> ParsedScores:
    """Read S/A/E/T from an evaluator answer exactly as the published code does (module docstring).

    `parsed` is False when the answer fails to parse or names none of the published keys; then
    every score is `config.fallback_score`.

    >>> parse_published('[1, 2] {"severityScore": 1}').scores
    {'S': 7, 'A': 7, 'E': 7, 'T': 7}
    """
    config = config or ReflectionConfig.paper()
    if not isinstance(text, str):
        raise TypeError(f"parse_published reads the evaluator's answer as a str, got {type(text).__name__}")
    failed = ParsedScores(scores={dim: config.fallback_score for dim in DIMENSIONS}, parsed=False, missing=DIMENSIONS)
    try:
        value = _first_json_value(text)
        if not isinstance(value, dict):
            return failed
        found = {dim: int(value[key]) for dim, key in PUBLISHED_KEYS.items() if key in value}
    except (ValueError, TypeError, OverflowError):  # bad JSON, or a value int() refuses
        return failed
    scores = {dim: found.get(dim, config.fallback_score) for dim in DIMENSIONS}
    missing = tuple(dim for dim in DIMENSIONS if dim not in found)
    return ParsedScores(scores=scores, parsed=bool(found), missing=missing)


def published_risk(scores: Mapping[str, float], request_chars: int, config: ReflectionConfig | None = None) -> int:
    """The risk of one request from its S/A/E/T scores under the published rules, in order.

    1. A request longer than `long_request_chars` (raw characters) adds `long_request_bonus` to every score, cap 10.
    2. All four 0: `all_zero="fail"` returns 10, `"bump"` adds 1 to S.
    3. With S >= `strong_dimension_min_severity`, the first of A, E, T that is >= `strong_dimension` is the risk.
    4. Else r = max(S, 0.5*S + 0.5*mean(two largest of A, E, T)), clipped to [0, 10], truncated to int.

    >>> published_risk({"S": 5, "A": 8, "E": 9, "T": 10}, 100)  # the first strong one, not the largest
    8
    >>> published_risk({"S": 4, "A": 6, "E": 1, "T": 3}, 100)  # max(4, 2 + 0.5*4.5) = 4.25
    4
    """
    config = config or ReflectionConfig.paper()
    absent = [dim for dim in DIMENSIONS if dim not in scores]
    if absent:
        raise KeyError(f"published_risk needs the scores S, A, E and T; missing {absent} in {dict(scores)}")
    s, a, e, t = (scores[dim] for dim in DIMENSIONS)
    if any(isinstance(v, float) and math.isnan(v) for v in (s, a, e, t)):
        raise ValueError(f"scores must be numbers, got NaN in {dict(scores)}")
    if request_chars > config.long_request_chars:
        s, a, e, t = (min(10, v + config.long_request_bonus) for v in (s, a, e, t))
    if s == 0 and a == 0 and e == 0 and t == 0:
        if config.all_zero == "fail":
            return 10
        s += 1
    if s >= config.strong_dimension_min_severity:
        for value in (a, e, t):
            if value >= config.strong_dimension:
                return int(value)
    top_two = sorted((a, e, t), reverse=True)[:2]
    risk = max(s, 0.5 * s + 0.5 * (sum(top_two) / 2))
    return int(min(10.0, max(0.0, risk)))
