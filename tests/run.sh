#!/usr/bin/env bash
# The whole test suite. The Triton kernels run in a second pytest process: without a GPU
# they run on CPU tensors under TRITON_INTERPRET=1, which must be set before triton is
# imported, so they cannot share a process with the other tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

triton_tests=(tests/test_triton*.py)
ignore=()
for f in "${triton_tests[@]}"; do ignore+=(--ignore="$f"); done

"$PY" -m pytest -q tests "${ignore[@]}" "$@"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" -m pytest -q "${triton_tests[@]}" "$@"
else
  TRITON_INTERPRET=1 "$PY" -m pytest -q "${triton_tests[@]}" "$@"
fi
