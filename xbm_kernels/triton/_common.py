"""The machinery shared by the Triton loss modules (which import only this module):
interpreter detection, device facts, argument checks for direct op calls, the autotune
tables and their prune, the split plan of the split-K grid, the merge kernel of the losses
whose splits simply add up, the launches every loss makes (LossCall: inputs, outputs,
workspaces, split-K passes, merges, the reference-side gradient), and the tile helpers
(16-bit limbs of fp32 operands, score tiles, pair sets). Launchers call torch.cuda only for CUDA tensors, so the same code runs
under TRITON_INTERPRET=1 on CPU tensors.

Words: a *split* is a contiguous range of reference columns that one program streams (its
partial results are combined in split order by a *merge* kernel); a *limb* is a 16-bit
piece of an fp32 operand (limbs16)."""
import contextlib
import functools
import inspect
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
    # Autotune keys: re-tune per power of two, not per size.
    return triton.next_power_of_2(max(int(v), 1))


def cols_bucket(v: int) -> int:
    """Autotune key of the columns a program streams (a split, or the reference rows): three
    classes (up to 2048, up to 64K, more), not powers of two, so that a filling memory retunes
    at most 3 times instead of 6-12 (the best tile changes with how long a program streams,
    not with each doubling)."""
    v = int(v)
    return 0 if v <= 2048 else 1 if v <= 65536 else 2


# Persist autotune results across processes where this Triton's autotune takes cache_results
# (3.9 does: a JSON file in Triton's cache, keyed on the Triton version, the kernel source, the
# tuning key and the configs left after the prune; an older Triton without it retunes).
AUTOTUNE_OPTIONS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters \
    else {}


# --------------------------------------------------------------------------- autotuning

# (BLOCK_B, BLOCK_K, num_warps, num_stages) of the forward kernels (a tile of BLOCK_B anchors
# streams its split in tiles of BLOCK_K reference rows), chosen for Hopper (H100: 228 KB
# shared memory per SM, 64K registers). Small BLOCK_B serves small batches against a big
# memory. The registers hold the fp32 dX tile plus loop-invariant broadcasts of labels and
# self indices: compiled for sm_90, 64-row tiles spill with 4 warps at D = 128, hence 8.
# The last entries are for large D: a 64 x 32 tile with 8 warps (wgmma on 16-bit rows of 512),
# then small tiles (fp32 rows of 512+).
FWD_CONFIGS = [(16, 64, 4, 3), (16, 128, 8, 3), (32, 64, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3),
               (64, 64, 8, 4), (64, 128, 8, 3), (128, 64, 8, 3), (64, 32, 8, 2), (16, 32, 4, 2),
               (16, 16, 4, 1)]
# The same for forward kernels holding two fp32 (B x D) accumulators (multi-similarity,
# supcon, ntxent) or one and a coefficient tile in limbs (contrastive_l2): without the
# 64 x 128 and 128 x 64 tiles, which spill kilobytes there (ptxas for sm_90 at D = 128, bf16).
# The 16-row tiles with 8 warps serve wide rows: at D = 512 (bf16, TF32, limbs, and fp32 on
# FMA units with 16 x 16) they fit without spills where the 4-warp ones spill, and at D = 1024,
# where every tile spills, they spill least (tests/data/sm90_calibration.csv).
TWO_ACC_FWD_CONFIGS = [(16, 64, 4, 3), (16, 128, 8, 3), (32, 64, 8, 3), (32, 128, 8, 3), (64, 32, 8, 3),
                       (64, 64, 8, 3), (64, 64, 8, 4), (16, 32, 8, 2), (16, 16, 8, 1), (16, 32, 4, 2),
                       (16, 16, 4, 1)]
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


SMEM_LIMIT = 227 * 1024  # the most shared memory one program may opt into on sm_90


def operand_bytes(x_dtype_size: int, ref_dtype_size: int, x_limbs: int) -> int:
    """Bytes per element of the anchors as a dot operand: their 16-bit limbs, x cast to a
    16-bit reference's dtype, or fp32."""
    if x_limbs > 1:
        return 2 * x_limbs
    return ref_dtype_size


def smem_bytes(rows, cols, stages, block_d, resident_bytes, streamed_bytes):
    """Shared memory of a kernel whose dot operands are a resident (rows x BLOCK_D) tile and
    a streamed (cols x BLOCK_D) tile that Triton pipelines over max(stages - 1, 1) buffers,
    plus the layout-conversion scratch of the (rows x cols) fp32 score tile. Within a few
    KB of what Triton 3.9 reports for sm_90 (tests/test_compile_triton.py checks the bound)."""
    return (max(stages - 1, 1) * cols * streamed_bytes + rows * resident_bytes) * block_d + 4 * rows * cols + 2048


def register_words(rows, cols, warps, block_d, acc_tiles, temps, resident_bytes, streamed_bytes, wgmma,
                   weights=0):
    """32-bit registers per thread for the fp32 (rows x BLOCK_D) accumulators, `temps` fp32
    (rows x cols) tiles of the epilogue (scores, weights, masks), on mma.sync and FMA the dot
    operands held in registers (wgmma reads them from shared memory) and `weights` fp32
    (rows x cols) tiles held as the left operand of the gradient dot (weights @ R): a warp
    holds whole rows of it, so it is replicated across the warps that do not split the rows
    (16 rows per warp on mma.sync): with 16-row tiles and 8 warps, a wide BLOCK_K costs each
    thread rows * cols / 32 words."""
    words = acc_tiles * rows * block_d + temps * rows * cols
    if not wgmma:
        words += (rows * resident_bytes + cols * streamed_bytes) * block_d // 4
        words += weights * rows * cols * warps / min(warps, max(rows // 16, 1))
    return words / (warps * 32)


# What register_words may reach without spills, per product path: wgmma (16-bit operands,
# 64-row tiles), mma.sync and FMA (IEEE fp32) with 4 or 8 warps; "weights": the replicated
# weight tiles counted (register_words), 0 where absent. A budget set holds for the model it was
# calibrated with. DEFAULT_BUDGETS: the first calibration (contrastive at D = 128);
# TWO_ACC_BUDGETS: the two-accumulator forward kernels, calibrated on ptxas for sm_90 under
# Triton 3.9 (tests/data/sm90_calibration.csv: supcon's forward at D 128-1024, every operand
# kind; no tile there that the budget admits spills; 16 x 128 tiles with 8 warps spill at
# D = 128 without the weights term) and checked on the other three (bench/results/sm90: 4 warps
# on mma.sync held to 160, where multi-similarity's 16 x 64 tile with limbs spills at D = 128).
DEFAULT_BUDGETS = {"wgmma": 64, "mma4": 200, "mma8": 64, "fma4": 200, "fma8": 64}
TWO_ACC_BUDGETS = {"wgmma": 64, "mma4": 160, "mma8": 156, "fma4": 136, "fma8": 144, "weights": 1}
# REF_BUDGETS: the reference-side gradient kernels of the weighted losses (supcon, multi-similarity,
# ntxent, circle, and contrastive's: one (K x D) accumulator, the weights transposed as the dot's
# left operand), checked on ptxas for sm_90 (bench/results/sm90/ref-grad-triton-3.9.csv): 4 warps
# on mma.sync held to 160 (TF32 16 x 64 spilled at D = 128), FMA to 72 (fp32 at D = 256 and the
# limbed anchors' fp32 product at D = 128 spill; where every tile spills the prune keeps one).
REF_BUDGETS = {"wgmma": 64, "mma4": 160, "mma8": 156, "fma4": 72, "fma8": 144, "weights": 1}


def prune_configs(rows_name, cols_name, count_name, ieee_fp32_tile, acc_tiles=1, temps=3,
                  fp32_product_when_limbed=False, budgets=None):
    """The early prune of a kernel's autotune table. rows_name is the resident tile (anchors
    in the forward kernels, reference rows in the reference-side ones), cols_name the
    streamed one. Drops configs that cannot launch (shared memory over SMEM_LIMIT, counting
    the anchors' 16-bit limbs: smem_bytes), that spill (register_words, operands and their limbs
    included on mma.sync and FMA, over `budgets`: DEFAULT_BUDGETS, TWO_ACC_BUDGETS or REF_BUDGETS), whose row tile far
    exceeds the rows there are, and IEEE fp32 dots (FMA units) beyond ieee_fp32_tile (rows x
    cols). With fp32_product_when_limbed the kernel also takes an fp32 product of the
    anchors when they come in limbs (ref_grad_acc).

    Where every config spills (wide rows) keeps the one with the fewest registers per thread
    by the model (then the least shared memory), which runs, slowly; returns [] when none fits in shared memory: the launcher then raises
    (launch_problem() says so beforehand, and backend="auto" does not pick Triton). Without
    autotuning
    (autotune_enabled() False) returns the first config that fits: the tables are in order
    of preference."""
    anchors_resident = rows_name == "BLOCK_B"
    budgets = budgets or DEFAULT_BUDGETS

    def sizes(nargs, kwargs):
        limbs = kwargs.get("X_LIMBS", 1)
        r_size = nargs["r_ptr"].element_size()
        x_bytes = operand_bytes(nargs["x_ptr"].element_size(), r_size, limbs)
        fp32_dot = r_size == 4 or (fp32_product_when_limbed and limbs > 1)
        if fp32_product_when_limbed and limbs > 1:
            x_bytes += 4
        resident, streamed = (x_bytes, r_size) if anchors_resident else (r_size, x_bytes)
        return resident, streamed, fp32_dot, r_size == 2

    def wgmma(c, fp32_dot, sixteen):
        return sixteen and not fp32_dot and c.kwargs[rows_name] % 64 == 0 and c.num_warps % 4 == 0

    def words_of(c, bd, resident, streamed, fp32_dot, sixteen):
        return register_words(c.kwargs[rows_name], c.kwargs[cols_name], c.num_warps, bd, acc_tiles, temps, resident,
                              streamed, wgmma(c, fp32_dot, sixteen), budgets.get("weights", 0))

    def no_spills(c, bd, resident, streamed, fp32_dot, sixteen, precision):
        fma = fp32_dot and precision == "ieee"
        path = "wgmma" if wgmma(c, fp32_dot, sixteen) else ("fma" if fma else "mma") + \
            ("4" if c.num_warps <= 4 else "8")
        # beyond 8 warps a thread has fewer than 255 registers (64K per block); 16 warps at
        # half the words of 8 already spill (measured), hence the square
        budget = budgets[path] * min(1.0, 8 / c.num_warps) ** 2
        return (words_of(c, bd, resident, streamed, fp32_dot, sixteen) <= budget
                and not (fma and c.kwargs[rows_name] * c.kwargs[cols_name] > ieee_fp32_tile))

    def smem(c, bd, resident, streamed):
        return smem_bytes(c.kwargs[rows_name], c.kwargs[cols_name], c.num_stages, bd, resident, streamed)

    def prune(configs, nargs, **kwargs):
        if interpreting():  # one config, no shared memory or registers to fit
            return configs
        bd = kwargs["BLOCK_D"]
        resident, streamed, fp32_dot, sixteen = sizes(nargs, kwargs)
        launch = [c for c in configs if smem(c, bd, resident, streamed) <= SMEM_LIMIT]
        out = [c for c in launch if no_spills(c, bd, resident, streamed, fp32_dot, sixteen, kwargs["PRECISION"])]
        if not out and launch:  # wide rows: every tile spills; the one with the fewest registers per thread
            out = [min(launch, key=lambda c: (words_of(c, bd, resident, streamed, fp32_dot, sixteen),
                                              smem(c, bd, resident, streamed)))]
        bound = max(16, triton.next_power_of_2(nargs[count_name]))  # no row tile far beyond the rows there are
        out = [c for c in out if c.kwargs[rows_name] <= bound] or sorted(out, key=lambda c: c.kwargs[rows_name])[:1]
        return out if autotune_enabled() else out[:1]

    def fits(c, nargs, **kwargs):
        """Whether config c launches without spills by the models (the prune's test of one config)."""
        bd = kwargs["BLOCK_D"]
        resident, streamed, fp32_dot, sixteen = sizes(nargs, kwargs)
        return smem(c, bd, resident, streamed) <= SMEM_LIMIT and no_spills(c, bd, resident, streamed, fp32_dot,
                                                                           sixteen, kwargs["PRECISION"])
    prune.fits = fits
    return prune


@functools.lru_cache(maxsize=None)
def _kept_anywhere(kernel, bd, x_dtype, ref_dtype):
    prune = kernel.early_config_prune
    nargs = {"x_ptr": torch.empty(0, dtype=x_dtype), "r_ptr": torch.empty(0, dtype=ref_dtype), "B": 1 << 20,
             "n": 1 << 20}
    return bool(prune(kernel.configs, nargs, BLOCK_D=bd, PRECISION="ieee", **operand_limbs(x_dtype, ref_dtype)))


def launch_problem(kernels, loss: str, D: int, x_dtype: torch.dtype, ref_dtype: torch.dtype):
    """None when every autotuned kernel of a loss keeps a configuration for rows of D
    (fp32 products: on FMA units or TF32 alike); otherwise why not, in words. The kernels
    hold whole rows in one tile, so wide rows exhaust sm_90's shared memory."""
    if interpreting():
        return None
    bd = block_d(D)
    for k in kernels:
        if not _kept_anywhere(k, bd, x_dtype, ref_dtype):
            name = k.fn.__name__ if hasattr(k, "fn") else str(k)
            return (f"the triton backend cannot launch {loss} for rows of D = {D} ({str(x_dtype)[6:]} anchors, "
                    f"{str(ref_dtype)[6:]} reference): {name} holds whole rows and no configuration fits in sm_90's "
                    f"{SMEM_LIMIT // 1024} KB of shared memory")
    return None


def require_launchable(kernels, loss, x, ref):
    """Raises a ValueError naming the shape when launch_problem() finds one."""
    problem = launch_problem(tuple(kernels), loss, x.shape[1], x.dtype, ref.dtype)
    if problem:
        raise ValueError(f"x: {problem}; use backend='auto' (it picks one that runs), 'reference', or 'cuda' for "
                         f"the contrastive loss")


def autotune_enabled() -> bool:
    """False under the interpreter (one config anyway) or with XBM_KERNELS_AUTOTUNE=0: each
    kernel then runs the first configuration of its table that fits, with no benchmarking
    (short runs and tests: no 25-35 compiles on the first step)."""
    return not interpreting() and os.environ.get("XBM_KERNELS_AUTOTUNE", "1") != "0"


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


# --------------------------------------------------------------------------- launches


@functools.lru_cache(maxsize=None)
def _parameters(kernel):
    """(runtime argument names, constexpr names) of a kernel in its order, less the
    constexprs its autotune configs set."""
    fn = kernel
    while not inspect.isfunction(fn):  # Autotuner -> JITFunction (or InterpretedFunction) -> function
        fn = fn.fn
    tuned = set(kernel.configs[0].kwargs) if getattr(kernel, "configs", None) else set()
    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in tuned]
    return (tuple(p.name for p in params if "constexpr" not in str(p.annotation)),
            tuple(p.name for p in params if "constexpr" in str(p.annotation)))


class LossCall:
    """One call of a Triton loss op: its checked inputs, and the launches every loss makes
    with them. A kernel's arguments are bound by name, so a loss module passes only what is
    its own (its scalars, workspaces, outputs and flags); the rest comes from here under the
    names every kernel uses: x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, B, D, n (= ref_valid), the
    split plan (cols_per_split, splits), the autotune buckets and the constexprs
    HAS_SELF_INDEX, PRECISION, BLOCK_D and the operand limbs (operand_limbs).

    Forward: outputs(), plan() the splits, workspace() per split, then split_k() (a pass over
    the reference and the merge of its splits), or stream() and merge() apart; sum_forward()
    is all of it for the losses whose splits simply add up. Backward: ref_grad() (the
    forward's gradient scaled by g, and the reference side)."""

    def __init__(self, kernels, loss, x, labels, ref, ref_labels, self_index, ref_valid, allow_tf32):
        x, labels, ref, ref_labels, si = prepare_loss_inputs(x, labels, ref, ref_labels, self_index, ref_valid)
        require_launchable(kernels, loss, x, ref)
        self.x = x
        self.B, self.D = x.shape
        self.N = ref.shape[0]
        self.ref_valid = ref_valid
        self.splits = None
        self.args = dict(x_ptr=x, y_ptr=labels, r_ptr=ref, z_ptr=ref_labels, si_ptr=si if si is not None else labels,
                         B=self.B, D=self.D, n=ref_valid, B_BUCKET=bucket(self.B), HAS_SELF_INDEX=si is not None,
                         PRECISION=precision(allow_tf32), BLOCK_D=block_d(self.D), **operand_limbs(x.dtype, ref.dtype))

    def f32(self, *shape):
        return torch.empty(*shape, dtype=torch.float32, device=self.x.device)

    def outputs(self, need_grad):
        """The op's (loss rows (B,), gradient (B, D) or (0,) without need_grad, counts (B, 2) int32)."""
        grad = self.f32(self.B, self.D) if need_grad else self.f32(0)
        return self.f32(self.B), grad, torch.empty(self.B, 2, dtype=torch.int32, device=self.x.device)

    def grad_rows(self, grad_rows):
        return check_grad_rows(grad_rows, self.B, self.x.device)

    def plan(self, table, splits=None):
        """Plans the forward grid over the ref_valid columns (split_plan); returns the splits."""
        self.splits, cols = split_plan(self.B, self.ref_valid, self.x.device, table, splits)
        self.args.update(splits=self.splits, cols_per_split=cols, COLS_BUCKET=cols_bucket(cols))
        return self.splits

    def workspace(self, *shape, dtype=torch.float32):
        """A (splits, *shape) tensor for the splits' partial results."""
        return torch.empty(self.splits, *shape, dtype=dtype, device=self.x.device)

    def grad_workspace(self, grad, need_grad):
        """A split's (B, D) partial gradient, or the (0,) placeholder without need_grad (not written)."""
        return self.workspace(self.B, self.D) if need_grad else grad

    def launch(self, kernel, grid, num_warps=None, **named):
        """kernel[grid], its arguments taken by name from `named`, then from this call's."""
        launcher = kernel[grid]
        runtime, consts = _parameters(kernel)
        values = {**self.args, **named}
        options = {} if num_warps is None else {"num_warps": num_warps}
        with device_guard(self.x):
            launcher(*(values[a] for a in runtime), **{c: values[c] for c in consts}, **options)

    def stream(self, kernel, **named):
        """A pass over the reference: grid (anchor tiles) x (splits), B fastest so programs
        running together share tiles of R in L2."""
        B, splits = self.B, self.splits
        self.launch(kernel, lambda meta: (triton.cdiv(B, meta["BLOCK_B"]), splits), **named)

    def merge(self, kernel, **named):
        """A merge of the splits' partial results: merge_rows(D) anchors per program."""
        rows = merge_rows(self.D)
        self.launch(kernel, (triton.cdiv(self.B, rows),), num_warps=4, ROWS=rows, **named)

    def split_k(self, kernel, merge, **named):
        """stream(kernel) then merge(merge); each takes the names it declares from `named`
        (the workspaces both, the outputs the merge)."""
        self.stream(kernel, **named)
        self.merge(merge, **named)

    def sum_forward(self, kernel, table, need_grad, splits=None, **named):
        """The forward of a loss whose splits simply add up: `kernel` writes loss rows, counts
        and dX (loss_ptr, counts_ptr, grad_ptr) per split, sum_merge_kernel adds them in split
        order. With one split the kernel writes the outputs directly."""
        loss, grad, counts = self.outputs(need_grad)
        if self.B == 0:
            return loss, grad, counts
        need_grad = bool(need_grad)
        if self.plan(table, splits) == 1:
            self.stream(kernel, loss_ptr=loss, counts_ptr=counts, grad_ptr=grad, NEED_GRAD=need_grad, **named)
            return loss, grad, counts
        ws = dict(loss_ws=self.workspace(self.B), counts_ws=self.workspace(self.B, 2, dtype=torch.int32),
                  grad_ws=self.grad_workspace(grad, need_grad))
        self.stream(kernel, loss_ptr=ws["loss_ws"], counts_ptr=ws["counts_ws"], grad_ptr=ws["grad_ws"],
                    NEED_GRAD=need_grad, **named)
        self.merge(sum_merge_kernel, loss_ptr=loss, counts_ptr=counts, grad_ptr=grad, NEED_GRAD=need_grad, **ws)
        return loss, grad, counts

    def ref_grad(self, kernel, grad, g, **named):
        """(grad_x, grad_ref) of the backward for per-row weights g: the forward's gradient
        scaled row by row, and `kernel` over tiles of the ref_valid reference rows (gref_ptr;
        each program owns a tile of rows and streams the anchors: no two programs write one
        row); rows from ref_valid on are zero."""
        grad_x = grad.mul_(g[:, None])
        grad_ref = torch.zeros(self.N, self.D, dtype=torch.float32, device=self.x.device)
        if self.B == 0 or self.ref_valid == 0:
            return grad_x, grad_ref
        n = self.ref_valid
        self.launch(kernel, lambda meta: (triton.cdiv(n, meta["BLOCK_K"]),), gref_ptr=grad_ref,
                    N_BUCKET=cols_bucket(n), **named)
        return grad_x, grad_ref


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


CANDIDATE_ROWS = 16  # the smallest BLOCK_B of every forward table: sizes the candidate lists (candidate_ws)


def candidate_ws(call_B: int, splits: int, cols_per_split: int, device) -> torch.Tensor:
    """Scratch for the candidate lists of gather_candidates: one region of cols_per_split
    column indices per (anchor tile, split), for tiles of at least CANDIDATE_ROWS anchors."""
    tiles = triton.cdiv(max(call_B, 1), CANDIDATE_ROWS)
    return torch.empty(tiles * splits * cols_per_split, dtype=torch.int32, device=device)


@triton.jit
def gather_candidates(z_ptr, yi, self_col, row_ok, col_start, col_end, idx_ptr, HAS_SELF_INDEX: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """The positives-first scan: reads only the labels of a split's columns [col_start,
    col_end) and writes to idx_ptr, in column order, the columns that share a label with some
    anchor of the tile (other than its self column); returns how many. No row of R is read.
    Ends with a barrier, so that every thread of the program then reads the whole list."""
    count = tl.full([], 0, tl.int32)
    for k0 in range(col_start, col_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < col_end
        zj = tl.load(z_ptr + cols, mask=col_ok, other=0)
        same = row_ok[:, None] & col_ok[None, :] & (yi[:, None] == zj[None, :])
        if HAS_SELF_INDEX:
            same = same & (cols[None, :] != self_col[:, None])
        hit = tl.max(same.to(tl.int32), axis=0)
        tl.store(idx_ptr + count + tl.cumsum(hit, axis=0) - 1, cols, mask=hit > 0)
        count += tl.sum(hit, axis=0)
    tl.debug_barrier()
    return count


@triton.jit
def anchor_program(x_ptr, y_ptr, r_ptr, si_ptr, B, D, HAS_SELF_INDEX: tl.constexpr, X_LIMBS: tl.constexpr,
                   LO_SCALE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr):
    """The anchor side of a program whose grid axis 0 is tiles of BLOCK_B anchors: its rows, their
    bounds mask and int64 offsets, the dims of D and their mask, and the anchor tile
    (anchor_tile: x and its 16-bit parts, the labels, each anchor's own column)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    x, x_hi, x_mid, x_lo, yi, self_col = anchor_tile(x_ptr, y_ptr, si_ptr, rows, row_ok, dims, dim_ok, D,
                                                      r_ptr.dtype.element_ty, HAS_SELF_INDEX, X_LIMBS, LO_SCALE)
    return rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col


@triton.jit
def candidate_program(x_ptr, y_ptr, r_ptr, z_ptr, si_ptr, idx_ws, B, D, n, cols_per_split, splits,
                      HAS_SELF_INDEX: tl.constexpr, X_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """The start of a positives kernel (grid: anchor tiles x splits of the memory): the program's
    split, its anchor rows and their tile (anchor_tile), and the candidate list of the split's
    columns (gather_candidates) in the program's region of idx_ws, with its length."""
    pid_s = tl.program_id(1)
    rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col = anchor_program(
        x_ptr, y_ptr, r_ptr, si_ptr, B, D, HAS_SELF_INDEX, X_LIMBS, LO_SCALE, BLOCK_D, BLOCK_B)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n)
    idx_ptr = idx_ws + (tl.program_id(0).to(tl.int64) * splits + pid_s) * cols_per_split
    count = gather_candidates(z_ptr, yi, self_col, row_ok, col_start, col_end, idx_ptr, HAS_SELF_INDEX, BLOCK_K)
    return pid_s, rows, row_ok, rows64, dims, dim_ok, x, x_hi, x_mid, x_lo, yi, self_col, idx_ptr, count


@triton.jit
def candidate_tile(x_hi, x_mid, x_lo, r_ptr, z_ptr, idx_ptr, c0, count, yi, self_col, row_ok, dims, dim_ok, D,
                   PRECISION: tl.constexpr, HAS_SELF_INDEX: tl.constexpr, BLOCK_K: tl.constexpr,
                   X_LIMBS: tl.constexpr, LO_SCALE: tl.constexpr):
    """Entries c0 .. c0 + BLOCK_K of a candidate list (gather_candidates) of `count`: the
    (rows x cols) mask of valid same-label pairs (P once S < 1 - pos_eps), their rows of R and
    S = X R^T on them (scores: the same products as memory_tile's). A list read by the same
    tile sizes always gives the same tiles, so the same S."""
    k = c0 + tl.arange(0, BLOCK_K)
    ok = k < count
    cols = tl.load(idx_ptr + k, mask=ok, other=0)
    zj = tl.load(z_ptr + cols, mask=ok, other=0)
    same = row_ok[:, None] & ok[None, :] & (yi[:, None] == zj[None, :])
    if HAS_SELF_INDEX:
        same = same & (cols[None, :] != self_col[:, None])
    r = tl.load(r_ptr + cols.to(tl.int64)[:, None] * D + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
    s = scores(x_hi, x_mid, x_lo, r, PRECISION, X_LIMBS, LO_SCALE)
    return same, r, s


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
