"""triplet's rule of its own (CONTRACT.md section 1): the hardest positive and negative are
single columns, the lowest column on a tie, so the gradient is deterministic: on every backend,
across the CPU's 4-lane scan and the Triton splits; several anchors choosing one reference row
add up there (no atomics)."""
import pytest
import torch

import xbm_kernels as xk

import cases
from compare import assert_close
from oracle import triplet_oracle


def _tied_case(k=12):
    """Every one of k reference rows appears three times (columns j, j + k, j + 2k: with k = 13
    the copies fall in other lanes of the CPU's 4-lane scan; across interpreter tiles too). Entries are multiples of 1/16 in [-3/16, 3/16]: every partial
    sum of S is exact in fp32, so copies tie exactly whatever the summation order."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(-3, 4, (6, 16), generator=gen).float() / 16
    r = torch.randint(-3, 4, (k, 16), generator=gen).float() / 16
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    z = torch.arange(k) % 3
    return x, y, torch.cat([r, r, r]), torch.cat([z, z, z])


@pytest.mark.parametrize("copies_apart", [12, 13], ids=["copies-same-lane", "copies-other-lanes"])
def test_ties_pick_the_lowest_column(backend, device, copies_apart):
    x, y, r, z = _tied_case(copies_apart)
    xx, rr = x.to(device).requires_grad_(), r.to(device).requires_grad_()
    rows = xk.triplet_loss(xx, y.to(device), rr, z.to(device), margin=2.0, reduction="none", backend=backend)
    rows.sum().backward()
    e_rows, grad, grad_ref, _ = triplet_oracle(x, y, r, z, margin=2.0)
    assert (e_rows > 0).all()
    assert_close(rows, e_rows, 1e-6, "rows")
    assert_close(xx.grad, grad, 1e-6, "grad_x")
    assert_close(rr.grad, grad_ref, 1e-6, "grad_ref")
    assert not rr.grad[copies_apart:].any()  # the copies at higher columns never win


@pytest.mark.backends("triton")
@pytest.mark.parametrize("splits", [1, 2, 3, 5, 36])
def test_ties_across_splits_keep_the_earlier_split(backend, device, splits):
    """With 3 splits each copy sits in its own split: the merge keeps split 0's column."""
    from xbm_kernels.triton import triplet as ttr
    x, y, r, z = _tied_case()
    call = ttr._common.LossCall(ttr.KERNELS, "triplet", *(t.to(device) for t in (x, y.int(), r, z.int())), None, 36,
                                False)
    _, _, counts, chosen = ttr._forward(call, 2.0, 1e-5, False, splits)
    assert counts.min() == 1
    assert int(chosen.max()) < 12 and int(chosen.min()) >= 0
    _, _, _, one_split = ttr._forward(call, 2.0, 1e-5, False, 1)
    assert torch.equal(chosen, one_split)


def test_reference_gradient_sums_shared_rows(backend, device):
    """20 anchors against 3 rows per class: rows chosen by several anchors add up."""
    c = cases.Case("shared", 20, 6, 16, 2, noise=0.25)
    d = cases.draw_case(c, "triplet", dict(cases.variants("triplet")["defaults"], margin=2.0), seed=8)
    rr = d.r.to(device).requires_grad_()
    xk.triplet_loss(d.x.to(device), d.y.to(device), rr, d.z.to(device), margin=2.0, reduction="sum",
                    backend=backend).backward()
    _, _, grad_ref, counts = triplet_oracle(d.x, d.y, d.r, d.z, margin=2.0)
    assert counts[:, 0].sum() > 6
    assert_close(rr.grad, grad_ref, 1e-6, "grad_ref")
