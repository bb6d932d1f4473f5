"""Inputs at the edges of the step op's contract (a helper's hunt of the backend, stop 49): empty batches and
vocabularies on the default CPU path, exact ties past the fast path's lists, an infinite potential at tau = 1,
score floors that broke the renormalisation, strided biases and unchecked inputs of the hidden-state kernels.

The Triton kernels run interpreted (TRITON_INTERPRET=1 is set here before triton is imported).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ngsd_kernels import (  # noqa: E402
    Divergence, GateMode, GuardedSelector, StepParams, guarded_select, guarded_select_from_hidden,
    guarded_select_reference,
)
from tests.kernels.steps import needs_triton  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on -inf rows


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_no_rows_and_no_tokens_on_the_cpu_backends(backend):
    """B = 0 failed on the default greedy CPU path (tokens left None), V = 0 in max() / topk, as the Triton
    backend did not: a serving loop whose every request finished steps an empty batch."""
    out = guarded_select(torch.zeros(0, 5), torch.zeros(0, 5), torch.zeros(0), torch.zeros(0), backend=backend)
    assert [t.shape[0] for t in out] == [0, 0, 0, 0]
    hidden = torch.zeros(0, 4)
    out = guarded_select_from_hidden(hidden, hidden, torch.randn(5, 4), None, torch.zeros(0), torch.zeros(0),
                                     backend=backend)
    assert [t.shape[0] for t in out] == [0, 0, 0, 0]
    tokens, potential, spike, divergence = guarded_select(torch.zeros(2, 0), torch.zeros(2, 0), torch.ones(2),
                                                          torch.zeros(2), backend=backend)
    assert tokens.tolist() == [-1, -1] and potential.tolist() == [1.0, 1.0]
    assert not spike.any() and divergence.isnan().all()


def test_a_candidate_tied_with_unlisted_base_tokens_takes_the_lowest_id_as_the_reference():
    """The fast path sent only a non-candidate winner tied with the last listed base token to the reference; a
    candidate whose mixed score hits the same p_b beat a lower-id tied token it never listed."""
    vocab, token = 8192, 20
    base = torch.full((1, vocab), -10.0)
    base[0, 10] = 2.0  # the base's top-1, a candidate (k = 1)
    base[0, [0] + list(range(5000, vocab))] = 1.5  # tied tokens, id 0 the lowest: the two-level top-k skips it
    base[0, token] = -float("inf")  # no base mass: its mixed score at alpha 1 is exactly its p_e
    target = torch.log_softmax(base, -1).exp()[0, 0]
    expert = torch.zeros(1, vocab)
    expert[0, 10] = -5.0

    def p_e() -> torch.Tensor:
        return torch.log_softmax(expert, -1).exp()[0, token]

    low, high = -20.0, 20.0  # the expert logit whose p_e equals the tied tokens' p_b bit for bit
    for _ in range(200):
        expert[0, token] = (low + high) / 2
        low, high = ((low + high) / 2, high) if p_e() < target else (low, (low + high) / 2)
    for start in (low, high):
        value = torch.tensor(start, dtype=torch.float32)
        for _ in range(64):
            expert[0, token] = value
            if p_e() == target:
                break
            value = torch.nextafter(value, torch.tensor(float("inf")))
        if p_e() == target:
            break
    if p_e() != target:
        pytest.skip("no float32 logit gives an exact tie on this machine")
    params = StepParams(candidate_k=1, gate=GateMode.OPEN)
    args = (base, expert, torch.zeros(1), torch.ones(1))
    zero = torch.zeros(1, dtype=torch.int64)
    assert guarded_select_reference(*args, zero, zero, params)[0].tolist() == [0]
    assert guarded_select(*args, params=params, backend="auto")[0].tolist() == [0]


@pytest.mark.parametrize("backend", ["auto", "torch", pytest.param("triton", marks=needs_triton)])
def test_at_tau_1_an_infinite_potential_is_forgotten_not_nan(backend):
    """tau = 1 with KL: a spike on an infinite divergence (the expert rules a token out) leaves the potential at
    inf with rho > 0; the next leak computed 0 * inf = NaN and the neuron never fired again."""
    params = StepParams(tau=1.0, divergence=Divergence.KL, candidate_k=2)
    base = torch.zeros(1, 8)
    ruling_out = torch.zeros(1, 8)
    ruling_out[0, 3] = -float("inf")
    far = torch.full((1, 8), -20.0)
    far[0, 5] = 20.0
    potential, alpha = torch.zeros(1), torch.full((1,), 0.5)
    _, potential, spike, divergence = guarded_select(base, ruling_out, potential, alpha, params=params, backend=backend)
    assert spike.item() and divergence.item() == float("inf") and potential.item() == float("inf")
    for _ in range(2):
        _, potential, spike, _ = guarded_select(base, far, potential, alpha, params=params, backend=backend)
        assert spike.item() and torch.isfinite(potential).all()


@pytest.mark.parametrize("floor", [0.0, 2.0, 3e38, 1e39])
def test_score_floors_outside_a_probability_are_refused(floor):
    """0 renormalised 0 / 0 (a NaN row, token 0 outside the candidates) on the torch backends; values past fp32
    overflowed (Triton returned token 2147483647)."""
    with pytest.raises(ValueError, match="score_floor"):
        StepParams(score_floor=floor)
    with pytest.raises(ValueError, match="fit fp32"):
        StepParams(v_th=1e39)


def test_a_planned_selector_takes_python_int_seeds_as_the_op_does():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    expert = logits.flip(-1)
    params = StepParams(temperature=0.8)
    selector = GuardedSelector(params, "torch").plan(3, 40, torch.float32, torch.device("cpu"))
    potential, alpha = torch.zeros(3), torch.full((3,), 0.5)
    want = guarded_select(logits, expert, potential, alpha, 5, 2, params, backend="torch")[0]
    assert torch.equal(selector.run(logits, expert, potential, alpha, 5, 2)[0], want)


@needs_triton
def test_the_hidden_state_kernels_read_a_strided_bias_as_its_values():
    """The kernels read the bias at unit stride: a view such as packed[:, 0] gave other tokens and divergences."""
    g = torch.Generator().manual_seed(1)
    vocab, size = 300, 16
    hidden_b, hidden_e = torch.randn(3, size, generator=g), torch.randn(3, size, generator=g)
    head = torch.randn(vocab, size, generator=g)
    packed = torch.randn(vocab, 2, generator=g)
    potential, alpha = torch.zeros(3), torch.full((3,), 0.9)
    params = StepParams(gate=GateMode.OPEN, candidate_k=8)

    def step(backend, bias):
        return guarded_select_from_hidden(hidden_b, hidden_e, head, None, potential, alpha, params=params,
                                          base_head_bias=bias, backend=backend)

    want = step("torch", packed[:, 0].contiguous())
    got = step("triton", packed[:, 0])
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[3], want[3], atol=1e-5, rtol=1e-5)


@needs_triton
def test_a_direct_call_of_the_hidden_state_triton_op_checks_its_inputs():
    """torch.ops.ngsd.guarded_select_from_hidden_triton (also the CUDA body of the default op) checked nothing:
    an alpha of 2 values for 3 rows was read past its end, a head of another hidden size in a wrong layout."""
    hidden, head = torch.randn(3, 16), torch.randn(64, 16)
    seed = torch.zeros(1, dtype=torch.int64)
    flat = StepParams().flat()
    op = torch.ops.ngsd.guarded_select_from_hidden_triton
    with pytest.raises(ValueError, match="alpha"):
        op(hidden, hidden, head, None, None, None, torch.zeros(3), torch.zeros(2), seed, seed, *flat)
    with pytest.raises(ValueError, match="base_head_weight"):
        op(hidden, hidden, torch.randn(64, 19), None, None, None, torch.zeros(3), torch.zeros(3), seed, seed, *flat)


# --- A second hunt of the backend as other decoders use it (stop 50). ---


def test_inputs_that_require_grad_compile_and_pass_opcheck():
    """An lm_head's weight (an nn.Parameter) or logits computed outside no_grad made the float outputs require
    grad; torch.compile then failed ("no autograd formula"), and so did opcheck. The outputs are now marked
    non-differentiable: a token choice has no gradient."""
    from ngsd_kernels import contrastive_select  # noqa: F401  (registers the contrastive op too)

    torch._dynamo.reset()
    head = torch.nn.Linear(8, 24, bias=False)
    gen = torch.Generator().manual_seed(0)
    hb, he = torch.randn(2, 8, generator=gen), torch.randn(2, 8, generator=gen)
    potential, alpha = torch.zeros(2), torch.full((2,), 0.5)

    def step(hb, he):
        from_hidden = guarded_select_from_hidden(hb, he, head.weight, None, potential, alpha)
        from_logits = guarded_select(head(hb), head(he), potential, alpha)
        return from_hidden, from_logits

    eager = step(hb, he)
    assert not any(t.requires_grad for pair in eager for t in pair)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(hb, he)
    for want, got in zip(eager, compiled):
        assert torch.equal(want[0], got[0]) and torch.equal(want[2], got[2])
    zero = torch.zeros(1, dtype=torch.int64)
    logits = torch.randn(2, 24, requires_grad=True), torch.randn(2, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.ngsd.guarded_select, (*logits, potential, alpha, zero, zero, *StepParams().flat()))


@pytest.mark.parametrize("call, name", [
    (lambda b, e, v, a: guarded_select(b, e, v, 0.9), "alpha"),  # SafeDecoding's alpha is one number
    (lambda b, e, v, a: guarded_select(b, e, None, a), "potential"),  # a decoder without a gate has none
    (lambda b, e, v, a: guarded_select(b.numpy(), e.numpy(), v, a), "base_logits"),
    (lambda b, e, v, a: GuardedSelector(StepParams()).plan(2, 10, torch.float32, "cpu").run(b, e, v, 0.5), "alpha"),
    (lambda b, e, v, a: guarded_select_from_hidden(b, e, torch.randn(7, 10), None, v, 0.5), "alpha"),
    (lambda b, e, v, a: __import__("ngsd_kernels").contrastive_select(b.tolist(), e.tolist()), "strong_logits"),
])
def test_arguments_that_are_not_tensors_are_named(call, name):
    """They raised AttributeError: 'float' object has no attribute 'dtype' (or 'device')."""
    b, e = torch.randn(2, 10), torch.randn(2, 10)
    with pytest.raises(TypeError, match=f"^{name} must be"):
        call(b, e, torch.zeros(2), torch.full((2,), 0.5))


def test_the_triton_backend_without_triton_names_the_extra(monkeypatch):
    """Triton is an optional extra; backend='triton' without it was a bare "No module named 'triton'"."""
    import sys

    from ngsd_kernels import contrastive_select

    monkeypatch.setitem(sys.modules, "triton", None)  # as if not installed (find_spec then finds nothing)
    b, e = torch.randn(2, 10), torch.randn(2, 10)
    for call in (lambda: guarded_select(b, e, torch.zeros(2), torch.ones(2), backend="triton"),
                 lambda: contrastive_select(b, e, backend="triton"),
                 lambda: GuardedSelector(StepParams(), backend="triton").plan(2, 10, torch.float32, "cpu")):
        with pytest.raises(ModuleNotFoundError, match=r"ngsd\[kernels\].*backend='torch'"):
            call()
