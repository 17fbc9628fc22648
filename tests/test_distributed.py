"""XBMLoss(gather_distributed=True) across 2 gloo processes against a single-process
float64 computation of the same math: every rank all-gathers the batch in rank order,
enqueues the same global batch (so the memories stay identical), and its loss is the
in-batch loss over its local batch plus weight x the memory loss of its local anchors
against the memory holding the global batch (its own rows excluded by slot); also with the
check that does not wait for the GPU (CUDA tensors, forced here on CPU ones). The batch sizes
are read on the host once per new size (on every step before), and a mismatch still raises."""
import datetime
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import xbm_kernels as xk

from syncs import HostReads

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORLD, B, D, M, STEPS, CLASSES = 2, 6, 8, 20, 6, 4   # 2 x 6 rows per step through a 20-row ring: wraps
START, WEIGHT, MARGIN, POS_EPS = 1, 0.7, 0.5, 1e-5
MASKED_STEP = 4                                        # in the masked case, this step enqueues some rows only
BACKENDS = [b for b in ("reference", "cpu") if b in xk.available_backends()]
CASES = [(b, masked, deferred) for b in BACKENDS for masked in (False, True) for deferred in (False, True)]
HAS_PML = importlib.util.find_spec("pytorch_metric_learning") is not None


def make_data():
    """Embeddings (STEPS, WORLD, B, D), labels, enqueue masks; every pair of rows kept
    1e-4 away from the thresholds (margin, 1 - pos_eps) so float32 vs float64 cannot flip a set."""
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        x = F.normalize(torch.randn(STEPS, WORLD, B, D, generator=g, dtype=torch.float64), dim=-1).float()
        flat = x.reshape(-1, D).double()
        s = flat @ flat.T
        s = s[~torch.eye(len(flat), dtype=torch.bool)]
        if ((s - MARGIN).abs().min() > 1e-4) and ((s - (1 - POS_EPS)).abs().min() > 1e-4):
            break
    y = torch.randint(0, CLASSES, (STEPS, WORLD, B), generator=g)
    masks = torch.rand(STEPS, WORLD, B, generator=g) < 0.6
    return x, y, masks


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    x, y, masks = make_data()
    results = {}
    for backend, masked, deferred in CASES:
        crit = xk.XBMLoss(M, D, loss="contrastive", weight=WEIGHT, start_iteration=START, gather_distributed=True,
                          backend=backend, normalize=False)  # the oracle below works on the raw rows
        crit.memory._deferred_check = deferred  # True: the path of CUDA tensors
        losses, grads = [], []
        for t in range(STEPS):
            e = x[t, rank].clone().requires_grad_(True)
            mask = masks[t, rank] if (masked and t == MASKED_STEP) else None
            loss = crit(e, y[t, rank], enqueue_mask=mask)
            loss.backward()
            losses.append(loss.detach())
            grads.append(e.grad)
        mem = crit.memory
        results[f"{backend}-{masked}-{deferred}"] = {"losses": torch.stack(losses), "grads": torch.stack(grads),
                                          "memory": mem.embeddings.clone(), "labels": mem.labels.clone(),
                                          "ptr": int(mem.ptr), "filled": len(mem)}
    if HAS_PML:  # the PML drop-in: PML's SupConLoss, fused, on the gathered memory
        from pytorch_metric_learning import losses as pml_losses
        from xbm_kernels.pml import CrossBatchMemory as PmlMemory
        crit = PmlMemory(pml_losses.SupConLoss(), D, memory_size=M, gather_distributed=True)
        out_losses, grads = [], []
        for t in range(STEPS):
            e = x[t, rank].clone().requires_grad_(True)
            loss = crit(e, y[t, rank])
            loss.backward()
            out_losses.append(loss.detach())
            grads.append(e.grad)
        results["pml-supcon"] = {"losses": torch.stack(out_losses), "grads": torch.stack(grads),
                                 "memory": crit.memory.embeddings.clone(), "fused": crit.fused is not None}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def dense_contrastive(x, y, ref, ref_y, n_valid, self_index):
    """Mean over anchors of sum_P (1 - S) + sum_{N, S > margin} S (CONTRACT.md section 1)."""
    S = x @ ref.T
    cols = torch.arange(ref.shape[0])
    valid = (cols[None, :] < n_valid) & (cols[None, :] != self_index[:, None])
    same = y[:, None] == ref_y[None, :]
    pos = valid & same & (S < 1 - POS_EPS)
    neg = valid & ~same & (S > MARGIN)
    return (torch.where(pos, 1 - S, 0).sum(1) + torch.where(neg, S, 0).sum(1)).mean()


def expected(x, y, masks, masked):
    """Per-rank losses and gradients, and the final memory, computed in one process."""
    mem, mem_y = torch.zeros(M, D, dtype=torch.float64), torch.full((M,), -1, dtype=torch.int64)
    ptr = filled = 0
    losses, grads = torch.zeros(STEPS, WORLD, dtype=torch.float64), torch.zeros(STEPS, WORLD, B, D, dtype=torch.float64)
    for t in range(STEPS):
        gx, gy = x[t].reshape(WORLD * B, D).double(), y[t].reshape(WORLD * B)
        gmask = masks[t].reshape(-1) if (masked and t == MASKED_STEP) else torch.ones(WORLD * B, dtype=torch.bool)
        slot_of_row = torch.full((WORLD * B,), -1)
        if t >= START:  # enqueue the global batch in rank order (masked rows skipped)
            rows = gmask.nonzero().flatten()
            slots = (ptr + torch.arange(len(rows))) % M
            mem[slots], mem_y[slots], slot_of_row[rows] = gx[rows], gy[rows], slots
            ptr, filled = (ptr + len(rows)) % M, min(M, filled + len(rows))
        for r in range(WORLD):
            xr = gx[r * B:(r + 1) * B].clone().requires_grad_(True)
            yr = gy[r * B:(r + 1) * B]
            loss = dense_contrastive(xr, yr, xr, yr, B, torch.arange(B))
            if t >= START:
                loss = loss + WEIGHT * dense_contrastive(xr, yr, mem, mem_y, filled, slot_of_row[r * B:(r + 1) * B])
            loss.backward()
            losses[t, r], grads[t, r] = loss.detach(), xr.grad
    return losses, grads, mem, mem_y, ptr, filled


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("xbm_backend,masked,deferred", CASES)
def test_gather_distributed_matches_single_process(ddp_results, xbm_backend, masked, deferred):
    x, y, masks = make_data()
    exp_losses, exp_grads, exp_mem, exp_mem_y, exp_ptr, exp_filled = expected(x, y, masks, masked)
    key = f"{xbm_backend}-{masked}-{deferred}"
    r0 = ddp_results[0][key]
    for r in range(WORLD):
        got = ddp_results[r][key]
        # identical memories on every rank, holding the global batches in rank order
        assert torch.equal(got["memory"], r0["memory"]) and torch.equal(got["labels"], r0["labels"]), \
            f"rank {r}'s memory differs from rank 0's"
        assert (got["ptr"], got["filled"]) == (exp_ptr, exp_filled)
        assert torch.equal(got["memory"], exp_mem.float()), "memory rows are not the global batches in rank order"
        assert torch.equal(got["labels"].long(), exp_mem_y)
        # per-rank losses and gradients of the local anchors
        err = (got["losses"].double() - exp_losses[:, r]).abs() / exp_losses[:, r].abs().clamp_min(1e-6)
        assert err.max() < 1e-5, f"rank {r}: losses {got['losses'].tolist()} vs expected {exp_losses[:, r].tolist()}"
        gerr = (got["grads"].double() - exp_grads[:, r]).abs().max()
        assert gerr < 1e-5, f"rank {r}: max gradient error {gerr:.3g}"
    # the ranks saw different data, so their losses differ: the test is not vacuous
    assert not torch.equal(ddp_results[0][key]["losses"], ddp_results[1][key]["losses"])


@pytest.mark.skipif(not HAS_PML, reason="pytorch-metric-learning is not installed (python/install.sh installs it)")
def test_pml_drop_in_gathers_rank_consistently(ddp_results):
    """xbm_kernels.pml.CrossBatchMemory(gather_distributed=True): identical memories on every
    rank, and each rank's loss is PML's SupConLoss of its local anchors against the memory
    holding the global batch (own slots excluded), computed here in one process."""
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    x, y, _ = make_data()
    mem, mem_y = torch.zeros(M, D), torch.zeros(M, dtype=torch.int64)
    ptr = filled = 0
    for t in range(STEPS):
        gx, gy = x[t].reshape(WORLD * B, D), y[t].reshape(WORLD * B)
        slots = (ptr + torch.arange(WORLD * B)) % M
        mem[slots], mem_y[slots] = F.normalize(gx, dim=1), gy
        ptr, filled = (ptr + WORLD * B) % M, min(M, filled + WORLD * B)
        for r in range(WORLD):
            xr = gx[r * B:(r + 1) * B].clone().requires_grad_(True)
            yr = gy[r * B:(r + 1) * B]
            a1, p, a2, n = lmu.get_all_pairs_indices(yr, mem_y[:filled])
            keep = p != slots[r * B:(r + 1) * B][a1]
            loss = pml_losses.SupConLoss()(xr, yr, (a1[keep], p[keep], a2, n), mem[:filled], mem_y[:filled])
            loss.backward()
            got = ddp_results[r]["pml-supcon"]
            assert ddp_results[r]["pml-supcon"]["fused"]
            lv = float(loss.detach())
            assert abs(float(got["losses"][t]) - lv) <= 1e-5 * max(abs(lv), 1e-6), (t, r)
            assert float((got["grads"][t] - xr.grad).abs().max()) <= 1e-5 * max(float(xr.grad.abs().max()), 1e-6)
    for r in range(WORLD):
        assert torch.equal(ddp_results[r]["pml-supcon"]["memory"], ddp_results[0]["pml-supcon"]["memory"])
    assert torch.allclose(ddp_results[0]["pml-supcon"]["memory"], mem, atol=1e-6)


# --------------------------------------------------------------------------- the batch sizes across ranks

SIZES = [B, B, B, B - 2, B - 2, B]  # per step, the same on both ranks: a new size at steps 0, 3 and 5


def _size_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    # a rank that skips a collective the other makes fails the test in a minute, not hangs it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    x, y, _ = make_data()
    y = y.int()  # int32 labels: no range check (a read of its own on CPU tensors)

    def make():
        crit = xk.XBMLoss(M, D, loss="contrastive", gather_distributed=True, backend=BACKENDS[-1], normalize=False)
        crit.memory._deferred_check = True  # the path of CUDA tensors
        return crit

    out = {}
    crit = make()
    out["reads"] = []
    for t, b in enumerate(SIZES):
        with HostReads(free=lambda: [crit.memory._flag_host]) as reads:
            crit(x[t, rank, :b], y[t, rank, :b])
        out["reads"].append(reads.ops)
    crit.memory.sync_check()
    out["filled"] = len(crit.memory)

    # sizes that differ at the first step: read on every rank, every rank raises
    crit = make()
    try:
        crit(x[0, rank, :B - rank], y[0, rank, :B - rank])
        out["first"] = "no error"
    except ValueError as e:
        out["first"] = str(e)
    out["first_filled"] = len(crit.memory)

    # rank 1's size changes alone: rank 1 reads the sizes and raises at once; rank 0 (the size
    # it verified) compares them on the device, refuses the batch and raises at its next call
    crit = make()
    crit(x[0, rank], y[0, rank])
    crit.memory.sync_check()
    state = {k: v.clone() for k, v in crit.memory.state_dict().items()}
    try:
        if rank == 1:
            try:
                crit(x[1, rank, :B - 1], y[1, rank, :B - 1])
            finally:  # stands in for the batch's all-gathers rank 0 goes on to make
                for t in (x[1, rank], y[1, rank]):
                    dist.all_gather([torch.empty_like(t) for _ in range(WORLD)], t)
        else:
            crit(x[1, rank], y[1, rank])
            out["pending"] = crit.memory._pending is not None
            crit.memory.sync_check()
        out["alone"] = "no error"
    except ValueError as e:
        out["alone"] = str(e)
    out["alone_kept"] = all(torch.equal(v, state[k]) for k, v in crit.memory.state_dict().items())
    torch.save(out, os.path.join(out_dir, f"sizes{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def size_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("sizes")
    mp.spawn(_size_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"sizes{r}.pt", weights_only=True) for r in range(WORLD)]


def test_batch_sizes_are_read_once_per_new_size(size_results):
    """One host read (of every rank's size at once) at the first step and at each step whose
    size is new on this rank; none on the steps that repeat it (the path of CUDA tensors)."""
    want = [["tolist"] if t == 0 or SIZES[t] != SIZES[t - 1] else [] for t in range(len(SIZES))]
    for r in range(WORLD):
        assert size_results[r]["reads"] == want, f"rank {r}: host reads per step {size_results[r]['reads']}"
        assert size_results[r]["filled"] == min(M, WORLD * sum(SIZES))


def test_mismatched_batch_sizes_raise(size_results):
    for r in range(WORLD):
        got = size_results[r]
        assert got["first"] == (f"embeddings: gather_distributed needs the same batch size on every rank, "
                                f"got {[B, B - 1]}"), f"rank {r}: {got['first']}"
        assert got["first_filled"] == 0
        assert got["alone_kept"], f"rank {r}: the memory changed"
    assert size_results[1]["alone"] == (f"embeddings: gather_distributed needs the same batch size on every rank, "
                                        f"got {[B, B - 1]}")
    assert size_results[0]["pending"]  # not read at the step: reported by the next call
    assert size_results[0]["alone"] == (f"embeddings: gather_distributed needs the same batch size on every rank, "
                                        f"got {[B, B - 1]} at the previous enqueue; nothing was written")

