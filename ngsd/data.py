"""Prompt suites read by path: the benchmark files of `../shared/data` and any JSON/JSONL/CSV/text file.

The data folder is never copied into the package. It is found, in this order, from an explicit
`data_dir` argument, the environment variable NGSD_DATA_DIR, or the `shared/data` folder beside
the checkout (`<repo>/../shared/data`).

>>> from ngsd.data import load_suite, load_records
>>> prompts = load_suite("advbench", limit=3)                      # doctest: +SKIP
>>> prompts[0].id, len(prompts)                                     # doctest: +SKIP
('0', 3)
>>> mine = load_records("my_prompts.csv", text_field="question")   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

DATA_ENV = "NGSD_DATA_DIR"
FORMATS = ("json", "jsonl", "csv", "text")
ROLES = ("harmful", "overrefusal", "utility", "training", "other")
EVAL_ROLES = ("harmful", "overrefusal", "utility")  # the roles an evaluation scores
SELECTIONS = ("lowest_ids", "first", "spread")
SCORERS = (None, "last_number")
_SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "text"}


class DataNotFoundError(FileNotFoundError):
    """A data folder or file is missing; the message names the path and how to point ngsd at the data."""


@dataclass(frozen=True)
class Prompt:
    """One request of a suite.

    id: the record's id as a string (row index when the file has none); text: what is sent to the
    model; suite: the suite name; goal: the behaviour behind an attack prompt, or the reference
    answer (GSM8K); meta: every other field of the record.

    >>> p = Prompt(id="7", text="How do I bake bread?", suite="mine")
    >>> p.text
    'How do I bake bread?'
    """

    id: str
    text: str
    suite: str = ""
    goal: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class SuiteSpec:
    """One prompt suite: how to read it (file, format, field mapping), what it is for, and how an
    evaluation picks and scores it.

    Reading: `file` is taken inside the data folder unless absolute. Field names may be dotted
    paths into nested records, with integer steps for lists ("turns.0" is the first turn).
    `records_key` names the list inside a JSON object root (seed_reject.json keeps its rows under
    "prompts"). `where` keeps only records whose fields equal the given values (XSTest's "label").

    Role: "harmful" (scored by attack success rate), "overrefusal" (safe prompts that look unsafe:
    refusal rate), "utility" (harmless tasks), "training" (expert training data only) or "other".

    Evaluation (`ngsd.eval.suites`): `n` prompts (None: all) chosen by `select` ("lowest_ids",
    "first" or "spread"), `target` marks the suites the headline targets apply to, `scorer` a task
    scorer ("last_number" for GSM8K), `label` the name shown in reports.

    >>> spec = SuiteSpec("mine", "mine.jsonl", text_field="question", role="utility")
    >>> spec.resolved_format(), spec.label
    ('jsonl', 'mine')
    """

    name: str
    file: str
    text_field: str = "prompt"
    id_field: str | None = "id"
    goal_field: str | None = None
    format: str | None = None
    records_key: str | None = None
    where: Mapping[str, Any] = field(default_factory=dict, hash=False)
    role: str = "other"
    description: str = ""
    n: int | None = None
    select: str = "lowest_ids"
    target: bool = False
    scorer: str | None = None
    label: str = ""
    id_parity: str | None = None  # "odd" / "even": keep records whose integer id has it (AlpacaEval's split)
    eval_ids_below: int | None = None  # an evaluation reads only ids below it: the rest is a training split (AdvBench)

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"suite {self.name!r}: format must be one of {FORMATS} or None (from the file suffix), "
                             f"got {self.format!r}")
        if self.role not in ROLES:
            raise ValueError(f"suite {self.name!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.select not in SELECTIONS:
            raise ValueError(f"suite {self.name!r}: select must be one of {SELECTIONS}, got {self.select!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"suite {self.name!r}: scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.id_parity not in (None, "odd", "even"):
            raise ValueError(f"suite {self.name!r}: id_parity must be 'odd', 'even' or None, got {self.id_parity!r}")
        if self.n is not None and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1):
            raise ValueError(f"suite {self.name!r}: n must be a whole number >= 1 (or null for all prompts), "
                             f"got {self.n!r}")
        if not isinstance(self.where, Mapping):
            raise ValueError(f"suite {self.name!r}: where must be an object of field -> value (e.g. "
                             f"{{\"label\": \"safe\"}}), got {self.where!r}")
        for name in ("file", "text_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"suite {self.name!r}: {name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.eval_ids_below is not None and (isinstance(self.eval_ids_below, bool)
                                                or not isinstance(self.eval_ids_below, int)):
            raise ValueError(f"suite {self.name!r}: eval_ids_below must be a whole number or null, "
                             f"got {self.eval_ids_below!r}")
        if not self.label:
            object.__setattr__(self, "label", self.name)

    @classmethod
    def from_json(cls, name: str, value: Any) -> "SuiteSpec":
        """A suite of an evaluation config: `value` is a prompt count, null (all prompts), or an object
        of `SuiteSpec` fields.

        A registered suite keeps its file, role, target, selection and scorer unless `value` changes
        them; any other name needs a `file` (read as text field "text" unless told).
        """
        if value is None or isinstance(value, int):
            value = {"n": value}
        if not isinstance(value, Mapping):
            raise ValueError(f"suite {name!r}: expected a prompt count, null or an object, got {value!r}")
        unknown = set(value) - set(cls.__dataclass_fields__) - {"name"}
        if unknown:
            raise ValueError(f"suite {name!r}: unknown fields {sorted(unknown)}")
        changes = {k: v for k, v in value.items() if k != "name"}
        if name in SUITES:  # a file of its own changes only the file: the fields, role and split stay
            spec = replace(SUITES[name], **changes)
        elif "file" in changes:
            spec = cls(name=name, **{"text_field": "text", "role": "harmful", **changes})
        else:
            raise ValueError(
                f"unknown suite {name!r}: use one of {', '.join(suite_names())}, a suite registered with "
                "ngsd.data.register_suite, or give a 'file' (with 'text_field' and 'role') for your own prompts"
            )
        if spec.role not in EVAL_ROLES:
            raise ValueError(f"suite {name!r}: an evaluation scores roles {EVAL_ROLES}, got {spec.role!r}")
        return spec

    def resolved_format(self) -> str:
        return self.format or infer_format(self.file)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["where"] = dict(self.where)
        return out


SUITES: dict[str, SuiteSpec] = {}


def register_suite(spec: SuiteSpec, *, overwrite: bool = False) -> SuiteSpec:
    """Add a named suite so `load_suite(spec.name)` finds it (e.g. a user's own CSV in the data folder)."""
    if spec.name in SUITES and not overwrite:
        raise ValueError(f"suite {spec.name!r} is already registered; pass overwrite=True to replace it")
    SUITES[spec.name] = spec
    return spec


for _spec in (
    SuiteSpec("advbench", "advbench_harmful_behaviors.json", text_field="goal", goal_field="goal", role="harmful",
              target=True, label="AdvBench", eval_ids_below=130,
              description="AdvBench harmful behaviours (520; an evaluation reads ids < 130, the rest is a training "
                          "split); meta['target'] is the 'Sure, here is ...' target"),
    SuiteSpec("harmbench", "harmbench_prompts.txt", role="harmful", target=True, select="spread", label="HarmBench",
              description="HarmBench standard behaviours, one per line (200: SOURCES.md counts 199 newlines)"),
    SuiteSpec("gcg", "attack_gcg.json", goal_field="goal", role="harmful", target=True, label="GCG",
              description="GCG adversarial-suffix prompts (50)"),
    SuiteSpec("autodan", "attack_autodan.json", goal_field="goal", role="harmful", target=True, label="AutoDAN",
              description="AutoDAN jailbreak prompts (50)"),
    SuiteSpec("deepinception", "attack_deepinception.json", goal_field="goal", role="harmful", target=True,
              label="DeepInception", description="DeepInception nested-fiction prompts (50)"),
    SuiteSpec("xstest_safe", "xstest.json", where={"label": "safe"}, role="overrefusal", target=True, select="spread",
              label="XSTest safe", description="XSTest safe prompts that look unsafe (250): refusing them is over-refusal"),
    SuiteSpec("xstest_unsafe", "xstest.json", where={"label": "unsafe"}, role="harmful", select="spread",
              label="XSTest unsafe", description="XSTest unsafe contrast prompts (200)"),
    SuiteSpec("mt_bench", "mt_bench_questions.jsonl", text_field="turns.0", id_field="question_id", role="utility",
              select="spread", label="MT-Bench", description="MT-Bench first turns (80)"),
    SuiteSpec("alpaca_eval", "alpaca_eval_805.json", text_field="instruction", role="utility", id_parity="odd",
              label="AlpacaEval", description="AlpacaEval instructions with an odd id (402), the evaluation split; "
              "even ids are a training split (SOURCES.md) and never read by this suite"),
    SuiteSpec("gsm8k", "gsm8k_200.json", goal_field="goal", role="utility", scorer="last_number", label="GSM8K",
              description="GSM8K test problems (200); goal is the numeric answer"),
    SuiteSpec("seed_reject", "seed_reject.json", records_key="prompts", role="training",
              description="SafeDecoding's 36 plain harmful prompts for building the expert's training set"),
    SuiteSpec("expert_sft", "expert_sft_vicuna.json", text_field="text", id_field=None, role="training",
              description="SafeDecoding's 71 'USER: ... ASSISTANT: <refusal>' texts by Vicuna-7B"),
):
    register_suite(_spec)


def repo_root() -> Path:
    """The checkout this module lives in (`<repo>/ngsd/data.py` -> `<repo>`)."""
    return Path(__file__).resolve().parent.parent


def data_dir_candidates(data_dir: str | os.PathLike[str] | None = None) -> list[tuple[str, Path]]:
    """The places searched for the data folder, in priority order, with where each came from."""
    if data_dir is not None:
        return [("argument", Path(data_dir).expanduser())]
    env = os.environ.get(DATA_ENV)
    if env:
        return [(f"${DATA_ENV}", Path(env).expanduser())]
    return [("default <repo>/../shared/data", repo_root().parent / "shared" / "data")]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: `data_dir` if given, else $NGSD_DATA_DIR, else `<repo>/../shared/data`.

    Raises DataNotFoundError naming the path tried and how to set it when the folder is absent.
    """
    source, path = data_dir_candidates(data_dir)[0]
    if not path.is_dir():
        raise DataNotFoundError(
            f"data folder not found: {path} (from {source}). Pass data_dir= / --data-dir, or set "
            f"the environment variable {DATA_ENV} to the folder holding the benchmark files "
            f"(the project's shared/data)."
        )
    return path


def data_available(data_dir: str | os.PathLike[str] | None = None, *files: str) -> bool:
    """True when the data folder exists and holds every file named (handy for test skips)."""
    try:
        root = resolve_data_dir(data_dir)
    except DataNotFoundError:
        return False
    return all((root / name).is_file() for name in files)


def infer_format(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ValueError(
            f"cannot tell the format of {str(path)!r} from its suffix; pass format= one of {FORMATS}"
        )
    return _SUFFIX_FORMATS[suffix]


def get_field(record: Any, path: str) -> Any:
    """Value at a dotted path ("turns.0", "meta.label"); KeyError naming the path when absent."""
    value = record
    for step in path.split("."):
        if isinstance(value, Mapping) and step in value:
            value = value[step]
        elif isinstance(value, (list, tuple)) and step.lstrip("-").isdigit() and -len(value) <= int(step) < len(value):
            value = value[int(step)]
        else:
            raise KeyError(f"field {path!r} not found (failed at {step!r})")
    return value


def read_rows(path: str | os.PathLike[str], *, format: str | None = None, records_key: str | None = None) -> list[Any]:
    """The raw rows of a file: JSON (a list, or `records_key` inside an object), JSONL, CSV (dicts), text (lines)."""
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(
            f"data file not found: {p}. Point ngsd at the data folder with --data-dir or the "
            f"environment variable {DATA_ENV}."
        )
    fmt = format or infer_format(p)
    if fmt == "json":
        with p.open(encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{p}: not valid JSON ({err})") from err
        if records_key is not None:
            data = get_field(data, records_key)
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of records (use records_key= for a list inside an object)")
        return data
    if fmt == "jsonl":
        rows = []
        with p.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{p}:{number}: not valid JSON ({err})") from err
        return rows
    if fmt == "csv":
        with p.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    if fmt == "text":
        with p.open(encoding="utf-8") as f:
            return [{"text": line.rstrip("\r\n")} for line in f if line.strip()]
    raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")


def records_to_prompts(
    rows: Iterable[Any],
    *,
    text_field: str = "prompt",
    id_field: str | None = "id",
    goal_field: str | None = None,
    where: Mapping[str, Any] | None = None,
    suite: str = "",
    source: str = "",
) -> list[Prompt]:
    """Map raw rows to Prompts. A row without `id_field` gets its row index (0-based) as id."""
    prompts = []
    for index, row in enumerate(rows):
        if where and any(_get_or_none(row, k) != v for k, v in where.items()):
            continue
        try:
            text = get_field(row, text_field)
        except KeyError as err:
            raise KeyError(f"{source or suite}: row {index}: {err.args[0]}; set text_field to the prompt's field") from err
        if not isinstance(text, str):
            raise ValueError(f"{source or suite}: row {index}: field {text_field!r} is {type(text).__name__}, not text")
        rid = _get_or_none(row, id_field) if id_field else None
        goal = _get_or_none(row, goal_field) if goal_field else None
        used = {text_field.split(".")[0]}
        if id_field:
            used.add(id_field.split(".")[0])
        meta = {k: v for k, v in row.items() if k not in used} if isinstance(row, Mapping) else {}
        prompts.append(
            Prompt(
                id=str(rid if rid is not None else index),
                text=text,
                suite=suite,
                goal=None if goal is None else str(goal),
                meta=meta,
            )
        )
    return prompts


def load_records(
    path: str | os.PathLike[str],
    *,
    text_field: str = "text",
    id_field: str | None = "id",
    goal_field: str | None = None,
    format: str | None = None,
    records_key: str | None = None,
    where: Mapping[str, Any] | None = None,
    suite: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Read a user's own prompt file (JSON, JSONL, CSV or text lines) with a field mapping.

    For a text file every non-empty line is one prompt and its field is "text".
    """
    p = Path(path)
    rows = read_rows(p, format=format, records_key=records_key)
    prompts = records_to_prompts(
        rows, text_field=text_field, id_field=id_field, goal_field=goal_field, where=where,
        suite=suite if suite is not None else p.stem, source=str(p),
    )
    return prompts[:limit] if limit is not None else prompts


def load_suite(name: str, data_dir: str | os.PathLike[str] | None = None, *, limit: int | None = None) -> list[Prompt]:
    """The prompts of a named suite (see `suite_names()`), in file order; `limit` keeps the first n."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(suite_names())} (or register_suite your own)")
    return read_suite(SUITES[name], data_dir, limit=limit)


def read_suite(spec: SuiteSpec, data_dir: str | os.PathLike[str] | None = None, *, limit: int | None = None) -> list[Prompt]:
    """The prompts of any suite description, registered or not, in file order; `limit` keeps the first n."""
    fmt = spec.resolved_format()
    path = Path(spec.file).expanduser()
    if not path.is_absolute():
        path = resolve_data_dir(data_dir) / path
    rows = read_rows(path, format=fmt, records_key=spec.records_key)
    text_field = "text" if fmt == "text" else spec.text_field
    prompts = records_to_prompts(
        rows, text_field=text_field, id_field=spec.id_field, goal_field=spec.goal_field,
        where=spec.where, suite=spec.name, source=str(path),
    )
    if spec.id_parity is not None:
        prompts = [p for p in prompts if int(p.id) % 2 == (spec.id_parity == "odd")]
    empty = [p.id for p in prompts if not p.text.strip()]
    if empty:  # found late, it read "prompts[0] is empty", an index into a length-sorted batch
        raise ValueError(f"suite {spec.name!r} ({path}): the rows with ids {empty[:5]} have an empty prompt; fill or "
                         "remove them")
    return prompts[:limit] if limit is not None else prompts


def suite_names(role: str | None = None) -> list[str]:
    """Registered suite names, optionally only those of one role ("harmful", "overrefusal", "utility", "training")."""
    return [n for n, s in SUITES.items() if role is None or s.role == role]


def id_sort_key(prompt: Prompt) -> tuple[int, int, str]:
    """Numeric ids sort as numbers, then other ids as text."""
    return (0, int(prompt.id), "") if prompt.id.lstrip("-").isdigit() else (1, 0, prompt.id)


def lowest_ids(prompts: Sequence[Prompt], n: int) -> list[Prompt]:
    """The n prompts with the lowest ids (numerically), in id order."""
    return sorted(prompts, key=id_sort_key)[:n]


ADVBENCH_EVAL_SIZE = 50


def advbench_eval_prompts(data_dir: str | os.PathLike[str] | None = None, n: int = ADVBENCH_EVAL_SIZE) -> list[Prompt]:
    """The issue-2 evaluation set: the AdvBench prompts with the n lowest ids (ids 0..49 for n=50).

    The expert's training data must not contain these (see ngsd.experts.training).
    """
    return lowest_ids(load_suite("advbench", data_dir), n)


def split_user_assistant(text: str) -> tuple[str, str]:
    """Split a SafeDecoding SFT text "USER: ... ASSISTANT: ..." into (user, assistant)."""
    head, sep, answer = text.partition(" ASSISTANT:")
    if not sep or not head.startswith("USER:"):
        raise ValueError(f"not a 'USER: ... ASSISTANT: ...' text: {text[:80]!r}")
    return head[len("USER:"):].strip(), answer.strip()


def _get_or_none(row: Any, path: str | None) -> Any:
    if path is None:
        return None
    try:
        return get_field(row, path)
    except KeyError:
        return None


__all__ = [
    "DATA_ENV",
    "DataNotFoundError",
    "Prompt",
    "SUITES",
    "SuiteSpec",
    "advbench_eval_prompts",
    "data_available",
    "get_field",
    "load_records",
    "load_suite",
    "read_suite",
    "lowest_ids",
    "read_rows",
    "records_to_prompts",
    "register_suite",
    "resolve_data_dir",
    "split_user_assistant",
    "suite_names",
]
