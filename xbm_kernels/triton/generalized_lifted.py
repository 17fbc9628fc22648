"""Fused generalized lifted structure loss (as pytorch-metric-learning's
GeneralizedLiftedStructureLoss, on the L2 distance of unit rows) over a reference set
(CONTRACT.md section 1), Triton kernels: circle.py's two online log-sum-exps with LIFTED,

    d_ij = sqrt(2 - 2 S_ij) (0 within contrastive_l2's floor)
    L_i = LSE_{P_i}(d - pos_margin) + LSE_{N_i}(neg_margin - d) (an empty set's term 0),  l_i = max(0, L_i)
"""
from . import _common, circle

KERNELS = circle.KERNELS


def generalized_lifted_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, pos_margin, neg_margin, pos_eps,
                                  need_grad, allow_tf32, splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    call = _common.LossCall(KERNELS, "generalized_lifted", x, labels, ref, ref_labels, self_index, ref_valid,
                            allow_tf32)
    values = circle.scalars(pos_eps, pos_margin=pos_margin, neg_margin=neg_margin)
    return circle.forward(call, values, True, need_grad, splits)[:3]


def generalized_lifted_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, pos_margin, neg_margin, pos_eps,
                                  grad_rows, allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    call = _common.LossCall(KERNELS, "generalized_lifted", x, labels, ref, ref_labels, self_index, ref_valid,
                            allow_tf32)
    values = circle.scalars(pos_eps, pos_margin=pos_margin, neg_margin=neg_margin)
    return circle.backward(call, values, True, grad_rows)
