"""The shipped NeST delta, written as a peft LoRA folder (`ngsd nest-to-lora`), as the expert of a guarded vLLM
engine: the same tokens as the project's own loop with `expert="nest"` (greedy, alpha 0.9, 48 new tokens)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; run with .venv-vllm/bin/python (scripts/vllm_env.sh)")

from .conftest import ALPHA, ENGINE, GUARDED_KV_BYTES, NEW_TOKENS, greedy  # noqa: E402


@pytest.fixture(scope="module")
def nest_lora_folder(tmp_path_factory) -> str:
    from ngsd.nest.as_lora import save_peft_folder
    from ngsd.nest.shipped import shipped_nest_path

    return str(save_peft_folder(shipped_nest_path(), tmp_path_factory.mktemp("nest_lora")))


def test_a_guarded_engine_with_the_nest_lora_equals_the_project_loop_with_expert_nest(
        hf_model, model_path, prompt_texts, prompt_ids, nest_lora_folder):
    import ngsd
    from vllm import LLM

    from ngsd.vllm import engine_kwargs

    model, tokenizer = hf_model
    reference = ngsd.generate(model, tokenizer, prompt_texts, expert="nest", alpha=ALPHA, max_new_tokens=NEW_TOKENS)
    want = [trace.tokens for trace in reference.traces]
    assert any(any(trace.spikes) for trace in reference.traces), "the gate must fire for the comparison to mean something"
    # a KV cache of its own size: left unset, vLLM's CPU backend reserves 92% of the machine's memory at start,
    # which fails while the other tests' engines are alive
    llm = LLM(**engine_kwargs(model_path, expert=nest_lora_folder, alpha=ALPHA,
                              kv_cache_memory_bytes=4 * GUARDED_KV_BYTES, **ENGINE))
    try:
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], greedy(), use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    got = [list(o.outputs[0].token_ids) for o in outputs]
    mismatches = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not mismatches, f"prompts whose tokens differ: {mismatches}"
