"""Fused multi-similarity loss over a reference set (DESIGN.md section 1), Triton kernels.

    P~_i = { j in P_i : S_ij - mm < max_{N_i} S },   N~_i = { j in N_i : S_ij + mm > min_{P_i} S }
    l_i = 1/alpha log(1 + sum_{P~_i} exp(-alpha (S_ij - base)))
        + 1/beta  log(1 + sum_{N~_i} exp( beta (S_ij - base)))      (0 if any set is empty)

Pass 1 (stats kernel) streams the reference for min positive / max negative per row; each
split writes its own and the exact min / max merge in any order (one torch reduction).
They give each sum's largest exponent in advance, shift_p = -alpha (min_pos - base),
shift_n = beta (max_neg - base), so pass 2 (forward kernel) recomputes S per tile and sums
weights w = exp(a - shift) <= 1 (no running maximum; the largest mined weight is 1, so the
sums are >= 1 for active rows), accumulating the weighted rows Gp = sum w_p r and
Gn = sum w_n r for the gradient. A finish kernel adds the splits in split order (deterministic) and scales once:
    dl_i/dx_i = fp_i Gp + fn_i Gn,  fp = -1 / (exp(-shift_p) + sum_p),  fn = 1 / (exp(-shift_n) + sum_n)
Mined-set membership is a constant for the gradient.

Backward to both sides, with g_i = dL/dl_i: grad_x = g * (forward gradient); grad_ref =
C^T X with C_ij = g_i (fp_i w_p,ij + fn_i w_n,ij), a kernel where each program owns a tile of
reference rows and streams the anchors with their forward statistics.

dtypes as in contrastive.py; the weights are not exact in 16 bits, so with a 16-bit
reference they enter the tensor cores in 16-bit parts (_common.dot_acc).
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import anchor_tile, dot_acc, memory_tile, pair_sets, ref_grad_acc, reference_block, scores
from ._common import TWO_ACC_FWD_CONFIGS as _FWD_CONFIGS
from .contrastive import _INTERP_FWD, _INTERP_REF, _REF_CONFIGS

_STATS_PRUNE = _common.prune_configs("BLOCK_B", "BLOCK_K", "B", 2048)
# Register tiles: Gp and Gn plus the tile's weights; IEEE fp32 (FMA) dots spill beyond 16 x 32
# (ptxas for sm_90). The reference-side kernels hold one accumulator and the weights (hi, lo).
_FWD_PRUNE = _common.prune_configs("BLOCK_B", "BLOCK_K", "B", 512, acc_tiles=3)
_REF_PRUNE = _common.prune_configs("BLOCK_K", "BLOCK_B", "n", 256, acc_tiles=3)


@triton.jit
def _mined_weights(sim, pos, neg, min_pos, max_neg, alpha, beta, base, mining_margin):
    """Shifted weights of the mined pairs (0 elsewhere), each <= 1."""
    shift_p = -alpha * (min_pos - base)  # -inf for rows without positives (shift_p) or negatives
    shift_n = beta * (max_neg - base)    # (shift_n): then nothing is mined and the weights are 0
    mined_p = pos & (sim - mining_margin < max_neg[:, None])
    mined_n = neg & (sim + mining_margin > min_pos[:, None])
    wp = tl.where(mined_p, tl.exp(-alpha * (sim - base) - shift_p[:, None]), 0.0)
    wn = tl.where(mined_n, tl.exp(beta * (sim - base) - shift_n[:, None]), 0.0)
    return mined_p, mined_n, wp, wn


@triton.autotune(configs=_common.autotune_configs(_FWD_CONFIGS, _INTERP_FWD, "BLOCK_B", "BLOCK_K"),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "PRECISION", "X_PARTS"],
                 prune_configs_by={"early_config_prune": _STATS_PRUNE})
@triton.jit
def ms_stats_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, stats_ws, B, D, n, cols_per_split, pos_thr,
                    B_BUCKET, COLS_BUCKET, HAS_SELF_INDEX: tl.constexpr, PRECISION: tl.constexpr,
                    X_PARTS: tl.constexpr, LO_SCALE: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_s = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    _, x_hi, x_mid, x_lo, yi, self_col = anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D,
                                                      r_ptr.dtype.element_ty, HAS_SELF_INDEX, X_PARTS, LO_SCALE)
    min_pos = tl.full([BLOCK_B], float("inf"), tl.float32)
    max_neg = tl.full([BLOCK_B], float("-inf"), tl.float32)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols, col_ok, r, zj, sim = memory_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, k0, col_end, dims, dim_ok, D,
                                               PRECISION, BLOCK_K, X_PARTS, LO_SCALE)
        _, pos, neg = pair_sets(sim, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        min_pos = tl.minimum(min_pos, tl.min(tl.where(pos, sim, float("inf")), axis=1))
        max_neg = tl.maximum(max_neg, tl.max(tl.where(neg, sim, float("-inf")), axis=1))
    stat = pid_s.to(tl.int64) * 2 * B + rows.to(tl.int64)  # stats_ws is (splits, 2, B)
    tl.store(stats_ws + stat, min_pos, mask=row_ok)
    tl.store(stats_ws + stat + B, max_neg, mask=row_ok)


@triton.autotune(configs=_common.autotune_configs(_FWD_CONFIGS, _INTERP_FWD, "BLOCK_B", "BLOCK_K"),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "NEED_GRAD", "PRECISION", "X_PARTS"],
                 prune_configs_by={"early_config_prune": _FWD_PRUNE})
@triton.jit
def ms_fwd_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, stats_ptr, sums_ws, counts_ws, gp_ws, gn_ws,
                  B, D, n, cols_per_split, alpha, beta, base, mining_margin, pos_thr, B_BUCKET, COLS_BUCKET,
                  HAS_SELF_INDEX: tl.constexpr, NEED_GRAD: tl.constexpr, PRECISION: tl.constexpr,
                  X_PARTS: tl.constexpr, W_PARTS: tl.constexpr, LO_SCALE: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_s = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    _, x_hi, x_mid, x_lo, yi, self_col = anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D,
                                                      r_ptr.dtype.element_ty, HAS_SELF_INDEX, X_PARTS, LO_SCALE)
    min_pos = tl.load(stats_ptr + rows64, mask=row_ok, other=float("inf"))
    max_neg = tl.load(stats_ptr + B + rows64, mask=row_ok, other=float("-inf"))
    sum_p = tl.zeros([BLOCK_B], dtype=tl.float32)
    sum_n = tl.zeros([BLOCK_B], dtype=tl.float32)
    npos = tl.zeros([BLOCK_B], dtype=tl.int32)
    nneg = tl.zeros([BLOCK_B], dtype=tl.int32)
    gp = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    gn = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols, col_ok, r, zj, sim = memory_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, k0, col_end, dims, dim_ok, D,
                                               PRECISION, BLOCK_K, X_PARTS, LO_SCALE)
        _, pos, neg = pair_sets(sim, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        mined_p, mined_n, wp, wn = _mined_weights(sim, pos, neg, min_pos, max_neg, alpha, beta, base,
                                                  mining_margin)
        sum_p += tl.sum(wp, axis=1)
        sum_n += tl.sum(wn, axis=1)
        npos += tl.sum(mined_p.to(tl.int32), axis=1)
        nneg += tl.sum(mined_n.to(tl.int32), axis=1)
        if NEED_GRAD:
            gp = dot_acc(wp, r, gp, W_PARTS, LO_SCALE, PRECISION)
            gn = dot_acc(wn, r, gn, W_PARTS, LO_SCALE, PRECISION)
    out = pid_s.to(tl.int64) * B + rows64
    stat = pid_s.to(tl.int64) * 2 * B + rows64  # sums_ws is (splits, 2, B)
    tl.store(sums_ws + stat, sum_p, mask=row_ok)
    tl.store(sums_ws + stat + B, sum_n, mask=row_ok)
    tl.store(counts_ws + 2 * out, npos, mask=row_ok)
    tl.store(counts_ws + 2 * out + 1, nneg, mask=row_ok)
    if NEED_GRAD:
        gmask = row_ok[:, None] & dim_ok[None, :]
        tl.store(gp_ws + out[:, None] * D + dims[None, :], gp, mask=gmask)
        tl.store(gn_ws + out[:, None] * D + dims[None, :], gn, mask=gmask)


@triton.jit
def _log1p(u):
    # log(1 + u) accurate for small u (Goldberg): the rounding of 1 + u cancels in the ratio
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _log1p_shifted(s, shift):
    # log(1 + s e^shift) without overflow
    pos = shift > 0
    return tl.where(pos, shift + tl.log(tl.exp(-tl.where(pos, shift, 0.0)) + s),
                    _log1p(s * tl.exp(tl.where(pos, 0.0, shift))))


@triton.jit
def ms_finish_kernel(stats_ptr, sums_ws, counts_ws, gp_ws, gn_ws, loss_ptr, counts_ptr, grad_ptr, rowstats_ptr,
                     B, D, splits, alpha, beta, base,
                     NEED_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    gmask = row_ok[:, None] & (dims < D)[None, :]
    min_pos = tl.load(stats_ptr + rows64, mask=row_ok, other=float("inf"))
    max_neg = tl.load(stats_ptr + B + rows64, mask=row_ok, other=float("-inf"))
    sum_p = tl.zeros([ROWS], dtype=tl.float32)
    sum_n = tl.zeros([ROWS], dtype=tl.float32)
    npos = tl.zeros([ROWS], dtype=tl.int32)
    nneg = tl.zeros([ROWS], dtype=tl.int32)
    gp = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    gn = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for p in range(0, splits):  # split order, always: the result does not depend on timing
        stat = p * 2 * B + rows64
        sum_p += tl.load(sums_ws + stat, mask=row_ok, other=0.0)
        sum_n += tl.load(sums_ws + stat + B, mask=row_ok, other=0.0)
        out = p * B + rows64
        npos += tl.load(counts_ws + 2 * out, mask=row_ok, other=0)
        nneg += tl.load(counts_ws + 2 * out + 1, mask=row_ok, other=0)
        if NEED_GRAD:
            gp += tl.load(gp_ws + out[:, None] * D + dims[None, :], mask=gmask, other=0.0)
            gn += tl.load(gn_ws + out[:, None] * D + dims[None, :], mask=gmask, other=0.0)
    # Mined sets non-empty implies finite min_pos and max_neg (and sums >= 1).
    active = (npos > 0) & (nneg > 0)
    shift_p = tl.where(active, -alpha * (min_pos - base), 0.0)
    shift_n = tl.where(active, beta * (max_neg - base), 0.0)
    loss = _log1p_shifted(sum_p, shift_p) / alpha + _log1p_shifted(sum_n, shift_n) / beta
    fp = tl.where(active, -1.0 / (tl.exp(-shift_p) + sum_p), 0.0)
    fn = tl.where(active, 1.0 / (tl.exp(-shift_n) + sum_n), 0.0)
    tl.store(loss_ptr + rows64, tl.where(active, loss, 0.0), mask=row_ok)
    tl.store(counts_ptr + 2 * rows64, tl.where(active, npos, 0), mask=row_ok)
    tl.store(counts_ptr + 2 * rows64 + 1, tl.where(active, nneg, 0), mask=row_ok)
    # For the reference-side gradient: (min_pos, max_neg, fp, fn) per row.
    tl.store(rowstats_ptr + 4 * rows64, min_pos, mask=row_ok)
    tl.store(rowstats_ptr + 4 * rows64 + 1, max_neg, mask=row_ok)
    tl.store(rowstats_ptr + 4 * rows64 + 2, fp, mask=row_ok)
    tl.store(rowstats_ptr + 4 * rows64 + 3, fn, mask=row_ok)
    if NEED_GRAD:
        tl.store(grad_ptr + rows64[:, None] * D + dims[None, :], fp[:, None] * gp + fn[:, None] * gn, mask=gmask)


@triton.autotune(configs=_common.autotune_configs(_REF_CONFIGS, _INTERP_REF, "BLOCK_K", "BLOCK_B"),
                 key=["D", "B_BUCKET", "N_BUCKET", "PRECISION", "X_PARTS"],
                 prune_configs_by={"early_config_prune": _REF_PRUNE})
@triton.jit
def ms_ref_grad_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, rowstats_ptr, g_ptr, gref_ptr,
                       B, D, n, alpha, beta, base, mining_margin, pos_thr, B_BUCKET, N_BUCKET,
                       HAS_SELF_INDEX: tl.constexpr, PRECISION: tl.constexpr, X_PARTS: tl.constexpr,
                       W_PARTS: tl.constexpr, LO_SCALE: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    cols, col_ok, dims, dim_ok, col_off, r, zj = reference_block(r_ptr, z_ptr, n, D, BLOCK_D, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        x, x_hi, x_mid, x_lo, yi, self_col = anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D,
                                                         r_ptr.dtype.element_ty, HAS_SELF_INDEX, X_PARTS, LO_SCALE)
        st = rowstats_ptr + 4 * rows.to(tl.int64)
        min_pos = tl.load(st, mask=row_ok, other=float("inf"))
        max_neg = tl.load(st + 1, mask=row_ok, other=float("-inf"))
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        cp = g * tl.load(st + 2, mask=row_ok, other=0.0)  # 0 for inactive rows
        cn = g * tl.load(st + 3, mask=row_ok, other=0.0)
        sim = scores(x_hi, x_mid, x_lo, r, PRECISION, X_PARTS, LO_SCALE)
        _, pos, neg = pair_sets(sim, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        _, _, wp, wn = _mined_weights(sim, pos, neg, min_pos, max_neg, alpha, beta, base, mining_margin)
        c = wp * cp[:, None] + wn * cn[:, None]
        acc = ref_grad_acc(tl.trans(c), x, x_hi, acc, X_PARTS, W_PARTS, LO_SCALE, PRECISION)
    tl.store(gref_ptr + col_off, acc, mask=col_ok[:, None] & dim_ok[None, :])


def _forward(x, labels, ref, ref_labels, si, ref_valid, alpha, beta, base, mining_margin, pos_eps, need_grad,
             allow_tf32, splits):
    """The op's outputs plus per-row (min_pos, max_neg, fp, fn) as a (B, 4) f32 tensor."""
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"alpha, beta: expected > 0, got {alpha} and {beta}")
    B, D = x.shape
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    loss = torch.empty(B, **f32)
    rowstats = torch.empty(B, 4, **f32)
    counts = torch.empty(B, 2, dtype=torch.int32, device=dev)
    grad = torch.empty(B, D, **f32) if need_grad else torch.empty(0, **f32)
    if B == 0:
        return loss, grad, counts, rowstats
    splits, cols = _common.split_plan(B, ref_valid, dev, _FWD_CONFIGS, _INTERP_FWD, splits)
    stats_ws = torch.empty(splits, 2, B, **f32)
    sums_ws = torch.empty(splits, 2, B, **f32)
    counts_ws = torch.empty(splits, B, 2, dtype=torch.int32, device=dev)
    gp_ws = torch.empty(splits, B, D, **f32) if need_grad else grad
    gn_ws = torch.empty(splits, B, D, **f32) if need_grad else grad
    prm = (float(alpha), float(beta), float(base))
    pos_thr = 1.0 - float(pos_eps)
    split = _common.operand_split(x.dtype, ref.dtype)
    common = dict(HAS_SELF_INDEX=si is not None, PRECISION=_common.precision(allow_tf32),
                  BLOCK_D=_common.block_d(D), X_PARTS=split["X_PARTS"], LO_SCALE=split["LO_SCALE"])
    si_arg = si if si is not None else labels
    grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), splits)  # noqa: E731
    with _common.device_guard(x):
        ms_stats_kernel[grid](x, labels, ref, ref_labels, si_arg, stats_ws, B, D, ref_valid, cols, pos_thr,
                              _common.bucket(B), _common.bucket(cols), **common)
        # min / max are exact: merging the splits in any order gives the same statistics
        stats = torch.stack([stats_ws[:, 0].amin(0), stats_ws[:, 1].amax(0)])
        ms_fwd_kernel[grid](x, labels, ref, ref_labels, si_arg, stats, sums_ws, counts_ws, gp_ws, gn_ws,
                            B, D, ref_valid, cols, *prm, float(mining_margin), pos_thr, _common.bucket(B),
                            _common.bucket(cols), NEED_GRAD=bool(need_grad), W_PARTS=split["W_PARTS"],
                            **common)
        rows = _common.finish_rows(D)
        ms_finish_kernel[(triton.cdiv(B, rows),)](
            stats, sums_ws, counts_ws, gp_ws, gn_ws, loss, counts, grad, rowstats, B, D, splits, *prm,
            NEED_GRAD=bool(need_grad), ROWS=rows, BLOCK_D=common["BLOCK_D"], num_warps=4)
    return loss, grad, counts, rowstats


def multi_similarity_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, alpha, beta, base, mining_margin,
                                pos_eps, need_grad, allow_tf32, splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    x, labels, ref, ref_labels, si = _common.prepare_loss_inputs(x, labels, ref, ref_labels, self_index, ref_valid)
    return _forward(x, labels, ref, ref_labels, si, ref_valid, alpha, beta, base, mining_margin, pos_eps,
                    need_grad, allow_tf32, splits)[:3]


def multi_similarity_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, alpha, beta, base, mining_margin,
                                pos_eps, grad_rows, allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    x, labels, ref, ref_labels, si = _common.prepare_loss_inputs(x, labels, ref, ref_labels, self_index, ref_valid)
    B, D = x.shape
    g = _common.check_grad_rows(grad_rows, B, x.device)
    _, grad, _, rowstats = _forward(x, labels, ref, ref_labels, si, ref_valid, alpha, beta, base, mining_margin,
                                    pos_eps, True, allow_tf32, None)
    grad_x = grad.mul_(g[:, None])
    grad_ref = torch.zeros(ref.shape[0], D, dtype=torch.float32, device=x.device)
    if B == 0 or ref_valid == 0:
        return grad_x, grad_ref
    grid = lambda meta: (triton.cdiv(ref_valid, meta["BLOCK_K"]),)  # noqa: E731
    with _common.device_guard(x):
        ms_ref_grad_kernel[grid](
            x, labels, ref, ref_labels, si if si is not None else labels, rowstats, g, grad_ref,
            B, D, ref_valid, float(alpha), float(beta), float(base), float(mining_margin), 1.0 - float(pos_eps),
            _common.bucket(B), _common.bucket(ref_valid), HAS_SELF_INDEX=si is not None,
            PRECISION=_common.precision(allow_tf32), BLOCK_D=_common.block_d(D),
            **_common.operand_split(x.dtype, ref.dtype))
    return grad_x, grad_ref
