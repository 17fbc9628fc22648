#!/usr/bin/env bash
# Installs xbm-kernels with everything its training app, tests and benchmarks use, on a
# fresh machine (CPU-only or with a GPU). Run again, it only redoes what changed: pip steps
# whose packages are importable are skipped, and the C++ extension is rebuilt only when
# csrc/, setup.py, torch, Python or a build knob changed (a stamp in build/), so a second
# run with nothing changed takes seconds.
#   torch: the pinned CPU build when no torch is installed (a GPU machine keeps its own:
#     install a CUDA torch first, then run this).
#   The package is built with --no-build-isolation: an isolated build would download a
#     different, multi-GB torch.
#   FORCE_REBUILD=1 rebuilds the extension anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$SECONDS
say() { echo "install.sh [$((SECONDS - START))s]: $*"; }

missing_modules() {  # the import names among "$@" that are not importable (import name=pip name)
  "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(a.split("=")[1] for a in sys.argv[1:] if importlib.util.find_spec(a.split("=")[0]) is None))
EOF
}

# 1. torch
if ! "$PY" -c "import torch" 2>/dev/null; then
  say "installing torch==2.13.0 (about 200 MB for the CPU build; 1-3 minutes)"
  "$PY" -m pip install -q torch==2.13.0
fi
say "torch $("$PY" -c "import torch; print(torch.__version__, '(CUDA ' + torch.version.cuda + ')' if torch.version.cuda else '(CPU build)')")"

# 2. the Python dependencies (pytorch-metric-learning: a benchmark baseline only; it needs
# nothing beyond torch, numpy, scikit-learn and tqdm, so it leaves torch as it is)
MODULES=(numpy=numpy ninja=ninja pybind11=pybind11 pytest=pytest hypothesis=hypothesis tqdm=tqdm
         matplotlib=matplotlib sklearn=scikit-learn PIL=pillow fontTools=fonttools
         pytorch_metric_learning=pytorch-metric-learning)
# Triton: a CUDA torch pins its own triton (leave it); with a CPU torch take the newest,
# whose CPU interpreter runs the Triton tests (triton 3.6's needs numpy<2 for them).
if "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)"; then
  MODULES+=(triton=triton)
fi
read -r -a need <<<"$(missing_modules "${MODULES[@]}")"
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]} (under a minute from a local index, a few minutes from PyPI)"
  "$PY" -m pip install -q --upgrade "${need[@]}"
else
  say "the Python dependencies are already installed (${#MODULES[@]} packages)"
fi

# 3. the C++ extension xbm_kernels._C
stamp_file=build/xbm_kernels-build.stamp
stamp=$("$PY" - <<'EOF'
import glob, hashlib, os, sys, torch
h = hashlib.sha256()
for p in sorted(glob.glob("csrc/**/*", recursive=True)) + ["setup.py"]:
    if os.path.isfile(p):
        h.update(p.encode())
        h.update(open(p, "rb").read())
knobs = [os.environ.get(k, "") for k in ("FORCE_CUDA", "FORCE_ONLY_CPU", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME")]
h.update(repr((torch.__version__, torch.version.cuda, sys.version, knobs)).encode())
print(h.hexdigest())
EOF
)
built_here() {  # the installed package is this checkout's, and its extension loads
  "$PY" - <<'EOF' 2>/dev/null
import os, sys
import xbm_kernels, xbm_kernels._ops as ops
here = os.path.realpath("xbm_kernels")
sys.exit(0 if ops.HAS_C and os.path.dirname(os.path.realpath(xbm_kernels.__file__)) == here else 1)
EOF
}
if [ "${FORCE_REBUILD:-0}" != 1 ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && built_here; then
  say "xbm_kernels._C is up to date (csrc/, setup.py and torch unchanged since it was built): not rebuilt"
else
  n_cpp=$(ls csrc/*.cpp csrc/cpu/*.cpp | wc -l)
  if "$PY" -c "import sys, torch; from torch.utils.cpp_extension import CUDA_HOME; sys.exit(0 if torch.version.cuda and CUDA_HOME else 1)" 2>/dev/null \
     && [ "${FORCE_ONLY_CPU:-0}" != 1 ]; then
    what="$n_cpp C++ files and $(ls csrc/cuda/*.cu | wc -l) CUDA files (nvcc found; about 5-15 minutes, MAX_JOBS parallel jobs)"
  else
    what="$n_cpp C++ files, CPU kernels only (about 2-3 minutes on 2 cores, less with more)"
  fi
  say "building xbm_kernels._C: $what"
  "$PY" -m pip install -q --no-build-isolation -e .
  mkdir -p build
  echo "$stamp" > "$stamp_file"
  say "built"
fi

# 4. the training app's data (Debian fonts and Fashion-MNIST; needs root and apt, waits for a busy apt lock)
if [ -f python/install_data.sh ]; then
  say "data: CJK fonts and Fashion-MNIST from Debian packages (a minute when they are missing)"
  bash python/install_data.sh
fi
"$PY" -c "import xbm_kernels as xk; print('xbm_kernels', xk.__version__, 'backends:', xk.available_backends())"
say "done. Check this machine's backends with: $PY -m xbm_kernels.check"
