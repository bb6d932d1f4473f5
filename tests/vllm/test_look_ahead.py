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


def test_the_opening_starts_at_the_first_step_argmax_and_ends_at_eos(monkeypatch) -> None:
    import torch

    asked = []

    def look_ahead(prompts, first_logits, steps, rows):
        asked.append(([list(p) for p in prompts], first_logits.argmax(-1).tolist(), steps, rows))
        return [[first, 7, 2, 9] for first in first_logits.argmax(-1).tolist()]

    decider = _Decider([_state([5, 6])], rollout=4, first_logits=torch.tensor([[0.0, 1.0, 0.5, 3.0, -1.0]]))
    _run_decide(decider, monkeypatch, look_ahead, decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))
    assert decider.openings == ["3 7"]
    assert asked == [([[5, 6]], [3], 4, [0])]


def test_a_failing_look_ahead_keeps_the_request_guarded_and_the_engine_up(monkeypatch, caplog) -> None:
    """An exception in the processor ends every request of the engine; the look-ahead's fails closed instead:
    no opening, so the divergence alone decides and the request stays guarded."""
    def look_ahead(prompts, first_logits, steps, rows):
        raise IndexError("index out of range in self")

    decider = _Decider([_state([5, 6]), _state([7, 8, 9])])
    _run_decide(decider, monkeypatch, look_ahead)
    assert decider.openings == [None, None]
    assert "look-ahead failed for 2 request(s) of 2/3 prompt tokens" in caplog.text


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

    def __init__(self, states, divergence: float = 0.6, rollout: int = 8, first_logits=None) -> None:
        import torch

        from ngsd.vllm.channel import ExpertRows
        from ngsd.vllm.risk import ProbeTokens

        n = len(states)
        self.book = SimpleNamespace(awaiting=lambda batch_size: list(enumerate(states)))
        self.probe = ProbeTokens(logits=torch.zeros(n), positions=torch.tensor([len(s.prompt) - 1 for s in states]),
                                 starts=torch.arange(n + 1))
        self.expert = ExpertRows(torch.zeros(n, 5) if first_logits is None else first_logits,
                                 divergence={i: divergence for i in range(n)})
        self.risk = SimpleNamespace(plan=SimpleNamespace(checked_alpha=0.9, check_rollout=rollout), tokenizer=None,
                                    first_verdict=lambda max_logit, prompt: None, checked=self._checked,
                                    record=lambda *args, **kwargs: None,
                                    wants_opening=lambda first, divergence: True)
        self.eos_token_ids = {2}
        self.openings: list[str | None] = []

    def _checked(self, first, divergence, opening=None):
        from ngsd.risk.estimate import ProbeVerdict

        self.openings.append(opening)
        guarded = opening is None or opening.startswith("I'm sorry")
        return ProbeVerdict(risk=1.0, alpha=0.9 if guarded else 0.0, routed=not guarded, route_below=4.5)


def _run_decide(decider: _Decider, monkeypatch, look_ahead, decode=None) -> None:
    from ngsd.vllm.channel import CHANNEL
    from ngsd.vllm.processor import NGSDLogitsProcessor

    monkeypatch.setattr(CHANNEL, "look_ahead", look_ahead)
    monkeypatch.setattr(CHANNEL, "_probe", decider.probe)
    decider.risk.tokenizer = SimpleNamespace(decode=decode or (lambda ids, skip_special_tokens: "Sure, here"))
    for name in ("_expert_openings", "_opening_text"):
        setattr(decider, name, getattr(NGSDLogitsProcessor, name).__get__(decider))
    NGSDLogitsProcessor._decide(decider, decider.expert, len(decider.openings) or 8)


def _state(prompt, alpha=0.9, at_least=False):
    from ngsd.vllm.gate_book import GateState
    from ngsd.vllm.settings import RequestPolicy

    return GateState(policy=RequestPolicy(guarded=True, alpha=alpha, at_least=at_least), potential=0.0,
                     prompt=prompt, awaiting=True)


def test_the_children_of_one_prompt_share_one_opening(monkeypatch) -> None:
    """n > 1: each child decoded the same opening again, each blocking the engine's step (~0.5 s here)."""
    calls = []

    def look_ahead(prompts, first_logits, steps, rows):
        calls.append(([list(p) for p in prompts], rows))
        return [[first, 3] for first in first_logits.argmax(-1).tolist()]

    decider = _Decider([_state([5, 6, 7]), _state([5, 6, 7]), _state([5, 6, 7]), _state([8, 9])])
    _run_decide(decider, monkeypatch, look_ahead)
    assert calls == [([[5, 6, 7], [8, 9]], [0, 3])]  # one look-ahead for the step, one opening per prompt
    assert decider.openings == ["Sure, here"] * 4


def test_a_request_that_asked_for_the_guard_skips_the_opening_it_cannot_use(monkeypatch) -> None:
    """At least alpha 0.9 asked (ngsd_guard=True, or its own ngsd_alpha): guarded at 0.9 whatever the opening says,
    so no look-ahead blocks the step for it; one asking for less still gets it (the probe may raise its alpha)."""
    calls = []

    def look_ahead(prompts, first_logits, steps, rows):
        calls.append([list(p) for p in prompts])
        return [[first] for first in first_logits.argmax(-1).tolist()]

    decider = _Decider([_state([5, 6], alpha=0.9, at_least=True), _state([7, 8], alpha=0.5, at_least=True)])
    _run_decide(decider, monkeypatch, look_ahead)
    assert calls == [[[7, 8]]]
    assert decider.openings == [None, "Sure, here"]


def test_a_step_without_a_diverging_request_runs_no_look_ahead(monkeypatch) -> None:
    """Only requests whose divergence would keep them guarded need an opening (`EngineRisk.wants_opening`)."""
    calls = []
    decider = _Decider([_state([5, 6]), _state([7, 8])])
    decider.risk.wants_opening = lambda first, divergence: False
    _run_decide(decider, monkeypatch, lambda prompts, first_logits, steps, rows: calls.append(prompts) or [])
    assert calls == [] and decider.openings == [None, None]


def test_a_prompt_is_read_from_the_cpu_backends_paged_blocks_in_its_layout() -> None:
    """vLLM's CPU kernels (isa "vec") keep per block and head the keys transposed, then the values: a read in the
    values' layout gave other keys (the look-ahead's check caught it: total variation 0.99 from the engine's)."""
    import torch

    from ngsd.vllm.look_ahead import PagedPrompt

    blocks, heads, size, head = 5, 3, 4, 2
    keys, values = torch.randn(heads, 10, head), torch.randn(heads, 10, head)
    cache = torch.zeros(blocks, heads, size, 2 * head)
    table = torch.tensor([3, 0, 4])  # the request's tokens 0-3 in block 3, 4-7 in block 0, 8-9 in block 4
    region = cache.view(blocks, heads, 2 * size, head)
    for token in range(10):
        block, slot = int(table[token // size]), token % size
        region[block, :, :size].reshape(heads, head, size)[:, :, slot] = keys[:, token]  # a view: writes the cache
        region[block, :, size + slot] = values[:, token]
    layer = SimpleNamespace(kv_cache=cache, isa="vec", kv_cache_dtype="auto",
                            attn_backend=SimpleNamespace(get_name=lambda: "CPU_ATTN"))
    reader = PagedPrompt.for_layer(SimpleNamespace(attn=layer))
    k, v = reader.read(torch.tensor([3, 0, 4, 1]), 9)
    assert torch.equal(k, keys[:, :9]) and torch.equal(v, values[:, :9])
    unknown_backend = SimpleNamespace(get_name=lambda: "X")
    for other in (dict(isa="amx"), dict(kv_cache_dtype="fp8"), dict(attn_backend=unknown_backend)):
        assert PagedPrompt.for_layer(SimpleNamespace(attn=SimpleNamespace(**{**vars(layer), **other}))) is None
