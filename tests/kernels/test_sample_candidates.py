"""Sort-free top-k / top-p sampling (select_tiles.store_sample_candidates + slots_sample).

Pass 2 keeps, per chunk and gate outcome, the (q, id) keys above the K-th largest of the chunk's
group maxima, unsorted, and a certainty floor; the finalize kernel finds the top-k / top-p
thresholds over them by bisection and flags a row only where a threshold fell below the floor.
Every row the kernels do not flag must equal the reference; flagged rows are decided on the GPU
side (``_sample_fallback_kernel``), so the whole step needs no host read. Interpreter only.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from ngsd_kernels.ops import launcher  # noqa: E402
from ngsd_kernels.ops.fused_select import fused_guarded_select, fused_guarded_select_with_overflow  # noqa: E402
from ngsd_kernels.ops.launcher import plan_select  # noqa: E402
from ngsd_kernels.params import GateMode, StepParams  # noqa: E402
from ngsd_kernels.reference import guarded_select_reference  # noqa: E402
from tests.kernels.steps import approximate_exp, near_tie_rows, needs_triton  # noqa: E402

pytestmark = [needs_triton, pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # the interpreter's numpy on -inf


@pytest.fixture
def no_host_read(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("host read of the overflow flags")

    monkeypatch.setattr(launcher.torch, "nonzero", forbidden)


def _case(trial: int, gen: torch.Generator):
    batch, vocab = 4, int(torch.randint(150, 1300, (1,), generator=gen))
    scale = (0.3, 1.0, 3.0, 8.0)[trial % 4]
    base = torch.randn(batch, vocab, generator=gen) * scale
    expert = torch.randn(batch, vocab, generator=gen) * scale
    if trial % 5 == 0:
        base[:, ::7] = base[:, 3:4]  # one value repeated across every chunk
        expert[:, ::5] = float("-inf")
    if trial % 6 == 1:
        base = base.round()  # many ties everywhere
    top_k = (0, 1, 5, 16, 40)[trial % 5]
    top_p = (1.0, 0.9, 0.5, 0.95)[trial % 4]
    if top_k == 0 and top_p == 1.0:
        top_p = 0.8
    # top-p at T != 1 reads q^(1/T) (select_tiles.log_tempered_mass, tempered_weights); T 0.05 sharpens q past
    # any fp32 sum of q itself
    temperature = (0.7, 1.0, 1.5, 0.05)[(trial // 3) % 4] if trial % 7 else 1.0
    params = StepParams(candidate_k=8, gate=(GateMode.CLOSED, GateMode.OPEN, GateMode.LIF)[trial % 3],
                        temperature=temperature, top_k=top_k, top_p=top_p, v_th=0.3)
    args = (base, expert, torch.zeros(batch), torch.full((batch,), 0.7), torch.arange(batch) + trial,
            torch.tensor([trial]))
    return args, params, (64, 128, None)[trial % 3]


def test_unflagged_rows_equal_the_reference_and_flagged_rows_are_decided_on_device(no_host_read):
    gen = torch.Generator().manual_seed(0)
    flagged = rows = 0
    for trial in range(24):
        args, params, block_v = _case(trial, gen)
        want = guarded_select_reference(*args, params=params)
        # compiled (CUDA): exp / log are the GPU's approximate ones; rows within rounding of a tie may differ
        sure = ~near_tie_rows(*args, params) if approximate_exp(args[0]) else torch.ones_like(want[2])
        tokens, _, _, _, overflow = fused_guarded_select_with_overflow(*args, params=params, block_v=block_v)
        assert overflow is not None
        assert torch.equal(tokens[~overflow & sure], want[0][~overflow & sure]), trial
        flagged += int(overflow.sum())
        rows += overflow.numel()
        decided = fused_guarded_select(*args, params=params, block_v=block_v)[0]
        assert torch.equal(decided[sure], want[0][sure]), trial
    assert flagged < rows / 4, (flagged, rows)  # the candidates decide most rows themselves


def test_ties_at_a_chunk_bound_keep_the_entries_above_it():
    """Every chunk ends in a long run of one value: the run does not fit in the slots, the entries
    above it do, and the row stays decidable (its floor is the next float above the tied value)."""
    base = torch.zeros(2, 1024)
    base[:, :40:3] = torch.linspace(5.0, 1.0, 14)
    base[1, 512:520] = torch.linspace(4.5, 2.5, 8)
    params = StepParams(gate=GateMode.CLOSED, temperature=1.0, top_k=12)
    args = (base, base.clone(), torch.zeros(2), torch.full((2,), 0.5), torch.tensor([1, 2]), torch.tensor([3]))
    tokens, _, _, _, overflow = fused_guarded_select_with_overflow(*args, params=params, block_v=128)
    assert overflow.tolist() == [False, False]
    assert torch.equal(tokens, guarded_select_reference(*args, params=params)[0])


def test_plan_sizes_the_candidate_slots_and_the_finalize_blocks():
    params = StepParams(temperature=1.0, top_k=50)
    plan = plan_select(8, 5000, params, block_v=256)
    assert plan.sample == 2 and plan.buffer == 64
    assert plan.sample_slots == 128  # 2K, at most the chunk
    assert plan.sample_block >= 1 and plan.sample_block & (plan.sample_block - 1) == 0
    assert plan_select(8, 5000, params, block_v=64, buffer_size=64).sample_slots == 64
    greedy = plan_select(8, 5000, StepParams())
    assert (greedy.sample_slots, greedy.sample_block) == (1, 1)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5, 4.0])
def test_top_p_reads_the_tempered_distribution_in_the_kernels(temperature, no_host_read):
    """Top-p at T != 1 keeps the nucleus of q^(1/T) (spec 3.5), inside the kernels: the chunks' masses are
    logs of sums of q^(1/T), the finalize's bisection reads the tempered weights, and the rows the
    candidates cannot decide are decided on the device with the same weights."""
    gen = torch.Generator().manual_seed(int(temperature * 10))
    for trial, top_p in enumerate((0.5, 0.8, 0.95)):
        batch, vocab = 6, 900 + 97 * trial
        base = torch.randn(batch, vocab, generator=gen) * (1.0, 3.0, 6.0)[trial]
        expert = torch.randn(batch, vocab, generator=gen) * 2.0
        params = StepParams(candidate_k=8, gate=(GateMode.OPEN, GateMode.LIF, GateMode.CLOSED)[trial],
                            temperature=temperature, top_p=top_p, v_th=0.3)
        args = (base, expert, torch.zeros(batch), torch.full((batch,), 0.6), torch.arange(batch) + 5 * trial,
                torch.tensor([trial]))
        want = guarded_select_reference(*args, params=params)
        sure = ~near_tie_rows(*args, params) if approximate_exp(args[0]) else torch.ones_like(want[2])
        tokens, _, _, _, overflow = fused_guarded_select_with_overflow(*args, params=params, block_v=128)
        assert torch.equal(tokens[~overflow & sure], want[0][~overflow & sure]), (temperature, top_p)
        decided = fused_guarded_select(*args, params=params, block_v=128)[0]
        assert torch.equal(decided[sure], want[0][sure]), (temperature, top_p)


def test_a_row_with_no_candidate_is_flagged_at_any_temperature(no_host_read):
    """A flat row: more tokens tie at its largest q than a chunk has slots, so no chunk stores a candidate.
    At T 0.05 the overflow test's floor weight underflowed against an empty row's scale, the row went
    unflagged and drew token 0 (here at logit -inf); an empty candidate set is now flagged itself."""
    base = torch.zeros(2, 1000)
    base[:, 0] = float("-inf")
    base[1, 1] = float("-inf")
    expert = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))
    args = (base, expert, torch.zeros(2), torch.full((2,), 0.5), torch.tensor([3, 4]), torch.tensor([0]))
    for temperature in (0.05, 1.0):
        params = StepParams(candidate_k=8, gate=GateMode.CLOSED, temperature=temperature, top_p=0.9)
        _, _, _, _, overflow = fused_guarded_select_with_overflow(*args, params=params)
        assert overflow.tolist() == [True, True], temperature
        decided = fused_guarded_select(*args, params=params)[0]
        assert torch.equal(decided, guarded_select_reference(*args, params=params)[0]), temperature
        assert bool((base.gather(1, decided[:, None]) > float("-inf")).all())


def test_tokens_whose_probability_underflows_weigh_nothing_in_the_tempered_mass(no_host_read):
    """T 50, top-p 0.1, and 3900 tokens far below the rest (p_b = 0 in fp32): their exp(log p_b / T) is not
    small at T 50, and it used to enter the unmixed outcome's mass though the reference gives them weight 0,
    so the kernels kept a wider nucleus."""
    gen = torch.Generator().manual_seed(0)
    base = torch.full((4, 4000), -110.0)
    base[:, :100] = torch.randn(4, 100, generator=gen) * 3.0
    base = torch.gather(base, 1, torch.stack([torch.randperm(4000, generator=gen) for _ in range(4)]))
    expert = torch.randn(4, 4000, generator=gen)
    args = (base, expert, torch.zeros(4), torch.full((4,), 0.5), torch.arange(4) + 1, torch.tensor([0]))
    for mode, gate in ((0, GateMode.CLOSED), (1, GateMode.LIF), (0, GateMode.OPEN)):
        params = StepParams(candidate_k=8, candidate_mode=mode, gate=gate, temperature=50.0, top_p=0.1, v_th=10.0)
        want = guarded_select_reference(*args, params=params)
        sure = ~near_tie_rows(*args, params) if approximate_exp(args[0]) else torch.ones_like(want[2])
        decided = fused_guarded_select(*args, params=params)[0]
        assert torch.equal(decided[sure], want[0][sure]), (mode, gate)


def test_top_k_with_top_p_ranks_q_itself_at_a_large_temperature():
    """At T 1000, q values 2e-5 apart round to one tempered weight. top-k ranks q (a temperature does not
    reorder it), in the reference as in the kernels; the reference used to rank the rounded weights and
    keep all four tied tokens for top-1."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 512, generator=gen)
    for row in range(4):
        base[row, 10 * row:10 * row + 4] = 6.0 - 2e-5 * torch.arange(4, dtype=torch.float32)
    expert = torch.randn(4, 512, generator=gen)
    params = StepParams(candidate_k=8, gate=GateMode.CLOSED, temperature=1000.0, top_k=1, top_p=0.99)
    for seed in range(3):
        args = (base, expert, torch.zeros(4), torch.full((4,), 0.5), torch.arange(4) + 5 + 10 * seed,
                torch.tensor([1]))
        want = guarded_select_reference(*args, params=params)[0]
        assert want.tolist() == [10 * row for row in range(4)]  # top-1: the largest q, whatever the noise
        assert torch.equal(fused_guarded_select(*args, params=params)[0], want)
