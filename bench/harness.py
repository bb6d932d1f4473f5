"""What the benchmarks share: model and expert set-up, prompts, the timed methods, clocks, memory, results files.

Imported by `bench_decode.py` (end-to-end and naive comparisons, the command line) and
`bench_breakdown.py` (one step, reflection cost); it imports neither.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

# With 2+ OpenMP threads on a machine other processes keep busy, the default spin-waiting makes a
# forward pass 10-20x slower (measured here: 17 s instead of 0.8 s); passive waiting avoids it.
# Set before torch is imported; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _path in (str(REPO), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

from ngsd import NGSDConfig, encode_prompts, guarded_generate  # noqa: E402
from ngsd.experts.lora import LoraAdapter  # noqa: E402

RESULTS_DIR = BENCH_DIR / "results"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_ALPHA = 0.9  # the high-risk alpha; explicit so that self-reflection stays out of the decode timing
METHODS = ("unguarded", "ngsd_off", "ngsd_lora", "ngsd_model", "open_lora", "safedecoding_lora")
METHOD_LABELS = {
    "unguarded": "unguarded model.generate (greedy)",
    "ngsd_off": "guarded loop, gate off (base only)",
    "ngsd_lora": "NGSD, LoRA expert in one batched forward",
    "ngsd_model": "NGSD, separate expert model (LoRA merged)",
    "open_lora": "gate forced open, LoRA expert",
    "safedecoding_lora": "SafeDecoding mode, LoRA expert",
}



# ---------------------------------------------------------------------------------------------
# Environment, timing and memory helpers
# ---------------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def environment(device: str) -> dict[str, Any]:
    """What the numbers were measured on; load average says how busy the shared machine was."""
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": device,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    info["git"] = git_state()
    return info


def git_state() -> dict[str, Any]:
    """The commit measured, and which library files differed from it (the tree changes often)."""
    import subprocess

    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = run("git", "status", "--porcelain", "--", "ngsd", "ngsd_kernels")
    return {"commit": run("git", "rev-parse", "--short", "HEAD"), "changed": dirty.splitlines()}


class PeakMemory:
    """Peak memory of one block: GPU bytes allocated on CUDA, resident set (VmHWM) on CPU.

    On Linux the RSS high-water mark is reset by writing 5 to /proc/self/clear_refs, so each block
    gets its own peak; where that is not possible the process-lifetime peak from `resource` is
    reported and `scope` says so.
    """

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.before_bytes = 0
        self.scope = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before_bytes = torch.cuda.memory_allocated()
            self.scope = "cuda max_memory_allocated during the call"
        else:
            _release_free_heap()
            self.before_bytes = _rss_bytes("VmRSS") or 0
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                self.scope = "process RSS high-water mark during the call (VmHWM, reset before)"
            except OSError:
                self.scope = "process RSS high-water mark since start (ru_maxrss; could not reset)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            hwm = _rss_bytes("VmHWM")
            if hwm is None:
                import resource

                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.peak_bytes = hwm


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the next block's RSS peak shows what it allocates
    rather than staying at the level an earlier call left behind."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class TimingStreamer:
    """A `streamer` for both `model.generate` and `guarded_generate`: the time of every put.

    The first put is the prompt; each later put is one decode step's tokens, so the gaps between
    puts are the per-step latencies and the first token's put marks the time to first token.
    Wall-clock and process CPU time are both kept (see `cpu_clock`).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.cpu_times.append(cpu_clock())

    def end(self) -> None:
        pass


@dataclass
class RunTiming:
    seconds: float
    ttft_s: float
    step_latencies_s: list[float]
    peak_bytes: int
    before_bytes: int
    tokens: torch.Tensor = field(repr=False)  # [B, new_tokens] generated ids
    cpu_seconds: float = 0.0
    cpu_step_latencies_s: list[float] = field(default_factory=list)


def cpu_clock() -> float:
    """CPU seconds used by this process, all threads together.

    On a CPU shared with other jobs, wall-clock time also counts the time spent waiting for a core;
    CPU time counts only the work, so it is the steadier measure of what a method costs. (It says
    nothing about GPU work, so on CUDA only wall-clock time is reported.)
    """
    return time.process_time()


def timed_call(fn: Callable[[TimingStreamer], torch.Tensor], device: str) -> RunTiming:
    streamer = TimingStreamer(device)
    synchronize(device)
    with PeakMemory(device) as memory:
        start, cpu_start = time.perf_counter(), cpu_clock()
        tokens = fn(streamer)
        synchronize(device)
        end, cpu_end = time.perf_counter(), cpu_clock()
    puts = streamer.times
    ttft = (puts[1] - start) if len(puts) > 1 else end - start
    steps = [b - a for a, b in zip(puts[1:], puts[2:])]
    cpu_steps = [b - a for a, b in zip(streamer.cpu_times[1:], streamer.cpu_times[2:])]
    return RunTiming(end - start, ttft, steps, memory.peak_bytes, memory.before_bytes, tokens.cpu(),
                     cpu_seconds=cpu_end - cpu_start, cpu_step_latencies_s=cpu_steps)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# Model, expert and prompts
# ---------------------------------------------------------------------------------------------


def bench_adapter_dir() -> Path:
    base = Path(os.environ.get("NGSD_CACHE_DIR", Path.home() / ".cache" / "ngsd")).expanduser()
    return base / "bench-lora-r16"


def make_random_lora(model: torch.nn.Module, folder: Path, rank: int = 16, seed: int = 0, scale: float = 0.02) -> Path:
    """A real peft LoRA adapter (r 16, all attention and MLP projections) with small random weights.

    Stand-in for the shipped expert while it does not exist: decoding speed does not depend on
    the adapter's values, only on its shape, and the gate's work is the same whether it fires or not.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter); make the expert differ
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(folder))
    return folder


def resolve_bench_expert(model: torch.nn.Module, expert: str | None) -> tuple[Path, str]:
    """(adapter folder, description): `expert` if given, else the shipped expert, else a random stand-in."""
    if expert:
        return Path(expert), "given on the command line"
    try:
        import ngsd

        path = Path(ngsd.shipped_expert_path())
        if (path / "adapter_config.json").is_file():
            return path, "shipped expert"
    except Exception as error:  # not shipped yet: fall back to a stand-in of the same shape
        reason = f"{type(error).__name__}: {error}"
    else:
        reason = "shipped_expert_path() has no adapter_config.json"
    folder = bench_adapter_dir()
    if not (folder / "adapter_config.json").is_file():
        make_random_lora(model, folder)
    return folder, f"random stand-in LoRA r16 on all projections ({reason})"


def merged_expert_model(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """A second copy of the base with the LoRA merged into its weights: the 'separate expert model' case."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).merge_and_unload()
    return merged.eval()


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 or a negative count failed with a traceback after the model loaded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def benchmark_prompts(n: int) -> list[str]:
    """`n` prompts alternating AdvBench behaviours and MT-Bench first turns (varied lengths)."""
    from ngsd.data import load_suite

    advbench = [p.text for p in load_suite("advbench", limit=n)]
    mt_bench = [p.text for p in load_suite("mt_bench", limit=n)]
    # alternating while MT-Bench lasts, then AdvBench alone (it paired an AdvBench prompt with itself past 160)
    mixed = [text for pair in zip(advbench, mt_bench) for text in pair] + advbench[len(mt_bench):]
    if len(mixed) < n:
        raise ValueError(f"only {len(mixed)} benchmark prompts available, {n} asked")
    return mixed[:n]


@dataclass
class Setup:
    model: torch.nn.Module
    tokenizer: Any
    device: str
    adapter_dir: Path
    adapter: LoraAdapter
    expert_source: str
    _expert_model: torch.nn.Module | None = None

    @property
    def expert_model(self) -> torch.nn.Module:
        if self._expert_model is None:
            self._expert_model = merged_expert_model(self.model, self.adapter_dir)
        return self._expert_model

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompts(self.tokenizer, list(prompts), device=self.device)


def load_setup(
    model_name: str | None = None,
    device: str | None = None,
    dtype: str = "float32",
    expert: str | None = None,
) -> Setup:
    from ngsd.loading import load_model

    device = device or default_device()
    model, tokenizer = load_model(model_name, dtype=getattr(torch, dtype), device=device)
    adapter_dir, source = resolve_bench_expert(model, expert)
    return Setup(model, tokenizer, device, adapter_dir, LoraAdapter.load(adapter_dir), source)


# ---------------------------------------------------------------------------------------------
# The methods, all greedy, all exactly `new_tokens` tokens per row
# ---------------------------------------------------------------------------------------------

Runner = Callable[[torch.Tensor, torch.Tensor, int, TimingStreamer], torch.Tensor]


def method_runners(setup: Setup, alpha: float = DEFAULT_ALPHA) -> dict[str, Runner]:
    model = setup.model

    def unguarded(ids, mask, new_tokens, streamer):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=setup.pad_id,
            streamer=streamer,
        )
        return out[:, ids.shape[1] :]

    def guarded(expert, config: NGSDConfig) -> Runner:
        def run(ids, mask, new_tokens, streamer):
            out = guarded_generate(
                model,
                ids,
                mask,
                expert=expert,
                config=config,
                alpha=alpha,
                max_new_tokens=new_tokens,
                eos_token_id=None,
                pad_token_id=setup.pad_id,
                streamer=streamer,
            )
            return out.sequences[:, ids.shape[1] :]

        return run

    def with_model(config: NGSDConfig) -> Runner:
        def run(ids, mask, new_tokens, streamer):
            return guarded(setup.expert_model, config)(ids, mask, new_tokens, streamer)

        return run

    return {
        "unguarded": unguarded,
        "ngsd_off": guarded(None, NGSDConfig(mode="off")),
        "ngsd_lora": guarded(setup.adapter, NGSDConfig()),
        "ngsd_model": with_model(NGSDConfig()),
        "open_lora": guarded(setup.adapter, NGSDConfig(mode="open")),
        "safedecoding_lora": guarded(setup.adapter, NGSDConfig(mode="safedecoding")),
    }


def expert_sizes(setup: Setup) -> dict[str, int]:
    """Bytes the expert occupies beside the base, in the model's dtype (the LoRA weights are cast to it
    when attached; counting the file's dtype would change the figure once another part has attached it)."""
    model_element = next(setup.model.parameters()).element_size()
    adapter_bytes = sum((p.down.numel() + p.up.numel()) * model_element for p in setup.adapter.pairs.values())
    model_bytes = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    return {"lora_adapter_bytes": adapter_bytes, "expert_model_parameter_bytes": model_bytes}


def write_json(name: str, payload: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    from ngsd.experts.row_products import measured_plans, pinned_plan

    environment_record = payload.get("environment") or payload.get("meta", {}).get("environment")
    if isinstance(environment_record, dict):
        # which form the LoRA hooks used for a few guarded rows on this CPU (it can move a guarded row's cost 3x)
        environment_record["lora_row_plan"] = pinned_plan() or measured_plans() or "not used"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def common_meta(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "command": "python bench/bench_decode.py " + " ".join(sys.argv[1:]),
        "environment": environment(setup.device),
        "model": getattr(setup.model.config, "_name_or_path", "") or "SmolLM2-135M-Instruct (default)",
        "dtype": str(next(setup.model.parameters()).dtype),
        "expert": {"path": str(setup.adapter_dir), "source": setup.expert_source, **expert_sizes(setup)},
    }
