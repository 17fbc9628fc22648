"""Backend registry: which implementations exist on this machine and which one `auto`
picks for a device. `reference` is plain PyTorch (any device); `cpu` and `cuda` are the
C++ ops (torch.ops.xbm_kernels.*); `triton` is the Triton kernels (CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1)."""
import importlib.util
import os

import torch

from . import _ops
from .registry import BACKEND_NAMES, LOSSES

NAMES = BACKEND_NAMES


def _triton_importable():
    return importlib.util.find_spec("triton") is not None and \
        importlib.util.find_spec("xbm_kernels.triton.ops") is not None


def triton_interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Decided once at import (TRITON_INTERPRET must be set before importing triton anyway),
# so that resolving a backend is plain Python that torch.compile traces without breaks.
_HAS_CPU_KERNELS = _ops.has_kernel("contrastive_fwd", "CPU")
_HAS_CUDA_KERNELS = _ops.has_kernel("contrastive_fwd", "CUDA")
_HAS_TRITON = _triton_importable()
_INTERPRET = triton_interpret()


def _usable(name):
    if name == "reference":
        return True
    if name == "cpu":
        return _HAS_CPU_KERNELS
    if name == "cuda":
        return _HAS_CUDA_KERNELS and torch.cuda.is_available() and _cuda_arch_ok()
    if name == "triton":
        if not _HAS_TRITON:
            return False
        if torch.cuda.is_available():
            return True
        return _INTERPRET and _interpreter_works()
    return False


_CUDA_ARCH_OK = []


def _cuda_arch_ok():
    """The CUDA kernels use sm_80+ tensor-core instructions (asked once, lazily, so that
    importing the package does not initialise CUDA)."""
    if not _CUDA_ARCH_OK:
        _CUDA_ARCH_OK.append(torch.cuda.get_device_capability() >= (8, 0))
    return _CUDA_ARCH_OK[0]


_INTERPRETER_OK = []


def _interpreter_works():
    """Triton 3.6's interpreter cannot run runtime-bounded loops with numpy 2: probe once."""
    if not _INTERPRETER_OK:
        from .triton import _common
        _INTERPRETER_OK.append(_common.interpreter_problem() is None)
    return _INTERPRETER_OK[0]


def _why_unusable(name):
    """Why a backend is not usable here, as a parenthesised clause of an error message."""
    if name in ("cpu", "cuda") and _ops.LOAD_ERROR:
        return f" (extension failed to load: {_ops.LOAD_ERROR})"
    if name == "cuda":
        if not _HAS_CUDA_KERNELS:
            return " (this build has no CUDA kernels: build with a CUDA torch and nvcc, or FORCE_CUDA=1)"
        return " (no CUDA GPU of compute capability 8.0 or newer is visible)"
    if name == "triton":
        if not _HAS_TRITON:
            return " (triton is not installed)"
        if not torch.cuda.is_available() and not _INTERPRET:
            return (" (it runs on CUDA GPUs, and none is visible; TRITON_INTERPRET=1, set before importing "
                    "triton, runs it on CPU tensors through Triton's interpreter, for testing only: slow)")
        from .triton import _common
        return f" (Triton's interpreter cannot run these kernels here: {_common.interpreter_problem()})"
    return ""


def available_backends():
    """Backends usable on this machine, e.g. ["reference", "cpu", "triton", "cuda"]."""
    return [n for n in NAMES if _usable(n)]


def _devices(name):
    if name == "reference":
        return None  # any
    if name == "cpu":
        return ("cpu",)
    if name == "cuda":
        return ("cuda",)
    return ("cuda", "cpu") if _INTERPRET else ("cuda",)


# Which losses each kernel backend implements: declared in the registry, and (for the C++
# backends, whose build may predate a declaration) present in the dispatcher.
_CXX_LOSSES = {
    "cpu": frozenset(l.name for l in LOSSES.values() if "cpu" in l.kernels and _ops.has_kernel(f"{l.name}_fwd", "CPU")),
    "cuda": frozenset(l.name for l in LOSSES.values()
                      if "cuda" in l.kernels and _ops.has_kernel(f"{l.name}_fwd", "CUDA")),
}
_TRITON_LOSSES = frozenset(l.name for l in LOSSES.values() if "triton" in l.kernels)


def supports(backend: str, op: str) -> bool:
    """Whether a kernel backend implements `op` (a loss name, or "enqueue")."""
    if backend == "reference" or op == "enqueue":
        return True
    if backend == "triton":
        return op in _TRITON_LOSSES
    return op in _CXX_LOSSES[backend]


@torch.compiler.assume_constant_result  # plain Python on constants: a constant for tracing
def _triton_launch_problem(op, dim, dtypes):
    """Why the Triton kernels of loss `op` cannot launch for rows of `dim` with (anchor, reference)
    `dtypes` (they hold whole rows in one tile: wide rows exceed sm_90's shared memory), or None."""
    if op == "enqueue" or dim is None or dtypes is None or op not in _TRITON_LOSSES:
        return None
    from .triton import ops as triton_ops
    return triton_ops.launch_problem(op, int(dim), *dtypes)


def resolve(backend, device: torch.device, op: str = "enqueue", dim=None, dtypes=None) -> str:
    """The backend to run `op` (a loss name or "enqueue") for tensors on `device`;
    raises naming `backend` when it is unusable. With the row width `dim` and the (anchor,
    reference) `dtypes`, `auto` passes over Triton for a shape its kernels cannot launch
    (fp32 rows beyond 1024: the next is `cuda` for the contrastive loss, the only backend
    whose kernel launches there, else `reference`), and an explicit "triton" raises."""
    if not isinstance(backend, str) or backend not in NAMES + ("auto",):
        raise ValueError(f"backend: expected 'auto' or one of {list(NAMES)}, got {backend!r}")
    if backend == "auto":
        order = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
        for name in order:
            if _usable(name) and device.type in _devices(name) and supports(name, op):
                if name == "triton" and _triton_launch_problem(op, dim, dtypes):
                    continue
                return name
        return "reference"
    if not _usable(backend):
        why = _why_unusable(backend)
        raise ValueError(f"backend: {backend!r} is not available here{why}; available: {available_backends()}")
    devices = _devices(backend)
    if devices is not None and device.type not in devices:
        raise ValueError(f"backend: {backend!r} runs on {'/'.join(devices)} tensors, got tensors on {device}")
    if not supports(backend, op):
        raise ValueError(f"backend: {backend!r} has no {op} kernel; use 'auto' or 'reference'")
    problem = _triton_launch_problem(op, dim, dtypes) if backend == "triton" else None
    if problem:
        raise ValueError(f"backend: {problem}; use 'auto' or 'reference'")
    return backend


def kernel_ops(backend: str):
    """The op namespace of a kernel backend: torch.ops.xbm_kernels or the Triton ops."""
    if backend == "triton":
        from .triton import ops as triton_ops
        return triton_ops.OPS
    return torch.ops.xbm_kernels
