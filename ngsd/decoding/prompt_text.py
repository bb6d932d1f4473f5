"""The check of one request text, shared by the library and the CLI (which runs it before importing torch)."""

from __future__ import annotations

from typing import Any


def check_prompt_text(prompt: Any, label: str) -> None:
    """One request: a non-blank str the tokenizer can encode (`label` names it in the error)."""
    if not isinstance(prompt, str):
        raise TypeError(f"{label} must be a string, got {type(prompt).__name__}"
                        + (" (decode bytes to str first)" if isinstance(prompt, (bytes, bytearray)) else ""))
    if not prompt.strip():
        raise ValueError(f"{label} is empty: give every request some text")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate: bytes that were not UTF-8, kept by surrogateescape
        raise ValueError(f"{label} is not valid text at character {error.start} (a lone surrogate, from input that "
                         "was not UTF-8); decode the input as UTF-8 (or fix its encoding) first") from None
