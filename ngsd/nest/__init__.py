"""NeST: neuron-selective safety tuning (spec section 6), for Llama-family models.

1. `selection`: FFN neurons whose max-pooled activations separate harmful from benign training
   prompts (per-layer logistic probe, z-score of |weight| >= threshold).
2. `clustering`: k-means over the selected neurons' activation profiles, k by silhouette.
3. `update`: one trainable vector per cluster for each of gate_proj rows, up_proj rows and
   down_proj columns of its neurons; `training` trains them on the expert recipe's data.
4. `update.NestUpdate.fold_into` writes them into the weights (a normal HF checkpoint, no
   inference overhead); `save`/`apply_delta` keep and re-apply them as a small delta file.

    ngsd train-nest --threads 1                       # delta into the shipped folder
    ngsd train-nest --out nest-ckpt                   # also a folded checkpoint (from_pretrained)

`expert="nest"` in ngsd runs the shipped delta as its exact LoRA form (`as_lora`: no copy of the base);
`load_nest_model()` folds it into the default model (NeST alone); `ngsd nest-to-lora` writes a peft adapter.
"""

from ..lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "NestConfig": ".config",
    "NestUpdate": ".update",
    "apply_delta": ".update",
    "train_nest": ".training",
    "save_folded": ".training",
    "shipped_nest_path": ".shipped",
    "load_nest_model": ".shipped",
    "nest_expert": ".shipped",
    "nest_lora_adapter": ".as_lora",
    "save_peft_folder": ".as_lora",
})
