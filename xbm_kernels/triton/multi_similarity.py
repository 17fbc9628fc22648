"""Fused multi-similarity loss over a reference set (CONTRACT.md section 1), Triton kernels.

    mine:     P~_i = { j in P_i : S_ij - mm < max_{N_i} S },  N~_i = { j in N_i : S_ij + mm > min_{P_i} S }
    not mine: P~_i = P_i,  N~_i = N_i
    l_i = 1/alpha log(1 + sum_{P~_i} exp(-alpha (S_ij - base)))
        + 1/beta  log(1 + sum_{N~_i} exp( beta (S_ij - base)))
    skip_incomplete: l_i = 0 (counts 0) unless P_i, N_i, P~_i and N~_i are all non-empty;
    otherwise each term is 0 when its own mined set is empty (log(1 + empty sum)).

With mine: ONE read of the memory per step, positives first (as the CPU kernel). The
positives kernel (multi_similarity_pos_kernel), phase 1: per anchor tile and split, a scan of
the reference *labels* only lists the columns that share a label with some anchor of the
tile (_common.gather_candidates; few in a memory of many classes), then reads only those rows
and computes their S (_common.candidate_tile) for min_pos, the min over P. The pass over the
memory (forward kernel) then handles the negatives only (same-label columns skipped by
label): N~ by min_pos, a running shift_n = beta (max_neg - base) from the split's hardest
negative so far (the sum and Gn rescaled by exp(old - new) when it grows, as FlashAttention),
and max_neg per split. Phase 2 of the positives kernel (FINISH), with max_neg known, rebuilds
the same candidate lists and tiles (the same configuration: its autotune key omits the
phase), so every positive's S is the value phase 1 saw, and sums the mined positives'
weights w = exp(-alpha (S - base) - shift_p) <= 1, shift_p = -alpha (min_pos - base), and
Gp = sum w_p r. A positive's S comes only from the positives kernel and a negative's only
from the pass, so every set is decided on one value of S. Rows read per anchor tile: the
memory once, plus twice the candidate rows (the columns whose label is in the tile); with
dense label matches (a memory of 2 classes) the candidates are every row and the cost
grows to three reads, still correct.
Without mine: one pass, a running maximum per sum (shift = max so far; the sums and G
rescaled by exp(old - new) when it grows). Each split writes its (shift, sum, G) and a merge
kernel combines the splits in split order (deterministic), rescaling to the largest shift,
and scales once:
    dl_i/dx_i = fp_i Gp + fn_i Gn,  fp = -1 / (exp(-shift_p) + sum_p),  fn = 1 / (exp(-shift_n) + sum_n)
(fp, fn = 0 for a term that is switched off). Mined-set membership is a constant for the gradient.

Backward to both sides, with g_i = dL/dl_i: grad_x = g * (forward gradient); grad_ref =
C^T X with C_ij = g_i (fp_i w_p,ij + fn_i w_n,ij), a kernel where each program owns a tile of
reference rows and streams the anchors with their forward statistics (the in-batch loss, B x
B: it recomputes S for every pair, after the forward's passes).

dtypes as in contrastive.py; the weights are not exact in 16 bits, so with a 16-bit
reference they enter the tensor cores in 16-bit limbs (_common.dot_acc).
"""
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
# (ptxas for sm_90). The reference-side kernels hold one accumulator and the weights (hi, lo).
_FWD_PRUNE = _common.prune_configs("BLOCK_B", "BLOCK_K", "B", 256, acc_tiles=2, temps=6,
                                    budgets=_common.TWO_ACC_BUDGETS)
_REF_PRUNE = _common.prune_configs("BLOCK_K", "BLOCK_B", "n", 256, acc_tiles=1, temps=6,
                                    fp32_product_when_limbed=True, budgets=_common.REF_BUDGETS)


@triton.jit
def _mined_sets(sim, pos, neg, min_pos, max_neg, mining_margin, MINE: tl.constexpr):
    """P~ and N~ of a tile (P and N without mining)."""
    if MINE:
        mined_p = pos & (sim - mining_margin < max_neg[:, None])
        mined_n = neg & (sim + mining_margin > min_pos[:, None])
    else:
        mined_p = pos
        mined_n = neg
    return mined_p, mined_n


@triton.jit
def _weights(sim, mined_p, mined_n, shift_p, shift_n, alpha, beta, base):
    """Shifted weights of the mined pairs (0 elsewhere), each <= 1 when the shifts are the
    sets' largest exponents. A row whose set is empty may have shift -inf: its weights are
    masked to 0."""
    wp = tl.where(mined_p, tl.exp(-alpha * (sim - base) - shift_p[:, None]), 0.0)
    wn = tl.where(mined_n, tl.exp(beta * (sim - base) - shift_n[:, None]), 0.0)
    return wp, wn


@triton.jit
def _running_max(m, a, mined):
    """(new max, its finite stand-in, rescale of the old sums) of a running maximum m over
    the exponents a of the mined pairs: rows still without one keep -inf and shift by 0, so
    there is no inf - inf (their sums are 0 and stay 0)."""
    m_new = tl.maximum(m, tl.max(tl.where(mined, a, float("-inf")), axis=1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, shift, tl.exp(m - shift)


# No FINISH or NEED_GRAD in the key: both phases run one configuration, so the same tiles of
# the same candidate lists, and every positive's S is the same value in both.
@triton.autotune(configs=_common.autotune_configs(_POS_CONFIGS),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "PRECISION", "X_LIMBS"],
                 prune_configs_by={"early_config_prune": _POS_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def multi_similarity_pos_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, idx_ws, stats_ptr, stats_ws, sums_ws, counts_ws,
                                gp_ws, B, D, n, cols_per_split, splits, alpha, base, mining_margin, pos_thr, B_BUCKET,
                                COLS_BUCKET, HAS_SELF_INDEX: tl.constexpr, FINISH: tl.constexpr,
                                NEED_GRAD: tl.constexpr, PRECISION: tl.constexpr, X_LIMBS: tl.constexpr,
                                W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_s, rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col, idx_ptr, count = candidate_program(
        x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, idx_ws, B, D, n, cols_per_split, splits, HAS_SELF_INDEX, X_LIMBS,
        LO_SCALE, BLOCK_D, BLOCK_B, BLOCK_K)
    if FINISH:  # min_pos from phase 1, max_neg from the pass over the memory
        min_pos = tl.load(stats_ptr + rows64, mask=row_ok, other=float("inf"))
        max_neg = tl.load(stats_ptr + B + rows64, mask=row_ok, other=float("-inf"))
    else:
        min_pos = tl.full([BLOCK_B], float("inf"), tl.float32)
        max_neg = tl.full([BLOCK_B], float("-inf"), tl.float32)
    m_p = -alpha * (min_pos - base)  # the positives' largest exponent (-inf: no positive)
    sum_p = tl.zeros([BLOCK_B], dtype=tl.float32)
    npos = tl.zeros([BLOCK_B], dtype=tl.int32)
    gp = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, count, BLOCK_K):
        same, r, sim = candidate_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, idx_ptr, c0, count, yi, self_col, row_ok,
                                      dims, dim_ok, D, PRECISION, HAS_SELF_INDEX, BLOCK_K, X_LIMBS, LO_SCALE)
        pos = same & (sim < pos_thr)
        if FINISH:
            mined_p = pos & (sim - mining_margin < max_neg[:, None])
            wp = tl.where(mined_p, tl.exp(-alpha * (sim - base) - m_p[:, None]), 0.0)
            sum_p += tl.sum(wp, axis=1)
            npos += tl.sum(mined_p.to(tl.int32), axis=1)
            if NEED_GRAD:
                gp = dot_acc(wp, r, gp, W_LIMBS, PRECISION)
        else:
            min_pos = tl.minimum(min_pos, tl.min(tl.where(pos, sim, float("inf")), axis=1))
    out = pid_s.to(tl.int64) * B + rows64
    if FINISH:  # the positives' half of the forward's workspaces (the pass wrote the negatives')
        stat = pid_s.to(tl.int64) * 4 * B + rows64
        tl.store(sums_ws + stat, sum_p, mask=row_ok)
        tl.store(sums_ws + stat + 2 * B, m_p, mask=row_ok)
        tl.store(counts_ws + 2 * out, npos, mask=row_ok)
        if NEED_GRAD:
            tl.store(gp_ws + out[:, None] * D + dims[None, :], gp, mask=row_ok[:, None] & dim_ok[None, :])
    else:
        tl.store(stats_ws + pid_s.to(tl.int64) * 2 * B + rows64, min_pos, mask=row_ok)  # stats_ws is (splits, 2, B)


@triton.autotune(configs=_common.autotune_configs(_FWD_CONFIGS),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "NEED_GRAD", "PRECISION", "X_LIMBS", "MINE"],
                 prune_configs_by={"early_config_prune": _FWD_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def multi_similarity_fwd_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, stats_ptr, stats_ws, sums_ws, counts_ws, gp_ws,
                                gn_ws, B, D,
                                n, cols_per_split, alpha, beta, base, mining_margin, pos_thr, B_BUCKET, COLS_BUCKET,
                                HAS_SELF_INDEX: tl.constexpr, MINE: tl.constexpr, NEED_GRAD: tl.constexpr,
                                PRECISION: tl.constexpr, X_LIMBS: tl.constexpr, W_LIMBS: tl.constexpr,
                                LO_SCALE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    pid_s = tl.program_id(1)
    rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col = anchor_program(
        x_ptr, y_ptr, r_ptr, si_ptr, B, D, HAS_SELF_INDEX, X_LIMBS, LO_SCALE, BLOCK_D, BLOCK_B)
    if MINE:  # min_pos from the positives' phase 1; max_neg and the negatives' shift run
        min_pos = tl.load(stats_ptr + rows64, mask=row_ok, other=float("inf"))
    else:
        min_pos = tl.full([BLOCK_B], float("inf"), tl.float32)
    max_neg = tl.full([BLOCK_B], float("-inf"), tl.float32)
    m_p = tl.full([BLOCK_B], float("-inf"), tl.float32)
    m_n = tl.full([BLOCK_B], float("-inf"), tl.float32)
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
                                               PRECISION, BLOCK_K, X_LIMBS, LO_SCALE)
        _, pos, neg = pair_sets(sim, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        if MINE:
            # Negatives only (same-label columns are the positives kernel's, by label): N~ by
            # min_pos; the shift beta (max_neg - base) grows with the split's hardest negative
            # (the hardest negative is mined whenever any is, so it is the mined sum's largest
            # exponent at the end), the sum and Gn rescaled when it does.
            max_neg = tl.maximum(max_neg, tl.max(tl.where(neg, sim, float("-inf")), axis=1))
            m_new = beta * (max_neg - base)
            shift_n = tl.where(m_new == float("-inf"), 0.0, m_new)
            scale_n = tl.exp(m_n - shift_n)
            m_n = m_new
            mined_n = neg & (sim + mining_margin > min_pos[:, None])
            wn = tl.where(mined_n, tl.exp(beta * (sim - base) - shift_n[:, None]), 0.0)
            sum_n = sum_n * scale_n + tl.sum(wn, axis=1)
            nneg += tl.sum(mined_n.to(tl.int32), axis=1)
            if NEED_GRAD:
                gn = dot_acc(wn, r, gn * scale_n[:, None], W_LIMBS, PRECISION)
        else:
            mined_p, mined_n = _mined_sets(sim, pos, neg, min_pos, max_neg, mining_margin, MINE)
            m_p, shift_p, scale_p = _running_max(m_p, -alpha * (sim - base), mined_p)
            m_n, shift_n, scale_n = _running_max(m_n, beta * (sim - base), mined_n)
            wp, wn = _weights(sim, mined_p, mined_n, shift_p, shift_n, alpha, beta, base)
            sum_p *= scale_p
            sum_n *= scale_n
            if NEED_GRAD:
                gp *= scale_p[:, None]
                gn *= scale_n[:, None]
            sum_p += tl.sum(wp, axis=1)
            sum_n += tl.sum(wn, axis=1)
            npos += tl.sum(mined_p.to(tl.int32), axis=1)
            nneg += tl.sum(mined_n.to(tl.int32), axis=1)
            if NEED_GRAD:
                gp = dot_acc(wp, r, gp, W_LIMBS, PRECISION)
                gn = dot_acc(wn, r, gn, W_LIMBS, PRECISION)
    out = pid_s.to(tl.int64) * B + rows64
    stat = pid_s.to(tl.int64) * 4 * B + rows64  # sums_ws is (splits, 4, B): sum_p, sum_n, shift_p, shift_n
    gmask = row_ok[:, None] & dim_ok[None, :]
    tl.store(sums_ws + stat + B, sum_n, mask=row_ok)
    tl.store(sums_ws + stat + 3 * B, m_n, mask=row_ok)
    tl.store(counts_ws + 2 * out + 1, nneg, mask=row_ok)
    if NEED_GRAD:
        tl.store(gn_ws + out[:, None] * D + dims[None, :], gn, mask=gmask)
    if MINE:  # the positives' half comes from the positives kernel, once max_neg is known
        tl.store(stats_ws + pid_s.to(tl.int64) * 2 * B + B + rows64, max_neg, mask=row_ok)
    else:
        tl.store(sums_ws + stat, sum_p, mask=row_ok)
        tl.store(sums_ws + stat + 2 * B, m_p, mask=row_ok)
        tl.store(counts_ws + 2 * out, npos, mask=row_ok)
        if NEED_GRAD:
            tl.store(gp_ws + out[:, None] * D + dims[None, :], gp, mask=gmask)


@triton.jit
def _log1p_shifted(s, shift):
    # log(1 + s e^shift) without overflow
    pos = shift > 0
    return tl.where(pos, shift + tl.log(tl.exp(-tl.where(pos, shift, 0.0)) + s),
                    log1p(s * tl.exp(tl.where(pos, 0.0, shift))))


@triton.jit
def multi_similarity_merge_kernel(stats_ptr, sums_ws, counts_ws, gp_ws, gn_ws, loss_ptr, counts_ptr, grad_ptr,
                                  rowstats_ptr, B, D, splits, alpha, beta, MINE: tl.constexpr,
                                  SKIP_INCOMPLETE: tl.constexpr, NEED_GRAD: tl.constexpr, ROWS: tl.constexpr,
                                  BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    gmask = row_ok[:, None] & (dims < D)[None, :]
    m_p = tl.full([ROWS], float("-inf"), tl.float32)
    m_n = tl.full([ROWS], float("-inf"), tl.float32)
    for p in range(0, splits):  # the max is exact: any order
        stat = p * 4 * B + rows64
        m_p = tl.maximum(m_p, tl.load(sums_ws + stat + 2 * B, mask=row_ok, other=float("-inf")))
        m_n = tl.maximum(m_n, tl.load(sums_ws + stat + 3 * B, mask=row_ok, other=float("-inf")))
    shift_p = tl.where(m_p == float("-inf"), 0.0, m_p)  # -inf: the set is empty, its sums are 0
    shift_n = tl.where(m_n == float("-inf"), 0.0, m_n)
    sum_p = tl.zeros([ROWS], dtype=tl.float32)
    sum_n = tl.zeros([ROWS], dtype=tl.float32)
    npos = tl.zeros([ROWS], dtype=tl.int32)
    nneg = tl.zeros([ROWS], dtype=tl.int32)
    gp = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    gn = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for p in range(0, splits):  # split order, always: the result does not depend on timing
        stat = p * 4 * B + rows64
        # each split's sums to the common shift (exactly 1 with mine: every split has it)
        sc_p = tl.exp(tl.load(sums_ws + stat + 2 * B, mask=row_ok, other=float("-inf")) - shift_p)
        sc_n = tl.exp(tl.load(sums_ws + stat + 3 * B, mask=row_ok, other=float("-inf")) - shift_n)
        sum_p += sc_p * tl.load(sums_ws + stat, mask=row_ok, other=0.0)
        sum_n += sc_n * tl.load(sums_ws + stat + B, mask=row_ok, other=0.0)
        out = p * B + rows64
        npos += tl.load(counts_ws + 2 * out, mask=row_ok, other=0)
        nneg += tl.load(counts_ws + 2 * out + 1, mask=row_ok, other=0)
        if NEED_GRAD:
            gp += sc_p[:, None] * tl.load(gp_ws + out[:, None] * D + dims[None, :], mask=gmask, other=0.0)
            gn += sc_n[:, None] * tl.load(gn_ws + out[:, None] * D + dims[None, :], mask=gmask, other=0.0)
    # A term is on when its mined set is non-empty (then its shift is finite and its sum >= 1);
    # skip_incomplete needs both. With mine, P~ non-empty implies N non-empty and N~ implies P.
    on_p = npos > 0
    on_n = nneg > 0
    if SKIP_INCOMPLETE:
        on_p = on_p & on_n
        on_n = on_p
    loss = tl.where(on_p, _log1p_shifted(sum_p, shift_p) / alpha, 0.0) + \
        tl.where(on_n, _log1p_shifted(sum_n, shift_n) / beta, 0.0)
    fp = tl.where(on_p, -1.0 / (tl.exp(-shift_p) + sum_p), 0.0)
    fn = tl.where(on_n, 1.0 / (tl.exp(-shift_n) + sum_n), 0.0)
    tl.store(loss_ptr + rows64, loss, mask=row_ok)
    tl.store(counts_ptr + 2 * rows64, tl.where(on_p, npos, 0), mask=row_ok)
    tl.store(counts_ptr + 2 * rows64 + 1, tl.where(on_n, nneg, 0), mask=row_ok)
    # For the reference-side gradient, per row: (min_pos, max_neg) for the mining rule, the
    # shifts of the weights and their coefficients fp, fn.
    if MINE:
        min_pos = tl.load(stats_ptr + rows64, mask=row_ok, other=float("inf"))
        max_neg = tl.load(stats_ptr + B + rows64, mask=row_ok, other=float("-inf"))
    else:
        min_pos = tl.full([ROWS], float("inf"), tl.float32)
        max_neg = tl.full([ROWS], float("-inf"), tl.float32)
    st = rowstats_ptr + 6 * rows64
    tl.store(st, min_pos, mask=row_ok)
    tl.store(st + 1, max_neg, mask=row_ok)
    tl.store(st + 2, m_p, mask=row_ok)
    tl.store(st + 3, m_n, mask=row_ok)
    tl.store(st + 4, fp, mask=row_ok)
    tl.store(st + 5, fn, mask=row_ok)
    if NEED_GRAD:
        tl.store(grad_ptr + rows64[:, None] * D + dims[None, :], fp[:, None] * gp + fn[:, None] * gn, mask=gmask)


@triton.autotune(configs=_common.autotune_configs(_common.REF_CONFIGS, "BLOCK_K", "BLOCK_B"),
                 key=["D", "B_BUCKET", "N_BUCKET", "PRECISION", "X_LIMBS", "MINE"],
                 prune_configs_by={"early_config_prune": _REF_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def multi_similarity_ref_grad_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, rowstats_ptr, g_ptr, gref_ptr,
                                     B, D, n, alpha, beta, base, mining_margin, pos_thr, B_BUCKET, N_BUCKET,
                                     HAS_SELF_INDEX: tl.constexpr, MINE: tl.constexpr, PRECISION: tl.constexpr,
                                     X_LIMBS: tl.constexpr, W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr,
                                     BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    cols, col_ok, dims, dim_ok, col_off, r, zj = reference_block(r_ptr, z_ptr, n, D, BLOCK_D, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        x, x_hi, x_mid, x_lo, yi, self_col = anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D,
                                                         r_ptr.dtype.element_ty, HAS_SELF_INDEX, X_LIMBS, LO_SCALE)
        st = rowstats_ptr + 6 * rows.to(tl.int64)
        min_pos = tl.load(st, mask=row_ok, other=float("inf"))
        max_neg = tl.load(st + 1, mask=row_ok, other=float("-inf"))
        shift_p = tl.load(st + 2, mask=row_ok, other=float("-inf"))
        shift_n = tl.load(st + 3, mask=row_ok, other=float("-inf"))
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        cp = g * tl.load(st + 4, mask=row_ok, other=0.0)  # 0 for terms that are off
        cn = g * tl.load(st + 5, mask=row_ok, other=0.0)
        sim = scores(x_hi, x_mid, x_lo, r, PRECISION, X_LIMBS, LO_SCALE)
        _, pos, neg = pair_sets(sim, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        mined_p, mined_n = _mined_sets(sim, pos, neg, min_pos, max_neg, mining_margin, MINE)
        wp, wn = _weights(sim, mined_p, mined_n, shift_p, shift_n, alpha, beta, base)
        c = wp * cp[:, None] + wn * cn[:, None]
        acc = ref_grad_acc(tl.trans(c), x, x_hi, acc, X_LIMBS, W_LIMBS, PRECISION)
    tl.store(gref_ptr + col_off, acc, mask=col_ok[:, None] & dim_ok[None, :])


# The autotuned kernels: launch_problem() asks their prunes whether a shape can launch.
KERNELS = (multi_similarity_pos_kernel, multi_similarity_fwd_kernel, multi_similarity_ref_grad_kernel)


def _scalars(alpha, beta, base, mining_margin, pos_eps, mine):
    if not (alpha > 0 and beta > 0):
        raise ValueError(f"alpha, beta: expected > 0, got {alpha} and {beta}")
    # pos_thr > 1 for a negative pos_eps: every same-label column is a positive
    return dict(alpha=float(alpha), beta=float(beta), base=float(base), mining_margin=float(mining_margin),
                pos_thr=1.0 - float(pos_eps), MINE=bool(mine))


def _forward(call, scalars, skip_incomplete, need_grad, splits):
    """The op's outputs plus per-row (min_pos, max_neg, shift_p, shift_n, fp, fn) as a
    (B, 6) f32 tensor."""
    loss, grad, counts = call.outputs(need_grad)
    rowstats = call.f32(call.B, 6)
    if call.B == 0:
        return loss, grad, counts, rowstats
    B = call.B
    splits = call.plan(_FWD_CONFIGS, splits)
    need_grad = bool(need_grad)
    ws = dict(sums_ws=call.workspace(4, B), counts_ws=call.workspace(B, 2, dtype=torch.int32),
              gp_ws=call.grad_workspace(grad, need_grad), gn_ws=call.grad_workspace(grad, need_grad))
    stats = call.f32(2, B)  # merged (min_pos, max_neg); not read without mine
    stats_ws = call.workspace(2, B)  # per split
    if scalars["MINE"]:
        # Positives first; min / max are exact, so torch merges the splits in any order.
        pos = dict(idx_ws=_common.candidate_ws(B, splits, call.args["cols_per_split"], call.x.device),
                   stats_ptr=stats, stats_ws=stats_ws, **ws, **scalars)
        call.stream(multi_similarity_pos_kernel, FINISH=False, NEED_GRAD=False, **pos)
        torch.amin(stats_ws[:, 0], 0, out=stats[0])
        call.stream(multi_similarity_fwd_kernel, stats_ptr=stats, stats_ws=stats_ws, NEED_GRAD=need_grad, **ws,
                    **scalars)
        torch.amax(stats_ws[:, 1], 0, out=stats[1])
        call.stream(multi_similarity_pos_kernel, FINISH=True, NEED_GRAD=need_grad, **pos)
    else:
        call.stream(multi_similarity_fwd_kernel, stats_ptr=stats, stats_ws=stats_ws, NEED_GRAD=need_grad, **ws,
                    **scalars)
    call.merge(multi_similarity_merge_kernel, stats_ptr=stats, loss_ptr=loss, counts_ptr=counts, grad_ptr=grad,
               rowstats_ptr=rowstats, SKIP_INCOMPLETE=bool(skip_incomplete), NEED_GRAD=need_grad, **ws, **scalars)
    return loss, grad, counts, rowstats


def multi_similarity_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, alpha, beta, base, mining_margin,
                                pos_eps, mine, skip_incomplete, need_grad, allow_tf32, splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    call = _common.LossCall(KERNELS, "multi_similarity", x, labels, ref, ref_labels, self_index, ref_valid,
                            allow_tf32)
    scalars = _scalars(alpha, beta, base, mining_margin, pos_eps, mine)
    return _forward(call, scalars, skip_incomplete, need_grad, splits)[:3]


def multi_similarity_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, alpha, beta, base, mining_margin,
                                pos_eps, mine, skip_incomplete, grad_rows, allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    call = _common.LossCall(KERNELS, "multi_similarity", x, labels, ref, ref_labels, self_index, ref_valid,
                            allow_tf32)
    g = call.grad_rows(grad_rows)
    scalars = _scalars(alpha, beta, base, mining_margin, pos_eps, mine)
    _, grad, _, rowstats = _forward(call, scalars, skip_incomplete, True, None)
    return call.ref_grad(multi_similarity_ref_grad_kernel, grad, g, rowstats_ptr=rowstats, g_ptr=g, **scalars)
