"""Average the weight updates of LoRA adapters trained on the same base, exactly, as one adapter of rank k*r.

    python reports/expert/build_lora_soup.py --member A --member B --out SOUP

Each member's update is (alpha / r) * B @ A. Stacking the members' A matrices (rows) and their B matrices divided by
k (columns) gives an adapter of rank k*r with alpha k*alpha, whose update is the mean of the members' updates: no
approximation, only the float16 rounding the members were saved with (dividing by k = 2 is exact). The members must
share the rank, alpha, targets and layers. The soup's README names its members; its training_examples.jsonl is the
first member's, so split checks still see the data it was trained on (every member's file must be identical).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EXAMPLES = "training_examples.jsonl"
SAME_FIELDS = ("r", "lora_alpha", "target_modules", "layers_to_transform", "base_model_name_or_path", "use_rslora",
               "use_dora")


def build_soup(members: list[Path], out: Path) -> dict:
    configs = [json.loads((m / ADAPTER_CONFIG).read_text()) for m in members]
    for field in SAME_FIELDS:
        values = {json.dumps(sorted(v) if isinstance(v := c.get(field), list) else v, sort_keys=True)
                  for c in configs}  # target_modules is a set that peft saves in any order
        if len(values) != 1:
            raise SystemExit(f"members differ in {field!r}: {sorted(values)}; a soup needs identical adapter shapes")
    data = {hashlib.sha256((m / EXAMPLES).read_bytes()).hexdigest() for m in members}
    if len(data) != 1:
        raise SystemExit("members were trained on different training_examples.jsonl; this soup averages seeds of one "
                         "data file only")
    weights = [load_file(str(m / ADAPTER_WEIGHTS)) for m in members]
    k = len(members)
    soup: dict[str, torch.Tensor] = {}
    for name in weights[0]:
        parts = [w[name] for w in weights]
        if ".lora_A." in name:
            soup[name] = torch.cat(parts, dim=0).contiguous()
        elif ".lora_B." in name:
            soup[name] = (torch.cat(parts, dim=1) / k).contiguous()
        else:
            raise SystemExit(f"unexpected tensor {name}: only LoRA A/B matrices can be averaged this way")
    out.mkdir(parents=True, exist_ok=True)
    save_file(soup, str(out / ADAPTER_WEIGHTS))
    config = dict(configs[0], r=configs[0]["r"] * k, lora_alpha=configs[0]["lora_alpha"] * k)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(members[0] / EXAMPLES, out / EXAMPLES)
    report = {"soup_of": [str(m) for m in members], "rank": config["r"], "lora_alpha": config["lora_alpha"],
              "method": "mean of the members' LoRA updates, exact (stacked A, B / k)"}
    (out / "soup.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "README.md").write_text(
        "# LoRA soup\n\nThe mean of the weight updates of:\n\n" + "".join(f"- {m}\n" for m in members)
        + f"\nrank {config['r']}, alpha {config['lora_alpha']}; built by reports/expert/build_lora_soup.py\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--member", action="append", required=True, type=Path, help="adapter folder, repeatable")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    if len(args.member) < 2:
        raise SystemExit("a soup needs at least two --member adapters")
    print(json.dumps(build_soup(args.member, args.out)))


if __name__ == "__main__":
    main()
