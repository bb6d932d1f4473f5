"""csrc_triton/: AOT-compile the step kernels for sm_80 and sm_90, build the C++ extension, load it.

No GPU is needed for anything but the last test: the build compiles real cubins (Triton's AOT
compiler with an explicit target, ptxas from the triton wheel), links them into the extension,
and the extension's driver-independent parts (introspection, meta shapes, argument checks, the CPU
error) are exercised here. Running the kernels needs a CUDA device and is skipped without one.

The build runs in subprocesses: the AOT compiler must not see TRITON_INTERPRET=1, which the
kernel tests set in this process. A cold build takes minutes (ptxas); Triton's cache makes
re-runs take seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc_triton"
ARCHS = (80, 90)
# a subset that covers every kernel kind: the hidden-state and logits passes (with their aligned twins),
# greedy, sampling and top-k finalize kernels, the top-k / top-p fallback, the intersection kernels and their
# fallback, the three divergences (the full
# set: build_aot.py --list) (the largest buffer, k1024, and the hidden op's materialised path:
# test_largest_buffer_..., marked slow)
VARIANTS = ("hidden_greedy_tv_bf16", "logits_greedy_kl_fp32_k64", "logits_sample_js_bf16_k16",
            "logits_topk_tv_bf16_k64", "logits_greedy_tv_bf16_k64_inter")

triton = pytest.importorskip("triton", reason="the AOT compiler is part of the triton package")
TRITON_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _run(args: list[str], timeout: int, check: bool = True) -> subprocess.CompletedProcess:
    """python ``args`` in the repository without the interpreter; ``check``: it must succeed."""
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert not check or done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    if not (TRITON_BIN / "ptxas").exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas (neither in the triton wheel nor on PATH): cannot assemble cubins")
    out = tmp_path_factory.mktemp("aot") / "generated"
    _run([str(CSRC / "build_aot.py"), "--arch", *map(str, ARCHS), "--variants", ",".join(VARIANTS),
          "--out", str(out)], timeout=3600)
    return out


def test_gitignore_covers_the_build_folder():
    assert "build/" in (CSRC / ".gitignore").read_text().split()


def test_every_kernel_has_launchers_and_a_cubin_for_each_arch(generated):
    manifest = json.loads((generated / "manifest.json").read_text())
    assert manifest["archs"] == list(ARCHS)
    assert sorted(manifest["variants"]) == sorted(VARIANTS)
    kernels = manifest["kernels"]
    names = {k["kernel"] for k in kernels}
    assert {"_hs_pass1_kernel", "_hs_pass2_kernel", "_pass1_kernel", "_pass2_kernel", "_reduce_kernel",
            "_finalize_kernel", "_sample_fallback_kernel", "_intersection_kernel",
            "_intersection_fallback_kernel"} <= names
    for arch in ARCHS:
        per_arch = [k for k in kernels if k["arch"] == arch]
        assert {k["kernel"] for k in per_arch} == names, f"sm_{arch} misses kernels"
        for entry in per_arch:
            for rel in entry["files"]:
                assert (generated / rel).stat().st_size > 0, rel
            cubin = (generated / entry["cubin"]).read_bytes()
            assert cubin[:4] == b"\x7fELF" and len(cubin) == entry["cubin_bytes"]
            # the launcher embeds the very same bytes
            source = (generated / entry["files"][0]).read_text()
            assert f"CUBIN_NAME[{len(cubin)}]" in source and f"load_{entry['func_name']}" in source
    glue = (generated / "ngsd_aot_glue.c").read_text()
    for variant in VARIANTS:
        assert f"CUresult ngsd_aot_run_{variant}(" in glue


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="cuobjdump not shipped with this triton wheel")
def test_cubins_target_the_requested_architectures(generated):
    manifest = json.loads((generated / "manifest.json").read_text())
    for entry in manifest["kernels"]:
        listing = subprocess.run([str(TRITON_BIN / "cuobjdump"), "-elf", str(generated / entry["cubin"])],
                                 capture_output=True, text=True, check=True).stdout
        want = {80: ".target sm_80", 90: ".target sm_90a"}[entry["arch"]]
        assert want in listing, (entry["cubin"], listing[:500])


def test_float_scalars_are_passed_as_float(generated):
    # triton.tools.compile declares fp32 scalars as C double; build_aot.py must have fixed them
    for header in generated.glob("sm*/*.h"):
        assert "double" not in header.read_text(), header.name
    for entry in json.loads((generated / "manifest.json").read_text())["kernels"]:
        if entry["kernel"] == "_finalize_kernel":
            text = (generated / entry["files"][2]).read_text()
            assert "float decay" in text and "float v_th" in text


def _sass_loads(cubin: Path) -> dict[str, int]:
    """Global-memory load instructions of a cubin by kind (cuobjdump -sass), e.g. {'LDG.E.U16': 48}."""
    listing = subprocess.run([str(TRITON_BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    counts: dict[str, int] = {}
    for op in re.findall(r"\b(LDG(?:STS)?\.E[.A-Z0-9]*)", listing):
        counts[op] = counts.get(op, 0) + 1
    return counts


def _wide(counts: dict[str, int]) -> int:
    return sum(n for op, n in counts.items() if op.endswith((".64", ".128")))


def test_aligned_twins_share_a_launcher_that_checks_alignment(generated):
    manifest = json.loads((generated / "manifest.json").read_text())
    twins = [k for k in manifest["kernels"] if "aligned" in k]
    # hidden pass 1 and 2 (weights, hidden states), logits pass 2 (logits), on every arch
    assert {(k["kernel"], k["arch"]) for k in twins} == {
        (name, arch) for name in ("_hs_pass1_kernel", "_hs_pass2_kernel", "_pass2_kernel") for arch in ARCHS}
    assert not [k for k in manifest["kernels"] if k["kernel"] in ("_pass1_kernel", "_reduce_kernel",
                                                                    "_finalize_kernel") and "aligned" in k]
    for entry in twins:
        aligned = entry["aligned"]
        cubin = (generated / aligned["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF" and len(cubin) == aligned["cubin_bytes"]
        link = (generated / entry["files"][2]).read_text()
        # the dispatcher tries the aligned specialisation first, under a run-time check of every hint
        first, second = link.index(f"return {aligned['func_name']}("), link.index(f"return {entry['func_name']}(")
        assert first < second
        condition = link[:first].rsplit("if (", 1)[1]
        for arg in aligned["args"]:
            assert f"((uintptr_t){arg} % 16 == 0)" in condition, (entry["out_name"], arg)
        generic_condition = link[first:second].rsplit("if (", 1)[1]
        for arg in aligned["args"]:
            assert f"{arg} % 16" not in generic_condition


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="cuobjdump not shipped with this triton wheel")
def test_aligned_cubins_load_16_bytes_at_a_time(generated):
    manifest = json.loads((generated / "manifest.json").read_text())
    for entry in manifest["kernels"]:
        if "aligned" not in entry:
            continue
        generic = _sass_loads(generated / entry["cubin"])
        aligned = _sass_loads(generated / entry["aligned"]["cubin"])
        where = (entry["kernel"], entry["arch"], generic, aligned)
        # the generic cubin loads the user tensors with scalar 2-byte (bf16) or 4-byte (fp32) loads;
        # the aligned one with 16-byte ones (LDG.E.128, or cp.async LDGSTS.E.BYPASS.128 into shared memory)
        assert _wide(aligned) > _wide(generic), where
        assert sum(generic.values()) > sum(aligned.values()), where


def test_build_refuses_a_kernel_argument_it_cannot_wire(tmp_path):
    script = (
        "import sys; sys.argv = ['x']\n"
        "sys.path.insert(0, 'csrc_triton')\n"
        "import build_aot\n"
        "spec = build_aot.hidden_variant('bf16').steps[0][0]\n"
        "del spec.args['tiles_per_split']\n"
        "from ngsd_kernels.ops.hidden_select import _hs_pass1_kernel\n"
        "build_aot._signature(spec, list(_hs_pass1_kernel.arg_names))\n"
    )
    done = _run(["-c", script], 300, check=False)
    assert done.returncode != 0 and "tiles_per_split" in (done.stdout + done.stderr)


EXT_PROBE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[3])
from csrc_triton.setup_ext import build_extension
path = build_extension(sys.argv[1], sys.argv[2])
out = {"path": str(path), "info": json.loads(torch.ops.ngsd_aot.info())}
meta = dict(device="meta")
hb = torch.empty(5, 64, dtype=torch.bfloat16, **meta)
w = torch.empty(1000, 64, dtype=torch.bfloat16, **meta)
pot, alpha = torch.empty(5, **meta), torch.empty(5, **meta)
seed, offset = torch.empty(1, dtype=torch.long, **meta), torch.empty(5, dtype=torch.long, **meta)
lb = torch.empty(5, 600000, **meta)
lb16 = torch.empty(5, 50000, dtype=torch.bfloat16, **meta)
shapes = lambda res: [[list(t.shape), str(t.dtype)] for t in res]
out["hidden_meta"] = shapes(torch.ops.ngsd_aot.hidden_select_greedy(hb, hb, w, pot, alpha, candidate_k=32, gate=1))
out["logits_meta"] = shapes(torch.ops.ngsd_aot.logits_select_greedy(lb[:, :1000], lb[:, :1000], pot, alpha,
                                                                     divergence=1, candidate_k=40))
# a shut gate needs no candidates: any compiled buffer serves (the plan's k16 is not compiled here)
out["closed_meta"] = shapes(torch.ops.ngsd_aot.logits_select_greedy(lb[:, :1000], lb[:, :1000], pot, alpha,
                                                                    divergence=1, gate=2, candidate_k=5000))
out["hidden_select_meta"] = shapes(torch.ops.ngsd_aot.hidden_select(hb, hb, w, pot, alpha, gate=2))
out["sample_meta"] = shapes(torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, seed, offset, divergence=2, candidate_k=10,
                                                             temperature=0.7, top_k=50000))
# top-k sampling (k = 40 -> the 64-entry buffer), gate shut too: logits_topk_tv_bf16_k64
out["topk_meta"] = shapes(torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, seed, offset, candidate_k=10,
                                                           temperature=0.7, top_k=40))
out["topk_closed_meta"] = shapes(torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, seed, offset, gate=2,
                                                                  temperature=0.7, top_k=40))
# SafeDecoding's intersection (k = 10, 5 candidates -> the 64-entry floor): logits_greedy_tv_bf16_k64_inter,
# with the gate shut too (no intersection kernels then: any buffer's variant)
out["inter_meta"] = shapes(torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, candidate_mode=1, candidate_k=10,
                                                            min_candidates=5, score_floor=1e-4))
out["inter_closed_meta"] = shapes(torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, candidate_mode=1, gate=2))
calls = {
    "cpu": lambda: torch.ops.ngsd_aot.hidden_select_greedy(torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(5, 8),
                                                           torch.zeros(2), torch.zeros(2)),
    "candidate_k": lambda: torch.ops.ngsd_aot.hidden_select_greedy(hb, hb, w, pot, alpha, candidate_k=65),
    "candidate_k_cap": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, candidate_k=1025),
    "gate": lambda: torch.ops.ngsd_aot.logits_select_greedy(lb, lb, pot, alpha, gate=3),
    "vocab": lambda: torch.ops.ngsd_aot.logits_select_greedy(lb, lb, pot, alpha, divergence=1),
    "divergence": lambda: torch.ops.ngsd_aot.hidden_select(hb, hb, w, pot, alpha, divergence=3),
    "not_compiled": lambda: torch.ops.ngsd_aot.hidden_select(hb, hb, w, pot, alpha, divergence=2),
    "top_p": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, seed, offset, divergence=2, candidate_k=10,
                                                      temperature=1.0, top_p=0.9),
    "tempered_top_p": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, seed, offset, divergence=2,
                                                               candidate_k=10, temperature=0.7, top_p=0.9),
    "top_k": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, seed, offset, divergence=2, candidate_k=10,
                                                      temperature=0.7, top_k=40),
    "intersection": lambda: torch.ops.ngsd_aot.hidden_select(hb, hb, w, pot, alpha, candidate_mode=1),
    "min_candidates_cap": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, candidate_mode=1,
                                                                   min_candidates=2000),
    "score_floor": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, candidate_mode=1, score_floor=0.0),
    "top_k_cap": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, seed, offset, temperature=0.7,
                                                          top_k=2000),
    "hidden_top_k": lambda: torch.ops.ngsd_aot.hidden_select(hb, hb, w, pot, alpha, seed, offset, temperature=0.7,
                                                             top_k=40),
    "no_seed": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, divergence=2, candidate_k=10, temperature=0.7),
    "seed_rows": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, seed, seed.expand(3),
                                                          divergence=2, candidate_k=10, temperature=0.7),
    "temperature": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, seed, offset, divergence=2, candidate_k=10,
                                                            temperature=-1.0),
    # the meta functions check inputs as the CUDA ops do, before the variant lookup
    "meta_rows": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16, pot[:4], alpha, candidate_k=10),
    "meta_dtypes": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16.float(), pot, alpha, candidate_k=10),
    "inter_k32": lambda: torch.ops.ngsd_aot.logits_select(lb16, lb16, pot, alpha, seed, offset, candidate_mode=1, gate=2,
                                                          temperature=0.7, top_k=20),
}
errors = {}
for name, call in calls.items():
    try:
        call()
        errors[name] = None
    except RuntimeError as err:
        errors[name] = str(err).splitlines()[0]
out["errors"] = errors
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def extension(generated, tmp_path_factory):
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            pytest.skip("torch.utils.cpp_extension needs ninja")
    build_dir = tmp_path_factory.mktemp("ext")
    done = _run(["-c", EXT_PROBE, str(generated), str(build_dir), str(REPO)], timeout=1800)
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_extension_compiles_links_and_loads(extension):
    library = Path(extension["path"])
    assert library.is_file()
    # nothing links against the CUDA driver: it is opened at run time, so the library loads here
    if shutil.which("nm"):
        undefined = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True,
                                   text=True).stdout
        assert " cuLaunchKernel" not in undefined and " cuModuleLoadData" not in undefined
    info = extension["info"]
    assert sorted(info["manifest"]["variants"]) == sorted(VARIANTS)
    assert info["manifest"]["archs"] == list(ARCHS)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    if not has_gpu:
        assert info["driver_ok"] is False
        assert "libcuda.so.1" in info["driver_error"] or "cuInit" in info["driver_error"]


def test_extension_meta_shapes_and_argument_checks(extension):
    expected = [[[5], "torch.int64"], [[5], "torch.float32"], [[5], "torch.bool"], [[5], "torch.float32"]]
    for op in ("hidden_meta", "logits_meta", "hidden_select_meta", "sample_meta", "closed_meta", "topk_meta",
               "topk_closed_meta", "inter_meta", "inter_closed_meta"):
        assert extension[op] == expected, op
    errors = extension["errors"]
    assert "CUDA tensors only" in errors["cpu"]
    # k = 65: a 128-entry buffer, above the fused hidden kernels' 64: the materialised fp32 logits variant
    assert "variant logits_greedy_tv_fp32_k128 was not compiled" in errors["candidate_k"]
    assert "candidate_k must be in [1, 1024]" in errors["candidate_k_cap"]
    assert "gate must be 0 (LIF), 1 (open) or 2 (closed)" in errors["gate"]
    assert "vocabularies above 524288 tokens are not compiled" in errors["vocab"]
    assert "divergence must be 0 (total variation), 1 (KL) or 2 (Jensen-Shannon)" in errors["divergence"]
    # a setting whose variant this build did not compile: the build command and the JIT path
    assert "variant hidden_greedy_js_bf16 was not compiled" in errors["not_compiled"]
    assert "--variants hidden_greedy_js_bf16" in errors["not_compiled"]
    # the intersection mode from hidden states: fp32 logits, then the logits kernels (not compiled here)
    assert "variant logits_greedy_tv_fp32_k64_inter was not compiled" in errors["intersection"]
    assert "min_candidates must be at most 1024" in errors["min_candidates_cap"]
    assert "score_floor must be > 0" in errors["score_floor"]
    # top-k / top-p sampling is compiled (build_aot.py --variants "logits_topk*"): variants this build lacks name
    # themselves; top-p alone takes a buffer of at least 256 entries (the plan's floor), top-k its k's
    assert "variant logits_topp_js_bf16_k256 was not compiled" in errors["top_p"]
    assert "variant logits_topk_js_bf16_k64 was not compiled" in errors["top_k"]
    assert "top-p at a temperature other than 1 is not compiled" in errors["tempered_top_p"]
    assert "top_k must be at most 1024" in errors["top_k_cap"]
    # from hidden states, top-k sampling runs the logits kernels on fp32 logits (as the JIT's HiddenLaunch)
    assert "variant logits_topk_tv_fp32_k64 was not compiled" in errors["hidden_top_k"]
    assert "temperature sampling needs `seed`" in errors["no_seed"]
    assert "offset must hold 1 or 5 values" in errors["seed_rows"]
    assert "temperature must be finite and 0 (greedy) or >= 1e-5" in errors["temperature"]
    assert "potential and alpha must have shape [5]" in errors["meta_rows"]
    assert "logits dtypes differ" in errors["meta_dtypes"]
    assert "intersection variants start at k64" in errors["inter_k32"] and "JIT" in errors["inter_k32"]


def test_variant_table_lists_exactly_the_compiled_variants(generated):
    glue = (generated / "ngsd_aot_glue.c").read_text()
    names = re.findall(r'\{"(\w+)", ngsd_aot_run_\w+, ([\d, ]+)\}', glue)
    assert [n for n, _ in names] == list(VARIANTS)
    import importlib.util

    spec = importlib.util.spec_from_file_location("ngsd_build_aot", CSRC / "build_aot.py")
    build_aot = sys.modules.get("ngsd_build_aot")
    if build_aot is None:
        build_aot = importlib.util.module_from_spec(spec)
        sys.modules["ngsd_build_aot"] = build_aot  # its dataclasses look their module up there
        spec.loader.exec_module(build_aot)
    variants = build_aot.all_variants()
    for name, values in names:
        # block_b, block_v, K, SLOTS, NCP, DIVERGENCE, SAMPLE as the kernels were compiled
        assert [int(v) for v in values.split(",")] == build_aot._table_values(variants[name]), name
        v = variants[name]
        for gate, seq in v.steps.items():
            kernels = {spec.name.replace("_hs_", "_"): spec for spec in seq}  # the hidden passes as the logits ones
            pass1, reduce, pass2, final = (kernels[n] for n in ("_pass1_kernel", "_reduce_kernel", "_pass2_kernel",
                                                                "_finalize_kernel"))
            inter = v.constants.get("MODE") == 1 and gate != 2
            # the order of launcher.launch_select: the intersection kernel before pass 2; after the finalize the
            # top-k / top-p fallback, then the intersection fallback
            order = ["_pass1_kernel", "_reduce_kernel", *(["_intersection_kernel"] if inter else []), "_pass2_kernel",
                     "_finalize_kernel", *(["_sample_fallback_kernel"] if v.constants["SAMPLE"] == 2 else []),
                     *(["_intersection_fallback_kernel"] if inter else [])]
            assert [spec.name.replace("_hs_", "_") for spec in seq] == order, (name, gate)
            for name_ in ("_sample_fallback_kernel", "_intersection_kernel", "_intersection_fallback_kernel"):
                if name_ in kernels:
                    assert all(kernels[name_].constants[f] == final.constants[f] for f in ("USE_TOPK", "USE_TOPP"))
            assert final.constants["MODE"] == v.constants.get("MODE", 0)
            assert pass2.constants["DIVERGENCE"] == final.constants["DIVERGENCE"] == v.constants["DIVERGENCE"]
            assert pass2.constants["SAMPLE"] == final.constants["SAMPLE"] == v.constants["SAMPLE"]
            assert final.constants["GATE"] == gate and reduce.constants["RB"] == final.constants["RB"]
            if v.op == "logits_select":
                # a shut gate: no candidates (KEYS 0, the plan's 16-entry buffer, or top-k's), else the variant's
                # buffer with value keys (union) or (value, id) keys (intersection)
                assert pass1.constants["KEYS"] == (0 if gate == 2 else (2 if inter else 1))
                assert reduce.constants["NEED_KEYS"] == int(gate != 2) and reduce.constants["STORE_TOP"] == int(inter)
                shut = v.constants["K"] if v.constants.get("USE_TOPK") else (256 if v.constants.get("USE_TOPP") else 16)
                assert pass1.constants["K"] == reduce.constants["K"] == (v.constants["K"] if gate != 2 else shut)
                assert pass1.constants["SLOTS"] == reduce.constants["SLOTS"]


def test_logits_variants_use_the_jit_plan_constants():
    # build_aot.check_against_jit_plan against launcher.plan_select, in a process without TRITON_INTERPRET
    # (the interpreter's plan picks other tiles)
    script = (
        "import sys; sys.path.insert(0, 'csrc_triton')\n"
        "import build_aot\n"
        "variants = build_aot.all_variants()\n"
        "for v in variants.values(): build_aot.check_against_jit_plan(v)\n"
        "ks = sorted({v.constants['K'] for v in variants.values() if v.op == 'logits_select'})\n"
        "print('OK', len(variants), ks)\n"
        "v = variants['logits_greedy_tv_bf16_k64']\n"
        "v.steps[0][1].args['CG'] = '8'\n"
        "build_aot.check_against_jit_plan(v)\n"
    )
    done = _run(["-c", script], 300, check=False)
    # union: 144 greedy / sampling variants and 153 top-k / top-p ones (top-p alone from buffers of 256);
    # intersection: 207 (buffers from 64)
    assert "OK 504 [16, 32, 64, 128, 256, 512, 1024]" in done.stdout, done.stdout + done.stderr
    assert done.returncode != 0 and "_reduce_kernel constants differ from launcher.plan_select" in done.stderr


LARGE_PROBE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[3])
from csrc_triton.setup_ext import build_extension
build_extension(sys.argv[1], sys.argv[2])
meta = dict(device="meta")
hb = torch.empty(5, 64, dtype=torch.bfloat16, **meta)
w = torch.empty(1000, 64, dtype=torch.bfloat16, **meta)
pot = torch.empty(5, **meta)
# candidate_k > 64 from hidden states: fp32 logits by one GEMM, then logits_greedy_kl_fp32_k1024
res = torch.ops.ngsd_aot.hidden_select(hb, hb, w, pot, pot, candidate_k=600, divergence=1)
lb = torch.empty(5, 5000, **meta)
res2 = torch.ops.ngsd_aot.logits_select_greedy(lb, lb, pot, pot, candidate_k=1000, divergence=1)
print("RESULT" + json.dumps([[list(t.shape) for t in r] for r in (res, res2)]))
"""


@pytest.mark.slow
def test_largest_buffer_builds_and_the_hidden_op_materialises(tmp_path):
    """k1024: the largest top-K buffer (2048 value slots per chunk, 4 chunks per reduce step) compiles
    for both archs, and the hidden op routes candidate_k > 64 to the fp32 logits variant (minutes cold)."""
    if not (TRITON_BIN / "ptxas").exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas")
    out = tmp_path / "generated"
    _run([str(CSRC / "build_aot.py"), "--arch", *map(str, ARCHS), "--variants", "logits_greedy_kl_fp32_k1024",
          "--out", str(out)], timeout=3600)
    manifest = json.loads((out / "manifest.json").read_text())
    variant = manifest["variants"]["logits_greedy_kl_fp32_k1024"]
    assert {k: variant["constants"][k] for k in ("K", "SLOTS", "CG", "RB")} == dict(K=1024, SLOTS=2048, CG=4, RB=1)
    for entry in manifest["kernels"]:
        assert (out / entry["cubin"]).read_bytes()[:4] == b"\x7fELF"
    done = _run(["-c", LARGE_PROBE, str(out), str(tmp_path / "ext"), str(REPO)], timeout=1800)
    shapes = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    assert shapes == [[[5], [5], [5], [5]]] * 2


GPU_PROBE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[3])
from csrc_triton.setup_ext import build_extension
from ngsd_kernels import Divergence, StepParams, guarded_select_reference
build_extension(sys.argv[1], sys.argv[2])
torch.manual_seed(0)
dev = "cuda"
B, H, V = 5, 256, 5000
w = (torch.randn(V, H, device=dev) * 0.05).bfloat16()
hb = torch.randn(B, H, device=dev).bfloat16()
he = (hb.float() + 0.5 * torch.randn(B, H, device=dev)).bfloat16()
pot = torch.tensor([0.0, 0.95, 0.5, 0.9, 0.2], device=dev)
alpha = torch.full((B,), 0.9, device=dev)
seed = torch.tensor([1234], dtype=torch.long, device=dev)
offset = torch.arange(B, dtype=torch.long, device=dev) * 7
zero = torch.zeros(1, dtype=torch.long, device=dev)
lb, le = hb.float() @ w.float().T, he.float() @ w.float().T
report = {}
def compare(name, out, ref):
    report[name] = dict(tokens=bool(torch.equal(out[0], ref[0])), spike=bool(torch.equal(out[2], ref[2])),
                        div=float((out[3] - ref[3]).abs().max()), pot=float((out[1] - ref[1]).abs().max()))
for gate in (0, 1, 2):
    ref = guarded_select_reference(lb, le, pot, alpha, zero, zero, StepParams(candidate_k=32, gate=gate))
    compare(f"hidden-tv-{gate}", torch.ops.ngsd_aot.hidden_select_greedy(hb, he, w, pot, alpha, candidate_k=32,
                                                                        gate=gate), ref)
    # the same hidden states in unaligned storage: the generic cubins (one element offset)
    hb2 = torch.empty(B * H + 1, dtype=hb.dtype, device=dev)[1:].view(B, H).copy_(hb)
    compare(f"hidden-tv-unaligned-{gate}", torch.ops.ngsd_aot.hidden_select_greedy(hb2, he, w, pot, alpha,
                                                                                  candidate_k=32, gate=gate), ref)
    params = StepParams(candidate_k=40, gate=gate, divergence=Divergence.KL)
    ref = guarded_select_reference(lb, le, pot, alpha, zero, zero, params)
    compare(f"logits-kl-k64-{gate}", torch.ops.ngsd_aot.logits_select_greedy(lb, le, pot, alpha, candidate_k=40,
                                                                            gate=gate, divergence=1), ref)
    lb16, le16 = lb.bfloat16(), le.bfloat16()
    params = StepParams(candidate_k=10, gate=gate, divergence=Divergence.JS, temperature=0.7)
    ref = guarded_select_reference(lb16, le16, pot, alpha, seed, offset, params)
    compare(f"logits-js-sample-k16-{gate}", torch.ops.ngsd_aot.logits_select(
        lb16, le16, pot, alpha, seed, offset, candidate_k=10, gate=gate, divergence=2, temperature=0.7), ref)
print("RESULT" + json.dumps(report))
"""


def test_kernels_match_the_reference_on_a_gpu(generated, extension, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the AOT kernels were built but cannot run here")
    done = _run(["-c", GPU_PROBE, str(generated), str(tmp_path), str(REPO)], timeout=1800)
    report = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
    for case, result in report.items():
        assert result["tokens"] and result["spike"], (case, result)
        assert result["div"] < 1e-4 and result["pot"] < 1e-4, (case, result)
