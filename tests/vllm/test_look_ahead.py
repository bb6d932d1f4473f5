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
    from ngsd.vllm.processor import NGSDLogitsProcessor

    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
    fake = SimpleNamespace(eos_token_ids={2}, risk=SimpleNamespace(plan=SimpleNamespace(check_rollout=rollout),
                                                                   tokenizer=tokenizer))
    fake._decode_opening = NGSDLogitsProcessor._decode_opening.__get__(fake)
    return fake


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
    assert NGSDLogitsProcessor._expert_opening(_processor(), [5, 6], first_logits, {}) == "3 7"
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
    assert NGSDLogitsProcessor._expert_opening(_processor(), [5, 6], torch.zeros(5), {}) is None
    assert "look-ahead failed" in caplog.text


def test_the_end_of_an_opening_is_read_where_the_library_reads_it() -> None:
    """The library cuts an opening at the tokenizer's eos and the generation config's (`ngsd.loading.eos_token_ids`);
    the engine read config.json's, so a model whose end-of-turn token only generation_config.json lists got longer
    openings, other routes (a helper's engine run: 5 of 6 band requests guarded that the library routed)."""
    from ngsd.vllm.processor import _generation_eos_ids

    model_config = SimpleNamespace(try_get_generation_config=lambda: {"eos_token_id": [2, 5248]},
                                   hf_config=SimpleNamespace(eos_token_id=2))
    assert _generation_eos_ids(SimpleNamespace(model_config=model_config)) == [2, 5248]


class _Decider:
    """What `NGSDLogitsProcessor._decide` reads: the book's undecided requests, the probe's scores, the risk rules."""

    def __init__(self, states, divergence: float = 0.6) -> None:
        import torch

        from ngsd.vllm.channel import ExpertRows
        from ngsd.vllm.risk import ProbeTokens

        n = len(states)
        self.book = SimpleNamespace(awaiting=lambda batch_size: list(enumerate(states)))
        self.probe = ProbeTokens(logits=torch.zeros(n), positions=torch.tensor([len(s.prompt) - 1 for s in states]),
                                 starts=torch.arange(n + 1))
        self.expert = ExpertRows(torch.zeros(n, 5), divergence={i: divergence for i in range(n)})
        self.risk = SimpleNamespace(plan=SimpleNamespace(checked_alpha=0.9, check_rollout=8), tokenizer=None,
                                    decide=self._decide, record=lambda *args, **kwargs: None)
        self.eos_token_ids = {2}
        self.openings: list[str | None] = []

    def _decide(self, max_logit, divergence, prompt, opening=None):
        from ngsd.risk.estimate import ProbeVerdict

        text = opening() if opening is not None else None
        self.openings.append(text)
        guarded = text is None or text.startswith("I'm sorry")
        return ProbeVerdict(risk=1.0, alpha=0.9 if guarded else 0.0, routed=not guarded, route_below=4.5)


def _run_decide(decider: _Decider, monkeypatch, look_ahead) -> None:
    from ngsd.vllm.channel import CHANNEL
    from ngsd.vllm.processor import NGSDLogitsProcessor

    monkeypatch.setattr(CHANNEL, "look_ahead", look_ahead)
    monkeypatch.setattr(CHANNEL, "_probe", decider.probe)
    decider.risk.tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: "Sure, here")
    decider._expert_opening = NGSDLogitsProcessor._expert_opening.__get__(decider)
    decider._decode_opening = NGSDLogitsProcessor._decode_opening.__get__(decider)
    NGSDLogitsProcessor._decide(decider, decider.expert, len(decider.openings) or 8)


def _state(prompt, alpha=0.9, at_least=False):
    from ngsd.vllm.gate_book import GateState
    from ngsd.vllm.settings import RequestPolicy

    return GateState(policy=RequestPolicy(guarded=True, alpha=alpha, at_least=at_least), potential=0.0,
                     prompt=prompt, awaiting=True)


def test_the_children_of_one_prompt_share_one_opening(monkeypatch) -> None:
    """n > 1: each child decoded the same opening again, each blocking the engine's step (~0.5 s here)."""
    calls = []
    decider = _Decider([_state([5, 6, 7]), _state([5, 6, 7]), _state([5, 6, 7]), _state([8, 9])])
    _run_decide(decider, monkeypatch, lambda prompt, first, steps: calls.append(list(prompt)) or [first, 3])
    assert calls == [[5, 6, 7], [8, 9]]
    assert decider.openings == ["Sure, here"] * 4


def test_a_request_that_asked_for_the_guard_skips_the_opening_it_cannot_use(monkeypatch) -> None:
    """At least alpha 0.9 asked (ngsd_guard=True, or its own ngsd_alpha): guarded at 0.9 whatever the opening says,
    so no look-ahead blocks the step for it; one asking for less still gets it (the probe may raise its alpha)."""
    calls = []
    decider = _Decider([_state([5, 6], alpha=0.9, at_least=True), _state([7, 8], alpha=0.5, at_least=True)])
    _run_decide(decider, monkeypatch, lambda prompt, first, steps: calls.append(list(prompt)) or [first])
    assert calls == [[7, 8]]
    assert decider.openings == [None, "Sure, here"]
