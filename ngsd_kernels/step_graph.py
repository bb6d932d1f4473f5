"""`StepGraph`: a planned guarded step captured in a CUDA graph, replayed every token.

A planned `GuardedSelector` still pays, per token, its Python-side checks and one Triton launch per
kernel (tens of microseconds of host time each). Captured once, the step is one graph replay plus
copies of its small inputs (final hidden states or logits, potential, alpha, seed, offset) into the
graph's own buffers:

    selector = GuardedSelector(params).plan(batch, vocab, torch.bfloat16, "cuda")
    step = StepGraph.from_hidden(selector, base_hidden, expert_hidden, lm_head.weight, None,
                                 potential, alpha, seed, offset)
    tokens, new_potential, spike, divergence = step.run(base_hidden, expert_hidden, potential, alpha,
                                                        seed, offset)

What it needs: a CUDA device and the Triton path (the selector's plan), and a step without a host
read: every mode on the logits path; on the fused hidden-state path every mode except the
intersection mode, whose undecided rows are recomputed on the host (`launcher.select_exact`).
Capture runs the step twice on a side stream first (Triton compiles every variant then; capture
cannot compile). The returned tensors are the graph's own: the next `run` overwrites them.

Run on a GPU once (an H200, 2026-12-04): the hidden-state replays and the loop with ``cuda_graph`` matched
the eager step; the logits replays failed through a bug fixed since (the graph did not keep its selector
alive) and were not run again (``bench/ROOFLINE.md``, "First GPU run").
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .select import Outputs
from .selector import GuardedSelector


class StepGraph:
    """One selector's step (``GuardedSelector.run`` or ``run_from_hidden``) captured in a CUDA graph."""

    def __init__(self, step: Callable[..., Outputs], example_inputs: tuple[Tensor, ...]) -> None:
        if not all(isinstance(t, Tensor) and t.is_cuda for t in example_inputs):
            raise ValueError("StepGraph needs CUDA tensors: a CUDA graph replays GPU work only; on other devices "
                             "call GuardedSelector.run / run_from_hidden directly")
        # the step (and through it the selector, its scratch and the LM heads) lives as long as the graph: the
        # graph writes to their memory at every replay, and freed, that memory went to the caller's next tensors
        # (the first GPU run: a replay overwrote the potential the next eager step read)
        self._step = step
        self._inputs = tuple(t.clone() for t in example_inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # Triton compiles at a variant's first launch, which a capture cannot hold
                self._step(*self._inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._outputs = self._step(*self._inputs)

    @classmethod
    def from_logits(cls, selector: GuardedSelector, base_logits: Tensor, expert_logits: Tensor, potential: Tensor,
                    alpha: Tensor, seed: Tensor, offset: Tensor) -> "StepGraph":
        """``selector.run`` captured; the example inputs fix the shapes, dtypes and device of every replay."""
        _require_graph_path(selector, hidden=False)
        return cls(selector.run, (base_logits, expert_logits, potential, alpha, seed, offset))

    @classmethod
    def from_hidden(cls, selector: GuardedSelector, base_hidden: Tensor, expert_hidden: Tensor,
                    base_head_weight: Tensor, expert_head_weight: Tensor | None, potential: Tensor, alpha: Tensor,
                    seed: Tensor, offset: Tensor, base_head_bias: Tensor | None = None,
                    expert_head_bias: Tensor | None = None) -> "StepGraph":
        """``selector.run_from_hidden`` captured with these LM heads (read in place at every replay: their
        storage must stay where it is, as a model's parameters do)."""
        _require_graph_path(selector, hidden=True)

        def step(hb: Tensor, he: Tensor, v: Tensor, a: Tensor, s: Tensor, o: Tensor) -> Outputs:
            return selector.run_from_hidden(hb, he, base_head_weight, expert_head_weight, v, a, s, o,
                                            base_head_bias, expert_head_bias)

        return cls(step, (base_hidden, expert_hidden, potential, alpha, seed, offset))

    def run(self, *inputs: Tensor) -> Outputs:
        """Copy ``inputs`` (as the example inputs: same shapes and dtypes) into the graph's buffers and replay.
        Returns the graph's output tensors, valid until the next ``run``."""
        if len(inputs) != len(self._inputs):
            raise ValueError(f"StepGraph.run takes {len(self._inputs)} tensors, as captured; got {len(inputs)}")
        for mine, given in zip(self._inputs, inputs):
            if given.shape != mine.shape or given.dtype != mine.dtype:
                raise ValueError(f"StepGraph was captured for {mine.dtype} {tuple(mine.shape)}, got {given.dtype} "
                                 f"{tuple(given.shape)}; capture a new graph for new shapes")
            mine.copy_(given)
        self._graph.replay()
        return self._outputs


def _require_graph_path(selector: GuardedSelector, *, hidden: bool) -> None:
    if not selector.planned_for_triton:
        raise ValueError("StepGraph needs a selector planned for the Triton path on a CUDA device "
                         "(GuardedSelector(params).plan(..., device='cuda'))")
    if hidden and selector.hidden_step_reads_host:
        raise ValueError("the hidden-state step of the intersection mode recomputes undecided rows after a host "
                         "read, which a CUDA graph cannot hold; capture the logits step (StepGraph.from_logits) "
                         "for it, which decides them on the GPU")
