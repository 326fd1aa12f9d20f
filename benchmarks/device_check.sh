#!/bin/bash
# Everything issue 6 measures, in one call on a CUDA machine: the device benchmark with its
# profiles (the round with one graph per client and with one graph for all clients), the
# inductor-setting step variants in a second run (slow compiles must not starve the rest), the
# GPU and Triton tests (kernels first), the local-training and distillation steps (a third run),
# a short `simulate` with device-side masking, then the simulated session's host cost with the
# server unmasking on the host and on the GPU.
# Usage: bash benchmarks/device_check.sh [OUT_DIR]
# Logs and results go to OUT_DIR (default benchmarks/results/device); the variants' run to
# OUT_DIR/variants, the training steps' to OUT_DIR/train. Where the machine lacks
# `cryptography`, put its wheels on PYTHONPATH first (docs/gpu.md). Time limits per stage, in
# seconds (0 skips a stage): BENCH_S (default 265), VARIANTS_S (90), TEST_S (110), TRAIN_S
# (90), SIM_S (20), SERVER_S (15): at most 590 s in all. Tests run verbosely, so a stage cut short by its limit
# still shows which tests passed, and list their durations. BENCH_ARGS and VARIANTS replace the
# benchmark's arguments and the variants' list.
set -o pipefail
out=${1:-benchmarks/results/device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2

stage() {  # stage NAME LIMIT LOG COMMAND...: run COMMAND with a time limit, then show its tail
    local name=$1 limit=$2 log=$3 start
    shift 3
    [ "$limit" -gt 0 ] || return 0
    start=$(date +%s)
    timeout "$limit" "$@" > "$log" 2>&1
    echo "$name rc=$? in $(( $(date +%s) - start )) s"
    grep -vE "^\s*$" "$log" | tail -40
}

stage benchmark "${BENCH_S:-265}" "$out/bench.log" python3 -m benchmarks.device --profile \
    --out "$out" ${BENCH_ARGS:---step-variants var-mean,no-bn-term}
stage variants "${VARIANTS_S:-90}" "$out/variants.log" python3 -m benchmarks.device \
    --sections step --out "$out/variants" \
    --step-variants "${VARIANTS:-coordesc,tile-reductions,autotune-pointwise}"
stage "gpu and triton tests" "${TEST_S:-110}" "$out/tests.log" python3 -m pytest -v \
    --durations=20 -p no:cacheprovider -m "gpu or triton" tests/core/test_gpu_chacha20.py \
    tests/core/test_gpu_masking.py tests/core/test_gpu_interop.py \
    tests/core/test_triton_compile.py tests/core/test_fast_dream.py tests/core/test_gpu_send.py \
    tests/core/test_gpu_graphed.py tests/core/test_train_step.py tests/core/test_federation.py \
    tests/benchmarks/test_device_bench.py
stage "training steps" "${TRAIN_S:-90}" "$out/train.log" python3 -m benchmarks.device \
    --sections train --iters 10 --out "$out/train"
stage "simulate (device masking)" "${SIM_S:-20}" "$out/sim.log" python3 -c \
    "from codream_secure.cli import main; main()" simulate --device cuda --masking device \
    --rounds 1 --dream-steps 10 --out "$out/sim"
stage "session host cost (server unmasking on the host, then on the GPU)" "${SERVER_S:-15}" \
    "$out/server.log" python3 -c "from benchmarks.session_host_cost import main; main([]); \
main(['--unmasker', 'device'])"
