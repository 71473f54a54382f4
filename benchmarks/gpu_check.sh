#!/usr/bin/env bash
# The first run of the package on a GPU, sized for a lent machine's lease (15 minutes of device
# time in all, at most 10 minutes per command): under 6 minutes on one H100, every step under a
# hard time limit and the whole under TOTAL_LIMIT, each step's results written to $OUT as soon as
# it ends, the key table printed last. Steps, in order of value:
#   build        the extension (CPU and CUDA kernels) in place, for the GPU present only
#                (TORCH_CUDA_ARCH_LIST from its compute capability), MAX_JOBS = the cores
#   check        vapt-check --device cuda: every backend against the references, auto's picks
#   op tests     the op suite's CUDA cases: every backend against float64 on fixed shapes up to ViT
#                widths, forward and backward, float32/float16/bfloat16 (no hypothesis draws)
#   more tests   the suite's other CUDA cases (gradients, vmap, models, convergence, ...; not the
#                torch.compile ones, whose compiles alone would take the step's time)
#   op bench     benchmarks/bench_ops.py: device and host time of each op and backend
#   model bench  vapt-bench: one training step and one inference forward of ViT-B/16 (batch 128,
#                bf16) per provider against the frozen ViT
#   tasks <b>    vapt-bench --tasks 16 for backend b (triton, native): a batch mixing 16 tasks
#                against the single-task model and the loop over one-task models; for native with
#                1024 tasks registered (the sweep over 4 to 4096 does not fit the lease)
# $OUT (default ./gpu_check) receives at most 7 files, each rewritten when a step ends:
#   summary.txt  the key table: every step's status, seconds and limit, then the figures
#   logs.tar.gz  every step's full log (build configuration, compiler output, pytest -v, ...)
#   ops.json     the op benchmark's rows; model.csv, model.png, model.json: vapt-bench's
#                results.csv, chart and summary.json; tasks.csv: the many-task rows
# `--dry` runs every step on the CPU at tiny sizes with small limits (CI runs it: see
# tests/test_gpu_check.py); its build step checks the extension already built instead of
# compiling one. The step limits (seconds) can be overridden through the environment:
# BUILD_LIMIT, CHECK_LIMIT, OP_TESTS_LIMIT, MORE_TESTS_LIMIT, OP_BENCH_LIMIT, MODEL_LIMIT,
# TASKS_LIMIT (each many-task step), TOTAL_LIMIT. Installs nothing: $PYTHON (default python3)
# must have torch, triton, timm, numpy, pytest (pytest-xdist is used when present), hypothesis and
# tqdm. Exits non-zero when a step failed or ran out of time, after running the others.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    --dry) DRY=1 ;;
    "") DRY=0 ;;
    *) echo "usage: $0 [--dry]" >&2; exit 2 ;;
esac
OUT=${OUT:-$PWD/gpu_check}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT" "$WORK/logs"
rm -f "$OUT"/{summary.txt,logs.tar.gz,ops.json,model.csv,model.png,model.json,tasks.csv}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# ninja (parallel compilation) is installed next to the interpreter.
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
CORES=$(nproc)

if [ "$DRY" = 1 ]; then
    DEV=cpu
    # Limits a loaded 2-core CI machine meets (a quiet one takes a third of each).
    : "${BUILD_LIMIT:=60}" "${CHECK_LIMIT:=120}" "${OP_TESTS_LIMIT:=120}" "${MORE_TESTS_LIMIT:=120}"
    : "${OP_BENCH_LIMIT:=60}" "${MODEL_LIMIT:=120}" "${TASKS_LIMIT:=60}" "${TOTAL_LIMIT:=600}"
    SUBSET=" and tiny"  # the gradcheck-sized shapes only
    MORE_SUBSET=" and tiny and (gradcheck or vmap or func_grad)"
    MORE_TESTS=(tests/test_ops.py)
    OP_BENCH=(--size tiny)
    MODEL=(--model vit_tiny_patch16_224 --img-size 32 --batch 4 --steps 2 --warmup 1 --no-memory)
    TASKS=(--tasks 2)
    REGISTERED=(--registered 8)
else
    DEV=cuda
    : "${BUILD_LIMIT:=110}" "${CHECK_LIMIT:=90}" "${OP_TESTS_LIMIT:=75}" "${MORE_TESTS_LIMIT:=50}"
    : "${OP_BENCH_LIMIT:=40}" "${MODEL_LIMIT:=50}" "${TASKS_LIMIT:=35}" "${TOTAL_LIMIT:=355}"
    SUBSET=""
    MORE_SUBSET=""
    MORE_TESTS=(tests)
    OP_BENCH=()
    MODEL=(--steps 10)
    TASKS=(--tasks 16 --steps 8 --no-memory)
    REGISTERED=(--registered 1024)
fi
# The emulation and static-gate files run on the CPU in CI and compile for minutes: never here.
IGNORE=(--ignore=tests/test_cuda_emulation.py --ignore=tests/test_gpu_static_cuda.py --ignore=tests/test_gpu_static_triton.py)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "$CORES")
PYTEST=("$PY" -m pytest -p no:cacheprovider -v -rfE --durations=10 "${XDIST[@]}")

START=$SECONDS
FAILED=0
STEPS="$WORK/steps.tsv"
printf 'step\tstatus\tseconds\tlimit\n' >"$STEPS"

# run_step NAME LIMIT LOG COMMAND...: run COMMAND under min(LIMIT, what is left of TOTAL_LIMIT)
# seconds (SIGINT first, so that pytest prints its summary, SIGKILL 5 s later), its output in
# $WORK/logs/LOG; records the outcome and rewrites $OUT.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((TOTAL_LIMIT - (SECONDS - START)))
    ((limit > left)) && limit=$left
    echo "== $name ($(date +%T), limit ${limit} s)"
    if ((limit < 10)); then
        printf '%s\tskipped: no time left\t0\t%s\n' "$name" "$limit" >>"$STEPS"
        FAILED=1
        publish
        return
    fi
    local t0=$SECONDS rc status
    timeout -s INT -k 5 $((limit - 5)) "$@" >"$WORK/logs/$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 130 | 137) status="timed out"; FAILED=1 ;;
        *) status="failed (exit $rc)"; FAILED=1 ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - t0)) "$limit" >>"$STEPS"
    echo "   $status in $((SECONDS - t0)) s"
    publish
}

# The lines of a log between the first line matching START and the next blank line.
section() { sed -n "/$2/,/^\$/p" "$WORK/logs/$1" 2>/dev/null; }

# publish: copy every result so far to $OUT and rewrite the key table there.
publish() {
    [ -f "$WORK/ops.json" ] && cp "$WORK/ops.json" "$OUT/ops.json"
    [ -f "$WORK/model/results.csv" ] && cp "$WORK/model/results.csv" "$OUT/model.csv"
    [ -f "$WORK/model/summary.json" ] && cp "$WORK/model/summary.json" "$OUT/model.json"
    [ -f "$WORK/model/throughput.png" ] && cp "$WORK/model/throughput.png" "$OUT/model.png"
    [ -f "$WORK/tasks/results.csv" ] && cp "$WORK/tasks/results.csv" "$OUT/tasks.csv"
    tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
    {
        echo "gpu_check$([ "$DRY" = 1 ] && echo ' --dry'): $(cat "$WORK/machine" 2>/dev/null)"
        awk -F'\t' '{ printf "%-12s %-24s %7s %5s\n", $1, $2, $3, $4 }' "$STEPS"
        echo "total $((SECONDS - START)) s of $TOTAL_LIMIT"
        echo
        echo "-- check"
        sed -n '/^auto picks/,$p' "$WORK/logs/check.log" 2>/dev/null
        echo "-- tests"
        for log in op_tests.log more_tests.log; do tail -n 1 "$WORK/logs/$log" 2>/dev/null; done
        echo "-- op benchmark"
        sed -n '/^summary/,$p' "$WORK/logs/op_bench.log" 2>/dev/null
        echo "-- model benchmark"
        section model_bench.log '^mode  '
        echo "-- many tasks"
        for b in triton native; do section "tasks_$b.log" '^mode  '; done
    } >"$OUT/summary.txt"
}

"$PY" - >"$WORK/machine" 2>&1 <<EOF
import torch
from vapt_kernels.environment import device_name, library_versions
versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
print(f"{device_name('$DEV')}; {versions}; $CORES cores")
EOF

if [ "$DRY" = 1 ]; then
    run_step build "$BUILD_LIMIT" build.log "$PY" -c "
from vapt_kernels import ops
from vapt_kernels.ops import native
print('dry run: the extension already built is checked instead of compiling one')
print('build information:', native.build_info())
reason = ops.unavailable_reason('native', 'cpu')
assert reason is None, reason"
else
    ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>>"$WORK/logs/build.log")
    run_step build "$BUILD_LIMIT" build.log env FORCE_CUDA=1 MAX_JOBS="$CORES" TORCH_CUDA_ARCH_LIST="$ARCH" \
        bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; command -v ninja; \"$PY\" setup.py build_ext --inplace"
fi

run_step check "$CHECK_LIMIT" check.log "$PY" -m vapt_kernels.check --device "$DEV"
run_step "op tests" "$OP_TESTS_LIMIT" op_tests.log "${PYTEST[@]}" tests/test_ops.py \
    -k "$DEV and (matches_reference or low_precision)$SUBSET"
run_step "more tests" "$MORE_TESTS_LIMIT" more_tests.log "${PYTEST[@]}" "${MORE_TESTS[@]}" "${IGNORE[@]}" \
    -k "$DEV and not random_shapes and not matches_reference and not low_precision and not compiles$MORE_SUBSET"
run_step "op bench" "$OP_BENCH_LIMIT" op_bench.log "$PY" benchmarks/bench_ops.py --device "$DEV" "${OP_BENCH[@]}" \
    --json "$WORK/ops.json" --budget $((OP_BENCH_LIMIT * 2 / 3))
run_step "model bench" "$MODEL_LIMIT" model_bench.log "$PY" -m vapt_kernels.bench --device "$DEV" "${MODEL[@]}" \
    --out "$WORK/model"
for b in triton native; do
    extra=()
    [ "$b" = native ] && extra=("${REGISTERED[@]}")
    run_step "tasks $b" "$TASKS_LIMIT" "tasks_$b.log" "$PY" -m vapt_kernels.bench --device "$DEV" "${MODEL[@]}" \
        "${TASKS[@]}" "${extra[@]}" --providers floor "vapt-$b" --no-plot --out "$WORK/tasks"
done

echo
cat "$OUT/summary.txt"
exit $FAILED
