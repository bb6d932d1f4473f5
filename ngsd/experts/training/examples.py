"""The training set of the expert (the recipes in the package docstring): building, saving and tokenising it.

Three kinds of example: "refusal" (harmful request -> refusal), "recovery" (harmful request whose
answer started compliantly -> refusal), "benign" (harmless request -> the base's own answer, with a
KL loss so the expert stays close to the base there).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ...data import Prompt, id_sort_key, load_suite
from ...eval.judge import KeywordJudge
from .config import TrainExpertConfig
from .data_refs import data_texts, ids_digest, prompt_refs, vicuna_answer
from .prompts import FALLBACK_REFUSAL, REFUSAL_OPENING, SAFETY_SYSTEM_PROMPT, TURN_MARKERS, benign_train_prompts
from .splits import ADVBENCH_EVAL_BELOW, alpaca_training_prompts


@dataclass
class Example:
    """One training example: a chat prompt, an optional forced start (context only) and an answer.

    kind: "refusal", "recovery" or "benign"; loss: "ce" (cross-entropy on `response_ids`) or "kl"
    (match the base's distribution at every answer position); complete: the answer ended, so the
    end-of-turn token is trained too; refs: which parts are data texts, saved by name (`data_refs`).
    """

    kind: str
    source: str
    prompt: str
    response_ids: list[int]
    prefix_ids: list[int] = field(default_factory=list)
    loss: str = "ce"
    complete: bool = True
    refs: dict[str, Any] = field(default_factory=dict, compare=False)

    def describe(self, tokenizer: Any) -> dict[str, Any]:
        """The saved form: data texts by ref (`name_data_texts` finds them), everything else as it is."""
        record: dict[str, Any] = {"kind": self.kind, "source": self.source, "loss": self.loss}
        if "prompt" in self.refs:
            record["prompt_ref"] = self.refs["prompt"]
        else:
            record["prompt"] = self.prompt
        for part, ids in (("prefix", self.prefix_ids), ("response", self.response_ids)):
            if part in self.refs:
                record[f"{part}_ref"] = {**self.refs[part], "digest": ids_digest(list(ids))}
            else:
                record[part] = tokenizer.decode(ids)
        for part, ids in (("prefix", self.prefix_ids), ("response", self.response_ids)):
            if part not in self.refs:
                record[f"{part}_ids"] = list(ids)
        record["complete"] = self.complete
        return record


def holds_no_examples(path: str | os.PathLike[str]) -> bool:
    """True for a file with no line but blank ones: no training example to load (read up to the first line)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return not any(line.strip() for line in f)


def no_examples_message(path: str | os.PathLike[str]) -> str:
    """The error for an --examples file without examples: what it is, and where a file with examples comes from."""
    return (f"--examples {path}: the file holds no training examples (it is empty or blank); pass the training_examples.jsonl "
            "that `ngsd train-expert` writes into its --out folder (training_examples.pending.jsonl while that run "
            "trains or after it stopped), or drop --examples to build the examples")


def load_examples(path: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None,
                  tokenizer: Any = None) -> list[Example]:
    """Examples saved by a previous run (training_examples.jsonl), to retrain on exactly the same data.

    Data texts saved by ref are read from the data folder (`data_dir`, else $NGSD_DATA_DIR) and their token
    ids rebuilt with `tokenizer`, then checked against the saved digest; with `tokenizer`, saved answers must
    decode to their saved text (ids of another tokenizer are refused)."""
    examples, texts, decoded = [], None, []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                refs = {part: r[f"{part}_ref"] for part in ("prompt", "prefix", "response") if f"{part}_ref" in r}
                if refs and texts is None:
                    texts = data_texts(data_dir)
                ex = Example(r["kind"], r["source"], r.get("prompt", ""), r.get("response_ids", []),
                             r.get("prefix_ids", []), r["loss"], r["complete"], refs)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{path}: line {number} is not a training example ({type(error).__name__}: "
                                 f"{error}); pass a training_examples.jsonl written by ngsd train-expert") from error
            if refs:
                _resolve_refs(ex, texts, tokenizer, f"{path}: line {number}")
            if tokenizer is not None and isinstance(r.get("response"), str) and "response_ids" in r:
                decoded.append(tokenizer.decode(ex.response_ids) == r["response"])
            examples.append(ex)
    # ids saved by another model's tokenizer decode to other text (gibberish) with this one; a vocabulary at least as
    # large let them through. Most, not all: a decoding default that changed between versions moves a few.
    if decoded and sum(decoded) < len(decoded) / 2:
        raise ValueError(f"{path}: {len(decoded) - sum(decoded)} of {len(decoded)} saved answers decode to other text "
                         "with this model's tokenizer: the examples were tokenized for another model; build them with "
                         "this one (drop --examples)")
    if not examples:  # else read later as "none left once evaluation prompts are dropped", after the model loaded
        raise ValueError(no_examples_message(path))
    return examples


def _resolve_refs(ex: Example, texts: dict[str, str], tokenizer: Any, where: str) -> None:
    def text(ref: Any) -> str:
        if not isinstance(ref, str) or ref not in texts:
            raise ValueError(f"{where} names the data text {ref!r}, which the data folder does not hold (another "
                             "data version?); point --data-dir / NGSD_DATA_DIR at the data of SOURCES.md")
        return texts[ref]

    if "prompt" in ex.refs:
        ex.prompt = text(ex.refs["prompt"])
    if ("prefix" in ex.refs or "response" in ex.refs) and tokenizer is None:
        raise ValueError(f"{where} holds data texts by ref: reading it needs the tokenizer that built it")
    for part in ("prefix", "response"):
        spec = ex.refs.get(part)
        if spec is None:
            continue
        if not isinstance(spec, dict) or not ({"sentences", "tokens"} & spec.keys()):
            raise ValueError(f"{where}: {part}_ref {spec!r} is not a data-text ref; pass a training_examples.jsonl "
                             "written by ngsd train-expert")
        source = text(spec.get("ref"))
        if part == "prefix":
            ids = tokenizer(source, add_special_tokens=False)["input_ids"][: spec["tokens"]]
            ex.prefix_ids = ids
        elif "sentences" in spec:
            ex.response_ids = join_ids(tokenizer, ex.prefix_ids, first_sentences(source, spec["sentences"]))
        else:
            ex.response_ids = join_ids(tokenizer, ex.prefix_ids, source)[: spec["tokens"]]
        ids = ex.prefix_ids if part == "prefix" else ex.response_ids
        if ids_digest(list(ids)) != spec.get("digest"):
            raise ValueError(f"{where}: {spec['ref']} gives other token ids than the examples were trained on (another "
                             "data version, or another tokenizer); retrain without --examples to build the data again")


def name_data_texts(examples: Sequence[Example], tokenizer: Any, data_dir: str | os.PathLike[str] | None) -> None:
    """Set `refs` on each example for the parts that are data texts, so that saving names them (`data_refs`):
    its prompt; a forced start cut from its AdvBench goal's target; a response cut from a Vicuna refusal of
    its prompt, as `cap_response` cuts one (whole sentences, or tokens when the first sentence was too long)."""
    try:
        texts = data_texts(data_dir)
    except FileNotFoundError:
        return  # nothing here came from a data folder that is not there
    by_prompt = prompt_refs(texts)
    answers: dict[str, list[tuple[str, str]]] = {}
    for ref, user in texts.items():
        if ref.startswith("expert_sft/") and ref.endswith("/user"):
            answer_ref = ref[: -len("user")] + "answer"
            answers.setdefault(user, []).append((answer_ref, texts[answer_ref]))
    for ex in examples:
        prompt_ref = ex.refs.get("prompt") or by_prompt.get(ex.prompt)
        if prompt_ref is not None:
            ex.refs["prompt"] = prompt_ref
        target = f"{prompt_ref}/target"
        if "prefix" not in ex.refs and ex.prefix_ids and target in texts:
            if tokenizer(texts[target], add_special_tokens=False)["input_ids"][: len(ex.prefix_ids)] == list(ex.prefix_ids):
                ex.refs["prefix"] = {"ref": target, "tokens": len(ex.prefix_ids)}
        if "response" not in ex.refs:
            for answer_ref, answer in answers.get(ex.prompt, []):
                span = _response_span(tokenizer, answer, ex)
                if span is not None:
                    ex.refs["response"] = {"ref": answer_ref, **span}
                    break


def _response_span(tokenizer: Any, text: str, ex: Example) -> dict[str, int] | None:
    """How `cap_response` cut `text` into this example's response ids, if it did."""
    target, previous = list(ex.response_ids), None
    for n in range(1, len(text) + 2):
        part = first_sentences(text, n)
        if part == previous:
            break
        if join_ids(tokenizer, ex.prefix_ids, part) == target:
            return {"sentences": n}
        previous = part
    if not ex.complete and join_ids(tokenizer, ex.prefix_ids, text)[: len(target)] == target:
        return {"tokens": len(target)}
    return None


def chat_prompt_ids(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat up to the start of the assistant's answer (tokenizer's template)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def turn_end_ids(tokenizer: Any) -> list[int]:
    """Tokens the template puts after an assistant answer, up to and including the eos token."""
    probe = "PROBE"
    msgs = [{"role": "user", "content": "x"}]
    head = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": probe}], tokenize=False)
    tail = full[len(head):] if full.startswith(head) else full[full.rfind(probe):]
    tail = tail[tail.find(probe) + len(probe):]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in ids:
        return ids[: ids.index(eos) + 1]
    return [eos] if eos is not None else ids


def encode_example(tokenizer: Any, ex: Example, end_ids: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels -100 on the prompt and the forced prefix."""
    prompt_ids = chat_prompt_ids(tokenizer, ex.prompt)
    answer = list(ex.response_ids) + (list(end_ids) if ex.complete else [])
    ids = prompt_ids + list(ex.prefix_ids) + answer
    labels = [-100] * (len(prompt_ids) + len(ex.prefix_ids)) + answer
    return ids[:max_length], labels[:max_length]


def check_example_token_ids(examples: Sequence[Example], vocab: int) -> None:
    """Examples saved with another model's tokenizer hold ids this model lacks (the embedding raised a bare
    IndexError, after minutes of work)."""
    largest = max((max(ids) for ex in examples for ids in (ex.response_ids, ex.prefix_ids) if ids), default=-1)
    if largest >= vocab:
        raise ValueError(f"the training examples hold token id {largest}, and this model has {vocab} tokens: they were "
                         "tokenized for another model; build the examples with this one (drop --examples)")


def join_ids(tokenizer: Any, prefix_ids: Sequence[int], text: str) -> list[int]:
    """Token ids of `text` continuing after `prefix_ids` (a space in between unless one is there)."""
    if prefix_ids:
        last = tokenizer.decode(list(prefix_ids[-1:]))
        if last and not last[-1].isspace():
            text = " " + text
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# Generation helpers (plain HF generate, batched, left padding)


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of `items` of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    progress: str | None = None,
) -> list[list[int]]:
    """New token ids per prompt (eos and padding removed); prompts are lists of token ids."""
    from tqdm.auto import tqdm

    from ...loading import show_progress

    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    outputs: list[list[int]] = []
    bar = tqdm(total=len(prompt_ids), desc=progress, disable=progress is None or not show_progress(), leave=False)
    for chunk in batches(list(prompt_ids), batch_size):
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **kwargs)
        for row in out[:, width:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            outputs.append([t for t in row if t != pad])
        bar.update(len(chunk))
    bar.close()
    return outputs


# ----------------------------------------------------------------------------------------------
# Building the training set


def vicuna_refusals(data_dir: Path, judge: KeywordJudge | None = None) -> dict[str, list[str]]:
    """SafeDecoding's Vicuna-7B refusals (expert_sft_vicuna.json), grouped by user prompt.

    The texts end with Vicuna's "</s>", which is stripped. A few are degenerate ("It is not</s>",
    accepted by SafeDecoding's own judge through its "It is not</s>" string): answers shorter than
    20 characters or without a refusal string are dropped.
    """
    judge = judge or KeywordJudge()
    grouped: dict[str, list[str]] = {}
    for rec in load_suite("expert_sft", data_dir):
        user, answer = vicuna_answer(rec.text)
        if len(answer) >= 20 and judge.is_refusal(answer):
            grouped.setdefault(user, []).append(answer)
    return grouped


def self_refusals(
    model: Any, tokenizer: Any, prompts: Sequence[str], cfg: TrainExpertConfig, judge: KeywordJudge
) -> dict[str, list[str]]:
    """SafeDecoding's step: refusals the model samples under the safety system prompt.

    Up to `cfg.max_trials` rounds, each sampling the slots still empty; an answer is kept when it
    has at least 10 characters (SafeDecoding's minimum) and the judge finds a refusal in its first
    60 characters (the expert's first tokens are what the gate mixes in). Kept answers are cut to
    their first two sentences: the 135M model drifts off topic after that.
    """
    kept: dict[str, list[str]] = {p: [] for p in prompts}
    for trial in range(cfg.max_trials if cfg.refusals_per_prompt else 0):
        todo = [p for p in prompts for _ in range(cfg.refusals_per_prompt - len(kept[p]))]
        if not todo:
            break
        answers = generate_ids(
            model, tokenizer, [chat_prompt_ids(tokenizer, p, SAFETY_SYSTEM_PROMPT) for p in todo],
            max_new_tokens=cfg.refusal_max_new_tokens, do_sample=True, temperature=cfg.temperature,
            top_p=cfg.top_p, batch_size=cfg.eval_batch_size * 2, progress=f"self refusals, round {trial + 1}",
        )
        for p, ids in zip(todo, answers):
            text = first_sentences(tokenizer.decode(ids, skip_special_tokens=True), 2)
            if len(text) >= 10 and judge.is_refusal(text[:60]) and len(kept[p]) < cfg.refusals_per_prompt and text not in kept[p]:
                kept[p].append(text)
    return kept


def opening_refusals(
    model: Any, tokenizer: Any, prompts: Sequence[str], cfg: TrainExpertConfig
) -> dict[str, str]:
    """For prompts the sampling step left without a refusal: the model's own greedy continuation of
    the forced opening `REFUSAL_OPENING` (under the safety system prompt), cut to its first sentence,
    or its first two when the second does not turn helpful. Falls back to a fixed refusal when the
    first sentence already turns (see `TURN_MARKERS`)."""
    opening_ids = tokenizer(REFUSAL_OPENING, add_special_tokens=False)["input_ids"]
    answers = generate_ids(
        model, tokenizer, [chat_prompt_ids(tokenizer, p, SAFETY_SYSTEM_PROMPT) + opening_ids for p in prompts],
        max_new_tokens=cfg.refusal_max_new_tokens, batch_size=cfg.eval_batch_size * 2, progress="refusal openings",
    )
    result = {}
    for p, ids in zip(prompts, answers):
        full = tokenizer.decode(opening_ids + ids, skip_special_tokens=True)
        two, one = first_sentences(full, 2), first_sentences(full, 1)
        if not turns_helpful(two[len(one):]) and not turns_helpful(one):
            result[p] = two
        elif not turns_helpful(one):
            result[p] = one
        else:
            result[p] = FALLBACK_REFUSAL
    return result


def cap_response(
    tokenizer: Any, text: str, max_tokens: int, prefix_ids: Sequence[int] = ()
) -> tuple[list[int], bool]:
    """Token ids of the longest run of whole sentences of `text` within `max_tokens` (after
    `prefix_ids`), and whether the answer is complete. A first sentence longer than the cap is cut
    and marked incomplete, so no end-of-turn token is trained after it. Long refusals (Vicuna's run
    to 200+ tokens) cost training time while the guard only needs their opening."""
    best: list[int] | None = None
    previous = ""
    for n in range(1, len(text) + 2):
        part = first_sentences(text, n)
        if part == previous:  # no further complete sentence: an unfinished tail is dropped
            break
        ids = join_ids(tokenizer, prefix_ids, part)
        if len(ids) > max_tokens:
            break
        best, previous = ids, part
    if best is not None:
        return best, True
    return join_ids(tokenizer, prefix_ids, text)[:max_tokens], False


def turns_helpful(text: str) -> bool:
    """Whether `text` turns from refusing to helping (holds one of `TURN_MARKERS`)."""
    return any(m in text for m in TURN_MARKERS)


def first_sentences(text: str, n: int) -> str:
    """The first `n` sentences of `text` (all of it, stripped, if it has fewer complete ones)."""
    text = text.strip()
    end = 0
    for _ in range(n):
        match = re.search(r"[.!?](\s|$)", text[end:])
        if match is None:
            return text if end == 0 else text[:end].strip()
        end += match.start() + 1
    return text[:end].strip()


def build_examples(
    model: Any, tokenizer: Any, data_dir: Path, cfg: TrainExpertConfig, log: Callable[[str], None] = print
) -> tuple[list[Example], dict[str, Any]]:
    """The whole training set (see the package docstring) and a summary of what went into it."""
    rng = random.Random(cfg.seed)
    judge = KeywordJudge()
    seed_prompts = [p.text for p in load_suite("seed_reject", data_dir)]
    advbench = sorted(load_suite("advbench", data_dir), key=id_sort_key)
    # SOURCES.md: ids below 130 are evaluation (v4 drew from ids >= 50, which let 7 of them in).
    pool = [p for p in advbench if int(p.id) >= ADVBENCH_EVAL_BELOW]
    adv_train: list[Prompt] = sorted(rng.sample(pool, min(cfg.advbench_prompts, len(pool))), key=id_sort_key)
    summary: dict[str, Any] = {
        "seed_prompts": len(seed_prompts),
        "advbench_train_ids": [int(p.id) for p in adv_train],
        "advbench_excluded_ids": f"ids < {ADVBENCH_EVAL_BELOW} (evaluation set)",
        "benign_prompts": len(benign_train_prompts()),
    }
    harmful = seed_prompts + [p.text for p in adv_train]

    # 1. refusals. Seed prompts: the model's own, sampled under the safety system prompt
    # (SafeDecoding's step), then SafeDecoding's Vicuna refusals for the slots left empty.
    # AdvBench prompts and any prompt still without one: the model's own continuation of a forced
    # refusal opening (one greedy pass; see opening_refusals).
    refusals: dict[str, list[tuple[str, str]]] = {p: [] for p in harmful}
    if cfg.refusal_source in ("self+vicuna", "self"):
        log(f"sampling self refusals for {len(seed_prompts)} seed prompts (up to {cfg.max_trials} rounds)")
        for p, texts in self_refusals(model, tokenizer, seed_prompts, cfg, judge).items():
            refusals[p] += [("self", t) for t in texts]
    if cfg.refusal_source in ("self+vicuna", "vicuna"):
        vicuna = vicuna_refusals(data_dir, judge)
        for p in seed_prompts:
            for text in vicuna.get(p, []):
                if len(refusals[p]) < max(cfg.refusals_per_prompt, 1):
                    refusals[p].append(("vicuna", text))
    missing = [p for p in harmful if not refusals[p]]
    if missing:
        log(f"refusal openings continued by the model for {len(missing)} prompts")
        for p, text in opening_refusals(model, tokenizer, missing, cfg).items():
            refusals[p].append(("opening" if text != FALLBACK_REFUSAL else "fixed", text))
    summary["refusals_by_source"] = count_by(s for p in harmful for s, _ in refusals[p])
    summary["refusal_opening"] = REFUSAL_OPENING
    summary["safety_system_prompt"] = SAFETY_SYSTEM_PROMPT

    examples: list[Example] = []
    for p in harmful:
        for source, text in refusals[p]:
            ids, complete = cap_response(tokenizer, text, cfg.max_response_tokens)
            examples.append(Example("refusal", source, p, ids, complete=complete))

    # 2. recovery after a compliant start: the base's own greedy start and AdvBench's target.
    max_k = max(cfg.prefix_lengths)
    log(f"greedy starts of the base for {len(harmful)} harmful prompts")
    starts = generate_ids(
        model, tokenizer, [chat_prompt_ids(tokenizer, p) for p in harmful], max_new_tokens=max_k,
        batch_size=cfg.eval_batch_size * 2, progress="base starts",
    )
    targets = {p.text: p.meta.get("target") for p in adv_train}
    for p, start in zip(harmful, starts):
        if not refusals[p]:
            continue
        options = []
        if start and not judge.is_refusal(tokenizer.decode(start)):
            options.append(("base-start", start))
        if targets.get(p):
            options.append(("advbench-target", tokenizer(targets[p], add_special_tokens=False)["input_ids"]))
        offset = rng.randrange(len(options)) if options else 0
        for n in range(cfg.recovery_per_prompt):
            if not options:
                break
            source, ids = options[(n + offset) % len(options)]
            k = min(rng.choice(cfg.prefix_lengths), len(ids))
            _, text = refusals[p][n % len(refusals[p])]
            prefix = list(ids[:k])
            ids, complete = cap_response(tokenizer, text, cfg.max_response_tokens, prefix)
            examples.append(Example("recovery", source, p, ids, prefix_ids=prefix, complete=complete))

    # 3. benign: the base's own greedy answers to everyday requests, and to AlpacaEval's even ids,
    # so that the expert opens a generic instruction's answer where the base opens it.
    alpaca = alpaca_training_prompts(data_dir)[: cfg.alpaca_benign_prompts] if cfg.alpaca_benign_prompts else []
    summary["alpaca_benign_prompts"] = len(alpaca)
    benign = benign_train_prompts() + alpaca
    log(f"greedy base answers for {len(benign)} benign prompts")
    answers = generate_ids(
        model, tokenizer, [chat_prompt_ids(tokenizer, p) for p in benign],
        max_new_tokens=cfg.benign_max_new_tokens, batch_size=cfg.eval_batch_size * 2, progress="benign answers",
    )
    first_alpaca = len(benign) - len(alpaca)
    for i, (p, ids) in enumerate(zip(benign, answers)):
        complete = len(ids) < cfg.benign_max_new_tokens
        if i >= first_alpaca and cfg.alpaca_benign_tokens is not None and len(ids) > cfg.alpaca_benign_tokens:
            ids, complete = ids[: cfg.alpaca_benign_tokens], False
        examples.append(Example("benign", "base-greedy", p, ids, loss=cfg.benign_loss, complete=complete))
    summary["examples_by_kind"] = count_by(e.kind for e in examples)
    summary["examples_by_source"] = count_by(f"{e.kind}/{e.source}" for e in examples)
    return examples, summary


def count_by(items: Iterable[str]) -> dict[str, int]:
    """How often each item occurs, in first-seen order."""
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts
