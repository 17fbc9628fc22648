#!/usr/bin/env bash
# One GPU session: build xbm-kernels with CUDA, run the test suite (the Triton tests on
# CUDA tensors), then the GPU benchmark sweep. Logs, CSVs and plots go under $OUT.
#
#   bash bench/gpu_run.sh                          # everything; OUT defaults to bench/results/gpu-run
#   OUT=/some/dir bash bench/gpu_run.sh
#   STAGES="info build test" bash bench/gpu_run.sh # a subset, in this order: info build test bench
#   STAGES=bench BENCH_ARGS="--dtypes float32 --time-budget-s 500" BENCH_TAG=fp32 bash bench/gpu_run.sh
#
# Environment: OUT, STAGES, PYTHON (default python), MAX_JOBS (default: CPU count),
# TORCH_CUDA_ARCH_LIST (default 9.0a, H100), BENCH_ARGS (extra bench.py arguments),
# BENCH_TAG (bench-<tag>.csv, for runs split across calls). Every stage runs even if an
# earlier one failed (the log says which); the exit status is 1 if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/results/gpu-run}"
STAGES="${STAGES:-info build test bench}"
PY="${PYTHON:-python}"
mkdir -p "$OUT/logs"
failed=()

stage() {  # stage NAME COMMAND...: runs COMMAND, output to the terminal and $OUT/logs/NAME.log
  local name=$1
  shift
  echo "=== $name: $* ($(date -u +%H:%M:%S))"
  "$@" 2>&1 | tee "$OUT/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "=== $name FAILED (exit $rc)"
    failed+=("$name")
  fi
  return 0
}

want() { [[ " $STAGES " == *" $1 "* ]]; }

info() {
  nvidia-smi || true
  command -v nvcc && nvcc --version || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  nproc
}

build() {
  # --no-build-isolation: an isolated build would fetch a different torch; --no-deps: the
  # machine is offline and torch/numpy are already there.
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e . || return 1
  "$PY" - <<'EOF'
import sys
import xbm_kernels as xk
got = xk.available_backends()
print("backends:", got)
missing = [b for b in ("cuda", "triton") if b not in got]
if missing:
    print("expected the", missing, "backend(s) on a GPU machine", file=sys.stderr)
    sys.exit(1)
EOF
}

tests() {
  if [ -f tests/run.sh ]; then
    PYTHON="$PY" bash tests/run.sh -ra   # the suite, then tests/test_triton.py in its own process (CUDA here)
  else
    "$PY" -m pytest -q -ra tests
  fi
}

bench() {
  # pytorch-metric-learning is an optional provider; the machine may be offline.
  "$PY" -c "import pytorch_metric_learning" 2>/dev/null ||
    "$PY" -m pip install -q --no-deps pytorch-metric-learning 2>/dev/null ||
    echo "pytorch-metric-learning not available: no pml rows"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  "$PY" bench/bench.py --device cuda --out "$OUT" ${BENCH_TAG:+--tag "$BENCH_TAG"} ${BENCH_ARGS:-}
}

want info && stage info info
want build && stage build build
want test && stage test tests
want bench && stage bench${BENCH_TAG:+-$BENCH_TAG} bench

if [ ${#failed[@]} -ne 0 ]; then
  echo "failed stages: ${failed[*]} (logs in $OUT/logs)"
  exit 1
fi
echo "all stages passed; results in $OUT"
