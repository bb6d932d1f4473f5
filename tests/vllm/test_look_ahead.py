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


def _processor(rollout: int = 4) -> SimpleNamespace:
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
    return SimpleNamespace(eos_token_ids={2}, risk=SimpleNamespace(plan=SimpleNamespace(check_rollout=rollout),
                                                                   tokenizer=tokenizer))


def test_the_opening_starts_at_the_first_step_argmax_and_ends_at_eos(monkeypatch) -> None:
    import torch

    from ngsd.vllm.channel import CHANNEL
    from ngsd.vllm.processor import NGSDLogitsProcessor

    asked = []

    def look_ahead(prompt, first, steps):
        asked.append((list(prompt), first, steps))
        return [first, 7, 2, 9]

    monkeypatch.setattr(CHANNEL, "look_ahead", look_ahead)
    first_logits = torch.tensor([0.0, 1.0, 0.5, 3.0, -1.0])
    assert NGSDLogitsProcessor._expert_opening(_processor(), [5, 6], first_logits) == "3 7"
    assert asked == [([5, 6], 3, 4)]


def test_a_failing_look_ahead_keeps_the_request_guarded_and_the_engine_up(monkeypatch, caplog) -> None:
    """An exception in the processor ends every request of the engine; the look-ahead's fails closed instead:
    no opening, so the divergence alone decides and the request stays guarded."""
    import torch

    from ngsd.vllm.channel import CHANNEL
    from ngsd.vllm.processor import NGSDLogitsProcessor

    def look_ahead(prompt, first, steps):
        raise IndexError("index out of range in self")

    monkeypatch.setattr(CHANNEL, "look_ahead", look_ahead)
    assert NGSDLogitsProcessor._expert_opening(_processor(), [5, 6], torch.zeros(5)) is None
    assert "look-ahead failed" in caplog.text
