"""Fused margin loss over every triplet of the anchor (CONTRACT.md section 1; pytorch-metric-
learning's MarginLoss), Triton.

    l_i = sum_{p in P_i, n in N_i} max(0, d_ip - beta + margin) + max(0, beta - d_in + margin)
        = |N_i| sum_{P_i} max(0, d_ip - pm) + |P_i| sum_{N_i} max(0, nm - d_in),
    pm = beta - margin, nm = beta + margin, d contrastive_l2's distance,

so dl_i/dS_ij = -|N_i|/d on the active positives, +|P_i|/d on the active negatives.

ONE read of the memory per step, positives first (as the CPU kernel and the Triton
multi-similarity): the positives kernel (margin_pos_kernel), per anchor tile and split, scans
the reference *labels* for the columns that share a label with some anchor of the tile
(_common.gather_candidates), reads only those rows (_common.candidate_tile) and gives per
anchor |P_i|, its same-label columns (not self) and, over its active positives, the loss sum
L_P,i, their count and G_P,i = sum -1/d r_p (0 at d = 0), contrastive_l2's fp32 predicates. With
every split's counts added (exact, int), |N_i| = (valid columns but self) - (same-label ones)
depends on the labels only, and ONE pass of contrastive_l2's forward kernel over the memory
takes the negatives with weight |P_i| (WEIGHTED; pos_thr = -inf: no column is a positive
there, so the same-label columns are skipped by label). margin_merge_kernel adds both
workspaces in split order and combines

    l_i = |N_i| L_P,i + L_N,i,   dX_i = |N_i| G_P,i + G_N,i.

A positive's S comes from the positives kernel only and a negative's from the pass only. Rows
read per anchor tile: the memory once plus the candidate rows (few in a memory of many
classes; every row with dense label matches, then two reads).

counts: (|N_i| x active positives, |P_i| x active negatives), saturated at 2^31 - 1.

Backward to the reference: contrastive_l2's reference-side kernel with the per-anchor
weights (|N_i| on the positives, |P_i| on the negatives) from the forward.
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import candidate_program, candidate_tile, dot_acc
from ._common import FWD_CONFIGS as _POS_CONFIGS
from ._common import TWO_ACC_FWD_CONFIGS as _FWD_CONFIGS
from .contrastive_l2 import KERNELS as _L2_KERNELS
from .contrastive_l2 import contrastive_l2_fwd_kernel, contrastive_l2_ref_grad_kernel, scalars

COUNT_LIMIT = 2 ** 31 - 1

# The positives kernel: one accumulator (G_P), the tile's coefficients (in 16-bit limbs with a
# 16-bit reference) and the software pipeline's buffers of its gathers (list -> labels, rows):
# multi-similarity's positives kernel's model.
_POS_PRUNE = _common.prune_configs("BLOCK_B", "BLOCK_K", "B", 512, acc_tiles=1, temps=12)
# margin_pos_kernel tallies a tile's three counts in 10-bit fields of one int32
assert max(c[1] for c in _POS_CONFIGS + [_common.INTERP_FWD]) < 1024


@triton.jit
def _positive_terms(s, pos, pos_margin):
    """(active positives, loss terms, dl/dS) of a tile of positives: contrastive_l2's
    _coefficients on its positives, the same fp32 arithmetic."""
    t = 2.0 - 2.0 * s
    d = tl.sqrt(tl.where(t > 1.52587890625e-05, t, 0.0))  # 2 - 2S <= 2^-16 counts as d = 0 (CONTRACT.md)
    act_p = pos & (d > pos_margin)
    term = tl.where(act_p, d - pos_margin, 0.0)
    inv_d = tl.where(d > 0.0, 1.0 / tl.where(d > 0.0, d, 1.0), 0.0)  # no 1/0 even where masked
    c = 0.0 - tl.where(act_p, inv_d, 0.0)
    return act_p, term, c


@triton.autotune(configs=_common.autotune_configs(_POS_CONFIGS),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "NEED_GRAD", "PRECISION", "X_LIMBS"],
                 prune_configs_by={"early_config_prune": _POS_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def margin_pos_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, idx_ws, pcount_ws, pos_loss_ws, pos_grad_ws, B, D, n,
                      cols_per_split, splits, pos_margin, pos_thr, B_BUCKET, COLS_BUCKET,
                      HAS_SELF_INDEX: tl.constexpr, NEED_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                      X_LIMBS: tl.constexpr, W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_s, rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col, idx_ptr, count = candidate_program(
        x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, idx_ws, B, D, n, cols_per_split, splits, HAS_SELF_INDEX, X_LIMBS,
        LO_SCALE, BLOCK_D, BLOCK_B, BLOCK_K)
    loss = tl.zeros([BLOCK_B], dtype=tl.float32)
    n_pos = tl.zeros([BLOCK_B], dtype=tl.int32)
    n_same = tl.zeros([BLOCK_B], dtype=tl.int32)
    n_act = tl.zeros([BLOCK_B], dtype=tl.int32)
    gp = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, count, BLOCK_K):
        same, r, s = candidate_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, idx_ptr, c0, count, yi, self_col, row_ok,
                                    dims, dim_ok, D, PRECISION, HAS_SELF_INDEX, BLOCK_K, X_LIMBS, LO_SCALE)
        pos = same & (s < pos_thr)
        act_p, term, c = _positive_terms(s, pos, pos_margin)
        loss += tl.sum(term, axis=1)
        # the three counts in one reduction: a tile's counts are < 2^10 (BLOCK_K <= 128)
        tally = tl.sum(same.to(tl.int32) + (pos.to(tl.int32) << 10) + (act_p.to(tl.int32) << 20), axis=1)
        n_same += tally & 1023
        n_pos += (tally >> 10) & 1023
        n_act += tally >> 20
        if NEED_GRAD:
            gp = dot_acc(c, r, gp, W_LIMBS, PRECISION)
    out = pid_s.to(tl.int64) * B + rows64  # pcount_ws is (splits, B, 3): |P_i|, same-label columns, active
    tl.store(pos_loss_ws + out, loss, mask=row_ok)
    tl.store(pcount_ws + 3 * out, n_pos, mask=row_ok)
    tl.store(pcount_ws + 3 * out + 1, n_same, mask=row_ok)
    tl.store(pcount_ws + 3 * out + 2, n_act, mask=row_ok)
    if NEED_GRAD:
        tl.store(pos_grad_ws + out[:, None] * D + dims[None, :], gp, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def margin_merge_kernel(wp_ptr, pos_loss_ws, pos_grad_ws, loss_ws, grad_ws, loss_ptr, grad_ptr, B, D, splits,
                        NEED_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Both workspaces added in split order, then l = |N| L_P + L_N and dX = |N| G_P + G_N
    (wp_ptr: |N_i| as f32)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    gmask = row_ok[:, None] & (dims < D)[None, :]
    loss_p = tl.zeros([ROWS], dtype=tl.float32)
    loss_n = tl.zeros([ROWS], dtype=tl.float32)
    gp = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    gn = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for p in range(0, splits):  # split order, always: the result does not depend on timing
        base = p * B + rows64
        loss_p += tl.load(pos_loss_ws + base, mask=row_ok, other=0.0)
        loss_n += tl.load(loss_ws + base, mask=row_ok, other=0.0)
        if NEED_GRAD:
            off = base[:, None] * D + dims[None, :]
            gp += tl.load(pos_grad_ws + off, mask=gmask, other=0.0)
            gn += tl.load(grad_ws + off, mask=gmask, other=0.0)
    wp = tl.load(wp_ptr + rows64, mask=row_ok, other=0.0)
    tl.store(loss_ptr + rows64, wp * loss_p + loss_n, mask=row_ok)
    if NEED_GRAD:
        tl.store(grad_ptr + rows64[:, None] * D + dims[None, :], wp[:, None] * gp + gn, mask=gmask)


# The autotuned kernels: launch_problem() asks their prunes whether a shape can launch.
KERNELS = (margin_pos_kernel,) + _L2_KERNELS


def _forward(call, margin, beta, pos_eps, need_grad, splits=None):
    """(loss rows, dX or (0,), counts, the per-anchor weights wp = |N_i|, wn = |P_i| as f32)."""
    loss, grad, counts = call.outputs(need_grad)
    B = call.B
    if B == 0:
        return loss, grad, counts, call.f32(0), call.f32(0)
    need_grad = bool(need_grad)
    splits = call.plan(_FWD_CONFIGS, splits)
    n = call.ref_valid
    pos_ws = dict(pcount_ws=call.workspace(B, 3, dtype=torch.int32), pos_loss_ws=call.workspace(B),
                  pos_grad_ws=call.grad_workspace(grad, need_grad))
    idx_ws = _common.candidate_ws(B, splits, call.args["cols_per_split"], call.x.device)
    pm, nm = beta - margin, beta + margin
    call.stream(margin_pos_kernel, idx_ws=idx_ws, NEED_GRAD=need_grad, **pos_ws, **scalars(pm, nm, pos_eps))
    # the counts are exact ints: any order
    pcounts = pos_ws["pcount_ws"].sum(0, dtype=torch.int64)
    n_pos, n_same, act_p = pcounts[:, 0], pcounts[:, 1], pcounts[:, 2]
    n_valid = torch.full((B,), n, dtype=torch.int64, device=call.x.device)
    if call.args["HAS_SELF_INDEX"]:
        si = call.args["si_ptr"]
        n_valid -= ((si >= 0) & (si < n)).long()
    n_neg = n_valid - n_same
    wp, wn = n_neg.float(), n_pos.float()
    # the negatives: contrastive_l2's pass, weighted by |P_i|, with no column a positive (pos_thr = -inf)
    ws = dict(loss_ws=call.workspace(B), counts_ws=call.workspace(B, 2, dtype=torch.int32),
              grad_ws=call.grad_workspace(grad, need_grad))
    call.stream(contrastive_l2_fwd_kernel, loss_ptr=ws["loss_ws"], counts_ptr=ws["counts_ws"], grad_ptr=ws["grad_ws"],
                NEED_GRAD=need_grad, WEIGHTED=True, wp_ptr=wp, wn_ptr=wn, **scalars(pm, nm, float("inf")))
    call.merge(margin_merge_kernel, wp_ptr=wp, loss_ptr=loss, grad_ptr=grad, NEED_GRAD=need_grad, **pos_ws, **ws)
    act_n = ws["counts_ws"][:, :, 1].sum(0, dtype=torch.int64)
    counts.copy_(torch.stack([n_neg * act_p, n_pos * act_n], dim=1).clamp_max(COUNT_LIMIT))
    return loss, grad, counts, wp, wn


def margin_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, beta, pos_eps, need_grad,
                      allow_tf32, splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    call = _common.LossCall(KERNELS, "margin", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    return _forward(call, margin, beta, pos_eps, need_grad, splits)[:3]


def margin_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, beta, pos_eps, grad_rows,
                      allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    call = _common.LossCall(KERNELS, "margin", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    g = call.grad_rows(grad_rows)
    _, grad, _, wp, wn = _forward(call, margin, beta, pos_eps, True)
    return call.ref_grad(contrastive_l2_ref_grad_kernel, grad, g, g_ptr=g, WEIGHTED=True, wp_ptr=wp, wn_ptr=wn,
                         **scalars(beta - margin, beta + margin, pos_eps))
