"""The `ngsd::` custom ops: registration, dispatch, opcheck and torch.compile on CPU.

The Triton op runs interpreted (TRITON_INTERPRET=1 is set here before triton is imported).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ngsd_kernels import CandidateMode, GateMode, StepParams, guarded_select, guarded_select_reference  # noqa: E402
from tests.kernels.steps import needs_triton, triton_available  # noqa: E402

pytestmark = [
    # numpy warnings of Triton's CPU interpreter on the -inf/NaN rows these tests feed on purpose
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    # raised inside torch's own opcheck/compile machinery, not by this project's calls
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

PARAMS = StepParams(candidate_k=4, min_candidates=3)


def op_args(*tensors, params: StepParams = PARAMS) -> tuple:
    return (*tensors, *params.flat())


def inputs(batch: int = 3, vocab: int = 40, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(batch, vocab, generator=gen) * 2).to(dtype)
    expert = (torch.randn(batch, vocab, generator=gen) * 2).to(dtype)
    potential = torch.rand(batch, generator=gen) * 2
    alpha = torch.full((batch,), 0.9)
    seeds = torch.arange(batch, dtype=torch.int64)
    offset = torch.tensor([17], dtype=torch.int64)
    return base, expert, potential, alpha, seeds, offset


def test_ops_are_registered_and_functional():
    for name in ("guarded_select", "guarded_select_triton", "guarded_select_from_hidden",
                 "guarded_select_from_hidden_triton"):
        schema = getattr(torch.ops.ngsd, name).default._schema
        assert not any(arg.alias_info and arg.alias_info.is_write for arg in schema.arguments), schema
        assert len(schema.returns) == 4


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(gate=GateMode.OPEN, candidate_mode=CandidateMode.INTERSECTION, temperature=0.8, top_p=0.9),
    ],
    ids=["greedy-union", "sampled-intersection"],
)
def test_auto_op_passes_opcheck(overrides):
    args = op_args(*inputs(), params=PARAMS.with_(**overrides))
    torch.library.opcheck(torch.ops.ngsd.guarded_select.default, args)


@needs_triton
@pytest.mark.parametrize(
    "overrides",
    [dict(gate=GateMode.OPEN), dict(temperature=0.7, top_k=5, divergence=2)],
    ids=["greedy-open", "sampled-topk-js"],
)
def test_triton_op_passes_opcheck(overrides):
    args = op_args(*inputs(dtype=torch.bfloat16), params=PARAMS.with_(**overrides))
    torch.library.opcheck(torch.ops.ngsd.guarded_select_triton.default, args)


def hidden_inputs(batch: int = 3, hidden: int = 16, vocab: int = 40, dtype=torch.float32, bias: bool = False):
    gen = torch.Generator().manual_seed(batch)
    weight = (torch.randn(vocab, hidden, generator=gen) * 0.3).to(dtype)
    base = torch.randn(batch, hidden, generator=gen).to(dtype)
    expert = (base.float() + 0.7 * torch.randn(batch, hidden, generator=gen)).to(dtype)
    head_bias = torch.randn(vocab, generator=gen) if bias else None
    *_, potential, alpha, seeds, offset = inputs(batch, vocab)
    return base, expert, weight, None, head_bias, head_bias, potential, alpha, seeds, offset


@pytest.mark.parametrize(
    "overrides, bias",
    [(dict(), False), (dict(gate=GateMode.OPEN, temperature=0.8, top_p=0.9), True)],
    ids=["greedy-shared-head", "sampled-biased-head"],
)
def test_hidden_op_passes_opcheck(overrides, bias):
    args = op_args(*hidden_inputs(bias=bias), params=PARAMS.with_(**overrides))
    torch.library.opcheck(torch.ops.ngsd.guarded_select_from_hidden.default, args)


@needs_triton
def test_hidden_triton_op_passes_opcheck():
    args = op_args(*hidden_inputs(dtype=torch.bfloat16), params=PARAMS.with_(gate=GateMode.OPEN))
    torch.library.opcheck(torch.ops.ngsd.guarded_select_from_hidden_triton.default, args)


@needs_triton
def test_hidden_ops_agree_and_compile_fullgraph():
    args = hidden_inputs(batch=2, vocab=33)
    torch._dynamo.reset()
    params = PARAMS.with_(gate=GateMode.OPEN, temperature=0.7)

    def step(*tensors):
        auto = torch.ops.ngsd.guarded_select_from_hidden(*tensors, *params.flat())
        kernels = torch.ops.ngsd.guarded_select_from_hidden_triton(*tensors, *params.flat())
        return auto, kernels

    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True)(*args)
    for got in (*compiled, eager[1]):
        assert torch.equal(got[0], eager[0][0]) and torch.equal(got[2], eager[0][2])
        torch.testing.assert_close(got[3], eager[0][3], rtol=1e-5, atol=1e-6)


@needs_triton
def test_dispatch_rules_on_cpu():
    base, expert, potential, alpha, seeds, offset = inputs(seed=1)
    params = PARAMS.with_(gate=GateMode.OPEN)
    want = guarded_select_reference(base, expert, potential, alpha, seeds, offset, params)
    for backend in ("auto", "torch", "triton"):
        got = guarded_select(base, expert, potential, alpha, seeds, offset, params, backend=backend)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]), backend
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backend must be one of"):
        guarded_select(base, expert, potential, alpha, backend="cuda")


@pytest.mark.parametrize("op", ["guarded_select", "guarded_select_triton"])
def test_a_direct_call_of_either_logits_op_checks_its_inputs(op):
    """The CPU op once broadcast a one-element alpha over the batch and failed on a wider expert with an
    aliasing error; it now checks its inputs as the Triton twin does."""
    base, expert, potential, alpha, seeds, offset = inputs(seed=1)
    call = getattr(torch.ops.ngsd, op)
    with pytest.raises(ValueError, match="potential and alpha must have shape"):
        call(base, expert, potential, alpha[:1], seeds, offset, *PARAMS.flat())
    wider = torch.cat([expert, expert[:, :2]], dim=1)
    with pytest.raises(ValueError, match="must share the base model's vocabulary"):
        call(base, wider, potential, alpha, seeds, offset, *PARAMS.flat())


def test_auto_on_cpu_is_the_reference_bit_for_bit():
    base, expert, potential, alpha, seeds, offset = inputs(seed=2)
    params = PARAMS.with_(temperature=0.9, top_k=7)
    want = guarded_select_reference(base, expert, potential, alpha, seeds, offset, params)
    got = torch.ops.ngsd.guarded_select(*op_args(base, expert, potential, alpha, seeds, offset, params=params))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


@needs_triton
def test_torch_compile_fullgraph_runs_both_ops_on_cpu():
    base, expert, potential, alpha, seeds, offset = inputs(batch=2, vocab=33, seed=3)
    torch._dynamo.reset()
    greedy = StepParams(v_th=0.5, candidate_k=4)
    sampled = greedy.with_(temperature=0.8)

    def step(base, expert, potential, alpha, seeds, offset):
        # a two-step decode: the potential carries from the first call into the second
        t1, v1, s1, d1 = guarded_select(base, expert, potential, alpha, seeds, offset, greedy)
        t2, v2, s2, d2 = guarded_select(base, expert, v1, alpha, seeds, offset + 1, sampled, backend="triton")
        return torch.stack([t1, t2]), v2, s1 | s2, d1 + d2

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(base, expert, potential, alpha, seeds, offset)
    want = step(base, expert, potential, alpha, seeds, offset)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[3], want[3])


def test_triton_op_without_interpreter_or_cuda_says_how_to_fix(monkeypatch):
    pytest.importorskip("triton")
    from ngsd_kernels.ops import launcher

    monkeypatch.setattr(launcher, "INTERPRETED", False)
    base, expert, potential, alpha, seeds, offset = inputs()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        guarded_select(base, expert, potential, alpha, seeds, offset, backend="triton")
