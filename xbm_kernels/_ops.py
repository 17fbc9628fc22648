"""Loads the C++ extension (which registers torch.ops.xbm_kernels.*) and gives every op
a fake implementation so torch.compile and FakeTensor tracing work."""
import torch

from .registry import LOSSES

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
    from . import _C  # noqa: F401  (registers the ops)
    LOAD_ERROR = None
except ImportError as exc:  # a source checkout without a build: only `reference` works
    _pin = built_for_torch()
    if _torch_mismatch(_pin):
        exc = ImportError(f"xbm_kernels._C was built against torch {_pin} but torch {torch.__version__} is "
                          f"installed; rebuild with `pip install --no-build-isolation .` ({exc})")
    LOAD_ERROR = exc

HAS_C = LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when torch.ops.xbm_kernels.<op> has a kernel for `dispatch_key` (CPU/CUDA)."""
    return (HAS_C and hasattr(torch.ops.xbm_kernels, op)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"xbm_kernels::{op}", dispatch_key))


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


if HAS_C:
    torch.library.register_fake("xbm_kernels::enqueue_")(enqueue_fake)
    # An op missing from _C (a stale build of an older checkout) gets no fake rather than
    # failing the import; backends.py then does not list it.
    for _loss in LOSSES.values():
        _fwd, _bwd = _loss.op_names()
        if hasattr(torch.ops.xbm_kernels, _fwd) and hasattr(torch.ops.xbm_kernels, _bwd):
            torch.library.register_fake(f"xbm_kernels::{_fwd}")(fwd_fake)
            torch.library.register_fake(f"xbm_kernels::{_bwd}")(bwd_fake)
