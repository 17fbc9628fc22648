"""The machinery shared by the Triton loss modules (which import only this module):
interpreter detection, device facts, argument checks for direct op calls, the autotune
tables and their prune, the split plan of the split-K grid, the merge kernel of the losses
whose splits simply add up, and the tile helpers (16-bit limbs of fp32 operands, score
tiles, pair sets). Launchers call torch.cuda only for CUDA tensors, so the same code runs
under TRITON_INTERPRET=1 on CPU tensors.

Words: a *split* is a contiguous range of reference columns that one program streams (its
partial results are combined in split order by a *merge* kernel); a *limb* is a 16-bit
piece of an fp32 operand (limbs16)."""
import contextlib
import functools
import os
import warnings

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    # Triton reads the variable when a kernel is decorated, i.e. at import of our modules.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_d(D: int) -> int:
    # Whole rows per tile (the tile of R is reused for dX); tl.dot needs K >= 16.
    return max(16, triton.next_power_of_2(max(D, 1)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs fill the device: two per SM on a GPU. Under the interpreter a
    small number, so that small test shapes still take the split-K path."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def _loop_probe_kernel(out_ptr, n):
    acc = 0
    for _ in range(0, n):  # a loop bounded by a runtime argument
        acc += 1
    tl.store(out_ptr, acc)


@functools.lru_cache(maxsize=None)
def interpreter_problem():
    """None when the kernels can run here; otherwise why not. Some Triton interpreters
    (3.6) cannot run loops bounded by runtime values with numpy >= 2."""
    if not interpreting():
        return None
    out = torch.zeros(1, dtype=torch.int32)
    try:
        with warnings.catch_warnings():  # numpy 1.25+ deprecation noise from the interpreter itself
            warnings.simplefilter("ignore", DeprecationWarning)
            _loop_probe_kernel[(1,)](out, 3)
    except Exception as exc:  # the interpreter wraps the numpy TypeError
        import numpy
        return (f"Triton {triton.__version__}'s interpreter cannot run runtime-bounded loops with numpy "
                f"{numpy.__version__} ({exc}); install numpy<2 or a newer Triton")
    return None if int(out[0]) == 3 else "Triton interpreter probe returned a wrong loop count"


def check_device(name: str, t: torch.Tensor):
    if t.is_cuda:
        return
    if t.device.type == "cpu" and interpreting():
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(f"{name}: {problem}")
        return
    raise ValueError(f"{name}: the triton backend runs on CUDA tensors (CPU tensors only under "
                     f"TRITON_INTERPRET=1), got a tensor on {t.device}")


def check_loss_args(x, labels, ref, ref_labels, self_index, ref_valid):
    """The checks csrc/checks.h makes for the C++ ops, for direct calls of the Triton ops."""
    if x.dim() != 2 or ref.dim() != 2:
        raise ValueError(f"x, ref: expected 2-D tensors, got shapes {tuple(x.shape)} and {tuple(ref.shape)}")
    if x.shape[1] != ref.shape[1]:
        raise ValueError(f"ref: embedding dim {ref.shape[1]} != x's {x.shape[1]}")
    if x.dtype not in FLOAT_DTYPES or ref.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x, ref: expected float32/float16/bfloat16, got {x.dtype} and {ref.dtype}")
    B, N = x.shape[0], ref.shape[0]
    if labels.dim() != 1 or labels.shape[0] != B or labels.dtype != torch.int32:
        raise ValueError(f"labels: expected int32 of shape ({B},), got {labels.dtype} {tuple(labels.shape)}")
    if ref_labels.dim() != 1 or ref_labels.shape[0] != N or ref_labels.dtype != torch.int32:
        raise ValueError(f"ref_labels: expected int32 of shape ({N},), got {ref_labels.dtype} "
                         f"{tuple(ref_labels.shape)}")
    if not 0 <= ref_valid <= N:
        raise ValueError(f"ref_valid: expected 0 <= ref_valid <= {N}, got {ref_valid}")
    if N >= 2 ** 31:
        raise ValueError(f"ref: at most 2^31 - 1 rows (column indices are int32), got {N}")
    tensors = [labels, ref, ref_labels]
    if self_index is not None:
        if self_index.dim() != 1 or self_index.shape[0] != B or self_index.dtype != torch.int64:
            raise ValueError(f"self_index: expected int64 of shape ({B},), got {self_index.dtype} "
                             f"{tuple(self_index.shape)}")
        tensors.append(self_index)
    for t in tensors:
        if t.device != x.device:
            raise ValueError(f"all tensors must be on {x.device}, got one on {t.device}")
    check_device("x", x)


def prepare_loss_inputs(x, labels, ref, ref_labels, self_index, ref_valid):
    """Checked, detached, contiguous (x, labels, ref, ref_labels, self_index or None)."""
    check_loss_args(x, labels, ref, ref_labels, self_index, ref_valid)
    si = self_index.contiguous() if self_index is not None else None
    return x.detach().contiguous(), labels.contiguous(), ref.detach().contiguous(), ref_labels.contiguous(), si


def check_grad_rows(grad_rows, B, device):
    """grad_rows as a contiguous fp32 (B,) tensor, or a ValueError."""
    if grad_rows.dim() != 1 or grad_rows.shape[0] != B or grad_rows.device != device:
        raise ValueError(f"grad_rows: expected shape ({B},) on {device}, got {tuple(grad_rows.shape)} on "
                         f"{grad_rows.device}")
    return grad_rows.detach().to(torch.float32).contiguous()


def precision(allow_tf32: bool) -> str:
    return "tf32" if allow_tf32 else "ieee"


def bucket(v: int) -> int:
    # Autotune keys: re-tune per power of two, not per size (a filling memory grows every step).
    return triton.next_power_of_2(max(int(v), 1))


# --------------------------------------------------------------------------- autotuning

SMEM_BUDGET = 200 * 1024

# (BLOCK_B, BLOCK_K, num_warps, num_stages) of the forward kernels (a tile of BLOCK_B anchors
# streams its split in tiles of BLOCK_K reference rows), chosen for Hopper (H100: 228 KB
# shared memory per SM, 64K registers). Small BLOCK_B serves small batches against a big
# memory. The registers hold the fp32 dX tile plus loop-invariant broadcasts of labels and
# self indices: compiled for sm_90, 64-row tiles spill with 4 warps at D = 128, hence 8.
# The last entries are for large D (fp32 rows of 512+), where only small tiles fit.
FWD_CONFIGS = [(16, 64, 4, 3), (16, 128, 8, 3), (32, 64, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3),
               (64, 64, 8, 4), (64, 128, 8, 3), (128, 64, 8, 3), (16, 32, 4, 2), (16, 16, 4, 1)]
# The same for forward kernels holding two fp32 (B x D) accumulators (multi-similarity,
# supcon, ntxent) or one and a coefficient tile in limbs (contrastive_l2): without the
# 64 x 128 and 128 x 64 tiles, which spill kilobytes there (ptxas for sm_90 at D = 128, bf16).
TWO_ACC_FWD_CONFIGS = [(16, 64, 4, 3), (16, 128, 8, 3), (32, 64, 8, 3), (32, 128, 8, 3), (64, 32, 8, 3),
                       (64, 64, 8, 3), (64, 64, 8, 4), (16, 32, 4, 2), (16, 16, 4, 1)]
# (BLOCK_K reference rows per program, BLOCK_B anchors per step, num_warps, num_stages) of the
# reference-side gradient kernels (each program owns a tile of reference rows).
REF_CONFIGS = [(16, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4), (128, 64, 8, 3),
               (64, 128, 8, 2), (16, 16, 4, 1)]
# The interpreter runs one config (no benchmarking); tiles small enough for test shapes.
INTERP_FWD = (16, 32, 1, 1)
INTERP_REF = (32, 16, 1, 1)


def autotune_configs(table, first="BLOCK_B", second="BLOCK_K"):
    """triton.Configs from rows (first, second, num_warps, num_stages): a forward table by
    default, REF_CONFIGS with first="BLOCK_K", second="BLOCK_B". The interpreter runs one
    config (no benchmarking): INTERP_FWD or INTERP_REF."""
    rows = [INTERP_FWD if first == "BLOCK_B" else INTERP_REF] if interpreting() else table
    return [triton.Config({first: a, second: b}, num_warps=w, num_stages=s) for a, b, w, s in rows]


def prune_configs(rows_name, cols_name, count_name, ieee_fp32_tile, acc_tiles=1, fp32_product_when_limbed=False):
    """Drops configs whose fp32 register tiles (acc_tiles of rows x BLOCK_D: accumulators,
    plus one for kernels that build a weight matrix per tile) would not fit in registers,
    whose pipelined tiles would not fit in shared memory, or whose row tile far exceeds the
    rows there are. IEEE fp32 dots run on FMA units and spill kilobytes beyond
    ieee_fp32_tile (rows x cols, measured on sm_90), so those are dropped too; with
    fp32_product_when_limbed the kernel takes one for anchors in limbs too (ref_grad_acc). Keeps
    the config needing least shared memory when nothing fits (very large D)."""
    def prune(configs, nargs, **kwargs):
        bd = kwargs["BLOCK_D"]
        esize = nargs["r_ptr"].element_size()
        count = nargs[count_name]
        fp32_dot = esize == 4 or (fp32_product_when_limbed and kwargs.get("X_LIMBS", 1) > 1)
        fma = fp32_dot and kwargs["PRECISION"] == "ieee"

        def smem(c):  # the streamed tiles, pipelined, plus the resident one
            return (max(c.num_stages, 1) * c.kwargs[cols_name] + c.kwargs[rows_name]) * bd * esize

        out = [c for c in configs
               if acc_tiles * c.kwargs[rows_name] * bd <= c.num_warps * 32 * 128 and smem(c) <= SMEM_BUDGET
               and c.kwargs[rows_name] <= max(16, triton.next_power_of_2(count))
               and not (fma and c.kwargs[rows_name] * c.kwargs[cols_name] > ieee_fp32_tile)]
        return out or [min(configs, key=smem)]
    return prune


# --------------------------------------------------------------------------- split-K


def split_plan(B: int, n: int, device: torch.device, table, splits=None):
    """(splits, cols_per_split) for a grid of (B tiles) x (splits) over n reference columns:
    enough programs to fill the device, each split a whole number of the largest column
    tile of `table` (rows: BLOCK_B, BLOCK_K, ...). Does not depend on the autotuned config,
    so workspaces can be allocated before the launch. `splits` overrides the plan (tests)."""
    if splits is not None:
        cols = triton.cdiv(max(n, 1), splits)
        return triton.cdiv(max(n, 1), cols), cols
    table = [INTERP_FWD] if interpreting() else table
    kmax = max(c[1] for c in table)
    nominal_b = 16 if interpreting() else 64
    tiles = triton.cdiv(n, kmax)
    if tiles <= 1:
        return 1, max(kmax, n)
    want = triton.cdiv(target_programs(device), triton.cdiv(B, nominal_b))
    splits = max(1, min(want, tiles))
    cols = triton.cdiv(tiles, splits) * kmax
    return triton.cdiv(n, cols), cols


def merge_rows(D: int) -> int:
    """Rows per program of the merge kernels, which hold (rows, BLOCK_D) fp32 tiles."""
    return max(1, min(64, 4096 // block_d(D)))


@triton.jit
def sum_merge_kernel(loss_ws, counts_ws, grad_ws, loss_ptr, counts_ptr, grad_ptr, B, D, splits,
                     NEED_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The merge of the losses whose splits simply add up (contrastive, contrastive_l2):
    loss, counts and dX summed over the splits in split order."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    gmask = row_ok[:, None] & (dims < D)[None, :]
    pair = tl.arange(0, 2)
    cmask = row_ok[:, None] & (pair < 2)[None, :]
    loss = tl.zeros([ROWS], dtype=tl.float32)
    counts = tl.zeros([ROWS, 2], dtype=tl.int32)
    grad = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for p in range(0, splits):  # split order, always: the result does not depend on timing
        base = p * B + rows64
        loss += tl.load(loss_ws + base, mask=row_ok, other=0.0)
        counts += tl.load(counts_ws + 2 * base[:, None] + pair[None, :], mask=cmask, other=0)
        if NEED_GRAD:
            grad += tl.load(grad_ws + base[:, None] * D + dims[None, :], mask=gmask, other=0.0)
    tl.store(loss_ptr + rows64, loss, mask=row_ok)
    tl.store(counts_ptr + 2 * rows64[:, None] + pair[None, :], counts, mask=cmask)
    if NEED_GRAD:
        tl.store(grad_ptr + rows64[:, None] * D + dims[None, :], grad, mask=gmask)


# --------------------------------------------------------------------------- tile helpers


def operand_limbs(x_dtype: torch.dtype, ref_dtype: torch.dtype) -> dict:
    """The kernels' constexprs for how fp32 values enter products with a 16-bit reference.

    X_LIMBS: the anchors in S = X R^T. 1: x in ref's dtype (the same dtype, or an fp32
    reference). Anchors of another dtype than a 16-bit reference (fp32 anchors, a bf16
    memory) are cut into 16-bit limbs, x = hi + mid / LO_SCALE (+ lo / LO_SCALE^2), one
    tensor-core product each with the tile of R read once: fp16 needs 2 (11 + 11 bits),
    bf16 3 (8 + 8 + 8 bits) to hold an fp32 mantissa; rounding x instead costs 1e-4 (fp16)
    to 1e-3 (bf16) in S, hundreds of times the fp32 product the reference backend computes.
    W_LIMBS: the same for fp32 weights (softmax, mining) times R in the gradient: 2 when
    all inputs are 16-bit (the reference backend then computes in 16 bits), else X_LIMBS.
    LO_SCALE: the anchors' low limbs are scaled by 2^12 for fp16, where they would otherwise
    be subnormal (S's error halves, measured); 1 for bf16. The weights' limbs are not
    scaled (dot_acc)."""
    if ref_dtype == torch.float32:
        return dict(X_LIMBS=1, W_LIMBS=1, LO_SCALE=1.0)
    scale = 4096.0 if ref_dtype == torch.float16 else 1.0
    if x_dtype == ref_dtype:
        return dict(X_LIMBS=1, W_LIMBS=2, LO_SCALE=scale)
    limbs = 2 if ref_dtype == torch.float16 else 3
    return dict(X_LIMBS=limbs, W_LIMBS=limbs, LO_SCALE=scale)


@triton.jit
def limbs16(v, dtype: tl.constexpr, LIMBS: tl.constexpr, LO_SCALE: tl.constexpr):
    """fp32 v as (hi, mid, lo) in `dtype`: v ~ hi + mid / LO_SCALE + lo / LO_SCALE^2 (lo
    only with LIMBS == 3; unused limbs are copies of the last one). Each residual is exact
    in fp32 (a value minus its own rounding)."""
    hi = v.to(dtype)
    rest = v - hi.to(tl.float32)
    if LO_SCALE != 1.0:
        rest = rest * LO_SCALE
    mid = rest.to(dtype)
    lo = mid
    if LIMBS == 3:
        rest = rest - mid.to(tl.float32)
        if LO_SCALE != 1.0:
            rest = rest * LO_SCALE
        lo = rest.to(dtype)
    return hi, mid, lo


@triton.jit
def dot_low(mid, lo, m, acc, LIMBS: tl.constexpr, LO_SCALE: tl.constexpr):
    """acc + (mid / LO_SCALE + lo / LO_SCALE^2) @ m: the low limbs' products (LIMBS >= 2)."""
    if LO_SCALE == 1.0:
        acc = tl.dot(mid, m, acc)
        if LIMBS == 3:
            acc = tl.dot(lo, m, acc)
    else:
        low = tl.dot(mid, m)
        if LIMBS == 3:
            low += tl.dot(lo, m) * (1.0 / LO_SCALE)
        acc += low * (1.0 / LO_SCALE)
    return acc


@triton.jit
def anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D, dtype: tl.constexpr,
                HAS_SELF_INDEX: tl.constexpr, X_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr):
    """A tile of anchors as loaded and as the operand limbs of S (operand_limbs: x in
    `dtype`, the reference's, or cut into 16-bit limbs), their labels and self columns
    (rows as a placeholder without self_index)."""
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0)
    yi = tl.load(y_ptr + rows, mask=row_ok, other=0)
    self_col = rows
    if HAS_SELF_INDEX:
        self_col = tl.load(si_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    if X_LIMBS == 1:
        x_hi = x.to(dtype)
        x_mid = x_hi
        x_lo = x_hi
    else:
        x_hi, x_mid, x_lo = limbs16(x.to(tl.float32), dtype, X_LIMBS, LO_SCALE)
    return x, x_hi, x_mid, x_lo, yi, self_col


@triton.jit
def scores(x_hi, x_mid, x_lo, r, PRECISION: tl.constexpr, X_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr):
    """S = X R^T (rows x cols, fp32) from anchor_tile's limbs and rows of R."""
    rt = tl.trans(r)
    s = tl.dot(x_hi, rt, input_precision=PRECISION)
    if X_LIMBS > 1:
        s = dot_low(x_mid, x_lo, rt, s, X_LIMBS, LO_SCALE)
    return s


@triton.jit
def memory_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, k0, col_end, dims, dim_ok, D, PRECISION: tl.constexpr,
                BLOCK_K: tl.constexpr, X_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr):
    """Columns k0 .. k0 + BLOCK_K of a split ending at col_end: their column indices and
    mask, their rows of R (BLOCK_K x BLOCK_D, kept for the gradient product), labels, and
    the score tile S = X R^T accumulated in fp32 (BLOCK_B x BLOCK_K)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < col_end
    r = tl.load(r_ptr + cols.to(tl.int64)[:, None] * D + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                other=0.0)
    zj = tl.load(z_ptr + cols, mask=col_ok, other=0)
    s = scores(x_hi, x_mid, x_lo, r, PRECISION, X_LIMBS, LO_SCALE)
    return cols, col_ok, r, zj, s


@triton.jit
def reference_block(r_ptr, z_ptr, n, D, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's block of reference rows for the reference-side gradient kernels: its
    columns and mask, the dims and their mask, the int64 row offsets (for the gradient
    store), the rows of R and their labels."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < n
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    col_off = cols.to(tl.int64)[:, None] * D + dims[None, :]
    r = tl.load(r_ptr + col_off, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    zj = tl.load(z_ptr + cols, mask=col_ok, other=0)
    return cols, col_ok, dims, dim_ok, col_off, r, zj


@triton.jit
def log1p(u):
    # log(1 + u) accurate for small u (Goldberg): the rounding of 1 + u cancels in the ratio
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def pair_sets(s, yi, zj, cols, row_ok, col_ok, self_col, pos_thr, HAS_SELF_INDEX: tl.constexpr):
    """Masks of a (rows x cols) tile of S: valid V (j < ref_valid, not self), positives P
    (same label, S < 1 - pos_eps) and negatives N (other label); CONTRACT.md section 1."""
    valid = row_ok[:, None] & col_ok[None, :]
    if HAS_SELF_INDEX:
        valid = valid & (cols[None, :] != self_col[:, None])
    pos = valid & (yi[:, None] == zj[None, :]) & (s < pos_thr)
    neg = valid & (yi[:, None] != zj[None, :])
    return valid, pos, neg


@triton.jit
def dot_acc(c, m, acc, LIMBS: tl.constexpr, PRECISION: tl.constexpr):
    """acc + c @ m for fp32 coefficients c and a tile m (16-bit or fp32). LIMBS > 1 (m is
    16-bit and c is not exact in 16 bits): c goes in as LIMBS 16-bit limbs (limbs16), one
    tensor-core product each, keeping ~fp32 accuracy. Unscaled: the weights here are at most
    1 (or g), so a subnormal fp16 low limb's absolute error (< 2^-25) is far below the result's
    fp32 resolution, and the low products accumulate into acc (no extra register tile).
    LIMBS == 1: c is cast to m's dtype (exact for 0/1 masks, or m is fp32)."""
    if LIMBS == 1:
        acc = tl.dot(c.to(m.dtype), m, acc, input_precision=PRECISION)
    else:
        hi, mid, lo = limbs16(c, m.dtype, LIMBS, 1.0)
        acc = tl.dot(hi, m, acc)
        acc = dot_low(mid, lo, m, acc, LIMBS, 1.0)
    return acc


@triton.jit
def ref_grad_acc(ct, x, x_hi, acc, X_LIMBS: tl.constexpr, W_LIMBS: tl.constexpr, PRECISION: tl.constexpr):
    """acc + C^T X for the reference-side gradient (ct = C^T, fp32; x as loaded and in the
    operand dtype). Anchors in limbs for S (another dtype than a 16-bit reference: rare, the
    reference then requires grad in another dtype than the anchors) take an fp32 product;
    otherwise dot_acc on the operand tile."""
    if X_LIMBS > 1:
        acc = tl.dot(ct, x.to(tl.float32), acc, input_precision=PRECISION)
    else:
        acc = dot_acc(ct, x_hi, acc, W_LIMBS, PRECISION)
    return acc
