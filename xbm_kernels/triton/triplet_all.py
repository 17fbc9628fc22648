"""Fused all-triplets margin loss over a reference set (CONTRACT.md section 1), Triton kernels.

    l_i = sum_{p in P_i, n in N_i, lo < u <= hi} max(0, margin - u),  u = S_ip - S_in (fp32, as written)
    dl_i/dS_in = #active triplets with negative n,  dl_i/dS_ip = -#active triplets with positive p

Positives first, as the CPU kernel. The anchors are sorted by label (the outputs put back):
a tile of 16 then holds few labels. A gather kernel lists, per tile of 16 anchors, the columns
that share a label with one of them (the reference *labels* only: _common.gather_candidates;
few in a memory of many classes). The pass over the memory (grid: anchor tiles x splits)
takes the negatives of each memory tile (BLOCK_K columns) and meets them with the tile's
candidate list in blocks of BLOCK_K: S of the candidates by the same product, of the same
shape, as the memory tile's (_common.candidate_tile), so that a row held under two labels
gives u = 0 exactly, as one product over all columns does; every (anchor, negative, positive)
triplet of the two blocks is decided by the predicates as written (lo < u, u <= hi,
margin - u > 0) in one (16 x BLOCK_K x BLOCK_K) tile. Per block: the loss (fp64 per row), each
negative's count (summed over the blocks) and each positive's (at most BLOCK_K: exact in 16
bits). The memory tile's gradient, counts_n R_n - sum over the blocks of counts_p R_p, is
formed apart and then added to the split's: with many duplicate rows the two parts are large
integer multiples of rows that cancel, and they cancel at the tile's scale. Correct for any
number of positives (the blocks loop over the list); the work is B x n x (candidates / 16),
so it suits a memory of many classes (PML's all-triplets loss enumerates every triplet).

A merge kernel adds the splits in split order: loss rows (fp64), active triplets (int64,
saturated to int32 for the counts) and the gradient (fp64).

Backward to both sides (the in-batch loss), with g_i = dL/dl_i: grad_x = g * (forward
gradient); grad_ref = C^T X with C_ij = g_i (count as negative - count as positive). A pass
of its own (triplet_all_pos_counts_kernel) adds each positive's count into a (tiles, n, 16)
int32 table by column (integer atomics: exact, so deterministic); the
reference-side kernel owns a tile of reference rows, recomputes the negatives' counts against
each anchor tile's candidate list and reads the positives' from the table.

dtypes as in contrastive.py; the negatives' counts enter the tensor cores in limbs when they
may not be exact in 16 bits (_common.dot_acc).
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import anchor_program, anchor_tile, candidate_tile, dot_acc, gather_candidates, memory_tile, pair_sets
from ._common import ref_grad_acc, reference_block, scores

ROWS = _common.CANDIDATE_ROWS  # anchors per tile: the gather's lists are per 16 anchors
_SCAN_K = 128  # label columns per step of the gather
# (BLOCK_B = ROWS, BLOCK_K, num_warps, num_stages) of the pass, and (BLOCK_K reference rows,
# BLOCK_B = ROWS anchors, ...) of the reference side. The (16 x BLOCK_K x BLOCK_K) triplet tile
# sets the sizes (ptxas for sm_90 at D = 128): 4 warps spill, and so do 32-column tiles.
_FWD_CONFIGS = [(ROWS, 16, 8, 2), (ROWS, 16, 8, 1)]
_REF_CONFIGS = [(16, ROWS, 8, 2), (16, ROWS, 8, 1)]
# The register model of _common.prune_configs, its temporaries standing for the triplet tile,
# calibrated on ptxas for sm_90 (Triton 3.9): the pass keeps its tiles to D = 256 with 16-bit
# rows and to D = 128 with fp32 or limbed anchors; the reference side to D = 128 with 16-bit
# rows or TF32 (its IEEE fp32 product spills even there: the prune then keeps one config).
# Shared memory: the memory tile's rows and the candidates' are both staged, so the common
# model (one streamed tile) under-estimates; rows of BLOCK_D take about 3 (BLOCK_K x BLOCK_D)
# tiles of R and the anchors' operand tile (ptxas for sm_90: 1.3-2x the common model's bytes).


def _with_smem(prune, fp32_product_when_limbed=False):
    def smem_ok(c, nargs, kwargs):
        r_bytes = nargs["r_ptr"].element_size()
        x_bytes = _common.operand_bytes(nargs["x_ptr"].element_size(), r_bytes, kwargs["X_LIMBS"])
        if fp32_product_when_limbed and kwargs["X_LIMBS"] > 1:
            x_bytes += 4
        return kwargs["BLOCK_D"] * (3 * c.kwargs["BLOCK_K"] * r_bytes + ROWS * x_bytes) + 4096 <= _common.SMEM_LIMIT

    def pruned(configs, nargs, **kwargs):
        out = prune(configs, nargs, **kwargs)
        return out if _common.interpreting() else [c for c in out if smem_ok(c, nargs, kwargs)]

    pruned.fits = lambda c, nargs, **kwargs: prune.fits(c, nargs, **kwargs) and smem_ok(c, nargs, kwargs)
    return pruned


_FWD_PRUNE = _with_smem(_common.prune_configs("BLOCK_B", "BLOCK_K", "B", 256, acc_tiles=2, temps=30,
                                              budgets={"wgmma": 0, "mma4": 0, "mma8": 80, "fma4": 0, "fma8": 80}))
_REF_PRUNE = _with_smem(_common.prune_configs("BLOCK_K", "BLOCK_B", "n", 256, acc_tiles=1, temps=40,
                                              fp32_product_when_limbed=True,
                                              budgets={"wgmma": 0, "mma4": 0, "mma8": 70, "fma4": 0, "fma8": 40}),
                        fp32_product_when_limbed=True)


@triton.jit
def triplet_all_gather_kernel(y_ptr, z_ptr, si_ptr, idx_ws, count_ws, B, n, HAS_SELF_INDEX: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per tile of BLOCK_B anchors: its candidate list (columns sharing a label with one of
    them, ascending) into idx_ws[tile * n:], its length into count_ws[tile]; BLOCK_K labels
    per step."""
    tile = tl.program_id(0)
    rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    yi = tl.load(y_ptr + rows, mask=row_ok, other=0)
    self_col = rows
    if HAS_SELF_INDEX:
        self_col = tl.load(si_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    count = gather_candidates(z_ptr, yi, self_col, row_ok, 0, n, idx_ws + tile.to(tl.int64) * n, HAS_SELF_INDEX,
                              BLOCK_K)
    tl.store(count_ws + tile, count)


@triton.jit
def _triplets(sn, neg, sp, pos, margin, select_low, select_high):
    """The active triplets of a (rows x K negatives) and a (rows x P positives) block, as
    counts: per negative (rows x K) and per positive (rows x P), int32. The scalars are fp32, as
    a GPU launch passes them (the interpreter would keep Python floats in fp64)."""
    u = sp[:, None, :] - sn[:, :, None]
    lo, hi = tl.full((), select_low, tl.float32), tl.full((), select_high, tl.float32)
    m = tl.full((), margin, tl.float32)
    act = (pos[:, None, :] & neg[:, :, None]) & (u > lo) & (u <= hi) & (m - u > 0.0)
    a = act.to(tl.int32)
    return tl.sum(a, axis=2), tl.sum(a, axis=1)


@triton.autotune(configs=_common.autotune_configs(_FWD_CONFIGS),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "PRECISION", "X_LIMBS", "NEED_GRAD"],
                 prune_configs_by={"early_config_prune": _FWD_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def triplet_all_fwd_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, idx_ws, count_ws, loss_f64_ws, active_ws, grad_ws,
                           B, D, n, cols_per_split, margin, select_low, select_high, pos_thr,
                           B_BUCKET, COLS_BUCKET, HAS_SELF_INDEX: tl.constexpr, NEED_GRAD: tl.constexpr,
                           PRECISION: tl.constexpr, X_LIMBS: tl.constexpr,
                           W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    tl.static_assert(BLOCK_B == 16)  # the gather's tiles (CANDIDATE_ROWS)
    tile = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col = anchor_program(
        x_ptr, y_ptr, r_ptr, si_ptr, B, D, HAS_SELF_INDEX, X_LIMBS, LO_SCALE, BLOCK_D, BLOCK_B)
    count = tl.load(count_ws + tile)
    idx_ptr = idx_ws + tile.to(tl.int64) * n
    loss = tl.zeros([BLOCK_B], dtype=tl.float64)
    active = tl.zeros([BLOCK_B], dtype=tl.int64)
    grad = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols, col_ok, r, zj, sn = memory_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, k0, col_end, dims, dim_ok, D,
                                              PRECISION, BLOCK_K, X_LIMBS, LO_SCALE)
        _, _, neg = pair_sets(sn, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        wn = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.int32)
        g_tile = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        if tl.max(tl.max(neg.to(tl.int32), axis=1), axis=0) > 0:
            for c0 in range(0, count, BLOCK_K):
                same, rp, sp = candidate_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, idx_ptr, c0, count, yi, self_col,
                                              row_ok, dims, dim_ok, D, PRECISION, HAS_SELF_INDEX, BLOCK_K, X_LIMBS,
                                              LO_SCALE)
                pos = same & (sp < pos_thr)
                cn, cp = _triplets(sn, neg, sp, pos, margin, select_low, select_high)
                wn += cn
                # the hinge sum margin - S_ip + S_in over the block's triplets, its S_ip part
                loss -= tl.sum(cp.to(tl.float64) * sp.to(tl.float64), axis=1)
                if NEED_GRAD:  # cp <= BLOCK_K: exact in 16 bits
                    g_tile = dot_acc(-cp.to(tl.float32), rp, g_tile, 1, PRECISION)
        # ... and its S_in + margin part, in fp64 (as the CPU kernel's prefix sums)
        loss += tl.sum(wn.to(tl.float64) * (sn.to(tl.float64) + tl.full((), margin, tl.float32).to(tl.float64)), axis=1)
        active += tl.sum(wn, axis=1).to(tl.int64)
        if NEED_GRAD:
            # the memory tile's gradient apart, then added: the positives' and negatives' parts
            # cancel at the tile's scale, not at the split's (many duplicate rows)
            grad += dot_acc(wn.to(tl.float32), r, g_tile, W_LIMBS, PRECISION)
    out = pid_s.to(tl.int64) * B + rows64
    tl.store(loss_f64_ws + out, loss, mask=row_ok)
    tl.store(active_ws + out, active, mask=row_ok)
    if NEED_GRAD:
        gmask = row_ok[:, None] & dim_ok[None, :]
        tl.store(grad_ws + out[:, None] * D + dims[None, :], grad, mask=gmask)


# restore_value: the autotuner's timing runs would otherwise add into the table too
@triton.autotune(configs=_common.autotune_configs(_FWD_CONFIGS),
                 key=["D", "B_BUCKET", "COLS_BUCKET", "PRECISION", "X_LIMBS"],
                 prune_configs_by={"early_config_prune": _FWD_PRUNE}, restore_value=["pcount_ws"],
                 **_common.AUTOTUNE_OPTIONS)
@triton.jit
def triplet_all_pos_counts_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, idx_ws, count_ws, pcount_ws, B, D, n,
                                  cols_per_split, margin, select_low, select_high, pos_thr, B_BUCKET, COLS_BUCKET,
                                  HAS_SELF_INDEX: tl.constexpr, PRECISION: tl.constexpr, X_LIMBS: tl.constexpr,
                                  LO_SCALE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
                                  BLOCK_K: tl.constexpr):
    """The positives' counts for the reference side: the forward's triplets with the loops
    swapped (each block of candidates meets the split's memory tiles), so that a block's
    counts are added to the (tiles, n, 16) table once per split (integer atomics)."""
    tl.static_assert(BLOCK_B == 16)  # the gather's tiles (CANDIDATE_ROWS)
    tile = tl.program_id(0)
    rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    x, x_hi, x_mid, x_lo, yi, self_col = anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D,
                                                      r_ptr.dtype.element_ty, HAS_SELF_INDEX, X_LIMBS, LO_SCALE)
    count = tl.load(count_ws + tile)
    idx_ptr = idx_ws + tile.to(tl.int64) * n
    col_start = tl.program_id(1) * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n)
    for c0 in range(0, count, BLOCK_K):
        same, rp, sp = candidate_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, idx_ptr, c0, count, yi, self_col, row_ok,
                                      dims, dim_ok, D, PRECISION, HAS_SELF_INDEX, BLOCK_K, X_LIMBS, LO_SCALE)
        pos = same & (sp < pos_thr)
        cp = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.int32)
        for k0 in range(col_start, col_end, BLOCK_K):
            cols, col_ok, r, zj, sn = memory_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, k0, col_end, dims, dim_ok, D,
                                                  PRECISION, BLOCK_K, X_LIMBS, LO_SCALE)
            _, _, neg = pair_sets(sn, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
            cp += _triplets(sn, neg, sp, pos, margin, select_low, select_high)[1]
        k = c0 + tl.arange(0, BLOCK_K)
        pcols = tl.load(idx_ptr + k, mask=k < count, other=0)
        slot = (tile.to(tl.int64) * n + pcols.to(tl.int64))[None, :] * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
        tl.atomic_add(pcount_ws + slot, cp, mask=cp > 0)


@triton.jit
def triplet_all_merge_kernel(loss_f64_ws, active_ws, grad_ws, loss_ptr, counts_ptr, grad_ptr, B, D, splits,
                             NEED_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The splits in split order: loss rows, active triplets (saturated to int32, twice) and
    the gradient, summed in fp64."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    gmask = row_ok[:, None] & (dims < D)[None, :]
    loss = tl.zeros([ROWS], dtype=tl.float64)
    active = tl.zeros([ROWS], dtype=tl.int64)
    grad = tl.zeros([ROWS, BLOCK_D], dtype=tl.float64)
    for p in range(0, splits):
        base = p * B + rows64
        loss += tl.load(loss_f64_ws + base, mask=row_ok, other=0.0)
        active += tl.load(active_ws + base, mask=row_ok, other=0)
        if NEED_GRAD:
            grad += tl.load(grad_ws + base[:, None] * D + dims[None, :], mask=gmask, other=0.0).to(tl.float64)
    c = tl.minimum(active, 2147483647).to(tl.int32)
    tl.store(loss_ptr + rows64, loss.to(tl.float32), mask=row_ok)
    tl.store(counts_ptr + 2 * rows64, c, mask=row_ok)
    tl.store(counts_ptr + 2 * rows64 + 1, c, mask=row_ok)
    if NEED_GRAD:
        tl.store(grad_ptr + rows64[:, None] * D + dims[None, :], grad.to(tl.float32), mask=gmask)


@triton.autotune(configs=_common.autotune_configs(_REF_CONFIGS, "BLOCK_K", "BLOCK_B"),
                 key=["D", "B_BUCKET", "N_BUCKET", "PRECISION", "X_LIMBS"],
                 prune_configs_by={"early_config_prune": _REF_PRUNE}, **_common.AUTOTUNE_OPTIONS)
@triton.jit
def triplet_all_ref_grad_kernel(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, idx_ws, count_ws, pcount_ws, g_ptr, gref_ptr,
                                B, D, n, margin, select_low, select_high, pos_thr, B_BUCKET, N_BUCKET,
                                HAS_SELF_INDEX: tl.constexpr, PRECISION: tl.constexpr, X_LIMBS: tl.constexpr,
                                W_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    tl.static_assert(BLOCK_B == 16)  # the gather's tiles (CANDIDATE_ROWS)
    cols, col_ok, dims, dim_ok, col_off, r, zj = reference_block(r_ptr, z_ptr, n, D, BLOCK_D, BLOCK_K)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for tile in range(0, tl.cdiv(B, BLOCK_B)):
        rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        x, x_hi, x_mid, x_lo, yi, self_col = anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D,
                                                         r_ptr.dtype.element_ty, HAS_SELF_INDEX, X_LIMBS, LO_SCALE)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        sn = scores(x_hi, x_mid, x_lo, r, PRECISION, X_LIMBS, LO_SCALE)
        _, _, neg = pair_sets(sn, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX)
        tile64 = tl.zeros([], dtype=tl.int64) + tile  # a Python int under the interpreter
        count = tl.load(count_ws + tile)
        idx_ptr = idx_ws + tile64 * n
        wn = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.int32)
        if tl.max(tl.max(neg.to(tl.int32), axis=1), axis=0) > 0:
            for c0 in range(0, count, BLOCK_K):
                same, rp, sp = candidate_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, idx_ptr, c0, count, yi, self_col,
                                              row_ok, dims, dim_ok, D, PRECISION, HAS_SELF_INDEX, BLOCK_K, X_LIMBS,
                                              LO_SCALE)
                wn += _triplets(sn, neg, sp, same & (sp < pos_thr), margin, select_low, select_high)[0]
        # this block's columns as positives: the forward's counts, by column (0 elsewhere)
        slot = (tile64 * n + cols.to(tl.int64))[None, :] * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
        cp = tl.load(pcount_ws + slot, mask=row_ok[:, None] & col_ok[None, :], other=0)
        c = g[:, None] * (wn - cp).to(tl.float32)
        acc = ref_grad_acc(tl.trans(c), x, x_hi, acc, X_LIMBS, W_LIMBS, PRECISION)
    tl.store(gref_ptr + col_off, acc, mask=col_ok[:, None] & dim_ok[None, :])


# The autotuned kernels: launch_problem() asks their prunes whether a shape can launch.
KERNELS = (triplet_all_fwd_kernel, triplet_all_pos_counts_kernel, triplet_all_ref_grad_kernel)


def _scalars(margin, select_low, select_high, pos_eps):
    return dict(margin=float(margin), select_low=float(select_low), select_high=float(select_high),
                pos_thr=1.0 - float(pos_eps))


def _by_label(call):
    """Sorts the call's anchors by label (stable): a tile of 16 anchors then holds few labels,
    so its candidate list, and the blocks each tile of negatives meets, are short (a batch
    holds several samples per class). Returns the order (_unsort puts the rows back)."""
    y = call.args["y_ptr"]
    order = torch.argsort(y, stable=True)
    y = y[order]
    si = call.args["si_ptr"][order] if call.args["HAS_SELF_INDEX"] else y
    call.args.update(x_ptr=call.args["x_ptr"][order], y_ptr=y, si_ptr=si)
    return order


def _unsort(order, *rows):
    """Per-anchor tensors back in the caller's order (a (0,) placeholder as it is)."""
    out = []
    for t in rows:
        if t.shape[0] == order.shape[0]:
            t, sorted_rows = torch.empty_like(t), t
            t[order] = sorted_rows
        out.append(t)
    return tuple(out)


def _forward(call, scalars, need_grad, pos_counts, splits):
    """The op's outputs plus the candidate lists (idx_ws, count_ws) and, with pos_counts, the
    positives' counts by column ((tiles, n, 16) int32)."""
    loss, grad, counts = call.outputs(need_grad)
    B, n = call.B, call.ref_valid
    tiles = triton.cdiv(B, ROWS)
    dev = call.x.device
    lists = dict(idx_ws=torch.empty(max(tiles * n, 1), dtype=torch.int32, device=dev),
                 count_ws=torch.empty(max(tiles, 1), dtype=torch.int32, device=dev))
    pcount = torch.zeros(tiles * n * ROWS if pos_counts else 1, dtype=torch.int32, device=dev)
    if B == 0:
        return loss, grad, counts, lists, pcount
    need_grad = bool(need_grad)
    call.launch(triplet_all_gather_kernel, (tiles,), num_warps=4, BLOCK_B=ROWS, BLOCK_K=_SCAN_K, **lists)
    call.plan(_FWD_CONFIGS, splits)
    ws = dict(loss_f64_ws=call.workspace(B, dtype=torch.float64), active_ws=call.workspace(B, dtype=torch.int64),
              grad_ws=call.grad_workspace(grad, need_grad))
    if pos_counts:  # a pass of its own: in the forward's, the table's updates spilled (ptxas for sm_90)
        call.stream(triplet_all_pos_counts_kernel, pcount_ws=pcount, **lists, **scalars)
    call.stream(triplet_all_fwd_kernel, NEED_GRAD=need_grad, **ws, **lists, **scalars)
    call.merge(triplet_all_merge_kernel, loss_ptr=loss, counts_ptr=counts, grad_ptr=grad, NEED_GRAD=need_grad, **ws)
    return loss, grad, counts, lists, pcount


def triplet_all_fwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, select_low, select_high,
                           pos_eps, need_grad, allow_tf32, splits=None):
    """(loss_rows (B,) f32, grad (B, D) f32 or (0,) when not need_grad, counts (B, 2) int32).
    `splits` overrides the split plan (tests)."""
    call = _common.LossCall(KERNELS, "triplet_all", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    order = _by_label(call)
    return _unsort(order, *_forward(call, _scalars(margin, select_low, select_high, pos_eps), need_grad, False,
                                    splits)[:3])


def triplet_all_bwd_triton(x, labels, ref, ref_labels, self_index, ref_valid, margin, select_low, select_high,
                           pos_eps, grad_rows, allow_tf32):
    """(grad_x (B, D) f32, grad_ref (N, D) f32) for the loss sum_i grad_rows[i] l_i."""
    call = _common.LossCall(KERNELS, "triplet_all", x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32)
    g = call.grad_rows(grad_rows)
    order = _by_label(call)
    g = g[order]
    scalars = _scalars(margin, select_low, select_high, pos_eps)
    _, grad, _, lists, pcount = _forward(call, scalars, True, True, None)
    grad_x, grad_ref = call.ref_grad(triplet_all_ref_grad_kernel, grad, g, pcount_ws=pcount, g_ptr=g, **lists,
                                     **scalars)
    return _unsort(order, grad_x)[0], grad_ref
