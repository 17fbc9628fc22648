r"""Train a small embedding CNN with XBMLoss and evaluate Recall@K on held-out classes.

The defaults are the configuration the README's study found the memory helping in:
multi-similarity loss, 16-row batches (8 classes x 2), a 16384-row memory at weight 1
joining after 40 % of the steps (from step 0 with --init), 1200 steps, CNN width 16.

Examples (every one runs in CI with few steps: tests/test_first_hour.py):

    python python/train_xbm.py                                     # glyphs, the defaults above
    python python/train_xbm.py --memory-size 0                     # the same without the memory
    python python/train_xbm.py --compare-batch-only --steps 400    # both, Recall@1 side by side
    python python/train_xbm.py --dataset digits --classes-per-batch 4 --steps 50 --memory-size 0
    torchrun --nproc_per_node 2 python/train_xbm.py --dataset digits --classes-per-batch 4 --steps 50 \
        --memory-size 1024    # DDP (gloo on CPU, nccl on GPU)

The paper's recipe (contrastive loss, weight 1) is one flag away, --loss contrastive; the
study found it lowering Recall@1 in every setting tried (keep the memory off, or
--weight 0.1). The regime where the memory helps most: pretrain batch-only on classes set
apart, then fine-tune at a low learning rate with a deep memory:

    python python/train_xbm.py --pretrain-classes 4000 --train-split pretrain --memory-size 0 --batch 64 \
        --classes-per-batch 32 --steps 1500 --checkpoint python/checkpoints/pretrained.pt
    python python/train_xbm.py --pretrain-classes 4000 --init python/checkpoints/pretrained.pt --lr 3e-4 \
        --compare-batch-only --drift-every 25 --step-log steps.csv

Uses only the public API of xbm_kernels. Recall@K: every test image queries all the
others (query = gallery = test set, itself excluded); a hit is a same-class image among
the K nearest by cosine similarity. Train and test classes are disjoint.

Checkpoints (--checkpoint) hold the model, the optimizer, the XBMLoss state (memory and
step counter) and the sampler/augmentation RNG state of every rank, so --resume continues
with exactly the losses an uninterrupted run would have had. They load with
torch.load(..., weights_only=True).
"""
import argparse
import json
import os
import sys
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
RESUME_KEYS = ("dataset", "max_classes", "min_faces", "test_classes", "pretrain_classes", "train_split", "loss", "memory_size", "memory_dtype",
               "start_iteration", "weight", "batch", "classes_per_batch", "embedding_dim", "width", "lr",
               "weight_decay", "jitter", "fresh_memory", "world_size")
DRIFT_PROBES = 512  # training images (no jitter) whose embeddings the drift measurement follows


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

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except for on/off flags, whose default is the flag's absence; keeps
    the epilog's line breaks."""

    def _get_help_string(self, action):
        if action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    # The epilog: the module docstring's defaults and examples (one text for both)
    epilog = __doc__[__doc__.index("The defaults are"):__doc__.index("Uses only the public API")].rstrip()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter, epilog=epilog)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=xbm_data.DATASETS, default="glyphs")
    d.add_argument("--cache-dir", default=os.path.join(HERE, "cache"), help="where rendered glyphs are kept")
    d.add_argument("--max-classes", type=int, default=10000, help="glyphs: number of characters (classes)")
    d.add_argument("--min-faces", type=int, default=12, help="glyphs: a character needs this many distinct faces")
    d.add_argument("--test-classes", type=int, default=None,
                   help="held-out classes (default: glyphs 1000, digits/fashion 5)")
    d.add_argument("--pretrain-classes", type=int, default=0,
                   help="glyphs: classes set apart for pretraining, disjoint from the train and test classes")
    d.add_argument("--train-split", choices=["train", "pretrain"], default="train",
                   help="which class set trains: pretrain = the --pretrain-classes (a backbone for --init)")
    d.add_argument("--no-jitter", dest="jitter", action="store_false",
                   help="train without the random affine jitter (jitter is on unless this is given)")
    m = p.add_argument_group("loss and memory")
    m.add_argument("--loss", choices=sorted(xk.LOSSES), default="multi_similarity",
                   help="contrastive is the paper's; at weight 1 the study found it hurting")
    m.add_argument("--memory-size", type=int, default=16384, help="XBM rows; 0 = batch-only baseline (no memory)")
    m.add_argument("--memory-dtype", choices=list(DTYPES), default="float32")
    m.add_argument("--start-iteration", type=int, default=None,
                   help="steps before the memory joins (default: 0 with --init, 40%% of --steps from scratch)")
    m.add_argument("--weight", type=float, default=1.0, help="weight of the memory loss")
    m.add_argument("--backend", choices=["auto"] + list(xk.available_backends()), default="auto")
    m.add_argument("--fresh-memory", action="store_true",
                   help="diagnostic (slow): before every step re-embed the memory's images with the current "
                        "model, so the memory is never stale")
    t = p.add_argument_group("training")
    t.add_argument("--batch", type=int, default=16, help="batch size per process")
    t.add_argument("--classes-per-batch", type=int, default=8,
                   help="P of the P x K sampler (K = batch / P samples per class)")
    t.add_argument("--steps", type=int, default=1200)
    t.add_argument("--init", default=None,
                   help="start from the model weights of this checkpoint (fine-tuning; a fresh optimizer)")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--embedding-dim", type=int, default=128)
    t.add_argument("--width", type=int, default=16, help="channels of the first conv block")
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
    r.add_argument("--no-eval-before", dest="eval_before", action="store_false",
                   help="skip the Recall@K of the initial model (saves an evaluation)")
    r.add_argument("--log-every", type=int, default=10,
                   help="progress refresh interval (steps); without a terminal a progress line every "
                        "max(this, steps / 10) steps")
    r.add_argument("--step-log", default=None,
                   help="write one CSV row per step here: loss and active pair counts (in batch, memory)")
    r.add_argument("--drift-every", type=int, default=0,
                   help="embed a fixed probe set every N steps and report the feature drift "
                        "||f_t(x) - f_{t-dt}(x)||^2 at dt = N, 2N, 4N, ... and the memory's age K/B")
    r.add_argument("--compare-batch-only", action="store_true",
                   help="first train the same settings without the memory, then with it, and print both Recall@1")
    r.add_argument("--json", default=None, help="write the run's results (recalls, drift, pair counts) here")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    r.add_argument("--quiet", action="store_true", help="print nothing but the final recalls")
    args = p.parse_args(argv)
    if args.batch % args.classes_per_batch:
        p.error(f"--batch {args.batch} must be a multiple of --classes-per-batch {args.classes_per_batch}")
    if args.batch // args.classes_per_batch < 2:
        p.error("--batch / --classes-per-batch must be >= 2 (every class needs a positive pair in the batch)")
    if args.drift_every < 0:
        p.error(f"--drift-every: expected >= 0, got {args.drift_every}")
    if args.fresh_memory and args.memory_size == 0:
        p.error("--fresh-memory needs a memory (--memory-size > 0)")
    if args.train_split == "pretrain" and args.pretrain_classes <= 0:
        p.error("--train-split pretrain needs --pretrain-classes > 0")
    if args.start_iteration is None:  # the study's settings: at once when fine-tuning, after 40 % from scratch
        args.start_iteration = 0 if args.init else int(0.4 * args.steps)
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


def drift_curve(snapshots, dts, from_step=0):
    """{dt: mean over probe images x and steps t of ||f_t(x) - f_{t-dt}(x)||^2} (the paper's
    feature drift), from `snapshots` {step: embeddings of the probe set}, over the pairs
    with t - dt >= from_step. A dt with no such pair is left out."""
    out = {}
    for dt in dts:
        vals = [float(((snapshots[t] - snapshots[t - dt]) ** 2).sum(dim=1).mean())
                for t in sorted(snapshots) if t - dt >= from_step and t - dt in snapshots]
        if vals:
            out[dt] = sum(vals) / len(vals)
    return out


def drift_dts(every, steps, memory_age=None):
    """every, 2 every, 4 every, ... up to half the run, and the memory's age (K / B steps)
    rounded to a multiple of `every` (the run's length when the memory outlives the run)."""
    dts, dt = set(), every
    while dt <= max(every, steps // 2):
        dts.add(dt)
        dt *= 2
    if memory_age:
        dts.add(min(max(every, round(memory_age / every) * every), steps // every * every))
    return sorted(d for d in dts if 0 < d <= steps)


class _FreshMemory:
    """The no-staleness diagnostic: remembers the (augmented) image behind every memory slot
    and, before each step, re-embeds all of them with the current model, overwriting the
    stored features. Costs a forward pass over the whole memory per step."""

    def __init__(self, crit, chunk=256):
        self.crit, self.chunk = crit, chunk
        self.images = torch.zeros(crit.memory.size, 1, xbm_data.IMAGE_SIZE, xbm_data.IMAGE_SIZE)

    @torch.no_grad()
    def refresh(self, model, device):
        n = len(self.crit.memory)
        if n == 0:
            return
        # Training-mode forward (batch statistics, like the rows' first embedding) that
        # leaves the BatchNorm running statistics as they were.
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
        for m in bns:
            m.momentum = 0.0
        imgs = self.images[:n]
        fresh = torch.cat([model(imgs[i:i + self.chunk].to(device)) for i in range(0, n, self.chunk)])
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum = mom
            m.num_batches_tracked.copy_(nbt)
        self.crit.memory.embeddings[:n] = fresh.to(self.crit.memory.embeddings.dtype)

    def will_enqueue(self):
        return int(self.crit.iteration) >= self.crit.start_iteration

    def record(self, ptr, x):
        slots = (ptr + torch.arange(x.shape[0])) % self.crit.memory.size
        self.images[slots] = x.detach().cpu().float()


def load_data(args, quiet):
    """The data set, checked against what the run needs before anything is rendered or
    trained (xbm_data.DataSetTooSmall names the missing fonts)."""
    return xbm_data.load(args.dataset, args.cache_dir, test_classes=args.test_classes, max_classes=args.max_classes,
                         min_faces=args.min_faces, quiet=quiet, pretrain_classes=args.pretrain_classes,
                         min_train_classes=args.classes_per_batch)


class UsageError(ValueError):
    """A flag that cannot work with this data; printed without a traceback."""


def check_sampler(args, labels):
    """Enough training classes for the P x K sampler, or an error naming the flags."""
    k = args.batch // args.classes_per_batch
    counts = torch.bincount(labels)
    usable = int((counts >= k).sum())
    if usable < args.classes_per_batch:
        raise UsageError(f"--classes-per-batch {args.classes_per_batch}: the {args.dataset} training split has only "
                         f"{usable} classes with >= {k} samples (--batch / --classes-per-batch); use "
                         f"--classes-per-batch <= {usable} (and a --batch that is a multiple of it)")


def run(args, split=None):
    """Trains and evaluates; returns {"losses", "recall_before", "recall_after", "step",
    "wall_s", "pairs" (per step: in-batch +, in-batch -, memory +, memory - active pairs, summed
    over the batch), "drift" ({dt: drift}, with --drift-every)} (this invocation's steps)."""
    rank, world, device = setup_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda *a: None) if (rank != 0 or args.quiet) else print
    if split is None:
        split = load_data(args, quiet=args.quiet or rank != 0)
    if args.train_split == "pretrain" and split.pretrain_labels is None:
        raise ValueError("--train-split pretrain: the data set has no pretraining classes (--pretrain-classes)")
    say(split.describe())
    config = {k: getattr(args, k) for k in RESUME_KEYS if k != "world_size"}
    config["world_size"] = world
    if args.fresh_memory and world > 1:
        raise ValueError("--fresh-memory: single process only")

    torch.manual_seed(args.seed)  # same initial model on every rank
    model = EmbeddingNet(args.embedding_dim, args.width).to(device)
    if args.init:
        state = torch.load(args.init, map_location=device, weights_only=True)
        model.load_state_dict(state["model"] if "model" in state else state)
        say(f"model initialised from {args.init}")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    crit = build_criterion(args, world, device)
    fresh = _FreshMemory(crit) if args.fresh_memory else None
    data_rng = torch.Generator().manual_seed(args.seed * 1_000_003 + rank)  # different data per rank
    if args.train_split == "pretrain":
        images, labels = split.pretrain_images, split.pretrain_labels
    else:
        images, labels = split.train_images, split.train_labels
    check_sampler(args, labels)
    sampler = xbm_data.PKSampler(labels, args.classes_per_batch, args.batch // args.classes_per_batch, data_rng)
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
    if fresh:
        mem += " (re-embedded every step: no staleness)"
    say(f"loss {args.loss}, {mem}, batch {args.batch} x {world} process(es) ({args.classes_per_batch} classes x "
        f"{args.batch // args.classes_per_batch}), backend {args.backend}, device {device}, "
        f"classes: {args.train_split}")

    def eval_now():
        r = evaluate(model, split, device) if rank == 0 else None
        if world > 1:
            dist.barrier()
        return r

    recall_before = eval_now() if args.eval_before else None
    if rank == 0 and recall_before:
        say(f"Recall@1 before training (step {step}): {recall_before[1]:.4f}   ({fmt_recall(recall_before)})")

    probes, snapshots = None, {}
    if args.drift_every:
        pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(12345))[:DRIFT_PROBES]
        probes = images[pick]
        snapshots[step] = embed(model, probes, device).cpu()

    end = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    losses, pairs = [], []
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    quiet_bar = not args.progress or args.quiet or rank != 0
    bar = tqdm(total=args.steps, initial=step, disable=quiet_bar or not tty, dynamic_ncols=True, desc="train")
    # Without a terminal a progress bar floods the log with carriage returns: plain lines instead.
    line_every = 0 if (quiet_bar or tty) else max(args.log_every, args.steps // 10, 1)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    t0 = time.perf_counter()
    model.train()
    while step < end:
        idx = sampler.sample()
        x = images[idx].float() / 255.0
        if args.jitter:
            x = xbm_data.jitter(x, data_rng)
        x, y = x.to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
        if fresh:
            ptr, enqueues = int(crit.memory.ptr), fresh.will_enqueue()
            fresh.refresh(model, device)
        loss = crit(train_model(x), y)
        if fresh and enqueues:
            fresh.record(ptr, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        s = crit.last_stats
        pairs.append(torch.stack([s["in_batch_pos"], s["in_batch_neg"], s.get("memory_pos", zero),
                                  s.get("memory_neg", zero)]).to(torch.int64))
        step += 1
        bar.update(1)
        if step % args.log_every == 0 or step == end:
            c = [int(v) for v in pairs[-1]]  # one host sync per log interval
            post = {"loss": f"{float(torch.stack(losses[-args.log_every:]).mean()):.4f}", "batch +/-": f"{c[0]}/{c[1]}"}
            if crit._iteration > crit.start_iteration:  # the memory has joined (every stats key is always there)
                post["memory +/-"] = f"{c[2]}/{c[3]}"
            bar.set_postfix(post, refresh=False)
            if line_every and (step % line_every == 0 or step == end):
                print(f"step {step}/{args.steps}: " + ", ".join(f"{k} {v}" for k, v in post.items()), flush=True)
        if args.drift_every and step % args.drift_every == 0:
            snapshots[step] = embed(model, probes, device).cpu()
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
    pairs = torch.stack(pairs).cpu().tolist() if pairs else []
    drift = {}
    if args.drift_every:
        age = args.memory_size / (args.batch * world) if args.memory_size else None
        drift = drift_curve(snapshots, drift_dts(args.drift_every, args.steps, age), args.start_iteration)
    if rank == 0:
        say(f"Recall@1 after training (step {step}): {recall_after[1]:.4f}   ({fmt_recall(recall_after)})")
        if drift:
            say("feature drift ||f_t(x) - f_(t-dt)(x)||^2, mean over steps from " f"{args.start_iteration}: " +
                ", ".join(f"dt {dt} {v:.2e}" for dt, v in drift.items()))
        if args.quiet:
            before = f"{recall_before[1]:.4f} -> " if recall_before else ""
            print(f"R@1 {before}{recall_after[1]:.4f}  ({fmt_recall(recall_after)})")
    if args.step_log and rank == 0:
        with open(args.step_log, "w") as f:
            f.write("step,loss,in_batch_pos,in_batch_neg,memory_pos,memory_neg\n")
            first = step - len(losses)
            for i, (l, c) in enumerate(zip(losses, pairs)):
                f.write(f"{first + i + 1},{float(l):.6g}," + ",".join(map(str, c)) + "\n")
    result = {"losses": [float(v) for v in losses], "recall_before": recall_before, "recall_after": recall_after,
              "step": step, "wall_s": wall, "pairs": pairs, "drift": drift}
    if args.json and rank == 0:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "losses"}, f)
    return result


def compare(args):
    """Trains batch-only, then with the memory (same seed, data and steps); prints both."""
    split = load_data(args, quiet=args.quiet)
    base = run(argparse.Namespace(**dict(vars(args), memory_size=0, json=None, step_log=None,
                                         checkpoint=None, fresh_memory=False)), split=split)
    xbm = run(args, split=split)
    b, x = base["recall_after"][1], xbm["recall_after"][1]
    print(f"Recall@1 on the held-out classes: batch-only {b:.4f}, with the {args.memory_size}-row memory {x:.4f} "
          f"({100 * (x - b):+.1f} points)")
    return {"batch_only": base, "xbm": xbm}


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.compare_batch_only:
            if args.memory_size == 0 or args.resume:
                raise ValueError("--compare-batch-only: needs --memory-size > 0 and no --resume")
            return compare(args)
        return run(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (xbm_data.DataSetTooSmall, UsageError) as exc:  # the cause and the fix, without a traceback
        sys.exit(f"train_xbm.py: {exc}")
