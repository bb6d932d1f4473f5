"""The decoding methods an evaluation compares, as an extensible registry.

A method is an `NGSDConfig` plus how alpha is chosen: fixed (`alpha=0.9`) or left to the config
(self-reflection in mode "ngsd", `safedecoding_alpha` in mode "safedecoding"). Built in:

| name          | what it is                                                                  |
|---------------|-----------------------------------------------------------------------------|
| off           | no defence: plain greedy decoding of the base model (gate closed)           |
| ngsd          | NGSD default: LIF gate, union top-64 mixture, risk probe + routing where the model has a probe (its divergence check included), else self-reflection |
| ngsd_nocheck  | as ngsd, without the probe's divergence check                                |
| ngsd_prefill  | as ngsd, reflection read from one prefill (digit distribution), not generated |
| ngsd_a0.1/0.5/0.9 | NGSD with alpha fixed for every request (reflection skipped)            |
| ngsd_primed, ngsd_a0.9_primed | as ngsd / ngsd_a0.9, guarded rows start primed (potential v_th) |
| safedecoding  | SafeDecoding: intersection candidates, alpha 3, first 2 tokens only          |
| expert        | the expert alone (see below)                                                 |

The expert alone runs through the same loop: gate forced open (mode "open"), alpha 1 and the
candidate set grown to the whole vocabulary make the score vector `p_b + 1 * (p_e - p_b)`, i.e.
the expert's distribution (up to one float rounding of the subtraction), so greedy selection
picks the expert's own greedy token. `tests/test_eval.py` checks this against plain greedy
decoding of the expert. `full_vocab_candidates=True` sets `candidate_k` to the vocabulary size
when the model is known.

Add a method with `register_method(Method(...))`, or in an evaluation config JSON under
"custom_methods": {"name": {"config": {...NGSDConfig fields...}, "alpha": 0.7}}.

>>> get_method("ngsd_a0.9").alpha
0.9
>>> get_method("expert").config.mode
'open'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import NGSDConfig, ReflectionConfig


@dataclass(frozen=True)
class Method:
    """One way of decoding, compared against the others on the same prompts.

    >>> m = Method("ngsd_tau4", NGSDConfig(tau=4.0), alpha=0.9, description="faster-charging gate")
    >>> m.uses_expert, m.uses_reflection, m.gated
    (True, False, True)
    """

    name: str
    config: NGSDConfig = field(default_factory=NGSDConfig)
    alpha: float | None = None
    description: str = ""
    full_vocab_candidates: bool = False

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() or c == "," for c in self.name):
            raise ValueError(f"method name must be non-empty without spaces or commas, got {self.name!r}")
        if isinstance(self.config, Mapping):
            object.__setattr__(self, "config", NGSDConfig(**dict(self.config)))
        if self.alpha is not None and not 0.0 <= self.alpha <= (10.0 if self.config.mode == "safedecoding" else 1.0):
            raise ValueError(f"method {self.name!r}: alpha {self.alpha} is out of range for mode {self.config.mode!r}")

    @property
    def uses_expert(self) -> bool:
        return self.config.mode != "off"

    @property
    def uses_reflection(self) -> bool:
        return self.config.mode == "ngsd" and self.alpha is None and self.config.reflection.mode != "none"

    @property
    def gated(self) -> bool:
        """True when the LIF gate decides (mode "ngsd"), so spike statistics mean something."""
        return self.config.mode == "ngsd"

    def resolved_config(self, vocab_size: int | None) -> NGSDConfig:
        """The config actually run: `candidate_k` grown to the vocabulary for the expert-alone trick."""
        if self.full_vocab_candidates:
            if vocab_size is None:
                raise ValueError(f"method {self.name!r} needs the vocabulary size to use every token as a candidate")
            return self.config.with_(candidate_k=int(vocab_size))
        return self.config

    def signature(self, vocab_size: int | None) -> dict[str, Any]:
        """Everything that determines this method's output, for cache keys."""
        config = self.resolved_config(vocab_size).to_dict()
        for name in _FIELDS_ADDED_LATER:  # at their default they change no output: keys cached before them stay valid
            if config.get(name) is None:
                config.pop(name, None)
        return {"name": self.name, "alpha": self.alpha, "config": config}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "alpha": self.alpha,
            "full_vocab_candidates": self.full_vocab_candidates,
            "config": self.config.to_dict(),
        }


# NGSDConfig fields added after answers were first cached; None (their default) leaves a cache key as it was.
_FIELDS_ADDED_LATER = ("prime_divergence",)

METHODS: dict[str, Method] = {}


def register_method(method: Method, *, overwrite: bool = False) -> Method:
    """Make `method` available by name to configs and `--methods`."""
    if method.name in METHODS and not overwrite:
        raise ValueError(f"method {method.name!r} is already registered; pass overwrite=True to replace it")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)} (or register_method your own)")
    return METHODS[name]


def method_names() -> list[str]:
    return list(METHODS)


def method_from_json(name: str, value: Mapping[str, Any]) -> Method:
    """A method from a config entry: {"config": {...}, "alpha": x, "description": "...", "full_vocab_candidates": b}."""
    if not isinstance(value, Mapping):
        raise ValueError(f"custom method {name!r}: expected an object such as {{\"config\": {{\"tau\": 4.0}}, "
                         f"\"alpha\": 0.9}}, got {value!r}")
    unknown = set(value) - {"config", "alpha", "description", "full_vocab_candidates"}
    if unknown:
        raise ValueError(f"custom method {name!r}: unknown fields {sorted(unknown)}")
    config = value.get("config", {})
    if not isinstance(config, Mapping):
        raise ValueError(f"custom method {name!r}: 'config' must be an object of NGSDConfig fields, got {config!r}")
    config = dict(config)
    _check_fields(name, "config", config, NGSDConfig)
    if isinstance(config.get("reflection"), Mapping):
        _check_fields(name, "config.reflection", config["reflection"], ReflectionConfig)
        try:
            config["reflection"] = ReflectionConfig(**config["reflection"])
        except TypeError as error:
            raise ValueError(f"custom method {name!r}: config.reflection: {error}") from None
    alpha = value.get("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not 0.0 <= alpha <= 1.0):
        raise ValueError(f"custom method {name!r}: 'alpha' must be a number in [0, 1] or null (the method's own "
                         f"risk estimate), got {alpha!r}")
    try:
        ngsd_config = NGSDConfig(**config)
    except TypeError as error:  # a field of the wrong type: the config's mistake, said in one line
        raise ValueError(f"custom method {name!r}: {error}") from None
    return Method(
        name=name,
        config=ngsd_config,
        alpha=None if alpha is None else float(alpha),
        description=value.get("description", ""),
        full_vocab_candidates=bool(value.get("full_vocab_candidates", False)),
    )


def _check_fields(method: str, where: str, given: Mapping[str, Any], kind: type) -> None:
    unknown = sorted(set(given) - set(kind.__dataclass_fields__))
    if unknown:
        raise ValueError(f"custom method {method!r}: {where} has unknown fields {unknown}; known: "
                         f"{sorted(kind.__dataclass_fields__)}")


for _method in (
    Method("off", NGSDConfig(mode="off"), description="no defence: greedy decoding of the base model"),
    Method("ngsd", NGSDConfig(), description="NGSD default: LIF gate; risk probe + routing where the model has a "
                                             "probe, else alpha from self-reflection (generative JSON)"),
    Method("ngsd_nocheck", NGSDConfig(reflection=ReflectionConfig(check=False)),
           description="NGSD default without the risk probe's divergence check (the probe alone routes)"),
    Method("ngsd_noroute", NGSDConfig(reflection=ReflectionConfig(route=False)),
           description="NGSD with the risk probe but no routing: every row guarded, alpha from the probe's risk "
                       "through the thresholds (the expert runs on every row)"),
    Method("ngsd_prefill", NGSDConfig(reflection=ReflectionConfig(mode="prefill")),
           description="NGSD, alpha from single-prefill reflection (expected digit, one forward)"),
    Method("paper", NGSDConfig(reflection=ReflectionConfig.paper()),
           description="NGSD as published: generative self-reflection read by the published parser"),
    Method("ngsd_a0.1", NGSDConfig(), alpha=0.1, description="NGSD, alpha fixed at 0.1"),
    Method("ngsd_a0.5", NGSDConfig(), alpha=0.5, description="NGSD, alpha fixed at 0.5"),
    Method("ngsd_a0.9", NGSDConfig(), alpha=0.9, description="NGSD, alpha fixed at 0.9"),
    Method("ngsd_primed", NGSDConfig(initial_potential=1.0),
           description="NGSD default with a primed neuron: guarded rows start at potential v_th, so the gate can "
                       "mix at the first token"),
    Method("ngsd_primed_check", NGSDConfig(prime_divergence="check"),
           description="NGSD default, guarded rows primed at the risk probe's divergence check: the gate can mix at "
                       "the first token when that token's TV divergence reaches the probe's check_divergence"),
    Method("ngsd_a0.9_primed", NGSDConfig(initial_potential=1.0), alpha=0.9,
           description="NGSD, alpha fixed at 0.9, guarded rows start at potential v_th"),
    Method("safedecoding", NGSDConfig(mode="safedecoding"),
           description="SafeDecoding: intersection top-10, alpha 3, first 2 tokens"),
    Method("expert", NGSDConfig(mode="open"), alpha=1.0, full_vocab_candidates=True,
           description="the expert alone (gate open, alpha 1, every token a candidate)"),
):
    register_method(_method)

DEFAULT_METHODS = ("off", "ngsd", "ngsd_a0.1", "ngsd_a0.5", "ngsd_a0.9", "safedecoding", "expert")

__all__ = ["DEFAULT_METHODS", "METHODS", "Method", "get_method", "method_from_json", "method_names", "register_method"]
