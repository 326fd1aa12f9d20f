#!/bin/bash
# Everything issue 6 measures, in one call on a CUDA machine: the GPU tests, then the device
# benchmark with its profile. Usage: bash benchmarks/device_check.sh [OUT_DIR]
# Logs and results go to OUT_DIR (default benchmarks/results/device). Where the machine lacks
# `cryptography`, put its wheels on PYTHONPATH first (docs/gpu.md).
set -o pipefail
out=${1:-benchmarks/results/device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
start=$(date +%s)
timeout "${BENCH_S:-300}" python3 -m benchmarks.device --profile --out "$out" \
    ${BENCH_ARGS:---step-variants no-bn-term} > "$out/bench.log" 2>&1
echo "benchmark rc=$? in $(( $(date +%s) - start )) s"
grep -vE "^\s*$" "$out/bench.log" | tail -40
start=$(date +%s)
timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/core/test_gpu_chacha20.py tests/core/test_gpu_masking.py \
    tests/core/test_fast_dream.py tests/core/test_gpu_interop.py > "$out/tests.log" 2>&1
echo "gpu tests rc=$? in $(( $(date +%s) - start )) s"
tail -12 "$out/tests.log"
