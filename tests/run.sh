#!/usr/bin/env bash
# The whole test suite, in two pytest processes chosen by marker (pyproject.toml says what each
# marker runs): the `triton` tests (the Triton backend) and everything else. Without a GPU the
# Triton kernels run on CPU tensors under TRITON_INTERPRET=1, which must be set before triton
# is imported, hence their own process (run beside the main one). Both processes always run;
# the script exits with the worse status. On a GPU the Triton process runs first (it is what a
# GPU run is for), then the main one.
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

run_triton() {
  echo "== tests/run.sh: the Triton process (-m \"triton$and_select\") =="
  env "$@" "$PY" -m pytest -q tests -m "triton$and_select" ${args[@]+"${args[@]}"}
}
run_main() {
  echo "== tests/run.sh: the main process (-m \"not triton$and_select\") =="
  "$PY" -m pytest -q tests -m "not triton$and_select" ${args[@]+"${args[@]}"}
}
worse() {  # exit status 5 (no test selected) counts as success
  local a=$1 b=$2
  [ "$a" -eq 5 ] && a=0
  [ "$b" -eq 5 ] && b=0
  echo $(( a > b ? a : b ))
}

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # a GPU: the Triton process first, then the rest, one after the other
  run_triton; rc_triton=$?
  run_main; rc_main=$?
else
  # no GPU: the interpreter process (single-threaded Python) runs beside the main one; its
  # output is printed when both are done
  log=$(mktemp)
  run_triton TRITON_INTERPRET=1 > "$log" 2>&1 &
  pid=$!
  run_main; rc_main=$?
  wait "$pid"; rc_triton=$?
  cat "$log"
  rm -f "$log"
fi
exit "$(worse "$rc_main" "$rc_triton")"
