"""Engines and reference answers shared by the vLLM tests (run in the vLLM environment: scripts/vllm_env.sh).

One guarded engine with the default settings (the risk probe decides each request) whose KV cache
is small enough that a batch of 16 must be preempted and whose token budget a step splits prompts
over several steps (chunked prefill), one plain engine for the opt-out comparison, and the
project's own loop (`ngsd.generate`) as the reference: its default (probe, routing, check) and
alpha 0.9 fixed (what a request that sets ``ngsd_alpha`` gets).
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
# a step's token budget below most prompts' length: prompts are prefilled over several steps
CHUNKED = dict(max_num_batched_tokens=48, max_num_seqs=16)
# AlpacaEval even ids (its training split) whose risk lies in the divergence check's band
# [check_above, route_below) of the shipped probe: the check decides them. 56 diverges less than the check's
# threshold (routed); 154 and 254 diverge more, so the look-ahead reads the expert's own opening: 154's refuses
# (guarded), 254's answers (routed)
BAND_IDS = (56, 154, 254)


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
def band_texts() -> list[str]:
    _need_data()
    records = json.loads((resolve_data_dir() / "alpaca_eval_805.json").read_text())
    rows = {int(row["id"]): row["instruction"] for row in records}
    return [rows[i] for i in BAND_IDS]


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
def band_ids(hf_model, band_texts) -> list[list[int]]:
    import ngsd

    _, tokenizer = hf_model
    ids, mask = ngsd.encode_prompts(tokenizer, band_texts)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


@pytest.fixture(scope="session")
def default_result(hf_model, prompt_texts, band_texts):
    """The project's own loop with its default configuration (risk probe, routing, divergence check and its
    look-ahead), greedy, on the 16 prompts and the band prompts: its tokens and traces (route, alpha, verdict) per
    row."""
    import ngsd

    model, tokenizer = hf_model
    return ngsd.generate(model, tokenizer, prompt_texts + band_texts, expert="shipped", max_new_tokens=NEW_TOKENS)


@pytest.fixture(scope="session")
def default_reference(default_result) -> list[list[int]]:
    return [trace.tokens for trace in default_result.traces]


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
def verdict_log(tmp_path_factory):
    return tmp_path_factory.mktemp("verdicts") / "verdicts.jsonl"


@pytest.fixture(scope="session")
def guarded_llm(model_path, verdict_log):
    """Default risk setting ("auto": the shipped probe decides each request), chunked prefill, preemption."""
    from vllm import LLM

    from ngsd.vllm import engine_kwargs

    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the small KV cache that makes it preempt
    llm = LLM(**engine_kwargs(model_path, expert="shipped", alpha=ALPHA, allow_opt_out=True, verdict_log=str(verdict_log),
                              kv_cache_memory_bytes=GUARDED_KV_BYTES, disable_log_stats=False, **CHUNKED, **ENGINE))
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def async_verdict_log(tmp_path_factory):
    return tmp_path_factory.mktemp("async_verdicts") / "verdicts.jsonl"


@pytest.fixture(scope="session")
def async_guarded_llm(model_path, async_verdict_log):
    """`guarded_llm`'s settings under vLLM's async scheduling (its default on GPUs): a resumed request gets a new
    output list, and a sampled token shows up as -1 until the host has it. vLLM's CPU platform switches async
    scheduling off in `check_and_update_config`; the engine's config is built here, in the driver, and sent to
    the engine process, so keeping the flag on while this engine is built is enough (vLLM 0.32's CPU model runner
    supports it: a plain engine decodes the same tokens with and without)."""
    from vllm import LLM
    from vllm.platforms.cpu import CpuPlatform

    from ngsd.vllm import engine_kwargs

    cpu_config = CpuPlatform.__dict__["check_and_update_config"]

    def keep_async_scheduling(cls, vllm_config) -> None:
        cpu_config.__func__(cls, vllm_config)
        vllm_config.scheduler_config.async_scheduling = True

    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    CpuPlatform.check_and_update_config = classmethod(keep_async_scheduling)
    try:
        llm = LLM(**engine_kwargs(model_path, expert="shipped", alpha=ALPHA, verdict_log=str(async_verdict_log),
                                  kv_cache_memory_bytes=GUARDED_KV_BYTES, disable_log_stats=False, **CHUNKED, **ENGINE))
    finally:
        CpuPlatform.check_and_update_config = cpu_config
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def sampling_llm(model_path):
    """A guarded engine without the small step budget, for seeded sampling: vLLM's CPU runner fails when it
    discards a seeded request's sample after a partial prefill ("CPU Generator does not use offset", its
    `_bookkeeping_sync` rewinds the generator), which the 48-token budget of `guarded_llm` makes likely."""
    from vllm import LLM

    from ngsd.vllm import engine_kwargs

    llm = LLM(**engine_kwargs(model_path, expert="shipped", alpha=ALPHA, kv_cache_memory_bytes=GUARDED_KV_BYTES,
                              **ENGINE))
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


class VerdictLog:
    """The lines the guarded engine's worker appends to its verdict log from now on."""

    def __init__(self, path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new_lines(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as log:
            log.seek(self.offset)
            return [json.loads(line) for line in log if line.strip()]
