"""What every Triton test file starts with: `from triton_env import DEVICE, GPU, INTERPRET,
PYTESTMARK` skips the importing module when the Triton backend cannot run here (triton not
installed; no CUDA device and TRITON_INTERPRET unset, which must be set before triton is
imported; an interpreter that cannot run runtime-bounded loops), and says where the kernels
run: CUDA tensors on a GPU, CPU tensors under the interpreter."""
import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("the triton backend needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)

from xbm_kernels.triton import _common  # noqa: E402

if _common.interpreter_problem():
    pytest.skip(_common.interpreter_problem(), allow_module_level=True)

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
GPU = DEVICE.type == "cuda"
PYTESTMARK = [pytest.mark.triton_interp,
              # Triton 3.6's interpreter with numpy 1.26 warns on every scalar it indexes with
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]
