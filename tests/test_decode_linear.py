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


def test_only_inside_decoding_and_only_in_the_calling_thread(monkeypatch):
    calls = _calls_of_skinny(monkeypatch)
    layer = nn.Linear(4, 8)
    decode_linear.attach(layer)
    decode_linear.attach(layer)  # idempotent
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


def test_detach_restores_the_layers_own_forward(monkeypatch):
    calls = _calls_of_skinny(monkeypatch)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    decode_linear.attach(model)
    assert all("forward" in vars(m) for m in model if isinstance(m, nn.Linear))
    decode_linear.detach(model)
    assert not any("forward" in vars(m) for m in model)
    with torch.no_grad(), decode_linear.decoding():
        model(torch.randn(2, 4))
    assert calls == []


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

    fast = run()
    monkeypatch.setattr(decode_linear, "skinny_applies", lambda x, w: False)
    slow = run()
    assert torch.equal(fast.sequences, slow.sequences)
    assert [t.spikes for t in fast.traces] == [t.spikes for t in slow.traces]
    assert any(any(t.spikes) for t in fast.traces)
