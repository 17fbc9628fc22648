"""The Triton kernels as torch.library custom ops, namespace xbm_kernels_triton, with the
same schemas and semantics as torch.ops.xbm_kernels (both come from registry.py; the C++
ones are written out in csrc/xbm_ops.cpp and tested equal). Each op has a fake so
torch.compile traces through it. custom_op, not triton_op: triton_op's fake-tensor check
fails under the interpreter.

    OPS.enqueue_(memory, memory_labels, embeddings, labels, ptr) -> slots
    OPS.<loss>_fwd(...) -> (loss_rows, grad or (0,), counts)    for every registry loss
    OPS.<loss>_bwd(...) -> (grad_x, grad_ref)                   with "triton" in its kernels

A loss's kernels live in xbm_kernels/triton/<loss>.py as <loss>_fwd_triton and
<loss>_bwd_triton, taking the schema's arguments in order.
"""
import importlib

import torch
from torch import Tensor

from .._ops import bwd_fake, enqueue_fake, fwd_fake
from ..registry import ENQUEUE_SCHEMA, LOSSES
from .enqueue import enqueue_triton

NAMESPACE = "xbm_kernels_triton"


@torch.library.custom_op(f"{NAMESPACE}::enqueue_", mutates_args=("memory", "memory_labels"), schema=ENQUEUE_SCHEMA)
def enqueue_(memory: Tensor, memory_labels: Tensor, embeddings: Tensor, labels: Tensor, ptr: int) -> Tensor:
    return enqueue_triton(memory, memory_labels, embeddings, labels, ptr)


enqueue_.register_fake(enqueue_fake)

for _loss in LOSSES.values():
    if "triton" not in _loss.kernels:
        continue
    _module = importlib.import_module(f"{__package__}.{_loss.name}")
    for _phase, _fake in (("fwd", fwd_fake), ("bwd", bwd_fake)):
        _name = f"{_loss.name}_{_phase}"
        torch.library.custom_op(f"{NAMESPACE}::{_name}", getattr(_module, f"{_name}_triton"), mutates_args=(),
                                schema=_loss.schema(_phase)).register_fake(_fake)


OPS = getattr(torch.ops, NAMESPACE)


def launch_problem(loss: str, D: int, x_dtype: torch.dtype, ref_dtype: torch.dtype):
    """None when the Triton kernels of `loss` launch for rows of D with these dtypes on sm_90;
    otherwise why not (backends.resolve keeps backend="auto" off Triton for such shapes)."""
    from . import _common
    module = importlib.import_module(f"{__package__}.{loss}")
    return _common.launch_problem(module.KERNELS, loss, D, x_dtype, ref_dtype)
