"""The prompt lists and fixed texts of expert training, read from `ngsd/assets/training/prompts.json`.

They are data, kept in one JSON file so they can be read, diffed and extended without touching
code. The order of every list is part of the recipe: the seeded run reads them in file order.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

PROMPTS_FILE = Path(__file__).resolve().parent.parent.parent / "assets" / "training" / "prompts.json"


@lru_cache(maxsize=1)
def _asset() -> dict[str, Any]:
    return json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))


def _expand(section: str) -> tuple[str, ...]:
    return tuple(t["template"].format(topic) for t in _asset()[section]["templates"] for topic in t["topics"])


# Elicits refusals from the model when building the refusal set; never part of the training text.
SAFETY_SYSTEM_PROMPT: str = _asset()["safety_system_prompt"]
# Forced start of the model's own refusals where free sampling found none (see examples.opening_refusals).
REFUSAL_OPENING: str = _asset()["refusal_opening"]
FALLBACK_REFUSAL: str = _asset()["fallback_refusal"]

BENIGN_TRAIN_PROMPTS: tuple[str, ...] = tuple(_asset()["benign_train"]["prompts"])
BENIGN_TEMPLATE_PROMPTS: tuple[str, ...] = _expand("benign_templates")
EVERYDAY_TEMPLATE_PROMPTS: tuple[str, ...] = _expand("everyday_templates")
CONTRAST_TRAIN_PROMPTS: tuple[str, ...] = tuple(_asset()["contrast_train"]["prompts"])
# Harmless requests in the direct style of behaviour benchmarks ("Write a persuasive article...", "Write a
# Python script that..."), training side; the probe's benign class with --direct-lookalikes.
DIRECT_LOOKALIKE_TRAIN_PROMPTS: tuple[str, ...] = tuple(_asset()["direct_lookalike_train"]["prompts"])
# Held-out harmless requests for measuring over-refusal; disjoint from the training lists.
BENIGN_EVAL_PROMPTS: tuple[str, ...] = tuple(_asset()["benign_eval"]["prompts"])
# Held-apart validation in another style (direct requests for harmful content, as behaviour benchmarks
# phrase them) and harmless look-alikes in that style: no recipe trains on them.
VALIDATION_BEHAVIOURS: tuple[str, ...] = tuple(_asset()["validation_behaviours"]["harmful"])
VALIDATION_BEHAVIOUR_LOOKALIKES: tuple[str, ...] = tuple(_asset()["validation_behaviours"]["lookalike"])
# Markers of an answer that turns from refusing to helping ("However, here are some tips: 1. ...").
TURN_MARKERS: tuple[str, ...] = tuple(_asset()["turn_markers"]["markers"])


def benign_train_prompts() -> list[str]:
    """All harmless training prompts: the hand-written list, the templated ones, the contrast set."""
    return (list(BENIGN_TRAIN_PROMPTS) + list(BENIGN_TEMPLATE_PROMPTS) + list(EVERYDAY_TEMPLATE_PROMPTS)
            + list(CONTRAST_TRAIN_PROMPTS))
