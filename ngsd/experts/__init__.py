"""Experts: what `expert=` may be (a LoRA adapter on the base, a separate model), and how one is trained.

Modules: `lora` (a peft adapter applied to chosen rows of a batch), `resolve` (turn `expert=` into
an adapter or a model, checked), `shipped` (where the packaged experts live), `training` (the
`train-expert` package: prompts, example recipes, trainer, self-check, CLI).
Nothing is imported here, so light modules (the CLI's argument parsers) can live in this package.
"""
