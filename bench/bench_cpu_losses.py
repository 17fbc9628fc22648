"""Every CPU loss against contrastive and against this machine's GEMM rates, in one run.

For each (B, K, D), loss and dtype configuration, forward+backward of the memory loss
(`torch.autograd.grad` of the "mean" loss with respect to the anchors, the graph built inside
the timed call), with square (n x n) @ (n x n) GEMMs in fp32 and bf16 timed in the same
rounds, everything in turn within every round so that drift cancels; medians over rounds.

  fp32           fp32 anchors and memory
  bf16           bf16 anchors and memory (16-bit products where the CPU has them)
  fp32-x/bf16-M  fp32 anchors, a bf16 memory

Columns: `ms` the median; `x_contrastive` ms over contrastive's in the same configuration;
`gemms` ms over the time of ONE (B x D) (D x K) product at the square GEMM's rate of the
configuration's product dtype (bf16 for bf16, fp32 otherwise): the loss's cost in products
of its own shape run at the machine's GEMM rate (the S product plus a dense dX product is 2);
`x_fp32` ms over the same loss's fp32 ms.

    python bench/bench_cpu_losses.py --csv bench/results/<device>/cpu-losses.csv
    python bench/bench_cpu_losses.py --smoke        # seconds

The package is imported from this checkout (its in-place build).
"""
import argparse
import os
import statistics
import sys

import torch
import torch.utils.benchmark as benchmark

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import cpu_model, write_cpu_csv  # noqa: E402
from providers import cpu_loss_step, make_inputs  # noqa: E402

import xbm_kernels as xk  # noqa: E402

CONFIGS = {  # name: (anchor dtype, memory dtype, product dtype of the GEMM rate it is held to)
    "fp32": (torch.float32, torch.float32, "float32"),
    "bf16": (torch.bfloat16, torch.bfloat16, "bfloat16"),
    "fp32-x/bf16-M": (torch.float32, torch.bfloat16, "float32"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="256,65536,128;128,32768,128")
    ap.add_argument("--losses", default=",".join(xk.LOSSES))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--square", type=int, default=2048, help="n of the square GEMMs")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:
        a.shapes, a.rounds, a.square = "16,512,32", 2, 128
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shapes.split(";")]
    losses = a.losses.split(",")
    if "contrastive" not in losses:
        losses.insert(0, "contrastive")
    configs = {c: CONFIGS[c] for c in a.configs.split(",")}
    load0 = os.getloadavg()[0]
    print(f"# {cpu_model()}, timed at 1 thread (torch.utils.benchmark.Timer's default; the process has "
          f"{torch.get_num_threads()}), torch {torch.__version__}, load {load0:.2f} at start", flush=True)

    sq = {dt: (torch.randn(a.square, a.square, dtype=dt), torch.randn(a.square, a.square, dtype=dt))
          for dt in (torch.float32, torch.bfloat16)}
    rows = []
    for B, K, D in shapes:
        inputs = {}
        for name, (xdt, mdt, _) in configs.items():
            inp = make_inputs(B, K, D, mdt, torch.device("cpu"), seed=0)
            inputs[name] = (inp, inp.x.detach().to(xdt).requires_grad_())
        times = {(l, c): [] for l in losses for c in configs}
        times.update({("mm", str(dt).split(".")[1]): [] for dt in sq})
        for _ in range(a.rounds):
            for loss in losses:
                for name in configs:
                    inp, x = inputs[name]
                    cpu_loss_step(loss, x, inp)  # warm
                    t = benchmark.Timer("f()", globals={"f": lambda: cpu_loss_step(loss, x, inp)}).timeit(2)
                    times[(loss, name)].append(t.median * 1e3)
                for dt, (p, q) in sq.items():  # a GEMM after every loss: the rates drift with the losses
                    t = benchmark.Timer("torch.mm(p, q)", globals={"torch": torch, "p": p, "q": q}).timeit(2)
                    times[("mm", str(dt).split(".")[1])].append(t.median * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        flop = 2 * a.square ** 3
        rate = {dt: flop / med[("mm", dt)] / 1e6 for dt in ("float32", "bfloat16")}  # GFLOP/s
        load = os.getloadavg()[0]
        print(f"\n(B, K, D) = ({B}, {K}, {D}); square {a.square}: fp32 {rate['float32']:.0f} GFLOP/s, "
              f"bf16 {rate['bfloat16']:.0f} GFLOP/s; load {load:.2f}")
        print("| loss | config | ms | x contrastive | gemms | x fp32 |")
        print("|---|---|---|---|---|---|")
        for loss in losses:
            for c, (_, _, pdt) in configs.items():
                ms = med[(loss, c)]
                one_gemm_ms = 2 * B * K * D / rate[pdt] / 1e6
                r = dict(B=B, K=K, D=D, loss=loss, config=c, median_ms=round(ms, 3),
                         x_contrastive=round(ms / med[("contrastive", c)], 3), gemms=round(ms / one_gemm_ms, 3),
                         x_fp32=round(ms / med[(loss, "fp32")], 3) if "fp32" in configs else "",
                         mm_fp32_gflops=round(rate["float32"], 1), mm_bf16_gflops=round(rate["bfloat16"], 1),
                         load_start=round(load0, 2), load_end=round(load, 2))
                rows.append(r)
                print(f"| {loss} | {c} | {ms:.1f} | {r['x_contrastive']:.2f} | {r['gemms']:.2f} | {r['x_fp32']} |")
    if a.csv:
        write_cpu_csv(a.csv, rows)


if __name__ == "__main__":
    main()
