#!/bin/bash
# What issue 6 still has to measure on a CUDA machine, in two calls sent back to back (the
# machine stays warm for 30 s after a call; a fresh start costs a minute or more of a 15-minute
# lease):
#   bash benchmarks/device_check.sh /tmp/d1 $OUT/call1.tgz                        # call 1, <= 585 s
#   STAGES="training host-malloc" bash benchmarks/device_check.sh /tmp/d2 $OUT/call2.tgz
#                                                                                 # call 2, <= 215 s
# Results go to the folder in $1 (default benchmarks/results/device). With $2, that folder is
# packed into one .tgz after every stage (plots, dream arrays and checkpoints left out): the
# device tool returns at most 8 files, so a call writes one, and a call stopped at its time limit
# still returns what its finished stages wrote. The folder also gets inductor-code.tgz, the
# Python source inductor generated (graphs and Triton kernels; dropped above KERNELS_MB, 6).
# Call 1 (the default STAGES, "variants tests", since session 10 saw the issue's whole table):
# the dream step with the settings never yet timed (inductor's, and the BN term's norms per
# channel width), all of them at once first (`combined`), each timed in turn with the default
# step right after its compile and printed at once, then the GPU and Triton tests, the ones
# session 10's time limit did not reach first.
# Call 2: the local-training and distillation steps (distillation with CUDA graphs never timed),
# then the simulated session's host cost with glibc keeping freed memory. Other stages:
# `benchmark` (the issue's table with profiles and two step variants: rerun it after changing
# the step), `simulate-graphs` (two short bf16 simulations, with --train-cuda-graphs on
# --dream-graph one and then as by default), `server` (the host cost: server unmasking on the
# host and on the GPU, uploads downloaded into pinned or pageable memory), `simulate` (device
# masking, one round).
# Time limits per stage, in seconds (0 skips a stage): BENCH_S (330), TEST_S (210), SIMG_S (100,
# each of the two simulations), SERVER_S (25), VARIANTS_S (330), TRAIN_S (160), SIM_S (25),
# MALLOC_S (25). A stage past its limit gets SIGINT (so pytest still reports its failures), then
# SIGKILL 15 s later. BENCH_ARGS replaces the benchmark's extra arguments (set but empty: none);
# VARIANTS the variants stage's list. Where the machine lacks `cryptography`, `phe` or
# `opacus`, the wheels in WHEELS (default .whl, which the device tool's `carry` brings along)
# are installed into a private folder on PYTHONPATH; any other missing module stops the script
# before the first stage.
set -o pipefail
out=${1:-benchmarks/results/device}
pack=${2:-}
stages=${STAGES:-variants tests}
for name in $stages; do
    case $name in benchmark|tests|simulate|server|variants|training|simulate-graphs|host-malloc) ;;
        *) echo "unknown stage '$name' (benchmark tests simulate-graphs server variants training" \
                "simulate host-malloc)" >&2
           exit 2 ;;
    esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# the scripts run as files: the checkout provides codream_secure and protocols
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# the device image lacks these three (KINDS.md's package list): they travel as wheels
absent=$(python3 - << 'PY'
import importlib

for module in ("cryptography", "phe", "opacus"):
    try:
        importlib.import_module(module)
    except Exception:  # absent, or failing while it loads
        print(module, end=" ")
PY
)
if [ -n "$absent" ]; then
    wheels=${WHEELS:-.whl}
    if ! compgen -G "$wheels/*.whl" > /dev/null; then
        echo "${absent% } not importable and '$wheels' holds no wheels: carry them" \
             "(docs/gpu.md)" >&2
        exit 2
    fi
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" \
        "$wheels"/*.whl || exit 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# one process imports everything the stages need and looks for CUDA: a bad call costs seconds
python3 - << 'PY' || exit 2
import importlib
import sys

missing = []
for module in "numpy cryptography click rich sklearn matplotlib phe opacus torch".split():
    try:
        importlib.import_module(module)
    except Exception as error:  # an ImportError, or a module that fails while it loads
        missing.append(f"{module} ({type(error).__name__}: {error})")
if missing:
    sys.exit("cannot import: " + "; ".join(missing))
if not sys.modules["torch"].cuda.is_available():
    sys.exit("no CUDA device")
PY

# inductor's generated code (each compiled graph and its Triton kernels as Python source) goes
# to one known folder, so the kernels the profiles name can be read afterwards on any machine
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}

pack_kernels() {  # inductor-code.tgz: the generated sources, dropped if over KERNELS_MB
    local code="$out/inductor-code.tgz" limit=$(( ${KERNELS_MB:-6} * 1048576 ))
    [ -d "$TORCHINDUCTOR_CACHE_DIR" ] || return 0
    (cd "$TORCHINDUCTOR_CACHE_DIR" && find . -name '*.py' -print0 \
        | tar czf "$code" --null -T -) 2> /dev/null || { rm -f "$code"; return 0; }
    if [ "$(stat -c %s "$code")" -gt "$limit" ]; then  # the call returns 16 MiB per file
        rm -f "$code"
        echo "inductor's code is over ${KERNELS_MB:-6} MB packed: not kept" \
            | tee -a "$out/stages.log"
    fi
}

pack_results() {  # one archive of the logs, reports, JSON and generated code written so far
    pack_kernels
    [ -n "$pack" ] || return 0
    tar czf "$pack" -C "$out" --exclude='*.png' --exclude='*.npz' --exclude='*.pt' . \
        || echo "packing $out into $pack failed" >&2
}

stage() {  # stage NAME LIMIT LOG COMMAND...: run COMMAND with a time limit, then show its tail
    local name=$1 limit=$2 log=$3 start
    shift 3
    [ "$limit" -gt 0 ] || return 0
    start=$(date +%s)
    # SIGINT first: pytest then prints its failures and Python its traceback; KILL 15 s later
    timeout -s INT -k 15 "$limit" "$@" > "$log" 2>&1
    echo "$name rc=$? in $(( $(date +%s) - start )) s" | tee -a "$out/stages.log"
    grep -vE "^\s*$" "$log" | tail -40
    pack_results
}

simulate() {  # simulate NAME LIMIT FLAGS...: a short bf16 run of 3 clients, 2 architectures
    local name=$1 limit=$2
    shift 2
    # clients 0 and 2 share an architecture: one vmapped group and one single step
    stage "simulate ($name)" "$limit" "$out/sim-$name.log" python3 -c \
        "from codream_secure.cli import main; main()" simulate --device cuda --clients 3 \
        --models smallcnn,resnet8 --server-model resnet8 --warmup-epochs 2 --distill-epochs 1 \
        --baselines none --rounds 2 --dream-steps 10 --out "$out/sim-$name" "$@"
}

# the step variants never timed on a GPU (the variants stage's default): the one-pass BN kernel
# first, then every same-loss setting at once
untimed=fused-bn,combined,grouped-bn-norms,coordesc,combo-kernels,autotune-pointwise
for name in $stages; do
    case $name in
    benchmark)
        stage benchmark "${BENCH_S:-330}" "$out/bench.log" \
            python3 -m codream_secure.audit.device --profile --out "$out" \
            ${BENCH_ARGS---step-variants pad-stem,tile-reductions} ;;
    tests)
        # session 11's one-pass BatchNorm kernel, then the tests session 10's time limit cut
        # (all but distillation with CUDA graphs passed in session 5, before sessions 6-9
        # changed the code around them), then those that passed in session 10
        stage "gpu and triton tests" "${TEST_S:-210}" "$out/tests.log" python3 -m pytest -v \
            --tb=short -rfE --durations=20 -p no:cacheprovider -m "gpu or triton" \
            tests/core/test_bn_act.py tests/core/test_fast_dream.py tests/core/test_gpu_send.py \
            tests/audit/test_device_bench.py tests/core/test_dreams.py \
            tests/core/test_train_step.py tests/core/test_gpu_interop.py \
            tests/core/test_gpu_masking.py tests/core/test_gpu_chacha20.py \
            tests/core/test_triton_compile.py tests/core/test_federation.py \
            tests/core/test_gpu_graphed.py ;;
    simulate-graphs)
        simulate graphs-on "${SIMG_S:-100}" --precision bf16 --train-cuda-graphs on \
            --dream-graph one
        simulate graphs-off "${SIMG_S:-100}" --precision bf16 ;;
    server)
        stage "session host cost (server unmasking on the host, then on the GPU)" \
            "${SERVER_S:-25}" "$out/server.log" python3 benchmarks/session_host_cost.py \
            --masker device,device-pageable --unmasker host,device --turns 3 ;;
    variants)
        stage variants "${VARIANTS_S:-330}" "$out/variants.log" \
            python3 -m codream_secure.audit.device --sections step --out "$out/variants" \
            --step-variants "${VARIANTS:-$untimed}" ;;
    training)
        stage "training steps" "${TRAIN_S:-160}" "$out/train.log" \
            python3 -m codream_secure.audit.device --sections train --iters 10 --out "$out/train" ;;
    simulate)
        simulate device-masking "${SIM_S:-25}" --masking device --rounds 1 ;;
    host-malloc)
        # glibc: serve buffers under 32 MiB from the heap and never trim it, so the 3 MiB
        # uploads reuse memory instead of page-faulting fresh mappings every step
        stage "session host cost, glibc keeping freed memory" "${MALLOC_S:-25}" \
            "$out/server-malloc.log" env MALLOC_MMAP_THRESHOLD_=33554432 \
            MALLOC_TRIM_THRESHOLD_=1073741824 python3 benchmarks/session_host_cost.py \
            --masker device,device-pageable --unmasker host,device --turns 3 ;;
    esac
done
