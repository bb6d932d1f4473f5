"""By-hand check of shared-trunk experts (issue 11) on the default model: equivalence and speed.

No top-layers expert is shipped, so this builds a LoRA with small random weights on the top
`--top` decoder layers of the default model, then runs NGSD (alpha 0.9, greedy, every row
guarded) twice: the shared trunk (`SharedTrunkPair`, what the loop picks for such an adapter)
and the same adapter at full depth (`AdapterPair`). It reports token/spike agreement on
`--prompts` prompts, and the median wall time of both and of unguarded `generate` at `--batch`.

    nice -n 5 python bench/shared_trunk_check.py --top 4 --prompts 4 --tokens 16 --batch 8 --rounds 3

Not part of CI (the real model, minutes of CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ngsd
from ngsd import NGSDConfig, guarded_generate
from ngsd.decoding import loop
from ngsd.decoding.heads import split_head
from ngsd.decoding.pair import AdapterPair, BaseOnly
from ngsd.decoding.shared_trunk import SharedTrunkPair
from ngsd.experts.lora import LoraAdapter, _LoraPair

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def random_top_layers_adapter(model, top: int, strength: float, rank: int = 8, seed: int = 0) -> LoraAdapter:
    """A LoRA on every linear layer of the top `top` decoder layers, small random weights (scale 2)."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    layers = model.config.num_hidden_layers
    pairs = {}
    for layer in range(layers - top, layers):
        for target in TARGETS:
            name = f"model.layers.{layer}.{target}"
            linear = modules[name]
            pairs[name] = _LoraPair(down=torch.randn(rank, linear.in_features, generator=generator) * 0.05,
                                    up=torch.randn(linear.out_features, rank, generator=generator) * strength)
    return LoraAdapter(pairs=pairs, scale=2.0, source=f"random top-{top} LoRA")


def prompts(n: int) -> list[str]:
    from ngsd.data import load_suite

    return [p.text for p in load_suite("alpaca_eval", limit=n)]  # odd ids: the evaluation split


def encode(tokenizer, texts: list[str]):
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in texts]
    batch = tokenizer(chats, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def run(model, adapter, ids, mask, tokens: int, full_depth: bool, pad: int):
    original = loop.shared_trunk_unsupported
    if full_depth:
        loop.shared_trunk_unsupported = lambda model, adapter: "full-depth reference"
    try:
        start = time.perf_counter()
        out = guarded_generate(model, ids, mask, expert=adapter, config=NGSDConfig(), alpha=0.9,
                               max_new_tokens=tokens, eos_token_id=None, pad_token_id=pad)
        return out, time.perf_counter() - start
    finally:
        loop.shared_trunk_unsupported = original


def step_milliseconds(pair, ids, mask, steps: int) -> float:
    """Median wall time of one decode-step forward (every row guarded), in ms; what the shared trunk saves."""
    batch = ids.shape[0]
    try:
        pair.prefill(ids, mask, guard_rows=None if isinstance(pair, BaseOnly) else list(range(batch)))
        tokens = ids[:, -1]
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            pair.step(tokens)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)
    finally:
        pair.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--time-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strength", type=float, default=0.05, help="std of the LoRA up weights")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-generate-timing", action="store_true", help="time the step forwards only")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = ngsd.load_model()
    pad = tokenizer.pad_token_id
    adapter = random_top_layers_adapter(model, args.top, args.strength)

    ids, mask = encode(tokenizer, prompts(args.prompts))
    shared, _ = run(model, adapter, ids, mask, args.tokens, False, pad)
    full, _ = run(model, adapter, ids, mask, args.tokens, True, pad)
    print("step paths:", shared.traces[0].step_path, "|", full.traces[0].step_path)
    for row, (a, b) in enumerate(zip(shared.traces, full.traces)):
        gap = max((abs(x - y) for x, y in zip(a.divergence, b.divergence)), default=0.0)
        print(f"row {row}: tokens equal {a.tokens == b.tokens}, spikes equal {a.spikes == b.spikes}, "
              f"spikes {sum(a.spikes)}/{len(a.spikes)}, max divergence {max(a.divergence):.3f}, "
              f"max |divergence gap| {gap:.2e}")
    if args.skip_timing:
        return

    ids, mask = encode(tokenizer, prompts(args.batch))
    head = split_head(model)
    makers = {"base only": lambda: BaseOnly(model, head), "shared trunk": lambda: SharedTrunkPair(model, adapter, head),
              "full depth": lambda: AdapterPair(model, adapter, head)}
    per_step: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(args.rounds):
        for name, make in makers.items():
            per_step[name].append(step_milliseconds(make(), ids, mask, args.time_tokens))
    for name, values in per_step.items():  # the least disturbed round: the machine is shared
        print(f"batch {args.batch} decode step forward, {name}: best-round median {min(values):.1f} ms "
              f"(rounds {[round(v, 1) for v in values]})")
    if args.skip_generate_timing:
        return

    times: dict[str, list[float]] = {"unguarded": [], "shared trunk": [], "full depth": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.time_tokens, do_sample=False,
                       eos_token_id=None, pad_token_id=pad)
        times["unguarded"].append(time.perf_counter() - start)
        times["shared trunk"].append(run(model, adapter, ids, mask, args.time_tokens, False, pad)[1])
        times["full depth"].append(run(model, adapter, ids, mask, args.time_tokens, True, pad)[1])
    base = statistics.median(times["unguarded"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"batch {args.batch} x {args.time_tokens} tokens, {name}: median {median:.2f} s "
              f"({args.batch * args.time_tokens / median:.1f} tok/s, {base / median:.2f}x unguarded) over {values}")


if __name__ == "__main__":
    main()
