"""Text in, text out: chat-format the prompts, run guarded decoding, decode the answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .config import NGSDConfig
from .experts.resolve import ExpertLike
from .decoding.arguments import check_prompt_texts
from .decoding.loop import GuardedOutput, RowTrace, guarded_generate
from .loading import eos_token_ids
from .risk.reflection import left_pad
from .risk.untrusted import SLOT, encode_plain, template_ids


@dataclass
class GuardedResult:
    prompts: list[str]
    texts: list[str]
    traces: list[RowTrace]
    output: GuardedOutput

    def to_dicts(self) -> list[dict[str, Any]]:
        return [
            {"prompt": p, "text": t, "trace": tr.to_dict()} for p, t, tr in zip(self.prompts, self.texts, self.traces)
        ]


def encode_prompts(tokenizer, prompts: str | Sequence[str], *, chat: bool = True, device: str | torch.device = "cpu"):
    """Left-padded input_ids and attention_mask, each prompt wrapped in the chat template if asked.

    A prompt is encoded as plain text: a chat control token typed in it (`<|im_end|>`) stays
    characters and cannot end the user turn or open an assistant turn.
    """
    prompts = check_prompt_texts(prompts)
    if chat and getattr(tokenizer, "chat_template", None):
        turn = tokenizer.apply_chat_template([{"role": "user", "content": SLOT}], tokenize=False, add_generation_prompt=True)
        rows = [template_ids(tokenizer, turn, [p]) for p in prompts]
    else:
        # no chat template (or chat=False): encoded as `tokenizer(prompt)` would, with its own BOS/EOS
        rows = [encode_plain(tokenizer, p, add_special_tokens=True) for p in prompts]
    # the filler of the padding columns (masked out); the caller's tokenizer is not changed to get one
    pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if isinstance(i, int)), 0)
    return left_pad(rows, pad, device)


def generate(
    model: nn.Module,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    expert: ExpertLike = "shipped",
    config: NGSDConfig | None = None,
    chat: bool = True,
    max_new_tokens: int | Sequence[int] = 64,
    **kwargs: Any,
) -> GuardedResult:
    """Guarded answers to `prompts` (one batch). Extra keyword arguments go to `guarded_generate`;
    ``requests`` (the texts self-reflection judges) defaults to `prompts`.

    >>> import ngsd
    >>> model, tokenizer = ngsd.load_model()                                  # doctest: +SKIP
    >>> result = ngsd.generate(model, tokenizer, ["Write a poem about tea"])  # doctest: +SKIP
    >>> result.texts[0], result.traces[0].spikes[:8]                          # doctest: +SKIP
    """
    prompts = check_prompt_texts(prompts)
    input_ids, attention_mask = encode_prompts(tokenizer, prompts, chat=chat, device=model.device)
    kwargs.setdefault("eos_token_id", eos_token_ids(model, tokenizer))
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.setdefault("requests", prompts)  # given twice, it failed with "multiple values for keyword argument"
    output = guarded_generate(
        model,
        input_ids,
        attention_mask,
        expert=expert,
        config=config,
        max_new_tokens=max_new_tokens,
        tokenizer=tokenizer,
        **kwargs,
    )
    texts = [tokenizer.decode(trace.tokens, skip_special_tokens=True) for trace in output.traces]
    return GuardedResult(prompts=prompts, texts=texts, traces=output.traces, output=output)
