"""How the benchmark measures: time, peak extra memory, the machine's ceilings, and the
run's identity (device, versions, commit).

Time
  GPU: triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]) (it also flushes L2
       between calls).
  CPU: torch.utils.benchmark.Timer(...).adaptive_autorange(), run with the process's own
       thread count (Timer defaults to one thread), quantiles over its measured blocks.
  Both: a call estimated at 0.2 s or more is timed three times instead (see bench_ms).
Peak extra memory, for one call after warm-up
  GPU: torch.cuda.max_memory_allocated() during the call minus memory_allocated() before.
  CPU: the torch profiler's memory events (profile_memory=True): every allocation and
       free made through torch's CPU allocator, in time order; the peak of their running
       sum. Memory that bypasses the allocator (BLAS scratch, std::vector) is not seen.
"""
import contextlib
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
import torch

QUANTILES = (0.5, 0.2, 0.8)


class Skip(Exception):
    """A case not run; its message goes into the ms_median column."""


def is_oom(exc):
    text = str(exc).lower()
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom_type) or "out of memory" in text or "can't allocate memory" in text


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- time

def time_once(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_ms(fn, device, *, estimate_s=None, min_run_time=0.3, max_run_time=3.0):
    """(median, p20, p80) in milliseconds. Calls estimated at 0.2 s or more (the slow
    dense baselines) are timed three times, one call each, so a sweep stays bounded; on
    GPU faster calls go to do_bench, on CPU to adaptive_autorange (at least 4 blocks,
    until the IQR is within 10% of the median or max_run_time)."""
    slow = estimate_s is not None and estimate_s >= 0.2
    if device.type == "cuda":
        if slow:
            times = [time_once(fn, device) for _ in range(3)]
            return tuple(float(v) for v in np.quantile(np.asarray(times) * 1e3, QUANTILES))
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, quantiles=list(QUANTILES))
        return float(med), float(p20), float(p80)
    from torch.utils.benchmark import Timer
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if slow:
        times = [timer.timeit(1).times[0] for _ in range(3)]
    else:
        times = timer.adaptive_autorange(threshold=0.1, min_run_time=min_run_time, max_run_time=max_run_time).times
    q = np.quantile(np.asarray(times) * 1e3, QUANTILES)
    return float(q[0]), float(q[1]), float(q[2])



def interleaved_ms(fns, device, *, min_run_time=1.0, min_calls=5):
    """{name: median ms} of callables timed in alternating order (A B, then B A, ...), one
    call each per round, until each has run min_calls times and min_run_time seconds: the
    machine's drift falls on all of them alike, so their ratios hold within one run."""
    names, times = list(fns), {name: [] for name in fns}
    r = 0
    while r < min_calls or min(sum(t) for t in times.values()) < min_run_time:
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(time_once(fns[name], device))
        r += 1
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}

# ---------------------------------------------------------------- memory

@contextlib.contextmanager
def _quiet_fd2():
    """Silences file descriptor 2 (the profiler's native start/stop log lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn):
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_fd2():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, out


def peak_extra_mb(fn, device):
    """(peak extra MB during one call of fn, fn's result)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20, out
    peak, out = _cpu_peak_bytes(fn)
    return peak / 2 ** 20, out


# ---------------------------------------------------------------- machine

def last_level_cache_bytes(device):
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20))
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            unit = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
    except (OSError, ValueError):
        pass
    return max(sizes) if sizes else 32 * 2 ** 20


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def total_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2 ** 30


def run_identity(device, repo_root):
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    commit = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo_root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty and commit != "unknown":
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "device": slug(device_name(device)),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_cpu_csv(path, rows):
    """Writes `rows` (dicts with the same keys) to the CSV `path`, each with this CPU run's
    identity (device, versions, commit, date) appended."""
    import csv
    ident = run_identity(torch.device("cpu"), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(ident))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **ident})
    print("wrote", path)


# ---------------------------------------------------------------- ceilings

def _unit_rows(n, d, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=device), dim=1).to(dtype)


def gemm_tflops(B, K, D, dtype, device, timing):
    """Measured rate of S = X M^T, (B x D) @ (D x K), on this device: the ceiling a fused
    loss is compared with on the CPU. Returns (median ms, TFLOP/s)."""
    x = _unit_rows(B, D, dtype, device, 1)
    m = _unit_rows(K, D, dtype, device, 2)
    ms = bench_ms(lambda: torch.mm(x, m.T), device, **timing)
    return ms, 2 * B * K * D / (ms[0] * 1e-3) / 1e12


def machine_ceilings(device, timing, big=None):
    """Peak rates measured now: large square matmuls (TFLOP/s) and a device-to-device copy
    (GB/s, bytes read + written). On GPU these are the roofline's ceilings."""
    n = big or (8192 if device.type == "cuda" else 2048)
    out = {}
    dtypes = {"mm-bf16": torch.bfloat16, "mm-fp32": torch.float32}
    for name, dtype in dtypes.items():
        a = _unit_rows(n, n, dtype, device, 3)
        b = _unit_rows(n, n, dtype, device, 4)
        ms = bench_ms(lambda: torch.mm(a, b), device, **timing)
        out[name] = {"n": n, "ms": ms, "tflops": 2 * n ** 3 / (ms[0] * 1e-3) / 1e12}
        del a, b
    elems = (2 ** 28 if device.type == "cuda" else 2 ** 26) if big is None else big * big
    src = torch.rand(elems, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, **timing)
    out["copy"] = {"elems": elems, "ms": ms, "gbps": 2 * elems * 4 / (ms[0] * 1e-3) / 1e9}
    return out
