"""The PML drop-in against pytorch-metric-learning's own CrossBatchMemory: one training step
(enqueue + memory loss, forward and backward) per configuration, both wrappers on the same
batches with a full memory, in one run.

    python bench/bench_pml.py                          # (256, 16384, 128), every configuration
    python bench/bench_pml.py --shape 64,4096,64 --min-run-time 0.2
    python bench/bench_pml.py --smoke                  # seconds; what CI runs
    python bench/bench_pml.py --shape 128,4096,128     # where PML's triplet configurations fit

PML's NTXentLoss and its all-triplets TripletMarginLoss (no miner, or TripletMarginMiner)
allocate per (positive pair, negative pair) or (anchor, positive, negative): a configuration
whose allocation would pass 4 GiB is recorded as SKIP with the size, not run.

Writes <out>/<device>/bench-pml.csv (device, versions, commit, date, per-provider median ms,
speedup) and prints a table. A configuration whose fused plan differs from the expected one
(a fallback) is marked in the `fused` column.
"""
import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402

from pytorch_metric_learning import distances, losses, miners  # noqa: E402

from xbm_kernels import pml as xpml  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COS = distances.CosineSimilarity
DEFAULT_SHAPE = "256,16384,128"

CONFIGS = {
    "contrastive (PML default, L2)": lambda: (losses.ContrastiveLoss(), None),
    "contrastive (cosine)": lambda: (losses.ContrastiveLoss(pos_margin=1, neg_margin=0.5, distance=COS()), None),
    "multi_similarity": lambda: (losses.MultiSimilarityLoss(), None),
    "multi_similarity + miner": lambda: (losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()),
    "supcon": lambda: (losses.SupConLoss(), None),
    "ntxent": lambda: (losses.NTXentLoss(), None),
    "triplet + batch-hard": lambda: (losses.TripletMarginLoss(margin=0.1, distance=COS()),
                                     miners.BatchHardMiner(distance=COS())),
    "circle": lambda: (losses.CircleLoss(), None),
    "triplet (all triplets)": lambda: (losses.TripletMarginLoss(margin=0.1, distance=COS()), None),
    "triplet + semihard miner": lambda: (losses.TripletMarginLoss(margin=0.1, distance=COS()),
                                         miners.TripletMarginMiner(0.2, distance=COS(), type_of_triplets="semihard")),
    "tuplet_margin": lambda: (losses.TupletMarginLoss(), None),
    "margin (all triplets)": lambda: (losses.MarginLoss(), None),
    "nca": lambda: (losses.NCALoss(), None),
    "circle + miner (PML's loss on our memory)": lambda: (losses.CircleLoss(), miners.MultiSimilarityMiner()),
    "snr contrastive (PML's loss on our memory)": lambda: (losses.SignalToNoiseRatioContrastiveLoss(), None),
    "generalized lifted (L2)": lambda: (losses.GeneralizedLiftedStructureLoss(), None),
}


def _data(B, K, D, n_classes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, D, generator=gen), dim=1)
    def batch():
        y = torch.randint(0, n_classes, (B,), generator=gen)
        return centres[y] + 0.5 * torch.randn(B, D, generator=gen) / D ** 0.5, y
    fill = [batch() for _ in range(-(-K // B))]
    return fill, [batch() for _ in range(steps)]


def _pml_too_large(name, B, K, n_classes, limit_bytes=4 * 2 ** 30):
    """What PML would allocate where it does not fit (recorded instead of timed): NTXentLoss,
    TupletMarginLoss and TripletMarginLoss (and MarginLoss) without a miner match every positive pair with every negative pair
    (B K / classes by B K entries: 4 bytes each for NTXent, a bool for the triplets); the
    TripletMarginMiner builds a B x K x K mask of every (anchor, positive, negative)."""
    pos, neg = B * K / n_classes, B * K
    if name.startswith("ntxent"):
        need, what = 4 * pos * neg, "n_per_p matrix"
    elif name.startswith("tuplet_margin"):  # PML repeats the negative pairs once per positive pair
        need, what = 4 * pos * neg, "positive x negative pairs matrix"
    elif name in ("triplet (all triplets)", "margin (all triplets)"):
        need, what = pos * neg, "pair-match matrix"
    elif name.startswith("triplet + semihard"):
        need, what = B * K * K, "triplet mask"
    else:
        return None
    return f"SKIP(too large: {need / 2 ** 30:.0f} GiB {what})" if need > limit_bytes else None


def _fill(module, fill, K):
    """The memory filled with K rows through each wrapper's own enqueue (no loss computed: PML's
    loss over a whole memory of steps would take minutes at the default shape)."""
    x, y = torch.cat([b[0] for b in fill])[:K], torch.cat([b[1] for b in fill])[:K]
    if isinstance(module, xpml.CrossBatchMemory):
        module.memory.enqueue(x, y)
    else:
        module.add_to_memory(x, y, K)
    assert len(module.memory) == K if isinstance(module, xpml.CrossBatchMemory) else module.has_been_filled


def _step(module, batches):
    state = {"i": 0}
    def fn():
        x0, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        x = x0.clone().requires_grad_()
        module(x, y).backward()
    return fn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=DEFAULT_SHAPE, help="B,K,D (another shape than the default writes "
                   "bench-pml-BxKxD.csv)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per provider and case")
    p.add_argument("--configs", default=None, help="comma list of configuration names (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny shape, short timings")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.min_run_time, args.classes = "16,256,32", 0.01, 20
    B, K, D = (int(v) for v in args.shape.split(","))
    names = [n for n in CONFIGS if args.configs is None or n in args.configs.split(",")]
    identity = measure.run_identity(torch.device("cpu"), REPO)
    # more distinct batches than the memory holds: a batch timed again must not find its own
    # rows still in the memory (exact duplicates, which training never feeds, send batch-hard
    # triplets to PML's own loss)
    fill, batches = _data(B, K, D, args.classes, steps=max(8, -(-K // B) + 1))
    rows = []
    print(f"{identity['device']}, torch {identity['torch']}, commit {identity['commit']}, threads "
          f"{torch.get_num_threads()}; B={B} K={K} D={D}")
    for name in names:
        times, fns, fused = {}, {}, None
        for provider in ("pml", "xbm_kernels.pml"):
            skip = _pml_too_large(name, B, K, args.classes) if provider == "pml" else None
            if skip:
                times[provider] = skip
                continue
            loss, miner = CONFIGS[name]()
            if provider == "pml":
                module = losses.CrossBatchMemory(loss, D, memory_size=K, miner=miner)
            else:
                module = xpml.CrossBatchMemory(loss, D, memory_size=K, miner=miner)
                fused = module.fused
            _fill(module, fill, K)  # a full memory
            fns[provider] = _step(module, batches)
            fns[provider]()  # warm-up
        # both providers in alternating order: their ratio holds under the machine's drift
        times.update(measure.interleaved_ms(fns, torch.device("cpu"), min_run_time=args.min_run_time))
        timed = not isinstance(times["pml"], str)
        pml_ms = f"{times['pml']:.3f}" if timed else times["pml"]
        speedup = f"{times['pml'] / times['xbm_kernels.pml']:.2f}" if timed else ""
        rows.append(dict(identity, config=name, B=B, K=K, D=D, fused=(fused or "no: PML's loss").split(":")[0],
                         pml_ms=pml_ms, xbm_ms=f"{times['xbm_kernels.pml']:.3f}", speedup=speedup,
                         threads=torch.get_num_threads()))
        print(f"  {name:36s} pml {pml_ms:>9s} ms   xbm_kernels.pml {times['xbm_kernels.pml']:9.2f} ms   "
              f"{speedup:>5s}x   fused: {rows[-1]['fused']}", flush=True)
    out_dir = os.path.join(args.out, identity["device"])
    os.makedirs(out_dir, exist_ok=True)
    name = "bench-pml-smoke.csv" if args.smoke else "bench-pml.csv" if args.shape == DEFAULT_SHAPE else \
        f"bench-pml-{args.shape.replace(',', 'x')}.csv"
    path = os.path.join(out_dir, name)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
