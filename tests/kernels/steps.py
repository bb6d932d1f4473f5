"""What the kernel tests ask of two step results: the same tokens and spikes, D and v within fp32 rounding."""

from __future__ import annotations

import torch


def assert_same_step(got, want, atol: float = 1e-6) -> None:
    tokens, new_v, spike, div = got
    r_tokens, r_new_v, r_spike, r_div = want
    assert tokens.dtype == torch.int64 and spike.dtype == torch.bool
    assert new_v.dtype == torch.float32 and div.dtype == torch.float32
    assert torch.equal(spike, r_spike), (spike, r_spike)
    assert torch.equal(tokens, r_tokens), (tokens, r_tokens)
    torch.testing.assert_close(div, r_div, rtol=1e-5, atol=atol, equal_nan=True)
    torch.testing.assert_close(new_v, r_new_v, rtol=1e-5, atol=atol, equal_nan=True)
