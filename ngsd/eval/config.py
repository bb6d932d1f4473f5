"""Evaluation configurations: which suites (and how many prompts), which methods, decoding settings.

Named configurations live in `ngsd/eval/configs/<name>.json` ("smoke", "full"); any other JSON
file with the same fields works too:

    {
      "name": "mine",
      "max_new_tokens": 64,
      "batch_size": 16,
      "methods": ["off", "ngsd", "ngsd_a0.9"],
      "custom_methods": {"ngsd_tau4": {"config": {"tau": 4.0}, "alpha": 0.9}},
      "suites": {"advbench": 50, "xstest_safe": {"n": 40, "select": "spread"},
                 "my_csv": {"file": "/data/mine.csv", "text_field": "question", "role": "utility"}}
    }

>>> cfg = load_config("smoke")
>>> cfg.max_new_tokens <= 16 and "off" in cfg.methods
True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..loading import MODEL_DTYPES
from .configs import CONFIG_DIR, config_names
from .methods import DEFAULT_METHODS, Method, get_method, method_from_json, method_names
from .metrics import Targets
from .suites import SuiteSpec


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: suites x methods under one decoding setting. See the module docstring for the JSON form."""

    name: str
    suites: tuple[SuiteSpec, ...]
    methods: tuple[str, ...] = DEFAULT_METHODS
    custom_methods: Mapping[str, Method] = field(default_factory=dict, hash=False)
    model: str | None = None
    expert: str | None = "shipped"
    probe: str | None = None  # risk probe folder for methods that read one; None: the probe shipped for the model
    max_new_tokens: int = 64
    batch_size: int = 16
    fidelity_tokens: int = 32
    reference: str = "off"
    targets: Targets = field(default_factory=Targets)
    trace_examples: int = 4
    examples: int = 2
    threads: int | None = None
    dtype: str = "float32"  # the dtype the model is loaded in (a bf16 deployment evaluated as it runs)
    description: str = ""
    sizing: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or self.name in (".", "..") or any(
                sep in self.name for sep in ("/", "\\")):
            raise ValueError(f"config name must be a plain name (the default output folder is eval_runs/<name>), "
                             f"got {self.name!r}")
        if not self.suites:
            raise ValueError(f"config {self.name!r} lists no suites")
        if not self.methods:
            raise ValueError(f"config {self.name!r} lists no methods")
        for name in self.methods:
            self.method(name)  # raises for unknown names
        repeated = sorted({name for name in self.methods if self.methods.count(name) > 1})
        if repeated:
            raise ValueError(f"config {self.name!r} lists methods more than once: {repeated}")
        if not isinstance(self.reference, str) or (self.reference not in self.custom_methods
                                                   and self.reference not in method_names()):
            # fidelity compares each method's answers with the reference's: a misspelt one dropped it silently
            raise ValueError(f"config {self.name!r}: reference {self.reference!r} (the method whose answers fidelity "
                             f"is measured against) is not a method; use one of {method_names()} or a custom method")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.fidelity_tokens < 1:
            raise ValueError("max_new_tokens, batch_size and fidelity_tokens must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or null for torch's default), got {self.threads}")
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(MODEL_DTYPES)}, got {self.dtype!r}")

    def method(self, name: str) -> Method:
        method = self.custom_methods[name] if name in self.custom_methods else get_method(name)
        reflection = method.config.reflection
        reads_probe = method.uses_reflection and reflection.mode in ("auto", "probe")
        # a method that names its own probe keeps it; the config's probe replaces only the shipped default
        if self.probe is None or not reads_probe or reflection.probe:
            return method
        return replace(method, config=replace(method.config, reflection=replace(reflection, probe=self.probe)))

    def resolved_methods(self) -> list[Method]:
        return [self.method(name) for name in self.methods]

    def with_(self, **changes: Any) -> "EvalConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "expert": self.expert,
            "probe": self.probe,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "fidelity_tokens": self.fidelity_tokens,
            "reference": self.reference,
            "methods": list(self.methods),
            "custom_methods": {n: m.to_dict() for n, m in self.custom_methods.items()},
            "suites": {s.name: s.to_dict() for s in self.suites},
            "targets": self.targets.to_dict(),
            "trace_examples": self.trace_examples,
            "examples": self.examples,
            "threads": self.threads,
            "dtype": self.dtype,
            "sizing": self.sizing,
        }


_FIELDS = {
    "name", "description", "model", "expert", "probe", "max_new_tokens", "batch_size", "fidelity_tokens", "reference",
    "methods", "custom_methods", "suites", "targets", "trace_examples", "examples", "threads", "dtype", "sizing",
}


def config_from_dict(data: Mapping[str, Any], default_name: str = "custom") -> EvalConfig:
    if not isinstance(data, Mapping):
        raise ValueError(f"evaluation config must be a JSON object of fields, got a {type(data).__name__}")
    unknown = set(data) - _FIELDS
    if unknown:
        raise ValueError(f"evaluation config: unknown fields {sorted(unknown)}; known: {sorted(_FIELDS)}")
    suites_data = data.get("suites")
    if not isinstance(suites_data, Mapping) or not suites_data:
        raise ValueError("evaluation config needs 'suites': an object of suite name -> prompt count or settings")
    custom_data = data.get("custom_methods", {})
    if not isinstance(custom_data, Mapping):
        raise ValueError(f"evaluation config: 'custom_methods' must be an object of name -> method settings, "
                         f"got {custom_data!r}")
    custom = {name: method_from_json(name, value) for name, value in custom_data.items()}
    sizing = data.get("sizing", "")
    methods = data.get("methods", DEFAULT_METHODS)
    if not isinstance(methods, (list, tuple)):
        raise ValueError(f"evaluation config: 'methods' must be a list of method names, e.g. [\"off\", \"ngsd\"], "
                         f"got {methods!r}")
    return EvalConfig(
        name=data.get("name", default_name),
        description=data.get("description", ""),
        suites=tuple(SuiteSpec.from_json(name, value) for name, value in suites_data.items()),
        methods=tuple(methods),
        custom_methods=custom,
        model=data.get("model"),
        expert=data.get("expert", "shipped"),
        probe=data.get("probe"),
        max_new_tokens=_count(data, "max_new_tokens", 64, 1),
        batch_size=_count(data, "batch_size", 16, 1),
        fidelity_tokens=_count(data, "fidelity_tokens", 32, 1),
        reference=data.get("reference", "off"),
        targets=Targets.from_json(data.get("targets", {})),
        trace_examples=_count(data, "trace_examples", 4, 0),
        examples=_count(data, "examples", 2, 0),
        threads=None if data.get("threads") is None else _count(data, "threads", None, 1),
        dtype=data.get("dtype", "float32"),
        sizing="\n".join(sizing) if isinstance(sizing, (list, tuple)) else str(sizing),
    )


def _count(data: Mapping[str, Any], name: str, default: int | None, minimum: int) -> int:
    """An integer field of the config (a whole number in JSON; int() would truncate 0.5 or fail on null)."""
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"evaluation config: {name!r} must be a whole number >= {minimum}, got {value!r}")
    return value


def load_config(name_or_path: str | Path) -> EvalConfig:
    """A named configuration ("smoke", "full") or a JSON file."""
    text = str(name_or_path)
    path = CONFIG_DIR / f"{text}.json" if text in config_names() else Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"evaluation config {text!r} not found: use one of {config_names()} or the path of a JSON file"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return config_from_dict(data, default_name=path.stem)


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """'off,ngsd , ngsd_a0.9' -> ('off', 'ngsd', 'ngsd_a0.9')."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(dict.fromkeys(n.strip() for n in items if n.strip()))
    if not names:
        raise ValueError("--methods needs at least one method name")
    return names


__all__ = ["CONFIG_DIR", "EvalConfig", "config_from_dict", "config_names", "load_config", "parse_methods"]
