"""Fused contrastive loss on the L2 distance of unit rows over a reference set (CONTRACT.md
section 1), Triton kernels.

    S_ij = <x_i, r_j>,  d_ij = sqrt(max(2 - 2 S_ij, 0))
    P_i, N_i as always (valid, not self; same label and S < 1 - pos_eps / other label)
    ap_ij = j in P_i and d_ij > pos_margin,  an_ij = j in N_i and d_ij < neg_margin
    l_i = sum_j ap_ij (d_ij - pos_margin) + an_ij (neg_margin - d_ij)
    c_ij = dl_i/dS_ij = (an_ij - ap_ij) / d_ij  (0 where d_ij == 0, as torch.cdist's backward)
    dl_i/dx_i = sum_j c_ij r_j

The coefficient depends on its own pair only, so the structure is contrastive.py's: one
pass over the reference rows, per tile S = X R^T, the masks, loss and active-pair counts,
then dX += C R with the tile of R already loaded. Grid (B tiles) x (K splits); each split
writes partial loss / counts / dX to a workspace and _common.sum_merge_kernel adds
them in split order (deterministic, no atomics); one split writes the outputs directly.
A switched-off term (neg_margin <= 0, or pos_eps >= 2 so that no column is a positive)
simply has no active pairs.

WEIGHTED (the margin loss, triton/margin.py): each anchor's positive terms and coefficients are
scaled by wp_i, its negative ones by wn_i (per-anchor weights read once per anchor tile); the
counts stay the unweighted active pairs.

Backward to both sides, with g_i = dL/dl_i:
    grad_x   = g * (C R)     the forward kernel's dX, each row scaled by g_i
    grad_ref = (g C)^T X     each program owns a tile of reference rows and streams the anchors.
Rows of grad_ref at and beyond ref_valid are zero.

dtypes as in contrastive.py; 1/d is not exact in 16 bits, so with a 16-bit reference the
coefficients enter the tensor cores in 16-bit limbs (_common.dot_acc).
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import anchor_program, anchor_tile, dot_acc, memory_tile, pair_sets, ref_grad_acc, reference_block, scores
from ._common import TWO_ACC_FWD_CONFIGS as _FWD_CONFIGS

# Register tiles: dX plus the tile's coefficients (in 16-bit limbs with a 16-bit reference),
# so the two-accumulator kernels' table: contrastive's 64 x 128 and 128 x 64 tiles spill 200 to
# 400 bytes here (ptxas for sm_90 at D = 128, bf16 and anchors in limbs; 32-row tiles none).
# IEEE fp32 tiles up to 32 x 64 do not spill (the same measure).
_FWD_PRUNE = _common.prune_configs("BLOCK_B", "BLOCK_K", "B", 2048, acc_tiles=1, temps=6)
_REF_PRUNE = _common.prune_configs("BLOCK_K", "BLOCK_B", "n", 256, acc_tiles=1, temps=6,
                                    fp32_product_when_limbed=True)


@triton.jit
def _row_weights(wp_ptr, wn_ptr, rows, row_ok, WEIGHTED: tl.constexpr):
    """The anchors' (positive, negative) weights with WEIGHTED; otherwise placeholders, unused."""
    if WEIGHTED:
        wp = tl.load(wp_ptr + rows, mask=row_ok, other=0.0)
        wn = tl.load(wn_ptr + rows, mask=row_ok, other=0.0)
    else:
        wp = row_ok
        wn = row_ok
    return wp, wn


@triton.jit
def _coefficients(s, yi, zj, cols, row_ok, col_ok, self_col, pos_margin, neg_margin, pos_thr, wp, wn,
                  HAS_SELF_INDEX: tl.constexpr, WEIGHTED: tl.constexpr):
    """(active positives, active negatives, loss terms, dl/dS) of a tile of S; with WEIGHTED the
    terms and dl/dS of row i scaled by wp_i on positives and wn_i on negatives."""
    _, pos, neg = pair_sets(s, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
    t = 2.0 - 2.0 * s
    d = tl.sqrt(tl.where(t > 1.52587890625e-05, t, 0.0))  # 2 - 2S <= 2^-16 counts as d = 0 (CONTRACT.md)
    act_p = pos & (d > pos_margin)
    act_n = neg & (d < neg_margin)
    term = tl.where(act_p, d - pos_margin, tl.where(act_n, neg_margin - d, 0.0))
    inv_d = tl.where(d > 0.0, 1.0 / tl.where(d > 0.0, d, 1.0), 0.0)  # no 1/0 even where masked
    c = tl.where(act_n, inv_d, 0.0) - tl.where(act_p, inv_d, 0.0)
    if WEIGHTED:  # term and c are 0 off the active pairs, and act_p, act_n are disjoint
        w = tl.where(act_p, wp[:, None], wn[:, None])
        term = term * w
        c = c * w
    return act_p, act_n, term, c


@triton.autotune(configs=_common.autotune_configs(_FWD_CONFIGS),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "NEED_GRAD", "WEIGHTED", "PRECISION", "X_LIMBS"],
                 prune_configs_by={"early_config_prune": _FWD_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def contrastive_l2_fwd_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, wp_ptr, wn_ptr, loss_ptr, counts_ptr, grad_ptr,
                              B, D, n, cols_per_split, pos_margin, neg_margin, pos_thr, B_BUCKET, COLS_BUCKET,
                              HAS_SELF_INDEX: tl.constexpr, NEED_GRAD: tl.constexpr, WEIGHTED: tl.constexpr,
                              PRECISION: tl.constexpr, X_LIMBS: tl.constexpr, W_LIMBS: tl.constexpr,
                              LO_SCALE: tl.constexpr,
                              BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col = anchor_program(
        x_ptr, y_ptr, r_ptr, si_ptr, B, D, HAS_SELF_INDEX, X_LIMBS, LO_SCALE, BLOCK_D, BLOCK_B)
    wp, wn = _row_weights(wp_ptr, wn_ptr, rows, row_ok, WEIGHTED)

    loss = tl.zeros([BLOCK_B], dtype=tl.float32)
    npos = tl.zeros([BLOCK_B], dtype=tl.int32)
    nneg = tl.zeros([BLOCK_B], dtype=tl.int32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)

    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols, col_ok, r, zj, s = memory_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, k0, col_end, dims, dim_ok, D,
                                             PRECISION, BLOCK_K, X_LIMBS, LO_SCALE)
        act_p, act_n, term, c = _coefficients(s, yi, zj, cols, row_ok, col_ok, self_col, pos_margin, neg_margin,
                                              pos_thr, wp, wn, HAS_SELF_INDEX, WEIGHTED)
        loss += tl.sum(term, axis=1)
        npos += tl.sum(act_p.to(tl.int32), axis=1)
        nneg += tl.sum(act_n.to(tl.int32), axis=1)
        if NEED_GRAD:
            acc = dot_acc(c, r, acc, W_LIMBS, PRECISION)

    out = pid_s.to(tl.int64) * B + rows64  # row of this split's slice of the workspace
    tl.store(loss_ptr + out, loss, mask=row_ok)
    tl.store(counts_ptr + 2 * out, npos, mask=row_ok)
    tl.store(counts_ptr + 2 * out + 1, nneg, mask=row_ok)
    if NEED_GRAD:
        tl.store(grad_ptr + out[:, None] * D + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])


@triton.autotune(configs=_common.autotune_configs(_common.REF_CONFIGS, "BLOCK_K", "BLOCK_B"),
                 key=["D", "B_BUCKET", "N_BUCKET", "WEIGHTED", "PRECISION", "X_LIMBS"],
                 prune_configs_by={"early_config_prune": _REF_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def contrastive_l2_ref_grad_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, wp_ptr, wn_ptr, g_ptr, gref_ptr,
                                   B, D, n, pos_margin, neg_margin, pos_thr, B_BUCKET, N_BUCKET,
                                   HAS_SELF_INDEX: tl.constexpr, WEIGHTED: tl.constexpr, PRECISION: tl.constexpr,
                                   X_LIMBS: tl.constexpr, W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr,
                                   BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    cols, col_ok, dims, dim_ok, col_off, r, zj = reference_block(r_ptr, z_ptr, n, D, BLOCK_D, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        x, x_hi, x_mid, x_lo, yi, self_col = anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D,
                                                         r_ptr.dtype.element_ty, HAS_SELF_INDEX, X_LIMBS, LO_SCALE)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        wp, wn = _row_weights(wp_ptr, wn_ptr, rows, row_ok, WEIGHTED)
        s = scores(x_hi, x_mid, x_lo, r, PRECISION, X_LIMBS, LO_SCALE)
        _, _, _, c = _coefficients(s, yi, zj, cols, row_ok, col_ok, self_col, pos_margin, neg_margin, pos_thr,
                                   wp, wn, HAS_SELF_INDEX, WEIGHTED)
        acc = ref_grad_acc(tl.trans(c * g[:, None]), x, x_hi, acc, X_LIMBS, W_LIMBS, PRECISION)
    tl.store(gref_ptr + col_off, acc, mask=col_ok[:, None] & dim_ok[None, :])


# The autotuned kernels: launch_problem() asks their prunes whether a shape can launch.
KERNELS = (contrastive_l2_fwd_kernel, contrastive_l2_ref_grad_kernel)


def split_plan(B: int, n: int, device: torch.device, splits=None):
    """(splits, cols_per_split) of the forward grid; see _common.split_plan."""
    return _common.split_plan(B, n, device, _FWD_CONFIGS, splits)


def scalars(pos_margin, neg_margin, pos_eps):
    """The kernels' own scalars: the margins and pos_thr = 1 - pos_eps."""
    # pos_thr > 1 for a negative pos_eps (every same-label column a positive), < -1 for
    # pos_eps > 2 (none); neg_margin <= 0: no negative is ever active.
    return dict(pos_margin=float(pos_margin), neg_margin=float(neg_margin), pos_thr=1.0 - float(pos_eps))


def unweighted(call):
    """WEIGHTED off, with placeholders for the weight pointers (never read)."""
    return dict(wp_ptr=call.args["x_ptr"], wn_ptr=call.args["x_ptr"], WEIGHTED=False)


def contrastive_l2_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, pos_margin, neg_margin, pos_eps,
                              need_grad, allow_tf32, splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    call = _common.LossCall(KERNELS, "contrastive_l2", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    return call.sum_forward(contrastive_l2_fwd_kernel, _FWD_CONFIGS, need_grad, splits,
                            **unweighted(call), **scalars(pos_margin, neg_margin, pos_eps))


def contrastive_l2_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, pos_margin, neg_margin, pos_eps,
                              grad_rows, allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    call = _common.LossCall(KERNELS, "contrastive_l2", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    g = call.grad_rows(grad_rows)
    named = dict(unweighted(call), **scalars(pos_margin, neg_margin, pos_eps))
    _, grad, _ = call.sum_forward(contrastive_l2_fwd_kernel, _FWD_CONFIGS, True, **named)
    return call.ref_grad(contrastive_l2_ref_grad_kernel, grad, g, g_ptr=g, **named)
