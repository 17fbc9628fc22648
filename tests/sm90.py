"""Ahead-of-time compilation of the Triton kernels for sm_90 without a GPU, and what ptxas
made of them: shared memory (Triton's metadata), registers and stack (spills) per thread
(cuobjdump's resource usage of the cubin). Used by tests/test_compile_triton.py; run as a
script it prints the table of every (kernel, configuration) the launchers' prunes keep (with
--all, every configuration of the kernels' tables, kept or not: the measurements the prune's
model is calibrated on):

    python tests/sm90.py [--kernels NAME ...] [--dims D ...] [--operands OP ...] [--all] [--csv FILE]

Not a test file: no test here."""
import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # the most shared memory one block may opt into on sm_90
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (x, ref) dtypes and PRECISION of the products: fp32 on FMA units or TF32, 16-bit, fp32 anchors
# in 16-bit limbs (2 for fp16, 3 for bf16)
OPERANDS = {"fp32": (torch.float32, torch.float32, "ieee"), "fp32-tf32": (torch.float32, torch.float32, "tf32"),
            "bf16": (torch.bfloat16, torch.bfloat16, "ieee"),
            "fp32-on-fp16": (torch.float32, torch.float16, "ieee"),
            "fp32-on-bf16": (torch.float32, torch.bfloat16, "ieee")}
DIMS = (3, 17, 100, 128, 130, 256, 512, 1024, 2048)
FLOAT_SCALARS = {"alpha", "beta", "base", "mining_margin", "pos_thr", "margin", "inv_tau", "pos_margin", "m", "gamma",
                 "neg_margin", "select_low", "select_high"}
INT32_POINTERS = {"y_ptr", "z_ptr", "counts_ws", "counts_ptr", "idx_ws", "chosen_ptr", "mem_labels_ptr",
                  "labels_ptr", "count_ws", "pcount_ws"}
INT64_POINTERS = {"si_ptr", "slots_ptr", "active_ws"}
FLOAT64_POINTERS = {"loss_f64_ws"}


def jit_function(kernel):
    while not isinstance(kernel, JITFunction):  # through the autotuner
        kernel = kernel.fn
    return kernel


def signature(fn, x_dtype, ref_dtype):
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr") or name.endswith("_ws"):
            if name in INT32_POINTERS:
                sig[name] = "*i32"
            elif name in INT64_POINTERS:
                sig[name] = "*i64"
            elif name in FLOAT64_POINTERS:
                sig[name] = "*fp64"
            elif name in ("x_ptr", "emb_ptr"):
                sig[name] = "*" + TRITON_DTYPE[x_dtype]
            elif name in ("r_ptr", "mem_ptr"):
                sig[name] = "*" + TRITON_DTYPE[ref_dtype]
            else:
                sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return sig


def compile_kernel(kernel, x_dtype, ref_dtype, constexprs, num_warps=4, num_stages=2):
    """The CompiledKernel of `kernel` (a JITFunction or an autotuner) for sm_90."""
    fn = jit_function(kernel)
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    assert not missing, f"{fn.__name__}: no value for constexpr {missing}"
    used = {(fn.arg_names.index(k),): v for k, v in constexprs.items() if k in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature(fn, x_dtype, ref_dtype), constexprs=used)
    return triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))


def cuobjdump():
    """The cuobjdump Triton ships beside its ptxas (or one on PATH); None without either."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.access(bundled, os.X_OK) else shutil.which("cuobjdump")


def resources(compiled):
    """(shared bytes, registers per thread, stack bytes per thread: spills) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(compiled.metadata.shared), int(m.group(1)), int(m.group(2))


@functools.lru_cache(maxsize=None)
def _modules():
    from xbm_kernels.triton import _common, circle, contrastive, contrastive_l2, multi_similarity, ntxent, supcon
    from xbm_kernels.triton import margin, triplet, triplet_all
    return _common, contrastive, contrastive_l2, multi_similarity, ntxent, supcon, triplet, circle, triplet_all, margin


def autotuned_kernels():
    """{name: (autotuned kernel, extra constexprs)}: every kernel whose configuration the launcher
    chooses (multi-similarity's forward and reference-side kernels with mining on and off, its
    positives kernel in both phases; circle's kernels in both forms, the second the generalized
    lifted structure loss's)."""
    _, c, l2, ms, nx, sc, tr, ci, ta, mg = _modules()
    return {
        "contrastive_fwd": (c.contrastive_fwd_kernel, {}),
        "contrastive_ref_grad": (c.contrastive_ref_grad_kernel, {}),
        "contrastive_l2_fwd": (l2.contrastive_l2_fwd_kernel, {"WEIGHTED": False}),
        "contrastive_l2_ref_grad": (l2.contrastive_l2_ref_grad_kernel, {"WEIGHTED": False}),
        "margin_fwd": (l2.contrastive_l2_fwd_kernel, {"WEIGHTED": True}),  # margin: contrastive_l2's, weighted
        "margin_ref_grad": (l2.contrastive_l2_ref_grad_kernel, {"WEIGHTED": True}),
        "margin_pos": (mg.margin_pos_kernel, {}),  # margin's positives over the candidate rows
        "multi_similarity_pos": (ms.multi_similarity_pos_kernel, {"FINISH": False}),
        "multi_similarity_pos-finish": (ms.multi_similarity_pos_kernel, {"FINISH": True}),
        "multi_similarity_fwd-mine": (ms.multi_similarity_fwd_kernel, {"MINE": True}),
        "multi_similarity_fwd": (ms.multi_similarity_fwd_kernel, {"MINE": False}),
        "multi_similarity_ref_grad-mine": (ms.multi_similarity_ref_grad_kernel, {"MINE": True}),
        "multi_similarity_ref_grad": (ms.multi_similarity_ref_grad_kernel, {"MINE": False}),
        "supcon_fwd": (sc.supcon_fwd_kernel, {"NCA": False}),
        "supcon_ref_grad": (sc.supcon_ref_grad_kernel, {"NCA": False}),
        "nca_fwd": (sc.supcon_fwd_kernel, {"NCA": True}),
        "nca_ref_grad": (sc.supcon_ref_grad_kernel, {"NCA": True}),
        "ntxent_fwd": (nx.ntxent_fwd_kernel, {}),
        "ntxent_pos": (nx.ntxent_pos_kernel, {"ANGULAR": False}),
        "ntxent_ref_grad": (nx.ntxent_ref_grad_kernel, {"ANGULAR": False}),
        "triplet_hardest": (tr.triplet_hardest_kernel, {}),
        "circle_fwd": (ci.circle_fwd_kernel, {"LIFTED": False}),
        "circle_ref_grad": (ci.circle_ref_grad_kernel, {"LIFTED": False}),
        "generalized_lifted_fwd": (ci.circle_fwd_kernel, {"LIFTED": True}),
        "generalized_lifted_ref_grad": (ci.circle_ref_grad_kernel, {"LIFTED": True}),
        # tuplet_margin runs ntxent's kernels with the positive's angular logit
        "tuplet_margin_pos": (nx.ntxent_pos_kernel, {"ANGULAR": True}),
        "tuplet_margin_ref_grad": (nx.ntxent_ref_grad_kernel, {"ANGULAR": True}),
        "triplet_all_fwd": (ta.triplet_all_fwd_kernel, {}),
        "triplet_all_pos_counts": (ta.triplet_all_pos_counts_kernel, {}),
        "triplet_all_ref_grad": (ta.triplet_all_ref_grad_kernel, {}),
    }


def kept_configs(kernel, D, operands, count=4096, extra=None):
    """The configurations the launcher's prune keeps for `kernel` at D with `operands`
    (a key of OPERANDS), `count` anchors (reference rows for reference-side kernels) and the
    `extra` constexprs of autotuned_kernels() (a prune may read them: supcon's reads NCA)."""
    _common = _modules()[0]
    x_dtype, ref_dtype, precision = OPERANDS[operands]
    fn = jit_function(kernel)
    limbs = _common.operand_limbs(x_dtype, ref_dtype)
    kwargs = dict(BLOCK_D=_common.block_d(D), PRECISION=precision, **limbs, **(extra or {}))
    nargs = {"r_ptr": torch.empty(0, dtype=ref_dtype), "x_ptr": torch.empty(0, dtype=x_dtype), "B": count, "n": count,
             "D": D}
    prune = kernel.early_config_prune
    configs = prune(kernel.configs, nargs, **kwargs) if prune else kernel.configs
    assert "BLOCK_B" in fn.arg_names
    return configs


def constexprs(operands, **values):
    """Constexprs of a compile with `operands` (a key of OPERANDS): every feature flag on, the
    operands' precision and limbs, then `values`."""
    x_dtype, ref_dtype, precision = OPERANDS[operands]
    c = dict(HAS_SELF_INDEX=True, NEED_GRAD=True, MINE=True, FINISH=True, SKIP_INCOMPLETE=False, WEIGHTED=True,
             NCA=False, PRECISION=precision)
    c.update(_modules()[0].operand_limbs(x_dtype, ref_dtype))
    c.update(values)
    return c


def measure(name, D, operands, config):
    kernel, extra = autotuned_kernels()[name]
    c = constexprs(operands, BLOCK_D=_modules()[0].block_d(D), **extra, **config.kwargs)
    compiled = compile_kernel(kernel, *OPERANDS[operands][:2], c, config.num_warps, config.num_stages)
    return resources(compiled)


def config_tuple(config):
    """(BLOCK_B, BLOCK_K, num_warps, num_stages) of a triton.Config."""
    return config.kwargs["BLOCK_B"], config.kwargs["BLOCK_K"], config.num_warps, config.num_stages


def table(dims=DIMS, operands=tuple(OPERANDS), names=None, out=sys.stdout, every=False, configs=None):
    """Compiles every kept (kernel, configuration) once per BLOCK_D (every=True: every
    configuration of the table, kept or not; configs: these (first, second, warps, stages)
    rows instead) and prints a CSV row each; returns the rows."""
    _common = _modules()[0]
    rows = []
    seen = set()
    print(f"# triton {triton.__version__}, sm_90; spill: stack bytes per thread; kept: the prune keeps it",
          file=out, flush=True)
    print("kernel,D,operands,BLOCK_B,BLOCK_K,warps,stages,kept,shared,regs,spill,seconds", file=out, flush=True)
    for name in names or autotuned_kernels():
        kernel, extra = autotuned_kernels()[name]
        for op in operands:
            for D in dims:
                kept = [config_tuple(c) for c in kept_configs(kernel, D, op, extra=extra)]
                todo = kernel.configs if every else kept_configs(kernel, D, op, extra=extra)
                if configs:
                    first, second = list(kernel.configs[0].kwargs)
                    todo = [triton.Config({first: a, second: b}, num_warps=w, num_stages=st) for a, b, w, st in configs]
                for cfg in todo:
                    cfg_t = config_tuple(cfg)
                    key = (name, op, _common.block_d(D), cfg_t)
                    if key in seen:
                        continue
                    seen.add(key)
                    t = time.time()
                    try:
                        shared, regs, spill = measure(name, D, op, cfg)
                    except Exception as exc:  # noqa: BLE001 (a config that does not compile is a result)
                        shared, regs, spill = -1, -1, -1
                        print(f"# {name} D={D} {op} {cfg_t}: {type(exc).__name__}: {str(exc)[:200]}", file=out)
                    row = (name, D, op, *cfg_t, int(cfg_t in kept), shared, regs, spill, round(time.time() - t, 1))
                    rows.append(row)
                    print(",".join(map(str, row)), file=out, flush=True)
    return rows


class _Tee:
    """A file that also prints what is written to it."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        sys.stdout.write(text)
        return self.f.write(text)

    def flush(self):
        sys.stdout.flush()
        self.f.flush()


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    # this checkout's package, not an installed one (sys.path[0] is tests/ for a script)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, nargs="*", default=list(DIMS))
    ap.add_argument("--operands", nargs="*", default=list(OPERANDS))
    ap.add_argument("--kernels", nargs="*", default=None)
    ap.add_argument("--all", action="store_true", help="every configuration of the tables, kept or not")
    ap.add_argument("--configs", nargs="*", default=None,
                    help="configurations to measure instead, as first,second,warps,stages (e.g. 16,32,8,2)")
    ap.add_argument("--csv", default=None, help="write the table to this file too")
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs] if args.configs else None
    with open(args.csv or os.devnull, "w") as f:
        table(args.dims, args.operands, args.kernels, _Tee(f), args.all, configs)
