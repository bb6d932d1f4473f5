"""Where the experts shipped inside the package live (the loader needs only this, not the trainer)."""

from __future__ import annotations

from pathlib import Path

SHIPPED_EXPERTS = Path(__file__).resolve().parent.parent / "assets" / "experts"
EXPERT_NAME = "smollm2-135m-safety-lora"


def shipped_expert_path() -> Path:
    """Folder of the LoRA safety expert shipped with ngsd for the default model (peft format).

    >>> shipped_expert_path().name
    'smollm2-135m-safety-lora'
    """
    return SHIPPED_EXPERTS / EXPERT_NAME
