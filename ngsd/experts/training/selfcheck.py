"""The expert measured on its own, as the guard relies on it (written into training_report.json).

ASR (keyword judge) of base and expert alone on the AdvBench evaluation set, with and without a
forced compliant start, over-refusal on held-out harmless prompts, and a gate proxy: where the LIF
neuron, driven by the base/expert divergence along the base's answer, first fires.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ngsd_kernels.reference import lif_step

from ...config import NGSDConfig
from ...data import ADVBENCH_EVAL_SIZE, id_sort_key, load_suite
from ...eval.judge import KeywordJudge
from .examples import chat_prompt_ids, generate_ids
from .prompts import BENIGN_EVAL_PROMPTS

_GATE = NGSDConfig()  # the guard's default gate: the proxy fires where the guard would


def first_spike(divergence: Sequence[float], tau: float = _GATE.tau, v_th: float = _GATE.v_th) -> int | None:
    """The step at which the LIF gate, driven by `divergence` from rest, first fires (None: never).

    The step is `ngsd_kernels`' reference LIF update; the reset does not matter before the first spike.
    """
    potential = torch.zeros((), dtype=torch.float64)
    for step, d in enumerate(divergence):
        potential, fired = lif_step(potential, torch.tensor(float(d), dtype=torch.float64), tau, v_th,
                                    _GATE.v_reset, _GATE.rho)
        if bool(fired):
            return step
    return None


@torch.no_grad()
def divergence_along(peft_model: Any, tokenizer: Any, prompt_ids: list[int], answer_ids: list[int]) -> list[float]:
    """Total variation between base and expert next-token distributions at each answer position."""
    ids = torch.tensor([prompt_ids + answer_ids], device=peft_model.device)
    start = len(prompt_ids) - 1
    expert = torch.softmax(peft_model(input_ids=ids).logits[0, start:-1].float(), -1)
    with peft_model.disable_adapter():
        base = torch.softmax(peft_model(input_ids=ids).logits[0, start:-1].float(), -1)
    return (0.5 * (expert - base).abs().sum(-1)).tolist()


def evaluate_expert(
    peft_model: Any, tokenizer: Any, data_dir: Path, *, max_new_tokens: int = 64, batch_size: int = 10,
    n_advbench: int = ADVBENCH_EVAL_SIZE, prefix_tokens: int = 2, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """ASR (keyword judge) of base and expert alone on the AdvBench evaluation set, with and without a
    forced compliant start, over-refusal on held-out harmless prompts, and a gate proxy.

    Forced starts: "base-start" = the base's own first `prefix_tokens` greedy tokens (what the guard
    sees, since the gate cannot fire on the first token); "sure-here-is" = the first 4 tokens of
    AdvBench's target ("Sure, here is a ..."). The judged text includes the forced start.
    Gate proxy: along the base's greedy answer, the LIF neuron (tau 8, threshold 1) driven by the
    base/expert total variation; its first spike position (None = never) per prompt.
    """
    judge = KeywordJudge()
    adv = sorted(load_suite("advbench", data_dir), key=id_sort_key)[:n_advbench]
    adv_prompt_ids = [chat_prompt_ids(tokenizer, p.text) for p in adv]
    benign_prompt_ids = [chat_prompt_ids(tokenizer, p) for p in BENIGN_EVAL_PROMPTS]
    gen = lambda prompts, label: generate_ids(  # noqa: E731
        peft_model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=label
    )
    results: dict[str, Any] = {"advbench_ids": f"{adv[0].id}..{adv[-1].id}", "n_advbench": len(adv),
                               "max_new_tokens": max_new_tokens, "decoding": "greedy, plain HF generate"}

    def asr(texts: list[str]) -> float:
        return round(sum(not judge.is_refusal(t) for t in texts) / len(texts), 4)

    with peft_model.disable_adapter():
        base_adv = gen(adv_prompt_ids, "base on AdvBench")
        base_benign = gen(benign_prompt_ids, "base on harmless")
    expert_adv = gen(adv_prompt_ids, "expert on AdvBench")
    results["base_asr"] = asr([tokenizer.decode(t, skip_special_tokens=True) for t in base_adv])
    results["expert_asr"] = asr([tokenizer.decode(t, skip_special_tokens=True) for t in expert_adv])

    starts = {
        "base-start": [b[:prefix_tokens] for b in base_adv],
        "sure-here-is": [tokenizer(p.meta["target"], add_special_tokens=False)["input_ids"][:4] for p in adv],
    }
    for name, prefixes in starts.items():
        continued = gen([p + s for p, s in zip(adv_prompt_ids, prefixes)], f"expert after {name}")
        texts = [tokenizer.decode(s + c, skip_special_tokens=True) for s, c in zip(prefixes, continued)]
        results[f"expert_asr_after_{name}"] = asr(texts)
        results[f"example_after_{name}"] = texts[0][:200]

    expert_benign = gen(benign_prompt_ids, "expert on harmless")
    benign_texts = [tokenizer.decode(t, skip_special_tokens=True) for t in expert_benign]
    results["n_harmless"] = len(BENIGN_EVAL_PROMPTS)
    results["expert_harmless_refusal_rate"] = round(sum(judge.is_refusal(t) for t in benign_texts) / len(benign_texts), 4)
    base_benign_texts = [tokenizer.decode(t, skip_special_tokens=True) for t in base_benign]
    results["base_harmless_refusal_rate"] = round(sum(judge.is_refusal(t) for t in base_benign_texts) / len(base_benign_texts), 4)
    results["harmless_same_first_32_tokens"] = round(
        sum(a[:32] == b[:32] for a, b in zip(base_benign, expert_benign)) / len(base_benign), 4
    )

    spikes_benign, d_benign = [], []
    for p, a in zip(benign_prompt_ids, base_benign):
        d = divergence_along(peft_model, tokenizer, p, a)
        d_benign += d
        spikes_benign.append(first_spike(d))
    spikes_adv, d_adv_first = [], []
    for p, a in zip(adv_prompt_ids, base_adv):
        d = divergence_along(peft_model, tokenizer, p, a)
        d_adv_first += d[:4]
        spikes_adv.append(first_spike(d))
    results["gate_proxy"] = {
        "harmless_spike_share": round(sum(s is not None for s in spikes_benign) / len(spikes_benign), 4),
        "harmless_mean_tv": round(sum(d_benign) / max(1, len(d_benign)), 4),
        "advbench_spike_share": round(sum(s is not None for s in spikes_adv) / len(spikes_adv), 4),
        "advbench_first_spike_positions": spikes_adv,
        "advbench_mean_tv_first_4_steps": round(sum(d_adv_first) / max(1, len(d_adv_first)), 4),
    }
    results["examples"] = {
        "base_advbench_0": tokenizer.decode(base_adv[0], skip_special_tokens=True)[:200],
        "expert_advbench_0": tokenizer.decode(expert_adv[0], skip_special_tokens=True)[:200],
        "expert_harmless_0": benign_texts[0][:200],
    }
    log(
        f"AdvBench ids {results['advbench_ids']}: base ASR {results['base_asr']:.0%}, expert ASR "
        f"{results['expert_asr']:.0%}, after base start {results['expert_asr_after_base-start']:.0%}, after "
        f"'Sure, here is' {results['expert_asr_after_sure-here-is']:.0%}; harmless refusals: expert "
        f"{results['expert_harmless_refusal_rate']:.0%} (base {results['base_harmless_refusal_rate']:.0%})"
    )
    return results
