"""The LoRA hooks' row plan: measured on this CPU, or pinned by NGSD_LORA_ROW_PLAN."""

import pytest
import torch

from ngsd.experts import row_products
from ngsd.experts.lora import LoraAdapter
from ngsd.experts.row_products import PLAN_ENV, choose_plan, measured_plans, plan_for


@pytest.mark.parametrize("one_row_us, two_rows_us, plan", [
    (4.3, 240.0, "one-by-one"),  # stop 51's AVX-512 machine, passive OpenMP waiting: multi-row products wait
    (4.2, 15.5, "alone"),        # the same machine with spinning threads: no wait, one row alone is cheaper
    (120.0, 5.0, "paired"),      # stop 43's machine: one-row products were split over the threads
    (5.0, 5.0, "alone"),
])
def test_the_plan_follows_what_waits_for_a_thread(one_row_us, two_rows_us, plan):
    assert choose_plan(one_row_us * 1e-6, two_rows_us * 1e-6) == plan


def test_a_plan_is_measured_once_per_dtype_and_thread_count(monkeypatch):
    monkeypatch.delenv(PLAN_ENV, raising=False)
    monkeypatch.setattr(row_products, "_plans", {})
    x, down_t, up_t = torch.randn(3, 64), torch.randn(64, 4), torch.randn(4, 64)
    generator_state = torch.get_rng_state()
    plan = plan_for(x, down_t, up_t)
    assert torch.equal(torch.get_rng_state(), generator_state)  # seeded sampling after it draws the same
    assert plan in row_products.PLANS
    assert plan_for(x, down_t, up_t) == plan
    assert measured_plans() == {f"float32 x {torch.get_num_threads()} threads": plan}


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
