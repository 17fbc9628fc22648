"""xbm_kernels.pml.CrossBatchMemory against pytorch-metric-learning's own CrossBatchMemory:
the same batches through both give the same loss and gradients (fp32, 1e-5 relative), over
a wrapping memory and a step with enqueue_mask, for every fused configuration and a few
that run through PML's loss against our memory."""
import pytest
import torch

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances, losses, miners  # noqa: E402

import xbm_kernels as xk  # noqa: E402
from xbm_kernels import pml as xpml  # noqa: E402
from common import class_centres, rows_around  # noqa: E402

COS = distances.CosineSimilarity

# name: (factory of (loss, miner), expected fused configuration or None)
CONFIGS = {
    "contrastive-cos": (lambda: (losses.ContrastiveLoss(pos_margin=1, neg_margin=0.3, distance=COS()), None),
                        "contrastive"),
    "contrastive-cos-pm0.95": (lambda: (losses.ContrastiveLoss(pos_margin=0.995, neg_margin=-0.05, distance=COS()),
                                        None), "contrastive"),
    "multi_similarity": (lambda: (losses.MultiSimilarityLoss(), None), "multi_similarity"),
    "multi_similarity+miner": (lambda: (losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
                                        miners.MultiSimilarityMiner(epsilon=0.1)), "multi_similarity"),
    "supcon": (lambda: (losses.SupConLoss(temperature=0.1), None), "supcon"),
    "ntxent": (lambda: (losses.NTXentLoss(temperature=0.07), None), "ntxent"),
    "triplet+batchhard": (lambda: (losses.TripletMarginLoss(margin=0.1, distance=COS()),
                                   miners.BatchHardMiner(distance=COS())), "triplet"),
    "contrastive-lp (PML default)": (lambda: (losses.ContrastiveLoss(), None), "contrastive"),
    "contrastive-lp-margins": (lambda: (losses.ContrastiveLoss(pos_margin=0.2, neg_margin=1.2), None), "contrastive"),
    "contrastive-lp-squared": (lambda: (losses.ContrastiveLoss(distance=distances.LpDistance(power=2)), None), None),
    "circle": (lambda: (losses.CircleLoss(), None), None),
    "lifted": (lambda: (losses.LiftedStructureLoss(), None), None),
    "triplet-all": (lambda: (losses.TripletMarginLoss(), None), None),
}

BACKENDS = ["reference", "cpu"]
STEPS = 6  # memory of 40 rows, batches of 16 (step 4 masked): wraps at step 3


def _batches(seed, D=24, n_classes=6, B=16):
    gen = torch.Generator().manual_seed(seed)
    centres = class_centres(n_classes, D, gen)
    out = []
    for step in range(STEPS):
        y = torch.randint(0, n_classes, (B,), generator=gen)
        x = (rows_around(centres, y, gen, noise=0.8) * (1 + torch.rand(B, 1, generator=gen, dtype=torch.float64)))
        mask = torch.rand(B, generator=gen) < 0.5 if step == 4 else None
        out.append((x.float(), y, mask))
    return out


def _run(module, batches):
    results = []
    for x0, y, mask in batches:
        x = x0.clone().requires_grad_()
        loss = module(x, y, enqueue_mask=mask)
        loss.backward()
        results.append((loss.detach(), x.grad))
    return results


def _assert_rel(actual, expected, tol, what, floor=1e-6):
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, floor)
    err = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_losses_and_gradients_as_pml(name, backend):
    make, expected = CONFIGS[name]
    loss, miner = make()
    theirs = losses.CrossBatchMemory(loss, 24, memory_size=40, miner=miner)
    loss2, miner2 = make()
    ours = xpml.CrossBatchMemory(loss2, 24, memory_size=40, miner=miner2, backend=backend)
    assert (ours.fused or "").split(":")[0] == (expected or ""), ours.fused
    batches = _batches(seed=len(name))
    nonzero = 0
    for step, ((lt, gt), (lo, go)) in enumerate(zip(_run(theirs, batches), _run(ours, batches))):
        _assert_rel(lo, lt, 1e-5, f"step {step} loss")
        _assert_rel(go, gt, 1e-5, f"step {step} grad", floor=1e-6)
        nonzero += bool(lt != 0)
    assert nonzero >= STEPS - 1, "the sequence must exercise the loss"
    assert len(ours.memory) == 40 and ours.memory._ptr == theirs.queue_idx


def test_fused_configurations_listed():
    names = [n.split(":")[0] for n in xpml.fused_configurations()]
    assert names == ["contrastive", "multi_similarity", "supcon", "ntxent", "triplet"]
    for make, expected in CONFIGS.values():
        loss, miner = make()
        assert (xpml.plan(loss, miner)[0] or "").split(":")[0] == (expected or "")


def test_non_default_reducer_or_regularizer_falls_back():
    from pytorch_metric_learning import reducers, regularizers
    assert xpml.plan(losses.SupConLoss(reducer=reducers.MeanReducer()))[0] is None
    assert xpml.plan(losses.NTXentLoss(embedding_regularizer=regularizers.LpRegularizer()))[0] is None
    assert xpml.plan(losses.TripletMarginLoss(distance=COS()), miners.BatchHardMiner())[0] is None  # Lp miner
    assert xpml.plan(losses.MultiSimilarityLoss(distance=distances.DotProductSimilarity()))[0] is None


def test_unsupported_loss_is_refused_by_name():
    with pytest.raises(ValueError, match="ProxyAnchorLoss"):
        xpml.CrossBatchMemory(losses.ProxyAnchorLoss(10, 8), 8)


def test_bad_call_leaves_memory_unchanged():
    ours = xpml.CrossBatchMemory(losses.SupConLoss(), 8, memory_size=10)
    x, y = torch.randn(6, 8), torch.arange(6) % 3
    ours(x, y)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    bad = x.clone()
    bad[2, 1] = float("nan")
    for args, err in [((bad, y), ValueError), ((torch.randn(11, 8), torch.arange(11)), ValueError),
                      ((x, y[:5]), ValueError), ((torch.randn(6, 7), y), ValueError)]:
        with pytest.raises(err):
            ours(*args)
    with pytest.raises(ValueError, match="mutually exclusive"):
        ours(x, y, indices_tuple=(y, y, y), enqueue_mask=torch.ones(6, dtype=torch.bool))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resume_is_exact_where_pml_loses_the_pointer():
    batches = _batches(seed=3)
    a = xpml.CrossBatchMemory(losses.SupConLoss(), 24, memory_size=40)
    _run(a, batches[:3])
    b = xpml.CrossBatchMemory(losses.SupConLoss(), 24, memory_size=40)
    b.load_state_dict(a.state_dict())
    for (la, ga), (lb, gb) in zip(_run(a, batches[3:]), _run(b, batches[3:])):
        assert torch.equal(la, lb) and torch.equal(ga, gb)


def test_reset_queue():
    m = xpml.CrossBatchMemory(losses.SupConLoss(), 8, memory_size=10)
    m(torch.randn(4, 8), torch.arange(4))
    m.reset_queue()
    assert len(m.memory) == 0
    assert float(m(torch.randn(4, 8), torch.arange(4))) == 0.0  # no other rows: no pairs


def test_importing_xbm_kernels_does_not_need_pml():
    import subprocess
    import sys
    code = ("import sys; sys.modules['pytorch_metric_learning'] = None; import xbm_kernels; "
            "import xbm_kernels.pml as p; print(len(p.fused_configurations()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "5"


def _pml3_reference(loss, miner, x, y, mem, mem_labels, self_slots):
    """PML 3's order, built from PML's own parts: each anchor mined and scored against the
    memory without its own copy (the loss is a mean over anchors, so anchors separate)."""
    total = 0
    for i in range(x.shape[0]):
        keep = torch.arange(mem.shape[0]) != self_slots[i]
        m, ml = mem[keep], mem_labels[keep]
        xi, yi = x[i:i + 1], y[i:i + 1]
        total = total + loss(xi, yi, miner(xi, yi, m, ml), m, ml)
    return total / x.shape[0]


def test_self_pairs_are_removed_before_mining_as_pml3():
    """An anchor whose one positive in the memory is its own copy, with a negative near it:
    PML 2.9 mines with the copy (min positive = 1) and keeps that negative, PML 3 does not."""
    gen = torch.Generator().manual_seed(0)
    D = 16
    mem_x = torch.nn.functional.normalize(torch.randn(30, D, generator=gen), dim=1)
    mem_y = torch.arange(30) % 5
    x = torch.nn.functional.normalize(torch.randn(6, D, generator=gen), dim=1)
    y = torch.arange(6) % 5
    y[0] = 99                                           # no other row has label 99
    mem_x[3] = torch.nn.functional.normalize(x[0] + 0.05 * mem_x[3], dim=0)  # a negative at S ~ 0.999
    make = lambda: (losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner(epsilon=0.1))  # noqa: E731
    ours = xpml.CrossBatchMemory(*make()[:1], 16, memory_size=64, miner=make()[1])
    theirs = losses.CrossBatchMemory(*make()[:1], 16, memory_size=64, miner=make()[1])
    with torch.no_grad():
        ours(mem_x, mem_y)
        theirs(mem_x, mem_y)
    xo, xt, xr = (x.clone().requires_grad_() for _ in range(3))
    lo, lt = ours(xo, y), theirs(xt, y)
    mem, labels = ours.memory.get()
    lr = _pml3_reference(*make(), xr, y, mem.clone(), labels.long(), torch.arange(30, 36))
    _assert_rel(lo.detach(), lr.detach(), 1e-5, "loss vs PML-3 order")
    lo.backward()
    lr.backward()
    _assert_rel(xo.grad, xr.grad, 1e-5, "grad vs PML-3 order")
    assert float((lt - lr).detach().abs()) > 1e-3, "PML 2.9 must differ here, or the case does not test the order"
