#!/usr/bin/env python3
"""Static report of every Triton kernel variant the decode step can launch (issue 17, acceptance 1).

No GPU needed: each variant is compiled with Triton's real compiler for an explicit target
(``GPUTarget("cuda", 90, 32)``, optionally 80), down to a cubin with the ptxas that ships in the
Triton wheel, and the cubin is read with the wheel's ``cuobjdump``:

- registers, stack (= spill space) and static shared memory: ``cuobjdump -res-usage``;
- spill bytes: ``ptxas -v`` (the ptxas Triton uses for the arch, default options) on the kernel's PTX,
  run only when the stack is non-zero (its stack frame can differ by a few bytes from the cubin's);
- dynamic shared memory: Triton's ``metadata.shared``; "fits" = static + dynamic <= 227 KB (sm_90,
  232448 bytes) or 163 KB (sm_80, 166912 bytes);
- SASS instructions (``cuobjdump -sass``), total and by class (SHFL, BAR, MUFU, HMMA, HGMMA, LDG,
  STG, LDS, STS, LDL/STL = spill traffic), and loops (backward branches).

Instructions per logit (an estimate from static counts, stated so a rewrite is judged the same way):
every thread of a program executes the kernel's instruction stream once (predication, not
divergence, handles masks in Triton code), so per tile

    executed per thread = static instructions outside loops + sum over loops of body * trips
    instr per logit     = executed per thread * (32 * num_warps) / logits per tile

where "logits per tile" counts base and expert logits (2 * BB * BV for the logits passes,
2 * BLOCK_B * BLOCK_V per vocabulary tile for the hidden-state passes). The logits passes and the
per-row kernels are loop-free (everything is unrolled), so for them the count is exact up to
predicated-off instructions. The hidden-state passes loop over the tiles of their split (one trip
per tile: the per-tile cost is that loop's body) and, inside, over the hidden size in BLOCK_H steps
(trips = H / BLOCK_H, H = --hidden, default 576 = SmolLM2-135M; 4096 for a 7B model).
The per-row kernels (reduce, intersection, finalize) run once per row, not per logit: their row
is reported with instructions per row instead.

Which variants: the mode switches and launch constants come from ``launcher.plan_select`` (logits
path, at B = 256, V = 131072 on a GPU plan: one row of BV = 4096 per program, as at every batch size;
pass 1 on [1, 8192] for buffers of 1024) and ``hidden_select.plan_hidden_select``
(hidden-state path, shared LM head, B = 1 and B = 256), over divergence TV/KL/JS, union/intersection
candidates, greedy / temperature / top-k / top-p sampling, K in {64, 256, 1024}, gate LIF or shut,
and logits dtypes bf16/fp16/fp32. Identical kernel specialisations are compiled once. ``--full``
compiles all of them (hours on a 2-core machine); the default compiles a cover that changes one
axis at a time from greedy/TV/union/bf16/K=64 (every K, dtype, divergence, candidate mode, sampling
mode and the shut gate appear at least once); the rest are listed as ``not compiled (--full)``.
Compile failures (OutOfResources, ptxas errors, timeouts) are reported as rows, not hidden.

Usage (repository root; TRITON_INTERPRET must be unset):

    python3 bench/kernel_report.py                    # cover, sm_90 -> bench/results/{kernel_report.json,KERNELS.md}
    python3 bench/kernel_report.py --arch 90 80 --jobs 2 --budget 900
    python3 bench/kernel_report.py --full --arch 90 80
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use (opt-in maximum)
NUM_WARPS = 4  # Triton's default; only JS pass 2 launches 8 (SelectPlan.pass2_warps)
NUM_STAGES = 3  # Triton's default on CUDA
SASS_CLASSES = ("SHFL", "BAR", "MUFU", "HMMA", "HGMMA", "LDG", "STG", "LDS", "STS", "LDL", "STL", "LDGSTS",
                "BRA")

# pointer element types of the scratch / row buffers (launcher.Scratch, RowVectors, launch_select outputs);
# the logits / hidden / weight pointers take the variant's dtype
_POINTER_TYPES = {
    "stats_ptr": "fp32", "counts_ptr": "i32", "rowinfo_ptr": "fp32", "top_b_ptr": "i64", "top_e_ptr": "i64",
    "choice_ptr": "i32", "iover_ptr": "i32", "div_ptr": "fp32", "best_ptr": "fp32", "besti_ptr": "i32",
    "keys2_ptr": "i64", "mass_ptr": "fp32", "potential_ptr": "fp32", "alpha_ptr": "fp32", "seed_ptr": "i64",
    "offset_ptr": "i64", "tokens_ptr": "i64", "new_potential_ptr": "fp32", "spike_ptr": "i1",
    "divergence_ptr": "fp32", "over_ptr": "i1", "biasb_ptr": "fp32", "biase_ptr": "fp32",
    "row_temperature_ptr": "fp32", "row_top_k_ptr": "i32", "row_top_p_ptr": "fp32", "tickets_ptr": "i32",
}
_FLOAT_SCALARS = {"temperature", "decay", "v_th", "v_reset", "rho", "top_p", "score_floor", "beta",
                  "log_plausibility"}
_UNIT_STRIDES = {"s_hb1", "s_he1", "s_wb1", "s_we1"}  # contiguous rows: the JIT specialises them to 1
# integers the JIT sees as multiples of 16 in the planned shapes (V = 32768, 131072, 151936 and their
# row strides are all multiples of 16): Triton specialises such arguments, which lets it vectorise
# the row loads; a vocabulary that is not a multiple of 16 gets scalar loads instead
_DIVISIBLE_16 = {"stride_b", "stride_e", "n_vocab", "vocab", "strong_stride", "weak_stride"}


@dataclass
class KernelJob:
    """One kernel specialisation to compile: where the kernel lives, its constants, what a tile holds."""

    module: str
    name: str
    dtype: str
    constants: dict[str, int]
    role: str  # pass1 / pass2 / reduce / intersection / finalize
    path: str  # logits / hidden
    logits_per_tile: int  # base + expert logits one program handles per tile (0: per-row kernel)
    inner_trips: int = 1  # trips of a nested loop inside the per-tile loop (hidden: H / BLOCK_H)
    modes: list[str] = field(default_factory=list)
    # per-row kernels: trips of a runtime loop that holds other loops (bisection rounds; see per_tile_instructions)
    outer_trips: int = 1
    num_warps: int = NUM_WARPS
    maxnreg: int = 0  # the launch's register cap (0: ptxas's choice)

    def key(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in sorted(self.constants.items()))
        warps = "" if self.num_warps == NUM_WARPS else f"|warps={self.num_warps}"
        cap = f"|maxnreg={self.maxnreg}" if self.maxnreg else ""
        return f"{self.name}[{self.dtype}|{consts}{warps}{cap}]"


# ---------------------------------------------------------------------------------------------
# enumeration from the launch planners
# ---------------------------------------------------------------------------------------------


def _modes() -> list[tuple[str, dict]]:
    """(label, StepParams fields) of every mode the loop can run, K in {64, 256, 1024}."""
    from ngsd_kernels.params import CandidateMode, Divergence, GateMode

    samplings = {"greedy": {}, "temp": dict(temperature=0.7), "topk": dict(temperature=0.7),
                 "topp": dict(temperature=0.7, top_p=0.9)}
    out = []
    for k in (64, 256, 1024):
        for div in Divergence:
            for cand in CandidateMode:
                for samp, extra in samplings.items():
                    fields = dict(divergence=div, candidate_mode=cand, candidate_k=k, **extra)
                    if samp == "topk":
                        fields["top_k"] = k
                    if cand == CandidateMode.INTERSECTION:
                        fields["min_candidates"] = k
                    out.append((f"{div.name}/{cand.name.lower()}/{samp}/K={k}", fields))
        out.append((f"TV/union/greedy/K={k}/gate-shut", dict(candidate_k=k, gate=GateMode.CLOSED)))
    return out


def _row_kernel_jobs(plan, path: str, label: str, dense: int = 0, folded: bool = False) -> list[KernelJob]:
    """``folded``: the reduce runs inside pass 1 (``_pass1_reduce_kernel``), on the pass-1 program's BB rows;
    its job (``_reduce_kernel`` with RB = BB) stands for that tail's instructions per row."""
    from ngsd_kernels.params import CandidateMode

    mod = "ngsd_kernels.ops.launcher"
    k = plan.buffer
    # folded: the logits pass 1 reduces its BB rows at once, the hidden-state pass 1 one row at a time
    reduce_rb = (1 if path == "hidden" else plan.block_b) if folded else plan.row_block
    # trips of the runtime loops over chunk groups (one trip per group: the report multiplies them out)
    groups = -(-plan.n_chunks // plan.chunk_group)
    # the reduce reads pass 1's chunks (wider than pass 2's for buffers of 1024: SelectPlan.pass1_block_v)
    trips = dict(inner_trips=-(-plan.pass1_chunks // plan.chunk_group))
    if plan.key_kind == 1:
        # union: the reduce re-reads a row's slots in steps of launcher.value_key_step (CG chunks' slots, capped)
        from ngsd_kernels.ops.launcher import value_key_step

        step = value_key_step(reduce_rb, plan.chunk_group, plan.slots, plan.pass1_ncp)
        trips = dict(inner_trips=-(-plan.pass1_chunks * plan.slots // step))
    if plan.key_kind == 2:
        # intersection: 64 bisection rounds over the row's keys, KB a load (select_tiles.slots_kth_key);
        # with one load for every round the round loop is the only loop, and it runs 64 times
        blocks = -(-plan.pass1_ncp * plan.slots // plan.key_block)
        trips = dict(inner_trips=blocks, outer_trips=64) if blocks > 1 else dict(inner_trips=64)
    jobs = [KernelJob(mod, "_reduce_kernel", "-", dict(
        RB=reduce_rb, NCP=plan.pass1_ncp, K=k, CG=plan.chunk_group, NEED_KEYS=int(plan.need_keys),
        STORE_TOP=int(plan.mode == CandidateMode.INTERSECTION and plan.need_keys),
        VALUE_KEYS=int(plan.key_kind == 1), DENSE=dense, SLOTS=plan.slots,
        **({"KB": plan.key_block} if plan.key_kind == 2 else {})), "reduce", path, 0, **trips)]
    if plan.mode == CandidateMode.INTERSECTION and plan.need_keys:
        jobs.append(KernelJob(mod, "_intersection_kernel", "-", dict(
            RB=plan.row_block, K=k, EB=plan.inter_block, SAMPLE=plan.sample, USE_TOPK=int(plan.use_topk),
            USE_TOPP=int(plan.use_topp)), "intersection", path, 0, inner_trips=k // plan.inter_block))
    jobs.append(KernelJob(mod, "_finalize_kernel", "-", dict(
        RB=plan.row_block, NCP=plan.ncp, DIVERGENCE=plan.divergence, GATE=plan.gate,
        MODE=plan.mode, SAMPLE=plan.sample, USE_TOPK=int(plan.use_topk), USE_TOPP=int(plan.use_topp),
        NEED_V0=int(plan.need_v0), SLOTS=plan.sample_slots, SB=plan.sample_block), "finalize", path, 0,
        # top-k / top-p: every bisection round (a runtime loop of 31) reads the row's candidate keys in blocks of SB
        inner_trips=(-(-plan.ncp * plan.sample_slots // plan.sample_block) if plan.sample == 2
                     else max(1, groups - 1)), outer_trips=31 if plan.sample == 2 else 1))
    for job in jobs:
        job.modes.append(f"{label} (inside pass 1)" if folded and job.role == "reduce" else label)
    return jobs


def logits_jobs(label: str, fields: dict, dtype: str, batch: int = 256, vocab: int = 131072) -> list[KernelJob]:
    """The logits path's launches (pass 1, reduce, [intersection], pass 2, finalize) for one mode."""
    from ngsd_kernels.ops.launcher import plan_select
    from ngsd_kernels.params import StepParams

    plan = plan_select(batch, vocab, StepParams(**fields))
    mod = "ngsd_kernels.ops.fused_select"
    tile = dict(BB=plan.block_b, BV=plan.block_v, K=plan.buffer)
    per_tile = 2 * plan.block_b * plan.block_v
    # pass 1 with the reduce folded in (SelectPlan.fold_reduce): the kernel the step launches
    pass1_name, fold = ("_pass1_reduce_kernel", dict(NCP=plan.pass1_ncp, CG=plan.chunk_group, REDUCE=1)) \
        if plan.fold_reduce else ("_pass1_kernel", {})
    jobs = [
        # (intersection: the cold exact path's bisections are 64-round runtime loops, select_tiles.tile_kth_key)
        KernelJob(mod, pass1_name, dtype, dict(tile, BV=plan.pass1_bv, KEYS=plan.key_kind, SLOTS=plan.slots,
                                               FALLBACK=1, **fold), "pass1", "logits", 2 * plan.block_b * plan.pass1_bv,
                  inner_trips=64 if plan.key_kind == 2 else 1, num_warps=plan.pass1_warps,
                  maxnreg=plan.pass1_maxnreg if plan.fold_reduce else 0),
        KernelJob(mod, "_pass2_kernel", dtype, dict(tile, DIVERGENCE=plan.divergence, SAMPLE=plan.sample,
                                                    NEED_V0=int(plan.need_v0), NEED_V1=int(plan.need_v1)),
                  "pass2", "logits", per_tile, num_warps=plan.pass2_warps),
    ]
    if plan.sample == 2 and plan.may_overflow:
        # top-k / top-p rows the buffer could not decide: one program per row, ~64 passes over it (cold path)
        jobs.append(KernelJob(mod, "_sample_fallback_kernel", dtype, dict(
            BT=2048, MODE=plan.mode, USE_TOPK=int(plan.use_topk), USE_TOPP=int(plan.use_topp)), "fallback", "logits",
            0, inner_trips=1))
    if plan.mode == 1 and plan.need_keys and plan.may_overflow:
        # spiked intersection rows whose grown intersection outgrew the top-K lists (cold path)
        from ngsd_kernels.ops.intersection_fallback import RADIX_BITS

        jobs.append(KernelJob("ngsd_kernels.ops.intersection_fallback", "_intersection_fallback_kernel", dtype, dict(
            BT=max(256, 4096 >> RADIX_BITS), R=RADIX_BITS, SAMPLE=plan.sample, USE_TOPK=int(plan.use_topk),
            USE_TOPP=int(plan.use_topp)), "fallback", "logits", 0, inner_trips=1))
    for job in jobs:
        job.modes.append(f"logits {dtype} {label}")
    dense = {"bf16": 1, "fp16": 2}.get(dtype, 0) if plan.key_kind == 1 else 0
    jobs += _row_kernel_jobs(plan, "logits", f"logits {label}", dense, folded=plan.fold_reduce)
    if plan.use_topp and fields.get("temperature", 1.0) != 1.0:
        # top-p at T != 1 reads q^(1/T): the launch passes TEMPERED = 1 to every kernel that measures top-p
        for job in jobs:
            if job.name in TEMPERED_KERNELS:
                job.constants["TEMPERED"] = 1
    return jobs


def hidden_jobs(label: str, fields: dict, dtype: str, batch: int, hidden: int, vocab: int = 131072) -> list[KernelJob]:
    from ngsd_kernels.ops.hidden_select import fused_hidden_fits, plan_hidden_select
    from ngsd_kernels.params import StepParams

    if not fused_hidden_fits(batch, vocab, StepParams(**fields)):
        # HiddenLaunch materialises fp32 logits (one GEMM on the stacked rows) and runs the logits kernels
        return logits_jobs(f"{label} (hidden B={batch}: GEMM + logits kernels)", fields, "fp32", batch, vocab)
    plan, grid = plan_hidden_select(batch, vocab, StepParams(**fields), shared=True, on_gpu=True)
    mod = "ngsd_kernels.ops.hidden_select"
    tile = dict(SHARED=1, HAS_BIAS_B=0, HAS_BIAS_E=0, BLOCK_B=grid["block_b"], BLOCK_V=grid["block_v"],
                BLOCK_H=grid["block_h"], UPCAST=int(dtype == "fp32"), K=plan.buffer)
    per_tile = 2 * grid["block_b"] * grid["block_v"]
    trips = -(-hidden // grid["block_h"])
    # B <= 2: the reduce inside pass 1 (SelectPlan.fold_reduce), one row at a time
    pass1_name, fold = ("_hs_pass1_reduce_kernel", dict(NCP=plan.ncp, CG=plan.chunk_group, REDUCE=1)) \
        if plan.fold_reduce else ("_hs_pass1_kernel", {})
    jobs = [
        KernelJob(mod, pass1_name, dtype, dict(tile, KEYS=plan.key_kind, **fold), "pass1", "hidden", per_tile,
                  trips, num_warps=grid["pass1_warps"]),
        KernelJob(mod, "_hs_pass2_kernel", dtype, dict(tile, DIVERGENCE=plan.divergence, SAMPLE=plan.sample,
                                                       NEED_V0=int(plan.need_v0), NEED_V1=int(plan.need_v1)),
                  "pass2", "hidden", per_tile, trips),
    ]
    for job in jobs:
        job.modes.append(f"hidden {dtype} B={batch} {label}")
    return jobs + _row_kernel_jobs(plan, "hidden", f"hidden B={batch} {label}", folded=plan.fold_reduce)


def enumerate_jobs(hidden: int) -> tuple[list[KernelJob], set[str]]:
    """(every distinct kernel specialisation, keys of the default one-axis-at-a-time cover)."""
    from ngsd_kernels.ops import launcher

    if launcher.INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 was set when Triton was imported: the planners then pick "
                           "interpreter block sizes; enumerate in a process without it")
    modes = _modes()
    base = "TV/union/greedy/K=64"
    everything: dict[str, KernelJob] = {}
    cover: set[str] = set()

    def add(jobs: list[KernelJob], in_cover: bool) -> None:
        for job in jobs:
            prior = everything.setdefault(job.key(), job)
            if prior is not job:
                prior.modes.extend(job.modes)
            if in_cover:
                cover.add(job.key())

    for label, fields in modes:
        div, cand, samp, k = label.split("/")[:4]
        one_axis = sum([div != "TV", cand != "union", samp != "greedy", k != "K=64", "gate" in label]) <= 1
        for dtype in ("bf16", "fp16", "fp32"):
            add(logits_jobs(label, fields, dtype), one_axis and (dtype == "bf16" or label == base))
        # the hidden-state path (bf16) for every mode: the fused kernels where they run it (greedy and
        # temperature sampling, buffers up to 64), else the GEMM + logits kernels at that batch
        for batch in (1, 256):
            add(hidden_jobs(label, fields, "bf16", batch, hidden), one_axis)
    # the roofline's smaller batches and the default model's vocabulary (SmolLM2, V = 49152: 12 chunks) plan
    # the same [1, 4096] tiles but other per-row constants (rows per program, chunks, chunk groups): their
    # greedy / TV / union / K = 64 launches, bf16
    base_fields = dict(modes)[base]
    for batch, vocab in ((1, 131072), (32, 131072), (1, 49152), (32, 49152)):
        add(logits_jobs(f"{base} (B={batch})", base_fields, "bf16", batch, vocab), True)
    # per-row sampling settings (``row_temperature`` / ``row_top_k`` / ``row_top_p``: vLLM's shared launches of
    # sampled requests): the kernels that read them, compiled with ROW_T / ROW_K / ROW_P = 1, for the
    # sampled TV / K = 64 modes, bf16, on the logits path and the hidden-state path
    for label, fields in modes:
        div, cand, samp, k = label.split("/")[:4]
        if samp != "greedy" and div == "TV" and k == "K=64":
            add(with_row_sampling(logits_jobs(f"{label}/per-row", fields, "bf16")), True)
            for batch in (1, 256):
                add(with_row_sampling(hidden_jobs(f"{label}/per-row", fields, "bf16", batch, hidden)), True)
    # contrastive decoding's kernel (``ngsd_kernels/ops/contrastive_select.py``): greedy and sampled, each dtype
    add(contrastive_jobs(), True)
    return list(everything.values()), cover


def contrastive_jobs() -> list[KernelJob]:
    """``_contrastive_select_kernel`` at its CUDA block (one row per program, two passes over [1, BLOCK])."""
    from ngsd_kernels.ops.contrastive_select import BLOCK

    return [KernelJob("ngsd_kernels.ops.contrastive_select", "_contrastive_select_kernel", dtype,
                      dict(SEED_PER_ROW=1, OFFSET_PER_ROW=0, SAMPLE=sample, BETA_ZERO=0, BLOCK=BLOCK),
                      role="contrastive", path="contrastive", logits_per_tile=2 * BLOCK,
                      modes=["contrastive/" + ("sampled" if sample else "greedy")])
            for dtype in ("bf16", "fp16", "fp32") for sample in (0, 1)]


TEMPERED_KERNELS = ("_pass2_kernel", "_intersection_kernel", "_finalize_kernel", "_sample_fallback_kernel",
                    "_intersection_fallback_kernel")
ROW_T_KERNELS = ("_pass2_kernel", "_hs_pass2_kernel", "_intersection_kernel", "_finalize_kernel",
                 "_sample_fallback_kernel", "_intersection_fallback_kernel")


def with_row_sampling(jobs: list[KernelJob]) -> list[KernelJob]:
    """The jobs of a sampled mode as a launch with per-row settings runs them (the launcher passes each
    setting the step uses per row): ROW_T = 1 where the kernel takes a temperature, ROW_K / ROW_P = 1
    where it applies top-k / top-p (pass 1 and the reduce read none)."""
    out = []
    for j in jobs:
        if j.name in ROW_T_KERNELS:
            extra = dict(ROW_T=1)
            if j.name not in ("_pass2_kernel", "_hs_pass2_kernel"):
                extra.update(ROW_K=int(j.constants.get("USE_TOPK", 0)), ROW_P=int(j.constants.get("USE_TOPP", 0)))
            j = KernelJob(j.module, j.name, j.dtype, dict(j.constants, **extra), j.role, j.path, j.logits_per_tile,
                          j.inner_trips, list(j.modes), j.outer_trips, j.num_warps, j.maxnreg)
        out.append(j)
    return out


# ---------------------------------------------------------------------------------------------
# compile and inspect one kernel (runs in a worker process)
# ---------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: this Triton wheel does not ship {name}")
    return str(path)


def _offline_driver(arch: int):
    """build_aot's stand-in CUDA driver (names the target instead of asking a GPU)."""
    spec = importlib.util.spec_from_file_location("ngsd_build_aot", REPO / "csrc_triton" / "build_aot.py")
    module = sys.modules.get("ngsd_build_aot")
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["ngsd_build_aot"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return module._offline_driver(arch)


def _pointer_type(job: KernelJob, arg: str) -> str:
    if arg in ("keys_b_ptr", "keys_e_ptr"):  # launcher.Scratch: int32 value keys only for key kind 1
        kind = job.constants.get("KEYS", 1 if job.constants.get("VALUE_KEYS") else 2)
        return "i32" if kind == 1 else "i64"
    if arg in _POINTER_TYPES:
        return _POINTER_TYPES[arg]
    if job.dtype == "-":
        raise ValueError(f"no element type known for {arg} of {job.name}; add it to _POINTER_TYPES")
    return job.dtype


def _signature(job: KernelJob, arg_names: list[str]) -> tuple[dict, dict, dict]:
    signature, constants, attrs = {}, {}, {}
    for i, arg in enumerate(arg_names):
        if arg in job.constants:
            signature[arg], constants[arg] = "constexpr", job.constants[arg]
        elif arg == "THREADS":  # the layout hint of the logits passes: the launch's thread count
            signature[arg], constants[arg] = "constexpr", 32 * job.num_warps
        elif arg in ("ROW_T", "ROW_K", "ROW_P", "TEMPERED"):  # per-row settings / tempered top-p (jobs with them carry 1)
            signature[arg], constants[arg] = "constexpr", 0
        elif arg in _UNIT_STRIDES:
            signature[arg], constants[arg] = "constexpr", 1
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + _pointer_type(job, arg)
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif arg in _FLOAT_SCALARS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg in _DIVISIBLE_16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def parse_sass(text: str) -> dict:
    """Instruction counts (total, by class) and loops (backward branches) of one kernel's SASS."""
    inst = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]*)?\s*([^;]*);")
    addrs, ops, loops = [], [], []
    for m in inst.finditer(text):
        addr, op, operands = int(m.group(1), 16), m.group(2), m.group(4)
        if op == "NOP":
            continue
        addrs.append(addr)
        ops.append(op)
        if op == "BRA":
            target = re.search(r"0x([0-9a-f]+)", operands)
            # strictly backward: the BRA-to-itself after EXIT is padding, not a loop
            if target and int(target.group(1), 16) < addr:
                loops.append((int(target.group(1), 16), addr))
    counts = {c: sum(1 for op in ops if op == c) for c in SASS_CLASSES}
    # loop bodies in instructions; a loop nested in another is counted inside it as well
    loop_sizes = [sum(1 for a in addrs if lo <= a <= hi) for lo, hi in loops]
    nested = [any(lo2 <= lo and hi <= hi2 and (lo, hi) != (lo2, hi2) for lo2, hi2 in loops) for lo, hi in loops]
    return dict(total=len(ops), classes=counts, loops=[dict(start=hex(lo), end=hex(hi), size=s, nested=n)
                                                      for (lo, hi), s, n in zip(loops, loop_sizes, nested)])


def per_tile_instructions(sass: dict, inner_trips: int, per_row: bool = False,
                          outer_trips: int = 1, both_passes: bool = False) -> tuple[int, str]:
    """Instructions one thread executes per tile (per row block for the per-row kernels), and how that
    number was obtained."""
    loops = sass["loops"]
    if not loops:
        return sass["total"], "loop-free: whole kernel = one tile"
    if per_row:
        # per-row kernels: their runtime loops run over chunk groups, expert-list blocks or candidate
        # blocks, each `inner_trips` times. A loop that holds such loops (a runtime loop of bisection
        # rounds) runs `outer_trips` times, and the loops inside it outer_trips * inner_trips times.
        def inside(a: dict, b: dict) -> bool:  # a strictly inside b
            return int(b["start"], 16) <= int(a["start"], 16) and int(a["end"], 16) <= int(b["end"], 16) and a != b

        executed = sass["total"]
        for lp in loops:
            holds = [q for q in loops if inside(q, lp)]
            if lp["nested"]:
                executed += lp["size"] * (outer_trips * inner_trips - 1)
            elif holds:
                executed += (lp["size"] - sum(q["size"] for q in holds if not any(inside(q, r) for r in holds))) * (
                    outer_trips - 1)
            else:
                executed += lp["size"] * (inner_trips - 1)
        return executed, (f"static {sass['total']} + loops {[lp['size'] for lp in loops]} (nested: "
                          f"{[lp['nested'] for lp in loops]}) at {inner_trips} trips, {outer_trips} for loops "
                          f"holding loops")
    outer = [lp for lp in loops if not lp["nested"]]
    inner = [lp for lp in loops if lp["nested"]]
    if both_passes:  # a kernel whose loops each read every tile once (the contrastive kernel's two passes)
        return sum(lp["size"] for lp in outer), f"tile loop bodies {[lp['size'] for lp in outer]}, one trip each"
    tile_loop = max(outer, key=lambda lp: lp["size"])
    executed = tile_loop["size"] + sum(lp["size"] * (inner_trips - 1) for lp in inner)
    how = (f"tile loop body {tile_loop['size']} + inner loops {[lp['size'] for lp in inner]} x "
           f"({inner_trips} - 1) further trips")
    return executed, how


def _spill_bytes(ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        suffix = "a" if arch == 90 else ""
        from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself uses for this arch

        run = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    text = run.stdout + run.stderr
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return dict(spill_store_bytes=int(stores.group(1)) if stores else None,
                spill_load_bytes=int(loads.group(1)) if loads else None)


def compile_job(job: KernelJob, arch: int) -> dict:
    """Compile one kernel for sm_<arch> and read its resources and SASS; errors become a status."""
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(REPO))
    row = dict(kernel=job.name, path=job.path, role=job.role, dtype=job.dtype, arch=arch, constants=job.constants,
               modes=job.modes, logits_per_tile=job.logits_per_tile, **({"maxnreg": job.maxnreg} if job.maxnreg else {}))
    start = time.time()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from ngsd_kernels.ops.launcher import LAUNCH_OPTIONS

        triton.runtime.driver.set_active(_offline_driver(arch))
        kernel = getattr(__import__(job.module, fromlist=[job.name]), job.name)
        signature, constants, attrs = _signature(job, list(kernel.arg_names))
        target = GPUTarget("cuda", arch, 32)
        options = dict(num_warps=job.num_warps, num_stages=NUM_STAGES, **LAUNCH_OPTIONS,
                       **({"maxnreg": job.maxnreg} if job.maxnreg else {}))
        compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=target, options=options)
        cubin = compiled.asm["cubin"]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(cubin)
            res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                                 check=True).stdout
            sass_text = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                                       check=True).stdout
    except Exception as exc:  # a failing variant is a result: report it
        row.update(status=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                   compile_s=round(time.time() - start, 1))
        return row
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    sass = parse_sass(sass_text)
    dynamic_shared = int(compiled.metadata.shared)
    total_shared = dynamic_shared + usage.get("SHARED", 0)
    threads = 32 * job.num_warps
    # the logits pass 1 has no tile loop: its only loops are the cold path's bisection rounds
    logits_pass1 = job.name in ("_pass1_kernel", "_pass1_reduce_kernel")
    counted = sass
    if job.name == "_hs_pass1_reduce_kernel":
        # the tile loop is counted without the folded reduce (its row loop would pass for the tile loop);
        # the reduce's own job (_reduce_kernel, RB = 1) gives its instructions per row
        counted = _fast_path_sass(job, arch, signature, constants, attrs, target, options, dict(REDUCE=0))
    executed, how = per_tile_instructions(counted, job.inner_trips, per_row=not job.logits_per_tile or logits_pass1,
                                          outer_trips=job.outer_trips, both_passes=job.path == "contrastive")
    row.update(
        status="ok", compile_s=round(time.time() - start, 1), registers=usage.get("REG"), stack_bytes=usage.get("STACK"),
        local_bytes=usage.get("LOCAL"), shared_bytes=total_shared, shared_limit=SHARED_LIMIT[arch],
        shared_fits=total_shared <= SHARED_LIMIT[arch], cubin_bytes=len(cubin), num_warps=job.num_warps,
        sass_total=sass["total"], sass_classes=sass["classes"], loops=sass["loops"],
        executed_per_thread_per_tile=executed, estimate=how,
        instr_per_logit=round(executed * threads / job.logits_per_tile, 2) if job.logits_per_tile else None,
        instr_per_row=executed * threads // job.constants.get("RB", 1) if not job.logits_per_tile else None,
    )
    row.update(_spill_bytes(compiled.asm["ptx"], arch) if usage.get("STACK", 0) else
               dict(spill_store_bytes=0, spill_load_bytes=0))
    if logits_pass1 and (job.constants.get("KEYS") in (1, 2) and job.constants.get("SLOTS") or "REDUCE" in job.constants):
        # union pass 1 holds a cold exact fallback (rows with more than SLOTS entries above their
        # group-maxima bound: select_tiles.pass1_store_tile), and the folded pass 1 the reduce of its row
        # block (run by one program of the block's chunks), which the static count above includes:
        # the same kernel without them gives what a tile executes when no row needs the fallback
        fast = _fast_path_sass(job, arch, signature, constants, attrs, target, options)
        row.update(fast_path_sass_total=fast["total"],
                   fast_path_instr_per_logit=round(fast["total"] * threads / job.logits_per_tile, 2),
                   fallback_instr_per_logit=round((sass["total"] - fast["total"]) * threads / job.logits_per_tile, 2))
    return row


def _fast_path_sass(job: KernelJob, arch: int, signature: dict, constants: dict, attrs: dict, target, options,
                    overrides: dict | None = None) -> dict:
    """parse_sass of the kernel compiled with FALLBACK=0 (and REDUCE=0 where folded): its loop-free fast path;
    ``overrides``: other constants instead."""
    import triton
    from triton.compiler import ASTSource

    kernel = getattr(__import__(job.module, fromlist=[job.name]), job.name)
    if overrides is None:
        overrides = dict(FALLBACK=0, **({"REDUCE": 0} if "REDUCE" in constants else {}))
    fast = dict(constants, **overrides)
    compiled = triton.compile(ASTSource(kernel, signature, fast, attrs), target=target,
                              options=options)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(compiled.asm["cubin"])
        sass_text = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                                   check=True).stdout
    return parse_sass(sass_text)


def _serve(conn) -> None:
    """A compile worker: receives (job, arch) pairs, answers with report rows, until it gets None."""
    while True:
        work = conn.recv()
        if work is None:
            return
        conn.send(compile_job(*work))


def _failed_row(job: KernelJob, arch: int, status: str) -> dict:
    return dict(kernel=job.name, path=job.path, role=job.role, dtype=job.dtype, arch=arch, constants=job.constants,
                modes=job.modes, status=status)


def compile_all(work: list[tuple[KernelJob, int]], jobs: int, per_variant: float, budget: float) -> list[dict]:
    """Compile every (job, arch) on `jobs` worker processes. A compile running longer than `per_variant`
    seconds is killed (its worker replaced) and reported as a timeout row; once `budget` seconds have
    passed nothing new starts and the rest is reported as not compiled."""
    ctx = mp.get_context("spawn")
    start = time.time()
    pending = list(work)
    workers: list[dict] = []  # {proc, conn, item, since}
    rows: list[dict] = []

    def spawn() -> dict:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        proc.start()
        return dict(proc=proc, conn=parent, item=None, since=0.0)

    def report(row: dict, item) -> None:
        rows.append(row)
        job, arch = item
        print(f"sm_{arch} {job.key():<110} {row['status'][:60]} {row.get('compile_s', '')}", flush=True)

    for _ in range(max(1, jobs)):
        workers.append(spawn())
    while pending or any(w["item"] for w in workers):
        for i, w in enumerate(workers):
            if w["item"] is None and pending and time.time() - start < budget:
                w["item"], w["since"] = pending.pop(0), time.time()
                w["conn"].send(w["item"])
            elif w["item"] is not None:
                if w["conn"].poll():
                    report(w["conn"].recv(), w["item"])
                    w["item"] = None
                elif time.time() - w["since"] > per_variant or not w["proc"].is_alive():
                    why = (f"timeout: compile killed after {per_variant:.0f} s (--per-variant)"
                           if w["proc"].is_alive() else "failed: the compile process died")
                    w["proc"].kill()
                    w["proc"].join()
                    report(_failed_row(w["item"][0], w["item"][1], why), w["item"])
                    workers[i] = spawn()
        if pending and time.time() - start >= budget and not any(w["item"] for w in workers):
            break
        time.sleep(0.2)
    for w in workers:
        if w["proc"].is_alive():
            w["conn"].send(None)
            w["proc"].join(timeout=5)
    for job, arch in pending:
        rows.append(_failed_row(job, arch, f"not compiled: the {budget:.0f} s budget ran out (--budget)"))
    return rows


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _short(constants: dict) -> str:
    keep = ("BB", "BV", "BT", "BLOCK_B", "BLOCK_V", "BLOCK", "K", "KEYS", "SLOTS", "SB", "DIVERGENCE", "SAMPLE", "NEED_V1", "RB", "NCP", "CG",
            "MODE", "GATE", "STORE_TOP", "VALUE_KEYS", "USE_TOPK", "USE_TOPP", "ROW_T", "ROW_K", "ROW_P",
            "TEMPERED")
    return " ".join(f"{k}={constants[k]}" for k in keep if k in constants)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Kernel report (static: compiled, not run)",
        "",
        f"Generated by `{meta['command']}` ({meta['date']}, Triton {meta['triton']}, {meta['seconds']:.0f} s "
        f"on a shared 2-core CPU). No GPU: cubins from Triton's compiler + ptxas, read with cuobjdump. "
        "How every number is obtained: the docstring of `bench/kernel_report.py`.",
        "",
        f"{meta['n_variants']} distinct kernel specialisations can be launched by the planned modes; "
        f"{meta['n_compiled']} compiled in this run per architecture ({meta['selection']}), the others are "
        "listed in `kernel_report.json` as `not compiled`.",
        "",
        "Columns: regs = registers per thread; stack = per-thread stack (spill space), spill = ptxas spill "
        "store/load bytes; smem = static + dynamic shared bytes (fits: within the per-block limit, sm_90 "
        "232448 B, sm_80 166912 B); instr = SASS instructions executed per thread per tile; /logit = instr x 128 "
        "threads / (base + expert logits per tile); per-row kernels show instructions per row instead.",
        "",
        "/logit fast: union pass 1 without its cold exact fallback (the instructions a tile executes when no row "
        "has more than SLOTS entries above its group-maxima bound; ``select_tiles.pass1_store_tile``); /logit counts "
        "the whole kernel, fallback included.",
        "",
        "| arch | path | kernel | dtype | constants | status | regs | stack | spill st/ld | smem | fits | SASS | "
        "instr/tile | /logit | /logit fast | /row | SHFL | BAR | MUFU | HMMA | HGMMA | LDG | STG | LDS | STS | LDL | "
        "STL |",
        "|---|---|---|---|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["arch"], r["path"], r["role"], r["dtype"], _short(r["constants"]))):
        if r["status"] != "ok":
            lines.append(f"| sm_{r['arch']} | {r['path']} | {r['kernel']} | {r['dtype']} | {_short(r['constants'])} | "
                         f"{r['status']} |" + " |" * 21)
            continue
        c = r["sass_classes"]
        lines.append(
            f"| sm_{r['arch']} | {r['path']} | {r['kernel']} | {r['dtype']} | {_short(r['constants'])} | ok | "
            f"{r['registers']} | {r['stack_bytes']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} | "
            f"{r['shared_bytes']} | {'yes' if r['shared_fits'] else '**NO**'} | {r['sass_total']} | "
            f"{r['executed_per_thread_per_tile']} | {r['instr_per_logit'] if r['instr_per_logit'] is not None else ''} | "
            f"{r.get('fast_path_instr_per_logit', '')} | "
            f"{r['instr_per_row'] if r['instr_per_row'] is not None else ''} | "
            + " | ".join(str(c[k]) for k in ("SHFL", "BAR", "MUFU", "HMMA", "HGMMA", "LDG", "STG", "LDS", "STS", "LDL",
                                              "STL"))
            + " |"
        )
    lines += ["", "Per-tile estimate of the looped (hidden-state) kernels: " + meta["hidden_note"], ""]
    return "\n".join(lines)


# H200 SXM (assumptions of the roofline table; see bench/ROOFLINE.md)
HBM_BYTES_PER_S = 4.8e12
SMS = 132
CLOCK_HZ = 1.98e9  # boost clock; every SM sub-partition issues at most one warp instruction per clock
SHFL_SLOTS = 4  # a SHFL occupies ~4 issue slots (32 lanes/clk/SM on Hopper): the upper estimate


def _pass_time_s(row: dict, programs: int, shfl_slots: int, logits_per_tile: int = 0) -> float:
    """Issue-bound time of one launch: each SM runs ceil(programs / SMS) programs; a program's
    4 warps issue in parallel on the 4 sub-partitions, one instruction per clock at best.
    ``logits_per_tile``: the plan's tile when it differs from the compiled one (B = 1 plans BB = 1):
    the compiled instructions per logit times that tile."""
    per_thread = row["executed_per_thread_per_tile"]
    if logits_per_tile and row.get("instr_per_logit"):
        per_thread = row["instr_per_logit"] * logits_per_tile / (32 * row.get("num_warps", NUM_WARPS))
    if row["sass_total"]:
        per_thread += (shfl_slots - 1) * row["sass_classes"]["SHFL"] * per_thread / row["sass_total"]
    return -(-programs // SMS) * per_thread * (row.get("num_warps", NUM_WARPS) / 4) / CLOCK_HZ


def roofline(report: dict, dtype: str = "bf16") -> str:
    """Markdown: per-step estimate of the logits path (greedy / TV / union / K = 64) from the compiled
    counts, against the bytes floor, for B in {1, 32, 256} and V in {32k, 128k, 152k}."""
    from ngsd_kernels.ops.launcher import plan_select
    from ngsd_kernels.params import StepParams

    ok = [r for r in report["rows"] if r["status"] == "ok" and r["arch"] == 90 and r["path"] == "logits"]

    def find(role: str, **consts) -> dict:
        for r in ok:
            if r["role"] == role and r["dtype"] in (dtype, "-") and all(r["constants"].get(k) == v
                                                                         for k, v in consts.items()):
                return r
        raise LookupError(f"no compiled {role} row with {consts}; run kernel_report.py first")

    lines = ["| B | V | tile BB x BV | chunks | pass-1 programs | MB moved (fused) | floor us | pass 1 us | pass 2 us | "
             "reduce+finalize us | step us (issue-bound .. SHFL x4) | step / floor |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for vocab in (32768, 131072, 151936):
        for batch in (1, 32, 256):
            plan = plan_select(batch, vocab, StepParams())
            tile = dict(K=plan.buffer, BB=plan.block_b, BV=plan.block_v)
            p1 = find("pass1", KEYS=plan.key_kind, **tile)
            if p1.get("fast_path_sass_total"):  # union pass 1: the tile's path when no row needs the fallback
                p1 = dict(p1, executed_per_thread_per_tile=p1["fast_path_sass_total"],
                          instr_per_logit=p1["fast_path_instr_per_logit"])
            p2 = find("pass2", SAMPLE=0, DIVERGENCE=0, NEED_V1=1, **tile)
            # per-row kernels: the compiled V = 131072 plan of this batch size stands in for every V
            v_plan = plan_select(batch, 131072, StepParams())
            # the reduce folded into pass 1 runs on the last program of each pass-1 row block (BB rows)
            reduce_rb = v_plan.block_b if v_plan.fold_reduce else v_plan.row_block
            rows_kw = dict(K=plan.buffer, NCP=v_plan.ncp, RB=reduce_rb, CG=v_plan.chunk_group)
            red = find("reduce", STORE_TOP=0, DENSE=1, **rows_kw)
            fin = find("finalize", SAMPLE=0, MODE=0, DIVERGENCE=0, GATE=0, NCP=v_plan.ncp, RB=v_plan.row_block)
            programs = -(-batch // plan.block_b) * plan.n_chunks
            rows_programs = -(-batch // v_plan.row_block)
            elem = 2
            logits_bytes = 2 * 2 * batch * vocab * elem  # two passes over base + expert
            keys_bytes = 2 * 2 * batch * plan.n_chunks * plan.slots * 4  # fp32 slots: pass-1 write + reduce read
            bytes_moved = logits_bytes + keys_bytes
            floor = bytes_moved / HBM_BYTES_PER_S
            times = []
            for slots in (1, SHFL_SLOTS):
                t1 = _pass_time_s(p1, programs, slots)
                t2 = _pass_time_s(p2, programs, slots)
                tr = _pass_time_s(red, -(-batch // reduce_rb), slots) + _pass_time_s(fin, rows_programs, slots)
                # a pass cannot beat its share of the bytes either
                t1 = max(t1, (logits_bytes / 2 + keys_bytes / 2) / HBM_BYTES_PER_S)
                t2 = max(t2, logits_bytes / 2 / HBM_BYTES_PER_S)
                times.append((t1, t2, tr, t1 + t2 + tr))
            lo, hi = times
            lines.append(
                f"| {batch} | {vocab} | {plan.block_b} x {plan.block_v} | {plan.n_chunks} | {programs} | "
                f"{bytes_moved / 1e6:.1f} | {floor * 1e6:.1f} | "
                f"{lo[0] * 1e6:.1f}..{hi[0] * 1e6:.1f} | {lo[1] * 1e6:.1f}..{hi[1] * 1e6:.1f} | "
                f"{lo[2] * 1e6:.1f}..{hi[2] * 1e6:.1f} | {lo[3] * 1e6:.1f}..{hi[3] * 1e6:.1f} | "
                f"{lo[3] / floor:.1f}..{hi[3] / floor:.1f}x |")
    return "\n".join(lines)


def _merge(old: dict, rows: list[dict], jobs: list[KernelJob], meta: dict) -> tuple[list[dict], dict]:
    """Rows of an earlier report updated with this run's: a row compiled now (any status but "not
    compiled") replaces the row of the same kernel, dtype, constants and arch; earlier rows of variants
    the planners no longer launch are dropped."""
    def variant(r: dict) -> tuple:
        return r["kernel"], r["dtype"], json.dumps(r["constants"], sort_keys=True)

    valid = {(j.name, j.dtype, json.dumps(j.constants, sort_keys=True)) for j in jobs}
    merged = {variant(r) + (r["arch"],): r for r in old["rows"] if variant(r) in valid}
    for r in rows:
        key = variant(r) + (r["arch"],)
        if not r["status"].startswith("not compiled") or key not in merged:
            merged[key] = r
    meta = dict(meta, command=f"{old['meta']['command']}; then {meta['command']} (--merge)",
                date=f"{old['meta']['date']}; merged {meta['date']}",
                seconds=old["meta"].get("seconds", 0) + meta["seconds"],
                n_compiled=sum(1 for r in merged.values() if r["arch"] == 90 and r["status"] == "ok"),
                selection="sm_90 rows with status ok, all runs merged")
    return list(merged.values()), meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=(80, 90))
    parser.add_argument("--full", action="store_true", help="compile every specialisation, not the cover")
    parser.add_argument("--only", default="",
                        help="compile only kernels whose key contains this text (starts with it, after a leading ^); "
                             "alternatives separated by ;")
    parser.add_argument("--exclude", default=None, help="and not those whose key contains this text")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    parser.add_argument("--budget", type=float, default=600.0,
                        help="seconds; variants not started by then are reported as not compiled")
    parser.add_argument("--per-variant", type=float, default=240.0,
                        help="seconds one compile may take before it is killed and reported as a timeout")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size H for the hidden-state loop trips")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--list", action="store_true", help="list the specialisations and exit")
    parser.add_argument("--merge", action="store_true",
                        help="merge into an existing --out/kernel_report.json: rows compiled now replace theirs, "
                             "rows of variants that no longer exist are dropped, the others are kept")
    parser.add_argument("--roofline", action="store_true",
                        help="print the ROOFLINE.md table from an existing --out/kernel_report.json and exit")
    args = parser.parse_args(argv)
    if args.roofline:
        sys.path.insert(0, str(REPO))
        print(roofline(json.loads((args.out / "kernel_report.json").read_text())))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this report compiles real GPU code")
    sys.path.insert(0, str(REPO))
    jobs, cover = enumerate_jobs(args.hidden)
    def only(key: str) -> bool:
        return any(key.startswith(part[1:]) if part.startswith("^") else part in key for part in args.only.split(";"))

    chosen = [j for j in jobs if (args.full or j.key() in cover) and only(j.key())
              and not (args.exclude and args.exclude in j.key())]
    if args.only and not any(only(j.key()) for j in jobs):  # a typo once wrote a report of 0 compiled rows
        raise SystemExit(f"--only {args.only!r} matches no specialisation; see --list")
    if args.list:
        for j in jobs:
            print(("*" if j in chosen else " "), j.key(), f"({len(j.modes)} modes)")
        print(f"{len(jobs)} specialisations, {len(chosen)} selected")
        return 0
    import triton

    start = time.time()
    # the first architecture given (sm_90 by default) for every variant before the next one; small
    # buffers first (compile time grows steeply with K where bitonic networks remain), so a budget cut
    # leaves the K = 1024 tail of the last architecture
    # (and within one architecture the one-axis cover first: it holds every kernel kind the roofline uses)
    work = [(j, arch) for arch in args.arch for j in chosen]
    work.sort(key=lambda w: (args.arch.index(w[1]), w[0].key() not in cover, w[0].constants.get("K", 0),
                             w[0].path == "hidden", w[0].role))
    rows = compile_all(work, args.jobs, args.per_variant, args.budget)
    done = {(r["kernel"], r["dtype"], json.dumps(r["constants"], sort_keys=True)) for r in rows}
    for j in jobs:
        if (j.name, j.dtype, json.dumps(j.constants, sort_keys=True)) not in done:
            for arch in args.arch:
                rows.append(dict(kernel=j.name, path=j.path, role=j.role, dtype=j.dtype, arch=arch,
                                 constants=j.constants, modes=j.modes, status="not compiled (--full)"))
    meta = dict(
        command="python3 bench/kernel_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), triton=triton.__version__,
        seconds=time.time() - start, n_variants=len(jobs), n_compiled=len(chosen),
        selection="every specialisation" if args.full else "one-axis-at-a-time cover",
        hidden_note=(f"H = {args.hidden}, so the inner loop over the hidden size runs ceil(H / BLOCK_H) trips per "
                     "vocabulary tile; the tile loop's body (with the inner loop once) plus the inner body for "
                     "the remaining trips."),
        assumptions=dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES, pointers="16-byte aligned",
                         logits_plan="B=256, V=131072", hidden_plan="shared head, B=1 and B=256, V=131072"),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge and (args.out / "kernel_report.json").exists():
        rows, meta = _merge(json.loads((args.out / "kernel_report.json").read_text()), rows, jobs, meta)
    compiled_rows = [r for r in rows if r["status"] != "not compiled (--full)"]
    (args.out / "kernel_report.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (args.out / "KERNELS.md").write_text(markdown(compiled_rows, meta))
    print(f"{len(compiled_rows)} rows in {time.time() - start:.0f}s -> {args.out}/kernel_report.json, KERNELS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
