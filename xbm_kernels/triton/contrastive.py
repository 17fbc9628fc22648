"""Fused contrastive loss over a reference set (CONTRACT.md section 1), Triton kernels.

    S_ij = <x_i, r_j>                       (tl.dot, fp32 accumulation)
    valid_ij = j < ref_valid and j != self_index[i]
    pos_ij = valid_ij and z_j == y_i and S_ij < 1 - pos_eps
    neg_ij = valid_ij and z_j != y_i and S_ij > margin
    l_i = sum_j pos_ij (1 - S_ij) + neg_ij S_ij
    c_ij = neg_ij - pos_ij  (-1, 0 or +1: it depends only on its own pair)
    dl_i/dx_i = sum_j c_ij r_j              (the row-i gradient of sum_i l_i)

Forward: one pass over the reference rows. Per tile of R: S = X R^T, the masks, the loss
and active-pair counts, then dX += C R with the tile of R already loaded. The grid is
(B tiles) x (K splits), B fastest so programs running together share tiles of R in L2.
Each split writes partial loss / counts / dX to a workspace; a merge kernel
(_common.sum_merge_kernel) adds the splits in split order (deterministic, no atomics). With
one split the first kernel writes the outputs directly.

Backward to both sides (the in-batch loss), with g_i = dL/dl_i:
    grad_x   = g * (C R)     the forward kernel's dX, each row scaled by g_i afterwards
                            (C stays exact in 16-bit for the tensor cores)
    grad_ref = (g C)^T X     a second kernel: each program owns a tile of reference rows
                            and streams the anchors, so no two programs write one row.
Rows of grad_ref at and beyond ref_valid are zero.

dtypes: 16-bit memories feed the tensor cores: x in the memory's dtype when it is that
dtype, cut into 16-bit limbs when it is not (fp32 anchors against a bf16 memory: one
product per limb, so S keeps fp32 accuracy; _common.operand_limbs); fp32 references compute
in fp32, as IEEE fp32 or TF32 as allow_tf32 says. Accumulators are fp32; pointer offsets
are int64.
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import anchor_program, anchor_tile, dot_acc, memory_tile, pair_sets, ref_grad_acc, reference_block, scores

_FWD_PRUNE = _common.prune_configs("BLOCK_B", "BLOCK_K", "B", 2048)
_REF_PRUNE = _common.prune_configs("BLOCK_K", "BLOCK_B", "n", 1024, temps=6, fp32_product_when_limbed=True,
                                    budgets=_common.REF_BUDGETS)


@triton.jit
def _pair_masks(s, yi, zj, rows, cols, row_ok, col_ok, self_col, margin, pos_thr,
                HAS_SELF_INDEX: tl.constexpr):
    _, pos, neg = pair_sets(s, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
    return pos, neg & (s > margin)


@triton.autotune(configs=_common.autotune_configs(_common.FWD_CONFIGS),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "NEED_GRAD", "PRECISION", "X_LIMBS"],
                 prune_configs_by={"early_config_prune": _FWD_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def contrastive_fwd_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, loss_ptr, counts_ptr, grad_ptr,
                           B, D, n, cols_per_split, margin, pos_thr, B_BUCKET, COLS_BUCKET,
                           HAS_SELF_INDEX: tl.constexpr, NEED_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                           X_LIMBS: tl.constexpr, W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_s = tl.program_id(1)
    rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col = anchor_program(
        x_ptr, y_ptr, r_ptr, si_ptr, B, D, HAS_SELF_INDEX, X_LIMBS, LO_SCALE, BLOCK_D, BLOCK_B)

    loss = tl.zeros([BLOCK_B], dtype=tl.float32)
    npos = tl.zeros([BLOCK_B], dtype=tl.int32)
    nneg = tl.zeros([BLOCK_B], dtype=tl.int32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)

    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols, col_ok, r, zj, s = memory_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, k0, col_end, dims, dim_ok, D,
                                             PRECISION, BLOCK_K, X_LIMBS, LO_SCALE)
        pos, neg = _pair_masks(s, yi, zj, rows, cols, row_ok, col_ok, self_col, margin, pos_thr, HAS_SELF_INDEX)
        loss += tl.sum(tl.where(pos, 1.0 - s, tl.where(neg, s, 0.0)), axis=1)
        npos += tl.sum(pos.to(tl.int32), axis=1)
        nneg += tl.sum(neg.to(tl.int32), axis=1)
        if NEED_GRAD:
            c = neg.to(tl.float32) - pos.to(tl.float32)
            acc = dot_acc(c, r, acc, 1, PRECISION)  # -1/0/+1: exact in any dtype

    out = pid_s.to(tl.int64) * B + rows64  # row of this split's slice of the workspace
    tl.store(loss_ptr + out, loss, mask=row_ok)
    tl.store(counts_ptr + 2 * out, npos, mask=row_ok)
    tl.store(counts_ptr + 2 * out + 1, nneg, mask=row_ok)
    if NEED_GRAD:
        tl.store(grad_ptr + out[:, None] * D + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])


@triton.autotune(configs=_common.autotune_configs(_common.REF_CONFIGS, "BLOCK_K", "BLOCK_B"),
                 key=["D", "B_BUCKET", "N_BUCKET", "PRECISION", "X_LIMBS"],
                 prune_configs_by={"early_config_prune": _REF_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def contrastive_ref_grad_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, g_ptr, gref_ptr,
                                B, D, n, margin, pos_thr, B_BUCKET, N_BUCKET,
                                HAS_SELF_INDEX: tl.constexpr, PRECISION: tl.constexpr, X_LIMBS: tl.constexpr,
                                W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr,
                                BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    cols, col_ok, dims, dim_ok, col_off, r, zj = reference_block(r_ptr, z_ptr, n, D, BLOCK_D, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        x, x_hi, x_mid, x_lo, yi, self_col = anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D,
                                                         r_ptr.dtype.element_ty, HAS_SELF_INDEX, X_LIMBS, LO_SCALE)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        s = scores(x_hi, x_mid, x_lo, r, PRECISION, X_LIMBS, LO_SCALE)
        pos, neg = _pair_masks(s, yi, zj, rows, cols, row_ok, col_ok, self_col, margin, pos_thr, HAS_SELF_INDEX)
        cg = tl.trans((neg.to(tl.float32) - pos.to(tl.float32)) * g[:, None])
        acc = ref_grad_acc(cg, x, x_hi, acc, X_LIMBS, W_LIMBS, PRECISION)  # g C: not exact in 16 bits
    tl.store(gref_ptr + col_off, acc, mask=col_ok[:, None] & dim_ok[None, :])


# The autotuned kernels: launch_problem() asks their prunes whether a shape can launch.
KERNELS = (contrastive_fwd_kernel, contrastive_ref_grad_kernel)


def split_plan(B: int, n: int, device: torch.device, splits=None):
    """(splits, cols_per_split) of the forward grid; see _common.split_plan."""
    return _common.split_plan(B, n, device, _common.FWD_CONFIGS, splits)


def _scalars(margin, pos_eps):
    return dict(margin=float(margin), pos_thr=1.0 - float(pos_eps))


def contrastive_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, pos_eps, need_grad,
                           allow_tf32, splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    call = _common.LossCall(KERNELS, "contrastive", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    return call.sum_forward(contrastive_fwd_kernel, _common.FWD_CONFIGS, need_grad, splits, **_scalars(margin, pos_eps))


def contrastive_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, pos_eps, grad_rows,
                           allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    call = _common.LossCall(KERNELS, "contrastive", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    g = call.grad_rows(grad_rows)
    scalars = _scalars(margin, pos_eps)
    _, grad, _ = call.sum_forward(contrastive_fwd_kernel, _common.FWD_CONFIGS, True, **scalars)
    return call.ref_grad(contrastive_ref_grad_kernel, grad, g, g_ptr=g, **scalars)
