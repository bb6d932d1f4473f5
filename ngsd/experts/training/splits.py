"""The evaluation side of `../shared/data/SOURCES.md`, to keep it out of anything trained.

Evaluation prompts: AdvBench ids < 130, HarmBench, the GCG / AutoDAN / DeepInception goals and
prompts, XSTest (safe and unsafe), MT-Bench (every turn), GSM8K and AlpacaEval rows with an odd id.
`leaks` finds training texts that equal one of them after normalisation (case, punctuation and
spacing ignored) or that contain one of them whole (an evaluation request wrapped in a template).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ...data import SUITES, id_sort_key, load_suite, read_suite, resolve_data_dir

ADVBENCH_EVAL_BELOW = 130  # SOURCES.md: AdvBench ids below 130 are evaluation
_MIN_CONTAINED_CHARS = 30  # shorter evaluation texts ("Hi", a number) are not searched for inside others


def normalize(text: str) -> str:
    """Lower case, letters and digits only, single spaces: the form texts are compared in."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def evaluation_prompts(
    data_dir: str | os.PathLike[str] | None = None, *, missing_ok: bool = False
) -> list[tuple[str, str]]:
    """(suite, text) for every evaluation prompt and goal in the data folder.

    missing_ok: skip evaluation files the folder lacks (nothing can leak from a file that is not
    there) instead of raising `DataNotFoundError`; the training files must be there either way.
    """
    out: list[tuple[str, str]] = []
    folder = Path(resolve_data_dir(data_dir))
    for p in load_suite("advbench", data_dir):
        if int(p.id) < ADVBENCH_EVAL_BELOW:
            out.append(("advbench<130", p.text))
    for suite in ("harmbench", "gcg", "autodan", "deepinception", "xstest_safe", "xstest_unsafe", "gsm8k"):
        if missing_ok and not (folder / SUITES[suite].file).is_file():
            continue
        for p in load_suite(suite, data_dir):
            out.append((suite, p.text))
            if p.goal and suite in ("gcg", "autodan", "deepinception"):
                out.append((suite + " goal", p.goal))
    mt_bench = folder / SUITES["mt_bench"].file
    if not (missing_ok and not mt_bench.is_file()):  # every turn, not only the first the suite reads
        for line in mt_bench.read_text(encoding="utf-8").splitlines():
            if line.strip():
                out += [("mt_bench", turn) for turn in json.loads(line)["turns"]]
    if missing_ok and not (folder / SUITES["alpaca_eval"].file).is_file():
        return out
    out += [("alpaca_eval odd", p.text) for p in load_suite("alpaca_eval", data_dir)]  # odd ids only
    return out


def leaks(
    texts: Iterable[str], data_dir: str | os.PathLike[str] | None = None,
    evaluation: Sequence[tuple[str, str]] | None = None,
) -> list[tuple[str, str, str]]:
    """(training text, suite, evaluation text) for each training text that equals an evaluation
    prompt after `normalize`, or contains a long one whole."""
    evaluation = evaluation if evaluation is not None else evaluation_prompts(data_dir)
    exact = {normalize(t): (s, t) for s, t in evaluation}
    long = [(normalize(t), s, t) for s, t in evaluation if len(normalize(t)) >= _MIN_CONTAINED_CHARS]
    found = []
    for text in texts:
        norm = normalize(text)
        if norm in exact:
            found.append((text, *exact[norm]))
            continue
        padded = f" {norm} "
        for ev, suite, original in long:
            if len(ev) < len(norm) and f" {ev} " in padded:
                found.append((text, suite, original))
                break
    return found


_CHECKED_SUITES = ("harmbench", "gcg", "autodan", "deepinception", "xstest_safe", "xstest_unsafe", "gsm8k", "mt_bench",
                   "alpaca_eval")


def unchecked_evaluation_suites(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The evaluation suites whose files the data folder lacks: `without_evaluation_prompts` cannot check a
    training file against them (a folder of the training files only checks AdvBench ids < 130 alone)."""
    folder = Path(resolve_data_dir(data_dir))
    return [suite for suite in _CHECKED_SUITES if not (folder / SUITES[suite].file).is_file()]


def without_evaluation_prompts(examples: Sequence[Any], data_dir: str | os.PathLike[str] | None = None,
                               log: Callable[[str], None] | None = None) -> tuple[list[Any], dict[str, int]]:
    """The examples (each with a ``prompt``) whose prompt `leaks` finds no evaluation prompt in, and how many were
    dropped per evaluation suite: a training file given by path may hold any text, and training reads the
    training splits only. `log` is told which suites could not be checked (files missing from the folder)."""
    unchecked = unchecked_evaluation_suites(data_dir)
    if unchecked and log is not None:
        log(f"warning: the data folder lacks the files of {unchecked}: training examples cannot be checked against "
            "those evaluation prompts; point --data-dir at the full data folder (SOURCES.md) to check them")
    found = leaks([e.prompt for e in examples], data_dir, evaluation_prompts(data_dir, missing_ok=True))
    leaked = {text for text, _, _ in found}
    return [e for e in examples if e.prompt not in leaked], dict(Counter(suite for _, suite, _ in found))


def saved_prompts(records: Sequence[dict], data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The prompt of each saved training example: its text, or the data text its "prompt_ref" names (`data_refs`)."""
    from .data_refs import data_texts

    texts = data_texts(data_dir) if any("prompt_ref" in r for r in records) else {}
    return [r["prompt"] if "prompt" in r else texts[r["prompt_ref"]] for r in records]


def example_lines_without_evaluation_prompts(
    lines: Iterable[str], data_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The lines of a training_examples.jsonl whose "prompt" `leaks` finds no evaluation prompt in, in order
    (blank lines dropped): how a clean copy of an expert's data is made."""
    lines = [line for line in lines if line.strip()]
    prompts = saved_prompts([json.loads(line) for line in lines], data_dir)
    leaked = {text for text, _, _ in leaks(prompts, data_dir)}
    return [line for line, prompt in zip(lines, prompts) if prompt not in leaked]


_FUNCTION_WORDS = frozenset(
    "a an the to of and or for in on with that this is are be how by from as it its his her their my me i your you "
    "what can".split())


def content_words(text: str) -> frozenset[str]:
    """The words of `normalize(text)` without function words: what two requests share when they ask alike."""
    return frozenset(w for w in normalize(text).split() if w not in _FUNCTION_WORDS)


def near_duplicates(
    texts: Iterable[str], evaluation: Sequence[tuple[str, str]], threshold: float = 0.4
) -> list[tuple[str, str, str, float]]:
    """(text, suite, evaluation text, similarity) for each text whose content words overlap an evaluation
    prompt's by at least `threshold` (Jaccard): paraphrases `leaks` cannot see, for hand-written sets."""
    indexed = [(suite, original, content_words(original)) for suite, original in evaluation]
    found = []
    for text in texts:
        words = content_words(text)
        best = max(((len(words & w) / len(words | w), suite, original) for suite, original, w in indexed if w),
                   default=(0.0, "", ""))
        if best[0] >= threshold:
            found.append((text, best[1], best[2], round(best[0], 3)))
    return found


def alpaca_even_prompts(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Every AlpacaEval instruction with an even id (the training split), in id order."""
    even_split = replace(SUITES["alpaca_eval"], id_parity="even")
    return [p.text for p in sorted(read_suite(even_split, data_dir), key=id_sort_key)]


def alpaca_training_prompts(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """`alpaca_even_prompts` without those that repeat an evaluation prompt (AlpacaEval holds
    near-twins across its odd and even rows)."""
    even = alpaca_even_prompts(data_dir)
    leaked = {text for text, _, _ in leaks(even, evaluation=evaluation_prompts(data_dir, missing_ok=True))}
    return [t for t in even if t not in leaked]


__all__ = ["ADVBENCH_EVAL_BELOW", "alpaca_even_prompts", "alpaca_training_prompts", "evaluation_prompts", "leaks", "normalize",
           "saved_prompts"]
