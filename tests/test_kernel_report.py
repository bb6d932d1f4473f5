"""bench/kernel_report.py: the static kernel report (issue 17) compiles a real variant and reads its cubin."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "kernel_report.py"
# the smallest kernel of the default mode (greedy, TV, union, K = 64, logits path): compiles in seconds
SMALL_KEY = "_finalize_kernel[-|DIVERGENCE=0,GATE=0,MODE=0,NCP=32,NEED_V0=1,RB=2,SAMPLE=0,SB=1,SLOTS=1,USE_TOPK=0,USE_TOPP=0]"


def _report_module():
    spec = importlib.util.spec_from_file_location("ngsd_kernel_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ngsd_kernel_report"] = module
    spec.loader.exec_module(module)
    return module


def _missing_tools() -> list[str]:
    try:
        import triton
    except ImportError:
        return ["triton"]
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return [t for t in ("ptxas", "cuobjdump") if not (bin_dir / t).exists()]


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   MUFU.EX2 R5, R5 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
        /*0080*/                   NOP;
"""


def test_parse_sass_counts_classes_and_finds_the_backward_branch_only():
    report = _report_module()
    sass = report.parse_sass(SASS)
    assert sass["total"] == 8  # NOP padding excluded
    assert sass["classes"]["SHFL"] == 1 and sass["classes"]["BAR"] == 1 and sass["classes"]["MUFU"] == 1
    assert sass["classes"]["LDG"] == 1 and sass["classes"]["BRA"] == 2
    # 0x40 -> 0x10 is a loop of 4 instructions; the BRA-to-itself after EXIT is not
    assert [(lp["start"], lp["end"], lp["size"]) for lp in sass["loops"]] == [("0x10", "0x40", 4)]
    executed, how = report.per_tile_instructions(sass, inner_trips=9)
    assert executed == 4 and "tile loop" in how
    assert report.per_tile_instructions(dict(total=7, loops=[]), 9)[0] == 7


def _without_interpreter() -> dict:
    # GPU plans and real compilation: the planners pick interpreter block sizes under TRITON_INTERPRET=1
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_enumeration_covers_every_k_dtype_and_mode():
    run = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True,
                         env=_without_interpreter(), cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    listed = [line[2:].split(" (")[0] for line in run.stdout.splitlines() if line[:2] in ("* ", "  ")]
    chosen = [line[2:].split(" (")[0] for line in run.stdout.splitlines() if line.startswith("* ")]
    assert SMALL_KEY in chosen and len(listed) > len(chosen) > 20
    pass1 = [key for key in listed if key.startswith(("_pass1_kernel[", "_pass1_reduce_kernel["))]
    constants = [set(key[key.index("[") + 1 : -1].replace("|", ",").split(",")) for key in pass1]
    for part in ("K=64", "K=256", "K=1024", "bf16", "fp16", "fp32", "KEYS=0", "KEYS=1", "KEYS=2"):
        assert any(part in c for c in constants), part  # every buffer size, dtype, key kind (shut/union/inter.)
    # the reduce runs inside pass 1 except in intersection mode (SelectPlan.fold_reduce)
    assert all(("KEYS=2" in key) == key.startswith("_pass1_kernel[") for key in pass1)
    # the fused hidden-state kernels are planned up to K = 64 (hidden_select.HIDDEN_MAX_BUFFER); larger
    # buffers run the logits kernels on materialised fp32 logits; at B = 1 their pass 1 holds the reduce
    hidden = [key for key in listed if key.startswith(("_hs_pass1_kernel[", "_hs_pass1_reduce_kernel["))]
    assert any("K=64," in key for key in hidden) and not any(f"K={k}," in key for k in (256, 1024) for key in hidden)
    assert any(key.startswith("_hs_pass1_reduce_kernel[") for key in hidden)
    for sample in (0, 1, 2):
        assert any(key.startswith("_pass2_kernel[") and f"SAMPLE={sample}]" in key for key in listed), sample
    # per-row sampling settings (vLLM's shared launches): the kernels that read them, with ROW_T = 1
    assert {key.split("[")[0] for key in listed if "ROW_T=1" in key} == {
        "_pass2_kernel", "_hs_pass2_kernel", "_intersection_kernel", "_finalize_kernel", "_sample_fallback_kernel",
        "_intersection_fallback_kernel"}


@pytest.mark.skipif(bool(_missing_tools()), reason=f"Triton's ptxas/cuobjdump not shipped here: {_missing_tools()}")
def test_one_small_variant_compiles_for_sm90_and_reports_its_resources(tmp_path):
    env = _without_interpreter()
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "--jobs", "1", "--budget", "240", "--only", SMALL_KEY,
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "kernel_report.json").read_text())["rows"]
    compiled = [r for r in rows if r["status"] != "not compiled (--full)"]
    assert len(compiled) == 1, [r["status"] for r in compiled]
    row = compiled[0]
    assert row["status"] == "ok", row["status"]
    assert 0 < row["registers"] <= 255
    assert row["stack_bytes"] >= 0 and row["spill_store_bytes"] >= 0 and row["spill_load_bytes"] >= 0
    assert row["shared_bytes"] > 0 and row["shared_fits"] is True
    assert row["sass_total"] > 0 and row["instr_per_row"] > 0 and row["instr_per_logit"] is None
    assert (tmp_path / "KERNELS.md").read_text().count("| sm_90 |") == 1


def _compile_for_sm90(tmp_path: Path, keys: tuple[str, ...]) -> dict[str, dict]:
    """The report's rows of exactly these specialisations, compiled for sm_90 (key -> row)."""
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--full", "--arch", "90", "--jobs", "1", "--budget", "240", "--only",
         ";".join(keys), "--out", str(tmp_path)],
        capture_output=True, text=True, env=_without_interpreter(), cwd=REPO, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "kernel_report.json").read_text())["rows"]
    compiled = {f"{r['kernel']}[{r['dtype']}|" + ",".join(f"{k}={v}" for k, v in sorted(r["constants"].items()))
                + (f"|maxnreg={r['maxnreg']}" if r.get("maxnreg") else "") + "]":
                r for r in rows if r["status"] != "not compiled (--full)"}
    assert sorted(compiled) == sorted(keys)
    assert all(r["status"] == "ok" and r["spill_store_bytes"] == 0 for r in compiled.values()), compiled
    return compiled


ROW_T_KEYS = ("_sample_fallback_kernel[bf16|BT=2048,MODE=0,ROW_K=1,ROW_P=0,ROW_T=1,USE_TOPK=1,USE_TOPP=0]",
              "_intersection_fallback_kernel[bf16|BT=1024,R=2,ROW_K=1,ROW_P=0,ROW_T=1,SAMPLE=2,USE_TOPK=1,USE_TOPP=0]")


@pytest.mark.skipif(bool(_missing_tools()), reason=f"Triton's ptxas/cuobjdump not shipped here: {_missing_tools()}")
def test_per_row_sampling_fallbacks_compile_for_sm90(tmp_path):
    # the interpreter runs what the compiler refuses: a runtime branch that turns a scalar argument
    # (the temperature, top-k) into a per-row tensor ran on the CPU and failed to compile (a new name is needed)
    _compile_for_sm90(tmp_path, ROW_T_KEYS)


FOLDED_KEYS = (
    "_pass1_reduce_kernel[bf16|BB=1,BV=4096,CG=32,FALLBACK=1,K=16,KEYS=0,NCP=32,REDUCE=1,SLOTS=16|maxnreg=255]",
    "_pass1_reduce_kernel[bf16|BB=1,BV=4096,CG=32,FALLBACK=1,K=64,KEYS=1,NCP=32,REDUCE=1,SLOTS=128|maxnreg=255]",
    "_hs_pass1_reduce_kernel[bf16|BLOCK_B=8,BLOCK_H=64,BLOCK_V=64,CG=32,HAS_BIAS_B=0,HAS_BIAS_E=0,K=16,KEYS=0,"
    "NCP=256,REDUCE=1,SHARED=1,UPCAST=0]",
)


@pytest.mark.skipif(bool(_missing_tools()), reason=f"Triton's ptxas/cuobjdump not shipped here: {_missing_tools()}")
def test_pass_1_with_the_reduce_folded_in_compiles_for_sm90_without_spills(tmp_path):
    # the interpreter runs the ticket (an atomic returning a scalar, a runtime branch, a noinline call)
    # whatever the compiler would make of it: the default step's pass 1 and the hidden path's, compiled
    compiled = _compile_for_sm90(tmp_path, FOLDED_KEYS)
    # the tile's instructions, without the block's reduce
    assert compiled[FOLDED_KEYS[1]]["fast_path_instr_per_logit"] <= 40
