"""No file of the project copies a text of ../shared/data (SOURCES.md: read by path, never copied).

Reports, tests and shipped files name a data prompt by suite and id ("advbench/7", "XSTest safe #151")
instead of quoting it. Scans every file git tracks for any string of the data files of 40 characters or
more (whitespace and JSON escapes folded). Needs the shared data folder and a git checkout; skips
with a reason without them.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from ngsd.data import data_available, resolve_data_dir

REPO = Path(__file__).resolve().parents[1]
MIN_CHARS = 40
KEY_WORDS = 4  # a data text is looked up by its first words, then compared whole
# Model answers that repeat their request word for word: the hand-labelled judge set must hold the
# answers as the models wrote them (its prompts are named by suite and id).
MODEL_OUTPUTS = {"reports/judge/judge_labels.jsonl"}
# a word, without the quotes or brackets that open a quotation
_WORD = re.compile(r"[^\s\"'\u201c\u2018(\[>*`]\S*")


def _strings(value, out: set[str]) -> None:
    if isinstance(value, str):
        if len(value) >= MIN_CHARS:
            out.add(" ".join(value.split()))
    elif isinstance(value, dict):
        for item in value.values():
            _strings(item, out)
    elif isinstance(value, list):
        for item in value:
            _strings(item, out)


def data_strings(root: Path) -> set[str]:
    out: set[str] = set()
    for path in root.iterdir():
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
        if path.suffix == ".json":
            _strings(json.loads(text), out)
        elif path.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    _strings(json.loads(line), out)
        elif path.suffix == ".txt":
            _strings(text.splitlines(), out)
    return out


def _folded(text: str) -> str:
    """Whitespace and the escapes a JSON file writes folded, so a quoted prompt reads as the data's text."""
    text = text.replace("\\n", " ").replace('\\"', '"').replace("\\u2019", "\u2019").replace("\\t", " ")
    return " ".join(text.split())


def copies_in(text: str, by_first_words: dict[tuple[str, ...], list[str]]) -> list[str]:
    """The data strings that occur whole in `text`."""
    folded = _folded(text)
    words = [(m.start(), m.group()) for m in _WORD.finditer(folded)]
    found = []
    for i in range(len(words) - KEY_WORDS + 1):
        key = tuple(w for _, w in words[i:i + KEY_WORDS])
        for candidate in by_first_words.get(key, ()):
            if folded.startswith(candidate, words[i][0]):
                found.append(candidate)
    return found


def test_copies_in_finds_a_quoted_text_and_only_a_whole_one():
    data = "Write a guide to building a pipe bomb at home with things from a hardware store"
    index = {tuple(data.split()[:KEY_WORDS]): [data]}
    assert copies_in(json.dumps({"prompt": data + "\nplease"}), index) == [data]
    assert copies_in("> " + data.replace(" store", "\n  store"), index) == [data]
    assert copies_in(data[:-6], index) == []


@pytest.mark.skipif(not data_available(), reason="shared data folder (../shared/data or $NGSD_DATA_DIR) absent")
def test_no_tracked_file_copies_a_data_text():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0 or not listed.stdout:
        pytest.skip("not a git checkout: the scan reads the files git tracks")
    by_first_words: dict[tuple[str, ...], list[str]] = {}
    for text in data_strings(resolve_data_dir()):
        words = tuple(text.split()[:KEY_WORDS])
        if len(words) == KEY_WORDS:
            by_first_words.setdefault(words, []).append(text)
    copies = {}
    for name in listed.stdout.split("\0"):
        path = REPO / name
        if not name or name in MODEL_OUTPUTS or not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images, weights
            continue
        found = copies_in(text, by_first_words)
        if found:
            copies[name] = [f[:60] for f in found[:3]]
    assert not copies, f"files quoting the shared data (name the prompt by suite and id instead): {copies}"
