"""The LoRA hooks' row plan: measured on this CPU, or pinned by NGSD_LORA_ROW_PLAN."""

import pytest
import torch

from ngsd.experts import row_products
from ngsd.experts.lora import LoraAdapter
from ngsd.experts.row_products import PLAN_ENV, choose_plan, measured_plans, plan_for


@pytest.mark.parametrize("one_row_us, two_rows_us, plan", [
    (4.3, 240.0, "one-by-one"),  # stop 51's AVX-512 machine, passive waiting, idle: multi-row products wait
    (5.8, 38.3, "one-by-one"),   # the same, while another job kept the second core busy
    (5.8, 9.8, "alone"),         # the same machine with spinning threads: no wait
    (4.2, 15.5, "alone"),
    (120.0, 5.0, "paired"),      # stop 43's machine: one-row products were split over the threads
    (5.0, 5.0, "alone"),
    (5.6, 5.9, "alone"),         # one thread: the two forms tie (and flipped when chosen by the faster)
])
def test_the_plan_follows_what_waits_for_a_thread(one_row_us, two_rows_us, plan):
    assert choose_plan(one_row_us * 1e-6, two_rows_us * 1e-6) == plan


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_without_passive_waiting_the_plan_is_alone_and_unmeasured(monkeypatch, two_threads):
    monkeypatch.delenv(PLAN_ENV, raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(row_products, "_plans", {})
    assert plan_for(torch.randn(3, 64), torch.randn(64, 4), torch.randn(4, 64)) == "alone"
    assert measured_plans() == {}


def test_a_plan_is_measured_once_per_dtype_and_thread_count(monkeypatch, two_threads):
    monkeypatch.delenv(PLAN_ENV, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(row_products, "_plans", {})
    x, down_t, up_t = torch.randn(3, 64), torch.randn(64, 4), torch.randn(4, 64)
    generator_state = torch.get_rng_state()
    plan = plan_for(x, down_t, up_t)
    assert torch.equal(torch.get_rng_state(), generator_state)  # seeded sampling after it draws the same
    assert plan in row_products.PLANS
    assert plan_for(x, down_t, up_t) == plan
    assert measured_plans() == {"float32 x 2 threads": plan}


def test_a_pinned_plan_wins_and_a_mistyped_one_is_refused_at_attach(monkeypatch, llama_pair):
    x, down_t, up_t = torch.randn(3, 64), torch.randn(64, 4), torch.randn(4, 64)
    monkeypatch.setenv(PLAN_ENV, "paired")
    assert plan_for(x, down_t, up_t) == "paired"
    model, folder = llama_pair
    monkeypatch.setenv(PLAN_ENV, "pairs")
    adapter = LoraAdapter.load(folder)
    with pytest.raises(ValueError, match="NGSD_LORA_ROW_PLAN='pairs' is not a LoRA row plan: use one of paired, "
                                         "alone, one-by-one or auto"):
        adapter.attach(model)
    assert not adapter.is_attached(model)


@pytest.mark.parametrize("count, device, sleeping, one", [
    (8, "cpu", True, False),      # the row plans' range
    (9, "cpu", True, True),
    (row_products.ONE_THREAD_MAX, "cpu", True, True),
    (row_products.ONE_THREAD_MAX + 1, "cpu", True, False),  # a prefill's many positions: both threads pay
    (16, "meta", True, False),    # not a CPU
    (16, "cpu", False, False),    # threads that spin (or one thread): nothing to wake
])
def test_which_updates_run_on_one_thread(monkeypatch, count, device, sleeping, one):
    monkeypatch.setattr(row_products, "threads_sleep", lambda: sleeping)
    assert row_products.runs_on_one_thread(torch.empty(1, 4, device=device), count) is one


def test_one_thread_gives_the_thread_its_count_back_also_after_an_error(two_threads):
    with row_products.one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="inside"):
        with row_products.one_thread():
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("rows, positions", [(10, 1), (2, 7), (1, 40), (1, 200)])
def test_where_threads_sleep_small_updates_run_on_one_thread_and_match_peft(llama_pair, monkeypatch, two_threads,
                                                                            rows, positions):
    """Under passive waiting the expert rows' updates of 9..ONE_THREAD_MAX rows (times positions) run on the
    calling thread alone (a decode step's 16 expert rows, a short prompt's prefill); more run on both threads. The
    expert rows are peft's expert either way, and the thread keeps its count."""
    import copy

    from peft import PeftModel

    from ngsd.experts import lora

    monkeypatch.delenv(PLAN_ENV, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    threads_seen = []
    update = lora._lora_update

    def spying_update(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return update(*args, **kwargs)

    monkeypatch.setattr(lora, "_lora_update", spying_update)
    model, folder = llama_pair
    ids = torch.randint(3, model.config.vocab_size, (rows, positions))
    adapter = LoraAdapter.load(folder)
    adapter.attach(model)
    try:
        with torch.no_grad(), adapter.rows_from(rows):
            both = model(torch.cat([ids, ids])).logits
    finally:
        adapter.detach(model)
    assert torch.get_num_threads() == 2
    expected_threads = 1 if rows * positions <= row_products.ONE_THREAD_MAX else 2
    assert threads_seen and set(threads_seen) == {expected_threads}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()
    with torch.no_grad():
        expected = peft_model(ids).logits
    # float rounding of the fused products grows with the positions (4e-4 seen over 200 in CI's run)
    torch.testing.assert_close(both[rows:], expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(both[:rows], model(ids).logits.detach(), rtol=1e-5, atol=1e-5)
