"""Issue 15's broadened training requests: harmful ones across the harm taxonomy and in many surface
forms, and harmless look-alikes in the same forms, split into train and validation by topic.

Sources, all allowed for training by `../shared/data/SOURCES.md`:
- SafeDecoding's seed prompts (seed_reject.json) and AdvBench goals with ids >= 130, as whole
  requests; AdvBench goals of the form "... how to X" also give the act "X";
- the hand-written harmful and harmless acts of `ngsd/assets/training/broad_requests.json`, one list
  per category (they fill the categories the splits cover thinly: self-harm, sexual content,
  privacy, misinformation, drugs, dangerous advice).

Every act or request is a *unit*; its prompts are the unit put in surface forms (instruction,
question, past tense, hypothetical, fiction, role-play, embedded in longer benign context; acts
take all seven, whole requests all but past tense). The validation split holds whole units out
(seeded, per category), so no validation prompt shares a topic with a training prompt.

    >>> reqs = training_requests(split="train", seed=0)            # doctest: +SKIP
    >>> {r.form for r in reqs.harmful} >= set(FORMS)                # doctest: +SKIP
    True

The risk probe can be retrained on the same data: `training_requests(...).harmful` / `.benign`.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from ...data import id_sort_key, load_suite
from .splits import ADVBENCH_EVAL_BELOW, evaluation_prompts, leaks

BROAD_FILE = Path(__file__).resolve().parent.parent.parent / "assets" / "training" / "broad_requests.json"
# SOURCES.md: AdvBench ids below 130 are evaluation (GCG, AutoDAN and DeepInception wrap goals up to 124).
ADVBENCH_TRAIN_MIN_ID = ADVBENCH_EVAL_BELOW
FORMS = ("instruction", "question", "past_tense", "hypothetical", "fiction", "roleplay", "embedded")
SPLITS = ("train", "validation", "all")
# Forms whose templates speak of a third person ("How did people ..."): first-person acts are turned round.
_THIRD_PERSON_FORMS = ("past_tense", "hypothetical")
_PRONOUNS = {"myself": "themselves", "my": "their", "me": "them", "I": "they", "I'm": "they're"}


@dataclass(frozen=True)
class TrainingRequest:
    """One training prompt: `text` as sent; `unit` the act or request it was made from (the split
    keeps units whole); `source` "hand" (broad_requests.json), "seed" (seed_reject.json),
    "advbench" (a goal, ids >= 130) or "advbench-act" (the act of a goal's "how to ..." clause);
    `target` AdvBench's "Sure, here is ..." for a goal in its instruction form."""

    text: str
    harmful: bool
    category: str
    form: str
    source: str
    unit: str
    target: str | None = None


@dataclass(frozen=True)
class TrainingRequests:
    """The harmful and harmless requests of one split."""

    harmful: tuple[TrainingRequest, ...]
    benign: tuple[TrainingRequest, ...]


@lru_cache(maxsize=1)
def broad_asset() -> dict[str, Any]:
    """The parsed `broad_requests.json`."""
    return json.loads(BROAD_FILE.read_text(encoding="utf-8"))


def categories() -> tuple[str, ...]:
    """The harm taxonomy the recipe covers, in file order."""
    return tuple(broad_asset()["categories"])


def categorise(text: str) -> str:
    """The first category (in taxonomy order) with a keyword in `text`, else "other"."""
    lowered = " " + text.lower() + " "
    keywords = broad_asset()["category_keywords"]
    for category in categories():
        if any(k in lowered for k in keywords[category]):
            return category
    return "other"


def third_person(act: str) -> str:
    """`act` with first-person words turned into the third person ("hurt myself" -> "hurt themselves")."""
    return " ".join(_PRONOUNS.get(w, w) for w in act.split(" "))


def lower_first(text: str) -> str:
    """`text` with its first letter lower-cased, unless the first word is an acronym ("DDoS", "AI")."""
    first = text.split(" ", 1)[0]
    if len(first) > 1 and first[1].isupper():
        return text
    return text[:1].lower() + text[1:]


_HOW_TO = re.compile(r"\bhow to (.+?)[.?!]?$", re.IGNORECASE)


def act_of(goal: str) -> str | None:
    """The act of a goal's trailing "how to ..." clause ("Explain how to pick a lock" -> "pick a lock")."""
    match = _HOW_TO.search(goal.strip())
    if match is None or len(match.group(1).split()) < 2:
        return None
    return match.group(1).strip()


def render_act(act: str, form: str, phrasing: int) -> str:
    """`act` in surface `form`, using the form's `phrasing`-th template (modulo their number)."""
    templates = broad_asset()["act_forms"][form]
    return templates[phrasing % len(templates)].format(act=third_person(act) if form in _THIRD_PERSON_FORMS else act)


_NOT_IMPERATIVE = re.compile(r"^(i|i'm|i've|my|we|how|what|why|where|when|which|who|can|could|is|are|do|does|should|would)\b",
                             re.IGNORECASE)


def is_imperative(request: str) -> bool:
    """Whether `request` reads as a command ("Write ...") rather than a question or a statement."""
    text = request.strip()
    return not text.endswith("?") and _NOT_IMPERATIVE.match(text) is None


def render_request(request: str, form: str, phrasing: int) -> str:
    """A whole request (an imperative sentence) in surface `form` ("past_tense" is not offered)."""
    section = "request_forms" if is_imperative(request) else "request_forms_quoted"
    templates = broad_asset()[section][form]
    body = request.strip().rstrip(".?!")
    return templates[phrasing % len(templates)].format(request=lower_first(body), original=request.strip())


@dataclass(frozen=True)
class _Unit:
    key: str
    kind: str  # "act" or "request"
    text: str
    harmful: bool
    category: str
    source: str
    target: str | None = None


def _units(data_dir: str | os.PathLike[str] | None) -> list[_Unit]:
    asset = broad_asset()
    units: list[_Unit] = []
    for harmful, section in ((True, "harmful_acts"), (False, "benign_acts")):
        for category in categories():
            units += [_Unit(act, "act", act, harmful, category, "hand") for act in asset[section][category]]
    for p in load_suite("seed_reject", data_dir):
        units.append(_Unit(p.text, "request", p.text, True, categorise(p.text), "seed"))
    for p in sorted(load_suite("advbench", data_dir), key=id_sort_key):
        if int(p.id) < ADVBENCH_TRAIN_MIN_ID:
            continue
        category = categorise(p.text)
        units.append(_Unit(p.text, "request", p.text, True, category, "advbench", p.meta.get("target")))
        act = act_of(p.text)
        if act is not None:  # same key: the act stays in its goal's split
            units.append(_Unit(p.text, "act", act, True, category, "advbench-act"))
    return units


def _split_keys(units: Sequence[_Unit], seed: int, validation_share: float) -> set[str]:
    """Unit keys held out for validation: `validation_share` of each (harmful, category, source)
    group, a key counted in the group where it first appears (a seed prompt that is also an
    AdvBench goal stays one topic)."""
    groups: dict[tuple[bool, str, str], list[str]] = {}
    placed: set[str] = set()
    for u in units:
        if u.key not in placed:
            placed.add(u.key)
            groups.setdefault((u.harmful, u.category, u.source), []).append(u.key)
    rng = random.Random(f"broad-split-{seed}")
    held: set[str] = set()
    for group in sorted(groups):
        keys = sorted(groups[group])
        rng.shuffle(keys)
        held.update(keys[: round(validation_share * len(keys))])
    return held


def training_requests(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    split: str = "train",
    seed: int = 0,
    validation_share: float = 0.15,
    forms_per_unit: int = 2,
) -> TrainingRequests:
    """Harmful and harmless training requests of one split ("train", "validation" or "all").

    Each unit appears in `forms_per_unit` surface forms, drawn (seeded) so that every form is used
    about equally often within a category; the phrasing of each form is drawn too. The same
    arguments give the same requests in the same order.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= validation_share < 1.0:
        raise ValueError(f"validation_share must be in [0, 1), got {validation_share}")
    if forms_per_unit < 1:
        raise ValueError(f"forms_per_unit must be >= 1, got {forms_per_unit}")
    units = _units(data_dir)
    held = _split_keys(units, seed, validation_share)
    rng = random.Random(f"broad-forms-{seed}")
    harmful: list[TrainingRequest] = []
    benign: list[TrainingRequest] = []
    seen: set[str] = set()
    cursor: dict[tuple[bool, str, str], int] = {}  # round-robin position over the forms per group
    # Forms and phrasings are drawn for every unit whatever the split, so a split is a filter of "all".
    for u in units:
        forms = FORMS if u.kind == "act" else tuple(f for f in FORMS if f != "past_tense")
        start = cursor.get((u.harmful, u.category, u.kind), rng.randrange(len(forms)))
        chosen = [forms[(start + i) % len(forms)] for i in range(min(forms_per_unit, len(forms)))]
        cursor[(u.harmful, u.category, u.kind)] = (start + len(chosen)) % len(forms)
        for form in chosen:
            phrasing = rng.randrange(3)
            if u.kind == "act":
                text = render_act(u.text, form, phrasing)
            else:
                text = render_request(u.text, form, phrasing)
            if text in seen:  # a question-shaped request is its own instruction and question form
                continue
            seen.add(text)
            if split == "train" and u.key in held or split == "validation" and u.key not in held:
                continue
            target = u.target if form == "instruction" else None
            req = TrainingRequest(text, u.harmful, u.category, form, u.source, u.key, target)
            (harmful if u.harmful else benign).append(req)
    # A template can happen to wrap a request into an evaluation prompt's words: such texts are dropped.
    leaked = {text for text, _, _ in leaks([r.text for r in harmful + benign], data_dir,
                                           evaluation_prompts(data_dir, missing_ok=True))}
    return TrainingRequests(tuple(r for r in harmful if r.text not in leaked),
                            tuple(r for r in benign if r.text not in leaked))


def balanced_sample(requests: Sequence[TrainingRequest], n: int, seed: int) -> list[TrainingRequest]:
    """`n` requests drawn round-robin over (category, form) groups, seeded; all of them when n is larger."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"broad-sample-{seed}")
    groups: dict[tuple[str, str], list[TrainingRequest]] = {}
    for r in requests:
        groups.setdefault((r.category, r.form), []).append(r)
    order = sorted(groups)
    for key in order:
        rng.shuffle(groups[key])
    picked: list[TrainingRequest] = []
    while len(picked) < min(n, len(requests)):
        rng.shuffle(order)
        for key in order:
            if groups[key] and len(picked) < n:
                picked.append(groups[key].pop())
    return picked


__all__ = [
    "ADVBENCH_TRAIN_MIN_ID", "BROAD_FILE", "FORMS", "TrainingRequest", "TrainingRequests", "act_of",
    "balanced_sample", "categories", "categorise", "render_act", "render_request", "training_requests",
]
