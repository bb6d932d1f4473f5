"""The named evaluation configurations: one JSON file each in this folder (`ngsd eval --config NAME`).

Light (no torch), so the command line can list and check names before importing the harness.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def config_names() -> list[str]:
    """Names of the configurations shipped with ngsd, e.g. ["advbench50", "demo", "full", "smoke"]."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
