"""Fused NCA loss over a reference set (CONTRACT.md section 1), Triton kernels: supcon's
(xbm_kernels/triton/supcon.py) with NCA set, t = 2 scale S.

    log r_i = LSE_{V_i \\ P_i} t - LSE_{P_i} t,   l_i = softplus(log r_i)   (0 if P_i is empty)
    dl_i/dx_i = 2 scale sigmoid(log r_i) (sum_{V \\ P} softmax_{V \\ P}(t)_j r_j - sum_P softmax_P(t)_j r_j)

Forward: ONE pass over the reference rows with two online log-sum-exps (the rest of V_i and
P_i) and their weighted rows, splits merged in order; the positives are decided on the
tile's S. Backward to both sides (the in-batch loss): the forward's gradient scaled, and the
reference-side kernel with the coefficients from the forward's per-row shifts and weights.
"""
import torch

from . import _common
from ._common import TWO_ACC_FWD_CONFIGS as _FWD_CONFIGS
from .supcon import KERNELS, supcon_fwd_kernel, supcon_merge_kernel, supcon_ref_grad_kernel


def _forward(call, scale, pos_eps, need_grad, splits):
    """The op's outputs plus per row (shift_R, shift_P, sigmoid(log r) / sum_R, sigmoid(log r) /
    sum_P) as a (4, B) tensor."""
    if not scale > 0:
        raise ValueError(f"scale: expected > 0, got {scale}")
    loss, grad, counts = call.outputs(need_grad)
    stats = call.f32(4, call.B)
    if call.B == 0:
        return loss, grad, counts, stats
    B = call.B
    call.plan(_FWD_CONFIGS, splits)
    need_grad = bool(need_grad)
    call.split_k(supcon_fwd_kernel, supcon_merge_kernel, stats_ws=call.workspace(4, B),
                 counts_ws=call.workspace(B, 2, dtype=torch.int32), g_ws=call.grad_workspace(grad, need_grad),
                 gpos_ws=call.grad_workspace(grad, need_grad), loss_ptr=loss, counts_ptr=counts, grad_ptr=grad,
                 lse_ptr=stats, inv_tau=2.0 * float(scale), pos_thr=1.0 - float(pos_eps), NEED_GRAD=need_grad,
                 NCA=True)
    return loss, grad, counts, stats


def nca_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, scale, pos_eps, need_grad, allow_tf32,
                   splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    call = _common.LossCall(KERNELS, "nca", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    return _forward(call, scale, pos_eps, need_grad, splits)[:3]


def nca_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, scale, pos_eps, grad_rows, allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    call = _common.LossCall(KERNELS, "nca", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    g = call.grad_rows(grad_rows)
    _, grad, counts, stats = _forward(call, scale, pos_eps, True, None)
    ga = torch.where(counts[:, 0] > 0, g * (2.0 * float(scale)), 0.0)
    return call.ref_grad(supcon_ref_grad_kernel, grad, g, lse_ptr=stats, ga_ptr=ga, gp_ptr=ga,
                         inv_tau=2.0 * float(scale), pos_thr=1.0 - float(pos_eps), NCA=True)
