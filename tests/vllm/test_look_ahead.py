"""Where a guarded engine cannot decode the check's look-ahead beside the scheduler (no engine, no model: the
look-ahead itself is compared with the library's in `test_vllm_guarded.py`, on the band requests)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; run with .venv-vllm/bin/python (scripts/vllm_env.sh)")

from ngsd.vllm.look_ahead import look_ahead_unsupported  # noqa: E402


def _config(tensor: int = 1, pipeline: int = 1) -> SimpleNamespace:
    return SimpleNamespace(parallel_config=SimpleNamespace(tensor_parallel_size=tensor,
                                                           pipeline_parallel_size=pipeline))


def _stack(*layers) -> SimpleNamespace:
    return SimpleNamespace(model=SimpleNamespace(layers=list(layers), start_layer=0, end_layer=len(layers)))


def _llama_layer(sliding_window=None) -> SimpleNamespace:
    attention = SimpleNamespace(qkv_proj=None, o_proj=None, rotary_emb=None,
                                attn=SimpleNamespace(sliding_window=sliding_window))
    return SimpleNamespace(self_attn=attention)


def test_a_plain_llama_stack_on_one_device_looks_ahead() -> None:
    assert look_ahead_unsupported(_config(), _stack(_llama_layer(), _llama_layer())) is None


@pytest.mark.parametrize("config, stack, reason", [
    (_config(tensor=2), _stack(_llama_layer()), "tensor parallelism"),
    (_config(pipeline=2), _stack(_llama_layer()), "pipeline parallelism"),
    (_config(), _stack(_llama_layer(), _llama_layer(sliding_window=4096)), "sliding-window"),
    (_config(), _stack(SimpleNamespace(mixer=None)), "without Llama's attention"),
])
def test_an_engine_the_dense_opening_would_get_wrong_says_why(config, stack, reason) -> None:
    """The dense opening would run one shard of a tensor-parallel stack alone, or attend past a sliding window:
    there the engine says why, and the divergence alone decides (it guards every request the look-ahead would
    have routed)."""
    assert reason in look_ahead_unsupported(config, stack)
