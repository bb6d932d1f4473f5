import threading

import torch
from torch import nn

from ngsd.decoding import decode_linear


def _calls_of_skinny(monkeypatch):
    calls = []
    real = decode_linear.skinny_linear

    def counting(x, weight, bias=None):
        calls.append(x.shape)
        return real(x, weight, bias)

    monkeypatch.setattr(decode_linear, "skinny_linear", counting)
    return calls


def _patched_layers(model: nn.Module) -> list[str]:
    """Names of modules that carry an instance `forward` or forward hooks (the model was changed)."""
    return [name for name, m in model.named_modules() if "forward" in vars(m) or m._forward_hooks]


def test_only_inside_decoding_and_only_in_the_calling_thread(monkeypatch):
    calls = _calls_of_skinny(monkeypatch)
    layer = nn.Linear(4, 8)
    held = decode_linear.attach(layer)
    x = torch.randn(2, 4)
    with torch.no_grad():
        plain = layer(x)
        assert calls == []
        other_thread = []
        with decode_linear.decoding():
            fast = layer(x)
            worker = threading.Thread(target=lambda: other_thread.append(layer(x)))
            worker.start()
            worker.join()
    assert len(calls) == 1  # the other thread's call took the layer's own forward
    torch.testing.assert_close(fast, plain)
    torch.testing.assert_close(other_thread[0], plain)
    decode_linear.detach(held)
    assert _patched_layers(layer) == []


def test_attachments_are_counted_and_the_last_holder_restores(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    first, second = decode_linear.attach(model, rows=2), decode_linear.attach(model, rows=2)
    assert len(first) == len(second) == 2
    decode_linear.detach(first)
    assert all(decode_linear.is_attached(m) for m in first)  # the second holder still uses them
    decode_linear.detach(second)
    assert _patched_layers(model) == []
    decode_linear.attach(model)
    decode_linear.detach(model)  # a whole model: restored at once
    assert _patched_layers(model) == []


def test_only_fp32_cpu_layers_and_skinny_row_counts_are_attached():
    assert decode_linear.attach(nn.Linear(4, 8).to(torch.bfloat16), rows=2) == []
    assert decode_linear.attach(nn.Linear(4, 8), rows=1) == []  # one row: F.linear is as fast
    assert decode_linear.attach(nn.Linear(4, 8), rows=decode_linear.SKINNY_MAX_ROWS + 1) == []
    layer = nn.Linear(4, 8)
    decode_linear.detach(decode_linear.attach(layer, rows=decode_linear.SKINNY_MAX_ROWS))
    assert _patched_layers(layer) == []


def test_guarded_generation_is_unchanged_by_the_skinny_form(tmp_path, monkeypatch):
    """Same greedy tokens and spikes with the decode-time linear form switched off."""
    from .conftest import tiny_lora_expert, tiny_model
    from ngsd.decoding.loop import guarded_generate

    model = tiny_model("llama")
    expert = tiny_lora_expert(model, tmp_path / "lora")
    ids = torch.tensor([[0, 0, 5, 9, 14], [7, 3, 22, 41, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])

    def run():
        return guarded_generate(model, ids, mask, expert=str(expert), alpha=0.9, max_new_tokens=12)

    calls = _calls_of_skinny(monkeypatch)
    fast = run()
    step_rows = [shape for shape in calls if shape[:2] == (4, 1)]  # 2 prompts x (base, expert), one token
    assert step_rows, "the guarded CPU fp32 decode steps did not take the skinny form"
    monkeypatch.setattr(decode_linear, "skinny_applies", lambda x, w: False)
    slow = run()
    assert torch.equal(fast.sequences, slow.sequences)
    assert [t.spikes for t in fast.traces] == [t.spikes for t in slow.traces]
    assert any(any(t.spikes) for t in fast.traces)


def test_a_guarded_call_leaves_the_model_as_it_found_it(tmp_path):
    import ngsd
    from .conftest import tiny_lora_expert, tiny_model

    model = tiny_model("llama")
    expert = tiny_lora_expert(model, tmp_path / "lora")
    ids = torch.tensor([[0, 0, 5, 9, 14], [7, 3, 22, 41, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    adapter = ngsd.LoraAdapter.load(expert)
    for expert_like in (str(expert), adapter):
        ngsd.guarded_generate(model, ids, mask, expert=expert_like, alpha=0.9, max_new_tokens=4)
        assert _patched_layers(model) == []
    # also when the call fails half-way through decoding (here: a stopping criterion that raises)
    try:
        ngsd.guarded_generate(model, ids, mask, expert=adapter, alpha=0.9, max_new_tokens=4,
                              stopping_criteria=lambda seq, scores: 1 / 0)
    except ZeroDivisionError:
        pass
    assert _patched_layers(model) == []


def test_a_bf16_model_is_never_patched(tmp_path, monkeypatch):
    import ngsd
    from .conftest import tiny_lora_expert, tiny_model

    model = tiny_model("llama")
    expert = tiny_lora_expert(model, tmp_path / "lora")
    model = model.to(torch.bfloat16)
    installed = []
    real = decode_linear._decode_forward
    monkeypatch.setattr(decode_linear, "_decode_forward", lambda m, f: installed.append(m) or real(m, f))
    ids = torch.tensor([[0, 0, 5, 9, 14], [7, 3, 22, 41, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ngsd.guarded_generate(model, ids, mask, expert=str(expert), alpha=0.9, max_new_tokens=4)
    assert installed == []
    assert _patched_layers(model) == []
