"""Where one guarded decode step spends its time, and what self-reflection costs per request.

Run through ``bench_decode.py`` (shared options and model loading):

    python bench/bench_decode.py breakdown      # -> bench/results/breakdown.json
    python bench/bench_decode.py rows           # -> bench/results/guarded_rows.json
    python bench/bench_decode.py reflection     # -> bench/results/reflection.json

Breakdown, per batch size (default 1 and 32), all greedy with the LoRA expert in one batched forward:

1. In the real loop: `guarded_generate` under `torch.profiler`, read through the loop's own
   `record_function` ranges ("ngsd.forward": the forward pair of one step, base and expert rows;
   "ngsd.select": the selection op). A step is the gap between two streamer puts; what the two
   ranges leave of it is the loop's own bookkeeping (masks, concatenation, stop checks, the one
   host sync). The profiler adds its own cost to every operator it records, so the step time is
   also taken from an unprofiled run of the same call, and the shares are applied to that. The
   selection op issues many small operators, which the profiler slows most (15 ms profiled against
   8 ms timed at batch 32): the unprofiled run also times the step op itself with a clock around
   `GuardedStep.run`, less the LM heads inside it (`selector.pair_logits`); that is the target's
   figure (`select_timed_s`). Like every benchmark here it runs with OMP_WAIT_POLICY=PASSIVE (`harness.py`),
   which the op's many parallel passes pay for in thread wake-ups (about 12 ms against 8 ms with OpenMP's
   default waiting, batch 32, 2 threads).
2. The forward alone at the same context length, with the cache cropped back after each call:
   base rows only, base + expert rows without the adapter, and with it; so the cost of running
   the expert rows and of the LoRA hooks is visible, and the best ratio this expert design allows.
3. The selection op alone on the step's real logits, and a torch.profiler table of its operators.
4. One step of plain `model.generate` at the same batch, for scale.

Rows: (2) for R of B rows guarded (default B 32, R 1, 4, 16, 32), which is how the default configuration
runs a batch (the probe routes most benign rows): what R expert rows cost one decode forward, split into
their rows and the LoRA hooks.

Reflection: `ngsd.risk.reflection.reflect` in "generate" (JSON answer, the reference) and "prefill"
modes, interleaved, for one batch of requests and for a single request; seconds per request.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

# harness first: it sets the OpenMP wait policy and the import paths before torch is imported
from harness import (
    DEFAULT_ALPHA,
    Setup,
    TimingStreamer,
    benchmark_prompts,
    common_meta,
    cpu_clock,
    median,
    method_runners,
    synchronize,
    write_json,
)

import torch  # noqa: E402  (after harness)
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from ngsd import NGSDConfig, guarded_generate  # noqa: E402
from ngsd.decoding.kv_cache import cache_kwargs, returned_cache  # noqa: E402
from ngsd.decoding.pair import AdapterPair, positions_from_mask  # noqa: E402
from ngsd_kernels import guarded_select  # noqa: E402

LOOP_RANGES = ("ngsd.forward", "ngsd.select")  # record_function names in ngsd/decoding/loop.py

# ---------------------------------------------------------------------------------------------
# 1. The real loop, through its profiler ranges
# ---------------------------------------------------------------------------------------------


def _activities(device: str) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])


def range_times(prof: Any, names: tuple[str, ...] = LOOP_RANGES) -> dict[str, dict[str, float]]:
    """Calls and mean seconds per call of each named `record_function` range in a finished profile.

    Host time is the range's wall time on the calling thread; on CUDA the device time of the work
    launched inside it is given too (`device_s`).
    """
    out = {}
    for event in prof.key_averages():
        if event.key in names and event.count:
            entry = {"calls": event.count, "host_s": event.cpu_time_total / event.count / 1e6}
            device_total = getattr(event, "device_time_total", 0) or 0
            if device_total:
                entry["device_s"] = device_total / event.count / 1e6
            out[event.key] = entry
    missing = set(names) - set(out)
    if missing:
        raise RuntimeError(f"the profile holds no range {sorted(missing)}: were they renamed in ngsd/decoding/loop.py?")
    return out


LM_HEAD_OPS = ("aten::linear", "aten::matmul")  # how the step op runs the LM heads (ngsd_kernels.ops.hidden_torch)


def nested_seconds(prof: Any, inside: str, names: tuple[str, ...] = LM_HEAD_OPS) -> float:
    """Mean host seconds per `inside` range spent in the outermost operators named `names` within it.

    The step from final hidden states runs the LM heads inside the step op's range: this is their share,
    so that the selection itself is still told apart from the head's matrix product.
    """
    events = prof.events()
    calls = sum(1 for e in events if e.name == inside)
    total = 0.0
    for event in events:
        if event.name not in names:
            continue
        parent, within, outermost = event.cpu_parent, False, True
        while parent is not None:
            if parent.name in names:
                outermost = False
            if parent.name == inside:
                within = True
            parent = parent.cpu_parent
        if within and outermost:
            total += event.cpu_time_total
    return total / 1e6 / calls if calls else 0.0


def _step_gaps(streamer: TimingStreamer) -> tuple[list[float], list[float]]:
    """(wall, CPU) seconds between consecutive token puts (the first put is the prompt)."""
    wall = [b - a for a, b in zip(streamer.times[1:], streamer.times[2:])]
    cpu = [b - a for a, b in zip(streamer.cpu_times[1:], streamer.cpu_times[2:])]
    return wall, cpu


def _guarded(setup: Setup, ids: torch.Tensor, mask: torch.Tensor, steps: int, streamer: TimingStreamer):
    return guarded_generate(
        setup.model, ids, mask, expert=setup.adapter, config=NGSDConfig(), alpha=DEFAULT_ALPHA,
        max_new_tokens=steps + 1, eos_token_id=None, pad_token_id=setup.pad_id, streamer=streamer,
    )


@contextlib.contextmanager
def step_op_clock(device: str):
    """Wall seconds of every step op call (`GuardedStep.run`) less the LM heads inside it, without the profiler:
    yields the list the calls append to."""
    import ngsd.decoding.step as step_module
    import ngsd_kernels.selector as selector_module

    run, heads = step_module.GuardedStep.run, selector_module.pair_logits
    inside: list[float] = []
    selection: list[float] = []

    def timed_heads(*args, **kwargs):
        start = time.perf_counter()
        out = heads(*args, **kwargs)
        synchronize(device)
        inside.append(time.perf_counter() - start)
        return out

    def timed_run(self, *args, **kwargs):
        synchronize(device)
        inside.clear()
        start = time.perf_counter()
        out = run(self, *args, **kwargs)
        synchronize(device)
        selection.append(time.perf_counter() - start - sum(inside))
        return out

    step_module.GuardedStep.run, selector_module.pair_logits = timed_run, timed_heads
    try:
        yield selection
    finally:
        step_module.GuardedStep.run, selector_module.pair_logits = run, heads


def loop_breakdown(setup: Setup, ids: torch.Tensor, mask: torch.Tensor, steps: int, repeats: int) -> dict[str, Any]:
    """Per round: the step time of an unprofiled call (and its step op, clocked), and the forward/select shares
    of a profiled one."""
    per_round = []
    for _ in range(repeats):
        plain = TimingStreamer(setup.device)
        with step_op_clock(setup.device) as selection:
            _guarded(setup, ids, mask, steps, plain)
        wall, cpu = _step_gaps(plain)
        profiled = TimingStreamer(setup.device)
        with profile(activities=_activities(setup.device)) as prof:
            _guarded(setup, ids, mask, steps, profiled)
        synchronize(setup.device)
        profiled_wall, _ = _step_gaps(profiled)
        ranges = range_times(prof)
        profiled_step = sum(profiled_wall) / len(profiled_wall)
        head = nested_seconds(prof, "ngsd.select")
        per_round.append({
            "step_s": sum(wall) / len(wall),
            "cpu_step_s": sum(cpu) / len(cpu),
            "profiled_step_s": profiled_step,
            "forward_share": ranges["ngsd.forward"]["host_s"] / profiled_step,
            # the step op's range holds the LM heads when the step runs from final hidden states
            "lm_head_share": head / profiled_step,
            "select_share": (ranges["ngsd.select"]["host_s"] - head) / profiled_step,
            "select_timed_s": median(selection[1:] or selection),  # the first step plans the selector
            "ranges": ranges,
        })
    return {"rounds": per_round}


def summarise_loop(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds. Forward and select times are their shares of the profiled step applied
    to the unprofiled step; the loop's own overhead is what they leave of it."""
    step = median([r["step_s"] for r in rounds])
    forward_share = median([r["forward_share"] for r in rounds])
    head_share = median([r.get("lm_head_share", 0.0) for r in rounds])
    select_share = median([r["select_share"] for r in rounds])
    overhead_share = max(0.0, 1.0 - forward_share - head_share - select_share)
    timed = [r["select_timed_s"] for r in rounds if "select_timed_s" in r]
    clocked = {"select_timed_s": median(timed), "select_timed_share": median(timed) / step} if timed else {}
    return {
        **clocked,
        "rounds": rounds, "step_s": step, "cpu_step_s": median([r["cpu_step_s"] for r in rounds]),
        "profiled_step_s": median([r["profiled_step_s"] for r in rounds]),
        "forward_s": forward_share * step, "lm_head_s": head_share * step, "select_s": select_share * step,
        "overhead_s": overhead_share * step, "forward_share": forward_share, "lm_head_share": head_share,
        "select_share": select_share, "overhead_share": overhead_share,
    }


# ---------------------------------------------------------------------------------------------
# 2. The forward alone
# ---------------------------------------------------------------------------------------------


def forward_variants(setup: Setup, ids: torch.Tensor, mask: torch.Tensor, context: int, calls: int,
                     expert_rows: int | None = None) -> dict[str, Any]:
    """One-token forwards at a fixed context: B base rows; B + R rows without LoRA; B + R rows with LoRA
    (R expert rows, copies of the first R base rows; R = B unless given: every row guarded)."""
    model, adapter = setup.model, setup.adapter
    batch = ids.shape[0]
    expert_rows = batch if expert_rows is None else expert_rows
    extra = max(0, context - ids.shape[1])
    # Grow the prompt to the requested context with repeats of its own last token (timing only).
    if extra:
        ids = torch.cat([ids, ids[:, -1:].expand(-1, extra)], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, extra)], dim=1)

    def prepared(rows: int):
        input_ids = ids if rows == batch else torch.cat([ids, ids[: rows - batch]])
        attention = mask if rows == batch else torch.cat([mask, mask[: rows - batch]])
        positions = positions_from_mask(attention)
        with torch.no_grad(), adapter.rows_from(batch if rows > batch else rows):
            cache = returned_cache(model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                         use_cache=True, logits_to_keep=1))
        step_mask = torch.cat([attention, attention.new_ones(rows, 1)], dim=1)
        return cache, step_mask, positions[:, -1:] + 1, input_ids[:, -1:]

    def one(state, lora: bool) -> tuple[float, float]:
        cache, step_mask, position, token = state
        if lora:
            adapter.attach(model)
        else:
            adapter.detach(model)  # the plain forward carries no hooks at all
        first_expert_row = batch if lora else None
        synchronize(setup.device)
        start, cpu_start = time.perf_counter(), cpu_clock()
        with torch.no_grad(), adapter.rows_from(first_expert_row) if lora else contextlib.nullcontext():
            model(input_ids=token, attention_mask=step_mask, position_ids=position, **cache_kwargs(model, cache),
                  use_cache=True, logits_to_keep=1)
        synchronize(setup.device)
        elapsed, cpu_elapsed = time.perf_counter() - start, cpu_clock() - cpu_start
        cache.crop(-1)  # drop the token just added: every call runs at the same context length
        return elapsed, cpu_elapsed

    adapter.attach(model)
    single, double = prepared(batch), prepared(batch + expert_rows)
    # base_rows is the plain forward `generate` runs; the B + R-row variants run as the guarded loop does.
    variants = {"base_rows": (single, False), "base_and_expert_rows_no_lora": (double, False),
                "base_and_expert_rows_lora": (double, True)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for name, (state, lora) in variants.items():  # warm-up
        one(state, lora)
    for _ in range(calls):  # interleaved
        for name, (state, lora) in variants.items():
            times[name].append(one(state, lora))
    adapter.detach(model)  # the model as it was given
    out: dict[str, Any] = {"context_tokens": int(ids.shape[1]), "calls": calls, "expert_rows": expert_rows}
    for prefix, index in (("", 0), ("cpu_", 1)):
        for name, values in times.items():
            out[prefix + name] = median([v[index] for v in values])
        full, plain = out[prefix + "base_and_expert_rows_lora"], out[prefix + "base_rows"]
        out[prefix + "lora_hooks_s"] = full - out[prefix + "base_and_expert_rows_no_lora"]
        out[prefix + "expert_rows_s"] = out[prefix + "base_and_expert_rows_no_lora"] - plain
        out[prefix + "ceiling_ratio"] = plain / full
    return out


# ---------------------------------------------------------------------------------------------
# 3. The selection op alone
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def step_logits(setup: Setup, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and expert logits of the first decode step after the prompt, as the loop computes them."""
    pair = AdapterPair(setup.model, setup.adapter)
    try:
        base = pair.prefill(ids, mask, guard_rows=range(ids.shape[0])).base
        return pair.step(base.argmax(-1))
    finally:
        pair.close()


def select_alone(base: torch.Tensor, expert: torch.Tensor, calls: int, device: str) -> dict[str, Any]:
    batch = base.shape[0]
    potential = torch.full((batch,), 0.5, device=device)
    alpha = torch.full((batch,), DEFAULT_ALPHA, device=device)
    seeds = torch.arange(batch, device=device)
    offset = torch.zeros(1, dtype=torch.int64, device=device)
    config = NGSDConfig()

    def call():
        return guarded_select(base, expert, potential, alpha, seeds, offset, config.step_params(5))

    timings: dict[str, list[float]] = {"ngsd_greedy": [], "safedecoding_greedy": []}
    cpu_timings: dict[str, list[float]] = {"ngsd_greedy": [], "safedecoding_greedy": []}
    sd_params = NGSDConfig(mode="safedecoding").step_params(0)
    for _ in range(2):
        call()
    for _ in range(calls):
        for name, fn in (("ngsd_greedy", call),
                         ("safedecoding_greedy", lambda: guarded_select(base, expert, potential, alpha, seeds,
                                                                        offset, sd_params))):
            synchronize(device)
            start, cpu_start = time.perf_counter(), cpu_clock()
            fn()
            synchronize(device)
            timings[name].append(time.perf_counter() - start)
            cpu_timings[name].append(cpu_clock() - cpu_start)
    out: dict[str, Any] = {name: median(values) for name, values in timings.items()}
    out.update({"cpu_" + name: median(values) for name, values in cpu_timings.items()})

    with profile(activities=_activities(device)) as prof:
        for _ in range(5):
            call()
        synchronize(device)
    sort_key = "self_cuda_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    rows = []
    for event in sorted(prof.key_averages(), key=lambda e: getattr(e, sort_key, 0), reverse=True)[:12]:
        rows.append({
            "op": event.key,
            "calls_per_step": event.count / 5,
            "self_us_per_step": getattr(event, sort_key, 0) / 5,
        })
    out["profile_top_ops"] = rows
    out["profile_sort"] = sort_key
    return out


# ---------------------------------------------------------------------------------------------
# 4. One plain step, and the command
# ---------------------------------------------------------------------------------------------


def plain_step(setup: Setup, ids: torch.Tensor, mask: torch.Tensor, steps: int, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one decode step of plain `model.generate`, mean over `steps` steps."""
    unguarded = method_runners(setup)["unguarded"]
    values, cpu_values = [], []
    for _ in range(repeats):
        streamer = TimingStreamer(setup.device)
        unguarded(ids, mask, steps + 1, streamer)
        gaps, cpu_gaps = _step_gaps(streamer)
        values.append(sum(gaps) / len(gaps))
        cpu_values.append(sum(cpu_gaps) / len(cpu_gaps))
    return median(values), median(cpu_values)


def run_breakdown(setup: Setup, batch_sizes: list[int], steps: int, repeats: int, log=print) -> dict[str, Any]:
    prompts = benchmark_prompts(max(batch_sizes))
    out: dict[str, Any] = {"steps": steps, "repeats": repeats, "batches": {}}
    for batch in batch_sizes:
        ids, mask = setup.encode(prompts[:batch])
        loop_breakdown(setup, ids, mask, 2, 1)  # warm-up
        plain_step(setup, ids, mask, 2, 1)
        rounds = []
        plain_values, plain_cpu_values = [], []
        for _ in range(repeats):  # interleave the guarded loop with plain generate
            rounds.extend(loop_breakdown(setup, ids, mask, steps, 1)["rounds"])
            wall, cpu = plain_step(setup, ids, mask, steps, 1)
            plain_values.append(wall)
            plain_cpu_values.append(cpu)
        loop = summarise_loop(rounds)
        forward, select, overhead = loop["forward_s"], loop["select_s"], loop["overhead_s"]
        plain, plain_cpu = median(plain_values), median(plain_cpu_values)
        context = int(ids.shape[1]) + steps // 2
        forward_alone = forward_variants(setup, ids, mask, context, calls=max(5, repeats * 3))
        base_logits, expert_logits = step_logits(setup, ids, mask)
        selection = select_alone(base_logits, expert_logits, calls=max(5, repeats * 3), device=setup.device)
        out["batches"][str(batch)] = {
            "loop": loop,
            "plain_generate_step_s": plain,
            "plain_generate_cpu_step_s": plain_cpu,
            "guarded_step_over_plain_step": loop["step_s"] / plain,
            "cpu_guarded_step_over_plain_step": loop["cpu_step_s"] / plain_cpu,
            "forward_alone": forward_alone,
            "select_alone": selection,
            "prompt_width": int(ids.shape[1]),
        }
        log(
            f"breakdown batch {batch}: step {loop['step_s'] * 1e3:.1f} ms = forward {forward * 1e3:.1f} "
            f"({loop['forward_share']:.1%}) + LM head in the step op {loop['lm_head_s'] * 1e3:.1f} "
            f"({loop['lm_head_share']:.1%}) + select {select * 1e3:.2f} ({loop['select_share']:.1%}) + overhead "
            f"{overhead * 1e3:.2f} ({loop['overhead_share']:.1%}); profiled step {loop['profiled_step_s'] * 1e3:.1f} ms; "
            f"plain generate step {plain * 1e3:.1f} ms; "
            f"forward alone: base {forward_alone['base_rows'] * 1e3:.1f} / 2B no-LoRA "
            f"{forward_alone['base_and_expert_rows_no_lora'] * 1e3:.1f} / 2B LoRA "
            f"{forward_alone['base_and_expert_rows_lora'] * 1e3:.1f} ms"
        )
    return out


def run_guarded_rows(setup: Setup, batch: int, guarded: list[int], context: int, calls: int, log=print
                     ) -> dict[str, Any]:
    """What R guarded rows add to one decode forward of a batch of B: their rows, and the LoRA hooks.

    The default configuration guards few rows of a benign batch (the probe routes the rest), so the cost of
    one guarded row decides its all-benign throughput; every row guarded is the other end.
    """
    ids, mask = setup.encode(benchmark_prompts(batch))
    # the forwards run at the context asked for or at the batch's longest prompt, whichever is longer
    out: dict[str, Any] = {"batch": batch, "context_tokens": max(context, ids.shape[1]), "calls": calls,
                           "guarded_rows": {}}
    for rows in guarded:
        variants = forward_variants(setup, ids, mask, context, calls, expert_rows=rows)
        out["guarded_rows"][str(rows)] = variants
        log(f"batch {batch}, {rows} guarded: base {variants['base_rows'] * 1e3:.1f} ms; + their rows "
            f"{variants['expert_rows_s'] * 1e3:+.1f} ms; + LoRA hooks {variants['lora_hooks_s'] * 1e3:+.1f} ms "
            f"(CPU time {variants['cpu_expert_rows_s'] * 1e3:+.1f} / {variants['cpu_lora_hooks_s'] * 1e3:+.1f} ms)")
    return out


def cmd_guarded_rows(args: argparse.Namespace, setup: Setup) -> int:
    guarded = [1, 2] if args.quick else args.guarded_rows
    batch = 2 if args.quick else args.rows_batch
    if max(guarded) > batch:  # a batch of B has at most B rows to guard (it failed after timing the others)
        raise SystemExit(f"bench_decode.py rows: error: --guarded-rows {max(guarded)} exceeds --rows-batch {batch}; "
                         "a batch of B rows has at most B guarded")
    calls = 3 if args.quick else max(5, args.repeats * 3)
    meta = common_meta(setup, args)  # first: its date and load average are the run's start
    results = run_guarded_rows(setup, batch, guarded, context=96, calls=calls)
    meta["environment"]["load_average_at_end"] = list(os.getloadavg())
    write_json(args.out_prefix + "guarded_rows.json", {**meta, **results}, args.out_dir)
    return 0


def cmd_breakdown(args: argparse.Namespace, setup: Setup) -> int:
    batches = [1, 2] if args.quick else args.breakdown_batch
    steps = 4 if args.quick else args.breakdown_steps
    repeats = 1 if args.quick else args.repeats
    meta = common_meta(setup, args)  # first: its date and load average are the run's start
    results = run_breakdown(setup, batches, steps, repeats)
    meta["environment"]["load_average_at_end"] = list(os.getloadavg())
    write_json(args.out_prefix + "breakdown.json", {**meta, **results}, args.out_dir)
    return 0


# ---------------------------------------------------------------------------------------------
# Reflection cost
# ---------------------------------------------------------------------------------------------


def run_reflection(setup: Setup, n_requests: int, repeats: int, log=print) -> dict[str, Any]:
    from ngsd.config import ReflectionConfig
    from ngsd.risk.reflection import reflect

    requests = benchmark_prompts(n_requests)
    modes = ("generate", "prefill")
    configs = {mode: ReflectionConfig(mode=mode) for mode in modes}
    for mode in modes:  # warm-up
        reflect(setup.model, setup.tokenizer, requests[:1], configs[mode])
    out: dict[str, Any] = {"requests": n_requests, "repeats": repeats, "modes": {}}
    for label, batch in (("batch", requests), ("single", requests[:1])):
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        cpu_times: dict[str, list[float]] = {mode: [] for mode in modes}
        answers: dict[str, Any] = {}
        for round_index in range(repeats):
            for mode in modes if round_index % 2 == 0 else modes[::-1]:
                synchronize(setup.device)
                start, cpu_start = time.perf_counter(), cpu_clock()
                result = reflect(setup.model, setup.tokenizer, batch, configs[mode])
                synchronize(setup.device)
                times[mode].append(time.perf_counter() - start)
                cpu_times[mode].append(cpu_clock() - cpu_start)
                answers[mode] = result
        for mode in modes:
            seconds = median(times[mode])
            entry = out["modes"].setdefault(mode, {})
            entry[label] = {
                "requests": len(batch),
                "seconds": times[mode],
                "median_seconds": seconds,
                "seconds_per_request": seconds / len(batch),
                "cpu_seconds": cpu_times[mode],
                "cpu_seconds_per_request": median(cpu_times[mode]) / len(batch),
                "alphas": [r.alpha for r in answers[mode]],
            }
            if mode == "generate":
                lengths = [len(setup.tokenizer(r.raw, add_special_tokens=False)["input_ids"]) for r in answers[mode]]
                entry[label]["answer_tokens_mean"] = sum(lengths) / len(lengths)
            log(f"reflection {mode:8s} {label:6s} ({len(batch)} requests): {seconds / len(batch):.3f} s/request")
    return out


def cmd_reflection(args: argparse.Namespace, setup: Setup) -> int:
    n_requests = 2 if args.quick else args.reflection_requests
    repeats = 1 if args.quick else min(args.repeats, 2)  # a generated JSON answer per request is slow
    meta = common_meta(setup, args)  # first: its date and load average are the run's start
    results = run_reflection(setup, n_requests, repeats)
    meta["environment"]["load_average_at_end"] = list(os.getloadavg())
    write_json(args.out_prefix + "reflection.json", {**meta, **results}, args.out_dir)
    return 0
