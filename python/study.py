"""Accuracy study: batch-only contrastive vs XBM (same steps, batch and loss; a memory
several times the batch) over several seeds, plus the fused `cpu` backend vs the
`reference` backend on one seed. Writes results/recall.csv (one row per run) and
results/recall.md (mean +- std per method).

    nice python python/study.py                       # the study in results/ (~15-30 min on 2 shared cores)
    python python/study.py --smoke --out-dir /tmp/s   # seconds: digits, a few steps
"""
import argparse
import concurrent.futures
import csv
import multiprocessing
import os
import statistics
import sys
import time

import torch

import train_xbm
import xbm_data

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ["dataset", "method", "backend", "seed", "steps", "batch", "memory", "recall@1", "recall@2", "recall@4",
           "recall@8", "wall_s"]


def runs(a):
    """(method, backend, seed, memory, extra flags) in the order they run: per seed the
    batch-only baseline and XBM at each weight; then XBM at each weight with the
    reference backend on the first seed."""
    def xbm(w, backend, seed):
        flags = ["--weight", str(w), "--start-iteration", str(a.start_iteration)]
        return f"xbm w={w:g}", backend, seed, a.memory, flags
    out = []
    for seed in a.seeds:
        out.append(("batch-only", "cpu", seed, 0, []))
        out += [xbm(w, "cpu", seed) for w in a.xbm_weights]
    out += [xbm(w, "reference", a.seeds[0]) for w in a.xbm_weights]
    return out


_SPLIT = {}


def one_run(job):
    """Runs train_xbm with `argv`; returns the CSV row (in a worker process with --jobs > 1)."""
    argv, row, threads = job
    torch.set_num_threads(threads)
    args = train_xbm.parse_args(argv)
    key = (args.dataset, args.test_classes, args.max_classes, args.min_faces)
    if key not in _SPLIT:  # loaded once per process
        _SPLIT[key] = xbm_data.load(args.dataset, args.cache_dir, test_classes=args.test_classes,
                                    max_classes=args.max_classes, min_faces=args.min_faces, quiet=True)
    res = train_xbm.run(args, split=_SPLIT[key])
    row = dict(row, wall_s=f"{res['wall_s']:.1f}")
    row.update({f"recall@{k}": f"{res['recall_after'][k]:.4f}" for k in train_xbm.KS})
    print(f"{row['method']} backend={row['backend']} seed={row['seed']} memory={row['memory']}: "
          f"R@1 {res['recall_before'][1]:.4f} -> {res['recall_after'][1]:.4f}", flush=True)
    return row, _SPLIT[key].describe()


def table(rows, header):
    groups = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"], r["backend"], r["memory"]), []).append(r)

    def ms(vals, digits=1, scale=100.0):
        vals = [float(v) * scale for v in vals]
        if len(vals) == 1:
            return f"{vals[0]:.{digits}f}"
        return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"

    lines = header + ["", "| dataset | method | backend | memory | seeds | R@1 | R@2 | R@4 | R@8 | train time (s) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
    for (dataset, method, backend, memory), g in groups.items():
        rec = [ms([r[f"recall@{k}"] for r in g]) for k in train_xbm.KS]
        lines.append(f"| {dataset} | {method} | {backend} | {memory} | {len(g)} | " + " | ".join(rec) +
                     f" | {ms([r['wall_s'] for r in g], 1, 1.0)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="glyphs", choices=xbm_data.DATASETS)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes-per-batch", type=int, default=32)
    p.add_argument("--memory", type=int, default=4096)
    p.add_argument("--start-iteration", type=int, default=300, help="XBM warm-up steps (batch-only before)")
    p.add_argument("--xbm-weights", type=float, nargs="+", default=[1.0, 0.1], help="one XBM method per weight")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1: steadier on a shared machine)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (processes)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--smoke", action="store_true", help="digits, a few steps, 2 seeds: checks the script runs")
    p.add_argument("extra", nargs="*", help="more train_xbm.py flags after --, e.g. -- --lr 5e-4")
    a = p.parse_args(argv)
    if a.smoke:
        a.dataset, a.steps, a.batch, a.classes_per_batch, a.memory, a.seeds = "digits", 10, 16, 4, 64, [0, 1]
        a.start_iteration = 2
        a.extra = ["--width", "8"] + a.extra
    torch.set_num_threads(a.threads)
    os.makedirs(a.out_dir, exist_ok=True)
    csv_path, md_path = os.path.join(a.out_dir, "recall.csv"), os.path.join(a.out_dir, "recall.md")

    base = ["--dataset", a.dataset, "--steps", str(a.steps), "--batch", str(a.batch), "--classes-per-batch",
            str(a.classes_per_batch), "--threads", str(a.threads), "--no-progress", "--quiet"] + a.extra
    jobs = []
    for method, backend, seed, memory, flags in runs(a):
        run_argv = base + ["--seed", str(seed), "--memory-size", str(memory), "--backend", backend] + flags
        train_xbm.parse_args(run_argv)  # bad flags fail here, before any run
        jobs.append((run_argv, {"dataset": a.dataset, "method": method, "backend": backend, "seed": seed,
                            "steps": a.steps, "batch": a.batch, "memory": memory}, a.threads))
    xa = train_xbm.parse_args(jobs[-1][0])  # an XBM run's settings, for the table's header
    t_start = time.perf_counter()
    if a.jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            results = list(ex.map(one_run, jobs))
    else:
        results = [one_run(j) for j in jobs]
    rows = [r for r, _ in results]
    described = results[0][1]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    total = time.perf_counter() - t_start
    cmd = "python python/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [f"Recall@K (%) on held-out classes, mean ± std over seeds. `{cmd.strip()}`: {described}; "
              f"contrastive loss (margin 0.5), {a.steps} steps, batch {a.batch} ({a.classes_per_batch} classes x "
              f"{a.batch // a.classes_per_batch}), Adam lr {xa.lr}, CNN width {xa.width}, embedding {xa.embedding_dim}; "
              f"XBM memory {a.memory} rows from step {xa.start_iteration} (batch-only before), memory-loss weight w. "
              f"Train time: the training loop only, {a.threads} thread(s) per run, {a.jobs} run(s) at a time on a "
              f"shared CPU; study total {total:.0f} s."]
    with open(md_path, "w") as f:
        f.write(table(rows, header))
    print(open(md_path).read())


if __name__ == "__main__":
    main()
