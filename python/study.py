"""Accuracy study: when does the cross-batch memory help? Batch-only vs XBM over a grid of
loss (multi-similarity, contrastive), batch (16 = 8 x 2, 64 = 32 x 2), initialisation
(from scratch, or fine-tuned from a backbone pretrained batch-only on disjoint classes)
and memory size, three seeds per cell. Writes results/recall.csv (one row per run),
results/drift.csv (feature drift against dt, seed 0 of every cell), results/recall.md
(mean +- std per cell) and the plots results/recall_vs_memory.png, results/drift.png.

    python python/study.py --jobs 2 --fresh           # the study in results/ (see README for its wall time)
    python python/study.py --smoke --out-dir /tmp/s   # seconds: digits, a few steps
    python python/study.py --plot-only                # tables and plots from the CSVs

The glyph classes are split three ways (disjoint): 4000 pretraining characters, 5000
training (fine-tuning) characters and 1000 held-out test characters. The backbone is
pretrained once (batch-only multi-similarity, batch 64) and kept in python/checkpoints;
a later study reuses it when its settings match.
"""
import argparse
import concurrent.futures
import csv
import math
import multiprocessing
import os
import statistics
import sys
import time

import torch

import train_xbm
import xbm_data

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ["dataset", "loss", "batch", "classes_per_batch", "init", "method", "memory_size", "weight", "seed",
           "steps", "lr", "start_iteration", "recall@1", "recall@2", "recall@4", "recall@8", "init_recall@1",
           "batch_active_late", "batch_zero_frac_late", "memory_active_late", "wall_s"]
DRIFT_COLUMNS = ["loss", "batch", "init", "method", "memory_size", "weight", "seed", "dt", "drift"]
LOSS_LABEL = {"multi_similarity": "multi-similarity", "contrastive": "contrastive"}


def data_flags(a):
    if a.dataset != "glyphs":
        return ["--dataset", a.dataset]
    return ["--dataset", "glyphs", "--max-classes", str(a.max_classes), "--min-faces", str(a.min_faces),
            "--test-classes", str(a.test_classes), "--pretrain-classes", str(a.pretrain_classes)]


def pretrain_argv(a):
    """The pretraining recipe: batch-only multi-similarity on the pretraining classes (the
    small sets have no third class set: there, the smoke test pretrains on the train classes)."""
    split = "pretrain" if a.dataset == "glyphs" else "train"
    return data_flags(a) + ["--train-split", split, "--loss", "multi_similarity", "--memory-size", "0",
                            "--batch", str(a.pretrain_batch), "--classes-per-batch", str(a.pretrain_batch // 2),
                            "--steps", str(a.pretrain_steps),
                            "--lr", "1e-3", "--width", str(a.width), "--seed", "0", "--no-eval-before",
                            "--threads", str(a.jobs), "--no-progress", "--quiet"]


def grid(a, checkpoint):
    """[(argv, row)] of every run, the longest first (a better packing over --jobs)."""
    out = []
    for loss in a.losses:
        weights = a.contrastive_weights if loss == "contrastive" else [1.0]
        for batch in a.batches:
            steps = a.steps_16 if batch == 16 else a.steps_64
            for init in a.inits:
                lr = a.lr_scratch if init == "scratch" else a.lr_pretrained
                start = int(steps * a.scratch_start) if init == "scratch" else 0
                methods = [("batch-only", 0, 0.0, False)]
                methods += [("xbm", m, w, False) for m in a.memories for w in weights]
                if a.fresh and loss in a.fresh_losses and batch == a.batches[0]:
                    methods += [("xbm-fresh", a.fresh_memory, 1.0, True)]
                for method, memory, weight, fresh in methods:
                    for seed in (a.fresh_seeds if fresh else a.seeds):
                        argv = data_flags(a) + [
                            "--loss", loss, "--batch", str(batch), "--classes-per-batch", str(batch // 2),
                            "--steps", str(steps), "--lr", str(lr), "--start-iteration", str(start),
                            "--memory-size", str(memory), "--weight", str(weight if memory else 1.0),
                            "--width", str(a.width), "--seed", str(seed), "--threads", "1", "--no-eval-before",
                            "--no-progress", "--quiet"]
                        if init == "pretrained":
                            argv += ["--init", checkpoint]
                        if fresh:
                            argv += ["--fresh-memory"]
                        if seed == a.seeds[0] and a.drift_every:
                            argv += ["--drift-every", str(a.drift_every)]
                        row = {"dataset": a.dataset, "loss": loss, "batch": batch, "classes_per_batch": batch // 2,
                               "init": init, "method": method, "memory_size": memory,
                               "weight": weight if memory else "", "seed": seed, "steps": steps, "lr": lr,
                               "start_iteration": start}
                        cost = steps * batch * (1 + memory / 4096) * (30 if fresh else 1)
                        out.append((cost, argv, row))
    out.sort(key=lambda t: -t[0])
    return [(argv, row) for _, argv, row in out]


_SPLIT = {}


def _split(args):
    key = (args.dataset, args.test_classes, args.max_classes, args.min_faces, args.pretrain_classes)
    if key not in _SPLIT:  # loaded once per process
        _SPLIT[key] = xbm_data.load(args.dataset, args.cache_dir, test_classes=args.test_classes,
                                    max_classes=args.max_classes, min_faces=args.min_faces, quiet=True,
                                    pretrain_classes=args.pretrain_classes)
    return _SPLIT[key]


def late_pairs(pairs):
    """(mean active in-batch pairs per step, fraction of steps with none, mean active memory
    pairs) over the last quarter of the run."""
    tail = pairs[len(pairs) - max(1, len(pairs) // 4):]
    batch = [p[0] + p[1] for p in tail]
    mem = [p[2] + p[3] for p in tail]
    return statistics.mean(batch), sum(b == 0 for b in batch) / len(batch), statistics.mean(mem)


def one_run(job):
    """Runs train_xbm with `argv` (in a worker process with --jobs > 1); returns (row, drift rows)."""
    argv, row = job
    args = train_xbm.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = train_xbm.run(args, split=_split(args))
    ba, bz, ma = late_pairs(res["pairs"])
    row = dict(row, wall_s=f"{res['wall_s']:.1f}", batch_active_late=f"{ba:.1f}", batch_zero_frac_late=f"{bz:.3f}",
               memory_active_late=f"{ma:.1f}")
    row.update({f"recall@{k}": f"{res['recall_after'][k]:.4f}" for k in train_xbm.KS})
    drift = [{k: row[k] for k in DRIFT_COLUMNS[:7]} | {"dt": dt, "drift": f"{v:.5g}"} for dt, v in res["drift"].items()]
    print(f"{row['loss']} batch {row['batch']} {row['init']} {row['method']} memory {row['memory_size']} "
          f"w {row['weight']} seed {row['seed']}: R@1 {res['recall_after'][1]:.4f} ({res['wall_s']:.0f} s)",
          flush=True)
    return row, drift


def pretrain(a, path):
    """Pretrains the backbone unless `path` holds one made with the same settings; returns
    its Recall@1 on the test classes."""
    argv = pretrain_argv(a)
    args = train_xbm.parse_args(argv + ["--checkpoint", path])
    want = {k: getattr(args, k) for k in train_xbm.RESUME_KEYS if k != "world_size"}
    if os.path.exists(path):
        state = torch.load(path, weights_only=True)
        if {k: state["config"].get(k) for k in want} == want and state["step"] == args.steps:
            model = train_xbm.EmbeddingNet(args.embedding_dim, args.width)
            model.load_state_dict(state["model"])
            r = train_xbm.evaluate(model, _split(args), torch.device("cpu"))[1]
            print(f"pretrained backbone: reusing {path} (R@1 on the test classes {r:.4f})", flush=True)
            return r
    t = time.perf_counter()
    torch.set_num_threads(args.threads)
    res = train_xbm.run(args, split=_split(args))
    print(f"pretrained backbone: {path}, {args.steps} steps in {time.perf_counter() - t:.0f} s, "
          f"R@1 on the test classes {res['recall_after'][1]:.4f}", flush=True)
    return res["recall_after"][1]


def write_csv(path, columns, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cells(rows):
    """{(loss, batch, init, method, memory, weight): [recall@1, ...]} in first-seen order."""
    out = {}
    for r in rows:
        out.setdefault(_key(r), []).append(float(r["recall@1"]) * 100)
    return out


def _key(r):
    w = "" if r["weight"] in ("", None) else f"{float(r['weight']):g}"
    return r["loss"], int(r["batch"]), r["init"], r["method"], int(r["memory_size"]), w


def mean_std(v):
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def table(rows, header):
    """Markdown: one line per (loss, batch, init) with R@1 of batch-only and every XBM
    setting, then the gain of the best XBM setting over batch-only against twice the
    pooled std."""
    c = cells(rows)
    xbm_keys = sorted({(k[3], k[4], k[5]) for k in c if k[3] != "batch-only"},
                      key=lambda t: (t[0], -float(t[2] or 0), t[1]))
    names = [f"{'re-embedded ' if m == 'xbm-fresh' else ''}{mem}" + (f" w={w}" if w and w != "1" else "")
             for m, mem, w in xbm_keys]
    lines = header + ["", "| loss | batch | init | batch-only | " + " | ".join(f"XBM {n}" for n in names) +
                      " | best gain (2 x pooled std) |",
                      "|---|---|---|---|" + "---|" * len(names) + "---|"]
    for loss, batch, init in dict.fromkeys((k[0], k[1], k[2]) for k in c):
        base = c.get((loss, batch, init, "batch-only", 0, ""))
        if base is None:
            continue
        bm, bs = mean_std(base)
        cols, best = [], None
        for m, mem, w in xbm_keys:
            v = c.get((loss, batch, init, m, mem, w))
            if not v:
                cols.append("")
                continue
            vm, vs = mean_std(v)
            cols.append(f"{vm:.1f} ± {vs:.1f}" if len(v) > 1 else f"{vm:.1f} (1 seed)")
            pooled = ((bs ** 2 + vs ** 2) / 2) ** 0.5
            if m == "xbm" and (best is None or vm - bm > best[0]):
                best = (vm - bm, 2 * pooled)
        gain = f"{best[0]:+.1f} ({best[1]:.1f})" if best else ""
        lines.append(f"| {LOSS_LABEL.get(loss, loss)} | {batch} ({batch // 2} x 2) | {init} | {bm:.1f} ± {bs:.1f} | " +
                     " | ".join(cols) + f" | {gain} |")
    return "\n".join(lines) + "\n"


def _spaced_labels(ticks, ratio=1.45):
    """Tick labels of the dt axis (log scale): the doubling series dt0, 2 dt0, 4 dt0, ...
    always; another tick (the memory's age) only when it is `ratio` away from both labelled
    neighbours, else blank (200 and 250 would run together)."""
    doubling = {t for t in ticks if math.log2(t / ticks[0]).is_integer()}
    labels = []
    for t in ticks:
        near = [d for d in doubling if max(t, d) / min(t, d) < ratio]
        labels.append(str(t) if t in doubling or not near else "")
    return labels


def _figure_legend(fig, axes):
    """One legend under the panels for the union of their labels (same colours and styles
    in every panel), so that no legend hides a point."""
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    ncol = min(2 * axes.shape[1], max(1, len(handles)))
    rows = -(-len(handles) // ncol)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=8, handlelength=3.5,
               frameon=False)
    fig.tight_layout(rect=(0, 0.035 * rows / axes.shape[0] + 0.01, 1, 1))


def plot(rows, drift_rows, out_dir):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = cells(rows)
    losses = list(dict.fromkeys(k[0] for k in c))
    batches = sorted({k[1] for k in c})
    fig, axes = plt.subplots(len(losses), len(batches), figsize=(5 * len(batches), 3.8 * len(losses)), squeeze=False)
    for i, loss in enumerate(losses):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            for init, color in (("scratch", "tab:blue"), ("pretrained", "tab:red")):
                base = c.get((loss, batch, init, "batch-only", 0, ""))
                if not base:
                    continue
                bm, bs = mean_std(base)
                ax.axhline(bm, color=color, ls=":", lw=1)
                ax.axhspan(bm - bs, bm + bs, color=color, alpha=0.1)
                # weight 1: solid line, filled circles; weight 0.1: dashed line, open squares
                for w, ls, marker, face in (("1", "-", "o", color), ("0.1", "--", "s", "white")):
                    pts = sorted((k[4], mean_std(v)) for k, v in c.items()
                                 if k[:4] == (loss, batch, init, "xbm") and k[5] == w)
                    if pts:
                        ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts],
                                    color=color, ls=ls, marker=marker, mfc=face, ms=5, capsize=3,
                                    label=f"{init}, XBM weight {w}")
                ax.plot([], [], color=color, ls=":", label=f"{init}, batch-only (line; band ± std)")
            if ax.lines:
                ax.set_xscale("log", base=2)
            ax.set_title(f"{LOSS_LABEL.get(loss, loss)}, batch {batch} ({batch // 2} x 2)")
            ax.set_xlabel("memory size (rows)")
            ax.set_ylabel("R@1 (%) on held-out classes")
            ax.grid(alpha=0.3)
    _figure_legend(fig, axes)
    fig.savefig(os.path.join(out_dir, "recall_vs_memory.png"), dpi=110)
    plt.close(fig)

    if not drift_rows:
        return
    groups = {}
    for r in drift_rows:
        groups.setdefault(_key(r), []).append((int(r["dt"]), float(r["drift"])))
    fig, axes = plt.subplots(len(losses), len(batches), figsize=(5 * len(batches), 3.8 * len(losses)), squeeze=False)
    biggest = max(int(r["memory_size"]) for r in drift_rows)
    for i, loss in enumerate(losses):
        for j, batch in enumerate(batches):
            ax = axes[i][j]
            # XBM at the largest memory, and at the re-embedded runs' memory for comparison
            fresh_mems = {k[4] for k in groups if k[:2] == (loss, batch) and k[3] == "xbm-fresh"}
            for (l, b, init, method, mem, w), pts in groups.items():
                if (l, b) != (loss, batch) or (method == "xbm" and (mem not in fresh_mems | {biggest} or w != "1")):
                    continue
                color = "tab:blue" if init == "scratch" else "tab:red"
                ls = {"batch-only": ":", "xbm": "-" if mem == biggest else "-.", "xbm-fresh": "--"}[method]
                label = f"{init}, " + {"batch-only": "batch-only", "xbm": f"XBM {mem}",
                                       "xbm-fresh": f"XBM {mem} re-embedded"}[method]
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, ls=ls, marker="o", ms=3, label=label)
            if ax.lines:
                ax.set_xscale("log")
                ax.set_yscale("log")
                dts = sorted({p[0] for k, v in groups.items() if k[:2] == (loss, batch) for p in v})
                ax.set_xticks(dts, _spaced_labels(dts))
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(f"{LOSS_LABEL.get(loss, loss)}, batch {batch}: feature drift")
            ax.set_xlabel("dt (steps)")
            ax.set_ylabel("mean ||f_t(x) - f_(t-dt)(x)||^2")
            ax.grid(alpha=0.3, which="both")
    _figure_legend(fig, axes)
    fig.savefig(os.path.join(out_dir, "drift.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="glyphs", choices=xbm_data.DATASETS)
    p.add_argument("--max-classes", type=int, default=10000)
    p.add_argument("--min-faces", type=int, default=12)
    p.add_argument("--test-classes", type=int, default=1000)
    p.add_argument("--pretrain-classes", type=int, default=4000)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--pretrain-batch", type=int, default=64, help="pretraining batch (P x 2)")
    p.add_argument("--losses", nargs="+", default=["multi_similarity", "contrastive"])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="batch sizes (P x 2)")
    p.add_argument("--inits", nargs="+", default=["scratch", "pretrained"], choices=["scratch", "pretrained"])
    p.add_argument("--memories", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--contrastive-weights", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument("--steps-16", type=int, default=400, help="steps of the batch-16 runs")
    p.add_argument("--steps-64", type=int, default=200, help="steps of the batch-64 runs")
    p.add_argument("--lr-scratch", type=float, default=1e-3)
    p.add_argument("--lr-pretrained", type=float, default=3e-4)
    p.add_argument("--scratch-start", type=float, default=0.4,
                   help="from scratch the memory joins after this fraction of the steps (from step 0 pretrained)")
    p.add_argument("--width", type=int, default=16, help="CNN width")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--drift-every", type=int, default=25, help="drift snapshots in the first seed's runs (0: none)")
    p.add_argument("--fresh", action="store_true",
                   help="also the no-staleness diagnostic (memory re-embedded every step; slow) at the first batch")
    p.add_argument("--fresh-losses", nargs="+", default=["contrastive"])
    p.add_argument("--fresh-memory", type=int, default=1024)
    p.add_argument("--fresh-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (processes, 1 thread each)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--checkpoint", default=os.path.join(HERE, "checkpoints", "pretrained.pt"))
    p.add_argument("--smoke", action="store_true", help="digits, a few steps: checks the script runs")
    p.add_argument("--plot-only", action="store_true", help="only the table and plots, from the CSVs in --out-dir")
    a = p.parse_args(argv)
    if a.smoke:
        a.dataset, a.steps_16, a.steps_64, a.memories, a.seeds, a.batches = "digits", 8, 6, [64], a.seeds[:2], [8]
        a.pretrain_steps, a.pretrain_batch, a.contrastive_weights, a.width, a.drift_every = 6, 8, [1.0], 8, 2
        a.fresh_seeds = a.seeds[:1]
    os.makedirs(a.out_dir, exist_ok=True)
    csv_path, drift_path = os.path.join(a.out_dir, "recall.csv"), os.path.join(a.out_dir, "drift.csv")
    md_path = os.path.join(a.out_dir, "recall.md")
    cmd = "python python/study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.plot_only:
        rows, drift_rows = read_csv(csv_path), (read_csv(drift_path) if os.path.exists(drift_path) else [])
        header = [open(md_path).read().split("\n")[0]] if os.path.exists(md_path) else [f"`{cmd.strip()}`"]
        with open(md_path, "w") as f:
            f.write(table(rows, header))
        plot(rows, drift_rows, a.out_dir)
        print(open(md_path).read())
        return

    t_start = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(a.checkpoint)), exist_ok=True)
    init_r1 = pretrain(a, a.checkpoint) if "pretrained" in a.inits else None
    jobs = grid(a, a.checkpoint)
    for argv_, _ in jobs:
        train_xbm.parse_args(argv_)  # bad flags fail here, before any run
    print(f"{len(jobs)} runs, {a.jobs} at a time", flush=True)
    rows, drift_rows = [], []
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=ctx) as ex:
        for row, drift in (f.result() for f in concurrent.futures.as_completed([ex.submit(one_run, j) for j in jobs])):
            row["init_recall@1"] = f"{init_r1:.4f}" if row["init"] == "pretrained" else ""
            rows.append(row)
            drift_rows += drift
            write_csv(csv_path, COLUMNS, rows)  # partial results survive an interrupted study
            write_csv(drift_path, DRIFT_COLUMNS, drift_rows)
    order = {tuple(j[1][k] for k in ("loss", "batch", "init", "method", "memory_size", "weight", "seed")): i
             for i, j in enumerate(sorted(jobs, key=lambda j: (a.losses.index(j[1]["loss"]), j[1]["batch"],
                                                                 a.inits.index(j[1]["init"]), j[1]["method"],
                                                                 j[1]["memory_size"], -float(j[1]["weight"] or 0),
                                                                 j[1]["seed"])))}

    def key(r):
        return order[tuple(r[k] for k in ("loss", "batch", "init", "method", "memory_size", "weight", "seed"))]
    rows.sort(key=key)
    drift_rows.sort(key=lambda r: (key(r), int(r["dt"])))
    write_csv(csv_path, COLUMNS, rows)
    write_csv(drift_path, DRIFT_COLUMNS, drift_rows)
    total = time.perf_counter() - t_start
    described = _split(train_xbm.parse_args(jobs[0][0])).describe()
    init_txt = f"; the pretrained backbone's own R@1 {init_r1 * 100:.1f}" if init_r1 is not None else ""
    header = [f"R@1 (%) on the held-out classes, mean ± std over seeds {a.seeds}. `{cmd.strip()}`: {described}; "
              f"CNN width {a.width}, embedding 128, Adam; " +
              ", ".join(f"{a.steps_16 if b == 16 else a.steps_64} steps at batch {b}" for b in a.batches) + "; "
              f"scratch lr {a.lr_scratch:g}, memory from {a.scratch_start:g} of the steps; pretrained lr "
              f"{a.lr_pretrained:g}, memory from step 0{init_txt}. XBM columns: memory rows (weight 1 unless "
              f"given). {len(jobs)} runs, {a.jobs} at a time, 1 thread each; study wall time {total:.0f} s."]
    with open(md_path, "w") as f:
        f.write(table(rows, header))
    plot(rows, drift_rows, a.out_dir)
    print(open(md_path).read())


if __name__ == "__main__":
    main()
