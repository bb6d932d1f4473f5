"""Contrastive decoding's token choice (`ngsd_kernels.contrastive`): the reference against the papers'
definitions, the Triton kernel (interpreted here) against the reference, token for token, and the ops.

The Triton kernel runs interpreted (TRITON_INTERPRET=1 is set here before triton is imported).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ngsd_kernels import ContrastiveParams, contrastive_select, contrastive_select_reference  # noqa: E402
from ngsd_kernels.contrastive import contrastive_scores  # noqa: E402
from ngsd_kernels.philox import philox_uniform  # noqa: E402
from tests.kernels.steps import NEAR_TIE_RTOL, needs_triton, triton_available  # noqa: E402

pytestmark = [
    # numpy warnings of Triton's CPU interpreter on the -inf/NaN rows these tests feed on purpose
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


def model_logits(batch: int, vocab: int, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A strong model's logits and a weak model's that agree with it in part, as an amateur does."""
    gen = torch.Generator().manual_seed(seed)
    strong = torch.randn(batch, vocab, generator=gen) * 3
    weak = 0.6 * strong + torch.randn(batch, vocab, generator=gen) * 2
    return strong.to(dtype), weak.to(dtype)


def zero() -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int64)


def test_greedy_is_li_et_al_contrastive_decoding():
    """beta 1: argmax of log p_s - log p_w over the tokens with p_s >= plausibility * max p_s (the paper's
    own terms, from probabilities)."""
    strong, weak = model_logits(16, 500, seed=1)
    log_ps, log_pw = strong.log_softmax(-1), weak.log_softmax(-1)
    ps = log_ps.exp()
    for plausibility in (0.1, 0.5):
        plausible = ps >= plausibility * ps.amax(-1, keepdim=True)
        expected = torch.where(plausible, log_ps - log_pw, torch.tensor(float("-inf"))).argmax(-1)
        got = contrastive_select(strong, weak, params=ContrastiveParams(beta=1.0, plausibility=plausibility))
        assert torch.equal(got, expected)
        assert not torch.equal(got, strong.argmax(-1))  # the contrast does change tokens here


def test_obrien_and_lewis_form_maps_to_beta_over_one_plus_beta():
    """(1 + b) log p_s - b log p_w (arXiv 2309.09117) picks what beta = b / (1 + b) picks."""
    strong, weak = model_logits(16, 500, seed=2)
    log_ps, log_pw = strong.log_softmax(-1), weak.log_softmax(-1)
    plausible = strong >= strong.amax(-1, keepdim=True) + torch.log(torch.tensor(0.1))
    for b in (0.5, 1.0):
        expected = torch.where(plausible, (1 + b) * log_ps - b * log_pw, torch.tensor(float("-inf"))).argmax(-1)
        got = contrastive_select(strong, weak, params=ContrastiveParams(beta=b / (1 + b)))
        assert torch.equal(got, expected)


def test_beta_zero_is_the_strong_models_greedy_choice():
    strong, weak = model_logits(8, 300, seed=3)
    weak[0, strong[0].argmax()] = float("-inf")  # 0 * -inf must not turn into NaN
    got = contrastive_select(strong, weak, params=ContrastiveParams(beta=0.0, plausibility=0.5))
    assert torch.equal(got, strong.argmax(-1))


def test_sampling_draws_from_the_tempered_contrast_on_the_plausible_tokens():
    strong = torch.tensor([[2.0, 1.8, 1.5, 0.9, -3.0, -4.0]])
    weak = torch.tensor([[2.0, 0.5, 1.0, 0.0, -9.0, -9.0]])
    params = ContrastiveParams(beta=0.7, plausibility=0.2, temperature=0.8)
    draws = torch.stack([contrastive_select(strong, weak, zero() + 5, torch.tensor([i]), params)
                         for i in range(4000)]).flatten()
    counts = torch.bincount(draws, minlength=6).float() / draws.numel()
    plausible = strong[0] >= strong[0].max() + torch.log(torch.tensor(0.2))
    q = torch.where(plausible, (strong[0] - 0.7 * weak[0]) / 0.8, torch.tensor(float("-inf"))).softmax(-1)
    assert counts[~plausible].sum() == 0  # tokens 4 and 5 contrast best but are implausible
    assert (counts - q).abs().max() < 0.03, (counts, q)


def test_invalid_rows_get_minus_one_and_a_ruled_out_token_wins():
    strong, weak = model_logits(6, 50, seed=4)
    strong[0, 3] = float("nan")
    weak[1, 7] = float("inf")
    strong[2] = float("-inf")
    weak[3] = float("-inf")
    best = int(strong[4].argmax())
    weak[4, best] = float("-inf")  # the weak model rules out the strong model's best token: +inf contrast
    got = contrastive_select(strong, weak)
    assert got[:4].tolist() == [-1, -1, -1, -1]
    assert int(got[4]) == best and int(got[5]) >= 0


@needs_triton
@pytest.mark.parametrize("vocab", [5, 37, 1000, 20000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_reference_greedy(vocab, dtype):
    strong, weak = model_logits(5, vocab, seed=vocab, dtype=dtype)
    for beta, plausibility in ((1.0, 0.1), (0.0, 0.3), (0.5, 1.0), (2.5, 0.01)):
        params = ContrastiveParams(beta=beta, plausibility=plausibility)
        expected = contrastive_select_reference(strong, weak, zero(), zero(), params)
        assert torch.equal(contrastive_select(strong, weak, params=params, backend="triton"), expected), params


@needs_triton
@pytest.mark.parametrize("vocab", [37, 20000])
def test_kernel_equals_reference_sampled(vocab):
    strong, weak = model_logits(6, vocab, seed=7)
    seeds = torch.arange(6, dtype=torch.int64) * 1000003 + (1 << 40)
    for temperature, plausibility, seed, offset in ((1.0, 0.1, seeds, torch.tensor([3])),
                                                    (0.3, 0.01, torch.tensor([9]), torch.arange(6) + 11),
                                                    (2.0, 0.001, seeds, torch.arange(6) * 7)):
        params = ContrastiveParams(beta=0.8, plausibility=plausibility, temperature=temperature)
        expected = contrastive_select_reference(strong, weak, seed, offset, params)
        got = contrastive_select(strong, weak, seed, offset, params, backend="triton")
        near = gumbel_near_ties(strong, weak, seed, offset, params)
        assert int(near.sum()) <= 1  # rare, or the test would say little on a GPU
        compared = ~near if strong.is_cuda else slice(None)
        assert torch.equal(got[compared], expected[compared]), params
    assert len(set(expected.tolist())) > 1


def gumbel_near_ties(strong, weak, seed, offset, params: ContrastiveParams) -> torch.Tensor:
    """[B] rows whose two best perturbed scores are within a GPU's approximate log of a tie (``steps.py``):
    there the compiled kernel may draw the other token."""
    scores = contrastive_scores(strong, weak, params)
    u = philox_uniform(seed, offset, scores.shape[1], torch.arange(scores.shape[0], device=scores.device))
    top2 = (scores / params.temperature - torch.log(-torch.log(u))).topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1] <= NEAR_TIE_RTOL * top2[:, 0].abs().clamp_min(1.0)


@needs_triton
def test_kernel_edge_rows_and_ties_across_chunks():
    from ngsd_kernels.ops.contrastive_select import BLOCK

    vocab = BLOCK + 300
    strong, weak = model_logits(6, vocab, seed=8)
    strong[0, 2] = float("nan")
    weak[1] = float("-inf")
    strong[2, :] = 0.0  # every token plausible and tied: lowest id
    weak[2, :] = 0.0
    strong[3, :] = -5.0  # the same best contrast in the first and the second chunk: the first wins
    strong[3, [100, BLOCK + 7]] = 5.0
    weak[3, [100, BLOCK + 7]] = 1.0
    weak[4, int(strong[4].argmax())] = float("-inf")
    for params in (ContrastiveParams(), ContrastiveParams(temperature=0.5)):
        expected = contrastive_select_reference(strong, weak, zero(), zero(), params)
        got = contrastive_select(strong, weak, params=params, backend="triton")
        assert torch.equal(got, expected), params
    assert got[:2].tolist() == [-1, -1] and int(expected[3]) in (100, BLOCK + 7)
    greedy = contrastive_select(strong, weak, backend="triton")
    assert greedy[2:5].tolist() == [0, 100, int(strong[4].argmax())]


def test_ops_pass_opcheck_and_compile():
    strong, weak = model_logits(3, 40, seed=9)
    args = (strong, weak, torch.arange(3, dtype=torch.int64), torch.tensor([4]), 0.9, 0.1, 0.7)
    torch.library.opcheck(torch.ops.ngsd.contrastive_select.default, args)
    if triton_available():
        torch.library.opcheck(torch.ops.ngsd.contrastive_select_triton.default,
                              (strong.bfloat16(), weak.bfloat16(), *args[2:]))

    def step(s, w):
        return contrastive_select(s, w, params=ContrastiveParams(beta=0.5))

    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(strong, weak), step(strong, weak))


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(beta=-0.1), ValueError, "beta must be 0 (the strong model alone) or in"),
    (dict(beta=1e-46), ValueError, "beta must be 0 (the strong model alone) or in"),  # 0 in fp32: 0 * -inf
    (dict(beta=1e39), ValueError, "beta must fit fp32"),
    (dict(beta=float("nan")), ValueError, "beta must be finite"),
    (dict(plausibility=0.0), ValueError, "plausibility must be in (0, 1]"),
    (dict(plausibility=1.5), ValueError, "plausibility must be in (0, 1]"),
    (dict(temperature=1e-7), ValueError, "temperature must be 0 (greedy)"),
    (dict(temperature=1e39), ValueError, "temperature must fit fp32"),
    (dict(temperature=True), TypeError, "temperature must be a real number"),
    (dict(beta="1"), TypeError, "beta must be a real number"),
])
def test_bad_params_are_refused_by_name(kwargs, error, words):
    with pytest.raises(error) as raised:
        ContrastiveParams(**kwargs)
    assert words in str(raised.value)


def test_params_take_any_real_number_as_a_float():
    import numpy as np

    params = ContrastiveParams(beta=np.float32(0.5), plausibility=1, temperature=np.float64(0.7))
    assert params == ContrastiveParams(beta=0.5, plausibility=1.0, temperature=0.7)
    assert all(type(v) is float for v in (params.beta, params.plausibility, params.temperature))


def test_bad_inputs_are_refused_by_name():
    strong, weak = model_logits(2, 10)
    with pytest.raises(ValueError, match="differ in shape"):
        contrastive_select(strong, weak[:, :9])
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        contrastive_select(strong, weak.half())
    with pytest.raises(ValueError, match="seed and offset must hold 1 or 2 values"):
        contrastive_select(strong, weak, seed=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="offset must be torch.int64"):
        contrastive_select(strong, weak, offset=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="one device"):
        contrastive_select(strong, weak, seed=torch.zeros(1, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        contrastive_select(strong[0], weak[0])
    with pytest.raises(ValueError, match="backend must be one of"):
        contrastive_select(strong, weak, backend="cuda")
    with pytest.raises(TypeError, match="ContrastiveParams"):
        contrastive_select(strong, weak, params={"beta": 1.0})
    with pytest.raises(ValueError, match="beta must be 0"):  # the op checks what a direct call passes
        torch.ops.ngsd.contrastive_select(strong, weak, zero(), zero(), -1.0, 0.1, 0.0)


@needs_triton
def test_kernel_refuses_a_vocabulary_its_int32_ids_cannot_index():
    huge = torch.zeros(1, 1).expand(1, 2**31)  # nothing allocated: the check comes before any copy
    with pytest.raises(ValueError, match="int32.*backend='torch'"):
        contrastive_select(huge, huge, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "auto", pytest.param("triton", marks=needs_triton)])
def test_empty_batch_and_vocabulary_greedy_and_sampled(backend):
    """As the guarded step: no rows, no tokens; rows over no token are invalid (-1)."""
    for params in (ContrastiveParams(), ContrastiveParams(temperature=0.5)):
        empty = torch.zeros(0, 7)
        assert contrastive_select(empty, empty, params=params, backend=backend).shape == (0,)
        no_tokens = torch.zeros(2, 0)
        assert contrastive_select(no_tokens, no_tokens, params=params, backend=backend).tolist() == [-1, -1]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_an_overflowing_contrast_keeps_plausible_tokens_above_the_implausible(backend):
    """beta * l_w overflowing fp32 turns a plausible token's score to -inf: it is held at the lowest finite
    float, so the row still takes its lowest plausible id (not an implausible token, not a sentinel)."""
    strong = torch.tensor([[-50.0, -1.0, 0.0], [0.0, -1.0, -50.0]])
    weak = torch.tensor([[0.0, 3e38, 3e38], [3e38, 3e38, 0.0]])
    for temperature in (0.0, 0.5):
        params = ContrastiveParams(beta=2.0, temperature=temperature)
        assert contrastive_select(strong, weak, params=params, backend=backend).tolist() == [1, 0]


@needs_triton
def test_kernel_reads_strided_rows_as_the_reference_does():
    strong, weak = (x.reshape(3, 4, 500)[:, -1, :] for x in model_logits(12, 500, seed=11))  # rows 2000 apart
    assert not strong.is_contiguous() and strong.stride(-1) == 1
    for params in (ContrastiveParams(), ContrastiveParams(temperature=0.9)):
        expected = contrastive_select_reference(strong, weak, zero(), zero(), params)
        assert torch.equal(contrastive_select(strong, weak, params=params, backend="triton"), expected)


def test_seed_and_offset_may_be_python_ints_in_both_ops():
    from ngsd_kernels import StepParams, guarded_select

    strong, weak = model_logits(3, 40, seed=12)
    params = ContrastiveParams(temperature=0.8)
    as_tensors = contrastive_select(strong, weak, torch.tensor([5]), torch.tensor([2]), params)
    assert torch.equal(contrastive_select(strong, weak, 5, 2, params), as_tensors)
    step = (strong, weak, torch.zeros(3), torch.full((3,), 0.9))
    sampled = StepParams(temperature=0.8)
    assert torch.equal(guarded_select(*step, 5, 2, sampled)[0],
                       guarded_select(*step, torch.tensor([5]), torch.tensor([2]), sampled)[0])
    with pytest.raises(TypeError, match="seed must be an int64 tensor .* or a Python int, got float"):
        contrastive_select(strong, weak, seed=5.0)
    with pytest.raises(ValueError, match="offset must fit int64"):
        guarded_select(*step, offset=2**63)

