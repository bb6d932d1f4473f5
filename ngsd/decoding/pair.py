"""Base and expert forward passes for one generate call, each with its own KV cache.

Three shapes of expert, one interface:

- `AdapterPair`: the expert is a LoRA adapter on the base; base rows and expert rows run as
  one batch through one forward and one cache.
- `ModelPair`: the expert is a separate model with the same tokenizer; two forwards. Its LM head may
  be padded to another row count than the base's: both then score only the ids the heads share.
- `BaseOnly`: no expert (gate off).

A call runs `prefill` (the base rows, and the expert rows when the guarded rows are known
already), then, when they were not, `guard(rows)` once the risk of each row is known (the risk
probe reads the base prefill), then `step(tokens)` per token. Only the guarded rows have expert
rows: a row routed unguarded costs no expert compute and no expert KV cache.

On a CPU a prefill runs in groups of rows of similar length, each only as wide as its longest prompt, when the
padding saved pays for the extra forwards (`row_groups`); the groups' caches are merged into the batch's.

Each call returns the last position's outputs of the base rows [B, ...] and of the guarded
expert rows [R, ...] (None without expert rows): the model's logits, or, with `output="hidden"`,
the final hidden states for the step op to run the LM head itself (`heads.split_head`).

A pair object belongs to one call. What it adds to the models for the call (the LoRA hooks) it
takes off again in `close()`, which the loop calls when the call ends, also on an error: the
models are left as they were found.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import torch
from torch import nn

from .heads import HeadSplit
from .kv_cache import (append_cache_rows, cache_kwargs, copy_cache_rows, has_sliding_layers, has_sliding_window,
                       left_pad_cache, make_growable, place_cache_rows, returned_cache, select_cache_rows)
from .row_groups import RowGroup, merge_row_groups, plan_row_groups
from ..experts.lora import LoraAdapter


class LazyLoraHooks:
    """One call's hold on an adapter's hooks, taken at its first expert row: a call whose rows are all
    routed never pays for attaching them (a few ms on the default model) nor for running them on
    every projection."""

    def __init__(self, adapter: LoraAdapter, model: nn.Module) -> None:
        self._adapter, self._model, self._held = adapter, model, False

    def hold(self) -> None:
        if not self._held:
            self._held = self._adapter.hold(self._model)

    def release(self) -> None:
        if self._held:
            self._adapter.release(self._model)
            self._held = False


def common_left_padding(attention_mask: torch.Tensor) -> int:
    """How many columns on the left are padding in every row of a left-padded batch."""
    real = attention_mask.bool().any(0)
    return int(real.long().argmax()) if bool(real.any()) else 0


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@contextmanager
def capture_hidden_states(model: nn.Module, indices: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record `hidden_states[i]` (as `output_hidden_states=True` numbers them) for `i` in `indices`
    during the forwards inside the block: index 0 is the input of decoder block 0, index i the
    output of block i - 1. Hooks, not `output_hidden_states`, so only the asked layers are kept.

    Only this thread's forwards are recorded: the hooks sit on layers that a concurrent call on the same
    model runs through too, and its states would become this call's risk."""
    from ..risk.probe import decoder_layers, this_thread_only

    captured: dict[int, torch.Tensor] = {}
    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"{type(model).__name__} exposes no list of decoder blocks; the risk probe cannot read it")

    @this_thread_only
    def keep(index: int, value) -> None:
        captured[index] = value[0] if isinstance(value, (tuple, list)) else value

    handles = []
    for index in sorted(set(indices)):
        if not 0 <= index <= len(layers):
            raise ValueError(f"hidden-state index {index} is outside 0..{len(layers)} for this model")
        if index == 0:
            handles.append(layers[0].register_forward_pre_hook(
                lambda _m, args, kwargs: keep(0, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        else:
            handles.append(layers[index - 1].register_forward_hook(
                lambda _m, _a, out, i=index: keep(i, out)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Prefill:
    """What `prefill` hands back: last-position outputs, and the asked hidden states of the prompt."""

    base: torch.Tensor
    expert: torch.Tensor | None
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)


class _CachedModel:
    """One causal LM with its cache, attention mask and next positions, fed token by token.

    With a `HeadSplit` it runs the trunk only and returns the final hidden states; else logits, of the
    first `vocab` ids only when given (the rows past them are head padding the other model lacks).
    """

    def __init__(self, model: nn.Module, head: HeadSplit | None = None, vocab: int | None = None) -> None:
        self.model = model
        self._forward_module = head.trunk if head is not None else model
        self._vocab = vocab
        # a row that finished is still fed (its output unused) and may pass the window it was checked against
        window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self._last_position = window - 1 if isinstance(window, int) and window > 0 else None
        self.cache = None
        self.attention_mask: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                states: dict[int, torch.Tensor] | None = None, *, grouped: bool = True) -> torch.Tensor:
        """The prompt's forward; on a CPU in groups of rows of similar length when that skips enough padding
        (`row_groups`). states: the dict `capture_hidden_states` fills during this prefill, given back holding
        the whole batch's hidden states. grouped=False: one forward (rows whose index means something to a
        hook, as the LoRA hooks' expert rows)."""
        positions = positions_from_mask(attention_mask)
        self.attention_mask = attention_mask
        self.next_position = positions[:, -1:] + 1
        groups = self.row_groups(input_ids, attention_mask) if grouped else None
        if groups is None:
            return self._forward(input_ids, positions)
        batch, width = input_ids.shape
        outs, captured, merged = [], [], None
        for group in groups:
            self.cache = None
            columns = slice(group.start, None)
            outs.append(self._forward(input_ids[group.rows, columns], positions[group.rows, columns],
                                      attention_mask[group.rows, columns]))
            if has_sliding_layers(self.cache):  # a model whose config did not say so: one forward after all
                self.cache = None
                return self._forward(input_ids, positions)
            merged = place_cache_rows(merged, self.cache, group.rows, group.start, batch, width)
            if states is not None:  # each forward refills it
                captured.append(dict(states))
        self.cache = merged
        if states is not None:
            for index in list(states):
                states[index] = merge_row_groups([part[index] for part in captured], groups, batch, width)
        return merge_row_groups(outs, groups, batch)

    def row_groups(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[RowGroup] | None:
        """The row groups `prefill` runs this batch in; None: one forward."""
        return plan_row_groups(attention_mask) if self._may_group(input_ids) else None

    def _may_group(self, input_ids: torch.Tensor) -> bool:
        # a sliding window's cache is not as wide as the prompt, so groups of other widths cannot be merged
        return input_ids.device.type == "cpu" and not has_sliding_window(getattr(self.model, "config", None))

    def prefill_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, full_width: bool) -> torch.Tensor:
        """`prefill` of a few rows of a batch without the padding columns they all share.

        The rows a call guards are often much shorter than its widest prompt (a short harmful request
        beside long benign ones); their expert prefill then skips those columns. Positions come from
        the mask, so they are unchanged. full_width: pad the cache back on the left (zeros under a 0
        mask) so the rows can join the batch's cache; where `prefill` runs in row groups they leave those
        columns out themselves and their cache is placed at full width, so no second copy pads it.
        """
        if full_width and self._may_group(input_ids):
            return self.prefill(input_ids, attention_mask)
        start = common_left_padding(attention_mask)
        last = self.prefill(input_ids[:, start:], attention_mask[:, start:])
        if start and full_width:
            self.cache = left_pad_cache(self.cache, start)
            self.attention_mask = attention_mask
        return last

    def append_rows(self, other: "_CachedModel") -> None:
        """Append the rows of another prefilled run of the same model (same prompt width) to this one."""
        self.cache = append_cache_rows(self.cache, other.cache)
        self.attention_mask = torch.cat([self.attention_mask, other.attention_mask])
        self.next_position = torch.cat([self.next_position, other.next_position])

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` of the cache, mask and positions."""
        self.cache = select_cache_rows(self.cache, rows)
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]

    def fork(self, rows: torch.Tensor) -> "_CachedModel":
        """The batch rows `rows` as a model of their own, on a copy of their cache, returning logits (no head
        split): a look-ahead from them leaves this one untouched."""
        other = _CachedModel(self.model, None, self._vocab)
        other.cache = copy_cache_rows(self.cache, rows)
        other.attention_mask, other.next_position = self.attention_mask[rows], self.next_position[rows]
        return other

    def greedy(self, first_logits: torch.Tensor, steps: int) -> torch.Tensor:
        """[R, steps] the greedy tokens from `first_logits` (the next-token logits these rows' cache ends at) on."""
        vocab = first_logits.shape[-1]  # past it: head padding the pair's other model lacks
        tokens = [first_logits.argmax(-1)]
        for _ in range(steps - 1):
            tokens.append(self.step(tokens[-1])[:, :vocab].argmax(-1))
        return torch.stack(tokens, 1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        ones = self.attention_mask.new_ones((self.attention_mask.shape[0], 1))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        positions = self.next_position
        self.next_position = positions + 1 if self._last_position is None else (positions + 1).clamp_max(
            self._last_position)
        # decode steps write into spare room instead of concatenating; converted here, not after the prefill,
        # so a prefill whose rows are then padded or appended into another cache is not copied for nothing
        self.cache = make_growable(self.cache)
        return self._forward(tokens[:, None], positions)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        module = self._forward_module
        extra = {} if module is not self.model else {"logits_to_keep": 1}
        out = module(
            input_ids=input_ids,
            attention_mask=self.attention_mask if attention_mask is None else attention_mask,
            position_ids=positions,
            **cache_kwargs(module, self.cache),
            use_cache=True,
            **extra,
        )
        self.cache = returned_cache(out)
        last = out.logits[..., : self._vocab] if module is self.model else out.last_hidden_state
        return last[:, -1, :]

    def close(self) -> None:
        self.cache = None


class ForwardPair(Protocol):
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, guard_rows: Sequence[int] | None,
                capture: Sequence[int] = ()) -> Prefill: ...

    def guard(self, rows: Sequence[int]) -> torch.Tensor | None: ...

    def keep(self, rows: Sequence[int]) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def close(self) -> None: ...


class _PairBase:
    """The bookkeeping every pair shares: the prompt (for a later `guard`) and the guarded rows."""

    def __init__(self) -> None:
        self._prompt: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rows: torch.Tensor | None = None  # guarded rows, set once by prefill(guard_rows=...) or guard()

    def _remember(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self._prompt = (input_ids, attention_mask)

    def _set_rows(self, rows: Sequence[int]) -> torch.Tensor:
        if self.rows is not None:
            raise RuntimeError("the guarded rows of a call are decided once")
        batch = self._prompt[0].shape[0]
        rows = sorted({int(r) for r in rows})
        if rows and not (0 <= rows[0] and rows[-1] < batch):
            raise ValueError(f"guarded rows {rows} are outside the batch of {batch}")
        self.rows = torch.tensor(rows, dtype=torch.long, device=self._prompt[0].device)
        return self.rows

    def keep(self, rows: Sequence[int]) -> torch.Tensor:
        """Narrow the guarded rows after `guard` to `rows`, dropping the other rows' expert copies
        (cache included) without a second prefill. Returns the kept rows' positions among the
        previous guarded rows, to index the expert outputs `guard` returned."""
        if self.rows is None:
            raise RuntimeError("keep() narrows the guarded rows that prefill() or guard() decided")
        previous = self.rows.tolist()
        wanted = {int(r) for r in rows}
        if not wanted <= set(previous):
            raise ValueError(f"rows {sorted(wanted - set(previous))} are not guarded: keep() only narrows")
        index = torch.tensor([j for j, row in enumerate(previous) if row in wanted], dtype=torch.long,
                             device=self.rows.device)
        if index.numel() < len(previous):
            self._drop_expert_rows(index)
            self.rows = self.rows[index]
        return index

    def _drop_expert_rows(self, index: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot drop guarded rows")


class BaseOnly(_PairBase):
    def __init__(self, model: nn.Module, head: HeadSplit | None = None) -> None:
        super().__init__()
        self._base = _CachedModel(model, head)

    def prefill(self, input_ids, attention_mask, *, guard_rows=None, capture=()) -> Prefill:
        self._remember(input_ids, attention_mask)
        with capture_hidden_states(self._base.model, capture) if capture else _nothing() as states:
            base = self._base.prefill(input_ids, attention_mask, states)
        if guard_rows is not None:
            self.guard(guard_rows)
        return Prefill(base, None, dict(states or {}))

    def guard(self, rows):
        if list(rows):
            raise ValueError("this call has no expert (mode 'off' or no expert given): no row can be guarded")
        self._set_rows([])
        return None

    def step(self, tokens):
        return self._base.step(tokens), None

    def close(self) -> None:
        self._base.close()


class ModelPair(_PairBase):
    """vocab: the ids both models score (`common_vocabulary_size`); on the hidden-state path the heads are
    cut to it already (`HeadSplit.first_rows`)."""

    def __init__(self, model: nn.Module, expert: nn.Module, base_head: HeadSplit | None = None,
                 expert_head: HeadSplit | None = None, vocab: int | None = None) -> None:
        super().__init__()
        self._base = _CachedModel(model, base_head, vocab)
        self._expert = _CachedModel(expert, expert_head, vocab)
        self._expert_device = next(expert.parameters()).device

    def prefill(self, input_ids, attention_mask, *, guard_rows=None, capture=()) -> Prefill:
        self._remember(input_ids, attention_mask)
        with capture_hidden_states(self._base.model, capture) if capture else _nothing() as states:
            base = self._base.prefill(input_ids, attention_mask, states)
        expert = self.guard(guard_rows) if guard_rows is not None else None
        return Prefill(base, expert, dict(states or {}))

    def guard(self, rows):
        rows = self._set_rows(rows)
        if rows.numel() == 0:
            return None
        input_ids, attention_mask = self._prompt
        ids, mask = input_ids[rows].to(self._expert_device), attention_mask[rows].to(self._expert_device)
        return self._expert.prefill_rows(ids, mask, full_width=False).to(input_ids.device)

    def _drop_expert_rows(self, index):
        self._expert.keep_rows(index.to(self._expert_device))

    @torch.no_grad()
    def expert_openings(self, index: torch.Tensor, first_logits: torch.Tensor, steps: int) -> torch.Tensor:
        """[len(index), steps] the expert's own greedy answer, alone, for the guarded rows at `index` (positions
        in `rows`) from their first-step logits; the pair's caches are left as they were."""
        index = index.to(self._expert_device)
        return self._expert.fork(index).greedy(first_logits.to(self._expert_device), steps).to(self.rows.device)

    def step(self, tokens):
        base = self._base.step(tokens)
        if self.rows.numel() == 0:
            return base, None
        return base, self._expert.step(tokens[self.rows].to(self._expert_device)).to(base.device)

    def close(self) -> None:
        self._base.close()
        self._expert.close()


class AdapterPair(_PairBase):
    """Base rows first, then the guarded rows' expert copies, in one forward and one KV cache."""

    def __init__(self, model: nn.Module, adapter: LoraAdapter, head: HeadSplit | None = None) -> None:
        super().__init__()
        self._hooks = LazyLoraHooks(adapter, model)
        self._adapter = adapter
        self._head = head
        self._both = _CachedModel(model, head)
        self._batch = 0

    def prefill(self, input_ids, attention_mask, *, guard_rows=None, capture=()) -> Prefill:
        self._remember(input_ids, attention_mask)
        self._batch = batch = input_ids.shape[0]
        if guard_rows is None:  # the guarded rows are decided after this prefill: base rows alone for now
            with capture_hidden_states(self._both.model, capture) if capture else _nothing() as states:
                base = self._both.prefill(input_ids, attention_mask, states)
            return Prefill(base, None, dict(states or {}))
        rows = self._set_rows(guard_rows)
        if rows.numel():
            self._hooks.hold()
        if rows.numel() and self._both.row_groups(input_ids, attention_mask) is not None:
            # one forward of base and expert rows would compute the batch's padding in both: the base rows in
            # row groups, then the expert copies in theirs
            with capture_hidden_states(self._both.model, capture) if capture else _nothing() as states:
                base = self._both.prefill(input_ids, attention_mask, states)
            return Prefill(base, self._prefill_expert_rows(rows), dict(states or {}))
        with capture_hidden_states(self._both.model, capture) if capture else _nothing() as states:
            with self._adapter.rows_from(batch):
                out = self._both.prefill(torch.cat([input_ids, input_ids[rows]]),
                                         torch.cat([attention_mask, attention_mask[rows]]), grouped=False)
        base_states = {i: h[:batch] for i, h in (states or {}).items()}
        return Prefill(out[:batch], out[batch:] if rows.numel() else None, base_states)

    def guard(self, rows):
        rows = self._set_rows(rows)
        if rows.numel() == 0:
            return None
        self._hooks.hold()
        return self._prefill_expert_rows(rows)

    def _prefill_expert_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The expert copies of `rows` prefilled on their own and appended to the base rows' cache."""
        input_ids, attention_mask = self._prompt
        expert = _CachedModel(self._both.model, self._head)
        ids, mask = input_ids[rows], attention_mask[rows]
        with self._adapter.rows_from(0):
            if has_sliding_layers(self._both.cache):  # a window's width is not the prompt's: no trimming
                out = expert.prefill(ids, mask)
            else:
                out = expert.prefill_rows(ids, mask, full_width=True)
        self._both.append_rows(expert)
        return out

    @torch.no_grad()
    def expert_openings(self, index: torch.Tensor, first_logits: torch.Tensor, steps: int) -> torch.Tensor:
        """[len(index), steps] the expert's own greedy answer, alone, for the guarded rows at `index` (positions
        in `rows`) from their first-step logits; the shared cache is left as it was."""
        runner = self._both.fork(self._batch + index)
        with self._adapter.rows_from(0):
            return runner.greedy(first_logits, steps)

    def _drop_expert_rows(self, index):
        batch = torch.arange(self._batch, device=index.device)
        self._both.keep_rows(torch.cat([batch, self._batch + index]))
        if index.numel() == 0:  # no expert row left: the layers run without the hooks
            self._hooks.release()

    def step(self, tokens):
        batch = self._batch
        if self.rows.numel() == 0:
            return self._both.step(tokens), None
        with self._adapter.rows_from(batch):
            out = self._both.step(torch.cat([tokens, tokens[self.rows]]))
        return out[:batch], out[batch:]

    def close(self) -> None:
        self._both.close()
        self._hooks.release()


@contextmanager
def _nothing() -> Iterator[None]:
    yield None
