"""Distillation of a trained expert into another (`train-expert --distill-from TEACHER`).

Issue 11's shared-trunk experts learn the refusal less well from the recipe's answers alone when
their LoRA lives only in the top layers. With a teacher (a full-depth expert trained on the training
splits), every answer position of every training example is trained towards the teacher's whole
next-token distribution, KL(teacher || student), instead of towards one token (refusals) or the
base (benign answers). The teacher also answers `teacher_prompts` more requests of the recipe's
training split (never its validation topics, never an evaluation prompt), so the student sees more
requests than the recipe labelled.

    >>> from ngsd.experts.training.distill import kl_from
    >>> import torch
    >>> logits = torch.randn(1, 3, 8)
    >>> float(kl_from(logits, logits).abs().max()) < 1e-6
    True
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .broad import balanced_sample, training_requests
from .config import TrainExpertConfig
from .examples import Example, chat_prompt_ids, count_by, generate_ids

# The teacher's extra requests come from a pool with each training topic in four surface forms (the
# recipe's own pool has two, and its look-alikes are nearly all used by the recipe already).
TEACHER_POOL_FORMS = 4
TEACHER_HARMFUL_SHARE = 2 / 3


def load_teacher(base: Any, teacher: str | Path, tokenizer: Any = None) -> Any:
    """The teacher as a frozen model in eval mode; `base` is untouched.

    `teacher` is what guarded decoding's `expert=` takes (`ngsd.experts.resolve`): a peft adapter folder
    or "shipped" (merged into a copy of `base`), "nest" or a NeST delta folder, or a model folder / hub id
    with the base's tokenizer. `tokenizer` (the base's) lets a model folder's tokenizer be checked and a
    teacher whose LM head is padded to another row count pair with the base (`kl_from` compares them over
    the rows both heads have).
    """
    import copy

    from torch import nn

    from ..lora import LoraAdapter
    from ..resolve import resolve_expert

    try:
        resolved = resolve_expert(str(teacher), base, tokenizer=tokenizer)
        if isinstance(resolved, LoraAdapter):
            check_adapter_fits(resolved, base)
    except (OSError, ValueError) as err:
        raise ValueError(f"--distill-from {teacher}: not a usable expert ({err}); pass a trained expert's "
                         "adapter folder, 'shipped', 'nest' or a model folder") from err
    nest_folder = _nest_delta_folder(teacher)
    if nest_folder is not None:  # its adapter form has no peft folder to merge: fold the delta into a copy instead
        from ...nest.update import apply_delta

        resolved = apply_delta(copy.deepcopy(base), nest_folder)
    elif isinstance(resolved, LoraAdapter):
        from peft import PeftModel

        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            resolved = PeftModel.from_pretrained(copy.deepcopy(base), resolved.source).merge_and_unload()
    assert isinstance(resolved, nn.Module)
    resolved.eval()
    for p in resolved.parameters():
        p.requires_grad_(False)
    return resolved


def _nest_delta_folder(teacher: str | Path) -> Path | None:
    """The NeST delta folder `teacher` names ("nest" or a folder holding a delta), else None."""
    from ...nest.shipped import is_nest_delta, shipped_nest_path

    folder = shipped_nest_path() if str(teacher) == "nest" else Path(teacher)
    return folder if is_nest_delta(folder) else None


def check_adapter_fits(adapter: Any, base: Any) -> None:
    """ValueError (guarded decoding's own, naming the layer and the base the adapter was trained for) unless the LoRA
    `adapter` fits `base` (checked on the layers, nothing attached, so `base` is left as it was). An adapter of
    another base otherwise failed inside peft with a RuntimeError (size mismatch), after the whole data step."""
    adapter.fitting_layers(base)


def kl_from(reference_logits: torch.Tensor, trained_logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || trained) per position, over the whole vocabulary (float32): the teacher's or,
    for benign examples without a teacher, the base's distribution as the reference.

    Heads padded to different row counts (a separate teacher of the base's family, checked by
    `load_teacher`) are compared over the rows both have, as guarded decoding mixes them: the rows past
    the smaller head are padding no text maps to.
    """
    rows = min(reference_logits.shape[-1], trained_logits.shape[-1])
    reference_logits, trained_logits = reference_logits[..., :rows], trained_logits[..., :rows]
    ref = F.log_softmax(reference_logits.float(), dim=-1)
    trained = F.log_softmax(trained_logits.float(), dim=-1)
    return (ref.exp() * (ref - trained)).sum(-1)


def teacher_examples(
    teacher: Any, tokenizer: Any, data_dir: Path, cfg: TrainExpertConfig, used_prompts: Sequence[str],
    log: Callable[[str], None] = print,
) -> tuple[list[Example], dict[str, Any]]:
    """`cfg.teacher_prompts` training-split requests the recipe did not use, answered greedily by the teacher."""
    pool = training_requests(data_dir, split="train", seed=cfg.seed, validation_share=cfg.validation_share,
                             forms_per_unit=TEACHER_POOL_FORMS)
    used = set(used_prompts)
    n_harmful = round(cfg.teacher_prompts * TEACHER_HARMFUL_SHARE)
    # A seed of its own (the recipe's draws use cfg.seed), so the teacher's draw is not the recipe's order again.
    harmful = balanced_sample([r for r in pool.harmful if r.text not in used], n_harmful, cfg.seed + 7)
    benign = balanced_sample([r for r in pool.benign if r.text not in used], cfg.teacher_prompts - len(harmful), cfg.seed + 7)
    requests = harmful + benign
    log(f"greedy teacher answers for {len(harmful)} harmful and {len(benign)} look-alike training requests")
    answers = generate_ids(teacher, tokenizer, [chat_prompt_ids(tokenizer, r.text) for r in requests],
                           max_new_tokens=cfg.benign_max_new_tokens, batch_size=cfg.eval_batch_size * 2,
                           progress="teacher answers")
    examples = [Example("teacher", f"teacher/{'harmful' if r.harmful else 'lookalike'}/{r.form}", r.text, ids,
                        loss="teacher", complete=len(ids) < cfg.benign_max_new_tokens)
                for r, ids in zip(requests, answers)]
    summary = {"teacher": str(cfg.distill_from), "pool_forms_per_unit": TEACHER_POOL_FORMS,
               "teacher_prompts_by_category": count_by(r.category for r in requests),
               "teacher_prompts_by_kind": count_by("harmful" if r.harmful else "lookalike" for r in requests)}
    return examples, summary


__all__ = ["TEACHER_POOL_FORMS", "check_adapter_fits", "kl_from", "load_teacher", "teacher_examples"]
