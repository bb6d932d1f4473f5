"""The guarded decode step straight from the final hidden states (the logits are never stored).

``guarded_select_from_hidden`` is ``guarded_select`` with the LM head folded in: it takes the
final hidden states of the base and expert rows and the LM-head weight(s), computes the logits
tile by tile inside Triton kernels (``tl.dot``, fp32 accumulation) and runs the same selection as
``guarded_select_reference(h_b @ W_b.T + b_b, h_e @ W_e.T + b_e, ...)``; the two ``[B, V]``
logits tensors are never written to memory.

Launches (4, or 5 in intersection mode), none of which waits on the host:

1. ``_hs_pass1_kernel`` (grid: row blocks x vocabulary splits) computes each logits tile and
   folds it into the split's statistics (max, sum-exp, NaN/+inf and finite counts) and, when the
   gate can open, the split's top-K logit order keys;
2. ``fused_select._reduce_kernel`` (grid: rows) merges the splits: log-sum-exp, validity, union
   thresholds; [``fused_select._intersection_kernel``: SafeDecoding's grown intersection];
3. ``_hs_pass2_kernel`` (grid as in 1) computes the *same* logits tiles again: divergence partial
   sums and, for both gate outcomes, the split's arg-max (greedy / Gumbel-max sampling) or top-K
   keys of the scores (top-k / top-p sampling);
4. ``fused_select._finalize_kernel`` (grid: rows): divergence, LIF update, spike, token.

Only the logits producer (``_logit_tiles``) and the loops over a split's tiles are specific to
this file: every tile is handed to the helpers of ``select_tiles.py``, and the partials are laid
out exactly like ``fused_select``'s per-chunk scratch with one "chunk" per vocabulary split, so
the reduce / intersection / finalize kernels are shared with the logits path and the two paths
have one definition of every rule (ties, sets, sampling, invalid rows, overflow fallback).

FLOP / byte trade-off of computing the logits twice (w = bytes per weight element):

- shared head (LoRA / NeST experts): each pass reads W once for both models, 2 V H w in all;
  the logits path reads W twice too (one LM-head matmul per model) and on top writes and reads
  back both fp32 logits tensors (~24 B V bytes: 2 writes, 2 passes x 2 reads, x 4 bytes). Fewer
  bytes at every batch size; the price is twice the FLOPs (4 x 2B V H instead of 2 x 2B V H),
  which starts to matter once the LM-head product is compute-bound (2B rows x V x H at about
  2B FLOP per weight byte: B above ~150 on an H100 in bf16);
- both counts assume one row block (on GPU a block holds up to 64 rows, 128 stacked, so B <= 64):
  every further row block re-reads the weight, mostly from L2 because the row blocks of a split
  are launched next to each other;
- separate heads (a small expert model): 4 V H w here against 2 V H w + 24 B V, so this path
  moves fewer bytes only when B > H w / 12 (B > ~680 at H = 4096 in bf16). For such experts the
  logits path is the faster choice at decode batch sizes; this one still avoids the [B, V] buffers
  (1 GiB of fp32 logits per model at B = 512, V = 262144).

Exactness: both passes call ``_logit_tiles`` with the same constants, so they compute
bit-identical logits and pass-1 thresholds classify pass-2 tokens consistently. The modes that
keep a bounded top-K buffer (top-k / top-p sampling, intersection candidates) flag rows the buffer
cannot decide; those rows are recomputed with the PyTorch reference on their materialised logits
(one host read of the flags; ``exact_fallback=False`` skips it). Settings the logits kernels
reject (a k above their buffer cap, ``score_floor <= 0``) make ``backend="auto"`` use the
PyTorch path and ``backend="triton"`` raise.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..params import CandidateMode, Divergence, GateMode, check_step_params

try:  # Triton is optional: the PyTorch fallback below works without it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None
    HAVE_TRITON = False

BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FALLBACK_CHUNK = 8192  # vocabulary rows per matmul in the PyTorch fallback (bounds the fp32 weight copy)


# ---------------------------------------------------------------------------------------------
# PyTorch path
# ---------------------------------------------------------------------------------------------


def hidden_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits ``hidden @ weight.T + bias`` computed in fp32 (what the kernels compute), [B, V].

    The weight is upcast a chunk of vocabulary rows at a time, so a bf16 LM head never needs a
    full fp32 copy.
    """
    hidden32 = hidden.float()
    vocab = weight.shape[0]
    out = torch.empty((hidden.shape[0], vocab), dtype=torch.float32, device=hidden.device)
    for start in range(0, vocab, _FALLBACK_CHUNK):
        stop = min(vocab, start + _FALLBACK_CHUNK)
        torch.matmul(hidden32, weight[start:stop].float().T, out=out[:, start:stop])
    if bias is not None:
        out += bias.float()
    return out


def check_hidden_inputs(
    base_hidden: torch.Tensor,
    expert_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    expert_lm_head_weight: torch.Tensor | None,
    lm_head_bias: torch.Tensor | None,
    expert_lm_head_bias: torch.Tensor | None,
    potential: torch.Tensor,
    alpha: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> None:
    """Raise a ValueError naming the problem and the fix for malformed inputs."""
    if base_hidden.dim() != 2:
        raise ValueError(
            f"base_hidden must be [batch, hidden], got shape {tuple(base_hidden.shape)}; "
            "pass the last position's hidden state, e.g. outputs.hidden_states[-1][:, -1]"
        )
    if expert_hidden.dim() != 2 or expert_hidden.shape[0] != base_hidden.shape[0]:
        raise ValueError(
            f"expert_hidden must be [batch, hidden] with the base's batch size, got {tuple(expert_hidden.shape)} "
            f"for base_hidden {tuple(base_hidden.shape)}"
        )
    batch, hidden = base_hidden.shape
    expert_size = expert_hidden.shape[1]
    if expert_lm_head_weight is None and expert_size != hidden:
        raise ValueError(
            f"the expert's hidden size {expert_size} differs from the base's {hidden}, so it cannot share the "
            "base LM head; pass the expert's own head as expert_lm_head_weight"
        )
    weights = [("lm_head_weight", lm_head_weight, hidden)]
    if expert_lm_head_weight is not None:
        weights.append(("expert_lm_head_weight", expert_lm_head_weight, expert_size))
    for name, weight, size in weights:
        if weight.dim() != 2 or weight.shape[1] != size:
            raise ValueError(f"{name} must be [vocab, {size}] (nn.Linear layout), got {tuple(weight.shape)}")
    vocab = lm_head_weight.shape[0]
    if expert_lm_head_weight is not None and expert_lm_head_weight.shape[0] != vocab:
        raise ValueError(
            f"base and expert LM heads differ in vocabulary size: {vocab} vs {expert_lm_head_weight.shape[0]}; "
            "the expert must share the base model's vocabulary"
        )
    if vocab < 1 or hidden < 1 or expert_size < 1:
        raise ValueError(f"empty LM head: vocab {vocab}, hidden sizes {hidden} and {expert_size}")
    if vocab >= 2**31 - 1:
        raise ValueError(f"vocabularies of 2**31 - 1 tokens or more are not supported, got {vocab}")
    dtype = base_hidden.dtype
    for name, tensor in [("expert_hidden", expert_hidden)] + [(n, w) for n, w, _ in weights]:
        if tensor.dtype != dtype or dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"hidden states and LM-head weights must share one dtype among float32/float16/bfloat16; "
                f"base_hidden is {dtype}, {name} is {tensor.dtype} (cast one of them)"
            )
    for name, bias in (("lm_head_bias", lm_head_bias), ("expert_lm_head_bias", expert_lm_head_bias)):
        if bias is not None and (bias.shape != (vocab,) or bias.dtype not in _FLOAT_DTYPES):
            raise ValueError(f"{name} must be a float tensor of shape [{vocab}], got {bias.dtype} {tuple(bias.shape)}")
    for name, tensor, want in (
        ("potential", potential, torch.float32),
        ("alpha", alpha, torch.float32),
        ("seed", seed, torch.int64),
        ("offset", offset, torch.int64),
    ):
        if tensor.dtype != want:
            raise ValueError(f"{name} must be {want}, got {tensor.dtype}")
    if potential.shape != (batch,) or alpha.shape != (batch,):
        raise ValueError(
            f"potential and alpha must have shape [{batch}], got {tuple(potential.shape)} and {tuple(alpha.shape)}"
        )
    if seed.numel() not in (1, batch) or offset.numel() not in (1, batch):
        raise ValueError(f"seed and offset must hold 1 or {batch} values")
    tensors = [base_hidden, expert_hidden, lm_head_weight, potential, alpha, seed, offset]
    tensors += [t for t in (expert_lm_head_weight, lm_head_bias, expert_lm_head_bias) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def _torch_from_hidden(base_hidden, expert_hidden, weight_b, weight_e, bias_b, bias_e, potential, alpha, seed, offset,
                       logits_backend: str, **params):
    from ..select import guarded_select

    base_logits = hidden_logits(base_hidden, weight_b, bias_b)
    expert_logits = hidden_logits(expert_hidden, weight_e, bias_e)
    return guarded_select(
        base_logits, expert_logits, potential, alpha, seed, offset, backend=logits_backend, validate=False, **params
    )


# ---------------------------------------------------------------------------------------------
# Public entry
# ---------------------------------------------------------------------------------------------


def guarded_select_from_hidden(
    base_hidden: torch.Tensor,
    expert_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    potential: torch.Tensor,
    alpha: torch.Tensor,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    *,
    expert_lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    expert_lm_head_bias: torch.Tensor | None = None,
    tau: float = 8.0,
    v_th: float = 1.0,
    v_reset: float = 0.0,
    rho: float = 0.6,
    candidate_k: int = 64,
    candidate_mode: int = CandidateMode.UNION,
    min_candidates: int = 5,
    divergence: int = Divergence.TV,
    gate: int = GateMode.LIF,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    score_floor: float = 1e-8,
    backend: str = "auto",
    validate: bool = True,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The guarded decode step from final hidden states: ``guarded_select(h_b @ W.T + b, h_e @ W_e.T + b_e, ...)``.

    ``expert_lm_head_weight=None`` means the expert shares ``lm_head_weight`` (LoRA / NeST
    experts): the kernels then read each weight tile once for the base and the expert rows. An
    expert with its own head may have another hidden size (``expert_hidden`` [B, H_e], its head
    [V, H_e]); the vocabulary must be the same.
    ``expert_lm_head_bias=None`` means the expert uses ``lm_head_bias``. All other keywords are
    those of ``guarded_select``. ``backend="auto"`` runs the Triton kernels on CUDA tensors
    and the PyTorch path elsewhere; ``"triton"`` forces the kernels (on CPU only under
    ``TRITON_INTERPRET=1``); ``num_splits`` overrides how many programs share one row's vocabulary.

    Returns ``(tokens int64 [B], new_potential fp32 [B], spike bool [B], divergence fp32 [B])``.

    >>> import torch
    >>> from ngsd_kernels.ops.hidden_select import guarded_select_from_hidden
    >>> weight = torch.randn(50, 16)
    >>> hb, he = torch.randn(2, 16), torch.randn(2, 16)
    >>> tokens, v, spike, d = guarded_select_from_hidden(hb, he, weight, torch.zeros(2), torch.full((2,), 0.9))
    >>> tokens.shape, bool(((d >= 0) & (d <= 1)).all())
    (torch.Size([2]), True)
    """
    device = base_hidden.device
    if seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=device)
    if offset is None:
        offset = torch.zeros(1, dtype=torch.int64, device=device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if validate:
        check_hidden_inputs(base_hidden, expert_hidden, lm_head_weight, expert_lm_head_weight, lm_head_bias,
                            expert_lm_head_bias, potential, alpha, seed, offset)
        check_step_params(tau, v_th, rho, candidate_k, candidate_mode, min_candidates, divergence, gate,
                          temperature, top_k, top_p)
    params = dict(
        tau=float(tau), v_th=float(v_th), v_reset=float(v_reset), rho=float(rho), candidate_k=int(candidate_k),
        candidate_mode=int(candidate_mode), min_candidates=int(min_candidates), divergence=int(divergence),
        gate=int(gate), temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
        score_floor=float(score_floor),
    )
    weight_e = lm_head_weight if expert_lm_head_weight is None else expert_lm_head_weight
    bias_e = lm_head_bias if expert_lm_head_bias is None else expert_lm_head_bias
    use_triton = backend == "triton" or (backend == "auto" and device.type == "cuda")
    reason = None
    if use_triton:
        if not HAVE_TRITON:
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
        reason = unsupported_reason(base_hidden.shape[0], lm_head_weight.shape[0], **{
            key: params[key] for key in ("candidate_k", "candidate_mode", "min_candidates", "gate", "temperature",
                                         "top_k", "top_p", "score_floor")})
    if use_triton and reason is not None:
        if backend == "triton":
            raise ValueError(f"the fused hidden-state kernels do not support these settings: {reason}")
        use_triton = False
    if not use_triton:
        # On CUDA this still runs the fused *logits* kernel via guarded_select's own dispatch.
        return _torch_from_hidden(base_hidden, expert_hidden, lm_head_weight, weight_e, lm_head_bias, bias_e,
                                  potential, alpha, seed, offset, logits_backend="auto", **params)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            "the Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 before importing triton "
            "(tests only) or use backend='torch'"
        )
    return fused_select_from_hidden(
        base_hidden, expert_hidden, lm_head_weight, expert_lm_head_weight, lm_head_bias, bias_e, potential, alpha,
        seed, offset, num_splits=num_splits, **params,
    )


# ---------------------------------------------------------------------------------------------
# Launch plan (csrc_triton/ngsd_ext.cpp repeats it with the constants it was compiled with)
# ---------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def plan_hidden_select(
    batch: int,
    vocab: int,
    hidden: int,
    *,
    shared: bool,
    on_gpu: bool,
    candidate_k: int,
    candidate_mode: int,
    min_candidates: int,
    gate: int,
    temperature: float,
    top_k: int,
    top_p: float,
    num_splits: int | None = None,
    sm_count: int = 132,
) -> tuple[object, dict[str, int]]:
    """(SelectPlan for the shared per-row kernels, block sizes and grid of the hidden-state passes).

    The mode switches and the top-K buffer size come from ``fused_select.plan_select`` so that the
    shared reduce / intersection / finalize kernels see exactly what they expect; the vocabulary
    is then cut into ``num_splits`` splits instead of one chunk per tile, which keeps the scratch
    small (``[B, splits, K]`` keys instead of ``[B, V / BLOCK_V, K]``). Raises ValueError for
    settings the kernels do not support (k above the buffer cap).
    """
    from .fused_select import plan_select

    select = plan_select(
        batch, vocab, candidate_k=candidate_k, candidate_mode=candidate_mode, min_candidates=min_candidates,
        gate=gate, temperature=temperature, top_k=top_k, top_p=top_p,
    )
    # tl.dot needs >= 16 rows: a shared head stacks base and expert rows, 2 * block_b of them.
    # Every row block reads the whole weight once per pass, so large batches get large blocks
    # (up to 64 rows, 128 stacked) and smaller vocabulary tiles to bound the registers.
    block_b = 8 if shared else 16
    if on_gpu:
        block_b = max(block_b, min(_next_pow2(batch), 64))
    block_v = (128 if block_b <= 16 else 64) if on_gpu else 64
    block_v = max(block_v, select.buffer)  # tile_topk_keys needs K <= BLOCK_V
    block_h = 64 if on_gpu else 32
    n_tiles = triton.cdiv(vocab, block_v)
    row_blocks = triton.cdiv(batch, block_b)
    if num_splits is None:
        # enough programs to fill the GPU twice over; few under the interpreter (programs run in turn)
        target = 2 * sm_count if on_gpu else 2
        num_splits = triton.cdiv(target, row_blocks)
    num_splits = max(1, min(int(num_splits), n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, num_splits)
    num_splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty splits
    # the per-row kernels see one "chunk" per split: redo the plan fields that depend on the chunk count.
    # Merge groups of ~512 keys (plan_select allows 4096): the bitonic merge of a [rows, group * K]
    # tile is unrolled, and 4096 keys compile to a multi-megabyte cubin (csrc_triton/README.md).
    ncp = _next_pow2(num_splits)
    chunk_group = max(1, min(ncp, 512 // select.buffer))
    row_block = max(1, min(_next_pow2(batch), 1024 // (chunk_group * select.buffer)))
    select = dataclasses.replace(
        select, n_chunks=num_splits, ncp=ncp, chunk_group=chunk_group, row_block=row_block,
        inter_block=max(1, min(select.buffer, 4096 // (row_block * select.buffer))),
        block_b=block_b, block_v=block_v,
    )
    grid = dict(block_b=block_b, block_v=block_v, block_h=block_h, num_splits=num_splits,
                tiles_per_split=tiles_per_split, row_blocks=row_blocks)
    return select, grid


def unsupported_reason(batch: int, vocab: int, *, candidate_k: int, candidate_mode: int, min_candidates: int,
                       gate: int, temperature: float, top_k: int, top_p: float, score_floor: float) -> str | None:
    """Why the fused hidden-state kernels cannot run these settings, or None when they can."""
    if not score_floor > 0.0:
        return f"score_floor must be > 0 for the Triton kernels, got {score_floor}; use backend='torch'"
    try:
        from .fused_select import plan_select

        plan_select(max(batch, 1), max(vocab, 1), candidate_k=candidate_k, candidate_mode=candidate_mode,
                    min_candidates=min_candidates, gate=gate, temperature=temperature, top_k=top_k, top_p=top_p)
    except ValueError as err:
        return str(err)
    return None


# ---------------------------------------------------------------------------------------------
# Triton kernels (only the logits producer and the per-split accumulation are specific to this
# file; tiles are handed to the helpers of select_tiles.py and the partials are laid out exactly
# like fused_select's per-chunk scratch, with one "chunk" per vocabulary split)
# ---------------------------------------------------------------------------------------------

if HAVE_TRITON:
    from .select_tiles import (
        INDEX_NONE,
        KEY_NONE,
        VALUE_NONE,
        merge_topk_keys,
        philox_gumbel,
        tile_argmax,
        tile_choice_values,
        tile_divergence_terms,
        tile_log_probs,
        tile_stats,
        tile_topk_keys,
        tile_union_scores,
    )

    @triton.jit
    def _logit_tiles(
        hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr,
        row0, B, cols, col_mask, H, HE,
        s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
        SHARED: tl.constexpr, HAS_BIAS_B: tl.constexpr, HAS_BIAS_E: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """fp32 logits of rows row0..row0+BLOCK_B for vocabulary `cols`: (base, expert), each [BLOCK_B, BLOCK_V].

        With a shared LM head the base and expert hidden rows are stacked into one
        [2*BLOCK_B, BLOCK_H] operand, so every weight tile is loaded once for both models.
        Both passes call this with the same constants, so they compute bit-identical logits.
        """
        kk0 = tl.arange(0, BLOCK_H)
        cols64 = cols.to(tl.int64)
        if SHARED:
            r2 = tl.arange(0, 2 * BLOCK_B)
            is_b = r2 < BLOCK_B
            rows2 = row0 + tl.where(is_b, r2, r2 - BLOCK_B)
            rmask2 = rows2 < B
            rows2 = rows2.to(tl.int64)
            acc = tl.zeros((2 * BLOCK_B, BLOCK_V), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_H):
                kk = k0 + kk0
                kmask = kk < H
                w = tl.load(wb_ptr + cols64[None, :] * s_wb0 + kk[:, None] * s_wb1,
                            mask=col_mask[None, :] & kmask[:, None], other=0.0)
                xb = tl.load(hb_ptr + rows2[:, None] * s_hb0 + kk[None, :] * s_hb1,
                             mask=(is_b & rmask2)[:, None] & kmask[None, :], other=0.0)
                xe = tl.load(he_ptr + rows2[:, None] * s_he0 + kk[None, :] * s_he1,
                             mask=((~is_b) & rmask2)[:, None] & kmask[None, :], other=0.0)
                x = tl.where(is_b[:, None], xb, xe)
                if UPCAST:
                    x = x.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(x, w, acc, input_precision="ieee")
            halves = tl.permute(tl.reshape(acc, (2, BLOCK_B, BLOCK_V)), (1, 2, 0))
            lb, le = tl.split(halves)
        else:
            rows = row0 + tl.arange(0, BLOCK_B)
            rmask = rows < B
            rows = rows.to(tl.int64)
            lb = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
            le = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
            # separate heads may differ in hidden size (e.g. a 7B base with a 1B expert): H vs HE
            for k0 in range(0, tl.maximum(H, HE), BLOCK_H):
                kk = k0 + kk0
                kmask_b = kk < H
                kmask_e = kk < HE
                wb = tl.load(wb_ptr + cols64[None, :] * s_wb0 + kk[:, None] * s_wb1,
                             mask=col_mask[None, :] & kmask_b[:, None], other=0.0)
                we = tl.load(we_ptr + cols64[None, :] * s_we0 + kk[:, None] * s_we1,
                             mask=col_mask[None, :] & kmask_e[:, None], other=0.0)
                xb = tl.load(hb_ptr + rows[:, None] * s_hb0 + kk[None, :] * s_hb1,
                             mask=rmask[:, None] & kmask_b[None, :], other=0.0)
                xe = tl.load(he_ptr + rows[:, None] * s_he0 + kk[None, :] * s_he1,
                             mask=rmask[:, None] & kmask_e[None, :], other=0.0)
                if UPCAST:
                    wb = wb.to(tl.float32)
                    we = we.to(tl.float32)
                    xb = xb.to(tl.float32)
                    xe = xe.to(tl.float32)
                lb = tl.dot(xb, wb, lb, input_precision="ieee")
                le = tl.dot(xe, we, le, input_precision="ieee")
        if HAS_BIAS_B:
            lb += tl.load(biasb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS_E:
            le += tl.load(biase_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        return lb, le

    @triton.jit
    def _fold_stats(m, s, m_t, s_t):
        """Combine two (max, sum exp(x - max)) partials of the same rows."""
        m_new = tl.maximum(m, m_t)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_new = tl.where(m > float("-inf"), s * tl.exp(m - m_safe), 0.0) + tl.where(
            m_t > float("-inf"), s_t * tl.exp(m_t - m_safe), 0.0)
        return m_new, s_new

    @triton.jit
    def _fold_best(best, besti, tile_best, tile_besti):
        """Running arg-max over tiles in increasing token order: ties keep the earlier (lower) id."""
        take = (tile_best > best) | (besti == INDEX_NONE)
        return tl.where(take, tile_best, best), tl.where(take, tile_besti, besti)

    @triton.jit
    def _hs_pass1_kernel(
        hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr,
        stats_ptr, counts_ptr, keys_b_ptr, keys_e_ptr,
        B, V, H, HE,
        s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
        tiles_per_split, n_chunks,
        SHARED: tl.constexpr, HAS_BIAS_B: tl.constexpr, HAS_BIAS_E: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
        K: tl.constexpr, KEYS: tl.constexpr,
    ):
        """Pass 1 over one (row block, vocabulary split): what fused_select's pass 1 stores per chunk
        (stats [B, n_chunks, 4], counts [B, n_chunks, 4], top-K keys [B, n_chunks, K]), for the split.

        KEYS as in select_tiles.tile_topk_keys: 0 none (gate shut), 1 int32 value keys (union
        thresholds), 2 int64 order keys (intersection ranks)."""
        # row blocks of one split are neighbours in launch order: they share its weight tiles in L2
        row0 = tl.program_id(0) * BLOCK_B
        split = tl.program_id(1)
        rows = row0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        m_b = tl.full((BLOCK_B,), float("-inf"), tl.float32)
        m_e = tl.full((BLOCK_B,), float("-inf"), tl.float32)
        s_b = tl.zeros((BLOCK_B,), tl.float32)
        s_e = tl.zeros((BLOCK_B,), tl.float32)
        bad_b = tl.zeros((BLOCK_B,), tl.int32)
        bad_e = tl.zeros((BLOCK_B,), tl.int32)
        fin_b = tl.zeros((BLOCK_B,), tl.int32)
        fin_e = tl.zeros((BLOCK_B,), tl.int32)
        if KEYS == 1:
            top_b = tl.full((BLOCK_B, K), VALUE_NONE, tl.int32)
            top_e = tl.full((BLOCK_B, K), VALUE_NONE, tl.int32)
        else:
            top_b = tl.full((BLOCK_B, K), KEY_NONE, tl.int64)
            top_e = tl.full((BLOCK_B, K), KEY_NONE, tl.int64)
        for t in range(0, tiles_per_split):
            cols = (split * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            mask = row_mask[:, None] & col_mask[None, :]
            lb, le = _logit_tiles(hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr, row0, B, cols, col_mask, H, HE,
                                  s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
                                  SHARED, HAS_BIAS_B, HAS_BIAS_E, BLOCK_B, BLOCK_V, BLOCK_H, UPCAST)
            lb = tl.where(mask, lb, float("-inf"))
            le = tl.where(mask, le, float("-inf"))
            tm_b, ts_b, tbad_b, tfin_b = tile_stats(lb, mask)
            tm_e, ts_e, tbad_e, tfin_e = tile_stats(le, mask)
            m_b, s_b = _fold_stats(m_b, s_b, tm_b, ts_b)
            m_e, s_e = _fold_stats(m_e, s_e, tm_e, ts_e)
            bad_b += tbad_b
            bad_e += tbad_e
            fin_b += tfin_b
            fin_e += tfin_e
            if KEYS != 0:
                top_b = merge_topk_keys(top_b, tile_topk_keys(lb, cols, mask, K, KEYS), K)
                top_e = merge_topk_keys(top_e, tile_topk_keys(le, cols, mask, K, KEYS), K)
        slot = (rows.to(tl.int64) * n_chunks + split) * 4
        tl.store(stats_ptr + slot, m_b, mask=row_mask)
        tl.store(stats_ptr + slot + 1, s_b, mask=row_mask)
        tl.store(stats_ptr + slot + 2, m_e, mask=row_mask)
        tl.store(stats_ptr + slot + 3, s_e, mask=row_mask)
        tl.store(counts_ptr + slot, bad_b, mask=row_mask)
        tl.store(counts_ptr + slot + 1, fin_b, mask=row_mask)
        tl.store(counts_ptr + slot + 2, bad_e, mask=row_mask)
        tl.store(counts_ptr + slot + 3, fin_e, mask=row_mask)
        if KEYS != 0:
            kslot = tl.arange(0, K)
            base = (rows.to(tl.int64) * n_chunks + split) * K
            tl.store(keys_b_ptr + base[:, None] + kslot[None, :], top_b, mask=row_mask[:, None])
            tl.store(keys_e_ptr + base[:, None] + kslot[None, :], top_e, mask=row_mask[:, None])

    @triton.jit
    def _hs_pass2_kernel(
        hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr,
        rowinfo_ptr, alpha_ptr, seed_ptr, seed_stride, offset_ptr, offset_stride, temperature,
        div_ptr, best_ptr, besti_ptr, keys2_ptr, mass_ptr,
        B, V, H, HE,
        s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
        tiles_per_split, n_chunks,
        SHARED: tl.constexpr, HAS_BIAS_B: tl.constexpr, HAS_BIAS_E: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr,
        K: tl.constexpr, DIVERGENCE: tl.constexpr, SAMPLE: tl.constexpr,
        NEED_V0: tl.constexpr, NEED_V1: tl.constexpr,
    ):
        """Pass 2 over one (vocabulary split, row block): the same logits again -> what fused_select's
        pass 2 stores per chunk (div [B, n_chunks, 2]; best / besti [B, 2, n_chunks] or keys2
        [B, 2, n_chunks, K] and mass [B, 2, n_chunks] per gate outcome), for the split."""
        # row blocks of one split are neighbours in launch order: they share its weight tiles in L2
        row0 = tl.program_id(0) * BLOCK_B
        split = tl.program_id(1)
        rows = row0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        info = rows.to(tl.int64) * 8
        m_b = tl.load(rowinfo_ptr + info, mask=row_mask, other=0.0)
        ls_b = tl.load(rowinfo_ptr + info + 1, mask=row_mask, other=0.0)
        m_e = tl.load(rowinfo_ptr + info + 2, mask=row_mask, other=0.0)
        ls_e = tl.load(rowinfo_ptr + info + 3, mask=row_mask, other=0.0)
        thr_b = tl.load(rowinfo_ptr + info + 4, mask=row_mask, other=0.0)
        thr_e = tl.load(rowinfo_ptr + info + 5, mask=row_mask, other=0.0)
        alpha = tl.load(alpha_ptr + rows, mask=row_mask, other=0.0)
        seed = tl.load(seed_ptr + rows * seed_stride, mask=row_mask, other=0)
        offset = tl.load(offset_ptr + rows * offset_stride, mask=row_mask, other=0)
        first = tl.zeros((BLOCK_B,), tl.float32)
        second = tl.zeros((BLOCK_B,), tl.float32)
        best0 = tl.full((BLOCK_B,), float("-inf"), tl.float32)
        best1 = tl.full((BLOCK_B,), float("-inf"), tl.float32)
        besti0 = tl.full((BLOCK_B,), INDEX_NONE, tl.int32)
        besti1 = tl.full((BLOCK_B,), INDEX_NONE, tl.int32)
        top0 = tl.full((BLOCK_B, K), KEY_NONE, tl.int64)
        top1 = tl.full((BLOCK_B, K), KEY_NONE, tl.int64)
        mass0 = tl.zeros((BLOCK_B,), tl.float32)
        mass1 = tl.zeros((BLOCK_B,), tl.float32)
        for t in range(0, tiles_per_split):
            cols = (split * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            mask = row_mask[:, None] & col_mask[None, :]
            lb, le = _logit_tiles(hb_ptr, he_ptr, wb_ptr, we_ptr, biasb_ptr, biase_ptr, row0, B, cols, col_mask, H, HE,
                                  s_hb0, s_hb1, s_he0, s_he1, s_wb0, s_wb1, s_we0, s_we1,
                                  SHARED, HAS_BIAS_B, HAS_BIAS_E, BLOCK_B, BLOCK_V, BLOCK_H, UPCAST)
            lb = tl.where(mask, lb, float("-inf"))
            le = tl.where(mask, le, float("-inf"))
            log_pb, pb = tile_log_probs(lb, m_b, ls_b)
            log_pe, pe = tile_log_probs(le, m_e, ls_e)
            t_first, t_second = tile_divergence_terms(log_pb, pb, log_pe, pe, DIVERGENCE)
            first += t_first
            second += t_second
            if SAMPLE == 1:
                gumbel = philox_gumbel(cols[None, :] + tl.zeros_like(rows)[:, None], seed[:, None], offset[:, None])
            else:
                gumbel = 0.0
            if NEED_V0:
                if SAMPLE == 2:
                    q0 = tl.maximum(pb, 0.0)
                    mass0 += tl.sum(tl.where(mask, q0, 0.0), axis=1)
                    top0 = merge_topk_keys(top0, tile_topk_keys(q0, cols, mask, K), K)
                else:
                    tb, ti = tile_argmax(tile_choice_values(pb, gumbel, temperature, SAMPLE), cols, mask)
                    best0, besti0 = _fold_best(best0, besti0, tb, ti)
            if NEED_V1:
                mixed = tile_union_scores(lb, le, pb, pe, alpha, thr_b, thr_e)
                if SAMPLE == 2:
                    q1 = tl.maximum(mixed, 0.0)
                    mass1 += tl.sum(tl.where(mask, q1, 0.0), axis=1)
                    top1 = merge_topk_keys(top1, tile_topk_keys(q1, cols, mask, K), K)
                else:
                    tb, ti = tile_argmax(tile_choice_values(mixed, gumbel, temperature, SAMPLE), cols, mask)
                    best1, besti1 = _fold_best(best1, besti1, tb, ti)
        dslot = (rows.to(tl.int64) * n_chunks + split) * 2
        tl.store(div_ptr + dslot, first, mask=row_mask)
        tl.store(div_ptr + dslot + 1, second, mask=row_mask)
        oslot = rows.to(tl.int64) * 2 * n_chunks + split  # [row, outcome, chunk]
        kslot = tl.arange(0, K)
        if NEED_V0:
            if SAMPLE == 2:
                tl.store(mass_ptr + oslot, mass0, mask=row_mask)
                tl.store(keys2_ptr + (oslot * K)[:, None] + kslot[None, :], top0, mask=row_mask[:, None])
            else:
                tl.store(best_ptr + oslot, best0, mask=row_mask)
                tl.store(besti_ptr + oslot, besti0, mask=row_mask)
        if NEED_V1:
            oslot1 = oslot + n_chunks
            if SAMPLE == 2:
                tl.store(mass_ptr + oslot1, mass1, mask=row_mask)
                tl.store(keys2_ptr + (oslot1 * K)[:, None] + kslot[None, :], top1, mask=row_mask[:, None])
            else:
                tl.store(best_ptr + oslot1, best1, mask=row_mask)
                tl.store(besti_ptr + oslot1, besti1, mask=row_mask)


def fused_select_from_hidden(
    base_hidden: torch.Tensor,
    expert_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    expert_lm_head_weight: torch.Tensor | None,
    lm_head_bias: torch.Tensor | None,
    expert_lm_head_bias: torch.Tensor | None,
    potential: torch.Tensor,
    alpha: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    *,
    tau: float,
    v_th: float,
    v_reset: float,
    rho: float,
    candidate_k: int,
    candidate_mode: int,
    min_candidates: int,
    divergence: int,
    gate: int,
    temperature: float,
    top_k: int,
    top_p: float,
    score_floor: float,
    num_splits: int | None = None,
    exact_fallback: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernels (inputs already checked; ``expert_lm_head_weight=None`` = shared head).

    Launches: hidden pass 1, fused_select's reduce, [its intersection kernel], hidden pass 2, its
    finalize. ``exact_fallback=False`` skips the one host read of the overflow flags (CUDA-graph
    capture), leaving overflowing rows with the buffer's answer.
    """
    # _LAUNCH: the logits path's launch options (FP contraction off), so both paths round alike
    from .fused_select import _LAUNCH, _finalize_kernel, _intersection_kernel, _per_row, _reduce_kernel, _scratch

    batch, hidden = base_hidden.shape
    vocab = lm_head_weight.shape[0]
    device = base_hidden.device
    shared = expert_lm_head_weight is None
    weight_e = lm_head_weight if shared else expert_lm_head_weight
    on_gpu = device.type == "cuda"
    tokens = torch.full((batch,), -1, dtype=torch.int64, device=device)
    new_potential = potential.float().clone()
    spike = torch.zeros(batch, dtype=torch.bool, device=device)
    current = torch.full((batch,), float("nan"), dtype=torch.float32, device=device)
    if batch == 0:
        return tokens, new_potential, spike, current
    sms = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 0
    plan, grid_plan = plan_hidden_select(
        batch, vocab, hidden, shared=shared, on_gpu=on_gpu, candidate_k=candidate_k, candidate_mode=candidate_mode,
        min_candidates=min_candidates, gate=gate, temperature=temperature, top_k=top_k, top_p=top_p,
        num_splits=num_splits, sm_count=sms,
    )
    nc, k = grid_plan["num_splits"], plan.buffer
    i32 = torch.int32
    scratch = _scratch(plan, batch, nc, device)
    stats, counts, keys_b, keys_e, rowinfo = scratch.stats, scratch.counts, scratch.keys_b, scratch.keys_e, scratch.rowinfo
    top_b, top_e, choice, iover, div = scratch.top_b, scratch.top_e, scratch.choice, scratch.iover, scratch.div
    best, besti, keys2, mass, intersect = scratch.best, scratch.besti, scratch.keys2, scratch.mass, scratch.intersect
    over = torch.empty(batch, dtype=i32, device=device)
    spike_i8 = torch.empty(batch, dtype=torch.int8, device=device)
    pot = potential.contiguous()
    alp = alpha.contiguous()
    seed_v, seed_stride = _per_row(seed, batch)
    offset_v, offset_stride = _per_row(offset, batch)
    bias_b = lm_head_bias if lm_head_bias is not None else stats  # never read when absent
    bias_e = expert_lm_head_bias if expert_lm_head_bias is not None else stats
    strides = (*base_hidden.stride(), *expert_hidden.stride(), *lm_head_weight.stride(), *weight_e.stride())
    # fp16/bf16 dots run natively on GPU (exact products, fp32 accumulation); the interpreter's
    # low-precision arithmetic is wrong, so there everything is cast to fp32 after the load
    tile_consts = dict(
        SHARED=shared, HAS_BIAS_B=lm_head_bias is not None, HAS_BIAS_E=expert_lm_head_bias is not None,
        BLOCK_B=grid_plan["block_b"], BLOCK_V=grid_plan["block_v"], BLOCK_H=grid_plan["block_h"],
        UPCAST=(not on_gpu) or base_hidden.dtype == torch.float32, K=k,
    )
    grid = (grid_plan["row_blocks"], nc)
    tiles = grid_plan["tiles_per_split"]
    _hs_pass1_kernel[grid](
        base_hidden, expert_hidden, lm_head_weight, weight_e, bias_b, bias_e, stats, counts, keys_b, keys_e,
        batch, vocab, hidden, expert_hidden.shape[1], *strides, tiles, nc, KEYS=plan.key_kind, **tile_consts,
        **_LAUNCH,
    )
    grid_rows = (triton.cdiv(batch, plan.row_block),)
    _reduce_kernel[grid_rows](
        stats, counts, keys_b, keys_e, rowinfo, top_b, top_e, batch, nc, plan.kth,
        RB=plan.row_block, NCP=plan.ncp, K=k, CG=plan.chunk_group, NEED_KEYS=plan.need_keys, STORE_TOP=intersect,
        VALUE_KEYS=plan.key_kind == 1, **_LAUNCH,
    )
    temperature_arg = float(temperature) if temperature > 0 else 1.0
    if intersect:
        _intersection_kernel[grid_rows](
            top_b, top_e, rowinfo, alp, seed_v, seed_stride, offset_v, offset_stride, choice, iover,
            batch, vocab, plan.kth, plan.need, float(score_floor), temperature_arg, int(top_k), float(top_p),
            RB=plan.row_block, K=k, EB=plan.inter_block, SAMPLE=plan.sample, USE_TOPK=plan.use_topk,
            USE_TOPP=plan.use_topp, **_LAUNCH,
        )
    _hs_pass2_kernel[grid](
        base_hidden, expert_hidden, lm_head_weight, weight_e, bias_b, bias_e,
        rowinfo, alp, seed_v, seed_stride, offset_v, offset_stride, temperature_arg,
        div, best, besti, keys2, mass, batch, vocab, hidden, expert_hidden.shape[1], *strides, tiles, nc,
        DIVERGENCE=int(divergence), SAMPLE=plan.sample, NEED_V0=plan.need_v0, NEED_V1=plan.need_v1, **tile_consts,
        **_LAUNCH,
    )
    _finalize_kernel[grid_rows](
        rowinfo, div, best, besti, keys2, mass, choice, iover,
        pot, seed_v, seed_stride, offset_v, offset_stride,
        tokens, new_potential, spike_i8, current, over,
        batch, nc, vocab, 1.0 - 1.0 / float(tau), float(v_th), float(v_reset), float(rho), temperature_arg,
        int(top_k), float(top_p),
        RB=plan.row_block, NCP=plan.ncp, K=k, CG=plan.chunk_group, DIVERGENCE=int(divergence), GATE=int(gate),
        MODE=plan.mode, SAMPLE=plan.sample, USE_TOPK=plan.use_topk, USE_TOPP=plan.use_topp, NEED_V0=plan.need_v0,
        **_LAUNCH,
    )
    spike = spike_i8.bool()
    if plan.may_overflow and exact_fallback:
        rows = torch.nonzero(over).flatten()  # the one host synchronisation, buffer modes only
        if rows.numel() > 0:
            _redo_rows(rows, (tokens, new_potential, spike, current), base_hidden, expert_hidden, lm_head_weight,
                       weight_e, lm_head_bias, expert_lm_head_bias, potential, alpha, seed, offset,
                       dict(tau=tau, v_th=v_th, v_reset=v_reset, rho=rho, candidate_k=candidate_k,
                            candidate_mode=candidate_mode, min_candidates=min_candidates, divergence=divergence,
                            gate=gate, temperature=temperature, top_k=top_k, top_p=top_p, score_floor=score_floor))
    return tokens, new_potential, spike, current


def _redo_rows(rows, outputs, hb, he, wb, we, bias_b, bias_e, potential, alpha, seed, offset, params) -> None:
    """Overwrite `rows` of the outputs with the reference on those rows' materialised logits."""
    from ..reference import guarded_select_reference

    seed_rows = seed.reshape(-1)
    offset_rows = offset.reshape(-1)
    if seed_rows.numel() != 1:
        seed_rows = seed_rows[rows]
    if offset_rows.numel() != 1:
        offset_rows = offset_rows[rows]
    exact = guarded_select_reference(
        hidden_logits(hb[rows], wb, bias_b), hidden_logits(he[rows], we, bias_e), potential[rows], alpha[rows],
        seed_rows, offset_rows, **params,
    )
    for out, value in zip(outputs, exact):
        out[rows] = value
