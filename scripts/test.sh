#!/usr/bin/env bash
# Set-up plus the test suite (what CI runs); kernels run in Triton's CPU interpreter.
# Data: ../shared/data or $NGSD_DATA_DIR.
#   bash scripts/test.sh                 # the default suite (slow real-model checks deselected)
#   bash scripts/test.sh --slow          # everything, including the tests marked @pytest.mark.slow
#   bash scripts/test.sh tests/test_cli.py -k help   # further arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
marker=()
if [[ "${1:-}" == "--slow" ]]; then
    shift
    marker=(-m "slow or not slow")
fi
bash scripts/install.sh
export TRITON_INTERPRET=1
export NGSD_DATA_DIR="${NGSD_DATA_DIR:-$(cd .. && pwd)/shared/data}"
${PYTHON:-python3} -m pytest -q --durations=15 "${marker[@]}" "$@"
# the vLLM integration's tests run in their own environment (scripts/vllm_env.sh; .ci/run builds it)
VLLM_PY="${NGSD_VLLM_ENV:-.venv-vllm}/bin/python"
if [[ $# -eq 0 && -x "$VLLM_PY" ]]; then
    "$VLLM_PY" -m pytest -q --durations=5 "${marker[@]}" tests/vllm
fi
