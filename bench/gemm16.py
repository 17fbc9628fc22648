"""The CPU kernels' 16-bit GEMM against their fp32 GEMM (issue 21), interleaved in one run.

For each (B, K, D) and loss, forward+backward of the memory loss (`torch.autograd.grad` of
the "mean" loss with respect to the anchors, the graph built inside the timed call) in four
configurations, timed in turn within every round so that drift cancels:

  fp32          fp32 anchors and memory
  bf16-fp32gemm bf16 anchors and memory, XBM_CPU_GEMM16=0 (the tiles' fp32 GEMM: before)
  bf16          bf16 anchors and memory (the 16-bit GEMM where the CPU has it: after)
  fp32-x/bf16-M fp32 anchors, bf16 memory (always the fp32 GEMM)

and square (n x n) @ (n x n) GEMMs in fp32 and bf16 in the same rounds (the machine's rates).
Prints medians over the rounds in ms, and writes a CSV with --csv.

    python bench/gemm16.py                      # (256, 65536, 128) and (128, 32768, 128), every loss
    python bench/gemm16.py --smoke              # seconds

The package is imported from this checkout (its in-place build), not from wherever an
editable install points.
"""
import argparse
import os
import statistics
import sys

import torch
import torch.utils.benchmark as benchmark

# This checkout's package and build first (an editable install may point at another clone).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import cpu_model, write_cpu_csv  # noqa: E402
from providers import cpu_loss_step, make_inputs  # noqa: E402

import xbm_kernels as xk  # noqa: E402

CONFIGS = {  # name: (anchor dtype, memory dtype, XBM_CPU_GEMM16)
    "fp32": (torch.float32, torch.float32, "1"),
    "bf16-fp32gemm": (torch.bfloat16, torch.bfloat16, "0"),
    "bf16": (torch.bfloat16, torch.bfloat16, "1"),
    "fp32-x/bf16-M": (torch.float32, torch.bfloat16, "1"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="256,65536,128;128,32768,128")
    ap.add_argument("--losses", default=",".join(xk.LOSSES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--square", type=int, default=2048, help="n of the square GEMMs")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:
        a.shapes, a.rounds, a.square = "16,512,32", 2, 128
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shapes.split(";")]
    losses = a.losses.split(",")
    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.2f} at start", flush=True)

    sq = {dt: (torch.randn(a.square, a.square, dtype=dt), torch.randn(a.square, a.square, dtype=dt))
          for dt in (torch.float32, torch.bfloat16)}
    rows = []
    for B, K, D in shapes:
        inputs = {}
        for name, (xdt, mdt, _) in CONFIGS.items():
            inp = make_inputs(B, K, D, mdt, torch.device("cpu"), seed=0)
            inputs[name] = (inp, inp.x.detach().to(xdt).requires_grad_())
        times = {(l, c): [] for l in losses for c in CONFIGS}
        times.update({("mm", str(dt).split(".")[1]): [] for dt in sq})
        for _ in range(a.rounds):
            for loss in losses:
                for name, (_, _, flag) in CONFIGS.items():
                    os.environ["XBM_CPU_GEMM16"] = flag
                    inp, x = inputs[name]
                    cpu_loss_step(loss, x, inp)  # warm
                    t = benchmark.Timer("f()", globals={"f": lambda: cpu_loss_step(loss, x, inp)}).timeit(2)
                    times[(loss, name)].append(t.median * 1e3)
            for dt, (p, q) in sq.items():
                t = benchmark.Timer("torch.mm(p, q)", globals={"torch": torch, "p": p, "q": q}).timeit(3)
                times[("mm", str(dt).split(".")[1])].append(t.median * 1e3)
        os.environ.pop("XBM_CPU_GEMM16", None)
        med = {k: statistics.median(v) for k, v in times.items()}
        flop = 2 * a.square ** 3
        r32, r16 = flop / med[("mm", "float32")] / 1e6, flop / med[("mm", "bfloat16")] / 1e6
        print(f"\n(B, K, D) = ({B}, {K}, {D}); square {a.square}: fp32 {r32:.0f} GFLOP/s, bf16 {r16:.0f} GFLOP/s "
              f"({r16 / r32:.2f}x); load {os.getloadavg()[0]:.2f}")
        print("| loss | " + " | ".join(f"{c} ms" for c in CONFIGS) + " | bf16 speedup before | after |")
        print("|---" * (len(CONFIGS) + 3) + "|")
        for loss in losses:
            m = [med[(loss, c)] for c in CONFIGS]
            print(f"| {loss} | " + " | ".join(f"{v:.1f}" for v in m)
                  + f" | {m[0] / m[1]:.2f}x | {m[0] / m[2]:.2f}x |")
            for c, v in zip(CONFIGS, m):
                # the loss's nominal flops (S and dX GEMMs: 4 B K D) at each measured rate
                rows.append(dict(B=B, K=K, D=D, loss=loss, config=c, median_ms=round(v, 3),
                                 mm_fp32_gflops=round(r32, 1), mm_bf16_gflops=round(r16, 1),
                                 loss_gflops_nominal=round(4 * B * K * D / v / 1e6, 1)))
    if a.csv:
        write_cpu_csv(a.csv, rows)


if __name__ == "__main__":
    main()
