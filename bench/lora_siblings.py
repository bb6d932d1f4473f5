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
from typing import Any, Callable

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


def hooks_form(groups: dict) -> Callable[[str], None]:
    """Sets the attached hooks' form: their sibling groups ("fused") or none ("unfused")."""
    def set_form(form: str) -> None:
        for hook, siblings in groups.items():
            hook.siblings = siblings if form == "fused" else None
    return set_form


def _alternating(set_form: Callable[[str], None], run, rounds: int, forms: tuple[str, str] = FORMS) -> dict:
    """`run` timed under each of two forms in turns (order alternating); ratios of the second's time to the first's."""
    first, second = forms
    seconds: dict[str, list[float]] = {form: [] for form in forms}
    for form in forms:  # warm-up
        set_form(form)
        run()
    for index in range(rounds):
        for form in forms if index % 2 == 0 else forms[::-1]:
            set_form(form)
            seconds[form].append(run())
    set_form(first)
    ratios = [b / a for a, b in zip(seconds[first], seconds[second])]
    return {"ms": {form: [round(s * 1e3, 1) for s in seconds[form]] for form in forms},
            "median_ms": {form: round(statistics.median(seconds[form]) * 1e3, 2) for form in forms},
            f"speed_{first}_over_{second}_median": round(statistics.median(ratios), 3),
            f"rounds_{first}_faster": sum(r > 1 for r in ratios), "rounds": rounds}


def prefill_seconds(setup, set_form: Callable[[str], None], rounds: int, positions: int = 50,
                    forms: tuple[str, str] = FORMS) -> dict:
    """The expert's prefill of one prompt alone: what a batch-1 request in the divergence check's band pays before
    its first token."""
    model, adapter = setup.model, setup.adapter
    ids = torch.randint(100, model.config.vocab_size, (1, positions), generator=torch.Generator().manual_seed(0))

    def prefill() -> float:
        with torch.no_grad(), adapter.rows_from(0):
            start = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

    return {"shape": {"expert_rows": 1, "positions": positions}, **_alternating(set_form, prefill, rounds, forms)}


def step_seconds(setup, set_form: Callable[[str], None], rounds: int, base_rows: int = 32, expert_rows: int = 16,
                 positions: int = 80, forms: tuple[str, str] = FORMS) -> dict:
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
            **_alternating(set_form, forward, rounds, forms)}


def half_harmful(setup, rounds: int, new_tokens: int, use_form: Callable[[str], None] = None,
                 forms: tuple[str, str] = FORMS) -> dict:
    """The half-harmful workload end to end under each form, unguarded `generate` in every round."""
    use_form = use_form or use
    first, second = forms
    ids, mask = setup.encode(workload_prompts("mixed", 32))
    run = runners(setup)

    def timed(method: str, form: str) -> tuple[float, torch.Tensor]:
        use_form(form)
        start = time.perf_counter()
        out = run[method](ids, mask, new_tokens, None)
        return time.perf_counter() - start, out

    tokens = {form: timed("default", form)[1] for form in forms}  # also the warm-up
    timed("unguarded", first)
    seconds: dict[str, list[float]] = {"unguarded": [], **{form: [] for form in forms}}
    for index in range(rounds):
        order = [("unguarded", first), ("default", first), ("default", second)]
        if index % 2:
            order = [order[0], order[2], order[1]]
        for method, form in order:
            seconds["unguarded" if method == "unguarded" else form].append(timed(method, form)[0])
    use_form(first)
    ratio = {form: [u / s for u, s in zip(seconds["unguarded"], seconds[form])] for form in forms}
    return {"batch": 32, "new_tokens": new_tokens,
            f"tokens_equal_{first}_{second}": bool(torch.equal(tokens[first], tokens[second])),
            "seconds": {key: [round(s, 2) for s in values] for key, values in seconds.items()},
            "ratio_to_unguarded_per_round": {form: [round(r, 3) for r in ratio[form]] for form in forms},
            "ratio_to_unguarded_median": {form: round(statistics.median(ratio[form]), 3) for form in forms},
            f"speed_{first}_over_{second}_per_round": [round(b / a, 3) for a, b in
                                                       zip(seconds[first], seconds[second])]}


def compare(doc: str, script: str, forms: tuple[str, str], set_form_of: Callable[[Any], Callable[[str], None]],
            use_form: Callable[[str], None], meta: dict | None = None) -> None:
    """The command line of a two-form comparison: the decode forward and the batch-1 expert prefill with the
    adapter attached, each form set by `set_form_of(setup)`'s setter, then the half-harmful workload end to end,
    each form set by `use_form` for the calls' own hooks; the first form stays set. Writes the report
    (`meta` added to its meta)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-rounds", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=f"{script}.json", help="JSON file (a bare name goes to bench/results/)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = load_setup()
    report = {"meta": common_meta(setup, args)}
    report["meta"]["command"] = f"python bench/{script}.py " + " ".join(sys.argv[1:])
    report["meta"].update(meta or {})
    set_form = set_form_of(setup)
    report["decode_forward"] = step_seconds(setup, set_form, args.step_rounds, forms=forms)
    print("decode forward:", report["decode_forward"]["median_ms"], flush=True)
    report["expert_prefill_batch1"] = prefill_seconds(setup, set_form, 2 * args.step_rounds, forms=forms)
    print("expert prefill, batch 1:", report["expert_prefill_batch1"]["median_ms"], flush=True)
    setup.adapter.detach(setup.model)
    if args.rounds:
        report["half_harmful"] = half_harmful(setup, args.rounds, args.new_tokens, use_form, forms)
        print("half harmful:", report["half_harmful"]["ratio_to_unguarded_median"], flush=True)
    use_form(forms[0])
    write_json(args.out, report)


def main() -> None:
    compare(__doc__, "lora_siblings", FORMS, lambda setup: hooks_form(_attached_hooks(setup)), use)


if __name__ == "__main__":
    main()
