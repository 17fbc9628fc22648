"""Fused margin loss over every triplet of the anchor (CONTRACT.md section 1; pytorch-metric-
learning's MarginLoss), Triton: contrastive_l2's kernels with per-anchor weights.

    l_i = sum_{p in P_i, n in N_i} max(0, d_ip - beta + margin) + max(0, beta - d_in + margin)
        = |N_i| sum_{P_i} max(0, d_ip - pm) + |P_i| sum_{N_i} max(0, nm - d_in),
    pm = beta - margin, nm = beta + margin, d contrastive_l2's distance,

so the loss is contrastive_l2's with the positive terms of row i weighted by |N_i| and the
negative ones by |P_i| (its kernels' WEIGHTED mode): dl_i/dS_ij = -|N_i|/d on the active
positives, +|P_i|/d on the active negatives, and the pass, its merge and the reference-side
gradient are contrastive_l2's. The weights come first, from a pass of the same forward kernel
without gradient in which every positive and every negative is active (pos_margin -1,
neg_margin 3): its counts are (|P_i|, |N_i|). That pass computes S only (no dX), so the loss
reads the memory twice, about 1.5 times one contrastive_l2 pass. With pos_eps < 0 (the PML
drop-in: every same-label column a positive) the sets depend on the labels alone.

counts: (|N_i| x active positives, |P_i| x active negatives), saturated at 2^31 - 1.
"""
import torch

from . import _common
from .contrastive_l2 import KERNELS, contrastive_l2_fwd_kernel, contrastive_l2_ref_grad_kernel, scalars, unweighted

COUNT_LIMIT = 2 ** 31 - 1


def _weighted_forward(call, margin, beta, pos_eps, need_grad, splits=None):
    """(loss rows, dX or (0,), counts, the weighted pass's kernel arguments)."""
    table = _common.TWO_ACC_FWD_CONFIGS
    _, _, sizes = call.sum_forward(contrastive_l2_fwd_kernel, table, False, splits, **unweighted(call),
                                   **scalars(-1.0, 3.0, pos_eps))
    n_pos, n_neg = sizes[:, 0].long(), sizes[:, 1].long()
    named = dict(scalars(beta - margin, beta + margin, pos_eps), WEIGHTED=True,
                 wp_ptr=n_neg.float().contiguous(), wn_ptr=n_pos.float().contiguous())
    loss, grad, active = call.sum_forward(contrastive_l2_fwd_kernel, table, need_grad, splits, **named)
    counts = torch.stack([n_neg * active[:, 0], n_pos * active[:, 1]], dim=1).clamp_max(COUNT_LIMIT)
    return loss, grad, counts.to(torch.int32), named


def margin_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, beta, pos_eps, need_grad,
                      allow_tf32, splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    call = _common.LossCall(KERNELS, "margin", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    loss, grad, counts, _ = _weighted_forward(call, margin, beta, pos_eps, need_grad, splits)
    return loss, grad, counts


def margin_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, beta, pos_eps, grad_rows,
                      allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    call = _common.LossCall(KERNELS, "margin", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    g = call.grad_rows(grad_rows)
    _, grad, _, named = _weighted_forward(call, margin, beta, pos_eps, True)
    return call.ref_grad(contrastive_l2_ref_grad_kernel, grad, g, g_ptr=g, **named)
