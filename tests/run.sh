#!/usr/bin/env bash
# The whole test suite, in two pytest processes chosen by marker (pyproject.toml says what each
# marker runs): the `triton` tests (the Triton backend) and everything else. Without a GPU the
# Triton kernels run on CPU tensors under TRITON_INTERPRET=1, which must be set before triton
# is imported, hence their own process. Both processes always run; the script exits with the
# worse status. On a GPU the Triton process runs first (it is what a GPU run is for).
#
#   bash tests/run.sh [pytest args]       the suite (not `slow`)
#   bash tests/run.sh --gpu-quick [args]  on a GPU: every op, backend and dtype, quick cases only
#   bash tests/run.sh -m slow             the slow tests, each in its process
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

select="not slow"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu-quick) select="gpu_quick" ;;
    -m) select="$2"; shift ;;  # combined with each process's own marker below
    *) args+=("$1") ;;
  esac
  shift
done
and_select=${select:+ and ($select)}

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  env_triton=()
  order=(triton main)
else
  env_triton=(TRITON_INTERPRET=1)
  order=(main triton)
fi

status=0
for proc in "${order[@]}"; do
  if [ "$proc" = triton ]; then
    echo "== tests/run.sh: the Triton process (-m \"triton$and_select\") =="
    env "${env_triton[@]}" "$PY" -m pytest -q tests -m "triton$and_select" "${args[@]}"
  else
    echo "== tests/run.sh: the main process (-m \"not triton$and_select\") =="
    "$PY" -m pytest -q tests -m "not triton$and_select" "${args[@]}"
  fi
  rc=$?
  [ "$rc" -eq 5 ] && rc=0  # no test selected (e.g. -k matching only the other process)
  [ "$rc" -gt "$status" ] && status=$rc
done
exit "$status"
