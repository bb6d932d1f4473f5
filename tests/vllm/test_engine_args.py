"""The arguments of a guarded engine, checked before any engine starts (no engine, no model)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; run with .venv-vllm/bin/python (scripts/vllm_env.sh)")

from ngsd.vllm import engine_kwargs, serve_args  # noqa: E402


def test_an_expert_folder_that_is_not_there_is_refused_before_the_engine_starts(tmp_path):
    """Found only in the engine's worker, a wrong expert path surfaced as vLLM's 'Engine core initialization
    failed. See root cause above.' (the reason only in the worker's log)."""
    missing = tmp_path / "no-such-adapter"
    for build in (engine_kwargs, serve_args):
        with pytest.raises(FileNotFoundError, match="no-such-adapter.*not a peft LoRA adapter folder"):
            build("some/model", expert=str(missing))
    assert engine_kwargs("some/model", expert="shipped")["hf_overrides"]["ngsd"]["expert"] == "shipped"
