"""Fused supervised-contrastive (InfoNCE) loss over a reference set (CONTRACT.md section 1),
Triton kernels.

    t_ij = S_ij / tau                                   over valid columns V_i
    LSE_i = log sum_{V_i} exp(t_ij),   l_i = LSE_i - 1/|P_i| sum_{P_i} t_ip   (0 if P_i empty)
    dl_i/dx_i = 1/tau ( sum_{V_i} softmax_ij r_j - 1/|P_i| sum_{P_i} r_p )

Forward: ONE pass over the reference rows with an online log-sum-exp, as in
FlashAttention: per row a running max m, the sum s = sum exp(t - m) and the softmax
numerator G = sum exp(t - m) r (rescaled by exp(m_old - m_new) when m grows), plus the
positives' sum of S, their row sum Gpos and the counts. The memory is read once and the
gradient comes out of the forward (as the CPU kernel does). The grid is (B tiles) x
(K splits); each split writes its (m, s, sum_P S, counts, G, Gpos) to a workspace and a
merge kernel combines them in split order (deterministic) and finishes each row:
    m = max_p m_p,  s = sum_p s_p exp(m_p - m),  G = sum_p G_p exp(m_p - m).

Backward to both sides (the in-batch loss), with g_i = dL/dl_i:
    grad_x   = g * (forward gradient)
    grad_ref = C^T X with C_ij = g_i / tau (exp(t_ij - LSE_i) [j in V_i] - [j in P_i] / |P_i|):
               a kernel where each program owns a tile of reference rows and streams the
               anchors, using the forward's per-row LSE (no two programs write one row).

dtypes as in contrastive.py; softmax weights are not exact in 16 bits, so with a 16-bit
reference they enter the tensor cores in 16-bit limbs (_common.dot_acc).

With NCA (the nca loss, xbm_kernels/triton/nca.py, t = 2 scale S): the same pass keeps one
online log-sum-exp over the rest R_i = V_i \\ P_i (negatives and dropped duplicates) and a
second over P_i, with their weighted rows G and Gpos (both rescaled). The merge finishes
    log r = LSE_R - LSE_P,  l = softplus(log r),  grad = 2 scale sigmoid(log r) (G / s - Gpos / s_P)
(CONTRACT.md section 1: no difference of two sums near 1, and exactly 0 when R_i is empty), and
the reference-side coefficients are 2 scale sigmoid(log r) (softmax_R [j in R] - softmax_P [j in P]).
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import anchor_program, anchor_tile, dot_acc, memory_tile, pair_sets, ref_grad_acc, reference_block, scores
from ._common import TWO_ACC_FWD_CONFIGS as _FWD_CONFIGS

# Register tiles: G and Gpos plus the tile's weights; IEEE fp32 (FMA) dots spill beyond 16 x 16
# (ptxas for sm_90). The reference-side kernels hold one accumulator and the weights (hi, lo).
_SUPCON_FWD_PRUNE = _common.prune_configs("BLOCK_B", "BLOCK_K", "B", 256, acc_tiles=2, temps=6,
                                           budgets=_common.TWO_ACC_BUDGETS)
# NCA: one (B x K) tile more, the second log-sum-exp's exponentials (32 B of spills at D = 128,
# 32 x 64 with fp32 anchors in bf16 limbs, with supcon's 6), as circle's
_NCA_FWD_PRUNE = _common.prune_configs("BLOCK_B", "BLOCK_K", "B", 256, acc_tiles=2, temps=7,
                                        budgets=_common.TWO_ACC_BUDGETS)


def _fwd_prune_of(kwargs):
    return _NCA_FWD_PRUNE if kwargs.get("NCA") else _SUPCON_FWD_PRUNE


def _FWD_PRUNE(configs, nargs, **kwargs):
    return _fwd_prune_of(kwargs)(configs, nargs, **kwargs)


# the model's admission test of one configuration, as every prune exposes it (tests/test_triton_configs.py)
_FWD_PRUNE.fits = lambda config, nargs, **kwargs: _fwd_prune_of(kwargs).fits(config, nargs, **kwargs)
_REF_PRUNE = _common.prune_configs("BLOCK_K", "BLOCK_B", "n", 256, acc_tiles=1, temps=6,
                                    fp32_product_when_limbed=True, budgets=_common.REF_BUDGETS)


@triton.autotune(configs=_common.autotune_configs(_FWD_CONFIGS),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "NEED_GRAD", "PRECISION", "X_LIMBS", "NCA"],
                 prune_configs_by={"early_config_prune": _FWD_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def supcon_fwd_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, stats_ws, counts_ws, g_ws, gpos_ws,
                      B, D, n, cols_per_split, inv_tau, pos_thr, B_BUCKET, COLS_BUCKET,
                      HAS_SELF_INDEX: tl.constexpr, NEED_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                      X_LIMBS: tl.constexpr, W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr, NCA: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col = anchor_program(
        x_ptr, y_ptr, r_ptr, si_ptr, B, D, HAS_SELF_INDEX, X_LIMBS, LO_SCALE, BLOCK_D, BLOCK_B)

    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_B], dtype=tl.float32)
    pos_sum = tl.zeros([BLOCK_B], dtype=tl.float32)  # supcon: sum_P S / tau; NCA: the running sum over P
    m_pos = tl.full([BLOCK_B], float("-inf"), tl.float32)  # NCA: the running max over P
    npos = tl.zeros([BLOCK_B], dtype=tl.int32)
    nneg = tl.zeros([BLOCK_B], dtype=tl.int32)
    g = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    gpos = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)

    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols, col_ok, r, zj, sim = memory_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, k0, col_end, dims, dim_ok, D,
                                               PRECISION, BLOCK_K, X_LIMBS, LO_SCALE)
        valid, pos, neg = pair_sets(sim, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        if NCA:
            t = tl.where(valid & (pos == 0), sim * inv_tau, float("-inf"))
        else:
            t = tl.where(valid, sim * inv_tau, float("-inf"))
        m_new = tl.maximum(m, tl.max(t, axis=1))
        # Rows with no valid column yet (m_new = -inf) shift by 0: their exponentials are
        # exp(-inf) = 0 and so is the rescale of their (zero) sums; no inf - inf anywhere.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - shift)
        e = tl.exp(t - shift[:, None])
        s = s * scale + tl.sum(e, axis=1)
        m = m_new
        npos += tl.sum(pos.to(tl.int32), axis=1)
        nneg += tl.sum(neg.to(tl.int32), axis=1)
        if NCA:  # the second online log-sum-exp, over P
            tp = tl.where(pos, sim * inv_tau, float("-inf"))
            mp_new = tl.maximum(m_pos, tl.max(tp, axis=1))
            shift_p = tl.where(mp_new == float("-inf"), 0.0, mp_new)
            scale_p = tl.exp(m_pos - shift_p)
            ep = tl.exp(tp - shift_p[:, None])
            pos_sum = pos_sum * scale_p + tl.sum(ep, axis=1)
            m_pos = mp_new
        else:
            pos_sum += tl.sum(tl.where(pos, sim * inv_tau, 0.0), axis=1)  # S / tau: the same products as m
        if NEED_GRAD:
            g = dot_acc(e, r, g * scale[:, None], W_LIMBS, PRECISION)
            if NCA:
                gpos = dot_acc(ep, r, gpos * scale_p[:, None], W_LIMBS, PRECISION)
            else:
                gpos = dot_acc(pos.to(tl.float32), r, gpos, 1, PRECISION)

    out = pid_s.to(tl.int64) * B + rows64  # row of this split's slice of the workspaces
    stat = pid_s.to(tl.int64) * 4 * B + rows64  # stats_ws is (splits, 4, B): m, s, pos_sum, m_pos (NCA)
    tl.store(stats_ws + stat, m, mask=row_ok)
    tl.store(stats_ws + stat + B, s, mask=row_ok)
    tl.store(stats_ws + stat + 2 * B, pos_sum, mask=row_ok)
    if NCA:
        tl.store(stats_ws + stat + 3 * B, m_pos, mask=row_ok)
    tl.store(counts_ws + 2 * out, npos, mask=row_ok)
    tl.store(counts_ws + 2 * out + 1, nneg, mask=row_ok)
    if NEED_GRAD:
        gmask = row_ok[:, None] & dim_ok[None, :]
        tl.store(g_ws + out[:, None] * D + dims[None, :], g, mask=gmask)
        tl.store(gpos_ws + out[:, None] * D + dims[None, :], gpos, mask=gmask)


@triton.jit
def _log1p(y):
    """log(1 + y) for y >= 0 to fp32's relative precision (log(1 + y) loses y below 2^-24)."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def supcon_merge_kernel(stats_ws, counts_ws, g_ws, gpos_ws, loss_ptr, counts_ptr, grad_ptr, lse_ptr,
                        B, D, splits, inv_tau,
                        NEED_GRAD: tl.constexpr, NCA: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    gmask = row_ok[:, None] & (dims < D)[None, :]
    m = tl.full([ROWS], float("-inf"), tl.float32)
    m_pos = tl.full([ROWS], float("-inf"), tl.float32)
    for p in range(0, splits):  # the max is exact: any order
        m = tl.maximum(m, tl.load(stats_ws + p * 4 * B + rows64, mask=row_ok, other=float("-inf")))
        if NCA:
            m_pos = tl.maximum(m_pos, tl.load(stats_ws + p * 4 * B + 3 * B + rows64, mask=row_ok,
                                              other=float("-inf")))
    s = tl.zeros([ROWS], dtype=tl.float32)
    pos_sum = tl.zeros([ROWS], dtype=tl.float32)
    npos = tl.zeros([ROWS], dtype=tl.int32)
    nneg = tl.zeros([ROWS], dtype=tl.int32)
    g = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    gpos = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    shift = tl.where(m == float("-inf"), 0.0, m)  # as in the forward kernel
    shift_p = tl.where(m_pos == float("-inf"), 0.0, m_pos)
    for p in range(0, splits):  # split order, always: the result does not depend on timing
        stat = p * 4 * B + rows64
        scale = tl.exp(tl.load(stats_ws + stat, mask=row_ok, other=float("-inf")) - shift)
        s += scale * tl.load(stats_ws + stat + B, mask=row_ok, other=0.0)
        if NCA:
            scale_p = tl.exp(tl.load(stats_ws + stat + 3 * B, mask=row_ok, other=float("-inf")) - shift_p)
            pos_sum += scale_p * tl.load(stats_ws + stat + 2 * B, mask=row_ok, other=0.0)
        else:
            scale_p = tl.full([ROWS], 1.0, tl.float32)  # the positives' rows are summed unweighted
            pos_sum += tl.load(stats_ws + stat + 2 * B, mask=row_ok, other=0.0)
        base = p * B + rows64
        npos += tl.load(counts_ws + 2 * base, mask=row_ok, other=0)
        nneg += tl.load(counts_ws + 2 * base + 1, mask=row_ok, other=0)
        if NEED_GRAD:
            g += scale[:, None] * tl.load(g_ws + base[:, None] * D + dims[None, :], mask=gmask, other=0.0)
            gpos += scale_p[:, None] * tl.load(gpos_ws + base[:, None] * D + dims[None, :], mask=gmask, other=0.0)
    has_pos = npos > 0
    tl.store(counts_ptr + 2 * rows64, tl.where(has_pos, npos, 0), mask=row_ok)
    tl.store(counts_ptr + 2 * rows64 + 1, tl.where(has_pos, nneg, 0), mask=row_ok)
    if NCA:
        # log r = LSE_R - LSE_P (-inf for an empty R: loss and gradient exactly 0); rows without
        # positives never use it. The shifts subtract first: no cancellation of two large LSEs.
        s_ok = (s > 0.0) | (s != s)  # a NaN sum (a NaN score in V_i \ P_i) stays NaN, not "R empty"
        p_sum = tl.where(has_pos, pos_sum, 1.0)
        log_r = tl.where(s_ok, (shift - shift_p) + tl.log(tl.where(s_ok, s, 1.0)) - tl.log(p_sum), float("-inf"))
        loss = tl.maximum(log_r, 0.0) + _log1p(tl.exp(-tl.abs(log_r)))  # softplus, tiny values resolved
        sig = 1.0 / (1.0 + tl.exp(-log_r))
        sig = tl.where(has_pos, sig, 0.0)
        w_rest = tl.where(s_ok, sig / tl.where(s_ok, s, 1.0), 0.0)  # sigmoid(log r) / s: softmax_V on R
        w_pos = sig / p_sum
        tl.store(loss_ptr + rows64, tl.where(has_pos, loss, 0.0), mask=row_ok)
        # per row, for the reference-side kernel: each set's shift and weight (0: no gradient)
        tl.store(lse_ptr + rows64, shift, mask=row_ok)
        tl.store(lse_ptr + B + rows64, shift_p, mask=row_ok)
        tl.store(lse_ptr + 2 * B + rows64, w_rest, mask=row_ok)
        tl.store(lse_ptr + 3 * B + rows64, w_pos, mask=row_ok)
        if NEED_GRAD:
            grad = (g * w_rest[:, None] - gpos * w_pos[:, None]) * inv_tau
            tl.store(grad_ptr + rows64[:, None] * D + dims[None, :], tl.where(has_pos[:, None], grad, 0.0),
                     mask=gmask)
    else:
        s = tl.where(has_pos, s, 1.0)  # has_pos implies a valid column, so s >= 1
        inv_np = 1.0 / tl.maximum(npos, 1).to(tl.float32)
        lse = shift + tl.log(s)
        # log(s) + (m - mean_P S / tau), not lse - mean: no cancellation of two large terms, >= 0
        # (m is the largest S / tau, from the same fp32 products), and 0 when one positive
        # dominates beyond fp32 resolution, as PML's row-max-shifted form gives.
        loss = tl.maximum(tl.log(s) + (shift - pos_sum * inv_np), 0.0)
        tl.store(loss_ptr + rows64, tl.where(has_pos, loss, 0.0), mask=row_ok)
        tl.store(lse_ptr + rows64, tl.where(has_pos, lse, float("inf")), mask=row_ok)  # +inf: weights exp(t - LSE) = 0
        if NEED_GRAD:
            grad = (g / s[:, None] - gpos * inv_np[:, None]) * inv_tau
            tl.store(grad_ptr + rows64[:, None] * D + dims[None, :], tl.where(has_pos[:, None], grad, 0.0),
                     mask=gmask)


@triton.autotune(configs=_common.autotune_configs(_common.REF_CONFIGS, "BLOCK_K", "BLOCK_B"),
                 key=["D", "B_BUCKET", "N_BUCKET", "PRECISION", "X_LIMBS", "NCA"],
                 prune_configs_by={"early_config_prune": _REF_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def supcon_ref_grad_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, lse_ptr, ga_ptr, gp_ptr, gref_ptr,
                           B, D, n, inv_tau, pos_thr, B_BUCKET, N_BUCKET,
                           HAS_SELF_INDEX: tl.constexpr, PRECISION: tl.constexpr, X_LIMBS: tl.constexpr,
                           W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr, NCA: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    cols, col_ok, dims, dim_ok, col_off, r, zj = reference_block(r_ptr, z_ptr, n, D, BLOCK_D, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        x, x_hi, x_mid, x_lo, yi, self_col = anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D,
                                                         r_ptr.dtype.element_ty, HAS_SELF_INDEX, X_LIMBS, LO_SCALE)
        ga = tl.load(ga_ptr + rows, mask=row_ok, other=0.0)  # g / tau, 0 for rows without positives
        sim = scores(x_hi, x_mid, x_lo, r, PRECISION, X_LIMBS, LO_SCALE)
        valid, pos, _ = pair_sets(sim, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        if NCA:  # lse_ptr: (4, B) the shifts and weights of R and P (the merge's)
            shift = tl.where(pos, tl.load(lse_ptr + B + rows, mask=row_ok, other=0.0)[:, None],
                             tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None])
            w = tl.where(pos, -tl.load(lse_ptr + 3 * B + rows, mask=row_ok, other=0.0)[:, None],
                         tl.load(lse_ptr + 2 * B + rows, mask=row_ok, other=0.0)[:, None])
            live = valid & (w != 0.0)
            c = tl.where(live, tl.exp(tl.where(live, sim * inv_tau - shift, float("-inf"))) * w, 0.0) * ga[:, None]
        else:
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
            gp = tl.load(gp_ptr + rows, mask=row_ok, other=0.0)  # g / (tau |P|)
            e = tl.where(valid, tl.exp(sim * inv_tau - lse[:, None]), 0.0)
            c = e * ga[:, None] - tl.where(pos, gp[:, None], 0.0)
        acc = ref_grad_acc(tl.trans(c), x, x_hi, acc, X_LIMBS, W_LIMBS, PRECISION)
    tl.store(gref_ptr + col_off, acc, mask=col_ok[:, None] & dim_ok[None, :])


# The autotuned kernels: launch_problem() asks their prunes whether a shape can launch.
KERNELS = (supcon_fwd_kernel, supcon_ref_grad_kernel)


def _forward(call, temperature, pos_eps, need_grad, splits):
    """The op's outputs plus the per-row LSE (+inf for rows without positives)."""
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    loss, grad, counts = call.outputs(need_grad)
    lse = call.f32(call.B)
    if call.B == 0:
        return loss, grad, counts, lse
    B, D = call.B, call.D
    call.plan(_FWD_CONFIGS, splits)
    need_grad = bool(need_grad)
    call.split_k(supcon_fwd_kernel, supcon_merge_kernel, stats_ws=call.workspace(4, B),
                 counts_ws=call.workspace(B, 2, dtype=torch.int32), g_ws=call.grad_workspace(grad, need_grad),
                 gpos_ws=call.grad_workspace(grad, need_grad), loss_ptr=loss, counts_ptr=counts, grad_ptr=grad,
                 lse_ptr=lse, inv_tau=1.0 / float(temperature), pos_thr=1.0 - float(pos_eps), NEED_GRAD=need_grad,
                 NCA=False)
    return loss, grad, counts, lse


def supcon_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, temperature, pos_eps, need_grad,
                      allow_tf32, splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    call = _common.LossCall(KERNELS, "supcon", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    return _forward(call, temperature, pos_eps, need_grad, splits)[:3]


def supcon_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, temperature, pos_eps, grad_rows,
                      allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    call = _common.LossCall(KERNELS, "supcon", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    g = call.grad_rows(grad_rows)
    _, grad, counts, lse = _forward(call, temperature, pos_eps, True, None)
    inv_tau = 1.0 / float(temperature)
    npos = counts[:, 0]
    ga = torch.where(npos > 0, g * inv_tau, 0.0)
    return call.ref_grad(supcon_ref_grad_kernel, grad, g, lse_ptr=lse, ga_ptr=ga,
                         gp_ptr=ga / npos.clamp_min(1).to(torch.float32), inv_tau=inv_tau,
                         pos_thr=1.0 - float(pos_eps), NCA=False)
