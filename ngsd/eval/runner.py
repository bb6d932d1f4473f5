"""Batched, cached, resumable generation of every (method, prompt) pair of an evaluation.

Each finished answer is appended to a JSONL cache as soon as its batch is done, keyed by a hash
of (model fingerprint, expert fingerprint, method signature, prompt text, decoding settings). A
run that is interrupted and started again with the same cache skips everything already there,
so only the missing answers are generated. The expert fingerprint is the hash of the adapter's
weights, so retraining the expert invalidates its entries while "off" (which never uses the
expert) stays cached across experts.

Within one method the prompts of all suites are pooled, sorted by length and cut into batches,
which keeps padding small; the generation loop guarantees that a row's output does not depend on
what else is in its batch (up to float rounding), so batching does not change results.

>>> cache = GenerationCache("/tmp/ngsd-eval-doc/generations.jsonl")    # doctest: +SKIP
>>> runner = Runner(model, tokenizer, model_id="smollm2", expert="shipped", cache=cache)  # doctest: +SKIP
>>> records = runner.run([get_method("off")], {"advbench": prompts})      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..data import Prompt
from .methods import Method

CACHE_FORMAT = 1


@dataclass(frozen=True)
class DecodingSettings:
    """Decoding settings shared by every method of a run (greedy only: the comparison is deterministic)."""

    max_new_tokens: int = 64
    chat: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "greedy": True}


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: str | os.PathLike[str]) -> str:
    """Hash of a checkpoint folder for the answer cache: every file that can change an answer.

    Files under 64 MiB (configs, tokenizer, chat template, adapter weights) by content; larger weight
    files by name, size, modification time and the content of their first and last 8 MiB (hashing a
    multi-GB checkpoint whole on every run costs more than the run's start). Weights rewritten in
    place with the same shapes change the time and the tail at least.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        stat = path.stat()
        if stat.st_size < (64 << 20):
            digest.update(path.name.encode() + b"\0" + file_digest(path).encode())
        else:
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{_ends_digest(path)}".encode())
    return digest.hexdigest()[:16]


def _ends_digest(path: Path, span: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(span))
        f.seek(-span, os.SEEK_END)
        digest.update(f.read(span))
    return digest.hexdigest()


def _another_file(path: Path) -> bool:
    """A file with no cached answer in it, and more than a first line cut short by an interruption (which a rerun
    overwrites): a JSON document, a JSON line that is no answer, or several lines."""
    if GenerationCache(path):
        return False
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return True
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False  # empty, or one torn line
    return True


class GenerationCache:
    """Append-only JSONL store of generated answers, one object per line, looked up by key.

    A line cut short by an interruption is ignored on the next load (and overwritten by the
    regenerated answer, which is appended again).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "gen.jsonl")
    >>> cache = GenerationCache(path)
    >>> cache.put([{"key": "k1", "text": "hi"}])
    >>> GenerationCache(path).get("k1")["text"]
    'hi'
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._records: dict[str, dict[str, Any]] = {}
        self.skipped_lines = 0
        if self.path is not None and self.path.is_file():
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                        self._records[record["key"]] = record
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self.skipped_lines += 1

    @staticmethod
    def check_path(path: str | os.PathLike[str]) -> None:
        """Refuse a cache file that could not be written, before any answer is generated, without creating
        anything: the path is a writable file or absent, and its nearest existing folder is a writable folder."""
        path = Path(path)
        if path.exists():
            if not path.is_file() or not os.access(path, os.W_OK):
                raise ValueError(f"answer cache {path}: not a writable file; pass a file path")
            if _another_file(path):
                # answers appended to another file (a run's results.json) corrupted it
                raise ValueError(f"answer cache {path}: the file holds no cached answer but other content (a run's "
                                 "results.json?); pass another --cache path, or move that file away")
            return
        ancestor = path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"answer cache {path}: {ancestor} is not a writable folder, so the file cannot be made "
                             "there; pass another path")

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def get(self, key: str) -> dict[str, Any] | None:
        return self._records.get(key)

    def put(self, records: Sequence[dict[str, Any]]) -> None:
        for record in records:
            self._records[record["key"]] = record
        if self.path is None or not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            # Start on a fresh line in case the previous writer was killed mid-line.
            if f.tell() > 0 and not self._ends_with_newline():
                f.write("\n")
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


def cache_key(model_id: str, expert_id: str | None, method: Mapping[str, Any], prompt: str, settings: Mapping[str, Any]) -> str:
    payload = json.dumps(
        {"v": CACHE_FORMAT, "model": model_id, "expert": expert_id, "method": method, "prompt": prompt,
         "decoding": settings},
        sort_keys=True,
        ensure_ascii=False,
    )
    return _hash_text(payload)[:32]


def _batches(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _round(values: Sequence[float], digits: int = 4) -> list[float]:
    return [round(float(v), digits) for v in values]


def _reflection_summary(reflection: Any) -> dict[str, Any] | None:
    if reflection is None:
        return None
    data = reflection.to_dict() if hasattr(reflection, "to_dict") else dict(reflection)
    keys = ("risk", "alpha", "scores", "parsed", "missing", "source", "routed", "route_below", "divergence",
            "check_divergence", "reason")
    return {k: data[k] for k in keys if k in data}


class Runner:
    """Generates the answers of every method on every suite, through the cache, in batches.

    model_id / expert_id: fingerprints that go into the cache keys (see `model_fingerprint` and
    `expert_fingerprint` in `ngsd.eval.cli`); expert: anything `ngsd.generate` accepts as expert
    (a LoraAdapter, a model, an adapter folder), or None when only "off" runs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_id: str,
        expert: Any = None,
        expert_id: str | None = None,
        settings: DecodingSettings | None = None,
        batch_size: int = 16,
        cache: GenerationCache | None = None,
        progress: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.expert = expert
        self.expert_id = expert_id
        self.settings = settings or DecodingSettings()
        self.batch_size = batch_size
        self.cache = cache if cache is not None else GenerationCache(None)
        self.progress = progress
        from ..experts.resolve import common_vocabulary_size

        self.vocab_size = common_vocabulary_size(model, expert)
        self._probe_ids: dict[Path, str] = {}
        self.generated = 0  # answers generated by this runner (not read from the cache)
        self.reused = 0

    def key(self, method: Method, prompt: Prompt) -> str:
        signature = method.signature(self.vocab_size)
        probe = self._probe_id(method)
        if probe is not None:
            signature = {**signature, "probe": probe}
        return cache_key(
            self.model_id,
            self.expert_id if method.uses_expert else None,
            signature,
            prompt.text,
            self.settings.to_dict(),
        )

    def probe_folder(self, method: Method) -> Path | None:
        """The risk probe folder `method` reads (its own, else the one shipped for the model); None when it reads
        none."""
        reflection = method.config.reflection
        if not method.uses_reflection or reflection.mode not in ("auto", "probe"):
            return None
        from ..risk.probe import shipped_probe_path

        return Path(reflection.probe) if reflection.probe else shipped_probe_path(self.model)

    def _probe_id(self, method: Method) -> str | None:
        """Hash of the risk probe's files when `method` reads one, so a retrained probe never reuses
        answers cached under another."""
        folder = self.probe_folder(method)
        if folder is None:
            return None
        if folder not in self._probe_ids:
            self._probe_ids[folder] = _hash_text("".join(
                file_digest(f) for f in sorted(folder.iterdir())
                if f.suffix in (".json", ".safetensors") and f.name != "training_report.json"))[:16]
        return self._probe_ids[folder]

    def run(self, methods: Sequence[Method], suites: Mapping[str, Sequence[Prompt]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """method name -> suite name -> one record per prompt, in the suite's order."""
        needs_expert = [m.name for m in methods if m.uses_expert]
        if needs_expert and self.expert is None:
            raise ValueError(
                f"methods {needs_expert} need an expert; pass --expert (an adapter folder or 'shipped') or run "
                "only --methods off"
            )
        results: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for method in methods:
            self._generate_missing(method, suites)
            results[method.name] = {
                suite: [self._lookup(method, prompt) for prompt in prompts] for suite, prompts in suites.items()
            }
        return results

    def _lookup(self, method: Method, prompt: Prompt) -> dict[str, Any]:
        record = self.cache.get(self.key(method, prompt))
        if record is None:  # pragma: no cover - _generate_missing fills every key
            raise RuntimeError(f"no answer for method {method.name} on {prompt.suite}/{prompt.id}")
        # the answer is keyed by method and prompt text: the same text in another suite (or a renamed one) shares it,
        # and the record says where this prompt is now
        return {**record, "suite": prompt.suite, "prompt_id": prompt.id}

    def _generate_missing(self, method: Method, suites: Mapping[str, Sequence[Prompt]]) -> None:
        todo: list[Prompt] = []
        seen: set[str] = set()
        total = 0
        for prompts in suites.values():
            for prompt in prompts:
                total += 1
                key = self.key(method, prompt)
                if key in self.cache or key in seen:
                    self.reused += key in self.cache
                    continue
                seen.add(key)
                todo.append(prompt)
        if not todo:
            return
        # Similar lengths together: less padding per batch.
        lengths = {id(p): len(self.tokenizer(p.text, add_special_tokens=False)["input_ids"]) for p in todo}
        todo.sort(key=lambda p: lengths[id(p)])
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=total - len(todo), desc=f"eval {method.name}", unit="prompt",
                       dynamic_ncols=True)
        try:
            for batch in _batches(todo, self.batch_size):
                records = self._generate_batch(method, batch)
                self.cache.put(records)
                self.generated += len(records)
                if bar is not None:
                    bar.update(len(batch))
                    tokens = sum(r["n_tokens"] for r in records)
                    seconds = sum(r["gen_seconds"] for r in records)
                    bar.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.1f}")
        finally:
            if bar is not None:
                bar.close()

    def _generate_batch(self, method: Method, batch: list[Prompt]) -> list[dict[str, Any]]:
        from ..api import generate

        config = method.resolved_config(self.vocab_size)
        texts = [p.text for p in batch]
        alpha: Any = method.alpha
        reflections: list[Any] = [None] * len(batch)
        reflect_seconds = 0.0
        if method.uses_reflection and config.reflection.mode in ("generate", "prefill"):
            # Self-reflection is run here rather than inside generate (which would do exactly the same:
            # reflect(model, tokenizer, prompts, config.reflection)) to time it separately. The risk
            # probe ("auto"/"probe") reads generate's own prefill: nothing to run or time apart.
            from ..risk.reflection import reflect

            start = time.perf_counter()
            reflections = reflect(self.model, self.tokenizer, texts, config.reflection)
            reflect_seconds = time.perf_counter() - start
            alpha = [r.alpha for r in reflections]
        start = time.perf_counter()
        result = generate(
            self.model,
            self.tokenizer,
            texts,
            expert=self.expert if method.uses_expert else None,
            config=config,
            alpha=alpha,
            chat=self.settings.chat,
            max_new_tokens=self.settings.max_new_tokens,
        )
        gen_seconds = time.perf_counter() - start
        records = []
        reflections = [r if r is not None else trace.reflection for r, trace in zip(reflections, result.traces)]
        for prompt, text, trace, reflection in zip(batch, result.texts, result.traces, reflections):
            records.append(
                {
                    "key": self.key(method, prompt),
                    "method": method.name,
                    "suite": prompt.suite,
                    "prompt_id": prompt.id,
                    "text": text,
                    "tokens": list(trace.tokens),
                    "n_tokens": len(trace.tokens),
                    "stop_reason": trace.stop_reason,
                    "alpha": float(trace.alpha),
                    "spike_steps": [i for i, s in enumerate(trace.spikes) if s],
                    "first_spike": trace.first_spike,
                    "spike_rate": trace.spike_rate,
                    "potential": _round(trace.potential),
                    "divergence": _round(trace.divergence),
                    "reflection": _reflection_summary(reflection),
                    # The batch's wall time shared equally among its rows.
                    "gen_seconds": gen_seconds / len(batch),
                    "reflect_seconds": reflect_seconds / len(batch),
                    "batch_size": len(batch),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
        return records


__all__ = ["DecodingSettings", "GenerationCache", "Runner", "cache_key", "file_digest", "folder_fingerprint"]
