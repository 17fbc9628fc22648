"""XBMLoss(gather_distributed=True) across 2 gloo processes against a single-process
float64 computation of the same math: every rank all-gathers the batch in rank order,
enqueues the same global batch (so the memories stay identical), and its loss is the
in-batch loss over its local batch plus weight x the memory loss of its local anchors
against the memory holding the global batch (its own rows excluded by slot)."""
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import xbm_kernels as xk

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORLD, B, D, M, STEPS, CLASSES = 2, 6, 8, 20, 6, 4   # 2 x 6 rows per step through a 20-row ring: wraps
START, WEIGHT, MARGIN, POS_EPS = 1, 0.7, 0.5, 1e-5
MASKED_STEP = 4                                        # in the masked case, this step enqueues some rows only
BACKENDS = [b for b in ("reference", "cpu") if b in xk.available_backends()]
CASES = [(b, masked) for b in BACKENDS for masked in (False, True)]
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
    for backend, masked in CASES:
        crit = xk.XBMLoss(M, D, loss="contrastive", weight=WEIGHT, start_iteration=START, gather_distributed=True,
                          backend=backend, normalize=False)  # the oracle below works on the raw rows
        losses, grads = [], []
        for t in range(STEPS):
            e = x[t, rank].clone().requires_grad_(True)
            mask = masks[t, rank] if (masked and t == MASKED_STEP) else None
            loss = crit(e, y[t, rank], enqueue_mask=mask)
            loss.backward()
            losses.append(loss.detach())
            grads.append(e.grad)
        mem = crit.memory
        results[f"{backend}-{masked}"] = {"losses": torch.stack(losses), "grads": torch.stack(grads),
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


@pytest.mark.parametrize("xbm_backend,masked", CASES)
def test_gather_distributed_matches_single_process(ddp_results, xbm_backend, masked):
    x, y, masks = make_data()
    exp_losses, exp_grads, exp_mem, exp_mem_y, exp_ptr, exp_filled = expected(x, y, masks, masked)
    key = f"{xbm_backend}-{masked}"
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
