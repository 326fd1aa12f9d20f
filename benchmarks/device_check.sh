#!/bin/bash
# The GPU measurements that need a CUDA machine, as stages run in order, each with its own time
# limit, so that one call of limited length returns what its finished stages wrote:
#   bash benchmarks/device_check.sh /tmp/d1 $OUT/call1.tgz                        # <= 585 s
#   STAGES="training host-malloc" bash benchmarks/device_check.sh /tmp/d2 $OUT/call2.tgz  # <= 215 s
# Results go to the folder in $1 (default benchmarks/results/device). With $2, that folder is
# packed into one .tgz after every stage (plots, dream arrays and checkpoints left out), so a run
# stopped at its time limit still returns what its finished stages wrote. The folder also gets
# inductor-code.tgz, the Python source inductor generated (graphs and Triton kernels; dropped
# above KERNELS_MB, 6).
# The default STAGES, "variants tests": the dream step with the settings not yet timed on a GPU
# (inductor's, and the BN term's norms per channel width), all of them at once first
# (`combined`), each timed in turn with the default step right after its compile, then the GPU
# and Triton tests. `training`: the local-training and distillation steps; `host-malloc`: the
# simulated session's host cost with glibc keeping freed memory. Other stages: `benchmark` (the
# device benchmark's table with profiles and two step variants: rerun it after changing the
# step), `simulate-graphs` (two short bf16 simulations, with [device] train_cuda_graphs = "on"
# and dream_graph = "one", then as by default), `server` (the host cost: server unmasking on the
# host and on the GPU, uploads downloaded into pinned or pageable memory), `simulate` (device
# masking, two rounds).
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

simulate() {  # simulate NAME LIMIT [DEVICE-KEY=VALUE...]: a short bf16 run of 3 clients
    local name=$1 limit=$2 config="$out/sim-$1.toml"
    shift 2
    # clients 0 and 2 share an architecture: one vmapped group and one single step
    {
        printf '[data]\nclients = 3\n[models]\nmodels = ["smallcnn", "resnet8"]\n'
        printf 'server_model = "resnet8"\n[codream]\nrounds = 2\ndream_steps = 10\n'
        printf 'warmup_epochs = 2\ndistill_epochs = 1\n[run]\nbaselines = []\n'
        printf '[device]\ndevice = "cuda"\n'
        for pair in "$@"; do printf '%s = "%s"\n' "${pair%%=*}" "${pair#*=}"; done
    } > "$config"
    stage "simulate ($name)" "$limit" "$out/sim-$name.log" python3 -c \
        "from codream_secure.cli import main; main()" simulate --config "$config" \
        --out "$out/sim-$name"
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
        # the one-pass BatchNorm kernel's tests first, then the rest of the GPU tests
        stage "gpu and triton tests" "${TEST_S:-210}" "$out/tests.log" python3 -m pytest -v \
            --tb=short -rfE --durations=20 -p no:cacheprovider -m "gpu or triton" \
            tests/core/test_bn_act.py tests/core/test_fast_dream.py tests/core/test_gpu_send.py \
            tests/audit/test_device_bench.py tests/core/test_dreams.py \
            tests/core/test_train_step.py tests/core/test_gpu_interop.py \
            tests/core/test_gpu_masking.py tests/core/test_gpu_chacha20.py \
            tests/core/test_triton_compile.py tests/core/test_federation.py \
            tests/core/test_gpu_graphed.py ;;
    simulate-graphs)
        simulate graphs-on "${SIMG_S:-100}" precision=bf16 train_cuda_graphs=on dream_graph=one
        simulate graphs-off "${SIMG_S:-100}" precision=bf16 ;;
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
        simulate device-masking "${SIM_S:-25}" masking=device ;;
    host-malloc)
        # glibc: serve buffers under 32 MiB from the heap and never trim it, so the 3 MiB
        # uploads reuse memory instead of page-faulting fresh mappings every step
        stage "session host cost, glibc keeping freed memory" "${MALLOC_S:-25}" \
            "$out/server-malloc.log" env MALLOC_MMAP_THRESHOLD_=33554432 \
            MALLOC_TRIM_THRESHOLD_=1073741824 python3 benchmarks/session_host_cost.py \
            --masker device,device-pageable --unmasker host,device --turns 3 ;;
    esac
done
