"""Fused batch-hard triplet loss over a reference set (CONTRACT.md section 1), Triton kernels.

    ap_i = argmin_{P_i} S_ij,  an_i = argmax_{N_i} S_ij     (lowest column on ties)
    l_i = max(0, S_i,an - S_i,ap + margin),  0 if P_i or N_i is empty
    dl_i/dx_i = r_an - r_ap for active rows (l_i > 0)

One pass streams the reference for the hardest positive and negative per row, value and
column. Ties keep the lowest column everywhere: within a tile by taking the smallest
column among those equal to the tile's extreme, across tiles of a split (increasing
columns) and across splits (merged in split order) by replacing only on a strictly better
value. A merge kernel combines the splits, applies the hinge and gathers the two rows of
the gradient.

Backward to both sides, with g_i = dL/dl_i: grad_x = g * (r_an - r_ap); grad_ref gets
+g_i x_i at row an_i and -g_i x_i at row ap_i. No float atomics: each program owns a tile
of reference rows, scans the anchors' chosen columns and adds the matching anchors (in
anchor order) with a one-hot product; tiles no anchor chose only write zeros.
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import FWD_CONFIGS as _FWD_CONFIGS
from ._common import anchor_program, memory_tile, pair_sets

_PRUNE = _common.prune_configs("BLOCK_B", "BLOCK_K", "B", 2048, acc_tiles=0, temps=4)
# Reference-side scatter: 64 rows x 64 anchors x 64-column chunks of D, 4 warps: no spills
# for sm_90 (128-column chunks of the fp32 product spill).
_REF_BLOCK_K, _REF_BLOCK_B, _REF_CHUNK_D = 64, 64, 64


@triton.autotune(configs=_common.autotune_configs(_FWD_CONFIGS),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "PRECISION", "X_LIMBS"],
                 prune_configs_by={"early_config_prune": _PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def triplet_hardest_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, val_ws, idx_ws, B, D, n, cols_per_split, pos_thr,
                           B_BUCKET, COLS_BUCKET, HAS_SELF_INDEX: tl.constexpr, PRECISION: tl.constexpr,
                           X_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_s = tl.program_id(1)
    rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col = anchor_program(
        x_ptr, y_ptr, r_ptr, si_ptr, B, D, HAS_SELF_INDEX, X_LIMBS, LO_SCALE, BLOCK_D, BLOCK_B)

    pos_val = tl.full([BLOCK_B], float("inf"), tl.float32)
    neg_val = tl.full([BLOCK_B], float("-inf"), tl.float32)
    pos_idx = tl.full([BLOCK_B], -1, tl.int32)
    neg_idx = tl.full([BLOCK_B], -1, tl.int32)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols, col_ok, r, zj, sim = memory_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, k0, col_end, dims, dim_ok, D,
                                               PRECISION, BLOCK_K, X_LIMBS, LO_SCALE)
        _, pos, neg = pair_sets(sim, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        sp = tl.where(pos, sim, float("inf"))
        tile_pos = tl.min(sp, axis=1)
        tile_pos_idx = tl.min(tl.where(pos & (sp == tile_pos[:, None]), cols[None, :], 2147483647), axis=1)
        better = tile_pos < pos_val  # strict: the earlier (lower) column wins ties
        pos_val = tl.where(better, tile_pos, pos_val)
        pos_idx = tl.where(better, tile_pos_idx, pos_idx)
        sn = tl.where(neg, sim, float("-inf"))
        tile_neg = tl.max(sn, axis=1)
        tile_neg_idx = tl.min(tl.where(neg & (sn == tile_neg[:, None]), cols[None, :], 2147483647), axis=1)
        better = tile_neg > neg_val
        neg_val = tl.where(better, tile_neg, neg_val)
        neg_idx = tl.where(better, tile_neg_idx, neg_idx)
    out = pid_s.to(tl.int64) * 2 * B + rows64  # val_ws, idx_ws are (splits, 2, B): positive, negative
    tl.store(val_ws + out, pos_val, mask=row_ok)
    tl.store(val_ws + out + B, neg_val, mask=row_ok)
    tl.store(idx_ws + out, pos_idx, mask=row_ok)
    tl.store(idx_ws + out + B, neg_idx, mask=row_ok)


@triton.jit
def triplet_merge_kernel(val_ws, idx_ws, r_ptr, loss_ptr, counts_ptr, grad_ptr, chosen_ptr, B, D, splits, margin,
                         NEED_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    pos_val = tl.full([ROWS], float("inf"), tl.float32)
    neg_val = tl.full([ROWS], float("-inf"), tl.float32)
    pos_idx = tl.full([ROWS], -1, tl.int32)
    neg_idx = tl.full([ROWS], -1, tl.int32)
    for p in range(0, splits):  # split order: splits hold increasing columns, strict keeps the lowest
        out = p * 2 * B + rows64
        v = tl.load(val_ws + out, mask=row_ok, other=float("inf"))
        better = v < pos_val
        pos_val = tl.where(better, v, pos_val)
        pos_idx = tl.where(better, tl.load(idx_ws + out, mask=row_ok, other=-1), pos_idx)
        v = tl.load(val_ws + out + B, mask=row_ok, other=float("-inf"))
        better = v > neg_val
        neg_val = tl.where(better, v, neg_val)
        neg_idx = tl.where(better, tl.load(idx_ws + out + B, mask=row_ok, other=-1), neg_idx)
    has = (pos_idx >= 0) & (neg_idx >= 0)
    hinge = tl.maximum(tl.where(has, neg_val - pos_val, 0.0) + margin, 0.0)
    active = has & (hinge > 0)
    tl.store(loss_ptr + rows64, tl.where(has, hinge, 0.0), mask=row_ok)
    tl.store(counts_ptr + 2 * rows64, active.to(tl.int32), mask=row_ok)
    tl.store(counts_ptr + 2 * rows64 + 1, active.to(tl.int32), mask=row_ok)
    # The chosen columns of active rows (-1 otherwise), for the reference-side gradient.
    tl.store(chosen_ptr + 2 * rows64, tl.where(active, pos_idx, -1), mask=row_ok)
    tl.store(chosen_ptr + 2 * rows64 + 1, tl.where(active, neg_idx, -1), mask=row_ok)
    if NEED_GRAD:
        dims = tl.arange(0, BLOCK_D)
        gmask = active[:, None] & (dims < D)[None, :]
        r_an = tl.load(r_ptr + neg_idx.to(tl.int64)[:, None] * D + dims[None, :], mask=gmask, other=0.0)
        r_ap = tl.load(r_ptr + pos_idx.to(tl.int64)[:, None] * D + dims[None, :], mask=gmask, other=0.0)
        tl.store(grad_ptr + rows64[:, None] * D + dims[None, :], r_an.to(tl.float32) - r_ap.to(tl.float32),
                 mask=row_ok[:, None] & (dims < D)[None, :])


@triton.jit
def triplet_ref_grad_kernel(x_ptr, chosen_ptr, g_ptr, gref_ptr, B, D, N,
                            BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DC: tl.constexpr):
    # Grid: (reference-row tiles, column chunks of D); the scan of the anchors repeats per chunk.
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < N
    dims = tl.program_id(1) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    dim_ok = dims < D
    acc = tl.zeros([BLOCK_K, BLOCK_DC], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        rows64 = rows.to(tl.int64)
        ap = tl.load(chosen_ptr + 2 * rows64, mask=row_ok, other=-1)
        an = tl.load(chosen_ptr + 2 * rows64 + 1, mask=row_ok, other=-1)
        hit_p = cols[:, None] == ap[None, :]  # (BLOCK_K, BLOCK_B); -1 matches no column
        hit_n = cols[:, None] == an[None, :]
        if tl.max(tl.max((hit_p | hit_n).to(tl.int32), axis=1), axis=0) > 0:
            g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
            coef = tl.where(hit_n, g[None, :], 0.0) - tl.where(hit_p, g[None, :], 0.0)
            x = tl.load(x_ptr + rows64[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                        other=0.0).to(tl.float32)
            acc = tl.dot(coef, x, acc, input_precision="ieee")  # a sum of a few g_i x_i: exact fp32 products
    tl.store(gref_ptr + cols.to(tl.int64)[:, None] * D + dims[None, :], acc, mask=col_ok[:, None] & dim_ok[None, :])


# The autotuned kernels: launch_problem() asks their prunes whether a shape can launch.
KERNELS = (triplet_hardest_kernel,)


def _forward(call, margin, pos_eps, need_grad, splits):
    """The op's outputs plus the chosen columns (B, 2) int32 (ap, an; -1 for inactive rows)."""
    loss, grad, counts = call.outputs(need_grad)
    chosen = torch.empty(call.B, 2, dtype=torch.int32, device=call.x.device)
    if call.B == 0:
        return loss, grad, counts, chosen
    call.plan(_FWD_CONFIGS, splits)
    call.split_k(triplet_hardest_kernel, triplet_merge_kernel, val_ws=call.workspace(2, call.B),
                 idx_ws=call.workspace(2, call.B, dtype=torch.int32), loss_ptr=loss, counts_ptr=counts, grad_ptr=grad,
                 chosen_ptr=chosen, margin=float(margin), pos_thr=1.0 - float(pos_eps), NEED_GRAD=bool(need_grad))
    return loss, grad, counts, chosen


def triplet_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, pos_eps, need_grad, allow_tf32,
                       splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    call = _common.LossCall(KERNELS, "triplet", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    return _forward(call, margin, pos_eps, need_grad, splits)[:3]


def triplet_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, pos_eps, grad_rows, allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    call = _common.LossCall(KERNELS, "triplet", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    g = call.grad_rows(grad_rows)
    _, grad, _, chosen = _forward(call, margin, pos_eps, True, None)
    # Not LossCall.ref_grad: the reference side is a scatter of the anchors into their chosen
    # rows (no scores), over every row of ref (tiles no anchor chose write their zeros), in
    # fixed tiles with chunks of D as a second grid axis.
    grad_x = grad.mul_(g[:, None])
    N, D = call.N, call.D
    grad_ref = torch.empty(N, D, dtype=torch.float32, device=call.x.device)
    if N == 0:
        return grad_x, grad_ref
    BLOCK_DC = min(_common.block_d(D), _REF_CHUNK_D)
    call.launch(triplet_ref_grad_kernel, (triton.cdiv(N, _REF_BLOCK_K), triton.cdiv(D, BLOCK_DC)), num_warps=4,
                chosen_ptr=chosen, g_ptr=g, gref_ptr=grad_ref, N=N, BLOCK_K=_REF_BLOCK_K, BLOCK_B=_REF_BLOCK_B,
                BLOCK_DC=BLOCK_DC)
    return grad_x, grad_ref
