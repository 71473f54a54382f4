#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU and no network: builds the extension (CPU + CUDA kernels)
# in place, runs the package's self-check (vapt-check: every backend on every device against the
# references), the test suite (kernel backends on CUDA tensors too), the op benchmarks with their
# target ratios, and the model benchmark. Everything lands in $OUT (default ./gpu_check):
#   build.log       machine, versions, build configuration and compiler output
#   check.log       python -m vapt_kernels.check: versions, devices, backends, self-test, auto's picks
#   tests.log       pytest, the CUDA cases of the suite
#   bench_ops.log   pytest-benchmark table; ops.json its raw data; ops_summary.txt the target ratios
#   bench_model.log vapt-bench table; model/results.csv, model/summary.json
#   bench_tasks.log vapt-bench --tasks 16 (ViT-B, batch 128, bf16): mixed batches of 16 tasks against
#                   the single-task model and the loop over tasks; tasks/results.csv, tasks/summary.json
# Installs nothing; uses $PYTHON (default python3) with torch, triton, timm, pytest, pytest-benchmark
# and hypothesis already there. Every step has a time limit (seconds; override with the variables
# below) so that the whole check fits a lent machine's few minutes; a step that runs out is a failed
# step. Exits non-zero when a step failed, after running the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT/model" "$OUT/tasks"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TESTS_LIMIT=${TESTS_LIMIT:-240} OPS_LIMIT=${OPS_LIMIT:-90} MODEL_LIMIT=${MODEL_LIMIT:-90} TASKS_LIMIT=${TASKS_LIMIT:-60}
status=0
step() { echo "== $1 ($(date +%T))"; }

step build
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" -c "import torch, triton, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'timm', timm.__version__)"
    FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
} >"$OUT/build.log" 2>&1 || { status=1; echo "build failed:"; tail -n 40 "$OUT/build.log"; }

step "self-check"
"$PY" -m vapt_kernels.check 2>&1 | tee "$OUT/check.log" || status=1

step tests
# The CUDA cases only (their ids name the device): CI runs the CPU ones on every change.
timeout "$TESTS_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -k cuda --durations=15 tests >"$OUT/tests.log" 2>&1 || status=1
tail -n 15 "$OUT/tests.log"

step "op benchmarks"
timeout "$OPS_LIMIT" "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_ops.py --benchmark-only \
    --benchmark-columns=median,iqr,ops --benchmark-json="$OUT/ops.json" >"$OUT/bench_ops.log" 2>&1 || status=1
"$PY" benchmarks/ops_summary.py "$OUT/ops.json" | tee "$OUT/ops_summary.txt" || status=1

step "model benchmark"
timeout "$MODEL_LIMIT" "$PY" -m vapt_kernels.bench --device cuda --out "$OUT/model" >"$OUT/bench_model.log" 2>&1 || status=1
tail -n 30 "$OUT/bench_model.log"

step "many-task benchmark"
timeout "$TASKS_LIMIT" "$PY" -m vapt_kernels.bench --device cuda --tasks 16 --steps 15 --no-memory \
    --providers floor vapt-triton vapt-native --out "$OUT/tasks" >"$OUT/bench_tasks.log" 2>&1 || status=1
tail -n 20 "$OUT/bench_tasks.log"

step "done, status $status"
exit $status
