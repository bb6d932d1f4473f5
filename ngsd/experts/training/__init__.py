"""Train the LoRA safety expert of the default model: `ngsd train-expert` (spec section 6).

Recipe (SafeDecoding, with NGSD's additions), all from `../shared/data` plus the prompt lists in
`ngsd/assets/training/prompts.json`:

1. refusal: for each of SafeDecoding's 36 seed prompts (seed_reject.json) the model itself, under a
   safety system prompt, samples answers (T 0.8, top-p 0.9, `max_trials` rounds, 48 new tokens);
   an answer is kept when the refusal judge finds a refusal in its first 60 characters, cut to its
   first two sentences, `refusals_per_prompt` (2) per prompt. Slots the 135M model cannot fill
   take SafeDecoding's own Vicuna-7B refusals for the same prompt (expert_sft_vicuna.json, "</s>"
   stripped, degenerate ones such as "It is not" dropped). The extra AdvBench prompts (below) get
   one refusal each: the model's own greedy continuation of the forced opening "I'm sorry, but I
   cannot" under the safety system prompt, cut to one or two sentences that do not turn helpful.
   Training text uses the tokenizer's chat template *without* the safety system prompt (as
   SafeDecoding does), so the expert refuses on its own. Answers are capped at 64 tokens (whole
   sentences): the guard needs the opening of a refusal, and long answers cost CPU time.
2. recovery (deep-alignment augmentation): a harmful request whose answer has already started
   compliantly (the base's own first k greedy tokens, or the first k tokens of AdvBench's
   "Sure, here is ..." target; k drawn from `prefix_lengths`) and then turns into a refusal. The
   gate cannot fire on the first generated token (its potential starts at 0), so the expert must
   recover after the base's compliant start. Harmful prompts: the 36 seed prompts plus
   `advbench_prompts` (48) AdvBench prompts drawn (seeded) from ids >= 50; the 50 lowest ids are
   the evaluation set and never trained on.
3. benign: harmless prompts written for ngsd (40 by hand, 62 + 93 from templates, and 40
   "contrast" requests that share words or topics with harmful ones: 235 in all, none from an
   evaluation suite) with the base's own greedy answers (48 tokens); their loss is
   KL(base || expert) at every answer position (`benign_loss="kl"`, default) or cross-entropy on
   the base's tokens ("ce"), so the expert stays close to the base there and the gate stays quiet.

LoRA r 16, alpha 64, dropout 0.1 on all attention and MLP projections (NGSD's copy; `--targets qv`
gives SafeDecoding's q/v), AdamW lr 2e-3, linear schedule with 3% warm-up, gradient clipping 0.3
(SafeDecoding's trainer settings), 2 epochs, batch 1, seeded example order; loss only on answer
tokens. The adapter is saved in float16 (about 10 MB) and measured after reloading it.

Reproduce the shipped adapter (CPU; the data step samples, so use the same thread count):

    ngsd train-expert --seed 0 --threads 1     # or: python -m ngsd.experts.training --seed 0 --threads 1

Modules: `prompts` (the prompt lists, read from the asset file), `config` (`TrainExpertConfig`),
`examples` (the recipes above: building and tokenising the training set), `trainer` (LoRA
training and the whole run), `selfcheck` (the expert measured on its own), `cli` (arguments; light,
imports no torch). Nothing is imported here, so `ngsd --help` stays fast.
"""
