"""What fusing the LoRA products of layers that read one input (q / k / v, gate / up) saves, side by side in one
process: the expert rows' updates as each layer's own two products (as until stop 58) against one down and one up
product per group (`ngsd.experts.lora._SiblingProducts`, the default now).

    python bench/lora_siblings.py --out lora_siblings.json

Two measurements, the two forms taking turns in every round (order alternating), default model, shipped expert,
fp32, 2 threads (OMP_WAIT_POLICY=PASSIVE, as every benchmark here):

- one guarded decode forward of 32 base rows and 16 expert rows over an 80-position cache (`--step-rounds`, 3
  forwards each), the shape of the half-harmful workload's decode;
- the expert's prefill of one 50-token prompt alone (2 x `--step-rounds`): what a batch-1 request in the
  divergence check's band pays before its first token;
- `bench_default.py`'s half-harmful workload end to end (default configuration, batch 32, 64 new tokens), with
  unguarded `generate` in the same rounds (`--rounds`); both forms must give the same tokens.

The unfused form is the same code with no sibling groups (the first two: the attached hooks' groups unset; end to
end: `_input_sharing_groups` returning none), so the two differ in nothing else.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

from harness import common_meta, load_setup, write_json

import torch  # noqa: E402  (after harness)

import ngsd.experts.lora as lora  # noqa: E402
from bench_default import runners, workload_prompts  # noqa: E402

FORMS = ("fused", "unfused")
_GROUPS = lora._input_sharing_groups


def use(form: str) -> None:
    """Hooks attached from now on fuse their sibling products or not."""
    lora._input_sharing_groups = _GROUPS if form == "fused" else (lambda model, hooks: [])


def _attached_hooks(setup) -> dict:
    """The adapter attached to the model (fused), and each hook's sibling group, to take away and give back."""
    setup.adapter.attach(setup.model)
    return {hook: hook.siblings for module in setup.model.modules() for hook in module._forward_hooks.values()
            if isinstance(hook, lora._LoraHook)}


def _set_form(groups: dict, form: str) -> None:
    for hook, siblings in groups.items():
        hook.siblings = siblings if form == "fused" else None


def _alternating(groups: dict, run, rounds: int) -> dict:
    seconds: dict[str, list[float]] = {form: [] for form in FORMS}
    for form in FORMS:  # warm-up
        _set_form(groups, form)
        run()
    for index in range(rounds):
        for form in FORMS if index % 2 == 0 else FORMS[::-1]:
            _set_form(groups, form)
            seconds[form].append(run())
    _set_form(groups, "fused")
    ratios = [u / f for f, u in zip(seconds["fused"], seconds["unfused"])]
    return {"ms": {form: [round(s * 1e3, 1) for s in seconds[form]] for form in FORMS},
            "median_ms": {form: round(statistics.median(seconds[form]) * 1e3, 2) for form in FORMS},
            "speed_fused_over_unfused_median": round(statistics.median(ratios), 3),
            "rounds_fused_faster": sum(r > 1 for r in ratios), "rounds": rounds}


def prefill_seconds(setup, groups: dict, rounds: int, positions: int = 50) -> dict:
    """The expert's prefill of one prompt alone: what a batch-1 request in the divergence check's band pays before
    its first token."""
    model, adapter = setup.model, setup.adapter
    ids = torch.randint(100, model.config.vocab_size, (1, positions), generator=torch.Generator().manual_seed(0))

    def prefill() -> float:
        with torch.no_grad(), adapter.rows_from(0):
            start = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

    return {"shape": {"expert_rows": 1, "positions": positions}, **_alternating(groups, prefill, rounds)}


def step_seconds(setup, groups: dict, rounds: int, base_rows: int = 32, expert_rows: int = 16,
                 positions: int = 80) -> dict:
    model, adapter = setup.model, setup.adapter
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (base_rows + expert_rows, positions), generator=generator)
    step = torch.randint(100, model.config.vocab_size, (base_rows + expert_rows, 1), generator=generator)
    with torch.no_grad(), adapter.rows_from(base_rows):
        cache = model(ids, use_cache=True).past_key_values

    def forward() -> float:
        own = copy.deepcopy(cache)
        with torch.no_grad(), adapter.rows_from(base_rows):
            start = time.perf_counter()
            for _ in range(3):
                model(step, past_key_values=own, use_cache=True)
            return (time.perf_counter() - start) / 3

    return {"shape": {"base_rows": base_rows, "expert_rows": expert_rows, "cache_positions": positions},
            **_alternating(groups, forward, rounds)}


def half_harmful(setup, rounds: int, new_tokens: int) -> dict:
    ids, mask = setup.encode(workload_prompts("mixed", 32))
    run = runners(setup)

    def timed(method: str, form: str) -> tuple[float, torch.Tensor]:
        use(form)
        start = time.perf_counter()
        out = run[method](ids, mask, new_tokens, None)
        return time.perf_counter() - start, out

    tokens = {form: timed("default", form)[1] for form in FORMS}  # also the warm-up
    timed("unguarded", "fused")
    seconds: dict[str, list[float]] = {"unguarded": [], **{form: [] for form in FORMS}}
    for index in range(rounds):
        order = [("unguarded", "fused"), ("default", "fused"), ("default", "unfused")]
        if index % 2:
            order = [order[0], order[2], order[1]]
        for method, form in order:
            seconds["unguarded" if method == "unguarded" else form].append(timed(method, form)[0])
    ratio = {form: [u / s for u, s in zip(seconds["unguarded"], seconds[form])] for form in FORMS}
    return {"batch": 32, "new_tokens": new_tokens,
            "tokens_equal_fused_unfused": bool(torch.equal(tokens["fused"], tokens["unfused"])),
            "seconds": {key: [round(s, 2) for s in values] for key, values in seconds.items()},
            "ratio_to_unguarded_per_round": {form: [round(r, 3) for r in ratio[form]] for form in FORMS},
            "ratio_to_unguarded_median": {form: round(statistics.median(ratio[form]), 3) for form in FORMS},
            "speed_fused_over_unfused_per_round": [round(u / f, 3) for f, u in
                                                   zip(seconds["fused"], seconds["unfused"])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-rounds", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="lora_siblings.json", help="JSON file (a bare name goes to bench/results/)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = load_setup()
    report = {"meta": common_meta(setup, args)}
    report["meta"]["command"] = "python bench/lora_siblings.py " + " ".join(sys.argv[1:])
    groups = _attached_hooks(setup)
    report["decode_forward"] = step_seconds(setup, groups, args.step_rounds)
    print("decode forward:", report["decode_forward"]["median_ms"],
          "fused speed-up", report["decode_forward"]["speed_fused_over_unfused_median"], flush=True)
    report["expert_prefill_batch1"] = prefill_seconds(setup, groups, 2 * args.step_rounds)
    print("expert prefill, batch 1:", report["expert_prefill_batch1"]["median_ms"],
          "fused speed-up", report["expert_prefill_batch1"]["speed_fused_over_unfused_median"], flush=True)
    setup.adapter.detach(setup.model)
    if args.rounds:
        report["half_harmful"] = half_harmful(setup, args.rounds, args.new_tokens)
        print("half harmful:", report["half_harmful"]["ratio_to_unguarded_median"], flush=True)
    use("fused")
    write_json(args.out, report)


if __name__ == "__main__":
    main()
