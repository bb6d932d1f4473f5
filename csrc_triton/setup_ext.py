#!/usr/bin/env python3
"""Build and load the C++ torch extension over the AOT-compiled launchers.

Two steps, neither of which needs a GPU or a CUDA toolkit (only cuda.h, which the triton wheel
ships, and a C/C++ compiler):

1. every generated C file (the launchers of ``build_aot.py`` with their embedded cubins, the
   linker dispatchers, the glue) and ``ngsd_cuda_shim.c`` are compiled with the C compiler into
   objects, the generated ones with ``-include ngsd_cuda_shim.h`` so that their driver calls go
   through the dlopen shim, all with hidden visibility;
2. ``ngsd_ext.cpp`` is compiled and linked with those objects by ``torch.utils.cpp_extension``
   (ninja), which registers the ``torch.ops.ngsd_aot`` ops when the library is loaded.

Usage:

    python csrc_triton/build_aot.py          # first: the launchers (build/generated/)
    python csrc_triton/setup_ext.py          # then: the extension (build/ext/...)

    >>> from csrc_triton.setup_ext import load_extension  # doctest: +SKIP
    >>> load_extension()                                    # doctest: +SKIP
    >>> torch.ops.ngsd_aot.hidden_select_greedy(hb, he, weight, potential, alpha)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_GENERATED = HERE / "build" / "generated"
DEFAULT_BUILD = HERE / "build" / "ext"


def find_cuda_include(explicit: str | os.PathLike | None = None) -> Path:
    """A folder holding cuda.h: explicit, $CUDA_HOME/include, /usr/local/cuda/include, or triton's copy."""
    candidates = [Path(explicit)] if explicit else []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "include")
    except ImportError:
        pass
    for folder in candidates:
        if (folder / "cuda.h").is_file():
            return folder
    raise FileNotFoundError(
        f"cuda.h not found in {[str(c) for c in candidates]}; install the CUDA headers (or the triton wheel, "
        "which ships them) or pass --cuda-include"
    )


def find_c_compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise FileNotFoundError("no C compiler found (set CC)")


def generated_sources(generated: Path) -> list[Path]:
    if not (generated / "ngsd_aot_glue.c").is_file():
        raise FileNotFoundError(
            f"{generated}/ngsd_aot_glue.c is missing: run `python csrc_triton/build_aot.py` first"
        )
    return sorted(generated.glob("sm*/*.c")) + [generated / "ngsd_aot_glue.c"]


def compile_objects(generated: Path, obj_dir: Path, cuda_include: Path, verbose: bool = False) -> list[Path]:
    """Step 1: the C sources -> objects (rebuilt only when a source is newer than its object), in a folder of their
    own per generated folder: objects of another build's glue, newer than this one's sources, were once linked in."""
    cc = find_c_compiler()
    obj_dir = obj_dir / hashlib.sha1(str(generated.resolve()).encode()).hexdigest()[:12]
    obj_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-O2", "-fPIC", "-fvisibility=hidden", "-w", f"-I{cuda_include}", f"-I{generated}", f"-I{HERE}"]
    jobs = [(src, ["-include", str(HERE / "ngsd_cuda_shim.h")]) for src in generated_sources(generated)]
    jobs.append((HERE / "ngsd_cuda_shim.c", []))
    objects = []
    for src, extra in jobs:
        rel = src.relative_to(generated) if src.is_relative_to(generated) else Path(src.name)
        obj = obj_dir / (str(rel).replace("/", "__") + ".o")
        if not obj.exists() or obj.stat().st_mtime < src.stat().st_mtime:
            cmd = [cc, *flags, *extra, "-c", str(src), "-o", str(obj)]
            if verbose:
                print(" ".join(cmd))
            subprocess.run(cmd, check=True)
        objects.append(obj)
    return objects


def build_extension(
    generated: str | os.PathLike = DEFAULT_GENERATED,
    build_dir: str | os.PathLike = DEFAULT_BUILD,
    cuda_include: str | os.PathLike | None = None,
    verbose: bool = False,
) -> Path:
    """Compile the launchers and ngsd_ext.cpp into one shared library, load it, return its path.

    Loading registers ``torch.ops.ngsd_aot.*`` (harmless without a GPU: the driver is only opened
    when an op runs on CUDA tensors). The library name carries a digest of the objects, so a
    rebuilt set of launchers always gets a freshly linked library.
    """
    from torch.utils import cpp_extension

    generated, build_dir = Path(generated).resolve(), Path(build_dir).resolve()
    include = find_cuda_include(cuda_include)
    objects = compile_objects(generated, build_dir / "obj", include, verbose)
    digest = hashlib.sha256()
    for obj in objects:
        digest.update(obj.read_bytes())
    name = f"ngsd_aot_ext_{digest.hexdigest()[:10]}"
    ext_dir = build_dir / name
    ext_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        name=name,
        sources=[str(HERE / "ngsd_ext.cpp")],
        extra_include_paths=[str(include), str(generated), str(HERE)],
        extra_cflags=["-O2"],
        extra_ldflags=[*map(str, objects), "-ldl", "-lpthread"],
        build_directory=str(ext_dir),
        verbose=verbose,
        with_cuda=False,  # nothing links against CUDA libraries: the shim dlopens the driver
    )
    return Path(cpp_extension.load(is_python_module=False, **kwargs))


def load_extension(generated: str | os.PathLike = DEFAULT_GENERATED, build_dir: str | os.PathLike = DEFAULT_BUILD,
                   verbose: bool = False) -> Path:
    """Build (when needed) and load the extension; afterwards ``torch.ops.ngsd_aot`` holds the ops."""
    return build_extension(generated, build_dir, verbose=verbose)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", type=Path, default=DEFAULT_GENERATED, help="build_aot.py output folder")
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD)
    parser.add_argument("--cuda-include", default=None, help="folder with cuda.h (default: searched)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    path = build_extension(args.generated, args.build_dir, args.cuda_include, args.verbose)
    print(f"extension: {path}")
    import torch

    print(torch.ops.ngsd_aot.info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
