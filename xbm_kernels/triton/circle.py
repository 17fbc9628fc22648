"""Fused losses of two log-sum-exps over the pair sets, Triton kernels: the circle loss (pair
form, as pytorch-metric-learning's CircleLoss) and, with LIFTED, the generalized lifted
structure loss (as its GeneralizedLiftedStructureLoss) over a reference set (CONTRACT.md
section 1). Each pair has a logit and a slope k = dlogit/dS (held constant where the loss says so):

    circle:  k_ij = -gamma [1 + m - S_ij]_+ on P_i,  gamma [S_ij + m]_+ on N_i
             lp_ij = k_ij (S_ij - (1 - m)) on P_i,   ln_ij = k_ij (S_ij - m) on N_i
             L_i = LSE_{P_i} lp + LSE_{N_i} ln,      l_i = softplus(L_i)   (0 if P_i or N_i is empty)
    LIFTED:  d_ij = sqrt(2 - 2 S_ij) (0 within contrastive_l2's floor), k_ij = -1/d on P_i, 1/d on N_i
             (0 at d = 0); lp_ij = d_ij - pos_margin, ln_ij = neg_margin - d_ij
             L_i = LSE_{P_i} lp + LSE_{N_i} ln (an empty set's term 0),  l_i = max(0, L_i)
    dl_i/dx_i = l'(L_i) (sum_{P_i} softmax(lp)_j k_ij r_j + sum_{N_i} softmax(ln)_j k_ij r_j)

Forward: ONE pass over the reference rows with two online log-sum-exps (as supcon.py's, one
per set): per row a running max and sum of each set and its weighted rows
G = sum exp(logit - max) k r, rescaled when the max grows. Each split writes its
(max_P, sum_P, max_N, sum_N, counts, G_P, G_N) to a workspace; the merge kernel combines them
in split order and finishes each row.

Backward to both sides (the in-batch loss), with g_i = dL/dl_i: grad_x = g * (forward
gradient); grad_ref = C^T X with C_ij = g_i l'(L_i) exp(logit_ij - max_set) / sum_set k_ij,
from the forward's per-row max and sum of each set (not exp(logit - LSE): an LSE of several
hundred, gamma = 256, rounded to fp32 would cost its 2^-24 relative error in every weight);
each program owns a tile of reference rows.

dtypes as in contrastive.py; the weights are not exact in 16 bits (dot_acc's limbs).
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import anchor_program, anchor_tile, dot_acc, memory_tile, pair_sets, ref_grad_acc, reference_block, scores
from ._common import TWO_ACC_FWD_CONFIGS as _FWD_CONFIGS

# Register tiles as supcon's: two (B x D) accumulators plus the tile's weights, one (B x K) tile
# more (ptxas for sm_90: the 32 x 64 tile with limbs spills at D = 128 with supcon's 6).
_FWD_PRUNE = _common.prune_configs("BLOCK_B", "BLOCK_K", "B", 256, acc_tiles=2, temps=7,
                                    budgets=_common.TWO_ACC_BUDGETS)
_REF_PRUNE = _common.prune_configs("BLOCK_K", "BLOCK_B", "n", 256, acc_tiles=1, temps=6,
                                    fp32_product_when_limbed=True, budgets=_common.REF_BUDGETS)
NEG_INF = tl.constexpr(float("-inf"))
L2_ZERO = tl.constexpr(2.0 ** -16)  # 2 - 2S at or below it counts as d = 0 (CONTRACT.md, contrastive_l2)


@triton.jit
def _logits(sim, pos, neg, m, gamma, pos_margin, neg_margin, LIFTED: tl.constexpr):
    """(logit, slope k) of every pair of the tile; 0 outside P and N."""
    if LIFTED:
        t = 2.0 - 2.0 * sim
        d = tl.sqrt(tl.where(t > L2_ZERO, t, 0.0))
        inv = tl.where(d > 0.0, 1.0 / tl.where(d > 0.0, d, 1.0), 0.0)  # dd/dS = -1/d, 0 at d = 0
        k = tl.where(pos, -inv, tl.where(neg, inv, 0.0))
        logit = tl.where(pos, d - pos_margin, tl.where(neg, neg_margin - d, 0.0))
    else:
        k = tl.where(pos, -gamma * tl.maximum(1.0 + m - sim, 0.0),
                     tl.where(neg, gamma * tl.maximum(sim + m, 0.0), 0.0))
        logit = k * tl.where(pos, sim - (1.0 - m), sim - m)
    return logit, k


@triton.jit
def _online(acc_m, acc_s, logit, member):
    """One tile of an online log-sum-exp over the pairs where `member`: (new max, rescale of
    the old sum and rows, the tile's exponentials, new sum). Rows with no member yet keep
    max -inf and shift by 0 (no inf - inf)."""
    t = tl.where(member, logit, NEG_INF)
    m_new = tl.maximum(acc_m, tl.max(t, axis=1))
    shift = tl.where(m_new == NEG_INF, 0.0, m_new)
    scale = tl.exp(acc_m - shift)
    e = tl.exp(t - shift[:, None])
    return m_new, scale, e, acc_s * scale + tl.sum(e, axis=1)


@triton.autotune(configs=_common.autotune_configs(_FWD_CONFIGS),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "NEED_GRAD", "PRECISION", "X_LIMBS", "LIFTED"],
                 prune_configs_by={"early_config_prune": _FWD_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def circle_fwd_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, stats_ws, counts_ws, gp_ws, gn_ws,
                      B, D, n, cols_per_split, m, gamma, pos_margin, neg_margin, pos_thr, B_BUCKET, COLS_BUCKET,
                      LIFTED: tl.constexpr, HAS_SELF_INDEX: tl.constexpr, NEED_GRAD: tl.constexpr,
                      PRECISION: tl.constexpr,
                      X_LIMBS: tl.constexpr, W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col = anchor_program(
        x_ptr, y_ptr, r_ptr, si_ptr, B, D, HAS_SELF_INDEX, X_LIMBS, LO_SCALE, BLOCK_D, BLOCK_B)

    mp = tl.full([BLOCK_B], NEG_INF, tl.float32)
    mn = tl.full([BLOCK_B], NEG_INF, tl.float32)
    sp = tl.zeros([BLOCK_B], dtype=tl.float32)
    sn = tl.zeros([BLOCK_B], dtype=tl.float32)
    npos = tl.zeros([BLOCK_B], dtype=tl.int32)
    nneg = tl.zeros([BLOCK_B], dtype=tl.int32)
    gp = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    gn = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)

    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols, col_ok, r, zj, sim = memory_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, k0, col_end, dims, dim_ok, D,
                                               PRECISION, BLOCK_K, X_LIMBS, LO_SCALE)
        _, pos, neg = pair_sets(sim, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        logit, k = _logits(sim, pos, neg, m, gamma, pos_margin, neg_margin, LIFTED)
        mp, scale_p, ep, sp = _online(mp, sp, logit, pos)
        mn, scale_n, en, sn = _online(mn, sn, logit, neg)
        npos += tl.sum(pos.to(tl.int32), axis=1)
        nneg += tl.sum(neg.to(tl.int32), axis=1)
        if NEED_GRAD:
            gp = dot_acc(ep * k, r, gp * scale_p[:, None], W_LIMBS, PRECISION)
            gn = dot_acc(en * k, r, gn * scale_n[:, None], W_LIMBS, PRECISION)

    out = pid_s.to(tl.int64) * B + rows64  # row of this split's slice of the workspaces
    stat = pid_s.to(tl.int64) * 4 * B + rows64  # stats_ws is (splits, 4, B): max_P, sum_P, max_N, sum_N
    tl.store(stats_ws + stat, mp, mask=row_ok)
    tl.store(stats_ws + stat + B, sp, mask=row_ok)
    tl.store(stats_ws + stat + 2 * B, mn, mask=row_ok)
    tl.store(stats_ws + stat + 3 * B, sn, mask=row_ok)
    tl.store(counts_ws + 2 * out, npos, mask=row_ok)
    tl.store(counts_ws + 2 * out + 1, nneg, mask=row_ok)
    if NEED_GRAD:
        gmask = row_ok[:, None] & dim_ok[None, :]
        tl.store(gp_ws + out[:, None] * D + dims[None, :], gp, mask=gmask)
        tl.store(gn_ws + out[:, None] * D + dims[None, :], gn, mask=gmask)


@triton.jit
def _merged_set(stats_ws, g_ws, rows64, row_ok, dims, gmask, B, D, splits, FIRST: tl.constexpr,
                NEED_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """(shift, sum, G) of one set over the splits, in split order; shift is the max (0 when
    the row has no member)."""
    mx = tl.full([ROWS], NEG_INF, tl.float32)
    for p in range(0, splits):  # the max is exact: any order
        mx = tl.maximum(mx, tl.load(stats_ws + p * 4 * B + FIRST * B + rows64, mask=row_ok, other=NEG_INF))
    shift = tl.where(mx == NEG_INF, 0.0, mx)
    s = tl.zeros([ROWS], dtype=tl.float32)
    g = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for p in range(0, splits):  # split order, always: the result does not depend on timing
        stat = p * 4 * B + FIRST * B + rows64
        scale = tl.exp(tl.load(stats_ws + stat, mask=row_ok, other=NEG_INF) - shift)
        s += scale * tl.load(stats_ws + stat + B, mask=row_ok, other=0.0)
        if NEED_GRAD:
            base = p * B + rows64
            g += scale[:, None] * tl.load(g_ws + base[:, None] * D + dims[None, :], mask=gmask, other=0.0)
    return shift, s, g


@triton.jit
def circle_merge_kernel(stats_ws, counts_ws, gp_ws, gn_ws, loss_ptr, counts_ptr, grad_ptr, rowstat_ptr,
                        B, D, splits, LIFTED: tl.constexpr,
                        NEED_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    gmask = row_ok[:, None] & (dims < D)[None, :]
    shift_p, sp, gp = _merged_set(stats_ws, gp_ws, rows64, row_ok, dims, gmask, B, D, splits, 0,
                                  NEED_GRAD, ROWS, BLOCK_D)
    shift_n, sn, gn = _merged_set(stats_ws, gn_ws, rows64, row_ok, dims, gmask, B, D, splits, 2,
                                  NEED_GRAD, ROWS, BLOCK_D)
    npos = tl.zeros([ROWS], dtype=tl.int32)
    nneg = tl.zeros([ROWS], dtype=tl.int32)
    for p in range(0, splits):
        base = p * B + rows64
        npos += tl.load(counts_ws + 2 * base, mask=row_ok, other=0)
        nneg += tl.load(counts_ws + 2 * base + 1, mask=row_ok, other=0)
    # a row's loss: circle's needs both sets, LIFTED's either (an empty set's term is 0)
    if LIFTED:
        active = (npos > 0) | (nneg > 0)
    else:
        active = (npos > 0) & (nneg > 0)
    use_p = active & (npos > 0)  # the set's term enters L; then its sum is >= 1
    use_n = active & (nneg > 0)
    sp = tl.where(use_p, sp, 1.0)
    sn = tl.where(use_n, sn, 1.0)
    lse_p = tl.where(use_p, shift_p + tl.log(sp), 0.0)
    lse_n = tl.where(use_n, shift_n + tl.log(sn), 0.0)
    total = lse_p + lse_n
    if LIFTED:
        value = tl.maximum(total, 0.0)
        slope = tl.where(total > 0.0, 1.0, 0.0)  # relu'(0) = 0, as torch.relu
    else:
        value = tl.maximum(total, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(total)))  # softplus
        slope = 1.0 / (1.0 + tl.exp(-total))
    tl.store(loss_ptr + rows64, tl.where(active, value, 0.0), mask=row_ok)
    # per row, for the reference-side kernel: each set's shift and l'(L) / sum (0: no gradient)
    tl.store(rowstat_ptr + rows64, shift_p, mask=row_ok)
    tl.store(rowstat_ptr + B + rows64, shift_n, mask=row_ok)
    tl.store(rowstat_ptr + 2 * B + rows64, tl.where(use_p, slope / sp, 0.0), mask=row_ok)
    tl.store(rowstat_ptr + 3 * B + rows64, tl.where(use_n, slope / sn, 0.0), mask=row_ok)
    tl.store(counts_ptr + 2 * rows64, npos, mask=row_ok)
    tl.store(counts_ptr + 2 * rows64 + 1, nneg, mask=row_ok)
    if NEED_GRAD:
        grad = (tl.where(use_p[:, None], gp / sp[:, None], 0.0) + tl.where(use_n[:, None], gn / sn[:, None], 0.0)) \
            * slope[:, None]
        tl.store(grad_ptr + rows64[:, None] * D + dims[None, :], tl.where(active[:, None], grad, 0.0), mask=gmask)


@triton.autotune(configs=_common.autotune_configs(_common.REF_CONFIGS, "BLOCK_K", "BLOCK_B"),
                 key=["D", "B_BUCKET", "N_BUCKET", "PRECISION", "X_LIMBS", "LIFTED"],
                 prune_configs_by={"early_config_prune": _REF_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def circle_ref_grad_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, rowstat_ptr, g_ptr, gref_ptr,
                           B, D, n, m, gamma, pos_margin, neg_margin, pos_thr, B_BUCKET, N_BUCKET,
                           LIFTED: tl.constexpr, HAS_SELF_INDEX: tl.constexpr, PRECISION: tl.constexpr,
                           X_LIMBS: tl.constexpr,
                           W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    cols, col_ok, dims, dim_ok, col_off, r, zj = reference_block(r_ptr, z_ptr, n, D, BLOCK_D, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        x, x_hi, x_mid, x_lo, yi, self_col = anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D,
                                                         r_ptr.dtype.element_ty, HAS_SELF_INDEX, X_LIMBS, LO_SCALE)
        shift_p = tl.load(rowstat_ptr + rows, mask=row_ok, other=0.0)
        shift_n = tl.load(rowstat_ptr + B + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        wp = g * tl.load(rowstat_ptr + 2 * B + rows, mask=row_ok, other=0.0)  # 0 where the set's term is not in L
        wn = g * tl.load(rowstat_ptr + 3 * B + rows, mask=row_ok, other=0.0)
        sim = scores(x_hi, x_mid, x_lo, r, PRECISION, X_LIMBS, LO_SCALE)
        _, pos, neg = pair_sets(sim, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        logit, k = _logits(sim, pos, neg, m, gamma, pos_margin, neg_margin, LIFTED)
        shift = tl.where(pos, shift_p[:, None], shift_n[:, None])
        w = tl.where(pos, wp[:, None], wn[:, None])
        live = (pos | neg) & (w != 0.0)
        c = tl.where(live, tl.exp(tl.where(live, logit - shift, NEG_INF)) * k * w, 0.0)
        acc = ref_grad_acc(tl.trans(c), x, x_hi, acc, X_LIMBS, W_LIMBS, PRECISION)
    tl.store(gref_ptr + col_off, acc, mask=col_ok[:, None] & dim_ok[None, :])


# The autotuned kernels: launch_problem() asks their prunes whether a shape can launch.
KERNELS = (circle_fwd_kernel, circle_ref_grad_kernel)


def scalars(pos_eps, m=0.0, gamma=1.0, pos_margin=0.0, neg_margin=0.0):
    """The kernels' float arguments (the other form's are unused)."""
    return dict(m=float(m), gamma=float(gamma), pos_margin=float(pos_margin), neg_margin=float(neg_margin),
                pos_thr=1.0 - float(pos_eps))


def forward(call, values, lifted, need_grad, splits):
    """The op's outputs plus per row (shift_P, shift_N, l'(L) / sum_P, l'(L) / sum_N) as a
    (4, B) tensor; `values` from scalars(), `lifted` the form (circle or LIFTED)."""
    loss, grad, counts = call.outputs(need_grad)
    stats = call.f32(4, call.B)
    if call.B == 0:
        return loss, grad, counts, stats
    B = call.B
    call.plan(_FWD_CONFIGS, splits)
    need_grad = bool(need_grad)
    call.split_k(circle_fwd_kernel, circle_merge_kernel, stats_ws=call.workspace(4, B),
                 counts_ws=call.workspace(B, 2, dtype=torch.int32),
                 gp_ws=call.grad_workspace(grad, need_grad), gn_ws=call.grad_workspace(grad, need_grad),
                 loss_ptr=loss, counts_ptr=counts, grad_ptr=grad, rowstat_ptr=stats, NEED_GRAD=need_grad,
                 LIFTED=bool(lifted), **values)
    return loss, grad, counts, stats


def backward(call, values, lifted, grad_rows):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    g = call.grad_rows(grad_rows)
    _, grad, _, stats = forward(call, values, lifted, True, None)
    return call.ref_grad(circle_ref_grad_kernel, grad, g, rowstat_ptr=stats, g_ptr=g, LIFTED=bool(lifted), **values)


def _circle_scalars(m, gamma, pos_eps):
    if not gamma > 0:
        raise ValueError(f"gamma: expected > 0, got {gamma}")
    return scalars(pos_eps, m=m, gamma=gamma)


def circle_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, m, gamma, pos_eps, need_grad, allow_tf32,
                      splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    call = _common.LossCall(KERNELS, "circle", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    return forward(call, _circle_scalars(m, gamma, pos_eps), False, need_grad, splits)[:3]


def circle_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, m, gamma, pos_eps, grad_rows, allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    call = _common.LossCall(KERNELS, "circle", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    return backward(call, _circle_scalars(m, gamma, pos_eps), False, grad_rows)
