"""The step's parameters: integer codes for its modes and `StepParams`, validated once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from enum import IntEnum
from functools import lru_cache
from numbers import Integral, Real


class Divergence(IntEnum):
    TV = 0  # total variation, 0.5 * sum |p_b - p_e|
    KL = 1  # KL(p_b || p_e)
    JS = 2  # Jensen-Shannon


class CandidateMode(IntEnum):
    UNION = 0  # NGSD: union of the two top-k sets, base probabilities elsewhere
    INTERSECTION = 1  # SafeDecoding: grown intersection, nothing elsewhere


class GateMode(IntEnum):
    LIF = 0  # the neuron decides
    OPEN = 1  # always mix
    CLOSED = 2  # never mix (base decoding; D and v still reported)


_ENUMS = {"candidate_mode": CandidateMode, "divergence": Divergence, "gate": GateMode}


_FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch here


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if abs(value) > _FP32_MAX:  # every backend computes in fp32: such a value overflows to inf there
        raise ValueError(f"{name} must fit fp32 (the kernels' arithmetic, |x| <= {_FP32_MAX:.4g}), got {value}")
    return value


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _code(name: str, value: object) -> IntEnum:
    enum = _ENUMS[name]
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) not in {m.value for m in enum}:
        raise ValueError(f"{name} must be one of {[f'{enum.__name__}.{m.name}' for m in enum]}, got {value!r}")
    return enum(int(value))


# The smallest sampling temperature (vLLM's greedy cut-off too): below it log(q) / T overflows fp32 to -inf for
# every token, and sampling is greedy decoding anyway. 0 means greedy.
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class StepParams:
    """Everything about one guarded decode step that is not a tensor (NGSD_SPEC.md sections 3 and 7).

    Checked once, here; every backend then trusts it. The custom ops take the same values as
    plain positional scalars (``flat()``), in field order.

    >>> StepParams(tau=4.0).tau
    4.0
    >>> StepParams(candidate_k=8.0)
    Traceback (most recent call last):
    ...
    TypeError: candidate_k must be an int, got float 8.0
    """

    tau: float = 8.0  # leak time constant: v <- (1 - 1/tau) v + D
    v_th: float = 1.0  # firing threshold
    v_reset: float = 0.0  # soft-reset target
    rho: float = 0.6  # soft-reset factor: v <- v_reset + rho (v - v_reset) on a spike
    candidate_k: int = 64  # union: top-k of each model; intersection: the k the grown intersection starts from
    candidate_mode: CandidateMode = CandidateMode.UNION
    min_candidates: int = 5  # intersection mode: grow k until the set holds this many tokens
    divergence: Divergence = Divergence.TV
    gate: GateMode = GateMode.LIF
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    score_floor: float = 1e-8  # intersection mode: scores on the set are floored here

    def __post_init__(self) -> None:
        coerced = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _ENUMS:
                coerced[f.name] = _code(f.name, value)
            elif f.type in ("int", int):
                coerced[f.name] = _integer(f.name, value)
            else:
                coerced[f.name] = _real(f.name, value)
        for name, value in coerced.items():
            object.__setattr__(self, name, value)
        checks = (
            (self.tau >= 1.0, f"tau must be >= 1 (the leak factor is 1 - 1/tau), got {self.tau}"),
            (self.v_th > 0.0, f"v_th must be > 0, got {self.v_th}"),
            (self.v_reset < self.v_th, f"v_reset must be below v_th ({self.v_th}), got {self.v_reset}"),
            (0.0 <= self.rho < 1.0, f"rho (soft-reset factor) must be in [0, 1), got {self.rho}"),
            (self.candidate_k >= 1, f"candidate_k must be >= 1, got {self.candidate_k}"),
            (self.min_candidates >= 1, f"min_candidates must be >= 1, got {self.min_candidates}"),
            (self.temperature == 0.0 or self.temperature >= MIN_SAMPLING_TEMPERATURE,
             f"temperature must be 0 (greedy) or >= {MIN_SAMPLING_TEMPERATURE:g}, got {self.temperature}: a smaller "
             "one is greedy decoding up to float overflow, so pass 0"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            # a share of probability; 0 let a row whose candidates all score below 0 renormalise 0 / 0 (NaN)
            (0.0 < self.score_floor <= 1.0, f"score_floor must be > 0 and <= 1, got {self.score_floor}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def flat(self) -> tuple[float | int, ...]:
        """The positional scalars of the ``torch.ops.ngsd`` step ops (floats and plain ints), in field order."""
        return tuple(int(v) if isinstance(v, IntEnum) else v for v in (getattr(self, f.name) for f in fields(self)))

    @staticmethod
    def from_flat(scalars: tuple[float | int, ...]) -> "StepParams":
        """Inverse of ``flat()``; validated (cached: a decode loop passes the same scalars every step)."""
        return _from_flat(tuple(scalars))

    def with_(self, **changes: object) -> "StepParams":
        return replace(self, **changes)

    @property
    def spike_possible(self) -> bool:
        return self.gate != GateMode.CLOSED


@lru_cache(maxsize=256)
def _from_flat(scalars: tuple[float | int, ...]) -> StepParams:
    names = [f.name for f in fields(StepParams)]
    if len(scalars) != len(names):
        raise TypeError(f"expected {len(names)} step scalars ({', '.join(names)}), got {len(scalars)}")
    return StepParams(**dict(zip(names, scalars)))


def step_schema() -> str:
    """The step scalars as a ``torch.library`` schema fragment: ``float tau, float v_th, ..., float score_floor``."""
    defaults = StepParams()
    return ", ".join(
        f"{'float' if isinstance(getattr(defaults, f.name), float) else 'int'} {f.name}" for f in fields(StepParams)
    )
