"""Engines and reference answers shared by the vLLM tests (run in the vLLM environment: scripts/vllm_env.sh).

One guarded engine with a KV cache small enough that a batch of 16 must be preempted, one plain
engine for the opt-out comparison, and the project's own loop (`ngsd.generate`) as the reference.
vLLM's CPU engine runs in its own process (multiprocessing): in one process its OpenMP binding
makes CPU steps about 30x slower.
"""

from __future__ import annotations

import json
import os

import pytest

from ngsd.data import data_available, load_suite, resolve_data_dir

# without vLLM (the main environment) the test modules skip themselves; a conftest must not skip

NEW_TOKENS = 48
ALPHA = 0.9
ENGINE = dict(dtype="float32", max_model_len=256, enforce_eager=True, seed=0, block_size=32)
# 12 blocks of 32 tokens for both stacks (60 attention layers x K,V x 3 heads x 64 x fp32): 16 requests of
# ~90 tokens need 48 blocks, so the scheduler admits a few and preempts while they grow
GUARDED_KV_BYTES = 12 * 32 * 60 * 2 * 3 * 64 * 4


def _need_data() -> None:
    if not data_available(None, "advbench_harmful_behaviors.json", "alpaca_eval_805.json"):
        pytest.skip("the shared data folder (../shared/data or NGSD_DATA_DIR) is absent")


@pytest.fixture(scope="session")
def prompt_texts() -> list[str]:
    """8 harmful (AdvBench ids < 130) and 8 benign (AlpacaEval odd ids) prompts, interleaved."""
    _need_data()
    harmful = [p.text for p in load_suite("advbench", limit=130)][:8]
    rows = json.loads((resolve_data_dir() / "alpaca_eval_805.json").read_text())
    benign = [row["instruction"] for row in rows if int(row["id"]) % 2 == 1][:8]
    return [text for pair in zip(harmful, benign) for text in pair]


@pytest.fixture(scope="session")
def hf_model():
    import ngsd

    return ngsd.load_model()


@pytest.fixture(scope="session")
def prompt_ids(hf_model, prompt_texts) -> list[list[int]]:
    """Each prompt's token ids exactly as ngsd.generate encodes it (chat template, no padding)."""
    import ngsd

    _, tokenizer = hf_model
    ids, mask = ngsd.encode_prompts(tokenizer, prompt_texts)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


@pytest.fixture(scope="session")
def reference(hf_model, prompt_texts) -> list[list[int]]:
    """The project's own loop: shipped expert, alpha 0.9 fixed (no risk estimation), greedy."""
    import ngsd

    model, tokenizer = hf_model
    result = ngsd.generate(model, tokenizer, prompt_texts, expert="shipped", alpha=ALPHA, max_new_tokens=NEW_TOKENS)
    return [trace.tokens for trace in result.traces]


@pytest.fixture(scope="session")
def model_path(hf_model) -> str:
    from ngsd.loading import default_cache_dir

    return str(default_cache_dir())  # the HF folder load_model converted the GGUF into


@pytest.fixture(scope="session")
def guarded_llm(model_path):
    from vllm import LLM

    from ngsd.vllm import engine_kwargs

    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the small KV cache that makes it preempt
    llm = LLM(**engine_kwargs(model_path, expert="shipped", alpha=ALPHA, allow_opt_out=True,
                              kv_cache_memory_bytes=GUARDED_KV_BYTES, disable_log_stats=False, **ENGINE))
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def plain_llm(model_path):
    from vllm import LLM

    llm = LLM(model=model_path, kv_cache_memory_bytes=GUARDED_KV_BYTES, **ENGINE)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def greedy(**extra_args):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, extra_args=extra_args or None)
