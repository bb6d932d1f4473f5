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


SHIPPED_KEYWORDS = ("shipped", "nest")


def check_keyword_not_shadowing(name: str, what: str) -> None:
    """'shipped' and 'nest' name what ships with ngsd; a folder of that name in the working directory (the README's
    `train-nest --delta-out nest`) was silently passed over for them. Refuse the ambiguity, naming both readings."""
    if name in SHIPPED_KEYWORDS and Path(name).exists():
        raise ValueError(f"{what} {name!r} names the {'NeST delta' if name == 'nest' else 'expert'} shipped with "
                         f"ngsd, but a folder {name!r} exists in the working directory too: pass './{name}' (or its "
                         "full path) for that folder, or run from another directory for the shipped one")
