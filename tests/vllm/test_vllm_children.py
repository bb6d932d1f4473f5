"""``n > 1`` in a single-process engine: the children share one SamplingParams object, not one gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; run with .venv-vllm/bin/python (scripts/vllm_env.sh)")

from .conftest import ALPHA, ENGINE, GUARDED_KV_BYTES  # noqa: E402

CHILDREN = 3


def test_children_of_one_request_each_keep_their_own_gate(model_path, prompt_ids, tmp_path):
    """Sampled, no seed: each child decodes exactly as the same prompt sent as a separate request (the same
    drawn keys in the same rows). With one gate state per SamplingParams object the children shared one
    potential, step and Philox key."""
    job = {"model": model_path, "alpha": ALPHA, "engine": ENGINE, "kv_cache_bytes": 4 * GUARDED_KV_BYTES,
           "prompt": prompt_ids[0], "n": CHILDREN, "new_tokens": 24, "out": str(tmp_path / "tokens.json")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    script = Path(__file__).with_name("one_process_children.py")
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "job.json")], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(Path(job["out"]).read_text())
    assert result["children_params"] == 1, "the children were meant to share one SamplingParams; the test lost its point"
    assert len({tuple(tokens) for tokens in result["children"]}) == CHILDREN, "the children should sample apart"
    assert result["children"] == result["separate"]
