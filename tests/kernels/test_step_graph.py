"""`ngsd_kernels.StepGraph`: the planned step captured in a CUDA graph.

Here (no GPU) the refusals are tested; the replays against the eager selector run where CUDA is
(``bench/gpu_check.sh`` runs tests/kernels compiled on the GPU). The interpreter cannot capture.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from ngsd_kernels import CandidateMode, GateMode, GuardedSelector, StepGraph, StepParams  # noqa: E402
from tests.kernels.steps import assert_same_step  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="a CUDA graph needs a CUDA device and compiled kernels (bench/gpu_check.sh)")


def _inputs(batch: int, vocab: int, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(batch, vocab, generator=gen, device=device) * 2.0
    expert = base + torch.randn(batch, vocab, generator=gen, device=device)
    potential = torch.rand(batch, generator=gen, device=device) * 1.6
    alpha = torch.full((batch,), 0.9, device=device)
    seed_t = torch.tensor([7], device=device)
    offset = torch.tensor([seed], device=device)
    return base, expert, potential, alpha, seed_t, offset


def test_refuses_selectors_off_the_triton_path_and_cpu_tensors():
    inputs = _inputs(2, 300, "cpu")
    cpu_step = GuardedSelector(StepParams()).plan(2, 300, torch.float32, "cpu")  # the CPU step: nothing to capture
    assert not cpu_step.planned_for_triton
    with pytest.raises(ValueError, match="planned for the Triton path on a CUDA device"):
        StepGraph.from_logits(cpu_step, *inputs)
    if os.environ.get("TRITON_INTERPRET") != "1":  # compiled Triton refuses a CPU plan itself
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            GuardedSelector(StepParams(), backend="triton").plan(2, 300, torch.float32, "cpu")
        return
    interpreted = GuardedSelector(StepParams(), backend="triton").plan(2, 300, torch.float32, "cpu")
    assert interpreted.planned_for_triton
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        StepGraph.from_logits(interpreted, *inputs)


def test_the_hidden_state_intersection_step_is_refused_for_its_host_read():
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    params = StepParams(candidate_mode=CandidateMode.INTERSECTION, gate=GateMode.OPEN, candidate_k=4)
    selector = GuardedSelector(params, backend="triton").plan(2, 300, torch.float32, device)
    assert selector.hidden_step_reads_host  # select_exact's read of the rows the buffers left undecided
    assert not GuardedSelector(StepParams(), backend="triton").plan(2, 300, torch.float32, device).hidden_step_reads_host
    hidden, head = torch.randn(2, 16, device=device), torch.randn(300, 16, device=device)
    with pytest.raises(ValueError, match="intersection mode .* host read"):
        StepGraph.from_hidden(selector, hidden, hidden, head, None, *_inputs(2, 300, device)[2:])


@needs_cuda
@pytest.mark.parametrize("fields", [dict(), dict(temperature=0.8, top_k=20, top_p=0.9),
                                    dict(candidate_mode=CandidateMode.INTERSECTION, candidate_k=8, min_candidates=8)])
def test_replays_equal_the_planned_step(fields):
    batch, vocab = 4, 50000
    params = StepParams(**fields)
    eager = GuardedSelector(params).plan(batch, vocab, torch.float32, "cuda")
    graph = StepGraph.from_logits(GuardedSelector(params).plan(batch, vocab, torch.float32, "cuda"),
                                  *_inputs(batch, vocab, "cuda"))
    for step in range(3):  # new inputs every step: the replay reads them through its copies
        inputs = _inputs(batch, vocab, "cuda", seed=step + 1)
        assert_same_step(tuple(t.clone() for t in graph.run(*inputs)), eager.run(*inputs))


@needs_cuda
def test_hidden_state_replays_equal_the_planned_step():
    batch, vocab, hidden = 2, 4096, 64
    gen = torch.Generator(device="cuda").manual_seed(3)
    head = torch.randn(vocab, hidden, generator=gen, device="cuda") * 0.3
    eager = GuardedSelector(StepParams()).plan(batch, vocab, torch.float32, "cuda")
    states = lambda: torch.randn(batch, hidden, generator=gen, device="cuda")  # noqa: E731
    rest = _inputs(batch, 8, "cuda")[2:]
    graph = StepGraph.from_hidden(GuardedSelector(StepParams()).plan(batch, vocab, torch.float32, "cuda"),
                                  states(), states(), head, None, *rest)
    for _ in range(3):
        hb, he = states(), states()
        assert_same_step(tuple(t.clone() for t in graph.run(hb, he, *rest)),
                         eager.run_from_hidden(hb, he, head, None, *rest))


@needs_cuda
def test_the_loop_with_a_graphed_step_decodes_as_without(tmp_path):
    """guarded_generate(cuda_graph=True): the same tokens, spikes and potentials as the eager step, on a
    tiny random Llama with a LoRA expert (greedy, every row guarded: the hidden-state step)."""
    from ngsd import guarded_generate
    from tests.conftest import tiny_lora_expert, tiny_model

    model = tiny_model("llama").cuda()
    expert = tiny_lora_expert(model, tmp_path / "lora")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], device="cuda")
    eager = guarded_generate(model, ids, expert=expert, alpha=0.9, max_new_tokens=8)
    graphed = guarded_generate(model, ids, expert=expert, alpha=0.9, max_new_tokens=8, cuda_graph=True)
    assert torch.equal(eager.sequences, graphed.sequences)
    for a, b in zip(eager.traces, graphed.traces):
        assert a.spikes == b.spikes and a.potential == pytest.approx(b.potential, rel=1e-5, abs=1e-6)
