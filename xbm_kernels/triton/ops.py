"""The Triton kernels as torch.library custom ops, namespace xbm_kernels_triton, with the
same schemas and semantics as torch.ops.xbm_kernels (csrc/xbm_ops.cpp). Each op has a
fake so torch.compile traces through it. custom_op, not triton_op: triton_op's fake-tensor
check fails under the interpreter.

    OPS.enqueue_(memory, memory_labels, embeddings, labels, ptr) -> slots
    OPS.contrastive_fwd(...) -> (loss_rows, grad or (0,), counts)
    OPS.contrastive_bwd(...) -> (grad_x, grad_ref)
    OPS.{multi_similarity,triplet,supcon}_{fwd,bwd}: the same conventions, other loss parameters
"""
import torch
from torch import Tensor

from .contrastive import contrastive_bwd_triton, contrastive_fwd_triton
from .enqueue import enqueue_triton
from .multi_similarity import multi_similarity_bwd_triton, multi_similarity_fwd_triton
from .supcon import supcon_bwd_triton, supcon_fwd_triton
from .triplet import triplet_bwd_triton, triplet_fwd_triton

NAMESPACE = "xbm_kernels_triton"

# Written out rather than inferred, so they match the C++ schemas exactly (int, not SymInt).
_SCHEMAS = {
    "enqueue_": "(Tensor(a!) memory, Tensor(b!) memory_labels, Tensor embeddings, Tensor labels, int ptr) -> Tensor",
    "contrastive_fwd": "(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
                       "int ref_valid, float margin, float pos_eps, bool need_grad, bool allow_tf32) "
                       "-> (Tensor, Tensor, Tensor)",
    "contrastive_bwd": "(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
                       "int ref_valid, float margin, float pos_eps, Tensor grad_rows, bool allow_tf32) "
                       "-> (Tensor, Tensor)",
    "multi_similarity_fwd": "(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
                            "int ref_valid, float alpha, float beta, float base, float mining_margin, float pos_eps, "
                            "bool need_grad, bool allow_tf32) -> (Tensor, Tensor, Tensor)",
    "multi_similarity_bwd": "(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
                            "int ref_valid, float alpha, float beta, float base, float mining_margin, float pos_eps, "
                            "Tensor grad_rows, bool allow_tf32) -> (Tensor, Tensor)",
    "triplet_fwd": "(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
                   "int ref_valid, float margin, float pos_eps, bool need_grad, bool allow_tf32) "
                   "-> (Tensor, Tensor, Tensor)",
    "triplet_bwd": "(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
                   "int ref_valid, float margin, float pos_eps, Tensor grad_rows, bool allow_tf32) "
                   "-> (Tensor, Tensor)",
    "supcon_fwd": "(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
                  "int ref_valid, float temperature, float pos_eps, bool need_grad, bool allow_tf32) "
                  "-> (Tensor, Tensor, Tensor)",
    "supcon_bwd": "(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
                  "int ref_valid, float temperature, float pos_eps, Tensor grad_rows, bool allow_tf32) "
                  "-> (Tensor, Tensor)",
}


@torch.library.custom_op(f"{NAMESPACE}::enqueue_", mutates_args=("memory", "memory_labels"),
                         schema=_SCHEMAS["enqueue_"])
def enqueue_(memory: Tensor, memory_labels: Tensor, embeddings: Tensor, labels: Tensor, ptr: int) -> Tensor:
    return enqueue_triton(memory, memory_labels, embeddings, labels, ptr)


@enqueue_.register_fake
def _enqueue_fake(memory, memory_labels, embeddings, labels, ptr):
    return embeddings.new_empty((embeddings.shape[0],), dtype=torch.int64)


# The losses share one convention (csrc/xbm_ops.cpp); only their parameters differ, and
# every parameter list ends with (..., need_grad | grad_rows, allow_tf32).
def _fwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, *params):
    B, need_grad = x.shape[0], params[-2]
    grad = x.new_empty((B, x.shape[1]) if need_grad else (0,), dtype=torch.float32)
    return x.new_empty((B,), dtype=torch.float32), grad, x.new_empty((B, 2), dtype=torch.int32)


def _bwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, *params):
    return x.new_empty(x.shape, dtype=torch.float32), ref.new_empty(ref.shape, dtype=torch.float32)


_LOSS_KERNELS = {
    "contrastive": (contrastive_fwd_triton, contrastive_bwd_triton),
    "multi_similarity": (multi_similarity_fwd_triton, multi_similarity_bwd_triton),
    "triplet": (triplet_fwd_triton, triplet_bwd_triton),
    "supcon": (supcon_fwd_triton, supcon_bwd_triton),
}
for _loss, _impls in _LOSS_KERNELS.items():
    for _kind, _impl, _fake in zip(("fwd", "bwd"), _impls, (_fwd_fake, _bwd_fake)):
        _name = f"{_loss}_{_kind}"
        torch.library.custom_op(f"{NAMESPACE}::{_name}", _impl, mutates_args=(),
                                schema=_SCHEMAS[_name]).register_fake(_fake)


OPS = getattr(torch.ops, NAMESPACE)
