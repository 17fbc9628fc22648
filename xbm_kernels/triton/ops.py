"""The Triton kernels as torch.library custom ops, namespace xbm_kernels_triton, with the
same schemas and semantics as torch.ops.xbm_kernels (csrc/xbm_ops.cpp). Each op has a
fake so torch.compile traces through it. custom_op, not triton_op: triton_op's fake-tensor
check fails under the interpreter.

    OPS.enqueue_(memory, memory_labels, embeddings, labels, ptr) -> slots
    OPS.contrastive_fwd(...) -> (loss_rows, grad or (0,), counts)
    OPS.contrastive_bwd(...) -> (grad_x, grad_ref)
    OPS.{multi_similarity,triplet,supcon}_{fwd,bwd}: the same conventions, other loss parameters
"""
from typing import Optional, Tuple

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


@torch.library.custom_op(f"{NAMESPACE}::contrastive_fwd", mutates_args=(), schema=_SCHEMAS["contrastive_fwd"])
def contrastive_fwd(x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, self_index: Optional[Tensor],
                    ref_valid: int, margin: float, pos_eps: float, need_grad: bool,
                    allow_tf32: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return contrastive_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, pos_eps, need_grad,
                                  allow_tf32)


@contrastive_fwd.register_fake
def _contrastive_fwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, margin, pos_eps, need_grad, allow_tf32):
    B = x.shape[0]
    grad = x.new_empty((B, x.shape[1]) if need_grad else (0,), dtype=torch.float32)
    return x.new_empty((B,), dtype=torch.float32), grad, x.new_empty((B, 2), dtype=torch.int32)


@torch.library.custom_op(f"{NAMESPACE}::contrastive_bwd", mutates_args=(), schema=_SCHEMAS["contrastive_bwd"])
def contrastive_bwd(x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, self_index: Optional[Tensor],
                    ref_valid: int, margin: float, pos_eps: float, grad_rows: Tensor,
                    allow_tf32: bool) -> Tuple[Tensor, Tensor]:
    return contrastive_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, pos_eps, grad_rows,
                                  allow_tf32)


@contrastive_bwd.register_fake
def _contrastive_bwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, margin, pos_eps, grad_rows, allow_tf32):
    return x.new_empty(x.shape, dtype=torch.float32), ref.new_empty(ref.shape, dtype=torch.float32)



# The other losses share contrastive's conventions; only their parameters differ. Fakes:
def _fwd_outputs(x, need_grad):
    B = x.shape[0]
    grad = x.new_empty((B, x.shape[1]) if need_grad else (0,), dtype=torch.float32)
    return x.new_empty((B,), dtype=torch.float32), grad, x.new_empty((B, 2), dtype=torch.int32)


def _bwd_outputs(x, ref):
    return x.new_empty(x.shape, dtype=torch.float32), ref.new_empty(ref.shape, dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::multi_similarity_fwd", mutates_args=(),
                         schema=_SCHEMAS["multi_similarity_fwd"])
def multi_similarity_fwd(x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, self_index: Optional[Tensor],
                         ref_valid: int, alpha: float, beta: float, base: float, mining_margin: float, pos_eps: float,
                         need_grad: bool, allow_tf32: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return multi_similarity_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, alpha, beta, base,
                                       mining_margin, pos_eps, need_grad, allow_tf32)


@multi_similarity_fwd.register_fake
def _multi_similarity_fwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, alpha, beta, base, mining_margin,
                               pos_eps, need_grad, allow_tf32):
    return _fwd_outputs(x, need_grad)


@torch.library.custom_op(f"{NAMESPACE}::multi_similarity_bwd", mutates_args=(),
                         schema=_SCHEMAS["multi_similarity_bwd"])
def multi_similarity_bwd(x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, self_index: Optional[Tensor],
                         ref_valid: int, alpha: float, beta: float, base: float, mining_margin: float, pos_eps: float,
                         grad_rows: Tensor, allow_tf32: bool) -> Tuple[Tensor, Tensor]:
    return multi_similarity_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, alpha, beta, base,
                                       mining_margin, pos_eps, grad_rows, allow_tf32)


@multi_similarity_bwd.register_fake
def _multi_similarity_bwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, alpha, beta, base, mining_margin,
                               pos_eps, grad_rows, allow_tf32):
    return _bwd_outputs(x, ref)


@torch.library.custom_op(f"{NAMESPACE}::triplet_fwd", mutates_args=(), schema=_SCHEMAS["triplet_fwd"])
def triplet_fwd(x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, self_index: Optional[Tensor],
                ref_valid: int, margin: float, pos_eps: float, need_grad: bool,
                allow_tf32: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return triplet_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, pos_eps, need_grad,
                              allow_tf32)


@triplet_fwd.register_fake
def _triplet_fwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, margin, pos_eps, need_grad, allow_tf32):
    return _fwd_outputs(x, need_grad)


@torch.library.custom_op(f"{NAMESPACE}::triplet_bwd", mutates_args=(), schema=_SCHEMAS["triplet_bwd"])
def triplet_bwd(x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, self_index: Optional[Tensor],
                ref_valid: int, margin: float, pos_eps: float, grad_rows: Tensor,
                allow_tf32: bool) -> Tuple[Tensor, Tensor]:
    return triplet_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, pos_eps, grad_rows,
                              allow_tf32)


@triplet_bwd.register_fake
def _triplet_bwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, margin, pos_eps, grad_rows, allow_tf32):
    return _bwd_outputs(x, ref)


@torch.library.custom_op(f"{NAMESPACE}::supcon_fwd", mutates_args=(), schema=_SCHEMAS["supcon_fwd"])
def supcon_fwd(x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, self_index: Optional[Tensor],
               ref_valid: int, temperature: float, pos_eps: float, need_grad: bool,
               allow_tf32: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return supcon_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, temperature, pos_eps, need_grad,
                             allow_tf32)


@supcon_fwd.register_fake
def _supcon_fwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, temperature, pos_eps, need_grad, allow_tf32):
    return _fwd_outputs(x, need_grad)


@torch.library.custom_op(f"{NAMESPACE}::supcon_bwd", mutates_args=(), schema=_SCHEMAS["supcon_bwd"])
def supcon_bwd(x: Tensor, labels: Tensor, ref: Tensor, ref_labels: Tensor, self_index: Optional[Tensor],
               ref_valid: int, temperature: float, pos_eps: float, grad_rows: Tensor,
               allow_tf32: bool) -> Tuple[Tensor, Tensor]:
    return supcon_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, temperature, pos_eps, grad_rows,
                             allow_tf32)


@supcon_bwd.register_fake
def _supcon_bwd_fake(x, labels, ref, ref_labels, self_index, ref_valid, temperature, pos_eps, grad_rows, allow_tf32):
    return _bwd_outputs(x, ref)


OPS = getattr(torch.ops, NAMESPACE)
