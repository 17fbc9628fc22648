#!/usr/bin/env bash
# Installs xbm-kernels with everything its training app, tests and benchmarks use, on a
# fresh machine (CPU-only or with a GPU). Safe to run again.
#   torch: the pinned CPU build when no torch is installed (a GPU machine keeps its own).
#   The package is built with --no-build-isolation: an isolated build would download a
#   different, multi-GB torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q numpy ninja pybind11 pytest hypothesis tqdm matplotlib scikit-learn pillow
# pytorch-metric-learning: only a benchmark baseline (bench/, provider "pml"); it needs
# nothing beyond torch, numpy, scikit-learn and tqdm, so it leaves torch as it is.
"$PY" -m pip install -q pytorch-metric-learning
# Triton: a CUDA torch pins its own triton (leave it); with a CPU torch take the newest,
# whose CPU interpreter runs the Triton tests (triton 3.6's needs numpy<2 for them).
if "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)"; then
  "$PY" -m pip install -q --upgrade triton
fi
"$PY" -m pip install -q --no-build-isolation -e .
if [ -f python/install_data.sh ]; then
  bash python/install_data.sh   # Debian fonts (glyph data set) and Fashion-MNIST; skips without apt
fi
"$PY" -c "import xbm_kernels as xk; print('xbm_kernels', xk.__version__, 'backends:', xk.available_backends())"
