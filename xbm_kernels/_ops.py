"""Loads the C++ extension (which registers torch.ops.xbm_kernels.*) and gives every op
a fake implementation so torch.compile and FakeTensor tracing work."""
import torch

try:
    from . import _C  # noqa: F401  (registers the ops)
    LOAD_ERROR = None
except ImportError as exc:  # a source checkout without a build: only `reference` works
    LOAD_ERROR = exc

HAS_C = LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when torch.ops.xbm_kernels.<op> has a kernel for `dispatch_key` (CPU/CUDA)."""
    return (HAS_C and hasattr(torch.ops.xbm_kernels, op)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"xbm_kernels::{op}", dispatch_key))


def _grad_like(x, need_grad):
    return x.new_empty((x.shape[0], x.shape[1]) if need_grad else (0,), dtype=torch.float32)


if HAS_C:

    @torch.library.register_fake("xbm_kernels::enqueue_")
    def _enqueue_fake(memory, memory_labels, embeddings, labels, ptr):
        return embeddings.new_empty((embeddings.shape[0],), dtype=torch.int64)

    def _fwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, *params_need_grad_tf32):
        need_grad = params_need_grad_tf32[-2]
        B = x.shape[0]
        return (x.new_empty((B,), dtype=torch.float32), _grad_like(x, need_grad),
                x.new_empty((B, 2), dtype=torch.int32))

    def _bwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, *params_grad_rows_tf32):
        return (x.new_empty(x.shape, dtype=torch.float32), ref.new_empty(ref.shape, dtype=torch.float32))

    # Every loss shares the fwd/bwd conventions of csrc/xbm_ops.cpp.
    # An op missing from _C (a stale build of an older checkout) gets no fake rather than
    # failing the import; backends.py then does not list it.
    for _loss in ("contrastive", "multi_similarity", "triplet", "supcon"):
        if hasattr(torch.ops.xbm_kernels, f"{_loss}_fwd"):
            torch.library.register_fake(f"xbm_kernels::{_loss}_fwd")(_fwd_fake)
            torch.library.register_fake(f"xbm_kernels::{_loss}_bwd")(_bwd_fake)
