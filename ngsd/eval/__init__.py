"""Safety and utility evaluation of guarded decoding: `ngsd eval`.

Compares decoding methods (no defence, NGSD at several alphas, SafeDecoding, the expert alone,
and any registered later) on the same prompts with the same greedy settings, and reports attack
success rate per harmful suite, over-refusal on XSTest, benign fidelity, GSM8K accuracy, gate
statistics and speed, as JSON, Markdown and PNG plots.

>>> from ngsd.eval import load_config, run_evaluation
>>> outcome = run_evaluation(load_config("smoke"), out_dir="eval_runs/smoke")   # doctest: +SKIP
>>> outcome.metrics["methods"]["ngsd_a0.9"]["summary"]["asr"]                   # doctest: +SKIP

The names below are imported on first use (module `__getattr__`), so `ngsd eval --help` does not
import torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# public name -> submodule that defines it
_EXPORTS = {
    "EvalConfig": ".config",
    "config_from_dict": ".config",
    "load_config": ".config",
    "DEFAULT_METHODS": ".methods",
    "Method": ".methods",
    "get_method": ".methods",
    "method_names": ".methods",
    "register_method": ".methods",
    "Targets": ".metrics",
    "compute_metrics": ".metrics",
    "EvalOutcome": ".pipeline",
    "ExpertNotFoundError": ".pipeline",
    "run_evaluation": ".pipeline",
    "DecodingSettings": ".runner",
    "GenerationCache": ".runner",
    "Runner": ".runner",
    "SuiteSpec": ".suites",
    "load_suites": ".suites",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
