"""Fused tuplet margin loss (as pytorch-metric-learning's TupletMarginLoss) over a reference set
(CONTRACT.md section 1), Triton kernels: the NT-Xent form with the positive's logit
transformed, so ntxent.py's kernels with ANGULAR (its docstring has the passes):

    LZ_i = log sum_{N_i} exp(scale S_in),   l_i = sum_{P_i} softplus(LZ_i - scale cos(acos(S_ip) - m))

m = margin in radians (the op takes degrees, as PML's constructor). One read of the memory for
the negatives' log-sum-exp, then the positives from the same-label rows only.
"""
import math

from . import _common
from .ntxent import KERNELS, backward, forward, positive_logit


def _logit(margin, scale):
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite value > 0, got {scale}")
    if not math.isfinite(margin):
        raise ValueError(f"margin: expected a finite number of degrees, got {margin}")
    return positive_logit(float(scale), math.radians(float(margin)))


def tuplet_margin_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, scale, pos_eps, need_grad,
                             allow_tf32, splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    logit = _logit(margin, scale)
    call = _common.LossCall(KERNELS, "tuplet_margin", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    return forward(call, logit, pos_eps, need_grad, splits)[:3]


def tuplet_margin_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, scale, pos_eps, grad_rows,
                             allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    logit = _logit(margin, scale)
    call = _common.LossCall(KERNELS, "tuplet_margin", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    return backward(call, logit, pos_eps, grad_rows)
