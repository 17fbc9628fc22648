"""Fused NT-Xent (InfoNCE per positive pair) loss over a reference set (CONTRACT.md section 1),
Triton kernels; also the form's other loss, tuplet_margin (tuplet_margin.py launches these
kernels with ANGULAR): a the logits' scale (`inv_tau`: 1/tau, or tuplet_margin's scale), f the
positive's transform (f(S) = S; with ANGULAR f(S) = cos(acos(S) - m) = S cos m + sin(theta)
sin m, sin(theta) taken as 0 where 1 - S^2 <= 2^-16):

    t_ij = a S_ij,  LZ_i = log sum_{N_i} exp(t_in)   (-inf when N_i is empty)
    l_i = sum_{P_i} softplus(LZ_i - a f_ip)            (a pair's term is 0 when N_i is empty)
    dl_i/dS_ip = -a f'_ip sigmoid(LZ_i - a f_ip)
    dl_i/dS_in = a exp(t_in - LZ_i) w_i,   w_i = sum_{P_i} sigmoid(LZ_i - a f_ip)

ONE read of the memory per step, positives first as multi_similarity.py's with mining. The
pass over the memory (forward kernel) takes the negatives only (same-label columns skipped by
label) with an online log-sum-exp, as supcon.py's: per row a running max m, the sum
s = sum exp(t - m) and Gn = sum exp(t - m) r, rescaled by exp(m_old - m_new) when m grows;
each split writes its (m, s, counts, Gn). A merge kernel combines the splits' (m, s) in split
order into LZ (deterministic). The positives kernel then, with LZ known, scans the reference
*labels* only per anchor tile and split, lists the columns sharing a label with some anchor
of the tile (_common.gather_candidates) and reads only those rows for their S
(_common.candidate_tile): the loss terms softplus(LZ - a f_p), counts, w_i and
Gp = sum_P sigmoid(LZ - a f_ip) f'_ip r_p. The last merge adds the splits in split order,
brings each split's Gn to the common max, and scales once:
    dl_i/dx_i = a (w_i Gn / s - Gp)
Rows read per anchor tile: the memory once plus the candidate rows (the columns whose label is
in the tile): with dense label matches (a memory of 2 classes) every row, two reads, as
before. A positive's S comes only from the positives kernel, a negative's only from the pass.

Backward to both sides, with g_i = dL/dl_i: grad_x = g * (forward gradient); grad_ref =
C^T X with C_ij = g_i dl_i/dS_ij from the per-row LZ, w and the negatives' max and sum (their
weights exp(t - max) / sum, not exp(t - LZ): an LZ of several hundred, tuplet_margin's scale,
rounded to fp32 would cost its 2^-24 relative error in every weight), a kernel where each program owns
a tile of reference rows and streams the anchors (the in-batch loss, B x B: it recomputes S
for every pair, after the forward's passes).

dtypes as in contrastive.py; the weights are not exact in 16 bits, so with a 16-bit
reference they enter the tensor cores in 16-bit limbs (_common.dot_acc).
"""
import math

import torch
import triton
import triton.language as tl

from . import _common
from ._common import anchor_program, anchor_tile, candidate_program, candidate_tile, dot_acc, log1p
from ._common import memory_tile, pair_sets
from ._common import ref_grad_acc, reference_block, scores
from ._common import FWD_CONFIGS as _POS_CONFIGS
from ._common import TWO_ACC_FWD_CONFIGS as _FWD_CONFIGS

# The positives kernel: one accumulator (Gp), the tile's weights and the software pipeline's
# buffers of its gathers (list -> labels, rows), counted as more temporaries (ptxas for sm_90).
_POS_PRUNE = _common.prune_configs("BLOCK_B", "BLOCK_K", "B", 512, acc_tiles=1, temps=12)
# Register tiles: Gp and Gn plus the tile's weights; IEEE fp32 (FMA) dots spill beyond 16 x 16
# (ptxas for sm_90, as multi_similarity's). The reference-side kernel holds one accumulator and
# the weights (hi, lo).
_FWD_PRUNE = _common.prune_configs("BLOCK_B", "BLOCK_K", "B", 256, acc_tiles=2, temps=6,
                                    budgets=_common.TWO_ACC_BUDGETS)
_REF_PRUNE = _common.prune_configs("BLOCK_K", "BLOCK_B", "n", 256, acc_tiles=1, temps=6,
                                    fp32_product_when_limbed=True, budgets=_common.REF_BUDGETS)


@triton.jit
def _softplus(u):
    # log(1 + e^u) = max(u, 0) + log1p(e^-|u|); 0 at u = -inf (no negatives)
    return tl.maximum(u, 0.0) + log1p(tl.exp(-tl.abs(u)))


@triton.jit
def _sigmoid(u):
    # 1 / (1 + e^-u): 0 at u = -inf, 1 for large u (e^-u underflows); no inf / inf
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def _positive_logit(sim, inv_tau, cos_m, sin_m, ANGULAR: tl.constexpr):
    """(a f(S), f'(S)): f(S) = S, or with ANGULAR cos(acos(S) - m) (CONTRACT.md section 1,
    tuplet_margin: sin(theta) = 0 where 1 - S^2 <= 2^-16, f' = cos m there)."""
    logit = sim * inv_tau
    slope = 1.0
    if ANGULAR:
        t2 = (1.0 - sim) * (1.0 + sim)
        above = t2 > 0.0000152587890625  # 2^-16
        sin_t = tl.where(above, tl.sqrt(tl.where(above, t2, 1.0)), 0.0)
        logit = (sim * cos_m + sin_t * sin_m) * inv_tau
        slope = cos_m - tl.where(above, sim * sin_m / tl.where(above, sin_t, 1.0), 0.0)
    return logit, slope


@triton.jit
def _pair_weights(sim, pos, neg, lz, shift, inv_tau, cos_m, sin_m, ANGULAR: tl.constexpr):
    """sigmoid(LZ - a f) f' on the positives, exp(t - shift) on the negatives (<= 1, shift the
    row's largest t over N_i: exp(t - LZ) times the sum, without the rounding of an LZ of several
    hundred), 0 elsewhere; and the positives' loss terms. Rows without negatives (LZ = -inf) get
    all zeros."""
    t = sim * inv_tau
    logit, slope = _positive_logit(sim, inv_tau, cos_m, sin_m, ANGULAR)
    u = lz[:, None] - logit
    sp = tl.where(pos, _sigmoid(u) * slope, 0.0)
    term = tl.where(pos, _softplus(u), 0.0)
    en = tl.where(neg, tl.exp(tl.where(neg, t - shift[:, None], float("-inf"))), 0.0)
    return sp, en, term


@triton.jit
def ntxent_stats_merge_kernel(stats_ws, lz_ptr, shift_ptr, inv_sum_ptr, B, splits, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    for p in range(0, splits):  # the max is exact: any order
        m = tl.maximum(m, tl.load(stats_ws + p * 2 * B + rows64, mask=row_ok, other=float("-inf")))
    shift = tl.where(m == float("-inf"), 0.0, m)
    s = tl.zeros([ROWS], dtype=tl.float32)
    for p in range(0, splits):  # split order, always: the result does not depend on timing
        stat = p * 2 * B + rows64
        s += tl.exp(tl.load(stats_ws + stat, mask=row_ok, other=float("-inf")) - shift) * \
            tl.load(stats_ws + stat + B, mask=row_ok, other=0.0)
    # a row with a negative has s >= 1 (its largest term is exp(0))
    lz = tl.where(m == float("-inf"), float("-inf"), shift + tl.log(tl.where(m == float("-inf"), 1.0, s)))
    tl.store(lz_ptr + rows64, lz, mask=row_ok)
    tl.store(shift_ptr + rows64, shift, mask=row_ok)  # for the reference-side gradient
    tl.store(inv_sum_ptr + rows64, tl.where(s > 0.0, 1.0 / s, 0.0), mask=row_ok)


@triton.autotune(configs=_common.autotune_configs(_FWD_CONFIGS),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "NEED_GRAD", "PRECISION", "X_LIMBS"],
                 prune_configs_by={"early_config_prune": _FWD_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def ntxent_fwd_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, stats_ws, counts_ws, gn_ws,
                      B, D, n, cols_per_split, inv_tau, pos_thr, B_BUCKET, COLS_BUCKET,
                      HAS_SELF_INDEX: tl.constexpr, NEED_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                      X_LIMBS: tl.constexpr, W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_s = tl.program_id(1)
    rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col = anchor_program(
        x_ptr, y_ptr, r_ptr, si_ptr, B, D, HAS_SELF_INDEX, X_LIMBS, LO_SCALE, BLOCK_D, BLOCK_B)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_B], dtype=tl.float32)
    nneg = tl.zeros([BLOCK_B], dtype=tl.int32)
    gn = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols, col_ok, r, zj, sim = memory_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, k0, col_end, dims, dim_ok, D,
                                               PRECISION, BLOCK_K, X_LIMBS, LO_SCALE)
        _, _, neg = pair_sets(sim, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        t = sim * inv_tau
        m_new = tl.maximum(m, tl.max(tl.where(neg, t, float("-inf")), axis=1))
        # rows without a negative yet (m_new = -inf) shift by 0: no inf - inf, their sums stay 0
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - shift)
        e = tl.where(neg, tl.exp(t - shift[:, None]), 0.0)
        s = s * scale + tl.sum(e, axis=1)
        m = m_new
        nneg += tl.sum(neg.to(tl.int32), axis=1)
        if NEED_GRAD:
            gn *= scale[:, None]
            gn = dot_acc(e, r, gn, W_LIMBS, PRECISION)
    out = pid_s.to(tl.int64) * B + rows64
    stat = pid_s.to(tl.int64) * 2 * B + rows64  # stats_ws is (splits, 2, B): max, sum
    tl.store(stats_ws + stat, m, mask=row_ok)
    tl.store(stats_ws + stat + B, s, mask=row_ok)
    tl.store(counts_ws + 2 * out + 1, nneg, mask=row_ok)
    if NEED_GRAD:
        tl.store(gn_ws + out[:, None] * D + dims[None, :], gn, mask=row_ok[:, None] & dim_ok[None, :])


@triton.autotune(configs=_common.autotune_configs(_POS_CONFIGS),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "NEED_GRAD", "PRECISION", "X_LIMBS", "ANGULAR"],
                 prune_configs_by={"early_config_prune": _POS_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def ntxent_pos_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, idx_ws, lz_ptr, sums_ws, counts_ws, gp_ws,
                      B, D, n, cols_per_split, splits, inv_tau, cos_m, sin_m, pos_thr, B_BUCKET, COLS_BUCKET,
                      ANGULAR: tl.constexpr, HAS_SELF_INDEX: tl.constexpr, NEED_GRAD: tl.constexpr,
                      PRECISION: tl.constexpr,
                      X_LIMBS: tl.constexpr, W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_s, rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col, idx_ptr, count = candidate_program(
        x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, idx_ws, B, D, n, cols_per_split, splits, HAS_SELF_INDEX, X_LIMBS,
        LO_SCALE, BLOCK_D, BLOCK_B, BLOCK_K)
    lz = tl.load(lz_ptr + rows64, mask=row_ok, other=float("-inf"))
    loss = tl.zeros([BLOCK_B], dtype=tl.float32)
    w = tl.zeros([BLOCK_B], dtype=tl.float32)
    npos = tl.zeros([BLOCK_B], dtype=tl.int32)
    gp = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, count, BLOCK_K):
        same, r, sim = candidate_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, idx_ptr, c0, count, yi, self_col, row_ok,
                                      dims, dim_ok, D, PRECISION, HAS_SELF_INDEX, BLOCK_K, X_LIMBS, LO_SCALE)
        pos = same & (sim < pos_thr)
        logit, slope = _positive_logit(sim, inv_tau, cos_m, sin_m, ANGULAR)
        u = lz[:, None] - logit
        sp = tl.where(pos, _sigmoid(u), 0.0)
        loss += tl.sum(tl.where(pos, _softplus(u), 0.0), axis=1)
        w += tl.sum(sp, axis=1)
        npos += tl.sum(pos.to(tl.int32), axis=1)
        if NEED_GRAD:
            gp = dot_acc(sp * slope, r, gp, W_LIMBS, PRECISION)
    out = pid_s.to(tl.int64) * B + rows64
    stat = pid_s.to(tl.int64) * 2 * B + rows64  # sums_ws is (splits, 2, B): loss, w
    tl.store(sums_ws + stat, loss, mask=row_ok)
    tl.store(sums_ws + stat + B, w, mask=row_ok)
    tl.store(counts_ws + 2 * out, npos, mask=row_ok)
    if NEED_GRAD:
        tl.store(gp_ws + out[:, None] * D + dims[None, :], gp, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def ntxent_merge_kernel(stats_ws, sums_ws, counts_ws, gp_ws, gn_ws, loss_ptr, counts_ptr, grad_ptr, w_ptr,
                        B, D, splits, inv_tau, NEED_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    gmask = row_ok[:, None] & (dims < D)[None, :]
    m = tl.full([ROWS], float("-inf"), tl.float32)
    for p in range(0, splits):  # the max is exact: any order
        m = tl.maximum(m, tl.load(stats_ws + p * 2 * B + rows64, mask=row_ok, other=float("-inf")))
    shift = tl.where(m == float("-inf"), 0.0, m)
    s = tl.zeros([ROWS], dtype=tl.float32)
    loss = tl.zeros([ROWS], dtype=tl.float32)
    w = tl.zeros([ROWS], dtype=tl.float32)
    npos = tl.zeros([ROWS], dtype=tl.int32)
    nneg = tl.zeros([ROWS], dtype=tl.int32)
    gp = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    gn = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for p in range(0, splits):  # split order, always: the result does not depend on timing
        stat = p * 2 * B + rows64
        scale = tl.exp(tl.load(stats_ws + stat, mask=row_ok, other=float("-inf")) - shift)
        s += scale * tl.load(stats_ws + stat + B, mask=row_ok, other=0.0)
        loss += tl.load(sums_ws + stat, mask=row_ok, other=0.0)
        w += tl.load(sums_ws + stat + B, mask=row_ok, other=0.0)
        out = p * B + rows64
        npos += tl.load(counts_ws + 2 * out, mask=row_ok, other=0)
        nneg += tl.load(counts_ws + 2 * out + 1, mask=row_ok, other=0)
        if NEED_GRAD:
            gp += tl.load(gp_ws + out[:, None] * D + dims[None, :], mask=gmask, other=0.0)
            gn += scale[:, None] * tl.load(gn_ws + out[:, None] * D + dims[None, :], mask=gmask, other=0.0)
    tl.store(loss_ptr + rows64, loss, mask=row_ok)
    tl.store(counts_ptr + 2 * rows64, npos, mask=row_ok)
    tl.store(counts_ptr + 2 * rows64 + 1, nneg, mask=row_ok)
    tl.store(w_ptr + rows64, w, mask=row_ok)  # for the reference-side gradient
    if NEED_GRAD:
        # Gn / s = sum_N exp(t - LZ) r; a row without negatives has s = 0, Gn = 0 and w = 0
        grad = (w[:, None] * (gn / tl.where(s > 0.0, s, 1.0)[:, None]) - gp) * inv_tau
        tl.store(grad_ptr + rows64[:, None] * D + dims[None, :], grad, mask=gmask)


@triton.autotune(configs=_common.autotune_configs(_common.REF_CONFIGS, "BLOCK_K", "BLOCK_B"),
                 key=["D", "B_BUCKET", "N_BUCKET", "PRECISION", "X_LIMBS", "ANGULAR"],
                 prune_configs_by={"early_config_prune": _REF_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def ntxent_ref_grad_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, lz_ptr, shift_ptr, gp_ptr, gn_ptr, gref_ptr,
                           B, D, n, inv_tau, cos_m, sin_m, pos_thr, B_BUCKET, N_BUCKET,
                           ANGULAR: tl.constexpr, HAS_SELF_INDEX: tl.constexpr, PRECISION: tl.constexpr, X_LIMBS: tl.constexpr,
                           W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    cols, col_ok, dims, dim_ok, col_off, r, zj = reference_block(r_ptr, z_ptr, n, D, BLOCK_D, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        x, x_hi, x_mid, x_lo, yi, self_col = anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D,
                                                         r_ptr.dtype.element_ty, HAS_SELF_INDEX, X_LIMBS, LO_SCALE)
        lz = tl.load(lz_ptr + rows, mask=row_ok, other=float("-inf"))
        shift = tl.load(shift_ptr + rows, mask=row_ok, other=0.0)
        cp = tl.load(gp_ptr + rows, mask=row_ok, other=0.0)  # g a
        cn = tl.load(gn_ptr + rows, mask=row_ok, other=0.0)  # g w a / sum_N exp(t - shift)
        sim = scores(x_hi, x_mid, x_lo, r, PRECISION, X_LIMBS, LO_SCALE)
        _, pos, neg = pair_sets(sim, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        sp, en, _ = _pair_weights(sim, pos, neg, lz, shift, inv_tau, cos_m, sin_m, ANGULAR)
        c = en * cn[:, None] - sp * cp[:, None]
        acc = ref_grad_acc(tl.trans(c), x, x_hi, acc, X_LIMBS, W_LIMBS, PRECISION)
    tl.store(gref_ptr + col_off, acc, mask=col_ok[:, None] & dim_ok[None, :])


# The autotuned kernels: launch_problem() asks their prunes whether a shape can launch.
KERNELS = (ntxent_fwd_kernel, ntxent_pos_kernel, ntxent_ref_grad_kernel)


def positive_logit(scale, margin=None):
    """The kernels' arguments for the positives' logits: scale S (ntxent: scale = 1 / tau), or
    with `margin` (radians) scale cos(acos(S) - margin) (tuplet_margin)."""
    angular = margin is not None
    return dict(inv_tau=float(scale), cos_m=math.cos(margin) if angular else 1.0,
                sin_m=math.sin(margin) if angular else 0.0, ANGULAR=angular)


def forward(call, logit, pos_eps, need_grad, splits):
    """The op's outputs plus per-row LZ (-inf for rows without negatives), w, and the shift
    and 1 / sum of the negatives' exp(t - shift), for the positives' logits `logit`
    (positive_logit())."""
    loss, grad, counts = call.outputs(need_grad)
    lz, w, shift, inv_sum = (call.f32(call.B) for _ in range(4))
    if call.B == 0:
        return loss, grad, counts, lz, w, shift, inv_sum
    B = call.B
    splits = call.plan(_FWD_CONFIGS, splits)
    need_grad = bool(need_grad)
    # pos_thr > 1 for a negative pos_eps: every same-label column is a positive
    scalars = dict(inv_tau=logit["inv_tau"], pos_thr=1.0 - float(pos_eps))
    ws = dict(stats_ws=call.workspace(2, B), sums_ws=call.workspace(2, B),
              counts_ws=call.workspace(B, 2, dtype=torch.int32), gp_ws=call.grad_workspace(grad, need_grad),
              gn_ws=call.grad_workspace(grad, need_grad))
    call.split_k(ntxent_fwd_kernel, ntxent_stats_merge_kernel, lz_ptr=lz, shift_ptr=shift, inv_sum_ptr=inv_sum,
                 NEED_GRAD=need_grad, **ws, **scalars)
    call.stream(ntxent_pos_kernel, idx_ws=_common.candidate_ws(B, splits, call.args["cols_per_split"], call.x.device),
                lz_ptr=lz, NEED_GRAD=need_grad, **ws, **logit, pos_thr=scalars["pos_thr"])
    call.merge(ntxent_merge_kernel, loss_ptr=loss, counts_ptr=counts, grad_ptr=grad, w_ptr=w, NEED_GRAD=need_grad,
               **ws, **scalars)
    return loss, grad, counts, lz, w, shift, inv_sum


def backward(call, logit, pos_eps, grad_rows):
    """(grad_x, grad_ref) for the loss sum_i grad_rows[i] l_i."""
    g = call.grad_rows(grad_rows)
    _, grad, _, lz, w, shift, inv_sum = forward(call, logit, pos_eps, True, None)
    gp = g * logit["inv_tau"]
    return call.ref_grad(ntxent_ref_grad_kernel, grad, g, lz_ptr=lz, shift_ptr=shift, gp_ptr=gp,
                         gn_ptr=gp * w * inv_sum, **logit, pos_thr=1.0 - float(pos_eps))


def _check_temperature(temperature):
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")


def ntxent_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, temperature, pos_eps, need_grad,
                      allow_tf32, splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    _check_temperature(temperature)
    call = _common.LossCall(KERNELS, "ntxent", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    return forward(call, positive_logit(1.0 / float(temperature)), pos_eps, need_grad, splits)[:3]


def ntxent_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, temperature, pos_eps, grad_rows,
                      allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    _check_temperature(temperature)
    call = _common.LossCall(KERNELS, "ntxent", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    return backward(call, positive_logit(1.0 / float(temperature)), pos_eps, grad_rows)
