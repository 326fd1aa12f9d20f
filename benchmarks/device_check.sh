#!/bin/bash
# Everything issue 6 measures, in one call on a CUDA machine: the device benchmark with its
# profile and step variants, the GPU tests, then a short `simulate` with device-side masking.
# Usage: bash benchmarks/device_check.sh [OUT_DIR]
# Logs and results go to OUT_DIR (default benchmarks/results/device). Where the machine lacks
# `cryptography`, put its wheels on PYTHONPATH first (docs/gpu.md). Time limits per stage:
# BENCH_S (default 400), TEST_S (150; 0 skips the tests), SIM_S (90; 0 skips the simulate run).
set -o pipefail
out=${1:-benchmarks/results/device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
start=$(date +%s)
timeout "${BENCH_S:-400}" python3 -m benchmarks.device --profile --out "$out" \
    ${BENCH_ARGS:---step-variants var-mean,no-bn-term,coordesc,tile-reductions,autotune-pointwise} \
    > "$out/bench.log" 2>&1
echo "benchmark rc=$? in $(( $(date +%s) - start )) s"
grep -vE "^\s*$" "$out/bench.log" | tail -60
if [ "${TEST_S:-150}" -gt 0 ]; then
    start=$(date +%s)
    timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -m "gpu or triton" \
        tests/core/test_gpu_chacha20.py tests/core/test_gpu_masking.py \
        tests/core/test_fast_dream.py tests/core/test_gpu_interop.py > "$out/tests.log" 2>&1
    echo "gpu tests rc=$? in $(( $(date +%s) - start )) s"
    tail -12 "$out/tests.log"
fi
if [ "${SIM_S:-90}" -gt 0 ]; then
    start=$(date +%s)
    timeout "${SIM_S:-90}" python3 -c "from codream_secure.cli import main; main()" simulate \
        --device cuda --masking device --rounds 1 --dream-steps 10 --out "$out/sim" \
        > "$out/sim.log" 2>&1
    echo "simulate (device masking) rc=$? in $(( $(date +%s) - start )) s"
    tail -15 "$out/sim.log"
fi
