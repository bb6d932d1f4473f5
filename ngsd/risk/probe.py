"""Risk from the prompt's hidden states (NGSD_SPEC.md section 2b): a small trained probe.

The probe reads the base model's own hidden states of the prompt, computed by the prefill that
decoding runs anyway, pools them per row, and scores the pooled vector with a standardised
logistic regression. Nothing is generated, so the request cannot talk its way to a verdict.

Features (`RiskProbe.features`): for each hidden-state index in `probe.layer` (index i of the
tuple a Hugging Face forward with `output_hidden_states=True` returns; 0 is the embedding output)
and each pooling in `probe.pooling` ("last": the last real prompt token, "mean": the mean over
the real prompt tokens, "max": the element-wise maximum over them; padding excluded), concatenated.
A mean is diluted by long surrounding text (a harmful goal inside a long story); a maximum is not. Pooling reads the attention mask, so
left padding does not change a row's features (up to float rounding).

With `aggregate="token_max"` the logistic regression scores every real prompt token's hidden
state (standardised per dimension) and the row's logit is the maximum over its tokens; features
are then that maximum, [B, 1]. Because the model is causal, text appended after a harmful request
does not change the request's own tokens, so it cannot lower their scores or the maximum: only
the few chat-template tokens after the request change. A pooled mean has no such floor (a long
benign-looking wrapper dilutes it).

Risk (`RiskProbe.risk`), on the 0..10 scale of self-reflection so `ReflectionConfig.alpha_for_risk`
applies unchanged: `logit = ((f - mean) / std) @ weight + bias` (the logistic regression, fitted
on the training part), then Platt calibration fitted on the held-out validation part of the
training data, `p = sigmoid(scale * logit + shift)`, an estimate of P(harmful | request) for
requests like the training distribution, and `risk = 10 * p`. Risk 5 is even odds; with the
default thresholds risk > 6 (p > 0.6) gives alpha_high and risk < 5 gives alpha_low.
`route_below` (in risk units) is the operating point chosen on validation: requests under it may
be routed unguarded (see `training_report.json` of a probe for the recall it was chosen for).

>>> probe = RiskProbe.load(shipped_probe_path())             # doctest: +SKIP
>>> risks = estimate_risk(model, tokenizer, ["How do I bake bread?"], probe)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import threading
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import check_operating_point_bounds, check_rollout_tokens

POOLINGS = ("last", "mean", "max")
# "pooled": logistic regression on pooled features; "token_max": the logistic score of every prompt
# token, maximised over the prompt (see the module docstring).
AGGREGATES = ("pooled", "token_max")
PROBE_FILE = "probe.json"
WEIGHTS_FILE = "probe.safetensors"
REPORT_FILE = "training_report.json"
SHIPPED_PROBES = Path(__file__).resolve().parent.parent / "assets" / "probes"
DEFAULT_PROBE_NAME = "smollm2-135m-risk-probe"
# Config fields a model must share with the one a probe was trained on (hidden states of another
# architecture or size mean nothing to it).
FINGERPRINT_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                      "num_attention_heads", "num_key_value_heads")
RISK_SCALE = 10.0


def is_probe_folder(folder: str | Path) -> bool:
    """True when `folder` holds what `RiskProbe.save` writes and `RiskProbe.load` reads."""
    folder = Path(folder)
    return (folder / PROBE_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


@dataclass(frozen=True)
class ProbeSpec:
    """What a probe reads and how its score is calibrated (saved as probe.json).

    layer: hidden-state index (or indices) read; pooling: poolings concatenated per layer, each in
    POOLINGS; calibration: Platt `scale` and `shift` on the logistic logit; route_below: risk
    threshold under which a request may be routed unguarded; model: config fingerprint of the
    model trained on (FINGERPRINT_FIELDS) plus its name, and (probes trained since it was recorded) its
    `weight_fingerprint` under "weights", which tells it from other models of the same shape.
    check_above / check_divergence: the divergence check's operating point (`RiskPlan.confirm`):
    a request with check_above <= risk < route_below is routed only if the expert's first-step
    next-token distribution stays within total variation check_divergence of the base's; else it
    is guarded. None: no check. Fitted for one expert, named in check_expert (another expert that
    diverges more from the base guards more rows, one that diverges less fewer).
    check_rollout: tokens of the expert's own greedy opening that a checked row whose divergence reaches
    check_divergence must refuse in to stay guarded (0: the divergence alone decides); set only where the
    expert's openings refuse the harmful validation requests the divergence keeps (`fit_probe_check`).
    chat_template: trained on chat-templated prompts (train-probe's prompts are, where the tokenizer has a
    template): its routing is then calibrated on templated prompts only, so rows that are not templated, or that
    cannot be checked for want of the tokenizer, are never routed.
    """

    layer: int | tuple[int, ...]
    pooling: tuple[str, ...] = ("last",)
    calibration: dict[str, float] = field(default_factory=lambda: {"scale": 1.0, "shift": 0.0})
    route_below: float = 5.0
    model: dict[str, Any] = field(default_factory=dict)
    aggregate: str = "pooled"
    check_above: float | None = None
    check_divergence: float | None = None
    check_expert: str = ""
    chat_template: bool = False
    check_rollout: int = 0

    def __post_init__(self) -> None:
        layers = self.layers
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.aggregate == "token_max" and len(layers) != 1:
            raise ValueError(f"aggregate 'token_max' reads exactly one layer, got {self.layer!r}")
        if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
            raise ValueError(f"layer must be a non-negative int or a list of them (hidden-state indices), got {self.layer!r}")
        if not self.pooling or any(p not in POOLINGS for p in self.pooling):
            raise ValueError(f"pooling must be a non-empty list drawn from {POOLINGS}, got {self.pooling!r}")
        if not isinstance(self.calibration, dict) or not all(
                isinstance(self.calibration.get(key), (int, float)) and not isinstance(self.calibration.get(key), bool)
                and math.isfinite(self.calibration[key]) for key in ("scale", "shift")):
            raise ValueError(f"calibration must hold finite numbers 'scale' and 'shift', got {self.calibration!r}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be the fingerprint of the model trained on (an object), got {self.model!r}")
        depth = self.model.get("num_hidden_layers")
        if isinstance(depth, int) and any(i >= depth for i in layers):
            raise ValueError(f"hidden-state index {max(layers)} of a {depth}-layer model is the output after its final "
                             f"norm, which the decoding paths do not read (they hook decoder blocks: it read other "
                             f"numbers there than in training); retrain the probe with --layers below {depth}")
        if not 0.0 <= self.route_below <= RISK_SCALE:
            raise ValueError(f"route_below is a risk in [0, {RISK_SCALE}], got {self.route_below}")
        check_divergence_operating_point(self.check_above, self.check_divergence, "the probe's ")
        check_rollout_tokens(self.check_rollout, "the probe's ")

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,) if isinstance(self.layer, int) else tuple(self.layer)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layer"] = self.layer if isinstance(self.layer, int) else list(self.layer)
        data["pooling"] = list(self.pooling)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProbeSpec":
        layer = data["layer"]
        return cls(
            layer=layer if isinstance(layer, int) else tuple(layer),
            pooling=tuple(data.get("pooling", ("last",))),
            calibration=dict(data.get("calibration", {"scale": 1.0, "shift": 0.0})),
            route_below=float(data.get("route_below", 5.0)),
            model=dict(data.get("model", {})),
            aggregate=str(data.get("aggregate", "pooled")),
            check_above=_optional_float(data.get("check_above")),
            check_divergence=_optional_float(data.get("check_divergence")),
            check_expert=str(data.get("check_expert", "")),
            chat_template=data.get("chat_template", False) is True,
            check_rollout=data.get("check_rollout", 0),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def check_divergence_operating_point(check_above: float | None, check_divergence: float | None,
                                     owner: str = "") -> None:
    """Both or neither set, each within `ngsd.config.check_operating_point_bounds`."""
    if (check_above is None) != (check_divergence is None):
        raise ValueError(f"{owner}check_above and check_divergence go together: set both or neither, got "
                         f"{check_above!r} and {check_divergence!r}")
    check_operating_point_bounds(check_above, check_divergence, owner)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One layer's hidden states [B, T, H] pooled over each row's real tokens -> [B, H] (float32)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden states must be [B, T, H] with attention_mask [B, T]; got {tuple(hidden.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(hidden.device, torch.float32)
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("attention_mask has a row with no real token; every prompt needs at least one token")
    hidden = hidden.float()
    if pooling == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(-1, keepdim=True)
    if pooling == "max":
        return hidden.masked_fill(mask[..., None] == 0, float("-inf")).amax(1)
    positions = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32)
    last = (mask * (positions + 1)).argmax(-1)  # the last real token, whatever side is padded
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def model_fingerprint(model_or_config: Any) -> dict[str, Any]:
    """The FINGERPRINT_FIELDS of a model (or its config) that exist on it."""
    config = getattr(model_or_config, "config", model_or_config)
    return {name: getattr(config, name) for name in FINGERPRINT_FIELDS if getattr(config, name, None) is not None}


# ---------------------------------------------------------------------------------------------
# Weight fingerprint: tells two models of the same architecture apart (a base model from its
# instruct version, a model from its fine-tune), recorded by `ngsd train-probe` in
# probe.json's model["weights"].
# ---------------------------------------------------------------------------------------------

WEIGHTS_KEY = "weights"
WEIGHT_FINGERPRINT_VERSION = 1
WEIGHT_SAMPLES = 16  # values read from each weight matrix
# the precisions a fingerprint is recorded at: a model loaded in any of them compares exactly
_FINGERPRINT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ProbeTrainedOnOtherWeights(UserWarning):
    """A risk probe runs on a model of its architecture whose weights are not the ones it was trained on."""


def _sampled_matrices(named: Any) -> list[tuple[str, torch.Tensor]]:
    """The weight matrices a fingerprint reads, sorted by name: every 2-D parameter but the LM head (often tied to
    the embedding, stored or not) and adapter weights (PEFT's lora_A / lora_B)."""
    out = [(name, tensor) for name, tensor in named
           if tensor.dim() == 2 and not name.endswith("lm_head.weight") and "lora_" not in name]
    return sorted(out, key=lambda item: item[0])


def _sample_positions(numel: int, count: int = WEIGHT_SAMPLES) -> torch.Tensor:
    """`count` fixed flat positions spread over a tensor of `numel` values (columns vary, not only rows)."""
    block = max(1, numel // count)
    return torch.tensor([min(numel - 1, i * block + (i * 7919) % block) for i in range(count)], dtype=torch.long)


@dataclass(frozen=True)
class WeightSamples:
    """What a weight fingerprint reads: the shapes of the weight matrices, WEIGHT_SAMPLES values of each (in
    float32, which holds every bfloat16 and float16 value exactly) and the dtypes they are stored in."""

    shapes: tuple[tuple[int, ...], ...]
    values: torch.Tensor
    dtypes: frozenset[str]

    @property
    def dtype(self) -> str | None:
        """The coarsest precision of the matrices ("float32", "bfloat16", "float16"); None for a mix of the two half
        precisions, or another dtype."""
        if not self.dtypes <= set(_FINGERPRINT_DTYPES) or {"bfloat16", "float16"} <= self.dtypes:
            return None
        return next((n for n in ("bfloat16", "float16") if n in self.dtypes), "float32")

    def digest(self, dtype: str) -> str:
        """Hash of the shapes and of the values rounded to `dtype` (to nearest, as a cast of the weights does)."""
        import hashlib

        digest = hashlib.sha256(f"v{WEIGHT_FINGERPRINT_VERSION}:{self.shapes}".encode())
        digest.update(self.values.to(_FINGERPRINT_DTYPES[dtype]).float().numpy().tobytes())
        return digest.hexdigest()[:16]


def weight_samples(model: Any) -> WeightSamples | None:
    """The sampled weights of `model` (see `weight_fingerprint`); None when it has no weight matrix, or when one is
    not a floating-point tensor (a quantised model: nothing to compare)."""
    named = getattr(model, "named_parameters", None)
    if named is None:
        return None
    matrices = _sampled_matrices(named())
    # the same tensors, not changed since (an in-place step or merge bumps _version, `.to` moves data): the last samples
    key = tuple((id(param), param._version, param.data_ptr(), param.dtype) for _name, param in matrices)
    cached = _SAMPLES.get(model) if _weakly_referable(model) else None
    if cached is not None and cached[0] == key:
        return cached[1]
    samples = _read_samples(matrices)
    if _weakly_referable(model):
        _SAMPLES[model] = (key, samples)
    return samples


_SAMPLES: "weakref.WeakKeyDictionary[Any, tuple[tuple, WeightSamples | None]]" = weakref.WeakKeyDictionary()


def _weakly_referable(model: Any) -> bool:
    try:
        weakref.ref(model)
    except TypeError:
        return False
    return True


def _read_samples(matrices: list[tuple[str, torch.Tensor]]) -> WeightSamples | None:
    shapes, dtypes, parts = [], set(), []
    with torch.no_grad():
        for _name, param in matrices:
            if not param.is_floating_point() or param.device.type == "meta":
                return None
            flat = param.detach().reshape(-1)
            part = flat[_sample_positions(flat.numel()).to(flat.device)].float()
            parts.append(part.to(parts[0].device) if parts else part)  # one transfer to the CPU for all
            shapes.append(tuple(param.shape))
            dtypes.add(str(param.dtype).removeprefix("torch."))
    if not parts:
        return None
    return WeightSamples(tuple(shapes), torch.cat(parts).cpu(), frozenset(dtypes))


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def folder_weight_samples(folder: str | Path) -> WeightSamples | None:
    """`weight_samples` of the model saved in `folder` (its *.safetensors files), read without loading it: only
    the rows that hold the sampled values. None when the folder holds no safetensors weights, or others than
    float32 / bfloat16 / float16 matrices."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    found: list[tuple[str, tuple[int, ...], str, Any]] = []
    handles = []  # kept open while their slices are read
    try:
        for file in files:
            handle = safe_open(str(file), framework="pt")
            handles.append(handle)
            for name in handle.keys():
                view = handle.get_slice(name)
                shape = tuple(view.get_shape())
                if len(shape) == 2 and not name.endswith("lm_head.weight") and "lora_" not in name:
                    found.append((name, shape, str(view.get_dtype()), view))
        if not found or any(dtype not in _SAFETENSORS_DTYPES for _n, _s, dtype, _v in found):
            return None
        parts = []
        for _name, (rows, cols), _dtype, view in sorted(found, key=lambda item: item[0]):
            positions = _sample_positions(rows * cols).tolist()
            parts.append(torch.stack([view[p // cols: p // cols + 1][0, p % cols].float() for p in positions]))
    except Exception:  # a damaged or unreadable file: the loader reports it, not this check
        return None
    return WeightSamples(tuple(shape for _n, shape, _d, _v in sorted(found, key=lambda item: item[0])),
                         torch.cat(parts), frozenset(_SAFETENSORS_DTYPES[d] for _n, _s, d, _v in found))


def weight_fingerprint(model: Any) -> dict[str, Any] | None:
    """A cheap fingerprint of `model`'s weights, recorded with a probe (probe.json, model["weights"]).

    WEIGHT_SAMPLES values at fixed positions of every weight matrix (embedding and each decoder layer's
    projections; sorted by name), hashed with the matrices' shapes after rounding to each of float32, bfloat16 and
    float16. The same weights loaded in any of these dtypes, on any device, or read from the GGUF file rather than
    its safetensors conversion, give the same value at the precision they share (rounding to nearest is
    deterministic); a fine-tune changes the sampled values, whichever matrices it touched. "dtype": the precision
    the model was read at. None for a model without floating-point weight matrices.
    """
    samples = weight_samples(model)
    if samples is None or samples.dtype is None:
        return None
    return {"version": WEIGHT_FINGERPRINT_VERSION, "dtype": samples.dtype, "matrices": len(samples.shapes),
            **{name: samples.digest(name) for name in _FINGERPRINT_DTYPES}}


def compare_weights(recorded: Any, model: Any) -> bool | None:
    """Whether `model` (or its `WeightSamples`) has the weights `recorded` (a `weight_fingerprint`) was taken of.

    Compared at the coarser precision of the two: exact for the same weights whenever one side is float32 or both
    share a dtype. None when it cannot tell: no record (probes trained before fingerprints), another fingerprint
    version, a quantised model, or one side in bfloat16 and the other in float16 (rounding twice differs).
    """
    if not isinstance(recorded, dict) or recorded.get("version") != WEIGHT_FINGERPRINT_VERSION:
        return None
    trained = recorded.get("dtype")
    samples = model if isinstance(model, WeightSamples) else weight_samples(model)
    running = None if samples is None else samples.dtype
    if running is None or trained not in _FINGERPRINT_DTYPES:
        return None
    if "float32" in (trained, running) or trained == running:
        at = running if trained == "float32" else trained
    else:
        return None
    if not isinstance(recorded.get(at), str):
        return None
    return recorded.get("matrices") == len(samples.shapes) and recorded[at] == samples.digest(at)


def model_label(model: Any) -> str:
    """How to name `model` in a message: its config's name or path, else its class."""
    config = getattr(model, "config", model)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or type(model).__name__)


class RiskProbe:
    """A trained hidden-state risk probe: pooled features -> standardised logistic -> calibrated risk 0..10."""

    def __init__(self, spec: ProbeSpec, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | float) -> None:
        shapes = {tuple(mean.shape), tuple(std.shape), tuple(weight.shape)}
        if len(shapes) != 1 or mean.dim() != 1:
            raise ValueError(f"mean, std and weight must be equal-length vectors, got shapes {sorted(shapes)}")
        if bool((std <= 0).any()):
            raise ValueError("std must be positive everywhere (standardisation divides by it)")
        bias = torch.as_tensor(bias, dtype=torch.float32)
        if bias.numel() != 1:
            raise ValueError(f"bias must be one number, got shape {tuple(bias.shape)}")
        # NaN risks read as "risk nan >= route_below" and guarded at the middle alpha; a -inf bias routed every
        # request unguarded (risk 0)
        for name, tensor in (("mean", mean), ("std", std), ("weight", weight), ("bias", bias)):
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"the probe's {name} holds NaN or infinite values")
        hidden = spec.model.get("hidden_size")
        if isinstance(hidden, int):
            features = hidden if spec.aggregate == "token_max" else hidden * len(spec.layers) * len(spec.pooling)
            if mean.shape[0] != features:
                raise ValueError(f"the probe's vectors hold {mean.shape[0]} features, but its layers and poolings read "
                                 f"{features} of a hidden size-{hidden} model")
        self.spec = spec
        self.mean = mean.float()
        self.std = std.float()
        self.weight = weight.float()
        self.bias = bias.reshape(())

    @property
    def layer(self) -> int | tuple[int, ...]:
        """The hidden-state index (or indices) read: `hidden_states[probe.layer]`."""
        return self.spec.layer

    @property
    def route_below(self) -> float:
        return self.spec.route_below

    @property
    def num_features(self) -> int:
        return 1 if self.spec.aggregate == "token_max" else self.weight.shape[0]

    def token_logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """token_max: the logistic logit of every token of [B, T, H] -> [B, T], -inf at padding."""
        if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
            raise ValueError(f"hidden states must be [B, T, H] with attention_mask [B, T]; got {tuple(hidden.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        z = (hidden.float().to(self.mean.device) - self.mean) / self.std
        scores = z @ self.weight + self.bias
        return scores.masked_fill(attention_mask.to(scores.device) == 0, float("-inf"))

    def features(self, hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, F] features from a prefill's hidden-state tuple (HF `output_hidden_states=True`)."""
        if not isinstance(hidden_states, (tuple, list)):
            raise TypeError("hidden_states must be the tuple a forward with output_hidden_states=True returns")
        need = max(self.spec.layers)
        if len(hidden_states) <= need:
            raise ValueError(f"the probe reads hidden_states[{need}] but only {len(hidden_states)} were given")
        if self.spec.aggregate == "token_max":
            if bool((attention_mask.sum(-1) == 0).any()):
                raise ValueError("attention_mask has a row with no real token; every prompt needs at least one token")
            return self.token_logits(hidden_states[need], attention_mask).amax(-1, keepdim=True)
        parts = [pool(hidden_states[i], attention_mask, p) for i in self.spec.layers for p in self.spec.pooling]
        return torch.cat(parts, dim=-1)

    def logit(self, features: torch.Tensor) -> torch.Tensor:
        """The uncalibrated logistic-regression logit per row."""
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must be [B, {self.num_features}], got {tuple(features.shape)}")
        if self.spec.aggregate == "token_max":
            return features[:, 0].float()  # already the maximum token logit
        x = (features.float().to(self.mean.device) - self.mean) / self.std
        return x @ self.weight + self.bias

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """Calibrated P(harmful) per row."""
        cal = self.spec.calibration
        return torch.sigmoid(cal["scale"] * self.logit(features) + cal["shift"])

    def risk(self, features: torch.Tensor) -> torch.Tensor:
        """Calibrated risk per row on 0..10 (10 * P(harmful)); `ReflectionConfig.alpha_for_risk` maps it."""
        return RISK_SCALE * self.probability(features)

    def to(self, device: str | torch.device) -> "RiskProbe":
        self.mean, self.std, self.weight, self.bias = (t.to(device) for t in (self.mean, self.std, self.weight, self.bias))
        return self

    def save(self, path: str | Path, report: dict[str, Any] | None = None) -> Path:
        """Write probe.json + probe.safetensors (and training_report.json when given) into folder `path`."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias.reshape(1)}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
        (folder / PROBE_FILE).write_text(json.dumps(self.spec.to_dict(), indent=2) + "\n")
        if report is not None:
            (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, path: str | Path) -> "RiskProbe":
        """Read a probe folder written by `save` (or `ngsd train-probe`)."""
        from safetensors.torch import load_file

        folder = Path(path)
        if not is_probe_folder(folder):
            raise FileNotFoundError(
                f"{folder} is not a risk-probe folder (needs {PROBE_FILE} and {WEIGHTS_FILE}); train one with "
                f"`ngsd train-probe --out {folder}`"
            )
        try:
            data = json.loads((folder / PROBE_FILE).read_text())
            if not isinstance(data, dict):
                raise ValueError(f"{PROBE_FILE} holds a {type(data).__name__}, not an object")
            spec = ProbeSpec.from_dict(data)
            tensors = load_file(str(folder / WEIGHTS_FILE))
            missing = [name for name in ("mean", "std", "weight", "bias") if name not in tensors]
            if missing:
                raise ValueError(f"{WEIGHTS_FILE} lacks {missing}")
            return cls(spec, tensors["mean"], tensors["std"], tensors["weight"], tensors["bias"].flatten()[:1])
        except Exception as error:  # a damaged folder: JSON, safetensors, shape or type errors, as one line
            raise ValueError(f"{folder} is not a usable risk probe ({type(error).__name__}: {error}); train it again "
                             f"with `ngsd train-probe --out {folder}` or restore its files") from error

    def matches(self, model: Any) -> bool:
        """True when `model` has the architecture and size this probe was trained on (its config: a model of the
        same shape with other weights matches too; `same_weights` tells those apart)."""
        trained = {k: v for k, v in self.spec.model.items() if k in FINGERPRINT_FIELDS}
        return bool(trained) and all(model_fingerprint(model).get(k) == v for k, v in trained.items())

    def same_weights(self, model: Any) -> bool | None:
        """Whether `model` has the weights this probe was trained on (`compare_weights`); None when that cannot be
        told (a probe trained before weight fingerprints were recorded, a config rather than a model, ...)."""
        return compare_weights(self.spec.model.get(WEIGHTS_KEY), model)

    def check_model(self, model: Any, where: str = "the risk probe", weights: WeightSamples | None = None) -> None:
        """Refuse a `model` of another architecture (ValueError); warn (`ProbeTrainedOnOtherWeights`) when it has
        this probe's architecture but other weights: the probe's risks, and so which requests it routes unguarded,
        are calibrated on the hidden states of the model it was trained on. `model` may be a config, with its
        weights' samples in `weights` (`folder_weight_samples`); a config alone is checked for its architecture."""
        trained_on = self.spec.model.get("name") or "another model"
        if not self.matches(model):
            shape = {k: v for k, v in self.spec.model.items() if k in FINGERPRINT_FIELDS}
            raise ValueError(f"{where} was trained on another model ({trained_on}: {shape}) than "
                             f"{model_label(model)} ({model_fingerprint(model)}); train one for this model with "
                             f"`ngsd train-probe --model <this model> --out <folder>`")
        if compare_weights(self.spec.model.get(WEIGHTS_KEY), model if weights is None else weights) is False:
            from ..caller_warning import warn_at_caller

            warn_at_caller(
                f"{where} was trained on {trained_on}, but runs on {model_label(model)}: same architecture, "
                f"other weights (a fine-tune, or the base/instruct sibling). The probe reads this model's hidden "
                f"states, so its risks - and which requests it routes unguarded - are not calibrated for it, and "
                f"harmful requests may be routed unguarded. Train a probe for this model with `ngsd train-probe "
                f"--model <this model> --out <folder>` and pass ReflectionConfig(probe=<folder>); if you reuse this "
                f"probe knowingly, silence this with "
                f"warnings.filterwarnings('ignore', category=ngsd.risk.probe.ProbeTrainedOnOtherWeights)",
                ProbeTrainedOnOtherWeights)


def shipped_probe_path(model_name_or_config: Any = None) -> Path | None:
    """The probe folder shipped for the default model, or None for any other model.

    Accepts a name ("smollm2", the hub id, None = the default), a model, or a model config.
    """
    if model_name_or_config is None or isinstance(model_name_or_config, (str, Path)):
        from ..loading import DEFAULT_HUB_ID, is_default_model

        name = model_name_or_config
        default = is_default_model(name) or str(name).strip().lower() == DEFAULT_HUB_ID.lower()
    else:
        default = _is_default_model_object(model_name_or_config)
    folder = SHIPPED_PROBES / DEFAULT_PROBE_NAME
    return folder if default and (folder / PROBE_FILE).is_file() else None


def _is_default_model_object(model_or_config: Any) -> bool:
    """Same config as the default model and named like it (its hub id, or the converted cache folder)."""
    from ..loading import _MARKER, DEFAULT_HUB_ID, is_default_model

    config = getattr(model_or_config, "config", model_or_config)
    folder = SHIPPED_PROBES / DEFAULT_PROBE_NAME
    if not (folder / PROBE_FILE).is_file():
        return False
    trained = ProbeSpec.from_dict(json.loads((folder / PROBE_FILE).read_text())).model
    fingerprint = model_fingerprint(config)
    if any(fingerprint.get(k) != trained.get(k) for k in FINGERPRINT_FIELDS if k in trained):
        return False
    name = str(getattr(config, "_name_or_path", "") or "")
    if not name:
        return False
    return (is_default_model(name) or name.strip().lower() == DEFAULT_HUB_ID.lower()
            or (Path(name) / _MARKER).is_file())


def probe_for(model: Any) -> RiskProbe | None:
    """The shipped probe when `model` is the default SmolLM2-135M-Instruct, else None."""
    path = shipped_probe_path(model)
    return RiskProbe.load(path) if path is not None else None


def this_thread_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """`hook` acting only on the forwards of the thread that wrapped it (elsewhere it returns None: no change).
    A hook on a model's layers also sees the forwards of concurrent calls on the same model, whose hidden states
    would otherwise become this call's."""
    owner = threading.get_ident()

    def in_owner_thread(*args: Any, **kwargs: Any) -> Any:
        return hook(*args, **kwargs) if threading.get_ident() == owner else None

    return in_owner_thread


def decoder_layers(model: Any) -> Sequence[torch.nn.Module] | None:
    """The list of decoder blocks of a HF causal LM (Llama, Qwen2, Gemma, ...), or None when not found."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


class _StopForward(Exception):
    pass


@torch.inference_mode()
def prompt_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         upto: int | None = None) -> tuple[torch.Tensor, ...]:
    """hidden_states[0..upto] of a left-padded prompt batch, as `output_hidden_states=True` gives them.

    With `upto` below the number of layers the forward stops after decoder block `upto` (the deeper
    blocks and the LM head are never run); otherwise one full forward. Positions come from the
    mask, as in the decoding loop's prefill.
    """
    from ..decoding.pair import positions_from_mask

    positions = positions_from_mask(attention_mask)
    layers = decoder_layers(model)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if upto is None or layers is None or n_layers is None or upto >= n_layers:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    output_hidden_states=True, use_cache=False, logits_to_keep=1)
        return tuple(out.hidden_states)
    states: list[torch.Tensor] = []

    def before_first(_module, args, kwargs):
        states.append(args[0] if args else kwargs["hidden_states"])
        if upto == 0:
            raise _StopForward

    def after(index):
        def hook(_module, _args, output):
            states.append(output[0] if isinstance(output, (tuple, list)) else output)
            if index + 1 == upto:
                raise _StopForward

        return hook

    # only this thread's forward is read (and stopped): see this_thread_only
    handles = [layers[0].register_forward_pre_hook(this_thread_only(before_first), with_kwargs=True)]
    handles += [layers[i].register_forward_hook(this_thread_only(after(i))) for i in range(upto)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return tuple(states[: upto + 1])


def estimate_risk(model: Any, tokenizer: Any, requests: Sequence[str], probe: RiskProbe, *,
                  batch_size: int = 16, chat: bool = True) -> list[float]:
    """Calibrated risk 0..10 per request: one (truncated) prefill of the chat-templated requests.

    Requests are batched by length (less padding); the result is in the order given.
    """
    from ..api import encode_prompts

    if isinstance(requests, str):
        raise TypeError("requests must be a list of strings, not one string; wrap it: [request]")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(requests)), key=lambda i: len(requests[i]))
    risks: list[float] = [0.0] * len(requests)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, mask = encode_prompts(tokenizer, [requests[i] for i in rows], chat=chat, device=device)
        states = prompt_hidden_states(model, input_ids, mask, upto=max(probe.spec.layers))
        values = probe.risk(probe.features(states, mask)).tolist()
        for i, value in zip(rows, values):
            risks[i] = float(value)
    return risks


__all__ = [
    "AGGREGATES",
    "DEFAULT_PROBE_NAME",
    "POOLINGS",
    "ProbeSpec",
    "ProbeTrainedOnOtherWeights",
    "RiskProbe",
    "compare_weights",
    "estimate_risk",
    "folder_weight_samples",
    "model_fingerprint",
    "pool",
    "probe_for",
    "prompt_hidden_states",
    "shipped_probe_path",
    "this_thread_only",
    "weight_fingerprint",
]
