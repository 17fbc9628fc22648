"""Two builds of the package timed in alternation: every loss's forward+backward on the CPU
(the anchors' gradient), this checkout against another one (e.g. a worktree of an earlier
commit, built in place), one process per build and round, the builds alternating so that the
machine's drift falls on both.

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace)
    python bench/ab_builds.py --other /tmp/base --csv bench/results/<device>/cpu-losses-ab.csv

Columns: shape, dtype (anchors and memory), loss, other_ms and this_ms (medians over rounds
of each round's median of 3 calls), this_over_other, both commits, device, torch, date.
"""
import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORKER = r"""
import json, sys, torch
root = sys.argv[1]
sys.path[:0] = [root, root + "/bench"]
import torch.utils.benchmark as benchmark
from providers import cpu_loss_step, make_inputs
import xbm_kernels as xk
assert xk.__file__.startswith(root), xk.__file__
out = {}
for shape in sys.argv[2].split(";"):
    B, K, D = map(int, shape.split(","))
    for dt in sys.argv[4].split(","):
        inp = make_inputs(B, K, D, getattr(torch, dt), torch.device("cpu"), seed=0)
        x = inp.x.detach().requires_grad_()
        for loss in sys.argv[3].split(","):
            cpu_loss_step(loss, x, inp)
            t = benchmark.Timer("f()", globals={"f": lambda: cpu_loss_step(loss, x, inp)}).timeit(3)
            out["|".join((shape, dt, loss))] = t.median * 1e3
print(json.dumps(out))
"""


def _commit(root):
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--other", required=True, help="the other checkout (its extension built in place)")
    ap.add_argument("--shapes", default="256,65536,128;128,32768,128")
    ap.add_argument("--losses", default=None, help="comma list; default: every loss of this checkout")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--csv", default=None)
    a = ap.parse_args(argv)
    sys.path[:0] = [HERE, os.path.join(HERE, "bench")]
    import torch
    import xbm_kernels as xk
    from measure import cpu_model
    losses = a.losses or ",".join(xk.LOSSES)
    roots = {"other": os.path.abspath(a.other), "this": HERE}
    times = {}
    for r in range(a.rounds):
        for name, root in roots.items():
            proc = subprocess.run([sys.executable, "-c", _WORKER, root, a.shapes, losses, a.dtypes],
                                  capture_output=True, text=True, check=True)
            for key, ms in json.loads(proc.stdout).items():
                times.setdefault(key, {}).setdefault(name, []).append(ms)
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    rows = []
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for key, t in times.items():
        shape, dt, loss = key.split("|")
        o, n = statistics.median(t["other"]), statistics.median(t["this"])
        rows.append(dict(shape=shape, dtype=dt, loss=loss, other_ms=round(o, 3), this_ms=round(n, 3),
                         this_over_other=round(n / o, 3), other_commit=_commit(roots["other"]),
                         this_commit=_commit(HERE), device=cpu_model(), torch=torch.__version__,
                         threads=torch.get_num_threads(), date=date))
        print(f"{key:48s} other {o:8.2f} ms  this {n:8.2f} ms  this/other {n / o:.3f}")
    if a.csv:
        os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print("wrote", a.csv)


if __name__ == "__main__":
    main()
