#!/bin/bash
# Everything issue 6 measures on a CUDA machine, in two calls of at most 10 minutes each.
#   bash benchmarks/device_check.sh OUT                           # call 1, 530-590 s
#   STAGES="variants simulate-graphs host-malloc" bash benchmarks/device_check.sh OUT
#                                                                  # call 2, at most 275 s
# (add `training` to call 2, 120 s more, when local training or distillation changed)
# Call 1 (the default STAGES, "benchmark tests simulate server"): the device benchmark's default
# sections (the 5-minute table; device.md states the wall time) with profiles and sync
# audits, the GPU and Triton tests (kernels first), a short `simulate` with device-side masking
# and unmasking, then the simulated session's host cost with the server unmasking on the host
# and on the GPU, uploads downloaded into pinned or pageable memory. Call 2: the step variants
# (the padded stem and three inductor settings; slow compiles, so a run of their own), the
# local-training and distillation steps, `simulate` in bf16 as it is by default and with CUDA
# graphs for training plus one graph for every client's dream step (--train-cuda-graphs on
# --dream-graph one; report.json's per-phase seconds tell the two apart), and the session's
# host cost again with glibc told to keep
# freed memory (host-malloc; halves the protocol layer's time on our CPU when the uploads are
# plain arrays, docs/gpu.md). Logs and results go to OUT (default benchmarks/results/device);
# the variants' run to OUT/variants, the training steps' to OUT/train. Where the machine lacks
# `cryptography`, put its wheels on PYTHONPATH first (docs/gpu.md). Time limits per stage, in
# seconds (0 skips a stage): BENCH_S (default 300), TEST_S (180), SIM_S (25), SERVER_S (25),
# VARIANTS_S (130), TRAIN_S (120), SIMG_S (60, each of the two simulations), MALLOC_S (25). A
# stage past its limit gets SIGINT (so pytest still reports its failures), then SIGKILL 15 s
# later. Tests run verbosely and list their durations. BENCH_ARGS adds to the benchmark's
# arguments; VARIANTS replaces the variants' list.
set -o pipefail
out=${1:-benchmarks/results/device}
stages=${STAGES:-benchmark tests simulate server}
for name in $stages; do
    case $name in benchmark|tests|simulate|server|variants|training|simulate-graphs|host-malloc) ;;
        *) echo "unknown stage '$name' (benchmark tests simulate server variants training" \
                "simulate-graphs host-malloc)" >&2
           exit 2 ;;
    esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2

stage() {  # stage NAME LIMIT LOG COMMAND...: run COMMAND with a time limit, then show its tail
    local name=$1 limit=$2 log=$3 start
    shift 3
    [ "$limit" -gt 0 ] || return 0
    start=$(date +%s)
    # SIGINT first: pytest then prints its failures and Python its traceback; KILL 15 s later
    timeout -s INT -k 15 "$limit" "$@" > "$log" 2>&1
    echo "$name rc=$? in $(( $(date +%s) - start )) s"
    grep -vE "^\s*$" "$log" | tail -40
}

for name in $stages; do
    case $name in
    benchmark)
        stage benchmark "${BENCH_S:-300}" "$out/bench.log" python3 -m benchmarks.device \
            --profile --out "$out" ${BENCH_ARGS:-} ;;
    tests)
        stage "gpu and triton tests" "${TEST_S:-180}" "$out/tests.log" python3 -m pytest -v \
            --tb=short -rfE --durations=20 -p no:cacheprovider -m "gpu or triton" \
            tests/core/test_gpu_chacha20.py tests/core/test_gpu_masking.py \
            tests/core/test_gpu_interop.py tests/core/test_triton_compile.py \
            tests/core/test_fast_dream.py tests/core/test_gpu_send.py \
            tests/core/test_gpu_graphed.py tests/core/test_federation.py \
            tests/benchmarks/test_device_bench.py tests/core/test_dreams.py \
            tests/core/test_train_step.py ;;
    simulate)
        stage "simulate (device masking and unmasking)" "${SIM_S:-25}" "$out/sim.log" \
            python3 -c "from codream_secure.cli import main; main()" simulate --device cuda \
            --masking device --rounds 1 --dream-steps 10 --out "$out/sim" ;;
    server)
        stage "session host cost (server unmasking on the host, then on the GPU)" \
            "${SERVER_S:-25}" "$out/server.log" python3 -m benchmarks.session_host_cost \
            --masker device,device-pageable --unmasker host,device --turns 3 ;;
    host-malloc)
        # glibc: serve buffers under 32 MiB from the heap and never trim it, so the 3 MiB
        # uploads reuse memory instead of page-faulting fresh mappings every step
        stage "session host cost, glibc keeping freed memory" "${MALLOC_S:-25}" \
            "$out/server-malloc.log" env MALLOC_MMAP_THRESHOLD_=33554432 \
            MALLOC_TRIM_THRESHOLD_=1073741824 python3 -m benchmarks.session_host_cost \
            --masker device,device-pageable --unmasker host,device --turns 3 ;;
    variants)
        stage variants "${VARIANTS_S:-130}" "$out/variants.log" python3 -m benchmarks.device \
            --sections step --out "$out/variants" \
            --step-variants "${VARIANTS:-pad-stem,coordesc,tile-reductions,autotune-pointwise}" ;;
    simulate-graphs)
        for graphs in off on; do
            if [ $graphs = on ]; then extra="--dream-graph one"; else extra=""; fi
            stage "simulate (bf16, training CUDA graphs $graphs $extra)" "${SIMG_S:-60}" \
                "$out/sim-graphs-$graphs.log" python3 -c "from codream_secure.cli import main; \
main()" simulate --device cuda --precision bf16 --train-cuda-graphs $graphs $extra \
                --baselines none --rounds 2 --dream-steps 10 --out "$out/sim-graphs-$graphs"
        done ;;
    training)
        stage "training steps" "${TRAIN_S:-120}" "$out/train.log" python3 -m benchmarks.device \
            --sections train --iters 10 --out "$out/train" ;;
    esac
done
