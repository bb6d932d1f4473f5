"""NGSD inside vLLM: each request guarded or routed as `ngsd.generate` decides by default, the selection done
by ngsd's step op. The risk probe's part (which requests are routed, at what alpha the rest are
guarded) is `risk.py`; with ``risk="off"`` (or another model or expert) every request is guarded.

One request per prompt. The engine's model is a wrapper (`NGSDGuardedLlamaForCausalLM`,
registered by this package's vLLM plugin) that runs the base and the expert (the base with the
LoRA adapter merged in at load time) as two full-depth stacks in the same forward, each with its
own paged KV cache, so whatever the scheduler does (chunked prefill, preemption and recompute,
batch reordering) both see exactly the same tokens. Its `compute_logits` returns the base logits
and hands the expert's logits for the same rows to `NGSDLogitsProcessor` (same worker process),
which keeps each request's gate state and, for every guarded row, calls
`torch.ops.ngsd.guarded_select` (the CPU step on a CPU, the Triton kernels on CUDA) and forces the
chosen token. `engine_kwargs()` builds the arguments for `vllm.LLM(...)`; `serve_args()` those of
`vllm serve`.

>>> from vllm import LLM, SamplingParams                                    # doctest: +SKIP
>>> from ngsd.vllm import engine_kwargs                                      # doctest: +SKIP
>>> llm = LLM(**engine_kwargs("path/to/model", expert="shipped", alpha=0.9))  # doctest: +SKIP
>>> llm.generate(["..."], SamplingParams(max_tokens=64, extra_args={"ngsd_alpha": 1.0}))  # doctest: +SKIP

Importing this package needs vLLM (`pip install -e ".[vllm]"` in the checkout, or `bash scripts/vllm_env.sh` for
a separate environment); `import ngsd` never imports it.
"""

from __future__ import annotations

try:
    import vllm  # noqa: F401
except ImportError as missing:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ngsd.vllm needs vLLM: in the ngsd checkout, pip install -e '.[vllm]' "
        "(CPU: bash scripts/vllm_env.sh builds .venv-vllm/)"
    ) from missing

from .engine import ARCHITECTURE, PROCESSOR, engine_kwargs, serve_args  # noqa: E402
from .settings import GuardSettings, RequestPolicy  # noqa: E402

__all__ = ["ARCHITECTURE", "PROCESSOR", "GuardSettings", "RequestPolicy", "engine_kwargs", "serve_args"]
