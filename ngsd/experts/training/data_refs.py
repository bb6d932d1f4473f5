"""Training texts that come from the shared benchmark data are named in a saved training set, not copied.

The data folder's files may not be copied into the project (SOURCES.md), and an expert's
`training_examples.jsonl` ships in the package. So a saved example says where each data text came from
instead of holding it: `"prompt_ref": "advbench/145"`; a response cut from a Vicuna refusal,
`"response_ref": {"ref": "expert_sft/7/answer", "sentences": 2, "digest": ...}`; a forced start from an
AdvBench target, `"prefix_ref": {"ref": "advbench/145/target", "tokens": 5, "digest": ...}`. Loading reads the
texts back from the data folder, rebuilds the token ids the way the recipe built them (`cap_response`,
the tokenizer), and checks them against the digest, so a retrain sees exactly the saved ids or fails saying
why. Texts the project wrote or the model generated stay in the file as they are.

Refs are found by matching, when a training set is saved: any builder's examples, and older files, get them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

from ...data import SUITES, load_suite, read_suite, resolve_data_dir, split_user_assistant


def vicuna_answer(sft_text: str) -> tuple[str, str]:
    """(user prompt, answer) of a SafeDecoding SFT text, the answer without Vicuna's "</s>"."""
    user, answer = split_user_assistant(sft_text)
    return user, answer.replace("</s>", "").strip()


def data_texts(data_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Every data text a training set may name, by ref: "seed_reject/<id>", "advbench/<id>",
    "advbench/<id>/target", "alpaca_eval/<even id>", "expert_sft/<row>/user" and "expert_sft/<row>/answer".
    A folder without one of these files gives no refs into it (training reads only what it finds)."""
    root = resolve_data_dir(data_dir)
    texts: dict[str, str] = {}

    def seed_reject() -> None:
        texts.update({f"seed_reject/{p.id}": p.text for p in load_suite("seed_reject", root)})

    def advbench() -> None:
        for p in load_suite("advbench", root):
            texts[f"advbench/{p.id}"] = p.text
            if p.meta.get("target"):
                texts[f"advbench/{p.id}/target"] = p.meta["target"]

    def alpaca_even() -> None:
        even_split = replace(SUITES["alpaca_eval"], id_parity="even")
        texts.update({f"alpaca_eval/{p.id}": p.text for p in read_suite(even_split, root)})

    def expert_sft() -> None:
        for p in load_suite("expert_sft", root):
            texts[f"expert_sft/{p.id}/user"], texts[f"expert_sft/{p.id}/answer"] = vicuna_answer(p.text)

    for read in (seed_reject, advbench, alpaca_even, expert_sft):
        try:
            read()
        except FileNotFoundError:
            continue
    return texts


def prompt_refs(texts: dict[str, str]) -> dict[str, str]:
    """Prompt text -> its ref (the first in `data_texts` order when a text repeats)."""
    refs: dict[str, str] = {}
    for ref, text in texts.items():
        if ref.count("/") == 1:
            refs.setdefault(text, ref)
    return refs


def ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


__all__ = ["data_texts", "ids_digest", "prompt_refs", "vicuna_answer"]
