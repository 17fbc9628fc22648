"""Self-check of this install: `python -m xbm_kernels.check` (run it first on a new machine).

On whatever machine it runs (CPU only, or with a CUDA GPU) it checks every available
backend x loss (xk.available_backends(), the registry's LOSSES) and the enqueue:

1. values: small random cases (unit rows; a full and a partly filled reference set; a
   batch against itself with self_index, as XBMLoss's in-batch loss; a bf16 memory) against
   the reference backend computed in float64: per-anchor losses, the "mean", the active-pair
   counts (exactly), the gradient of the anchors and of the reference rows. The data is
   redrawn until no pair lies within 1e-4 of a decision threshold of the loss, so a
   difference is a bug, not a rounding that flips a set.
2. the enqueue of every backend against the ring-buffer rule, bit for bit;
3. torch.library.opcheck (schema, fake, autograd registration, AOT dispatch) of every
   kernel backend's ops: the C++ CPU ops, and the CUDA and Triton ops where available;
4. a short timing of the fused backends against the dense reference at one realistic shape
   (forward + backward of a memory loss; --no-bench skips it).

It prints one table per part and exits with status 1 when anything mismatched. Values are
checked with torch.set_float32_matmul_precision("highest") (IEEE fp32 products); the timing
uses the precision that was set when the check started. It depends on nothing outside the
package (the test suite has its own, fuller oracle).
"""
import argparse
import math
import platform
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import xbm_kernels as xk
from . import backends
from .losses import compute
from .memory import CrossBatchMemory
from .registry import LOSSES

# fp32 results against the float64 reference: max |error| / max(max |expected|, FLOOR).
# FLOOR = 1.0 is one pair's contribution, so nearly cancelling results ask no more than fp32
# holds. 16-bit outputs (the gradient of a bf16 memory) are rounded once: 2^-8 relative.
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}
FLOOR = 1.0
THRESHOLD_GAP = 1e-4

# name: (B, N, D, classes, ref_valid, kind, memory dtype; "16-bit": bf16, or fp16 under the Triton
# interpreter, whose fp32 -> bf16 conversion truncates and whose bf16 tl.dot is unreliable)
#   kind "memory": anchors against a separate reference set (the memory), own copies at
#   self_index; "in-batch": the batch against itself, self_index = arange(B), gradients to
#   both sides through the same tensor.
CASES = {
    "B8-N40-D8": (8, 40, 8, 3, 40, "memory", torch.float32),
    "B12-N150-D40-partial": (12, 150, 40, 5, 110, "memory", torch.float32),
    "B16-in-batch-D130": (16, 16, 130, 4, 16, "in-batch", torch.float32),
    "B9-N120-D64-16bit-memory": (9, 120, 64, 4, 97, "memory", "16-bit"),
}
QUICK_CASES = ("B12-N150-D40-partial", "B16-in-batch-D130")


# --------------------------------------------------------------------------- the data


def _threshold_gap(loss, params, S, same, valid):
    """The smallest distance of a valid pair from a decision boundary of `loss` (float64)."""
    p = dict(zip(LOSSES[loss].defaults, params))
    inf = torch.tensor(math.inf, dtype=S.dtype)
    pos = valid & same & (S < 1 - p["pos_eps"])
    neg = valid & ~same
    gaps = [(S - (1 - p["pos_eps"])).abs()[valid & same]]
    if loss == "contrastive":
        gaps.append((S - p["margin"]).abs()[neg])
    elif loss == "contrastive_l2":
        d = (2 - 2 * S).clamp_min(0).sqrt()
        gaps += [(d - p["pos_margin"]).abs()[pos], (d - p["neg_margin"]).abs()[neg]]
    elif loss in ("multi_similarity", "triplet"):
        max_n = torch.where(neg, S, -inf).amax(1, keepdim=True)
        min_p = torch.where(pos, S, inf).amin(1, keepdim=True)
        both = (pos.any(1) & neg.any(1))[:, None]
        if loss == "multi_similarity":
            m = p["mining_margin"]
            gaps += [(S - m - max_n).abs()[pos & both], (S + m - min_p).abs()[neg & both]]
        else:  # the hardest pairs must be unique, and the hinge away from 0
            for mask, sign in ((neg, 1.0), (pos, -1.0)):
                top = torch.where(mask, sign * S, -inf).topk(min(2, S.shape[1]), dim=1).values
                ok = mask.sum(1) >= 2
                if S.shape[1] >= 2:
                    gaps.append((top[:, 0] - top[:, 1])[ok])
            gaps.append((max_n - min_p + p["margin"]).abs()[both])
    gaps = torch.cat([g.flatten() for g in gaps])
    return float(gaps.min()) if gaps.numel() else math.inf


def low_dtype(backend, device):
    """The 16-bit memory dtype checked for a backend on a device."""
    return torch.float16 if backend == "triton" and str(device) == "cpu" else torch.bfloat16


def make_case(loss, name, seed, low=torch.bfloat16):
    """(x fp32, y, r, z, ref_valid, self_index) of case `name`, away from `loss`'s thresholds;
    r is x itself for an in-batch case; `low` is the dtype of a "16-bit" memory."""
    B, N, D, C, n, kind, mem_dtype = CASES[name]
    mem_dtype = low if mem_dtype == "16-bit" else mem_dtype
    params = LOSSES[loss].values({})
    g = torch.Generator().manual_seed(seed)
    # Rows live in a random 6-dimensional subspace of R^D (dense coordinates): similarities
    # then spread over [-1, 1] as in a trained embedding, so positives and negatives overlap
    # and every loss has active pairs of both kinds.
    sub = min(D, 6)
    basis = torch.linalg.qr(torch.randn(D, sub, generator=g, dtype=torch.float64))[0]
    centres = F.normalize(torch.randn(C, sub, generator=g, dtype=torch.float64), dim=1)
    for _ in range(200):
        def rows(labels, spread):
            noise = F.normalize(torch.randn(labels.shape[0], sub, generator=g, dtype=torch.float64), dim=1)
            return (F.normalize(centres[labels] + spread * noise, dim=1) @ basis.T).float()
        spread = float(torch.empty(()).uniform_(0.6, 1.0, generator=g))
        y = torch.randint(0, C, (B,), generator=g)
        x = rows(y, spread)
        if kind == "in-batch":
            r, z, si = x, y, torch.arange(B)
        else:
            z = torch.randint(0, C, (N,), generator=g)
            r = rows(z, spread)
            # the anchors' own copies sit in the memory at self_index (-1: not enqueued)
            si = torch.randperm(n, generator=g)[:B]
            si[torch.rand(B, generator=g) < 0.25] = -1
            r[si[si >= 0]] = x[si >= 0]
            z[si[si >= 0]] = y[si >= 0]
            r = r.to(mem_dtype)
        S = x.double() @ r.double().T
        cols = torch.arange(S.shape[1])
        valid = (cols[None, :] < n) & (cols[None, :] != si[:, None])
        if _threshold_gap(loss, params, S, y[:, None] == z[None, :], valid) > THRESHOLD_GAP:
            return x, y, r, z, n, si
    raise RuntimeError(f"check: could not draw case {name} away from the thresholds of {loss}")


# --------------------------------------------------------------------------- part 1: values


def _err(actual, expected, floor=FLOOR):
    expected = expected.double().cpu()
    if not expected.numel():
        return 0.0
    diff = (actual.detach().double().cpu() - expected).abs().max()
    return float(diff / expected.abs().max().clamp_min(floor))


def _run(loss, backend, device, x, y, r, z, n, si, in_batch, dtype=None):
    """(rows, mean, counts, grad_x, grad_r) of one backend; float64 on the reference with dtype."""
    xd = x.to(device, dtype or x.dtype).detach().requires_grad_()
    if in_batch:
        rd = xd
    else:
        rd = r.to(device, dtype or r.dtype).detach().requires_grad_()
    yd, zd, sid = y.to(device), z.to(device), si.to(device)
    rows, counts = compute(loss, xd, yd, rd, zd, ref_valid=n, self_index=sid, reduction="none", backend=backend)
    mean, _ = compute(loss, xd, yd, rd, zd, ref_valid=n, self_index=sid, reduction="mean", backend=backend)
    w = torch.linspace(0.5, 1.5, rows.shape[0], dtype=rows.dtype, device=device)  # uneven per-row weights
    inputs = (xd,) if in_batch else (xd, rd)
    grads = torch.autograd.grad((rows * w).sum(), inputs)
    gr = None if in_batch else grads[1]
    return rows.detach(), mean.detach(), counts, grads[0], gr


def check_values(loss, backend, device, case_names, seed=0):
    """{'loss', 'mean', 'grad_x', 'grad_ref': worst error, 'counts': mismatching anchors,
    'failed': [...]} over the cases."""
    worst = {"loss": 0.0, "mean": 0.0, "grad_x": 0.0, "grad_ref": 0.0, "grad_ref16": 0.0, "counts": 0}
    failed = []
    for i, name in enumerate(case_names):
        x, y, r, z, n, si = make_case(loss, name, seed + i, low_dtype(backend, device))
        in_batch = CASES[name][5] == "in-batch"
        ref = _run(loss, "reference", "cpu", x, y, r, z, n, si, in_batch, dtype=torch.float64)
        got = _run(loss, backend, device, x, y, r, z, n, si, in_batch)
        ref_key = "grad_ref" if r.dtype == torch.float32 else "grad_ref16"
        errs = {"loss": _err(got[0], ref[0]), "mean": _err(got[1], ref[1]), "grad_x": _err(got[3], ref[3]),
                ref_key: 0.0 if in_batch else _err(got[4], ref[4])}
        tol = {"loss": TOL[torch.float32], "mean": TOL[torch.float32], "grad_x": TOL[torch.float32],
               ref_key: TOL[r.dtype]}
        bad_counts = int((got[2].cpu() != ref[2]).any(1).sum())
        for k, e in errs.items():
            worst[k] = max(worst[k], e)
            if not e <= tol[k]:  # NaN fails too
                failed.append(f"{name}: {k} error {e:.3g} > {tol[k]:g}")
        worst["counts"] += bad_counts
        if bad_counts:
            failed.append(f"{name}: active-pair counts differ for {bad_counts} anchor(s)")
    worst["failed"] = failed
    return worst


# --------------------------------------------------------------------------- part 2: enqueue


def check_enqueue(backend, device, dtype):
    """Failures of the ring-buffer rule: three batches through a 50-row memory (wrapping),
    the second with a mask; rows cast to the memory dtype, labels int32, slots returned."""
    g = torch.Generator().manual_seed(1)
    size, dim = 50, 24
    mem = CrossBatchMemory(size, dim, dtype=dtype, device=device, backend=backend)
    want_e = torch.zeros(size, dim, dtype=dtype)
    want_l = torch.full((size,), -1, dtype=torch.int32)
    ptr, filled, failed = 0, 0, []
    for step, b in enumerate((20, 23, 19)):
        e = torch.randn(b, dim, generator=g)
        lab = torch.randint(0, 1000, (b,), generator=g)
        mask = (torch.rand(b, generator=g) < 0.7) if step == 1 else None
        slots = mem.enqueue(e.to(device), lab.to(device), None if mask is None else mask.to(device))
        keep = torch.ones(b, dtype=torch.bool) if mask is None else mask
        k = int(keep.sum())
        want_slots = (ptr + torch.arange(k)) % size
        want_e[want_slots] = e[keep].to(dtype)
        want_l[want_slots] = lab[keep].to(torch.int32)
        ptr, filled = (ptr + k) % size, min(size, filled + k)
        if not torch.equal(slots.cpu(), want_slots):
            failed.append(f"batch {step}: slots {slots.cpu().tolist()[:5]}..., expected {want_slots.tolist()[:5]}...")
        if not (torch.equal(mem.embeddings.cpu(), want_e) and torch.equal(mem.labels.cpu(), want_l)):
            failed.append(f"batch {step}: memory contents differ from the ring-buffer rule")
        if (len(mem), int(mem.ptr)) != (filled, ptr):
            failed.append(f"batch {step}: (filled, ptr) = {(len(mem), int(mem.ptr))}, expected {(filled, ptr)}")
    return failed


# --------------------------------------------------------------------------- part 3: opcheck


def check_opcheck(backend, device, loss):
    """Failures of torch.library.opcheck on <loss>_fwd, <loss>_bwd of a backend ("enqueue"
    for the enqueue op)."""
    ops = backends.kernel_ops(backend)
    g = torch.Generator().manual_seed(2)
    failed = []
    if loss == "enqueue":
        mem = torch.zeros(10, 4, device=device)
        lab = torch.full((10,), -1, dtype=torch.int32, device=device)
        calls = [("enqueue_", (mem, lab, torch.randn(7, 4, generator=g).to(device), torch.arange(7, device=device),
                               6))]
    else:
        spec = LOSSES[loss]
        x, y, r, z, n, si = make_case(loss, "B12-N150-D40-partial", 7)
        x, r = x.to(device), r.to(device)
        y, z, si = y.to(device, torch.int32), z.to(device, torch.int32), si.to(device)
        params = spec.values({})
        rows = torch.linspace(0.5, 1.5, x.shape[0], device=device)
        calls = [(f"{loss}_fwd", (x, y, r, z, si, n, *params, True, False)),
                 (f"{loss}_fwd", (x, y, r, z, None, n, *params, False, False)),
                 (f"{loss}_bwd", (x, y, r, z, si, n, *params, rows, False))]
    for name, args in calls:
        try:
            torch.library.opcheck(getattr(ops, name), args)
        except Exception as exc:  # report, keep going
            failed.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return failed


# --------------------------------------------------------------------------- part 4: timing


def _time_ms(fn, device):
    """Median milliseconds of fn()."""
    fn()  # warm-up (and Triton's autotuning)
    if device.type == "cuda":
        try:
            import triton.testing
            return float(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0])
        except ImportError:
            pass
    from torch.utils import benchmark
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.3)
    return m.median * 1e3


def bench(loss, backend, device, B, K, D, mem_dtype):
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(B, D, generator=g), dim=1).to(device).requires_grad_()
    y = torch.randint(0, B // 2, (B,), generator=g).to(device)
    r = F.normalize(torch.randn(K, D, generator=g), dim=1).to(device, mem_dtype)
    z = torch.randint(0, B // 2, (K,), generator=g).to(device)

    def step():
        out = getattr(xk, f"{loss}_loss")(x, y, r, z, backend=backend)
        out.backward()
        x.grad = None
    return _time_ms(step, device)


# --------------------------------------------------------------------------- driver


@contextmanager
def _matmul_precision(p):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(p)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _devices_for(backend):
    """The devices a backend is checked on here."""
    cuda = torch.cuda.is_available()
    if backend == "reference":
        return ["cpu"] + (["cuda"] if cuda else [])
    if backend == "cpu":
        return ["cpu"]
    if backend == "cuda":
        return ["cuda"]
    return ["cuda"] if cuda else ["cpu"]  # triton: CPU tensors only under TRITON_INTERPRET=1


def _machine():
    cpu = platform.processor() or platform.machine()
    text = f"CPU {cpu} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        text += f"; GPU {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2 ** 30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        text += "; no CUDA GPU"
    return text


def _table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line.format(*[str(c) for c in r]))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m xbm_kernels.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two cases per backend x loss, no opcheck, a short timing")
    p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the timing")
    p.add_argument("--no-opcheck", dest="opcheck", action="store_false", help="skip torch.library.opcheck")
    p.add_argument("--backends", nargs="+", default=None, help="check only these (default: every available one)")
    p.add_argument("--losses", nargs="+", default=None, choices=sorted(LOSSES), help="default: every loss")
    p.add_argument("--bench-shape", type=int, nargs=3, metavar=("B", "K", "D"), default=None,
                   help="timing shape (default: 256 16384 128 on the CPU, 256 65536 128 on a GPU)")
    a = p.parse_args(argv)

    available = xk.available_backends()
    chosen = [b for b in available if a.backends is None or b in a.backends]
    unknown = sorted(set(a.backends or ()) - set(available))
    losses = a.losses or list(LOSSES)
    cases = QUICK_CASES if a.quick else tuple(CASES)
    print(f"xbm_kernels {xk.__version__}, torch {torch.__version__}; {_machine()}")
    print(f"available backends: {', '.join(available)}" +
          (f" (asked for but not available: {', '.join(unknown)})" if unknown else ""))
    if "triton" not in available:
        why = ("triton is not installed" if not backends._HAS_TRITON else
               "no CUDA GPU; TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors, for testing, slowly")
        print(f"triton: not checked ({why})")
    if torch.cuda.is_available() and "cuda" not in available:
        print("cuda: not checked (the extension was built without the CUDA kernels, or the GPU is older than sm_80)")
    failures = []
    t0 = time.perf_counter()

    # 1. values
    print(f"\n1. values against the reference backend in float64 ({len(cases)} cases each: "
          f"{', '.join(cases)}); error = max |got - expected| / max(max |expected|, {FLOOR:g}); "
          f"fp32 tolerance {TOL[torch.float32]:g}; the gradient of a 16-bit memory {TOL[torch.bfloat16]:g} (bf16), "
          f"{TOL[torch.float16]:g} (fp16)")
    rows = []
    with _matmul_precision("highest"):
        for backend in chosen:
            for device in _devices_for(backend):
                for loss in losses:
                    if not backends.supports(backend, loss):
                        continue
                    try:
                        w = check_values(loss, backend, device, cases)
                    except Exception as exc:  # a crash is a failure of that row, the others still run
                        w = {"failed": [f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"]}
                    fmt = (lambda k: f"{w[k]:.1e}" if k in w else "-")
                    status = "ok" if not w["failed"] else "FAIL"
                    rows.append([backend, device, loss, fmt("loss"), fmt("mean"), fmt("grad_x"), fmt("grad_ref"),
                                 fmt("grad_ref16"), w.get("counts", "-"), status])
                    failures += [f"values {backend}/{device}/{loss}: {f}" for f in w["failed"]]
    _table(["backend", "device", "loss", "loss err", "mean err", "grad x err", "grad ref err", "16-bit grad ref err",
            "count diffs", "result"], rows)

    # 2. enqueue
    print("\n2. enqueue (three batches through a 50-row ring, one masked) against the ring-buffer rule, bit for bit")
    rows = []
    for backend in chosen:
        for device in _devices_for(backend):
            for dtype in (torch.float32, low_dtype(backend, device)):
                try:
                    f = check_enqueue(backend, device, dtype)
                except Exception as exc:
                    f = [f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"]
                rows.append([backend, device, str(dtype).replace("torch.", ""), "ok" if not f else "FAIL"])
                failures += [f"enqueue {backend}/{device}/{dtype}: {m}" for m in f]
    _table(["backend", "device", "memory dtype", "result"], rows)

    # 3. opcheck
    op_backends = [b for b in chosen if b != "reference"]
    if a.opcheck and not a.quick and op_backends:
        print("\n3. torch.library.opcheck (schema, fake tensor, autograd registration, AOT dispatch)")
        rows = []
        with _matmul_precision("highest"):
            for backend in op_backends:
                device = _devices_for(backend)[0]
                for loss in ["enqueue"] + [l for l in losses if backends.supports(backend, l)]:
                    f = check_opcheck(backend, device, loss)
                    rows.append([backend, device, loss, "ok" if not f else "FAIL"])
                    failures += [f"opcheck {backend}/{device}/{loss}: {m}" for m in f]
        _table(["backend", "device", "op", "result"], rows)
    else:
        print("\n3. opcheck: skipped (" + ("--no-opcheck" if not a.opcheck else "--quick" if a.quick else
                                           "no kernel backend here") + ")")

    # 4. timing
    if a.bench:
        gpu = torch.cuda.is_available()
        device = torch.device("cuda" if gpu else "cpu")
        B, K, D = a.bench_shape or ((256, 65536, 128) if gpu else (256, 16384, 128))
        if a.quick:
            K = min(K, 8192)
        fused = [b for b in chosen if b != "reference" and device.type in _devices_for(b)
                 and not (b == "triton" and not gpu)]
        bench_losses = losses if (gpu and not a.quick) or a.losses else \
            [l for l in ("multi_similarity", "contrastive") if l in losses]
        dtypes = (torch.float32, torch.bfloat16) if gpu else (torch.float32,)
        prec = torch.get_float32_matmul_precision()
        print(f"\n4. timing on {device.type.upper()}: one memory-loss step (forward + backward of the anchors), "
              f"B={B}, K={K}, D={D}, median ms; float32 matmul precision {prec!r}")
        rows = []
        columns = ["reference"] + fused
        for loss in bench_losses:
            for dtype in dtypes:
                times = {}
                for b in columns:
                    if not (b == "reference" or backends.supports(b, loss)):
                        continue
                    try:
                        times[b] = bench(loss, b, device, B, K, D, dtype)
                    except Exception as exc:  # e.g. the dense reference out of memory
                        print(f"  {loss} {b}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                ref = times.get("reference")
                rows.append([loss, str(dtype).replace("torch.", "")] +
                            [("-" if b not in times else f"{times[b]:.2f}" if b == "reference" or not ref else
                              f"{times[b]:.2f} ({ref / times[b]:.1f}x)") for b in columns])
        _table(["loss", "memory"] + [b if b == "reference" else f"{b} (speedup)" for b in columns], rows)
        if gpu and prec == "highest":
            print("note: an fp32 memory runs on the FMA units at precision 'highest' (IEEE fp32 products); "
                  "torch.set_float32_matmul_precision('high') lets it use TF32 tensor cores, and a bf16 memory "
                  "(memory_dtype=torch.bfloat16) uses bf16 tensor cores with fp32 accumulation.")
    else:
        print("\n4. timing: skipped (--no-bench)")

    print(f"\n{time.perf_counter() - t0:.1f} s.", end=" ")
    if failures:
        print(f"FAILED: {len(failures)} problem(s):")
        for f in failures:
            print("  " + f)
        return 1
    print("All checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
