"""generalized_lifted's rules of its own (CONTRACT.md section 1), checked against
pytorch-metric-learning's GeneralizedLiftedStructureLoss itself rather than the oracle: an
empty set's log-sum-exp is 0 (an anchor without positives keeps its negatives' term, unlike
circle's), the hinge max(0, L) with its zero gradient below 0, the L2 distance of unit rows
and the mean over every anchor. In-batch (the reference is the batch, self excluded by index,
pos_eps -1: PML drops no duplicates), so the backward op runs too; every backend, within 1e-5
of PML in float64."""
import pytest
import torch
import torch.nn.functional as F

import xbm_kernels as xk

from compare import FP32, assert_close

losses = pytest.importorskip("pytorch_metric_learning.losses")


def _batch(B, seed):
    """Unit rows around 4 class centres, two anchors of labels no other row has (no positives)."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(4, 16, generator=gen, dtype=torch.float64), dim=1)
    y = torch.randint(0, 4, (B,), generator=gen)
    y[:2] = torch.tensor([10, 11])
    x = F.normalize(centres[y % 4] + 0.6 * torch.randn(B, 16, generator=gen, dtype=torch.float64), dim=1)
    return x, y


@pytest.mark.backends("reference", "cpu", "triton")
@pytest.mark.parametrize("B", [9, 30], ids=["B9", "B30"])  # torch.cdist's direct and Gram forms in PML
@pytest.mark.parametrize("margins", [(0.0, 1.0), "hinge", (-0.5, 1.6)], ids=["defaults", "hinge", "wide"])
def test_in_batch_equals_pml(backend, device, B, margins):
    x, y = _batch(B, seed=B)
    if margins == "hinge":  # pos_margin halfway between the two middle rows' L: half the rows below the hinge
        L = xk.generalized_lifted_loss(x, y, x, y, pos_margin=0.0, neg_margin=0.0, pos_eps=-1.0, reduction="none",
                                       self_index=torch.arange(B), backend="reference").sort().values[B // 2 - 1:B // 2 + 1]
        assert float(L[1] - L[0]) > 1e-3, "rows too close to the hinge"
        margins = (float(L.mean()), 0.0)
    pos_margin, neg_margin = margins
    xe = x.clone().requires_grad_()
    expected = losses.GeneralizedLiftedStructureLoss(neg_margin=neg_margin, pos_margin=pos_margin)(xe, y)
    expected.backward()
    xa = x.float().to(device).requires_grad_()
    u = F.normalize(xa, dim=1)  # as PML's distance does: its gradient is projected off the rows
    got = xk.generalized_lifted_loss(u, y.to(device), u, y.to(device), pos_margin=pos_margin,
                                     neg_margin=neg_margin, pos_eps=-1.0, self_index=torch.arange(B, device=device),
                                     backend=backend)
    got.backward()
    assert_close(got.detach().cpu(), expected.detach(), FP32, "loss")
    assert_close(xa.grad.cpu(), xe.grad, FP32, "grad")
    if margins[1] == 0.0:  # the hinge case: rows on both sides of it
        rows = xk.generalized_lifted_loss(xa.detach(), y.to(device), xa.detach(), y.to(device), pos_margin=pos_margin,
                                          neg_margin=neg_margin, pos_eps=-1.0, reduction="none",
                                          self_index=torch.arange(B, device=device), backend=backend)
        assert bool((rows == 0).any()) and bool((rows > 0).any())


@pytest.mark.backends("reference", "cpu", "triton")
def test_anchor_without_positives_keeps_its_negatives_term(backend, device):
    """One anchor, no positive, two negatives at S = 0 and S = 1/2 (d = sqrt(2) and 1): l =
    log(e^(1 - sqrt 2) + e^(1 - 1)), not 0 as circle's would be."""
    x = torch.tensor([[1.0, 0.0]], device=device)
    r = torch.tensor([[0.0, 1.0], [0.5, 0.75 ** 0.5]], device=device)
    rows = xk.generalized_lifted_loss(x, torch.tensor([0], device=device), r, torch.tensor([1, 2], device=device),
                                      reduction="none", backend=backend)
    want = torch.log(torch.exp(torch.tensor(1 - 2 ** 0.5, dtype=torch.float64)) + 1.0)
    assert abs(float(rows[0]) - float(want)) <= 1e-6
