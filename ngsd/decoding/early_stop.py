"""The reference's "already refusing" early stop (NGSD_SPEC.md section 4), per row.

Only for rows with alpha >= 0.5 once 128 tokens are out: every 7 tokens, up to 256, the last 64
generated tokens are checked for a refusal phrase, three or more trailing spaces, an emoji or a
control character. On a hit the row's length is capped at (current + 128), and past half of that
cap the row stops at the next '.', '!' or '?'.
"""

from __future__ import annotations

import re

REFUSAL_PHRASES = (
    "i cannot",
    "i can't",
    "i can not",
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "cannot provide",
    "can't provide",
    "i'm unable",
    "i am unable",
    "i won't",
    "i will not",
    "not able to provide",
)
_EMOJI = re.compile("[\U0001f300-\U0001faff\U00002600-\U000027bf]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MIN_ALPHA = 0.5
FIRST_CHECK = 128
CHECK_EVERY = 7
LAST_CHECK = 256
WINDOW = 64
EXTRA_TOKENS = 128
SENTENCE_END = (".", "!", "?")


def looks_finished(text: str) -> bool:
    lowered = text.lower().replace("\u2019", "'")
    return (
        any(phrase in lowered for phrase in REFUSAL_PHRASES)
        or text.endswith("   ")
        or bool(_EMOJI.search(text))
        or bool(_CONTROL.search(text))
    )


class EarlyStop:
    """Tracks each row's cap; `should_stop` is asked once per row and generated token."""

    def __init__(self, tokenizer, alphas: list[float]) -> None:
        if tokenizer is None:
            raise ValueError("early_stop needs a tokenizer to read the generated text; pass tokenizer=...")
        self.tokenizer = tokenizer
        self.enabled = [a >= MIN_ALPHA for a in alphas]
        self.caps: list[int | None] = [None] * len(alphas)

    def should_stop(self, row: int, generated: list[int]) -> bool:
        if not self.enabled[row]:
            return False
        count = len(generated)
        cap = self.caps[row]
        if cap is None:
            if FIRST_CHECK <= count <= LAST_CHECK and (count - FIRST_CHECK) % CHECK_EVERY == 0:
                window = self.tokenizer.decode(generated[-WINDOW:], skip_special_tokens=True)
                if looks_finished(window):
                    self.caps[row] = count + EXTRA_TOKENS
            return False
        if count >= cap:
            return True
        if count > cap // 2:
            last = self.tokenizer.decode(generated[-1:], skip_special_tokens=True)
            return any(mark in last for mark in SENTENCE_END)
        return False
