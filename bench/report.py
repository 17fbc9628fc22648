"""Where results go: CSV rows (written as they are measured, so a run cut short keeps what
it measured), a table on stdout, a summary of speedups, PNG plots per shape group."""
import csv
import math
import os

COLUMNS = ["device", "torch", "triton", "commit", "date", "op", "provider", "B", "K", "D", "dtype", "mode",
           "ms_median", "ms_p20", "ms_p80", "peak_mem_mb", "tflops", "roofline_frac"]
KERNELS = ("cpu", "triton", "cuda")
COLORS = {"reference": "tab:red", "paper-loop": "tab:orange", "pml": "tab:green", "cpu": "tab:blue",
          "triton": "tab:purple", "cuda": "tab:brown"}  # one colour per provider in every panel
FOUNDATION_TARGETS = ((256, 65536, 128), (128, 32768, 128))  # (B, K, D), fp32, on the CPU


# Why the enqueue panel shows `cpu` above `pml` and the paper loop (measured on the 2-core
# CPU at B=256, D=128: the copy op 9 us, a slice write 8 us, the checks about 45 us).
ENQUEUE_NOTE = ("cpu/reference include the per-call checks (shapes, dtypes, labels, and a NaN/Inf\n"
                "scan that keeps bad rows out of the memory; check_finite=False skips the scan);\n"
                "the copy itself is as fast as the slice writes of pml and paper-loop, which check nothing.\n"
                "Tens of microseconds a step, next to 10-500 ms for the memory loss.")


def number(value):
    """The float in a CSV cell, or None (empty, OOM, SKIP(...), ERROR(...))."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _cell(v, digits=4):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.1f}"
    return str(v)


def _short(cell):
    """A CSV cell for a summary line: the number to 4 digits, or the status word."""
    v = number(cell)
    if v is not None:
        return f"{v:.4g}"
    return (cell or "-").split("(")[0] or "-"


class CsvLog:
    def __init__(self, path, identity):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.identity, self.rows = path, identity, []
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._writer.writeheader()
        self._file.flush()
        widths = (11, 10, 5, 8, 4, 9, 8, 17, 9, 9, 9, 9, 8)
        self._fmt = " ".join(f"{{:>{w}}}" for w in widths)
        print(self._fmt.format("op", "provider", "B", "K", "D", "dtype", "mode", "ms_median", "ms_p20", "ms_p80",
                               "peak_MB", "TFLOP/s", "frac"), flush=True)

    def add(self, **fields):
        row = dict.fromkeys(COLUMNS, "")
        row.update(self.identity)
        row.update({k: _cell(v, 6) if isinstance(v, float) else ("" if v is None else v) for k, v in fields.items()})
        self._writer.writerow(row)
        self._file.flush()
        self.rows.append(row)
        print(self._fmt.format(row["op"], row["provider"], row["B"], row["K"], row["D"], row["dtype"], row["mode"],
                               *(_cell(number(row[c])) if number(row[c]) is not None else row[c][:17]
                                 for c in ("ms_median", "ms_p20", "ms_p80", "peak_mem_mb", "tflops",
                                           "roofline_frac"))), flush=True)
        return row

    def close(self):
        self._file.close()


def _key(row):
    return row["op"], int(row["B"]), int(row["K"]), int(row["D"]), row["dtype"], row["mode"]


def _index(rows):
    table = {}
    for r in rows:
        table.setdefault(_key(r), {})[r["provider"]] = r
    return table


def speedup_summary(rows, losses):
    """Per shape: each kernel backend's median time against every dense provider (full mode)."""
    table = _index(rows)
    lines = []
    for key in sorted(table):
        op, B, K, D, dtype, mode = key
        if op not in losses or mode != "full":
            continue
        by = table[key]
        for kern in KERNELS:
            t = number(by.get(kern, {}).get("ms_median"))
            if t is None:
                continue
            parts = []
            for other in ("reference", "paper-loop", "pml"):
                if other in by:
                    o = number(by[other]["ms_median"])
                    parts.append(f"{other} {o / t:.1f}x" if o is not None else f"{other} {by[other]['ms_median']}")
            lines.append(f"  {op} B={B} K={K} D={D} {dtype}: {kern} {t:.3g} ms; speedup vs " + ", ".join(parts))
    if lines:
        print("\nSpeedup of the kernel backends (forward+backward, median time):")
        print("\n".join(lines))


def foundation_summary(rows, losses):
    """The targets of the CPU kernel: cpu against reference, and against the GEMM rate."""
    table = _index(rows)
    out = []
    peak = max((number(r["tflops"]) or 0 for r in rows if r["op"] == "ceiling" and r["provider"] == "mm-fp32"),
               default=0)
    for op in losses:
        for B, K, D in FOUNDATION_TARGETS:
            gemm = table.get(("gemm", B, K, D, "float32", "forward"), {}).get("torch.mm")
            for mode in ("forward", "full"):
                by = table.get((op, B, K, D, "float32", mode))
                if not by or "cpu" not in by or "reference" not in by:
                    continue
                ref, cpu = by["reference"], by["cpu"]
                tr, tc = number(ref["ms_median"]), number(cpu["ms_median"])
                speed = f"{tr / tc:.2f}x" if tr and tc else "-"
                out.append(f"  {op:16} {B:>4} {K:>6} {D:>4} {mode:8} {_short(ref['ms_median']):>10} "
                           f"{_short(cpu['ms_median']):>10} {speed:>8} {_short(cpu['tflops']):>9} "
                           f"{_short(gemm['tflops'] if gemm else ''):>9} {_short(peak or ''):>9} "
                           f"{_short(number(cpu['tflops']) / peak if peak and number(cpu['tflops']) else ''):>6} "
                           f"{_short(ref['peak_mem_mb']):>9} {_short(cpu['peak_mem_mb']):>9}")
    if out:
        print("\nFoundation targets, fp32 (cpu vs reference; frac = cpu TFLOP/s (4BKD flops) / this machine's "
              "fp32 GEMM rate, a 2048^3 matmul measured in the same run; S GEMM = the same-shape X M^T alone):")
        print(f"  {'op':16} {'B':>4} {'K':>6} {'D':>4} {'mode':8} {'ref ms':>10} {'cpu ms':>10} {'speedup':>8} "
              f"{'cpu TF/s':>9} {'S GEMM':>9} {'GEMM TF/s':>9} {'frac':>6} {'ref MB':>9} {'cpu MB':>9}")
        print("\n".join(out))


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_groups(rows, out_dir, losses):
    """One PNG per (loss, B, D, dtype): time vs K (forward+backward, forward), peak extra
    memory vs K (forward+backward), enqueue time vs K. OOM/SKIP points are left out."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return []
    groups = sorted({(r["op"], int(r["B"]), int(r["D"]), r["dtype"]) for r in rows if r["op"] in losses})
    written = []
    for op, B, D, dtype in groups:
        fig, axes = plt.subplots(2, 2, figsize=(11, 8.6))
        panels = [(axes[0, 0], op, "full", "ms_median", "forward+backward time (ms)"),
                  (axes[0, 1], op, "forward", "ms_median", "forward time (ms)"),
                  (axes[1, 0], op, "full", "peak_mem_mb", "peak extra memory, fwd+bwd (MB)"),
                  (axes[1, 1], "enqueue", "forward", "ms_median", "enqueue time (ms)")]
        for ax, pop, mode, col, title in panels:
            sel = [r for r in rows if r["op"] == pop and int(r["B"]) == B and int(r["D"]) == D
                   and r["dtype"] == dtype and r["mode"] == mode]
            for prov in sorted({r["provider"] for r in sel}):
                pts = sorted((int(r["K"]), number(r[col])) for r in sel if r["provider"] == prov)
                pts = [(k, v) for k, v in pts if v is not None and v > 0]
                if pts:
                    ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=prov, color=COLORS.get(prov))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("memory size K")
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
            if pop == "enqueue" and ax.lines:  # below the axis, clear of the lines
                ax.annotate(ENQUEUE_NOTE, xy=(0, 0), xycoords="axes fraction", xytext=(0, -42),
                            textcoords="offset points", va="top", fontsize=7)
        device = rows[0]["device"] if rows else ""
        fig.suptitle(f"{op}: B={B}, D={D}, {dtype} on {device}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_B{B}_D{D}_{dtype}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
