"""One evaluation end to end: load suites, model and expert; generate (cached); score; plot; report.

>>> from ngsd.eval import load_config, run_evaluation
>>> outcome = run_evaluation(load_config("smoke"), out_dir="eval_runs/smoke")   # doctest: +SKIP
>>> outcome.report_md                                                           # doctest: +SKIP
PosixPath('eval_runs/smoke/REPORT.md')
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .judge import Judge
from .config import EvalConfig
from .metrics import compute_metrics
from .plots import make_plots
from .report import write_reports
from .runner import DecodingSettings, GenerationCache, Runner, folder_fingerprint
from .suites import load_suites

CACHE_NAME = Path("cache") / "generations.jsonl"


class ExpertNotFoundError(FileNotFoundError):
    """The expert named for the run does not exist (e.g. the shipped expert is not trained yet)."""


@dataclass
class EvalOutcome:
    out_dir: Path
    results_json: Path
    report_md: Path
    readme_table: Path
    plots: list[Path]
    metrics: dict[str, Any]
    generated: int
    reused: int
    wall_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def shipped_expert_dir() -> Path:
    """The shipped expert's folder."""
    from ..experts.shipped import shipped_expert_path

    path = shipped_expert_path()
    if not path.is_dir():
        raise ExpertNotFoundError(f"the shipped expert is missing at {path}; reinstall ngsd")
    return path


def locate_expert(expert: str | os.PathLike[str] | None) -> tuple[str | None, str | None]:
    """(what to pass to ngsd as expert, fingerprint for the cache) for an --expert value.

    "shipped" is the LoRA expert shipped inside the package; "none" or None means no expert.
    """
    if expert is None or str(expert).lower() in ("", "none"):
        return None, None
    text = str(expert)
    if text == "nest":  # the NeST delta shipped for the default model
        from ..nest.shipped import shipped_nest_path

        text = str(shipped_nest_path())
    path = shipped_expert_dir() if text == "shipped" else Path(text).expanduser()
    if text == "shipped" and not (path / "adapter_model.safetensors").is_file():
        raise ExpertNotFoundError(
            f"the shipped expert is not there yet ({path} has no adapter_model.safetensors). Train it with "
            "`ngsd train-expert`, pass --expert PATH to an adapter or model folder, or run only --methods off"
        )
    if path.is_dir():
        if not any((path / name).is_file() for name in ("adapter_config.json", "config.json", "nest_delta.safetensors")):
            raise ExpertNotFoundError(f"{path} is neither a peft adapter folder, a model checkpoint folder nor a NeST delta")
        return str(path), f"{path.name}:{folder_fingerprint(path)}"
    if text.startswith((".", "/", "~")):
        raise ExpertNotFoundError(f"expert path {text!r} does not exist")
    return text, f"hub:{text}"


def model_fingerprint(name_or_path: str | None, revision: str | None = None) -> str:
    """A cache identity for the base model: its name plus a fingerprint of its checkpoint folder, or for a hub
    id the commit it was loaded at (`revision`: the loaded config's ``_commit_hash``)."""
    from ..loading import is_default_model, resolve_model_path

    source = resolve_model_path(name_or_path)
    label = "smollm2-135m-instruct" if is_default_model(name_or_path) else str(name_or_path)
    path = Path(source)
    if path.is_dir():
        return f"{label}:{folder_fingerprint(path)}"
    return f"hub:{source}@{revision}" if revision else f"hub:{source}"


def _data_dir_used(data_dir) -> str | None:
    """The data folder the suites were read from, also when it came from $NGSD_DATA_DIR or the default."""
    from ..data import DataNotFoundError, resolve_data_dir

    try:
        return str(resolve_data_dir(data_dir))
    except DataNotFoundError:  # every suite from a file of its own (absolute paths)
        return None


def _installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _git_state() -> str | None:
    """`<short commit>` plus "+uncommitted changes" when the checkout differs from it (best effort); None when
    ngsd is not run from its own checkout (an installed ngsd inside a user's repository read the user's commit)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not ((root / "setup.py").is_file() and (root / ".git").exists()):
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + (" +uncommitted changes" if dirty else "")) if head else None


def expert_training_info(path: str | None) -> dict[str, Any] | None:
    """Name, command and recorded results of an expert trained by `ngsd train-expert` (its training_report.json)."""
    if path is None:
        return None
    report = Path(path) / "training_report.json"
    if not report.is_file():
        return None
    import json

    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return None
    return {k: data.get(k) for k in ("expert", "command", "seed", "train_seconds", "adapter_size_bytes") if k in data}


def record_invocation(cache_path: Path | None, run: dict[str, Any], *, out_dir: Path | None = None,
                      config_name: str | None = None) -> list[dict[str, Any]]:
    """Append this invocation to `runs.jsonl` beside the cache and return all invocations so far.

    A resumed or re-rendered report thereby still shows how long the runs that generated its
    answers took. Each entry names its output folder and configuration, because one cache file
    (--cache) may serve several reports: see `invocations_of_this_report`.
    """
    entry = {k: run.get(k) for k in ("started", "wall_seconds", "generated", "reused_from_cache", "command")}
    entry["load_average_end"] = run["environment"].get("load_average_end")
    entry["threads"] = run["environment"].get("threads")
    entry["out_dir"] = str(Path(out_dir).resolve()) if out_dir is not None else None
    entry["config"] = config_name
    if cache_path is None:
        return [entry]
    import json

    log = cache_path.parent / "runs.jsonl"
    history = []
    if log.is_file():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                history.append(json.loads(line))
            except ValueError:
                continue
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    return history + [entry]


def invocations_of_this_report(history: list[dict[str, Any]], out_dir: Path, config_name: str,
                               cache_path: Path | None) -> tuple[list[dict[str, Any]], int]:
    """(the invocations of `history` that wrote this report: same output folder and configuration, the number of
    the others). A cache shared through --cache logged every report's runs in one runs.jsonl, and each report
    listed all of them as its own. An entry from before entries named their folder counts as this report's only
    where the cache lies inside the output folder (the default layout, where only this folder's runs wrote it)."""
    folder = Path(out_dir).resolve()
    legacy_is_ours = cache_path is not None and folder in Path(cache_path).resolve().parents
    ours = [entry for entry in history
            if (entry["out_dir"] == str(folder) and entry.get("config") == config_name if "out_dir" in entry
                else legacy_is_ours)]
    return ours, len(history) - len(ours)


def checks_fitted_for_another_expert(methods: list[Any], runner: Runner, expert: Any) -> list[dict[str, Any]]:
    """Where a method's risk probe runs a divergence check fitted for another expert than the evaluated one: one
    entry per such probe, {"probe", "fitted_for", "expert", "methods"}. Decoding warns of it once on the console;
    the report must say it too, also when every answer came from the cache."""
    from ..risk.estimate import check_fitted_for_another_expert, expert_name, probe_plan
    from ..risk.probe import RiskProbe

    found: dict[Path, dict[str, Any]] = {}
    for method in methods:
        folder = runner.probe_folder(method) if expert is not None else None
        if folder is None:
            continue
        plan = probe_plan(RiskProbe.load(folder), method.config.reflection, mode=method.config.mode)
        fitted_for = check_fitted_for_another_expert(plan, expert)
        if fitted_for is not None:
            entry = found.setdefault(folder, {"probe": str(folder), "fitted_for": fitted_for,
                                              "expert": expert_name(expert), "methods": []})
            entry["methods"].append(method.name)
    return list(found.values())


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def with_dtype(model_id: str, model: Any) -> str:
    """The model's cache id with its dtype, when not float32: another dtype decodes other answers, so they get cache
    entries of their own (float32's keys stay as they were)."""
    import torch

    dtype = next(model.parameters()).dtype
    return model_id if dtype == torch.float32 else f"{model_id}@{str(dtype).removeprefix('torch.')}"


def run_evaluation(
    config: EvalConfig,
    *,
    out_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    model: Any = None,
    tokenizer: Any = None,
    model_id: str | None = None,
    judge: Judge | None = None,
    cache_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    command: str | None = None,
) -> EvalOutcome:
    """Run `config` and write results.json, REPORT.md, README_TABLE.md and the PNGs into `out_dir`.

    model/tokenizer: an already loaded pair (tests, notebooks); otherwise `config.model` is loaded.
    limit: at most this many prompts per suite. cache_path: default `<out_dir>/cache/generations.jsonl`.
    """
    import torch

    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        # Oversubscribed CPUs punish multi-threaded kernels (threads wait on descheduled siblings).
        torch.set_num_threads(config.threads)
    try:
        return _run(config, out_dir=out_dir, data_dir=data_dir, limit=limit, model=model, tokenizer=tokenizer,
                    model_id=model_id, judge=judge, cache_path=cache_path, progress=progress, command=command)
    finally:
        torch.set_num_threads(previous_threads)


def _run(config: EvalConfig, *, out_dir, data_dir, limit, model, tokenizer, model_id, judge, cache_path, progress,
         command) -> EvalOutcome:
    import torch

    from ..experts.resolve import resolve_expert

    started = time.time()
    load_before = _load_average()
    out = Path(out_dir)
    suites = load_suites(config.suites, data_dir, limit)
    methods = config.resolved_methods()
    # Find the expert before loading the model, so a missing one fails fast.
    expert_source, expert_id = (None, None)
    if any(m.uses_expert for m in methods):
        expert_source, expert_id = locate_expert(config.expert)
        if expert_source is None:
            raise ExpertNotFoundError(
                f"methods {[m.name for m in methods if m.uses_expert]} need an expert; pass --expert or drop them"
            )

    GenerationCache.check_path(cache_path if cache_path is not None else out / CACHE_NAME)  # before the model loads
    if model is None:
        from ..loading import load_model

        model, tokenizer = load_model(config.model, dtype=getattr(torch, config.dtype))
        model_id = model_id or model_fingerprint(config.model, getattr(model.config, "_commit_hash", None))
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    model_id = model_id or getattr(model.config, "_name_or_path", None) or type(model).__name__
    model_id = with_dtype(model_id, model)

    expert_obj = resolve_expert(expert_source, model, tokenizer=tokenizer) if expert_source is not None else None

    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails on its inputs leaves no empty folder
    cache = GenerationCache(cache_path if cache_path is not None else out / CACHE_NAME)
    runner = Runner(
        model,
        tokenizer,
        model_id=model_id,
        expert=expert_obj,
        expert_id=expert_id,
        settings=DecodingSettings(max_new_tokens=config.max_new_tokens),
        batch_size=config.batch_size,
        cache=cache,
        progress=progress,
    )
    results = runner.run(methods, suites)
    gated = {m.name: m.gated for m in methods}
    metrics = compute_metrics(
        results, suites, config.suites, gated, judge=judge, reference=config.reference,
        fidelity_tokens=config.fidelity_tokens, targets=config.targets,
    )
    plots = make_plots(
        metrics, results, config.suites, gated, {m.name: m.config.v_th for m in methods}, out, config.trace_examples
    )
    wall = time.time() - started
    environment = {
        "ngsd": _installed_version("ngsd"),
        "transformers": _installed_version("transformers"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "device": str(getattr(model, "device", "cpu")),
        "dtype": str(next(model.parameters()).dtype),
        "load_average_start": load_before,
        "load_average_end": _load_average(),
    }
    run_info = {
        "command": command,
        "model": config.model or "smollm2 (SmolLM2-135M-Instruct, offline default)",
        "model_id": model_id,
        "expert": config.expert if expert_source else None,
        "expert_path": expert_source,
        "expert_id": expert_id,
        "expert_training": expert_training_info(expert_source),
        "git": _git_state(),
        "data_dir": _data_dir_used(data_dir),
        "limit": limit,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_seconds": wall,
        # Time spent generating every answer of this report, whenever it was generated (resumed runs included).
        "answer_seconds": sum(r["gen_seconds"] + r.get("reflect_seconds", 0.0)
                              for per_suite in results.values() for records in per_suite.values() for r in records),
        "generated": runner.generated,
        "reused_from_cache": runner.reused,
        "cache": str(cache.path) if cache.path else None,
        "environment": environment,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),  # prompts are fed as plain text without
        "probe": config.probe,  # None: the probe shipped for the model, where methods read one
        "probe_checks_for_another_expert": checks_fitted_for_another_expert(methods, runner, expert_obj),
    }
    history = record_invocation(cache.path, run_info, out_dir=out, config_name=config.name)
    run_info["history"], run_info["other_invocations_of_cache"] = invocations_of_this_report(
        history, out, config.name, cache.path)
    paths = write_reports(out, config, methods, suites, results, metrics, plots, run_info)
    return EvalOutcome(
        out_dir=out,
        results_json=paths["results"],
        report_md=paths["report"],
        readme_table=paths["readme_table"],
        plots=plots,
        metrics=metrics,
        generated=runner.generated,
        reused=runner.reused,
        wall_seconds=wall,
    )


__all__ = ["EvalOutcome", "ExpertNotFoundError", "locate_expert", "model_fingerprint", "run_evaluation",
           "shipped_expert_dir"]
