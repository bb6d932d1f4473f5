#!/usr/bin/env python3
"""Ahead-of-time compilation of the ngsd step kernels into C launchers (Triton's AOT compiler).

For every chosen op variant and GPU architecture this runs ``triton.tools.compile`` on each
kernel of the variant (one cubin per kernel, embedded in a C file with load / launch functions)
and ``triton.tools.link`` on the result (a dispatcher that checks the specialisation hints), then
writes the glue the C++ extension calls:

    build/generated/
      sm80/<kernel>_<digest>_sm80.<hash>_<hints>.{c,h}   triton.tools.compile output (cubin inside)
      sm80/<kernel>_<digest>_sm80_link.{c,h}             triton.tools.link output
      sm80/<kernel>_<digest>_sm80.cubin                  the same cubin, extracted (for inspection)
      sm80/<kernel>_<digest>_sm80.aligned.cubin          its aligned twin (KernelSpec.aligned), if any
      sm90/...                                           same for sm_90
      ngsd_aot_ctx.h        the argument struct every launch reads (generated from CTX_FIELDS)
      ngsd_aot_glue.{c,h}   ngsd_aot_run_<variant>(ctx, arch, gate): all launches of one step, in order;
                            ngsd_aot_find(name): the compiled variants and their launch constants
      manifest.json         variants, kernels, constants, cubin sizes

No GPU is needed: the target is given explicitly (``cuda:<arch>:32``) and a stand-in driver
answers Triton's queries for "the current device". ptxas comes with the triton wheel.

Usage (from the repository root):

    python csrc_triton/build_aot.py                       # all variants, sm_80 and sm_90
    python csrc_triton/build_aot.py --arch 90 --variants hidden_greedy_tv_bf16
    python csrc_triton/build_aot.py --variants "logits_*_bf16_k64" --jobs 2   # fnmatch patterns, 2 processes
    python csrc_triton/build_aot.py --variants "logits_topk_tv_bf16_k64,logits_topp_tv_bf16_k256"  # top-k, top-p
    python csrc_triton/build_aot.py --list
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "build" / "generated"
DEFAULT_ARCHS = (80, 90)

# Fields of ngsd_aot_ctx (C type, meaning). Kernel arguments are read from the field of the same
# name (or its ALIASES entry); an argument that is neither here nor a compile-time constant stops
# the build, so a kernel signature change cannot silently feed a launcher garbage.
CTX_FIELDS: dict[str, tuple[str, str]] = {
    # inputs
    "hb_ptr": ("CUdeviceptr", "base hidden states [B, H]"),
    "he_ptr": ("CUdeviceptr", "expert hidden states [B, HE]"),
    "wb_ptr": ("CUdeviceptr", "LM-head weight [V, H]"),
    "we_ptr": ("CUdeviceptr", "expert LM-head weight (= wb_ptr when shared)"),
    "biasb_ptr": ("CUdeviceptr", "base LM-head bias [V] (unused unless compiled with a bias)"),
    "biase_ptr": ("CUdeviceptr", "expert LM-head bias [V]"),
    "lb_ptr": ("CUdeviceptr", "base logits [B, V]"),
    "le_ptr": ("CUdeviceptr", "expert logits [B, V]"),
    "potential_ptr": ("CUdeviceptr", "membrane potential fp32 [B]"),
    "alpha_ptr": ("CUdeviceptr", "mixing strength fp32 [B]"),
    "seed_ptr": ("CUdeviceptr", "Philox seed int64 [1 or B]"),
    "offset_ptr": ("CUdeviceptr", "Philox offset int64 [1 or B]"),
    # scratch (layouts: ngsd_kernels/ops/select_tiles.py)
    "stats_ptr": ("CUdeviceptr", "fp32 [B, n_chunks, 4]"),
    "counts_ptr": ("CUdeviceptr", "int32 [B, n_chunks, 4]"),
    "keys_b_ptr": ("CUdeviceptr", "int32 value keys [B, n_chunks, K] (union mode)"),
    "keys_e_ptr": ("CUdeviceptr", "int32 value keys [B, n_chunks, K] (union mode)"),
    "rowinfo_ptr": ("CUdeviceptr", "fp32 [B, 8]"),
    "top_b_ptr": ("CUdeviceptr", "int64 [B, K] (intersection mode)"),
    "top_e_ptr": ("CUdeviceptr", "int64 [B, K] (intersection mode)"),
    "choice_ptr": ("CUdeviceptr", "int32 [B] (intersection mode)"),
    "iover_ptr": ("CUdeviceptr", "int32 [B] (intersection mode)"),
    "div_ptr": ("CUdeviceptr", "fp32 [B, n_chunks, 2]"),
    "best_ptr": ("CUdeviceptr", "fp32 [B, 2, n_chunks]"),
    "besti_ptr": ("CUdeviceptr", "int32 [B, 2, n_chunks]"),
    "keys2_ptr": ("CUdeviceptr", "int64 [B, 2, n_chunks, K] (top-k / top-p sampling)"),
    "mass_ptr": ("CUdeviceptr", "fp32 [B, 2, n_chunks] (top-k / top-p sampling)"),
    # outputs
    "tokens_ptr": ("CUdeviceptr", "int64 [B]"),
    "new_potential_ptr": ("CUdeviceptr", "fp32 [B]"),
    "spike_ptr": ("CUdeviceptr", "int8 [B]"),
    "divergence_ptr": ("CUdeviceptr", "fp32 [B]"),
    "over_ptr": ("CUdeviceptr", "int32 [B] rows the buffers could not decide"),
    # sizes and strides (elements)
    "B": ("int32_t", "rows"),
    "V": ("int32_t", "vocabulary"),
    "H": ("int32_t", "base hidden size"),
    "HE": ("int32_t", "expert hidden size"),
    "s_hb0": ("int32_t", "row stride of hb"),
    "s_hb1": ("int32_t", "column stride of hb (compiled for 1)"),
    "s_he0": ("int32_t", "row stride of he"),
    "s_he1": ("int32_t", "column stride of he (compiled for 1)"),
    "s_wb0": ("int32_t", "row stride of wb"),
    "s_wb1": ("int32_t", "column stride of wb (compiled for 1)"),
    "s_we0": ("int32_t", "row stride of we"),
    "s_we1": ("int32_t", "column stride of we (compiled for 1)"),
    "stride_b": ("int32_t", "row stride of lb"),
    "stride_e": ("int32_t", "row stride of le"),
    "seed_stride": ("int32_t", "0 when one seed serves every row, else 1"),
    "offset_stride": ("int32_t", "0 when one offset serves every row, else 1"),
    "tiles_per_split": ("int32_t", "vocabulary tiles per split (hidden-state passes)"),
    "n_chunks": ("int32_t", "vocabulary chunks (logits) or splits (hidden states)"),
    "kth": ("int32_t", "candidate_k clipped to [1, V]"),
    "need": ("int32_t", "min_candidates clipped to [1, V]"),
    "top_k": ("int32_t", "sampling top-k (0: off)"),
    "outer_rounds": ("int32_t", "intersection fallback: halvings of (kth - 1, V] (intersection_fallback.py)"),
    "id_rounds": ("int32_t", "intersection fallback: radix rounds over the token ids (R = 2 bits each)"),
    # step parameters
    "decay": ("float", "1 - 1/tau"),
    "v_th": ("float", "firing threshold"),
    "v_reset": ("float", "reset potential"),
    "rho": ("float", "soft-reset factor"),
    "temperature": ("float", "sampling temperature (1 when greedy)"),
    "top_p": ("float", "sampling top-p"),
    "score_floor": ("float", "intersection-mode score floor"),
}
# per-row sampling pointers: compiled with ROW_T / ROW_K / ROW_P = 0 (one setting for the launch), so never read;
# top-p compiled with TEMPERED = 0: it reads q at T = 1 (the extension refuses top-p at another temperature)
ALIASES = {"n_rows": "B", "n_vocab": "V", "row_temperature_ptr": "alpha_ptr", "row_top_k_ptr": "alpha_ptr",
           "row_top_p_ptr": "alpha_ptr", "k_min": "kth"}
_C_TYPES = {"i32": "int32_t", "i64": "int64_t", "fp32": "float"}

# The per-row kernels (reduce, finalize) see at most NCP chunks; K is the top-K buffer size.
NCP = 128
K = 64  # the hidden-state variants' buffer (plan_hidden_select's largest, HIDDEN_MAX_BUFFER)
# hidden-state variants: chunks read per step of the reduce, rows per program of the per-row kernels
CG = 8
RB = 1
GATES = {0: "lif", 1: "open", 2: "closed"}
# logits variants: one per top-K buffer launcher.plan_select can pick (next power of two of candidate_k,
# at least 16, at most MAX_BUFFER); the plan's other constants for the compiled tile come from _logits_plan
BUFFERS = (16, 32, 64, 128, 256, 512, 1024)
LOGITS_BB, LOGITS_BV = 1, 4096
TILE_ELEMENTS = 4096  # launcher.TILE_ELEMENTS on a GPU


DIVERGENCES = {0: "tv", 1: "kl", 2: "js"}  # params.Divergence codes
# token choices: greedy, plain temperature sampling (Gumbel-max), and top-k / top-p sampling (plan.sample 2: the
# candidate keys of pass 2, the finalize's bisections and the exact fallback kernel); logits variants only
CHOICES = {0: "greedy", 1: "sample", 2: "topk", 3: "topp", 4: "topkp"}
SAMPLINGS = {0: (0, 0, 0), 1: (1, 0, 0), 2: (2, 1, 0), 3: (2, 0, 1), 4: (2, 1, 1)}  # choice -> (SAMPLE, top-k, top-p)
TOPP_MIN_BUFFER = 256  # launcher.plan_select's floor for top-p without top-k
INTERSECTION_MIN_BUFFER = 64  # launcher.plan_select's floor for the intersection mode (room to grow)
MODES = {0: "", 1: "_inter"}  # candidate mode -> variant name suffix (union, SafeDecoding's intersection)
RADIX_BITS = 2  # intersection_fallback.RADIX_BITS on a GPU (its BT = max(256, 4096 >> R))
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel specialisation: every argument is either a Triton type or a constant.

    ``aligned``: arguments (pointers to user tensors, their strides and the sizes that bound their
    contiguous loads) that an *aligned twin* of the kernel is compiled with a ``:16`` divisibility
    hint for: pointers 16-byte aligned, integers multiples of 16. Both specialisations share one
    launcher name; the dispatcher ``triton.tools.link`` writes checks the hints at run time
    (``(uintptr_t)arg % 16 == 0`` for every one) and launches the aligned cubin when they hold, else
    the generic one, so an unaligned input is never given to code that assumes alignment.
    """

    module: str
    name: str
    args: dict[str, str]  # argument -> "*bf16" / "i32" / "i32:1" ... or a constant "16"
    grid: str  # three C expressions over the runtime arguments
    num_warps: int = 4
    num_stages: int = 2
    aligned: tuple[str, ...] = ()

    @property
    def constants(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.args.items() if re.fullmatch(r"-?\d+", v)}

    def digest(self) -> str:
        fields = [self.module, self.name, self.args, self.grid, self.num_warps, self.num_stages]
        if self.aligned:
            fields.append(list(self.aligned))
        text = json.dumps(fields)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def out_name(self, arch: int) -> str:
        return f"ngsd{self.name}_{self.digest()}_sm{arch}"

    def aligned_args(self) -> dict[str, str]:
        """The aligned twin's argument types: the ``aligned`` arguments with a ``:16`` hint."""
        out = dict(self.args)
        for arg in self.aligned:
            base = out[arg].split(":")[0]
            if base not in ("i32",) and not base.startswith("*"):
                raise SystemExit(f"{self.name}: cannot give {arg} ({out[arg]}) a :16 hint")
            out[arg] = f"{base}:16"
        return out


@dataclass
class Variant:
    """One op configuration: per gate, the kernels of one decode step in launch order (the last one
    is the finalize)."""

    name: str
    op: str  # "hidden_select" or "logits_select"
    dtype: str
    steps: dict[int, list[KernelSpec]]  # gate -> launches
    constants: dict[str, int] = field(default_factory=dict)  # what the C++ side must use

    @property
    def specs(self) -> list[KernelSpec]:
        """Every distinct kernel of the variant."""
        out: dict[str, KernelSpec] = {}
        for seq in self.steps.values():
            for spec in seq:
                out.setdefault(spec.digest(), spec)
        return list(out.values())


def _reduce_spec(dense: int = 0, rb: int = RB, k: int = K, cg: int = CG, slots: int = 0, keys: int = 1,
                 kb: int = 1) -> KernelSpec:
    """The launcher's reduce; ``dense``: how pass 1 keyed the union candidates (select_tiles.dense_key:
    1 bf16 / 2 fp16 logits, 0 fp32 logits and the hidden-state passes); ``slots`` value slots per chunk
    (0: K, the hidden-state passes' sorted top-K); ``keys`` pass 1's key kind: 0 when the gate is shut (no
    candidates), 1 union value keys, 2 intersection (value, id) keys (the row's top-K lists stored, ``kb``
    keys a load)."""
    args = dict(
        stats_ptr="*fp32:16", counts_ptr="*i32:16", keys_b_ptr="*i64:16" if keys == 2 else "*i32:16",
        keys_e_ptr="*i64:16" if keys == 2 else "*i32:16",
        rowinfo_ptr="*fp32:16", top_b_ptr="*i64:16", top_e_ptr="*i64:16", n_rows="i32", n_chunks="i32",
        kth="i32", RB=str(rb), NCP=str(NCP), K=str(k), CG=str(cg), NEED_KEYS=str(int(keys != 0)),
        STORE_TOP=str(int(keys == 2)), VALUE_KEYS=str(int(keys == 1)), DENSE=str(dense), SLOTS=str(slots),
        KB=str(kb),
    )
    return KernelSpec("ngsd_kernels.ops.launcher", "_reduce_kernel", args, f"(n_rows + {rb - 1}) / {rb}, 1, 1")


def _finalize_spec(gate: int, divergence: int = 0, sample: int = 0, rb: int = RB, use_topk: int = 0,
                   use_topp: int = 0, slots: int = 1, sb: int = 1, mode: int = 0) -> KernelSpec:
    """The launcher's finalize for one gate, divergence and token choice (union mode; plain sampling
    reads the same per-chunk arg-max partials as greedy; top-k / top-p sampling (``sample`` 2) reads
    ``slots`` candidate keys per chunk and outcome, ``sb`` per load)."""
    args = dict(
        rowinfo_ptr="*fp32:16", div_ptr="*fp32:16", best_ptr="*fp32:16", besti_ptr="*i32:16",
        keys2_ptr="*i64:16", mass_ptr="*fp32:16", choice_ptr="*i32:16", iover_ptr="*i32:16",
        potential_ptr="*fp32", alpha_ptr="*fp32", seed_ptr="*i64", seed_stride="i32", offset_ptr="*i64",
        offset_stride="i32",
        tokens_ptr="*i64:16", new_potential_ptr="*fp32:16", spike_ptr="*i8:16", divergence_ptr="*fp32:16",
        over_ptr="*i32:16", n_rows="i32", n_chunks="i32", n_vocab="i32", decay="fp32", v_th="fp32",
        v_reset="fp32", rho="fp32", temperature="fp32", row_temperature_ptr="*fp32", top_k="i32", top_p="fp32",
        row_top_k_ptr="*i32", row_top_p_ptr="*fp32",
        RB=str(rb), NCP=str(NCP), DIVERGENCE=str(divergence), GATE=str(gate), MODE=str(mode), SAMPLE=str(sample),
        USE_TOPK=str(use_topk), USE_TOPP=str(use_topp), NEED_V0="1" if gate != 1 else "0", SLOTS=str(slots),
        SB=str(sb), ROW_T="0", ROW_K="0", ROW_P="0", TEMPERED="0",
    )
    return KernelSpec("ngsd_kernels.ops.launcher", "_finalize_kernel", args, f"(n_rows + {rb - 1}) / {rb}, 1, 1")


def variant_name(op: str, choice: int, divergence: int, dtype: str, buffer: int | None = None) -> str:
    name = f"{op.split('_')[0]}_{CHOICES[choice]}_{DIVERGENCES[divergence]}_{dtype}"
    return name if buffer is None else f"{name}_k{buffer}"


def _pass2_spec(module: str, name: str, tile: dict[str, str], grid: str, sample: int, divergence: int,
                aligned: tuple[str, ...], num_warps: int = 4) -> KernelSpec:
    # both gate outcomes' arg-max (NEED_V0 / NEED_V1): one pass 2 serves every gate (the JIT drops the
    # outcome a gate cannot have; the other one's partials are the same)
    args = dict(tile, rowinfo_ptr="*fp32:16", alpha_ptr="*fp32", seed_ptr="*i64", seed_stride="i32",
                offset_ptr="*i64", offset_stride="i32", temperature="fp32", row_temperature_ptr="*fp32",
                div_ptr="*fp32:16", best_ptr="*fp32:16", besti_ptr="*i32:16", keys2_ptr="*i64:16",
                mass_ptr="*fp32:16", DIVERGENCE=str(divergence), SAMPLE=str(sample), NEED_V0="1", NEED_V1="1",
                ROW_T="0")
    if name == "_pass2_kernel":  # the logits pass 2's top-p masses (TEMPERED: see ALIASES)
        args["TEMPERED"] = "0"
    return KernelSpec(module, name, args, grid, aligned=aligned, num_warps=num_warps)


def hidden_variant(dtype: str, sample: int = 0, divergence: int = 0) -> Variant:
    """Hidden states -> token, shared LM head without bias, union candidates, K = 64 (candidate_k <= 64;
    larger k: the C++ op computes the logits with one GEMM and runs a logits variant, as HiddenLaunch).

    Block sizes as hidden_select.plan_hidden_select picks them on a GPU for a shared head: greedy
    union steps 16 rows (32 stacked base + expert rows) x 64 columns (its choice for batches of
    9..16; one fixed choice for every batch size here), plain sampling 8 rows (pass 2 also draws the
    Gumbel noise: the largest tile that compiles without spilling).
    """
    block_b, block_v, block_h = (8 if sample else 16), 64, 64
    tile = dict(
        hb_ptr=f"*{dtype}", he_ptr=f"*{dtype}", wb_ptr=f"*{dtype}", we_ptr=f"*{dtype}", biasb_ptr="*fp32",
        biase_ptr="*fp32", B="i32", V="i32", H="i32", HE="i32", s_hb0="i32", s_hb1="i32:1", s_he0="i32",
        s_he1="i32:1", s_wb0="i32", s_wb1="i32:1", s_we0="i32", s_we1="i32:1", tiles_per_split="i32",
        n_chunks="i32", SHARED="1", HAS_BIAS_B="0", HAS_BIAS_E="0", BLOCK_B=str(block_b), BLOCK_V=str(block_v),
        BLOCK_H=str(block_h), UPCAST="1" if dtype == "fp32" else "0", K=str(K),
    )
    # the weight and hidden-state loads: [BLOCK_H] contiguous runs starting at multiples of the row strides
    aligned = ("hb_ptr", "he_ptr", "wb_ptr", "we_ptr", "H", "HE", "s_hb0", "s_he0", "s_wb0", "s_we0")
    grid = f"(B + {block_b - 1}) / {block_b}, n_chunks, 1"
    module = "ngsd_kernels.ops.hidden_select"
    # the hidden pass 1 keeps each split's sorted top-K: K slots per chunk (SLOTS 0 in the reduce); 8 warps
    # on 16-row tiles, as plan_hidden_select's pass1_warps
    pass1 = KernelSpec(module, "_hs_pass1_kernel", dict(tile, stats_ptr="*fp32:16", counts_ptr="*i32:16",
                                                         keys_b_ptr="*i32:16", keys_e_ptr="*i32:16", KEYS="1"),
                       grid, num_warps=8 if block_b >= 16 else 4, aligned=aligned)
    pass2 = _pass2_spec(module, "_hs_pass2_kernel", tile, grid, sample, divergence, aligned)
    steps = {g: [pass1, _reduce_spec(0), pass2, _finalize_spec(g, divergence, sample)] for g in GATES}
    return Variant(variant_name("hidden_select", sample, divergence, dtype), "hidden_select", dtype, steps,
                   dict(BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_H=block_h, K=K, SLOTS=K, NCP=NCP, RB=RB,
                        DIVERGENCE=divergence, SAMPLE=sample))


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _logits_plan(buffer: int, gate: int, choice: int = 0, mode: int = 0) -> dict[str, int]:
    """launcher.plan_select's constants for the compiled logits tile ([1, 4096], NCP = 128 chunks:
    plan_select(1, 524288, StepParams(candidate_k=buffer, gate=gate, ...)) on a GPU, top_k = buffer
    for the top-k choices); build() checks them against plan_select itself.

    A shut gate needs no candidates: the buffer then comes from top-k (its k), top-p alone (its floor,
    TOPP_MIN_BUFFER) or the plan's floor of 16; no keys. Top-k / top-p sampling: SAMPLE_SLOTS candidate
    keys per chunk and outcome, SB of them per load in the finalize. Intersection mode (``mode`` 1) with the
    gate able to open: (value, id) keys (KEYS 2), at least INTERSECTION_MIN_BUFFER entries, KB keys per
    reduce load, EB expert-list entries per step of the intersection kernel."""
    sample, use_topk, use_topp = SAMPLINGS[choice]
    keys = gate != 2
    inter = mode == 1 and keys
    floor = TOPP_MIN_BUFFER if use_topp and not use_topk else (INTERSECTION_MIN_BUFFER if inter else 16)
    k = max(buffer if keys or use_topk else 1, floor)
    cg = max(1, min(NCP, TILE_ELEMENTS // k))
    slots = min(2 * k, LOGITS_BV) if keys else k
    if inter:  # the reduce holds a row's int64 keys when they fit a tile (launcher.plan_select)
        rb = max(1, min(next_pow2(LOGITS_BB), TILE_ELEMENTS // (NCP * slots)))
    else:
        rb = max(1, min(next_pow2(LOGITS_BB), TILE_ELEMENTS // (cg * k)))
    sample_slots = min(2 * k, LOGITS_BV) if sample == 2 else 1
    sb = max(1, min(next_pow2(NCP * sample_slots), (TILE_ELEMENTS // 4) // rb)) if sample == 2 else 1
    return dict(K=k, CG=cg, RB=rb, SLOTS=slots, KEYS=2 if inter else int(keys), SAMPLE_SLOTS=sample_slots, SB=sb,
                KB=max(1, min(NCP * slots, TILE_ELEMENTS // rb)) if inter else 1,
                EB=max(1, min(k, TILE_ELEMENTS // (rb * k))))


def logits_variant(dtype: str, choice: int = 0, divergence: int = 0, buffer: int = 64, mode: int = 0) -> Variant:
    """Logits -> token (fused_select's kernels), union candidates, top-K buffer ``buffer``, token choice
    ``choice`` (CHOICES: top-k / top-p sampling adds ``_sample_fallback_kernel`` after the finalize, which
    decides on the GPU the rows whose candidates could not; its programs return at once for the others).
    ``mode`` 1: SafeDecoding's intersection candidates (pass 1's (value, id) keys, the reduce's top-K lists,
    the intersection kernel before pass 2, and after the finalize the intersection fallback kernel for
    spiked rows whose intersection outgrew the lists), as launcher.launch_select runs them.

    One chunk of BV = 4096 columns of one row per pass-1/pass-2 program, as launcher.plan_select
    picks on a GPU at every batch size; at most NCP chunks, i.e. V <= NCP * BV = 524288. The reduce /
    finalize constants (K, chunk group, rows per program, value slots per chunk) are the plan's for
    that tile (``_logits_plan``); with the
    gate shut pass 1 and the reduce skip the candidates, as in the plan.
    Pass 1 of the union step loads one element per instruction by design (``_load_tile``'s SCALAR
    layout for its scattered candidate stores), so only pass 2 gets an aligned twin (not in top-k /
    top-p sampling, whose pass 2 loads the same way).
    """
    bb, bv = LOGITS_BB, LOGITS_BV
    common = dict(lb_ptr=f"*{dtype}", le_ptr=f"*{dtype}", stride_b="i32", stride_e="i32", n_rows="i32",
                  n_vocab="i32", n_chunks="i32", BB=str(bb), BV=str(bv))
    grid = f"(n_rows + {bb - 1}) / {bb}, n_chunks, 1"
    module = "ngsd_kernels.ops.fused_select"
    dense = {"bf16": 1, "fp16": 2}.get(dtype, 0)
    sample, use_topk, use_topp = SAMPLINGS[choice]
    # pass 2 reads K only in top-k / top-p sampling: one specialisation (K = 64) serves every buffer otherwise
    # Jensen-Shannon's extra log tile needs 8 warps on a [1, 4096] tile (SelectPlan.pass2_warps)
    warps = 8 if divergence == 2 else 4
    steps = {}
    for gate in GATES:
        plan = _logits_plan(buffer, gate, choice, mode)
        key_type = "*i64:16" if plan["KEYS"] == 2 else "*i32:16"
        pass1 = KernelSpec(module, "_pass1_kernel", dict(
            common, K=str(plan["K"]), kth="i32", SLOTS=str(plan["SLOTS"]), FALLBACK="1", stats_ptr="*fp32:16",
            counts_ptr="*i32:16", keys_b_ptr=key_type, keys_e_ptr=key_type, KEYS=str(plan["KEYS"]), THREADS="128"),
            grid)
        reduce = _reduce_spec(dense, plan["RB"], plan["K"], plan["CG"], plan["SLOTS"], plan["KEYS"], plan["KB"])
        # top-k / top-p pass 2 loads one element per instruction, like pass 1 (_load_tile's SCALAR layout for
        # its candidates' compaction): no aligned twin
        pass2 = _pass2_spec(module, "_pass2_kernel",
                            dict(common, K=str(plan["K"] if sample == 2 else K), THREADS=str(32 * warps)), grid,
                            sample, divergence,
                            () if sample == 2 else ("lb_ptr", "le_ptr", "stride_b", "stride_e", "n_vocab"),
                            num_warps=warps)
        final = _finalize_spec(gate, divergence, sample, plan["RB"], use_topk, use_topp, plan["SAMPLE_SLOTS"],
                               plan["SB"], mode)
        inter = plan["KEYS"] == 2
        intersection = [_intersection_spec(plan["RB"], plan["K"], plan["EB"], sample, use_topk, use_topp)] if inter else []
        steps[gate] = [pass1, reduce, *intersection, pass2, final]
        if sample == 2:
            steps[gate].append(_sample_fallback_spec(dtype, use_topk, use_topp, mode))
        if inter:
            steps[gate].append(_intersection_fallback_spec(dtype, sample, use_topk, use_topp))
    plan = _logits_plan(buffer, 0, choice, mode)
    return Variant(variant_name("logits_select", choice, divergence, dtype, buffer) + MODES[mode], "logits_select",
                   dtype, steps,
                   dict(BB=bb, BV=bv, K=buffer, SLOTS=plan["SLOTS"], NCP=NCP, RB=plan["RB"], CG=plan["CG"],
                        DIVERGENCE=divergence, SAMPLE=sample, USE_TOPK=use_topk, USE_TOPP=use_topp,
                        SAMPLE_SLOTS=plan["SAMPLE_SLOTS"], MODE=mode))


def _intersection_spec(rb: int, k: int, eb: int, sample: int, use_topk: int, use_topp: int) -> KernelSpec:
    """launcher._intersection_kernel: per row the grown intersection of the two top-K lists and the token a
    spiking row gets; writes choice and iover (the rows whose intersection outgrew the lists)."""
    args = dict(
        top_b_ptr="*i64:16", top_e_ptr="*i64:16", rowinfo_ptr="*fp32:16", alpha_ptr="*fp32", seed_ptr="*i64",
        seed_stride="i32", offset_ptr="*i64", offset_stride="i32", choice_ptr="*i32:16", iover_ptr="*i32:16",
        n_rows="i32", n_vocab="i32", k_min="i32", need="i32", score_floor="fp32", temperature="fp32",
        row_temperature_ptr="*fp32", top_k="i32", top_p="fp32", row_top_k_ptr="*i32", row_top_p_ptr="*fp32",
        RB=str(rb), K=str(k), EB=str(eb), SAMPLE=str(sample), USE_TOPK=str(use_topk), USE_TOPP=str(use_topp),
        ROW_T="0", ROW_K="0", ROW_P="0", TEMPERED="0",
    )
    return KernelSpec("ngsd_kernels.ops.launcher", "_intersection_kernel", args, f"(n_rows + {rb - 1}) / {rb}, 1, 1")


def _intersection_fallback_spec(dtype: str, sample: int, use_topk: int, use_topp: int) -> KernelSpec:
    """intersection_fallback._intersection_fallback_kernel: one program per row; a spiked row whose grown
    intersection outgrew the top-K lists gets its exact token from its logits (BT and R as on a GPU)."""
    args = dict(
        lb_ptr=f"*{dtype}", le_ptr=f"*{dtype}", stride_b="i32", stride_e="i32", n_rows="i32", n_vocab="i32",
        rowinfo_ptr="*fp32:16", alpha_ptr="*fp32", spike_ptr="*i8:16", over_ptr="*i32:16", tokens_ptr="*i64:16",
        seed_ptr="*i64", seed_stride="i32", offset_ptr="*i64", offset_stride="i32", k_min="i32", need="i32",
        score_floor="fp32", temperature="fp32", row_temperature_ptr="*fp32", top_k="i32", top_p="fp32",
        outer_rounds="i32", id_rounds="i32", row_top_k_ptr="*i32", row_top_p_ptr="*fp32",
        BT=str(max(256, 4096 >> RADIX_BITS)), R=str(RADIX_BITS), SAMPLE=str(sample), USE_TOPK=str(use_topk),
        USE_TOPP=str(use_topp), ROW_T="0", ROW_K="0", ROW_P="0", TEMPERED="0",
    )
    return KernelSpec("ngsd_kernels.ops.intersection_fallback", "_intersection_fallback_kernel", args,
                      "n_rows, 1, 1")


def _sample_fallback_spec(dtype: str, use_topk: int, use_topp: int, mode: int = 0) -> KernelSpec:
    """fused_select._sample_fallback_kernel: one program per row; a row the finalize flagged gets its exact
    token from its logits (BT = 2048 columns a tile, the JIT's choice for vocabularies of 2048 and more)."""
    args = dict(
        lb_ptr=f"*{dtype}", le_ptr=f"*{dtype}", stride_b="i32", stride_e="i32", n_rows="i32", n_vocab="i32",
        rowinfo_ptr="*fp32:16", alpha_ptr="*fp32", spike_ptr="*i8:16", over_ptr="*i32:16", tokens_ptr="*i64:16",
        seed_ptr="*i64", seed_stride="i32", offset_ptr="*i64", offset_stride="i32", temperature="fp32",
        row_temperature_ptr="*fp32", top_k="i32", top_p="fp32", row_top_k_ptr="*i32", row_top_p_ptr="*fp32",
        BT="2048", MODE=str(mode), USE_TOPK=str(use_topk), USE_TOPP=str(use_topp), ROW_T="0", ROW_K="0", ROW_P="0",
        TEMPERED="0",
    )
    return KernelSpec("ngsd_kernels.ops.fused_select", "_sample_fallback_kernel", args, "n_rows, 1, 1")


def check_against_jit_plan(variant: Variant) -> None:
    """Stop the build when a logits variant's constants differ from launcher.plan_select's for the
    compiled tile (the JIT launch of the same shapes must run the same specialisations)."""
    if variant.op != "logits_select":
        return
    from ngsd_kernels.ops.launcher import plan_select
    from ngsd_kernels.params import StepParams

    from ngsd_kernels.ops.intersection_fallback import RADIX_BITS as JIT_RADIX_BITS

    c = variant.constants
    for gate, seq in variant.steps.items():
        topk, topp = c.get("USE_TOPK", 0), c.get("USE_TOPP", 0)
        params = StepParams(candidate_k=c["K"], gate=gate, divergence=c["DIVERGENCE"],
                            temperature=1.0 if c["SAMPLE"] else 0.0, top_k=c["K"] if topk else 0,
                            top_p=0.9 if topp else 1.0, candidate_mode=c.get("MODE", 0))
        # pass1_block_v=0: this build runs pass 1 and the reduce on pass 2's chunks (its launcher passes one
        # chunk count); the JIT widens pass 1 to 8192 columns for buffers of 1024 (SelectPlan.pass1_block_v)
        plan = plan_select(LOGITS_BB, NCP * LOGITS_BV, params, pass1_block_v=0)
        if (plan.block_b, plan.block_v) != (LOGITS_BB, LOGITS_BV):
            raise SystemExit(f"{variant.name}: launcher.plan_select picks [{plan.block_b}, {plan.block_v}] tiles, "
                             f"this build [{LOGITS_BB}, {LOGITS_BV}]; update build_aot.LOGITS_BB / LOGITS_BV")
        intersect = plan.key_kind == 2
        # launcher.launch_select's order (the fallbacks run: V > K at the compiled vocabulary)
        order = ["_pass1_kernel", "_reduce_kernel", *(["_intersection_kernel"] if intersect else []), "_pass2_kernel",
                 "_finalize_kernel", *(["_sample_fallback_kernel"] if plan.sample == 2 else []),
                 *(["_intersection_fallback_kernel"] if intersect else [])]
        if [spec.name for spec in seq] != order:
            raise SystemExit(f"{variant.name} gate {gate}: launches {[spec.name for spec in seq]}, the JIT's {order}")
        sampling = dict(SAMPLE=plan.sample, USE_TOPK=int(plan.use_topk), USE_TOPP=int(plan.use_topp))
        want = {
            "_pass1_kernel": dict(BB=plan.block_b, BV=plan.block_v, K=plan.buffer, KEYS=plan.key_kind,
                                  SLOTS=plan.slots, FALLBACK=1),
            "_reduce_kernel": dict(RB=plan.row_block, NCP=plan.ncp, K=plan.buffer, CG=plan.chunk_group,
                                   NEED_KEYS=int(plan.need_keys), STORE_TOP=int(intersect),
                                   VALUE_KEYS=int(plan.key_kind == 1), SLOTS=plan.slots, KB=plan.key_block),
            "_intersection_kernel": dict(RB=plan.row_block, K=plan.buffer, EB=plan.inter_block, **sampling),
            "_pass2_kernel": dict(BB=plan.block_b, BV=plan.block_v, DIVERGENCE=plan.divergence, SAMPLE=plan.sample,
                                  **({"K": plan.buffer} if plan.sample == 2 else {})),
            "_finalize_kernel": dict(RB=plan.row_block, NCP=plan.ncp, DIVERGENCE=plan.divergence, GATE=plan.gate,
                                     MODE=plan.mode, NEED_V0=int(plan.need_v0), **sampling,
                                     **({"SLOTS": plan.sample_slots, "SB": plan.sample_block}
                                        if plan.sample == 2 else {})),
            "_sample_fallback_kernel": dict(MODE=plan.mode, USE_TOPK=int(plan.use_topk), USE_TOPP=int(plan.use_topp)),
            "_intersection_fallback_kernel": dict(R=JIT_RADIX_BITS, BT=max(256, 4096 >> JIT_RADIX_BITS), **sampling),
        }
        for spec in seq:
            diff = {f: (spec.constants.get(f), v) for f, v in want[spec.name].items() if spec.constants.get(f) != v}
            if diff:
                raise SystemExit(f"{variant.name} gate {gate}: {spec.name} constants differ from launcher.plan_select's "
                                 f"(compiled, plan): {diff}; update build_aot._logits_plan")
            if spec.name == "_pass2_kernel" and spec.num_warps != plan.pass2_warps:
                raise SystemExit(f"{variant.name}: pass 2 warps {spec.num_warps} != plan {plan.pass2_warps}")


def hidden_greedy(dtype: str) -> Variant:
    return hidden_variant(dtype)


def logits_greedy(dtype: str) -> Variant:
    return logits_variant(dtype)


def all_variants() -> dict[str, Variant]:
    """Hidden-state variants for greedy and plain sampling (top-k / top-p sampling from hidden states
    materialises the logits, as the JIT's HiddenLaunch); logits variants for every choice and buffer
    (top-p alone: buffers from TOPP_MIN_BUFFER on, the plan's floor)."""
    variants = [hidden_variant(d, sample, div) for sample in (0, 1) for div in DIVERGENCES for d in DTYPES]
    variants += [logits_variant(d, choice, div, k, mode) for mode in MODES for choice in CHOICES
                 for div in DIVERGENCES for d in DTYPES for k in BUFFERS
                 if not (CHOICES[choice] == "topp" and k < TOPP_MIN_BUFFER)
                 and not (mode == 1 and k < INTERSECTION_MIN_BUFFER)]
    return {v.name: v for v in variants}


def select_variants(patterns: str) -> list[str]:
    """Variant names from a comma-separated list of names or fnmatch patterns ('all', 'hidden_*_tv_bf16')."""
    import fnmatch

    names = list(all_variants())
    if patterns == "all":
        return names
    out: list[str] = []
    for pat in (p.strip() for p in patterns.split(",")):
        if not pat:
            continue
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)] if any(ch in pat for ch in "*?[") else [pat]
        if not hits:
            raise SystemExit(f"no variant matches {pat!r}; see --list")
        out += [h for h in hits if h not in out]
    return out


# ---------------------------------------------------------------------------------------------
# compilation
# ---------------------------------------------------------------------------------------------


def _offline_driver(arch: int):
    """A stand-in for Triton's CUDA driver that names the target instead of asking a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia.driver import ty_to_cpp

    class OfflineCudaDriver(DriverBase):
        @staticmethod
        def is_active():
            return False

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

        def get_active_torch_device(self):
            raise RuntimeError("AOT build: no device")

        def get_benchmarker(self):
            raise RuntimeError("AOT build: no device")

    return OfflineCudaDriver()


def _signature(spec: KernelSpec, arg_names: list[str], args: dict[str, str] | None = None) -> str:
    args = spec.args if args is None else args
    missing = [a for a in arg_names if a not in args]
    extra = [a for a in args if a not in arg_names]
    if missing or extra:
        raise SystemExit(
            f"{spec.module}.{spec.name} takes {arg_names}; build_aot.py has no entry for {missing} and "
            f"unknown entries {extra}. Update its KernelSpec (and CTX_FIELDS / ngsd_ext.cpp if a new runtime "
            "argument appeared)."
        )
    return ", ".join(args[a] for a in arg_names)


def _runtime_args(spec: KernelSpec, arg_names: list[str]) -> list[tuple[str, str]]:
    """(argument, ctx field) of every non-constant argument, in kernel order."""
    out = []
    for arg in arg_names:
        if arg in spec.constants:
            continue
        ty = spec.args[arg]
        field_name = ALIASES.get(arg, arg)
        if field_name not in CTX_FIELDS:
            raise SystemExit(f"{spec.name}: runtime argument {arg!r} has no ngsd_aot_ctx field; add it to CTX_FIELDS")
        base = ty.split(":")[0]
        want = "CUdeviceptr" if base.startswith("*") else _C_TYPES[base]
        if CTX_FIELDS[field_name][0] != want:
            raise SystemExit(f"{spec.name}: argument {arg!r} is {want} but ctx field {field_name} is "
                             f"{CTX_FIELDS[field_name][0]}")
        out.append((arg, field_name))
    return out


def _shim_module(out_dir: Path, source_root: Path) -> Path:
    """A tiny module for triton.tools.compile to execute: it imports the kernels from the package
    (the kernel files use relative imports, so they cannot be executed on their own)."""
    path = out_dir / "_aot_kernels.py"
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(source_root)!r})\n"
        "from ngsd_kernels.ops.hidden_select import _hs_pass1_kernel, _hs_pass2_kernel  # noqa: F401\n"
        "from ngsd_kernels.ops.fused_select import _pass1_kernel, _pass2_kernel, _sample_fallback_kernel  # noqa: F401\n"
        "from ngsd_kernels.ops.intersection_fallback import _intersection_fallback_kernel  # noqa: F401\n"
        "from ngsd_kernels.ops.launcher import (  # noqa: F401\n"
        "    _finalize_kernel, _intersection_kernel, _reduce_kernel)\n"
    )
    return path


def _extract_cubin(c_file: Path) -> bytes:
    match = re.search(r"unsigned char CUBIN_NAME\[\d+\] = \{ ([^}]*) \};", c_file.read_text())
    if not match:
        raise SystemExit(f"no embedded cubin found in {c_file}")
    return bytes(int(tok, 16) for tok in match.group(1).split(", "))


def _fix_fp32_scalars(spec: KernelSpec, files) -> None:
    """Declare fp32 scalar arguments as C float, as the cubin reads them.

    Triton >= 3.4's AOT template maps every float scalar to ``double`` (ty_to_cpp), so the
    launcher would hand cuLaunchKernel a pointer to 8 bytes while the kernel reads 4: the
    parameter silently arrives as the low half of the double (reported e.g. in
    InfiniTensor/ninetoothed PR #153). The header's ``tt-linker`` line is fixed too, so the
    dispatcher generated by triton.tools.link declares float as well.
    """
    names = [a for a, ty in spec.args.items() if ty.split(":")[0] == "fp32"]
    for path in files:
        text = path.read_text()
        for name in names:
            text = re.sub(rf"\bdouble {name}\b", f"float {name}", text)
        path.write_text(text)


def _compile_one(spec: KernelSpec, arch: int, signature: str, arch_dir: Path, out_name: str, shim: Path):
    """One triton.tools.compile run: (func_name, .c file, .h file, cubin bytes, seconds)."""
    import triton
    from triton.tools.compile import CompileArgs, compile_kernel

    triton.runtime.driver.set_active(_offline_driver(arch))
    start = time.time()
    func_name, files = compile_kernel(CompileArgs(
        path=str(shim), kernel_name=spec.name, signature=signature, grid=spec.grid, target=f"cuda:{arch}:32",
        num_warps=spec.num_warps, num_stages=spec.num_stages, out_name=out_name, out_path=arch_dir / out_name,
    ))
    seconds = time.time() - start
    header = next(f for f in files if f.suffix == ".h")
    source = next(f for f in files if f.suffix == ".c")
    _fix_fp32_scalars(spec, (source, header))
    return func_name, source, header, _extract_cubin(source), seconds


def compile_spec(spec: KernelSpec, arch: int, out_dir: Path, shim: Path, log=print) -> dict:
    """triton.tools.compile (the generic kernel and, with ``spec.aligned``, its aligned twin under the
    same launcher name) + triton.tools.link for one kernel and one architecture."""
    module = __import__(spec.module, fromlist=[spec.name])
    kernel = getattr(module, spec.name)
    arg_names = list(kernel.arg_names)
    signature = _signature(spec, arg_names)
    runtime = _runtime_args(spec, arg_names)
    arch_dir = out_dir / f"sm{arch}"
    arch_dir.mkdir(parents=True, exist_ok=True)
    out_name = spec.out_name(arch)
    func_name, source, header, cubin, seconds = _compile_one(spec, arch, signature, arch_dir, out_name, shim)
    (arch_dir / f"{out_name}.cubin").write_bytes(cubin)
    sources, headers = [source], [header]
    entry = dict(
        kernel=spec.name, module=spec.module, arch=arch, out_name=out_name, func_name=func_name,
        signature=signature, grid=spec.grid, num_warps=spec.num_warps, num_stages=spec.num_stages,
        constants=spec.constants, runtime_args=runtime, cubin_bytes=len(cubin),
        cubin=str((arch_dir / f"{out_name}.cubin").relative_to(out_dir)), compile_seconds=round(seconds, 1),
    )
    note = ""
    if spec.aligned:
        a_signature = _signature(spec, arg_names, spec.aligned_args())
        a_func, a_source, a_header, a_cubin, a_seconds = _compile_one(spec, arch, a_signature, arch_dir, out_name,
                                                                      shim)
        (arch_dir / f"{out_name}.aligned.cubin").write_bytes(a_cubin)
        sources.append(a_source)
        headers.append(a_header)
        entry["aligned"] = dict(
            args=list(spec.aligned), func_name=a_func, signature=a_signature, cubin_bytes=len(a_cubin),
            cubin=str((arch_dir / f"{out_name}.aligned.cubin").relative_to(out_dir)),
            compile_seconds=round(a_seconds, 1),
        )
        note = f" + aligned {a_seconds:5.1f}s"
    link_base = arch_dir / f"{out_name}_link"
    # one launcher name, two hint sets: the linker's dispatcher tries the aligned one first
    subprocess.run([sys.executable, "-m", "triton.tools.link", *map(str, headers), "-o", str(link_base)],
                   check=True)
    entry["files"] = [str(p.relative_to(out_dir)) for p in (source, header, link_base.with_suffix(".c"),
                                                            link_base.with_suffix(".h"), *sources[1:], *headers[1:])]
    log(f"  sm_{arch} {spec.name:<20} {seconds:6.1f}s{note}  cubin {len(cubin):>8} bytes  -> {out_name}")
    return entry


def _compile_job(job) -> tuple[tuple[str, int], dict]:
    spec, arch, out_dir, shim, source_root = job
    if str(source_root) not in sys.path:
        sys.path.insert(0, str(source_root))
    return (spec.digest(), arch), compile_spec(spec, arch, out_dir, shim, lambda msg: print(msg, flush=True))


# ---------------------------------------------------------------------------------------------
# glue
# ---------------------------------------------------------------------------------------------


def _ctx_header() -> str:
    lines = [
        "/* Generated by csrc_triton/build_aot.py: the arguments of one decode step. */",
        "#ifndef NGSD_AOT_CTX_H", "#define NGSD_AOT_CTX_H", "", "#include <cuda.h>", "#include <stdint.h>", "",
        "typedef struct ngsd_aot_ctx {", "  CUstream stream;",
    ]
    for name, (ctype, doc) in CTX_FIELDS.items():
        lines.append(f"  {ctype} {name};  /* {doc} */")
    lines += ["} ngsd_aot_ctx;", "", "#endif", ""]
    return "\n".join(lines)


def _call(entry: dict) -> str:
    args = ", ".join(f"c->{field_name}" for _, field_name in entry["runtime_args"])
    return f"{entry['out_name']}_default(c->stream, {args})"


# the variant constants the C++ op reads from the table (ngsd_aot_variant in ngsd_aot_glue.h)
TABLE_FIELDS = ("block_b", "block_v", "K", "SLOTS", "NCP", "DIVERGENCE", "SAMPLE")


def _table_values(variant: Variant) -> list[int]:
    c = variant.constants
    return [c.get("BLOCK_B", c.get("BB")), c.get("BLOCK_V", c.get("BV")), c["K"], c["SLOTS"], c["NCP"],
            c["DIVERGENCE"], c["SAMPLE"]]


def write_glue(out_dir: Path, variants: list[Variant], built: dict[tuple[str, int], dict], archs: list[int]) -> None:
    body = []
    for variant in variants:
        fn = [f"static CUresult ngsd_aot_run_{variant.name}(const ngsd_aot_ctx *c, int arch, int gate) {{",
              "  CUresult r;"]
        for arch in archs:
            fn.append(f"  if (arch == {arch}) {{")
            for gate, seq in variant.steps.items():
                fn.append(f"    if (gate == {gate}) {{")
                for spec in seq[:-1]:
                    fn.append(f"      r = {_call(built[(spec.digest(), arch)])};")
                    fn.append("      if (r != CUDA_SUCCESS) return r;")
                fn.append(f"      return {_call(built[(seq[-1].digest(), arch)])};")
                fn.append("    }")
            fn.append("    return CUDA_ERROR_INVALID_VALUE;")
            fn.append("  }")
        fn += ["  return CUDA_ERROR_NO_BINARY_FOR_GPU;", "}", ""]
        body += fn
    # the linked dispatchers' prototypes
    protos = []
    for entry in sorted(built.values(), key=lambda e: e["out_name"]):
        params = ", ".join(f"{CTX_FIELDS[f][0]} {a}" for a, f in entry["runtime_args"])
        protos.append(f"CUresult {entry['out_name']}_default(CUstream stream, {params});")
    # every compiled variant with the constants the host code plans with; lookup by name
    table = ["static const ngsd_aot_variant ngsd_aot_variants[] = {"]
    for variant in variants:
        values = ", ".join(str(v) for v in _table_values(variant))
        table.append(f'  {{"{variant.name}", ngsd_aot_run_{variant.name}, {values}}},')
    table += ["  {0, 0, 0, 0, 0, 0, 0, 0, 0},", "};", ""]
    lookup = [
        "const ngsd_aot_variant *ngsd_aot_find(const char *name) {",
        "  for (const ngsd_aot_variant *v = ngsd_aot_variants; v->name; ++v)",
        "    if (strcmp(v->name, name) == 0) return v;",
        "  return 0;",
        "}",
        "",
        "const ngsd_aot_variant *ngsd_aot_variant_at(int i) {",
        f"  return (i >= 0 && i < {len(variants)}) ? &ngsd_aot_variants[i] : 0;",
        "}",
        "",
    ]
    header = "\n".join([
        "/* Generated by csrc_triton/build_aot.py: one function per op variant, launching its kernels. */",
        "#ifndef NGSD_AOT_GLUE_H", "#define NGSD_AOT_GLUE_H", "", '#include "ngsd_aot_ctx.h"', "",
        "#ifdef __cplusplus", 'extern "C" {', "#endif", "",
        f"#define NGSD_AOT_ARCHS \"{','.join(str(a) for a in archs)}\"",
        "/* the manifest.json of this build, for introspection */",
        "const char *ngsd_aot_manifest(void);", "",
        "/* all launches of one decode step, in order (gate: the finalize's GATE) */",
        "typedef CUresult (*ngsd_aot_run_fn)(const ngsd_aot_ctx *c, int arch, int gate);",
        "/* a compiled op variant and the launch constants it was compiled with */",
        "typedef struct ngsd_aot_variant {",
        "  const char *name;",
        "  ngsd_aot_run_fn run;",
        "  int block_b;     /* rows per pass-1 / pass-2 program */",
        "  int block_v;     /* vocabulary columns per tile */",
        "  int buffer;      /* K: the top-K buffer (candidate_k <= K) */",
        "  int slots;       /* union candidate slots per chunk and row (keys scratch [B, chunks, slots]) */",
        "  int max_chunks;  /* NCP: chunks / splits the per-row kernels read */",
        "  int divergence;  /* params.Divergence: 0 TV, 1 KL, 2 JS */",
        "  int sample;      /* 0 greedy, 1 temperature sampling (Gumbel-max), 2 top-k / top-p sampling */",
        "} ngsd_aot_variant;",
        "/* the variant of that name, or NULL when this build did not compile it */",
        "const ngsd_aot_variant *ngsd_aot_find(const char *name);",
        "/* the i-th compiled variant, or NULL past the end */",
        "const ngsd_aot_variant *ngsd_aot_variant_at(int i);", "",
        "#ifdef __cplusplus", "}", "#endif", "#endif", "",
    ])
    manifest = (out_dir / "manifest.json").read_text()
    escaped = json.dumps(manifest)  # a valid C string literal for ASCII text
    source = "\n".join([
        "/* Generated by csrc_triton/build_aot.py. */", "#include <string.h>", '#include "ngsd_aot_glue.h"', "",
        *protos, "", f"const char *ngsd_aot_manifest(void) {{ return {escaped}; }}", "", *body, *table, *lookup,
    ])
    (out_dir / "ngsd_aot_glue.h").write_text(header)
    (out_dir / "ngsd_aot_glue.c").write_text(source)
    (out_dir / "ngsd_aot_ctx.h").write_text(_ctx_header())


OWN_FILES = ("manifest.json", "ngsd_aot_glue.h", "ngsd_aot_glue.c", "ngsd_aot_ctx.h", "_aot_kernels.py")


def remove_previous_build(out_dir: Path) -> None:
    """Delete the files an earlier build wrote in `out_dir` (those its manifest lists, and the glue), and nothing
    else: other files in the folder stay (a glob over ``sm*/*`` once deleted anything that matched)."""
    manifest = out_dir / "manifest.json"
    names: list[str] = []
    if manifest.is_file():
        for kernel in json.loads(manifest.read_text()).get("kernels", []):
            names += [kernel["cubin"], *kernel.get("files", [])]
            if "aligned" in kernel:
                names.append(kernel["aligned"]["cubin"])
    for name in [*names, *OWN_FILES]:
        (out_dir / name).unlink(missing_ok=True)


def build(archs: list[int], variant_names: list[str], out_dir: Path, source_root: Path, log=print,
          jobs: int = 1) -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the AOT build compiles real GPU code")
    sys.path.insert(0, str(source_root))
    # the JIT launches pass launcher.LAUNCH_OPTIONS (FP contraction off); the AOT compiler takes the
    # option from the environment only, so mirror it there
    from ngsd_kernels.ops.launcher import LAUNCH_OPTIONS

    os.environ["TRITON_DEFAULT_FP_FUSION"] = "1" if LAUNCH_OPTIONS.get("enable_fp_fusion", True) else "0"
    variants_by_name = all_variants()
    unknown = [v for v in variant_names if v not in variants_by_name]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; `build_aot.py --list` names the {len(variants_by_name)} there are")
    variants = [variants_by_name[v] for v in variant_names]
    for variant in variants:
        check_against_jit_plan(variant)
    if not variants:
        raise SystemExit("no variants selected; name some with --variants (see --list), or 'all'")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_previous_build(out_dir)
    shim = _shim_module(out_dir, source_root)
    todo: dict[tuple[str, int], KernelSpec] = {}
    for arch in archs:
        for variant in variants:
            for spec in variant.specs:
                todo.setdefault((spec.digest(), arch), spec)
    log(f"{len(todo)} kernels ({sum(bool(s.aligned) for s in todo.values())} with an aligned twin) for "
        f"{len(variants)} variants, sm_{', sm_'.join(map(str, archs))}, {jobs} job(s)")
    built: dict[tuple[str, int], dict] = {}
    # the slowest first (hidden pass 1: the bitonic top-K network) so that parallel jobs end together
    order = sorted(todo, key=lambda k: (todo[k].name != "_hs_pass1_kernel", not todo[k].aligned))
    if jobs <= 1:
        for key in order:
            built[key] = compile_spec(todo[key], key[1], out_dir, shim, log)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for key, entry in pool.map(_compile_job, [(todo[k], k[1], out_dir, shim, source_root) for k in order]):
                built[key] = entry
    import triton

    manifest = dict(
        triton_version=triton.__version__, archs=archs,
        enable_fp_fusion=os.environ["TRITON_DEFAULT_FP_FUSION"] == "1",
        variants={v.name: dict(op=v.op, dtype=v.dtype, constants=v.constants,
                               steps={GATES[g]: [s.digest() for s in seq] for g, seq in v.steps.items()})
                  for v in variants},
        kernels=[built[k] for k in sorted(built)],
    )
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    write_glue(out_dir, variants, built, archs)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), choices=DEFAULT_ARCHS,
                        help="SM versions: 80 (A100 and other 8.x GPUs), 90 (H100); the extension runs no other")
    parser.add_argument("--variants", default="all",
                        help="comma-separated variant names or fnmatch patterns (e.g. 'hidden_*_tv_bf16'), or 'all'")
    parser.add_argument("--jobs", "-j", type=int, default=1, help="kernels compiled in parallel (processes)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (git-ignored)")
    parser.add_argument("--source-root", type=Path, default=REPO,
                        help="folder holding the ngsd_kernels package to compile (default: this checkout)")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, variant in all_variants().items():
            print(f"{name:<22} {variant.op:<14} {variant.dtype:<5} {variant.constants}")
        return 0
    names = select_variants(args.variants)
    start = time.time()
    manifest = build(args.arch, names, args.out.resolve(), args.source_root.resolve(), jobs=args.jobs)
    print(f"built {len(manifest['kernels'])} kernels for sm_{', sm_'.join(map(str, args.arch))} "
          f"in {time.time() - start:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
