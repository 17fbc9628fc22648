"""xbm-kernels benchmark: the memory loss and the enqueue of one XBM step, every provider
on the same inputs, in one run.

    python bench/bench.py                 # full sweep for this machine (GPU if present, else CPU)
    python bench/bench.py --smoke         # seconds on a CPU; what CI runs
    python bench/bench.py --device cpu --shapes 256,65536,128 --dtypes float32
    python bench/bench.py --loss-ratios   # CPU: every loss against contrastive and the GEMM rates

Writes <out>/<device>/bench.csv and one PNG per shape group, and prints a table. See
bench/README.md for the columns and for how time, memory and the ceilings are measured.
"""
import argparse
import gc
import itertools
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xbm_kernels as xk  # noqa: E402

import measure  # noqa: E402
import providers as P  # noqa: E402
import report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # run order

# (B, D, dtype) -> memory sizes K. The CPU sweep keeps to ~15 minutes on 2 cores: bf16 on
# one shape group only. The two CPU targets (256, 65536, 128) and (128, 32768, 128) are in it.
GPU_KS = [8192, 32768, 131072, 524288, 1048576]
GPU_SWEEP = {(B, D, dt): GPU_KS for dt in DTYPES for B, D in ((64, 128), (256, 512), (1024, 128))}
CPU_SWEEP = {(128, 128, "float32"): [4096, 16384, 32768, 65536],
             (256, 128, "float32"): [4096, 16384, 65536],
             (256, 128, "bfloat16"): [4096, 16384, 65536]}
SMOKE_SWEEP = {(16, 32, "float32"): [512]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, short timings, fp32 only (CI)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--losses", default=None, help="comma list; default: every loss in xk.LOSSES")
    p.add_argument("--providers", default=None,
                   help="comma list among reference,paper-loop,pml,cpu,triton,cuda; default: all available")
    p.add_argument("--modes", default=",".join(MODES), help="comma list among forward,backward,full")
    p.add_argument("--dtypes", default=None,
                   help="comma list among float32,bfloat16 (anchors and memory; default: those of the sweep)")
    p.add_argument("--shapes", default=None, help="'B,K,D;B,K,D...' instead of the built-in sweep")
    p.add_argument("--no-enqueue", action="store_true", help="skip the enqueue rows")
    p.add_argument("--max-dense-elems", type=float, default=None,
                   help="dense providers (reference, paper-loop, pml) are recorded as SKIP(too large) when "
                        "B*K exceeds this; default: none on GPU (OOM is caught), RAM/64 bytes on CPU")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="a provider whose single call takes longer is recorded SKIP(too slow) at this and "
                        "larger K (predicted linearly in K; default 5, 2 with --smoke)")
    p.add_argument("--min-run-time", type=float, default=None, help="CPU: seconds of timing per case at least")
    p.add_argument("--max-run-time", type=float, default=None, help="CPU: seconds of timing per case at most")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop starting new shapes after this many seconds (the CSV keeps what ran)")
    p.add_argument("--tag", default=None, help="write bench-<tag>.csv instead of bench.csv (split runs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="results root; files go to <out>/<device>/ (default bench/results, "
                        "bench/results/smoke with --smoke)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--loss-ratios", action="store_true",
                   help="CPU: every loss's forward+backward against the contrastive loss and the fp32 and bf16 "
                        "GEMM rates, in fp32, bf16 and fp32 anchors on a bf16 memory, interleaved in one run "
                        "(bench_cpu_losses.py; --shapes, --losses, --smoke apply): writes cpu-losses.csv")
    p.add_argument("--rounds", type=int, default=7, help="--loss-ratios: interleaved rounds (medians over them)")
    p.add_argument("--replot", metavar="CSV", default=None,
                   help="only redraw the plots (and summaries) of an existing bench CSV, next to it")
    return p.parse_args(argv)


def _load():
    """The 1/5/15-minute load averages: how busy the machine was (other work adds noise)."""
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _list(text, allowed, what):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise SystemExit(f"--{what}: unknown {bad}; expected among {list(allowed)}")
    return items


def sweep_groups(args, device, dtypes):
    """{(B, D, dtype name): [K, ...]} in run order (dtype, then shape group, then K)."""
    if args.shapes:
        groups = {}
        for part in args.shapes.split(";"):
            B, K, D = (int(v) for v in part.split(","))
            for dt in dtypes:
                groups.setdefault((B, D, dt), []).append(K)
        groups = {g: sorted(ks) for g, ks in groups.items()}
    else:
        groups = SMOKE_SWEEP if args.smoke else (GPU_SWEEP if device.type == "cuda" else CPU_SWEEP)
        groups = {g: ks for g, ks in groups.items() if g[2] in dtypes}
    return dict(sorted(groups.items(), key=lambda kv: list(DTYPES).index(kv[0][2])))


class Runner:
    def __init__(self, args, device, log, ceilings):
        self.args, self.device, self.log, self.ceilings = args, device, log, ceilings
        self.timing = {"min_run_time": args.min_run_time, "max_run_time": args.max_run_time}
        self.cache = measure.last_level_cache_bytes(device)
        self.last = {}  # case key (without K) -> (K, median ms) of its last run, for the too-slow guard
        self.errors = 0
        self.gemm_done = set()  # (B, K, D, dtype) whose S = X M^T row is written (once per shape)

    # --------------------------------------------------------- shared mechanics
    def _row(self, op, prov, B, K, D, dtype, mode, status=None, ms=None, peak=None, tflops=None, frac=None):
        ms = ms or (None, None, None)
        return self.log.add(op=op, provider=prov, B=B, K=K, D=D, dtype=str(dtype).replace("torch.", ""),
                            mode=mode, ms_median=status if status else ms[0], ms_p20=ms[1], ms_p80=ms[2],
                            peak_mem_mb=peak, tflops=tflops, roofline_frac=frac)

    def _measure(self, key, K, call, mem_call):
        """The too-slow guard, peak memory, then the timing. Returns (ms, peak MB, value).
        GPU: a warm-up call (Triton compiles and autotunes there), one timed call for the
        guard, then the memory call. CPU: nothing compiles, so the memory call comes first
        and its wall time is the guard's estimate (the profiler was started once already;
        its per-op cost only makes the estimate a little high); that saves one call of
        each slow dense provider."""
        if self.device.type == "cuda":
            call()
            est = measure.time_once(call, self.device)
            self._guard(key, K, est)
            peak, out = measure.peak_extra_mb(mem_call, self.device)
        else:
            t0 = time.perf_counter()
            peak, out = measure.peak_extra_mb(mem_call, self.device)
            est = time.perf_counter() - t0
            self._guard(key, K, est)
        ms = measure.bench_ms(call, self.device, estimate_s=est, **self.timing)
        self.last[key] = (K, ms[0])
        return ms, peak, out

    def _guard(self, key, K, est):
        if est > self.args.max_call_s:
            self.last[key] = (K, est * 1e3)
            raise measure.Skip(f"SKIP(too slow: {est:.1f} s)")

    def _predict(self, key, K):
        """Skips a case whose time at a smaller K, scaled linearly to this K, is too slow."""
        if key in self.last:
            k0, ms0 = self.last[key]
            predicted = ms0 * 1e-3 * K / k0
            if predicted > self.args.max_call_s:
                raise measure.Skip(f"SKIP(too slow: ~{predicted:.0f} s predicted)")

    def _guarded(self, fields, body):
        """Runs body() -> row fields; records OOM / SKIP / ERROR rows instead of stopping."""
        try:
            return body()
        except measure.Skip as s:
            return self._row(*fields, status=str(s))
        except Exception as exc:  # recorded, and the sweep goes on
            if measure.is_oom(exc):
                status = "OOM"
                exc = None
                gc.collect()
            else:
                self.errors += 1
                status = f"ERROR({type(exc).__name__})"
                print(f"error in {fields}:", file=sys.stderr)
                traceback.print_exc()
            return self._row(*fields, status=status)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _rates(self, B, K, D, dtype, mode, ms, flops, nbytes):
        if flops is None or ms is None:
            return None, None
        tflops = flops / (ms * 1e-3) / 1e12
        if self.device.type == "cuda":
            peak = self.ceilings["mm-bf16" if dtype == torch.bfloat16 else "mm-fp32"]["tflops"]
            t_roof = max(flops / (peak * 1e12), nbytes / (self.ceilings["copy"]["gbps"] * 1e9))
            return tflops, t_roof * 1e3 / ms
        # CPU: the fraction of this machine's fp32 GEMM rate (a 2048^3 matmul measured in the
        # same run). The same-shape S = X M^T GEMM is no ceiling: its B x K output makes it
        # memory-bound, so a fused kernel that never writes S can beat it.
        return tflops, tflops / self.ceilings["mm-fp32"]["tflops"]

    # --------------------------------------------------------- cases
    def gemm(self, B, K, D, dtype):
        """The same-shape S = X M^T alone (fp32 on the CPU, the run's dtype on GPU): a
        reference point in the table, not the CPU ceiling (see _rates)."""
        dtype = torch.float32 if self.device.type == "cpu" else dtype
        if (B, K, D, dtype) in self.gemm_done:
            return
        self.gemm_done.add((B, K, D, dtype))

        def body():
            ms, rate = measure.gemm_tflops(B, K, D, dtype, self.device, self.timing)
            frac = None
            if self.device.type == "cuda":
                e = torch.tensor([], dtype=dtype).element_size()
                frac = self._rates(B, K, D, dtype, "forward", ms[0], 2 * B * K * D, (K * D + B * D + B * K) * e)[1]
            return self._row("gemm", "torch.mm", B, K, D, dtype, "forward", ms=ms, tflops=rate, frac=frac)

        self._guarded(("gemm", "torch.mm", B, K, D, dtype, "forward"), body)

    def loss_case(self, loss, prov, fn, sets, mode, values):
        B, D = sets[0].x.shape
        K, dtype = sets[0].mem.shape[0], sets[0].mem.dtype
        fields = (loss, prov, B, K, D, dtype, mode)
        if fn is P.NOT_IMPLEMENTED:
            return self._row(*fields, status="SKIP(not implemented)")
        if prov in P.DENSE and B * K > self.args.max_dense_elems:
            return self._row(*fields, status="SKIP(too large)")

        key = (loss, prov, B, D, dtype, mode)

        def body():
            self._predict(key, K)
            turn = itertools.count()
            if mode == "forward":
                xs = [s.x.detach() for s in sets]

                def call():
                    i = next(turn) % len(sets)
                    return fn(sets[i], xs[i])
                mem_call = lambda: fn(sets[0], xs[0])  # noqa: E731
            elif mode == "backward":
                graphs = [fn(s, s.x) for s in sets]

                def call():
                    i = next(turn) % len(sets)
                    return torch.autograd.grad(graphs[i], sets[i].x, retain_graph=True)
                mem_call = lambda: torch.autograd.grad(graphs[0], sets[0].x, retain_graph=True)  # noqa: E731
            else:
                def call():
                    i = next(turn) % len(sets)
                    return torch.autograd.grad(fn(sets[i], sets[i].x), sets[i].x)
                mem_call = lambda: torch.autograd.grad(fn(sets[0], sets[0].x), sets[0].x)  # noqa: E731
            ms, peak, out = self._measure(key, K, call, mem_call)
            if mode == "forward":
                values[prov] = float(out)
            flops = P.nominal_flops(B, K, D, mode)
            tflops, frac = self._rates(B, K, D, dtype, mode, ms[0], flops, P.nominal_bytes(B, K, D, dtype, mode))
            return self._row(*fields, ms=ms, peak=peak, tflops=tflops, frac=frac)

        return self._guarded(fields, body)

    def enqueue_case(self, prov, sets):
        B, D = sets[0].x.shape
        K, dtype = sets[0].mem.shape[0], sets[0].mem.dtype
        fields = ("enqueue", prov, B, K, D, dtype, "forward")
        key = ("enqueue", prov, B, D, dtype)

        def body():
            self._predict(key, K)
            fn = P.enqueue_provider(prov, K, D, dtype, self.device)
            if fn is None:
                return None
            xs = [s.x.detach() for s in sets]
            turn = itertools.count()

            def call():
                i = next(turn) % len(sets)
                return fn(xs[i], sets[i].y)
            ms, peak, _ = self._measure(key, K, call, lambda: fn(xs[0], sets[0].y))
            frac = None
            if self.device.type == "cuda":
                e = torch.tensor([], dtype=dtype).element_size()
                moved = B * D * 2 * e + B * 12
                frac = moved / (self.ceilings["copy"]["gbps"] * 1e9) * 1e3 / ms[0]
            return self._row(*fields, ms=ms, peak=peak, frac=frac)

        return self._guarded(fields, body)

    def shape(self, B, K, D, dtype, losses, modes, provs):
        """Every case of one (B, K, D, dtype): the GEMM ceiling, each loss x mode x
        provider, the value check, the enqueue."""
        probe = P.make_inputs(B, K, D, dtype, self.device, self.args.seed)
        n_sets = P.rotation_count(probe.nbytes, self.cache)
        sets = [probe] + [P.make_inputs(B, K, D, dtype, self.device, self.args.seed + i) for i in range(1, n_sets)]
        self.gemm(B, K, D, dtype)
        for loss in losses:
            values = {}
            for mode in modes:
                for prov in provs:
                    fn = P.loss_provider(prov, loss)
                    if fn is not None:
                        self.loss_case(loss, prov, fn, sets, mode, values)
            try:
                self.check_values(loss, values, sets)
            except Exception as exc:  # the check is dense: it may not fit where the kernels do
                if not measure.is_oom(exc):
                    raise
                print(f"value check of {loss} skipped at B={B} K={K}: out of memory", flush=True)
        if not self.args.no_enqueue:
            for prov in provs:
                self.enqueue_case(prov, sets)

    def check_values(self, loss, values, sets):
        """Every provider's forward loss against the reference's (same inputs)."""
        if "reference" not in values:
            return
        ref = values["reference"]
        # bf16: the reference rounds S to bf16 (the kernels keep it in fp32), which moves
        # pairs across the margin; a loose bound still catches a wrong loss.
        tol = 1e-3 if sets[0].mem.dtype == torch.float32 else 0.1
        for prov, v in values.items():
            if prov == "reference":
                continue
            v = v + P.reference_value_offset(prov, loss, sets[0])
            rel = abs(v - ref) / max(abs(ref), 1e-6)
            if rel > tol:
                fatal = sets[0].mem.dtype == torch.float32
                self.errors += fatal
                print(f"{'MISMATCH' if fatal else 'warning'}: {loss} {prov} loss {v:.6g} vs reference {ref:.6g} "
                      f"(rel {rel:.2e} > {tol:g}) at B={sets[0].x.shape[0]} K={sets[0].mem.shape[0]}",
                      file=sys.stderr, flush=True)


def replot(path):
    rows = report.read_rows(path)
    losses = sorted({r["op"] for r in rows} - {"enqueue", "gemm", "ceiling"})
    report.speedup_summary(rows, losses)
    report.foundation_summary(rows, losses)
    for out in report.plot_groups(rows, os.path.dirname(os.path.abspath(path)), losses):
        print("plot:", os.path.relpath(out, os.getcwd()))
    return 0


def loss_ratios(args):
    """The CPU losses' ratio rows: bench_cpu_losses.py into <out>/<device>/cpu-losses[-<tag>].csv."""
    import bench_cpu_losses
    if args.threads:
        torch.set_num_threads(args.threads)
    identity = measure.run_identity(torch.device("cpu"), REPO)
    root = args.out or os.path.join(REPO, "bench", "results", *(["smoke"] if args.smoke else []))
    path = os.path.join(root, identity["device"], f"cpu-losses-{args.tag}.csv" if args.tag else "cpu-losses.csv")
    argv = ["--csv", path, "--rounds", str(args.rounds)] + (["--smoke"] if args.smoke else [])
    argv += (["--shapes", args.shapes] if args.shapes else []) + (["--losses", args.losses] if args.losses else [])
    bench_cpu_losses.main(argv)
    print("csv:", os.path.relpath(path, os.getcwd()))
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot)
    if args.loss_ratios:
        return loss_ratios(args)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    losses = _list(args.losses, xk.LOSSES, "losses") if args.losses else list(xk.LOSSES)
    modes = _list(args.modes, MODES, "modes")
    dtypes = _list(args.dtypes, DTYPES, "dtypes") if args.dtypes else list(DTYPES)
    groups = sweep_groups(args, device, dtypes)
    kernels = [b for b in xk.available_backends() if b != "reference" and
               (b == "cpu") == (device.type == "cpu")]  # triton on CPU tensors (interpreter) is not benchmarked
    pml_ok, pml_info = P.pml_status()
    provs = ["reference", "paper-loop"] + (["pml"] if pml_ok else []) + kernels
    if args.providers:
        provs = [p for p in provs if p in _list(args.providers, P.DENSE + ("cpu", "triton", "cuda"), "providers")]
    if args.max_call_s is None:
        args.max_call_s = 2.0 if args.smoke else 5.0
    if args.max_dense_elems is None:
        args.max_dense_elems = float("inf") if device.type == "cuda" else measure.total_memory_bytes(device) / 64
    if args.min_run_time is None:
        args.min_run_time = 0.01 if args.smoke else 0.2
    if args.max_run_time is None:
        args.max_run_time = 0.05 if args.smoke else 0.6

    identity = measure.run_identity(device, REPO)
    root = args.out or os.path.join(REPO, "bench", "results", *(["smoke"] if args.smoke else []))
    out_dir = os.path.join(root, identity["device"])
    print(f"device {measure.device_name(device)} ({identity['device']}), torch {identity['torch']}, "
          f"triton {identity['triton']}, commit {identity['commit']}, threads {torch.get_num_threads()}, "
          f"fp32 matmul precision {torch.get_float32_matmul_precision()}, load average {_load()}")
    print(f"providers {provs}; pml: {pml_info}; losses {losses}; modes {modes}; "
          f"{sum(len(k) for k in groups.values())} shapes; out {out_dir}", flush=True)

    log = report.CsvLog(os.path.join(out_dir, f"bench-{args.tag}.csv" if args.tag else "bench.csv"), identity)
    timing = {"min_run_time": args.min_run_time, "max_run_time": args.max_run_time}
    ceilings = measure.machine_ceilings(device, timing, big=256 if args.smoke else None)
    for name in ("mm-bf16", "mm-fp32"):
        c = ceilings[name]
        log.add(op="ceiling", provider=name, B=c["n"], K=c["n"], D=c["n"],
                dtype="bfloat16" if name == "mm-bf16" else "float32", mode="forward", ms_median=c["ms"][0],
                ms_p20=c["ms"][1], ms_p80=c["ms"][2], tflops=c["tflops"])
    c = ceilings["copy"]
    log.add(op="ceiling", provider="copy", B=1, K=c["elems"], D=1, dtype="float32", mode="forward",
            ms_median=c["ms"][0], ms_p20=c["ms"][1], ms_p80=c["ms"][2])
    print(f"ceilings: mm-bf16 {ceilings['mm-bf16']['tflops']:.3g} TFLOP/s, mm-fp32 {ceilings['mm-fp32']['tflops']:.3g} "
          f"TFLOP/s, copy {c['gbps']:.4g} GB/s (read + write)", flush=True)

    run = Runner(args, device, log, ceilings)
    if device.type == "cpu":
        measure.peak_extra_mb(lambda: torch.ones(1), device)  # the profiler's one-time start-up, untimed
    started = time.monotonic()
    todo = [(B, D, dt, K) for (B, D, dt), ks in groups.items() for K in ks]
    for n_done, (B, D, dtype_name, K) in enumerate(todo):
        if args.time_budget_s is not None and time.monotonic() - started > args.time_budget_s:
            print(f"time budget of {args.time_budget_s:g} s reached: {len(todo) - n_done} of {len(todo)} shapes "
                  f"not run", flush=True)
            break
        try:
            run.shape(B, K, D, DTYPES[dtype_name], losses, modes, provs)
        except Exception as exc:  # the inputs themselves did not fit: note it, go on
            if not measure.is_oom(exc):
                raise
            print(f"B={B} K={K} D={D} {dtype_name}: out of memory making the inputs; shape skipped", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    log.close()
    print(f"sweep took {time.monotonic() - started:.0f} s; load average now {_load()}")
    report.speedup_summary(log.rows, losses)
    if device.type == "cpu":
        report.foundation_summary(log.rows, losses)
    if not args.no_plots:
        for path in report.plot_groups(log.rows, out_dir, losses):
            print("plot:", os.path.relpath(path, os.getcwd()))
    print("csv:", os.path.relpath(log.path, os.getcwd()))
    if run.errors:
        print(f"{run.errors} error(s): see the ERROR rows / messages above", file=sys.stderr)
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
