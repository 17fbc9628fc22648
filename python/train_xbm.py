"""Train a small embedding CNN with XBMLoss and evaluate Recall@K on held-out classes.

    python python/train_xbm.py --dataset glyphs --steps 600 --memory-size 4096
    python python/train_xbm.py --dataset digits --steps 50 --memory-size 0       # batch-only baseline
    torchrun --nproc_per_node 2 python/train_xbm.py --dataset digits --steps 50  # DDP (gloo on CPU, nccl on GPU)

Uses only the public API of xbm_kernels. Recall@K: every test image queries all the
others (query = gallery = test set, itself excluded); a hit is a same-class image among
the K nearest by cosine similarity. Train and test classes are disjoint.

Checkpoints (--checkpoint) hold the model, the optimizer, the XBMLoss state (memory and
step counter) and the sampler/augmentation RNG state of every rank, so --resume continues
with exactly the losses an uninterrupted run would have had. They load with
torch.load(..., weights_only=True).
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import xbm_kernels as xk
import xbm_data

HERE = os.path.dirname(os.path.abspath(__file__))
KS = (1, 2, 4, 8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Settings a resumed run must share with the checkpoint (steps may grow).
RESUME_KEYS = ("dataset", "max_classes", "min_faces", "test_classes", "loss", "memory_size", "memory_dtype",
               "start_iteration", "weight", "batch", "classes_per_batch", "embedding_dim", "width", "lr",
               "weight_decay", "jitter", "world_size")


# --- model ----------------------------------------------------------------------------------

class EmbeddingNet(nn.Module):
    """Four conv-BN-ReLU-maxpool blocks (32x32 -> 2x2), global average pool, a linear
    head and L2 normalisation (the losses work on cosine similarity)."""

    def __init__(self, embedding_dim=128, width=32):
        super().__init__()
        layers, c_in = [], 1
        for c_out in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, embedding_dim)

    def forward(self, x):
        x = self.features(x).mean(dim=(2, 3))
        return F.normalize(self.head(x), dim=1)


# --- evaluation -----------------------------------------------------------------------------

def recall_at_k(embeddings, labels, ks=KS, chunk=2048):
    """{k: fraction of queries whose k nearest other items (cosine / dot product) hold at
    least one item of the query's class}. Every item is a query and the gallery is all
    items but the query itself."""
    n = embeddings.shape[0]
    kmax = min(max(ks), n - 1)
    hits = torch.zeros(len(ks), dtype=torch.int64)
    emb = embeddings.float()
    for start in range(0, n, chunk):
        q = emb[start:start + chunk]
        sim = q @ emb.T
        rows = torch.arange(q.shape[0], device=sim.device)
        sim[rows, rows + start] = float("-inf")  # the query itself is not in its gallery
        nn_idx = sim.topk(kmax, dim=1).indices
        match = (labels[nn_idx] == labels[start:start + chunk, None]).cpu()
        for j, k in enumerate(ks):
            hits[j] += match[:, :k].any(dim=1).sum()
    return {k: float(h) / n for k, h in zip(ks, hits)}


@torch.no_grad()
def embed(model, images, device, batch=1024):
    was_training = model.training
    model.eval()
    out = [model(images[i:i + batch].to(device).float() / 255.0) for i in range(0, len(images), batch)]
    model.train(was_training)
    return torch.cat(out)


def evaluate(model, split, device):
    return recall_at_k(embed(model, split.test_images, device), split.test_labels.to(device))


def fmt_recall(r):
    return "  ".join(f"R@{k} {v:.4f}" for k, v in r.items())


# --- distributed ----------------------------------------------------------------------------

def setup_distributed(device_arg):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) starts the process
    group: nccl when training on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cuda" if use_cuda else "cpu")


def gather_objects(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# --- checkpoints ----------------------------------------------------------------------------

def save_checkpoint(path, step, model, opt, crit, data_rng, config, rank, world):
    rngs = gather_objects(data_rng.get_state(), world)  # every rank's sampler/augmentation stream
    if rank != 0:
        return
    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "xbm": crit.state_dict(),
             "data_rng": rngs, "torch_rng": torch.get_rng_state(), "config": config}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(path, model, opt, crit, data_rng, config, rank, world, device):
    state = torch.load(path, map_location=device, weights_only=True)
    diff = {k: (state["config"].get(k), config[k]) for k in RESUME_KEYS if state["config"].get(k) != config[k]}
    if diff:
        raise ValueError(f"--resume: {path} was written with different settings (checkpoint, now): {diff}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    crit.load_state_dict(state["xbm"])
    data_rng.set_state(state["data_rng"][rank].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    return int(state["step"])


# --- training -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=xbm_data.DATASETS, default="glyphs")
    d.add_argument("--cache-dir", default=os.path.join(HERE, "cache"), help="where rendered glyphs are kept")
    d.add_argument("--max-classes", type=int, default=3000, help="glyphs: number of characters (classes)")
    d.add_argument("--min-faces", type=int, default=16, help="glyphs: a character needs this many distinct faces")
    d.add_argument("--test-classes", type=int, default=None,
                   help="held-out classes (default: glyphs 500, digits/fashion 5)")
    d.add_argument("--no-jitter", dest="jitter", action="store_false", help="no random affine jitter in training")
    m = p.add_argument_group("loss and memory")
    m.add_argument("--loss", choices=sorted(xk.LOSSES), default="contrastive")
    m.add_argument("--memory-size", type=int, default=4096, help="XBM rows; 0 = batch-only baseline (no memory)")
    m.add_argument("--memory-dtype", choices=list(DTYPES), default="float32")
    m.add_argument("--start-iteration", type=int, default=0, help="steps before the memory joins")
    m.add_argument("--weight", type=float, default=1.0, help="weight of the memory loss")
    m.add_argument("--backend", choices=["auto"] + list(xk.available_backends()), default="auto")
    t = p.add_argument_group("training")
    t.add_argument("--batch", type=int, default=64, help="batch size per process")
    t.add_argument("--classes-per-batch", type=int, default=32,
                   help="P of the P x K sampler (K = batch / P samples per class)")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--embedding-dim", type=int, default=128)
    t.add_argument("--width", type=int, default=32, help="channels of the first conv block")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model (XBMLoss stays eager)")
    r = p.add_argument_group("checkpoints and output")
    r.add_argument("--checkpoint", default=None,
                   help="write a checkpoint here (every --save-every steps, and at the end)")
    r.add_argument("--save-every", type=int, default=0)
    r.add_argument("--resume", default=None, help="continue from this checkpoint")
    r.add_argument("--stop-after", type=int, default=None,
                   help="stop (and checkpoint) after this many steps of this invocation, as if interrupted")
    r.add_argument("--eval-every", type=int, default=0, help="also print Recall@K every N steps")
    r.add_argument("--log-every", type=int, default=10, help="progress-bar refresh interval (steps)")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    r.add_argument("--quiet", action="store_true", help="print nothing but the final recalls")
    args = p.parse_args(argv)
    if args.batch % args.classes_per_batch:
        p.error(f"--batch {args.batch} must be a multiple of --classes-per-batch {args.classes_per_batch}")
    if args.batch // args.classes_per_batch < 2:
        p.error("--batch / --classes-per-batch must be >= 2 (every class needs a positive pair in the batch)")
    return args


def build_criterion(args, world, device):
    global_batch = args.batch * world
    if args.memory_size == 0:
        # Batch-only baseline: the same XBMLoss (so the same in-batch loss and statistics)
        # with the memory never switched on.
        return xk.XBMLoss(global_batch, args.embedding_dim, loss=args.loss, start_iteration=2 ** 62,
                          backend=args.backend).to(device)
    if args.memory_size < global_batch:
        raise ValueError(f"--memory-size {args.memory_size} is smaller than the global batch {global_batch}")
    return xk.XBMLoss(args.memory_size, args.embedding_dim, loss=args.loss, weight=args.weight,
                      start_iteration=args.start_iteration, memory_dtype=DTYPES[args.memory_dtype],
                      gather_distributed=world > 1, backend=args.backend).to(device)


def run(args, split=None):
    """Trains and evaluates; returns {"losses", "recall_before", "recall_after", "step",
    "wall_s"} (losses of this invocation's steps, as floats)."""
    rank, world, device = setup_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda *a: None) if (rank != 0 or args.quiet) else print
    if split is None:
        split = xbm_data.load(args.dataset, args.cache_dir, test_classes=args.test_classes,
                              max_classes=args.max_classes, min_faces=args.min_faces, quiet=args.quiet or rank != 0)
    say(split.describe())
    config = {k: getattr(args, k) for k in RESUME_KEYS if k != "world_size"}
    config["world_size"] = world

    torch.manual_seed(args.seed)  # same initial model on every rank
    model = EmbeddingNet(args.embedding_dim, args.width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    crit = build_criterion(args, world, device)
    data_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + rank)  # different data per rank
    sampler = xbm_data.PKSampler(split.train_labels, args.classes_per_batch, args.batch // args.classes_per_batch,
                                 data_rng)
    step = 0
    if args.resume:
        step = load_checkpoint(args.resume, model, opt, crit, data_rng, config, rank, world, device)
        say(f"resumed from {args.resume} at step {step}")
    train_model = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if args.compile:
        train_model = torch.compile(train_model)
    mem = "batch only" if args.memory_size == 0 else \
        f"memory {args.memory_size} x {args.embedding_dim} {args.memory_dtype} from step {args.start_iteration}"
    say(f"loss {args.loss}, {mem}, batch {args.batch} x {world} process(es) ({args.classes_per_batch} classes x "
        f"{args.batch // args.classes_per_batch}), backend {args.backend}, device {device}")

    def eval_now():
        r = evaluate(model, split, device) if rank == 0 else None
        if world > 1:
            dist.barrier()
        return r

    recall_before = eval_now()
    if rank == 0:
        say(f"Recall@1 before training (step {step}): {recall_before[1]:.4f}   ({fmt_recall(recall_before)})")

    end = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    images, labels = split.train_images, split.train_labels
    losses = []
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=step, disable=not args.progress or args.quiet or rank != 0,
               dynamic_ncols=True, desc="train")
    t0 = time.perf_counter()
    model.train()
    while step < end:
        idx = sampler.sample()
        x = images[idx].float() / 255.0
        if args.jitter:
            x = xbm_data.jitter(x, data_rng)
        x, y = x.to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
        loss = crit(train_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == end:
            s = {k: int(v) for k, v in crit.last_stats.items()}  # one host sync per log interval
            post = {"loss": f"{float(torch.stack(losses[-args.log_every:]).mean()):.4f}",
                    "batch +/-": f"{s['in_batch_pos']}/{s['in_batch_neg']}"}
            if "memory_pos" in s:
                post["memory +/-"] = f"{s['memory_pos']}/{s['memory_neg']}"
            bar.set_postfix(post, refresh=False)
        if args.checkpoint and args.save_every and step % args.save_every == 0 and step < end:
            save_checkpoint(args.checkpoint, step, model, opt, crit, data_rng, config, rank, world)
        if args.eval_every and step % args.eval_every == 0 and step < end:
            r = eval_now()
            if rank == 0:
                bar.write(f"step {step}: {fmt_recall(r)}")
    bar.close()
    wall = time.perf_counter() - t0
    if args.checkpoint:
        save_checkpoint(args.checkpoint, step, model, opt, crit, data_rng, config, rank, world)
        say(f"checkpoint: {args.checkpoint} (step {step})")
    recall_after = eval_now()
    if rank == 0:
        say(f"Recall@1 after training (step {step}): {recall_after[1]:.4f}   ({fmt_recall(recall_after)})")
        if args.quiet:
            print(f"R@1 {recall_before[1]:.4f} -> {recall_after[1]:.4f}  ({fmt_recall(recall_after)})")
    return {"losses": [float(v) for v in losses], "recall_before": recall_before, "recall_after": recall_after,
            "step": step, "wall_s": wall}


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
