"""The ops torch.ops.xbm_kernels.*: their schemas, declared once from the loss registry
(registry.py) with a fake implementation beside each (so torch.compile and FakeTensor tracing
work), then the C++ extension, which registers the CPU and CUDA kernels for them
(TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp, csrc/cuda/*.cu)."""
import torch

from .registry import ENQUEUE_SCHEMA, LOSSES

# --------------------------------------------------------------------------- schemas and fakes

def fwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, *params_need_grad_tf32):
    """Fake of every <loss>_fwd (the shared convention of registry.py)."""
    B, need_grad = x.shape[0], params_need_grad_tf32[-2]
    grad = x.new_empty((B, x.shape[1]) if need_grad else (0,), dtype=torch.float32)
    return x.new_empty((B,), dtype=torch.float32), grad, x.new_empty((B, 2), dtype=torch.int32)


def bwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, *params_grad_rows_tf32):
    """Fake of every <loss>_bwd."""
    return x.new_empty(x.shape, dtype=torch.float32), ref.new_empty(ref.shape, dtype=torch.float32)


def enqueue_fake(memory, memory_labels, embeddings, labels, ptr):
    return embeddings.new_empty((embeddings.shape[0],), dtype=torch.int64)


_LIB = torch.library.Library("xbm_kernels", "DEF")  # kept alive: the definitions live as long as it
_LIB.define("enqueue_" + ENQUEUE_SCHEMA)
torch.library.register_fake("xbm_kernels::enqueue_", enqueue_fake, lib=_LIB)
for _loss in LOSSES.values():
    for _phase, _fake in (("fwd", fwd_fake), ("bwd", bwd_fake)):
        _LIB.define(f"{_loss.name}_{_phase}{_loss.schema(_phase)}")
        torch.library.register_fake(f"xbm_kernels::{_loss.name}_{_phase}", _fake, lib=_LIB)


# --------------------------------------------------------------------------- the kernels

def built_for_torch():
    """The torch release this install was built against ('2.13.*'), from the package
    metadata (setup.py pins it), or None for a source checkout without metadata."""
    import importlib.metadata
    try:
        requires = importlib.metadata.requires("xbm-kernels") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    pins = [r.split("==", 1)[1].split(";")[0].strip() for r in requires if r.replace(" ", "").startswith("torch==")]
    return pins[0] if pins else None


def _torch_mismatch(pin):
    if pin is None:
        return None
    have = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    return None if pin.rstrip(".*") == have else have


try:
    from . import _C  # noqa: F401  (registers the kernels)
    LOAD_ERROR = None
except (ImportError, RuntimeError) as exc:  # no build (a source checkout), or a stale one: only `reference`
    _pin = built_for_torch()
    if _torch_mismatch(_pin):
        exc = ImportError(f"xbm_kernels._C was built against torch {_pin} but torch {torch.__version__} is "
                          f"installed; rebuild with `pip install --no-build-isolation .` ({exc})")
    LOAD_ERROR = exc

HAS_C = LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when torch.ops.xbm_kernels.<op> has a kernel for `dispatch_key` (CPU/CUDA): a
    declared op whose kernel a stale build lacks is not listed by backends.py."""
    return HAS_C and torch._C._dispatch_has_kernel_for_dispatch_key(f"xbm_kernels::{op}", dispatch_key)


