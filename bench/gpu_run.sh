#!/usr/bin/env bash
# One GPU session in one call of at most ~8 minutes: build xbm-kernels with CUDA, check every
# backend x loss against the reference, run the GPU test subset, memcheck a small CUDA case,
# then the benchmark. Each stage runs under its own timeout, in priority order, and writes its
# log under $OUT/logs as it goes (what finished comes back even if a later stage is cut short).
# The machine is offline: nothing is installed from the network (pytorch-metric-learning, the
# bench's `pml` provider, comes from wheels carried in .whl/ if any).
#
#   bash bench/gpu_run.sh                            # every stage; OUT defaults to bench/results/gpu-run
#   STAGES="info build check test" bash bench/gpu_run.sh
#   STAGES=bench BENCH_ARGS="--dtypes float32" BENCH_TAG=fp32 T_BENCH=300 bash bench/gpu_run.sh
#
# Environment: OUT, STAGES (subset of: info build check test sanitizer bench, run in that
# order), PYTHON (default python), MAX_JOBS (default: CPU count), TORCH_CUDA_ARCH_LIST (default
# 9.0a: H100/H200), BENCH_ARGS, BENCH_TAG, and the stage timeouts in seconds T_INFO (20),
# T_BUILD (150), T_CHECK (60), T_TEST (180), T_SANITIZER (60), T_BENCH (240 in all, of which
# the sweep gets 30 s less as its own --time-budget-s): about 12 minutes at most, 8 in a
# typical run, leaving room for a rerun within a 15-minute lease. The test stage runs with
# fixed Triton configurations (XBM_KERNELS_AUTOTUNE=0): autotuning on the device costs minutes.
# Every stage runs even if an earlier one failed (the log says which); the exit status is 1 if
# any stage failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench/results/gpu-run}"
STAGES="${STAGES:-info build check test sanitizer bench}"
PY="${PYTHON:-python}"
mkdir -p "$OUT/logs"
failed=()

stage() {  # stage NAME SECONDS FUNCTION: runs FUNCTION under a timeout, output to the terminal and $OUT/logs/NAME.log
  local name=$1 limit=$2 fn=$3
  echo "=== $name (limit ${limit}s, $(date -u +%H:%M:%S))"
  export -f "$fn"
  timeout --kill-after=10 "$limit" bash -c "$fn" 2>&1 | tee "$OUT/logs/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "=== $name TIMED OUT after ${limit}s"
    failed+=("$name(timeout)")
  elif [ "$rc" -ne 0 ]; then
    echo "=== $name FAILED (exit $rc)"
    failed+=("$name")
  fi
  return 0
}

want() { [[ " $STAGES " == *" $1 "* ]]; }
export PY OUT

info() {
  nvidia-smi || true
  command -v nvcc && nvcc --version || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
  "$PY" -c "import triton; print('triton', triton.__version__)" || true
  git rev-parse HEAD 2>/dev/null || true
  nproc
}

build() {
  # --no-build-isolation: an isolated build would fetch a different torch; --no-deps and
  # --no-index: the machine is offline and torch/numpy are already there.
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . || return 1
  if [ -d .whl ] && ! "$PY" -c "import pytorch_metric_learning" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps .whl/*.whl || echo "carried wheels did not install"
  fi
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

check() {
  "$PY" -m xbm_kernels.check
}

tests() {
  # every op, backend and dtype on the quick cases (pyproject.toml's gpu_quick marker)
  XBM_KERNELS_AUTOTUNE=0 PYTHON="$PY" bash tests/run.sh --gpu-quick -ra -x
}

sanitizer() {
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$cs" ]; then
    echo "compute-sanitizer not found"
    return 1
  fi
  XBM_KERNELS_AUTOTUNE=0 "$cs" --tool memcheck --error-exitcode 1 "$PY" - <<'EOF'
import torch
import xbm_kernels as xk
g = torch.Generator(device="cuda").manual_seed(0)
for backend in ("cuda", "triton"):
    for dt in (torch.float32, torch.bfloat16):
        x = torch.nn.functional.normalize(torch.randn(33, 130, device="cuda", generator=g), dim=1).to(dt)
        r = torch.nn.functional.normalize(torch.randn(300, 130, device="cuda", generator=g), dim=1).to(dt)
        y, z = torch.arange(33, device="cuda") % 5, torch.arange(300, device="cuda") % 5
        losses = ["contrastive"] if backend == "cuda" else list(xk.LOSSES)
        for name in losses:
            xx = x.clone().requires_grad_()
            xk.losses.compute(name, xx, y, r, z, ref_valid=200, backend=backend)[0].backward()
mem = xk.CrossBatchMemory(64, 130, dtype=torch.bfloat16, device="cuda", backend="cuda")
mem.enqueue(torch.randn(40, 130, device="cuda"), torch.arange(40, device="cuda"))
mem.enqueue(torch.randn(40, 130, device="cuda"), torch.arange(40, device="cuda"))  # wraps
torch.cuda.synchronize()
print("memcheck case done")
EOF
}

bench() {
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  "$PY" bench/bench.py --device cuda --out "$OUT" --time-budget-s "$(( ${T_BENCH:-240} - 30 ))" \
    ${BENCH_TAG:+--tag "$BENCH_TAG"} ${BENCH_ARGS:-}
}

want info && stage info "${T_INFO:-20}" info
want build && stage build "${T_BUILD:-150}" build
want check && stage check "${T_CHECK:-60}" check
want test && stage test "${T_TEST:-180}" tests
want sanitizer && stage sanitizer "${T_SANITIZER:-60}" sanitizer
want bench && stage "bench${BENCH_TAG:+-$BENCH_TAG}" "${T_BENCH:-240}" bench

if [ ${#failed[@]} -ne 0 ]; then
  echo "failed stages: ${failed[*]} (logs in $OUT/logs)"
  exit 1
fi
echo "all stages passed; results in $OUT"
