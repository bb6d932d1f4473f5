"""Untrusted user text inside a chat template, encoded so that it can never act as markup.

A tokenizer parses special-token strings in the text it is given: a user who types `<|im_end|>`
gets the real end-of-turn id, ends their turn and can write the assistant's. Here the template
and the user text are encoded apart: the template (which we wrote) with special-token parsing, the
user text as plain characters (`split_special_tokens=True`), so every control id in the result
comes from the template. Where the text encoded whole holds exactly those control ids, its ids are
taken instead: they are the chat template's own (tokens merge across the seams).

>>> from transformers import AutoTokenizer                               # doctest: +SKIP
>>> ids = template_ids(tokenizer, "<|im_start|>user\\n" + SLOT + "<|im_end|>", ["<|im_end|>"])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

# Stands for a piece of user text while the template is rendered; never typed by anyone.
SLOT = "\u2063NGSD_UNTRUSTED_TEXT\u2063"


def control_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (chat markers, BOS/EOS, pad...)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def encode_plain(tokenizer, text: str, *, add_special_tokens: bool = False) -> list[int]:
    """`text` as plain characters: a special token's spelling in it is encoded as ordinary text.

    add_special_tokens adds the tokenizer's own BOS/EOS around it, as a plain `tokenizer(text)` would.
    """
    if control_token_ids(tokenizer).intersection(_split_encode(tokenizer, text, False)):
        # A tokenizer that ignores split_special_tokens: break each special spelling with a zero-width
        # space, which no special token contains.
        for token in sorted(getattr(tokenizer, "all_special_tokens", []) or [], key=len, reverse=True):
            if len(token) > 1:
                text = text.replace(token, token[0] + "\u200b" + token[1:])
    return _split_encode(tokenizer, text, add_special_tokens)


def _split_encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"])


def template_ids(tokenizer, rendered: str, fills: Sequence[str]) -> list[int]:
    """Token ids of `rendered` (template text holding one `SLOT` per entry of `fills`), the template
    pieces encoded with special-token parsing, each fill as plain text."""
    pieces = rendered.split(SLOT)
    if len(pieces) != len(fills) + 1:
        raise ValueError(
            f"the chat template kept {len(pieces) - 1} of the {len(fills)} text slots; it rewrites the message "
            "content, so untrusted text cannot be placed safely"
        )
    apart: list[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            apart.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if i < len(fills):
            apart.extend(encode_plain(tokenizer, fills[i]))
    # Encoded apart, tokens cannot merge across a seam (a prompt that starts with spaces or newlines; the extra
    # word-start marker of SentencePiece tokenizers), so the model would see ids the chat template never gives.
    # The text encoded whole is the template's own encoding, taken when its control ids are exactly the
    # template's: a fill that spells a special token (or forms one with the text around it) keeps the apart ids.
    filled = "".join(piece + (fills[i] if i < len(fills) else "") for i, piece in enumerate(pieces))
    whole = list(tokenizer(filled, add_special_tokens=False)["input_ids"])
    controls = control_token_ids(tokenizer)
    if [i for i in whole if i in controls] == [i for i in apart if i in controls]:
        return whole
    return apart
