"""Train the LoRA safety expert of the default model: `ngsd train-expert` (spec section 6).

Two recipes (`--recipe`). Both train only on what `../shared/data/SOURCES.md` allows for training
(seed_reject.json, expert_sft_vicuna.json, AdvBench ids >= 130, plus prompt lists written for ngsd);
`splits.py` names the evaluation side and `tests/test_training_splits.py` checks that no training
file holds an evaluation prompt.

**broad** (issue 15, `--recipe broad --epochs 1`; not the shipped expert, see reports/expert/REPORT.md;
`broad.py`, `broad_examples.py`, `ngsd/assets/training/broad_requests.json`):

1. harmful requests across the harm taxonomy (violence and weapons, cyber, fraud, hate and
   harassment, self-harm, sexual content, privacy, misinformation, drugs, dangerous advice): the
   seed prompts and AdvBench goals (ids >= 130, categorised by keywords; a goal's "how to X" clause
   also gives the act "X") plus hand-written acts per category, each put in two of seven surface
   forms (instruction, question, past tense, hypothetical, fiction, role-play, embedded in longer
   benign context). 200 of them, drawn round-robin over (category, form), each with the model's own
   greedy continuation of "I'm sorry, but I cannot" under the safety system prompt.
2. recovery: 180 of those requests whose answer opens with the base's own greedy compliant opening
   cut at 1-20 tokens (or AdvBench's "Sure, here is ..." target), then turns into the refusal.
3. benign: 140 harmless look-alikes (alarming words, same forms and categories) and 80 everyday
   requests, each with the base's own greedy answer under a KL loss.
4. validation: 15% of the topics (whole units, per category) are held apart; the weights halfway
   through and at the end of training (`validate_at`) are scored there, expert alone (refusals of
   harmful requests, fresh and after the base's own opening; refusals of look-alikes beyond the
   base's), and the better ones are saved. One epoch (about 35 min on one busy CPU thread).

`broad.training_requests(data_dir, split=..., seed=...)` gives the harmful and harmless requests of
a split: the same data can train other components (the risk probe).

**seed** (default; the recipe of v4 and of v4c, the shipped expert; `examples.build_examples`):

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
   `advbench_prompts` (48) AdvBench prompts drawn (seeded) from ids >= 130 (v4 drew from ids >= 50,
   which let 7 evaluation prompts in).
3. benign: harmless prompts written for ngsd (40 by hand, 62 + 93 from templates, and 40
   "contrast" requests that share words or topics with harmful ones: 235 in all, none from an
   evaluation suite) with the base's own greedy answers (48 tokens); their loss is
   KL(base || expert) at every answer position (`benign_loss="kl"`, default) or cross-entropy on
   the base's tokens ("ce"), so the expert stays close to the base there and the gate stays quiet.

Both recipes: LoRA r 16, alpha 64, dropout 0.1 on all attention and MLP projections (NGSD's copy; `--targets qv`
gives SafeDecoding's q/v), AdamW lr 2e-3, linear schedule with 3% warm-up, gradient clipping 0.3
(SafeDecoding's trainer settings), batch 1, 2 epochs (seed) or 1 (broad), seeded example order; loss only on answer
tokens. The adapter is saved in float16 (about 10 MB) and measured after reloading it.

The shipped adapter, v4c, is v4 retrained on v4's examples without the 14 rows whose prompts are AdvBench
evaluation prompts; its exact training file ships beside it, so it is reproduced from that file:

    ngsd train-expert --seed 0 --threads 1 --no-eval \\
        --examples ngsd/assets/experts/smollm2-135m-safety-lora/training_examples.jsonl

A fresh run of the recipe (`ngsd train-expert --seed 0 --threads 1`) samples its own data and now draws
AdvBench ids >= 130, so its data differs from v4c's in those prompts.

The broad expert of reports/expert: `ngsd train-expert --recipe broad --epochs 1 --seed 0 --threads 1 --no-eval --out DIR`.

Modules: `prompts` (the prompt lists, read from the asset file), `config` (`TrainExpertConfig`),
`broad` (the broad requests and their split), `broad_examples` (the broad training set and its
validation), `examples` (the seed recipe; tokenising and generation helpers both use), `splits`
(the evaluation prompts and the leak check), `trainer` (LoRA training, choice of weights and the whole
run), `selfcheck` (the expert measured on its own), `cli` (arguments; light, imports no torch).
Nothing is imported here, so `ngsd --help` stays fast.
"""
