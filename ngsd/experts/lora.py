"""A peft LoRA adapter applied to chosen rows of a batch, so base and expert share one forward.

peft's mixed-adapter batches route rows by ``adapter_names``; this is the same idea with less
machinery: forward hooks on the adapted ``nn.Linear`` layers add ``scale * B(A(x))`` to the rows
from ``expert_from`` on, and do nothing unless the calling thread switched the adapter on. The
model object is left untouched otherwise, so plain ``generate`` calls, also from other threads,
see the base model.

>>> import torch, ngsd
>>> from ngsd.experts.lora import LoraAdapter
>>> adapter = LoraAdapter.load(ngsd.shipped_expert_path())      # doctest: +SKIP
>>> adapter.attach(model)                                        # doctest: +SKIP
>>> with adapter.rows_from(batch_size):                          # doctest: +SKIP
...     logits = model(torch.cat([ids, ids])).logits             # rows >= batch_size are the expert
"""

from __future__ import annotations

import json
import re
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file
from torch import nn

from ngsd.experts.row_products import ONE_BY_ONE_MAX, one_thread, pinned_plan, plan_for, runs_on_one_thread

_PEFT_PREFIX = "base_model.model."
# Attachment state lives on the model object (never keyed by id(model), which a later model can reuse):
# model.__dict__[_ATTACHED] = {adapter: [hook handles]}, removed with the last adapter.
_ATTACHED = "_ngsd_lora_hooks"
# How many holders each adapter's hooks have on a model, kept on the model (so the count dies with it): guarded
# calls, `ngsd.apply` and the divergence check's helpers, in any thread, share one set of hooks; the first holder
# attaches them and the last takes them off, so no holder can pull them from under another one still decoding.
_HOLDERS = "_ngsd_lora_holders"
_holders_lock = threading.Lock()


# adapter_config.json options whose tensors or arithmetic the hooks (x @ A.T @ B.T * scale on Linear layers) lack
_UNSUPPORTED_OPTIONS = (
    ("lora_bias", "a bias on lora_B"),
    ("trainable_token_indices", "trained embedding rows"),
)


def _lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (rank**0.5) if rslora else alpha / rank


def _pattern(config: dict, field_name: str, path: Path) -> dict:
    patterns = config.get(field_name) or {}
    if not isinstance(patterns, dict) or not all(
            isinstance(value, (int, float)) and not isinstance(value, bool) for value in patterns.values()):
        raise ValueError(f"{path}: {field_name} must map module-name patterns to numbers, got {patterns!r}; save the "
                         "adapter again with PeftModel.save_pretrained")
    return patterns


def _pattern_key(patterns: dict, module: str) -> str:
    """The first pattern matching the module's name, as peft's `get_pattern_key` picks it (else the name)."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return module


@dataclass
class _LoraPair:
    down: torch.Tensor  # lora_A.weight [r, in]
    up: torch.Tensor  # lora_B.weight [out, r]


# copy.deepcopy / pickle of an adapter, or of a model its hooks are attached to (threading.local gave a bare
# "cannot pickle '_thread._local' object"); the copy's hooks would also share this adapter's row state
_NOT_COPYABLE = ("an ngsd LoraAdapter cannot be copied or pickled, nor can a model it is attached to (ngsd.apply): "
                 "call ngsd.remove(model) first, copy or save the model, then ngsd.apply each copy; a second adapter "
                 "comes from LoraAdapter.load(path)")


@dataclass(eq=False)
class LoraAdapter:
    """LoRA weights by module name plus their scale, read from a peft adapter folder."""

    pairs: dict[str, _LoraPair]
    scale: float
    source: str = ""
    base_model: str | None = None  # adapter_config.json's base_model_name_or_path: named when it does not fit
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __deepcopy__(self, memo: dict) -> "LoraAdapter":
        raise TypeError(_NOT_COPYABLE)

    def __reduce_ex__(self, protocol: int):
        raise TypeError(_NOT_COPYABLE)

    @classmethod
    def load(cls, path: str | Path) -> "LoraAdapter":
        path = Path(path)
        config_file = path / "adapter_config.json"
        weights_file = path / "adapter_model.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a peft LoRA adapter folder: it needs adapter_config.json and "
                "adapter_model.safetensors (save one with PeftModel.save_pretrained)"
            )
        try:
            config = json.loads(config_file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{config_file} is not valid JSON ({error}); save the adapter again with "
                             "PeftModel.save_pretrained") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} holds a {type(config).__name__}, not a JSON object; save the adapter "
                             "again with PeftModel.save_pretrained")
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{path}: only LoRA adapters are supported, got peft_type={config.get('peft_type')}")
        for unsupported in ("use_dora", "fan_in_fan_out"):
            if config.get(unsupported):
                raise ValueError(f"{path}: {unsupported}=True adapters are not supported; merge the adapter instead")
        if config.get("modules_to_save"):
            raise ValueError(
                f"{path}: adapters with modules_to_save change whole modules; load base+adapter merged as a "
                "separate expert model instead"
            )
        if isinstance(config.get("r"), bool) or not isinstance(config.get("r"), int) or config["r"] < 1:
            raise ValueError(f"{config_file}: 'r' (the LoRA rank) must be an int >= 1, got {config.get('r')!r}; "
                             "save the adapter again with PeftModel.save_pretrained")
        for option, what in _UNSUPPORTED_OPTIONS:
            if config.get(option):
                raise ValueError(f"{path}: {option}={config[option]!r} adapters are not supported ({what}); merge the "
                                 "adapter into a copy of the base model and pass that as a separate expert model")
        rank = int(config["r"])
        lora_alpha = float(config.get("lora_alpha", rank))
        rslora = bool(config.get("use_rslora"))
        scale = _lora_scale(lora_alpha, rank, rslora)

        try:
            tensors = load_file(str(weights_file))
        except Exception as error:  # a truncated or rewritten file: safetensors' own error (a raw traceback in the CLI)
            raise ValueError(f"{weights_file} is not a valid safetensors file ({type(error).__name__}: {error}); save "
                             "the adapter again (PeftModel.save_pretrained, ngsd train-expert) or restore the file") from error
        downs: dict[str, torch.Tensor] = {}
        ups: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
            if name.endswith(".lora_A.weight"):
                downs[name[: -len(".lora_A.weight")]] = tensor
            elif name.endswith(".lora_B.weight"):
                ups[name[: -len(".lora_B.weight")]] = tensor
            else:  # a LoRA bias, an embedding LoRA, trainable tokens...: ignoring it would run another expert
                raise ValueError(f"{path}: the adapter holds {key!r}, which ngsd's LoRA hooks cannot apply (they "
                                 "add lora_B @ lora_A to Linear layers only); merge the adapter into a copy of the "
                                 "base model and pass that as a separate expert model")
        if not downs or downs.keys() != ups.keys():
            raise ValueError(f"{path}: adapter weights hold no matching lora_A/lora_B pairs")
        alphas = _pattern(config, "alpha_pattern", path)
        pairs = {}
        for name in downs:
            # peft scales each module by its own alpha (alpha_pattern) and rank (rank_pattern, which sized lora_A)
            module_alpha = float(alphas.get(_pattern_key(alphas, name), lora_alpha))
            ratio = _lora_scale(module_alpha, downs[name].shape[0], rslora) / scale
            pairs[name] = _LoraPair(downs[name], ups[name] if ratio == 1.0 else ups[name] * ratio)
        return cls(pairs=pairs, scale=scale, source=str(path), base_model=config.get("base_model_name_or_path"))

    def attach(self, model: nn.Module) -> None:
        """Add the hooks to `model` (idempotent). Raises if the adapter does not fit the model."""
        if self.is_attached(model):
            return
        pinned_plan()  # a mistyped NGSD_LORA_ROW_PLAN fails here, not inside a forward
        layers = self.fitting_layers(model)
        self.detach(model)  # hooks someone removed behind our back: start clean
        # Each attachment gets its own copies in the layer's device and dtype, owned by the hook alone: one adapter
        # can serve models of different dtypes, and detach frees them with the hook.
        hooks = {module: _LoraHook(self._local, pair, self.scale, module.weight) for pair, module in layers}
        for siblings in _input_sharing_groups(model, hooks):
            _SiblingProducts(self._local, siblings)
        model.__dict__.setdefault(_ATTACHED, {})[self] = [
            module.register_forward_hook(hook) for module, hook in hooks.items()]

    def fitting_layers(self, model: nn.Module) -> list[tuple[_LoraPair, nn.Linear]]:
        """Each LoRA pair with the Linear layer of `model` it adapts; ValueError naming the first that does not fit
        (a weightless copy of a model, on the meta device, is enough)."""
        modules = dict(model.named_modules())
        trained_for = (f" (it was trained for {self.base_model}; train one for this model with `ngsd train-expert`)"
                       if self.base_model else "")
        layers = []
        for name, pair in self.pairs.items():
            module = _find_module(modules, name)
            if module is None or not isinstance(module, nn.Linear):
                raise ValueError(
                    f"LoRA adapter {self.source} targets {name!r}, which is not a Linear layer of this model: "
                    f"the adapter was trained for another architecture{trained_for}"
                )
            if pair.down.shape[1] != module.in_features or pair.up.shape[0] != module.out_features:
                raise ValueError(
                    f"LoRA adapter {self.source} does not fit {name}: adapter {tuple(pair.up.shape)}x"
                    f"{tuple(pair.down.shape)} vs layer {module.out_features}x{module.in_features}{trained_for}"
                )
            layers.append((pair, module))
        return layers

    def hold(self, model: nn.Module) -> bool:
        """Attach the hooks for one more holder (a guarded call, `ngsd.apply`); pair with `release`. False, and
        nothing counted, when `attach` put them on outside the count: that attachment keeps them on."""
        with _holders_lock:
            holders = model.__dict__.get(_HOLDERS, {})
            if self not in holders and self.is_attached(model):
                return False
            if not self.is_attached(model):  # also hooks someone removed behind the holders' backs
                self.attach(model)
            model.__dict__[_HOLDERS] = {**holders, self: holders.get(self, 0) + 1}
        return True

    def release(self, model: nn.Module) -> None:
        """One holder is done; the last one takes the hooks off."""
        with _holders_lock:
            holders = dict(model.__dict__[_HOLDERS])
            holders[self] -= 1
            if not holders[self]:
                del holders[self]
                self.detach(model)
            if holders:
                model.__dict__[_HOLDERS] = holders
            else:
                model.__dict__.pop(_HOLDERS)  # leave no trace on the model

    @contextmanager
    def held(self, model: nn.Module) -> Iterator[None]:
        """The hooks on `model` within the block, shared with every other holder (`hold` / `release`)."""
        holding = self.hold(model)
        try:
            yield
        finally:
            if holding:
                self.release(model)

    def detach(self, model: nn.Module) -> None:
        """Take the hooks off now, whoever holds them (`release` waits for the last holder)."""
        attached = model.__dict__.get(_ATTACHED, {})
        for handle in attached.pop(self, []):
            handle.remove()
        if not attached:
            model.__dict__.pop(_ATTACHED, None)  # leave no trace on the model

    def is_attached(self, model: nn.Module) -> bool:
        """True when this adapter's hooks are registered on `model` (checked on the layers themselves)."""
        handles = model.__dict__.get(_ATTACHED, {}).get(self)
        return bool(handles) and all(_hook_alive(handle) for handle in handles)

    def targets_lm_head(self, model: nn.Module | None = None) -> bool:
        """True when the adapter changes the model's output embedding (then base and expert heads differ)."""
        names = ("lm_head",)
        if model is not None and hasattr(model, "get_output_embeddings"):
            head = model.get_output_embeddings()
            names += tuple(n for n, m in model.named_modules() if m is head and n)
        return any(name.split(".")[-1] in names or name in names for name in self.pairs)

    @contextmanager
    def rows_from(self, first_expert_row: int) -> Iterator[None]:
        """Within this block, in this thread, rows >= `first_expert_row` run with the adapter."""
        previous = getattr(self._local, "first_row", None)
        self._local.first_row = first_expert_row
        try:
            yield
        finally:
            self._local.first_row = previous


class _LoraHook:
    """The forward hook of one adapted layer: adds the LoRA update to the rows from ``first_row`` on (set by
    ``LoraAdapter.rows_from``). An object, not a closure, so that copying or pickling the model it is attached to
    fails with ``_NOT_COPYABLE``, not with a bare "Can't pickle local object"."""

    __slots__ = ("local", "pair", "scale", "down_t", "up_t", "plan", "siblings")

    def __init__(self, local: threading.local, pair: "_LoraPair", scale: float, weight: torch.Tensor) -> None:
        self.local, self.pair, self.scale = local, pair, scale
        self.plan: str | None = None  # row_products' plan, resolved at the first call with few rows
        self.siblings: _SiblingProducts | None = None  # layers fed the same input (q / k / v, gate / up)
        self._cast_like(weight)

    def _cast_like(self, weight: torch.Tensor) -> None:
        """Copies of the pair in the layer's device and dtype: each attachment owns its own (one adapter can serve
        models of different dtypes), made again from the adapter's own tensors when the model moves or is cast
        (`model.to(torch.bfloat16)` after `ngsd.apply` failed with "expected m1 and m2 to have the same dtype")."""
        self.down_t = self.pair.down.to(weight.device, weight.dtype).T.contiguous()
        self.up_t = (self.pair.up.to(weight.device, weight.dtype).T * self.scale).contiguous()

    def __reduce_ex__(self, protocol: int):
        raise TypeError(_NOT_COPYABLE)

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        first = getattr(self.local, "first_row", None)
        if first is None:
            return None
        if module.weight.dtype != self.down_t.dtype or module.weight.device != self.down_t.device:
            self._cast_like(module.weight)
        x, down_t, up_t = inputs[0], self.down_t, self.up_t
        rows = output[first:]
        count = rows.numel() // rows.shape[-1]  # rows times positions
        if self.plan is None and count <= ONE_BY_ONE_MAX:
            self.plan = plan_for(x, down_t, up_t)
        plan = self.plan if count <= ONE_BY_ONE_MAX else "alone"
        if torch.is_grad_enabled():
            delta = _lora_update(x, first, down_t, up_t, plan).view(rows.shape)
            return torch.cat([output[:first], rows + delta], dim=0)
        # a second thread would cost more to wake than it saves
        with one_thread() if runs_on_one_thread(x, count) else nullcontext():
            if self.siblings is not None and count > ONE_BY_ONE_MAX:
                rows.add_(self.siblings.update_of(self, x, first).view(rows.shape))
            elif count > 1 and plan != "one-by-one" and output.is_contiguous():
                # several rows (or positions): the up-projection adds into the output in one op (about 4% of a
                # half-guarded batch's decode on the 2-core CPU, against a product, then an add)
                rows.view(-1, output.shape[-1]).addmm_(x[first:].reshape(-1, x.shape[-1]) @ down_t, up_t)
            else:
                rows.add_(_lora_update(x, first, down_t, up_t, plan).view(rows.shape))
        return output


# Layers that read one input tensor in the decoder families the project patches (Llama, Qwen2, Gemma, Mistral):
# their updates run as one down product and one up product. Only names in one group are fused, and only while
# the input is the very tensor the group's first layer saw (`_SiblingProducts.update_of`), so a model that feeds
# them different inputs gets each layer's own update.
INPUT_SHARING_NAMES: tuple[frozenset[str], ...] = (frozenset({"q_proj", "k_proj", "v_proj"}),
                                                  frozenset({"gate_proj", "up_proj"}))


def _input_sharing_groups(model: nn.Module, hooks: dict[nn.Module, "_LoraHook"]) -> list[list["_LoraHook"]]:
    """The adapted layers of `model` that share a parent and a name group, two or more, in module order."""
    groups: dict[tuple[str, int], list[_LoraHook]] = {}
    for name, module in model.named_modules():
        hook = hooks.get(module)
        parent, _, leaf = name.rpartition(".")
        for index, names in enumerate(INPUT_SHARING_NAMES):
            if hook is not None and leaf in names:
                groups.setdefault((parent, index), []).append(hook)
    return [siblings for siblings in groups.values()
            if len(siblings) > 1 and len({h.down_t.shape[0] for h in siblings}) == 1]


class _SiblingProducts:
    """The LoRA updates of layers that read one input (q / k / v, gate / up), for more rows (times positions)
    than `ONE_BY_ONE_MAX`: the first of them to run computes all their updates in two products,
    `x @ [down_q | down_k | down_v]` and that times the block-diagonal ups, and each layer adds its own columns.
    Products over that many rows are split over the OpenMP threads, and where the threads sleep between parallel
    regions (`row_products`) each one waits for a wake-up: a half-guarded batch-32 decode step of the default
    model ran 420 small LoRA products; fused, 240. Fewer rows keep each layer's own products in the row plan the
    CPU was measured for (stacked, they were split over the threads and got slower: docs/SPEED.md). The update
    equals each layer's own product up to float rounding."""

    __slots__ = ("local", "hooks", "columns", "stacked")

    def __init__(self, local: threading.local, hooks: list["_LoraHook"]) -> None:
        self.local, self.hooks = local, hooks
        self.columns: dict[_LoraHook, slice] = {}
        start = 0
        for hook in hooks:
            hook.siblings = self
            width = hook.up_t.shape[1]
            self.columns[hook] = slice(start, start + width)
            start += width
        # (stacked downs, block-diagonal ups), built from the hooks' copies (their dtype and device) at the first use
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None

    def _products(self) -> tuple[torch.Tensor, torch.Tensor]:
        first, stacked = self.hooks[0].down_t, self.stacked
        if stacked is None or (stacked[0].dtype, stacked[0].device) != (first.dtype, first.device):
            # one assignment of both: a concurrent call in another thread read the new downs beside no ups yet
            # ("unsupported operand type(s) for @: 'Tensor' and 'NoneType'")
            stacked = self.stacked = (torch.cat([h.down_t for h in self.hooks], dim=1),
                                      torch.block_diag(*[h.up_t for h in self.hooks]))
        return stacked

    def update_of(self, hook: "_LoraHook", x: torch.Tensor, first: int) -> torch.Tensor:
        """[rows, out] `hook`'s layer's update for input `x` from row `first` on, computed with its siblings'
        at the first of them that reads this `x` (per thread: concurrent calls each have their own)."""
        done = getattr(self.local, "sibling_updates", None)
        if done is None or done.group is not self or done.x is not x or done.first != first or hook in done.taken:
            if any((h.down_t.dtype, h.down_t.device) != (x.dtype, x.device) for h in self.hooks):
                # a sibling not yet cast to the model's new dtype or device (each casts at its own first call)
                return _lora_update(x, first, hook.down_t, hook.up_t)
            down_t, up_t = self._products()
            done = self.local.sibling_updates = _SiblingUpdates(self, x, first, _lora_update(x, first, down_t, up_t))
        done.taken.add(hook)
        if len(done.taken) == len(self.hooks):  # every sibling has its update: do not keep the input alive
            self.local.sibling_updates = None
        return done.update[:, self.columns[hook]]


@dataclass
class _SiblingUpdates:
    """One group's updates for one input, until each of its layers has taken its columns."""

    group: _SiblingProducts
    x: torch.Tensor
    first: int
    update: torch.Tensor
    taken: set = field(default_factory=set)


def _lora_update(x: torch.Tensor, first: int, down_t: torch.Tensor, up_t: torch.Tensor, plan: str = "alone"
                 ) -> torch.Tensor:
    """`(x[first:] @ down_t) @ up_t` as [rows, out], in the form `plan` names (`row_products`: which products
    this CPU runs without waiting for a sleeping OpenMP thread; the forms are equal up to float rounding)."""
    rows = x[first:].reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if count == 1 and plan == "paired" and first >= 1:
        return ((x[first - 1:].reshape(2, -1) @ down_t) @ up_t)[1:]
    if 1 < count <= ONE_BY_ONE_MAX and plan == "one-by-one":
        return torch.cat([(rows[i:i + 1] @ down_t) @ up_t for i in range(count)])
    return (rows @ down_t) @ up_t


def _hook_alive(handle) -> bool:
    """Is the hook behind this RemovableHandle still registered on its (still living) layer?"""
    ref = handle.hooks_dict_ref[0] if isinstance(handle.hooks_dict_ref, tuple) else handle.hooks_dict_ref
    hooks = ref()
    return hooks is not None and handle.id in hooks


def _find_module(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    """peft saves names relative to the wrapped model; accept them with or without a leading `model.`."""
    if name in modules:
        return modules[name]
    for candidate in modules:
        if candidate.endswith("." + name) or name.endswith("." + candidate):
            return modules[candidate]
    return None
