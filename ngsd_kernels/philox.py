"""Counter-based random numbers (Philox4x32-10) in plain PyTorch.

The Triton kernels draw with the same generator, keyed and counted the same way, so a
(seed, row, offset) triple names one set of uniforms on every backend:

    key     = (seed & 0xFFFFFFFF, seed >> 32)          the 64-bit seed (one for the batch, or one per row)
    counter = (token_id >> 2, offset & 0xFFFFFFFF, offset >> 32, row)
    u       = ((x >> 9) + 0.5) * 2**-23                x = output word (token_id & 3) of that call

One Philox call serves four neighbouring tokens (all four output words are used: a quarter of the
rounds of one call per token; the streams changed with this, 2026-12). The row index sits in the
counter, the seed in the key: distinct (seed, row) pairs never share a stream (with `seed + row`
as the key, seed 5 row 1 and seed 6 row 0 drew the same numbers).
`u` lies strictly inside (0, 1) and is exact in fp32 (at most 24 significant bits), so both
backends produce bit-identical uniforms.
"""

from __future__ import annotations

import torch

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def _umulhi(a: int, b: torch.Tensor) -> torch.Tensor:
    # int64 products of two uint32 values wrap like uint64; masking recovers the high word.
    return ((b * a) >> 32) & _MASK32


def philox4x32(
    key0: torch.Tensor, key1: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with 10 rounds on int64 tensors holding uint32 values (broadcasting)."""
    k0, k1 = key0 & _MASK32, key1 & _MASK32
    for _ in range(PHILOX_ROUNDS):
        prev_c0, prev_c2 = c0, c2
        c0 = _umulhi(PHILOX_ROUND_B, prev_c2) ^ c1 ^ k0
        c2 = _umulhi(PHILOX_ROUND_A, prev_c0) ^ c3 ^ k1
        c1 = (prev_c2 * PHILOX_ROUND_B) & _MASK32
        c3 = (prev_c0 * PHILOX_ROUND_A) & _MASK32
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_uniform(
    seed: torch.Tensor, offset: torch.Tensor, vocab_size: int, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Uniforms in (0, 1), shape [R, vocab_size] (int64 inputs, 1 or R values each).

    `rows` are the rows' indices in their batch (the counter's last word; default 0..R-1 with R the
    largest of the inputs' lengths).
    """
    seed = seed.to(torch.int64).reshape(-1, 1)
    offset = offset.to(torch.int64).reshape(-1, 1)
    if rows is None:
        rows = torch.arange(max(seed.shape[0], offset.shape[0]), dtype=torch.int64, device=seed.device)
    rows = rows.to(torch.int64).reshape(-1, 1)
    groups = torch.arange((vocab_size + 3) // 4, dtype=torch.int64, device=seed.device).reshape(1, -1)
    words = philox4x32(
        seed & _MASK32, (seed >> 32) & _MASK32, groups, offset & _MASK32, (offset >> 32) & _MASK32, rows & _MASK32
    )
    x = torch.stack(torch.broadcast_tensors(*words), dim=-1)  # [R, groups, 4]: token 4g + w is word w
    x = x.reshape(x.shape[0], x.shape[1] * 4)[:, :vocab_size]  # (not -1: 0 rows leave it undetermined)
    return ((x >> 9).to(torch.float32) + 0.5) * (2.0**-23)
