"""Shared fixtures: tiny random-weight causal LMs (several families) and LoRA experts for them."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("NGSD_DATA_DIR", REPO.parent / "shared" / "data"))


def tiny_model(family: str = "llama", vocab_size: int = 96, seed: int = 0, init: float = 0.3, max_positions: int = 128,
               layers: int = 2, hidden_size: int = 32):
    """A 2-layer random model whose next-token distributions are peaked enough to avoid near-ties."""
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=init,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    config = {
        "llama": lambda: LlamaConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        "gemma": lambda: GemmaConfig(**common, head_dim=8),
    }[family]()
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_sliding_model():
    """A 2-layer Qwen2 whose second layer attends over a sliding window of 5 positions."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, use_sliding_window=True,
                         sliding_window=5, layer_types=["full_attention", "sliding_attention"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_lora_expert(model, folder: Path, seed: int = 1, strength: float = 0.5, layers: list[int] | None = None) -> Path:
    """A real peft LoRA adapter for `model` with random (non-zero) weights, saved to `folder`.

    `layers`: the decoder layers it adapts (peft's layers_to_transform); None: all of them.
    """
    import copy

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        layers_to_transform=layers,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * strength)
    peft_model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory):
    model = tiny_model("llama")
    folder = tiny_lora_expert(model, tmp_path_factory.mktemp("lora_llama"))
    return model, folder


def mixed_length_batch(lengths: list[int], vocab_size: int, seed: int = 0, pad: int = 0):
    """Left-padded random prompts (token ids >= 3, avoiding pad/bos/eos)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    prompts = []
    for row, length in enumerate(lengths):
        ids = torch.randint(3, vocab_size, (length,), generator=generator)
        input_ids[row, width - length :] = ids
        mask[row, width - length :] = 1
        prompts.append(ids.tolist())
    return input_ids, mask, prompts


@contextmanager
def in_another_thread_at(module, action, forward: int = 1):
    """While the block runs, the `forward`-th forward through `module` (counted in any thread) waits until
    `action` has run to its end in another thread: a concurrent caller, deterministically placed. Yields a list
    that holds the action's exception, if it raised one."""
    errors: list[BaseException] = []
    seen = []

    def run_action() -> None:
        try:
            with torch.no_grad():
                action()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            errors.append(error)

    def interleave(*_args) -> None:
        seen.append(True)
        if len(seen) == forward:
            thread = threading.Thread(target=run_action)
            thread.start()
            thread.join()

    handle = module.register_forward_hook(interleave)
    try:
        yield errors
    finally:
        handle.remove()
    assert len(seen) >= forward, f"only {len(seen)} forwards passed the module; the action never ran"


def forward_from_another_thread(model, module, input_ids, mask):
    """`in_another_thread_at` with a whole forward of `model` on another batch as the concurrent caller."""
    return in_another_thread_at(module, lambda: model(input_ids=input_ids, attention_mask=mask))
