#!/usr/bin/env bash
# First thing to run on a lent CUDA machine (issue 17): the kernel tests compiled for the real GPU
# (no TRITON_INTERPRET), then the step op timed against the PyTorch path and FlashInfer's sampler.
# Budget: under 10 minutes (the kernel tests get 300 s, the timing 240 s; JIT compilation included).
#   bash bench/gpu_check.sh                 # results under ${OUT:-bench/results}/gpu_*
# Exits 0 with a message when no GPU is visible.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
export TRITON_INTERPRET=0  # compiled kernels (the tests would otherwise default to the interpreter)

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible (torch.cuda.is_available() is False); nothing to do."
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee "$OUT_DIR/gpu_device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT_DIR/gpu_device.txt"
$PY -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>/dev/null | tee -a "$OUT_DIR/gpu_device.txt" \
    || echo "flashinfer not installed: its sampler is skipped" | tee -a "$OUT_DIR/gpu_device.txt"

status=0
echo "== kernel tests on CUDA (tests/kernels, 300 s cap) =="
# the kernel tests default to TRITON_INTERPRET=1 and CPU tensors: 0 + the plugin run them compiled on CUDA
TRITON_INTERPRET=0 PYTHONPATH="bench${PYTHONPATH:+:$PYTHONPATH}" \
    NGSD_DATA_DIR="${NGSD_DATA_DIR:-$(cd .. && pwd)/shared/data}" timeout 300 \
    $PY -m pytest -q -p cuda_default_device tests/kernels 2>&1 | tail -40 | tee "$OUT_DIR/gpu_tests.txt" \
    || true
grep -qE "passed|failed|error" "$OUT_DIR/gpu_tests.txt" || echo "kernel tests did not finish within 300 s" | tee -a "$OUT_DIR/gpu_tests.txt"
grep -qE "[0-9]+ failed|error" "$OUT_DIR/gpu_tests.txt" && status=1

echo "== step op timing (240 s cap) =="
timeout 240 $PY bench/gpu_step_timing.py --out "$OUT_DIR/gpu_step.json" --repeats 30 || {
    echo "gpu_step_timing stopped (exit $?); rows printed above are complete"; status=1; }
exit $status
