#!/usr/bin/env bash
# The whole test suite. The Triton kernels run in a second pytest process: without a GPU
# they run on CPU tensors under TRITON_INTERPRET=1, which must be set before triton is
# imported, so they cannot share a process with the other tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -m pytest -q tests --ignore=tests/test_triton.py "$@"
if [ -f tests/test_triton.py ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" -m pytest -q tests/test_triton.py "$@"
  else
    TRITON_INTERPRET=1 "$PY" -m pytest -q tests/test_triton.py "$@"
  fi
fi
