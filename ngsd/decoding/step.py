"""One guarded step of the loop: from what the forward pair returned to `ngsd_kernels`' selection op.

The pair returns the base rows' outputs [B, ...] and the guarded rows' expert outputs [R, ...],
as logits or as final hidden states (`heads.split_head`). When every row is guarded and the pair
returns hidden states, the step is `GuardedSelector.run_from_hidden`, i.e.
`ngsd_kernels.guarded_select_from_hidden` planned once (the LM head inside the op: on CUDA the
fused kernels never write the logits). Otherwise the logits of both models
go to a `GuardedSelector` planned once per call; an unguarded row's expert distribution is its
base distribution, so its divergence is 0 and its gate never opens (alpha is 0 there as well).
Greedy decoding with unguarded rows runs the op on the guarded rows only and takes the base
argmax for the rest (what the op would pick for them, without its softmaxes). Hugging Face logits
processors need logits, so a call with processors runs on logits: all of them on the base, the
request's rules but not its penalties on the expert; a guarded row whose rules take the guard's
answer away is named in `removed_guard` (`request_rules`).
With ``cuda_graph``, a step with every row guarded runs as a CUDA graph of the planned op
(``ngsd_kernels.StepGraph``: captured at its first step, then one replay a token).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ngsd_kernels import GuardedSelector, StepGraph, StepParams
from ngsd_kernels.reference import lif_step
from ngsd_kernels.ops.hidden_torch import hidden_logits, pair_logits

from ..caller_warning import warn_at_caller
from .heads import HeadSplit
from .request_rules import rules_of, rules_remove_guard

Outputs = tuple[Tensor, Tensor, Tensor, Tensor]


class GuardedStep:
    """The selection of one call: the step parameters (one setting, or SafeDecoding's two) planned once.

    params_for(step) gives the `StepParams` of a decode step; `base_head` / `expert_head` are the
    heads when the pair returns hidden states (None: it returns logits; an `AdapterPair` shares the
    base head, so `expert_head` is `base_head` there).
    """

    def __init__(self, params_for: Callable[[int], StepParams], switch_step: int, backend: str,
                 base_head: HeadSplit | None, expert_head: HeadSplit | None, shared_head: bool,
                 logits_processor: Any = None, cuda_graph: bool = False) -> None:
        self._params_for = params_for
        self._switch_step = switch_step
        self._backend = backend
        self._base_head = base_head
        self._expert_head = expert_head
        self._shared_head = shared_head
        self._processors = logits_processor
        self._rules = rules_of(logits_processor)  # the processors that bind the expert too (not the penalties)
        self._selectors: dict[tuple[bool, torch.dtype], GuardedSelector] = {}
        self._cuda_graph = cuda_graph
        self._graphs: dict[int, StepGraph] = {}  # id of the selector -> its captured step
        self._warned_eager: set[int] = set()  # selectors whose step cannot be captured (warned once)
        self.rows: Tensor | None = None  # guarded rows
        self._batch = 0
        self._all_rows = False
        # after `run`: [B] bool, the guarded rows whose request's rules (logits processors other than penalties)
        # removed the guard's answer this step (None: no rules ran on guarded rows)
        self.removed_guard: Tensor | None = None

    @property
    def on_hidden_states(self) -> bool:
        return self._base_head is not None

    def set_rows(self, rows: Tensor, batch: int) -> None:
        self.rows = rows
        self._batch = batch
        self._all_rows = rows.numel() == batch

    def guarded_row_logits(self, base: Tensor, expert: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """[B, V] base logits and [R, V] logits of the guarded rows' expert (None without expert rows),
        through the LM heads when the pair returned final hidden states."""
        if self._base_head is None:
            return base, expert
        if expert is None:
            return self._unguarded_logits(base), None
        weight_e, bias_e = self._expert_weight_and_bias()
        head = self._base_head
        if self._all_rows or head.weight.dtype == torch.float32:
            return pair_logits(base, expert, head.weight, weight_e, head.bias, bias_e)
        # a half-precision head: every row as the model computes it, the guarded rows again in fp32 for the step
        base_logits = self._unguarded_logits(base)
        guarded_base, expert_logits = pair_logits(base[self.rows], expert, head.weight, weight_e, head.bias, bias_e)
        base_logits[self.rows] = guarded_base
        return base_logits, expert_logits

    def _unguarded_logits(self, hidden: Tensor) -> Tensor:
        """fp32 logits of rows that decode unguarded (routed, or mode "off"), computed as the model computes
        them, in its head's dtype and then upcast (as `generate` reads them): the step's fp32 matmul of a bf16
        head broke near-ties otherwise, and a routed row's answer differed from plain `generate`'s."""
        head = self._base_head
        if head.weight.dtype == torch.float32:
            return hidden_logits(hidden, head.weight, head.bias)
        return F.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()

    def logits(self, base: Tensor, expert: Tensor | None) -> tuple[Tensor, Tensor]:
        """[B, V] base and expert logits; an unguarded row's expert logits are its base logits."""
        base, expert = self.guarded_row_logits(base, expert)
        if expert is None:
            return base, base
        if self._all_rows:
            return base, expert
        full = base.clone()
        full[self.rows] = expert.to(full.dtype)
        return base, full

    def run(self, step: int, base: Tensor, expert: Tensor | None, potential: Tensor, alpha: Tensor, seed: Tensor,
            offset: Tensor, sequences: Tensor) -> Outputs:
        params = self._params_for(step)
        self.removed_guard = None
        if self._base_head is not None and self._all_rows and expert is not None and self._processors is None:
            weight_e, bias_e = self._expert_weight_and_bias()
            selector = self._selector(step, params, base.shape[0], self._base_head.weight.shape[0], base.dtype,
                                      base.device)
            if self._cuda_graph and not self._reads_host(selector):
                inputs = (base, expert, potential, alpha, seed, offset)
                return self._replay(selector, inputs, lambda: StepGraph.from_hidden(
                    selector, base, expert, self._base_head.weight, weight_e, potential, alpha, seed, offset,
                    self._base_head.bias, bias_e))
            return selector.run_from_hidden(base, expert, self._base_head.weight, weight_e, potential, alpha, seed,
                                            offset, self._base_head.bias, bias_e)
        if params.temperature == 0.0 and not self._all_rows:
            return self._run_greedy_partly_guarded(step, params, base, expert, potential, alpha, seed, offset, sequences)
        base_logits, expert_logits = self.logits(base, expert)
        if self._processors is not None:
            if expert_logits is base_logits:  # no guarded row: the expert's distribution is the base's
                base_logits = expert_logits = self._processors(sequences, base_logits)
            else:
                base_logits, ruled_expert = self._processed(sequences, alpha, base_logits, expert_logits)
                if self._all_rows:
                    expert_logits = ruled_expert
                else:  # an unguarded row's expert distribution is its (processed) base distribution
                    expert_logits = base_logits.clone()
                    expert_logits[self.rows] = ruled_expert[self.rows]
        selector = self._selector(step, params, *base_logits.shape, base_logits.dtype, base_logits.device)
        if self._cuda_graph:
            inputs = (base_logits, expert_logits, potential, alpha, seed, offset)
            return self._replay(selector, inputs, lambda: StepGraph.from_logits(selector, *inputs))
        return selector.run(base_logits, expert_logits, potential, alpha, seed, offset)

    def _processed(self, sequences: Tensor, alpha: Tensor, base: Tensor, expert: Tensor) -> tuple[Tensor, Tensor]:
        """[B, V] base and expert logits (each row at its own batch index: processors may read it, as
        prefix_allowed_tokens_fn does) through the call's processors: all of them on the base, its rules (not its
        penalties: `request_rules`) on the expert, so a penalty cannot talk the guard out of its answer. Sets
        `removed_guard`: the guarded rows (at alpha > 0: a row at alpha 0 mixes nothing of the expert) whose rules
        took the guard's answer away this step, which the loop ends."""
        rules, rows = self._rules, self.rows
        if rules is None:  # penalties at most: they shape the base's answer, the expert keeps its own
            return self._processors(sequences, base), expert
        base_raw, expert_raw = base.clone(), expert[rows]  # copies: processors may write their input
        base = self._processors(sequences, base)
        ruled_base = base if rules is self._processors else rules(sequences, base_raw.clone())
        expert = rules(sequences, expert)
        removed = rules_remove_guard(base_raw[rows], ruled_base[rows], expert_raw, expert[rows])
        self.removed_guard = torch.zeros(self._batch, dtype=torch.bool, device=base.device)
        self.removed_guard[rows] = removed.to(base.device) & (alpha[rows] > 0).to(base.device)
        return base, expert

    def _reads_host(self, selector: GuardedSelector) -> bool:
        """The hidden-state intersection step (SafeDecoding) reads undecided rows back to the host: it stays
        eager under ``cuda_graph``, with a warning once a call. Asked once a selector (the property plans
        again): a captured selector is known to be fine, a warned one not."""
        if id(selector) in self._graphs:
            return False
        if id(selector) in self._warned_eager:
            return True
        if not selector.hidden_step_reads_host:
            return False
        self._warned_eager.add(id(selector))
        warn_at_caller("cuda_graph: the hidden-state step of the intersection mode reads undecided rows back to "
                      "the host, which a CUDA graph cannot hold; this setting's steps run without the graph",
                      RuntimeWarning)
        return True

    def _replay(self, selector: GuardedSelector, inputs: tuple[Tensor, ...], capture: Callable[[], StepGraph]
                ) -> Outputs:
        """The selector's step as a CUDA graph (captured at its first use); the outputs are copied out of the
        graph's buffers, which the next replay overwrites (the loop keeps each step's divergence and spikes)."""
        graph = self._graphs.get(id(selector))
        if graph is None:
            graph = self._graphs[id(selector)] = capture()
        return tuple(t.clone() for t in graph.run(*inputs))

    def _run_greedy_partly_guarded(self, step: int, params: StepParams, base: Tensor, expert: Tensor | None,
                                   potential: Tensor, alpha: Tensor, seed: Tensor, offset: Tensor,
                                   sequences: Tensor) -> Outputs:
        """Greedy with some rows unguarded (routed, or no expert at all): the op runs on the guarded rows only.

        An unguarded row's gate stays closed and its expert distribution is its base distribution,
        so the op would only return its base argmax; taking that argmax of the logits directly
        (the lowest id on ties, like `generate`) saves the op's softmaxes and top-k on rows that
        cannot mix, which is most of a step's selection cost on a benign batch.
        """
        rows = self.rows
        base, expert = self.guarded_row_logits(base, expert)
        if self._processors is not None:
            if expert is None:
                base = self._processors(sequences, base)
            else:
                batch_expert = base.clone()
                batch_expert[rows] = expert.to(base.dtype)
                base, batch_expert = self._processed(sequences, alpha, base, batch_expert)
                expert = batch_expert[rows]
        best = base.max(dim=-1)  # NaN and +inf propagate into the max, as does a row of only -inf
        tokens = torch.where(torch.isfinite(best.values), best.indices, torch.full_like(best.indices, -1))
        new_potential, _ = lif_step(potential.float(), torch.zeros_like(potential, dtype=torch.float32),
                                    params.tau, params.v_th, params.v_reset, params.rho)
        spike = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
        divergence = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        if expert is not None and rows.numel():
            selector = self._selector(step, params, rows.numel(), base.shape[-1], base.dtype, base.device)
            picked = selector.run(base[rows], expert.to(base.dtype), potential[rows], alpha[rows], seed, offset)
            for whole, part in zip((tokens, new_potential, spike, divergence), picked):
                whole[rows] = part.to(whole.dtype)
        return tokens, new_potential, spike, divergence

    def _expert_weight_and_bias(self) -> tuple[Tensor | None, Tensor | None]:
        """The expert head as the op takes it: (None, base bias) for a shared head, read once for both."""
        if self._shared_head:
            return None, self._base_head.bias
        return self._expert_head.weight, self._expert_head.bias

    def _selector(self, step: int, params: StepParams, batch: int, vocab: int, dtype: torch.dtype,
                  device: torch.device) -> GuardedSelector:
        """Planned at first use, once per setting (SafeDecoding has two), input kind and row count (all rows, or
        only the guarded ones); a call's shapes never change."""
        key = (step >= self._switch_step, dtype, batch)
        selector = self._selectors.get(key)
        if selector is None:
            selector = GuardedSelector(params, self._backend).plan(batch, vocab, dtype, device)
            self._selectors[key] = selector
        return selector

