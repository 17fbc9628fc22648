"""triplet_all's rules of its own (CONTRACT.md section 1):
- every triplet is decided on u = S_ip - S_in as written in fp32, so a row held twice in the
  memory under two labels gives u = 0 exactly (a bound at 0, the hard and semihard miners, and
  margin 0 see the tie the way one product over all columns does: pytorch-metric-learning's);
- the counts are int32: an anchor with 2^31 - 1 or more active triplets makes the mean over
  active triplets impossible to form, which raises instead of dividing by a saturated count;
- many duplicate rows make the gradient a difference of large integer multiples of the rows,
  still within the fp32 tolerance of the float64 oracle."""
import pytest
import torch
import torch.nn.functional as F

import xbm_kernels as xk

import oracle
from compare import FP32, assert_close


def _duplicated_memory(seed=5, B=9, D=37, distinct=4):
    """Anchors of label 0, and a memory of `distinct` random rows each held under label 0 and
    label 1: every positive has a negative with the very same row."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, D, generator=gen), dim=1)
    rows = F.normalize(torch.randn(distinct, D, generator=gen), dim=1)
    r = torch.cat([rows, rows])
    z = torch.cat([torch.zeros(distinct, dtype=torch.long), torch.ones(distinct, dtype=torch.long)])
    S = x.double() @ rows.double().T
    u = (S[:, :, None] - S[:, None, :])[:, ~torch.eye(distinct, dtype=torch.bool)]
    gap = torch.minimum(u.abs(), (u - 0.05).abs()).min()  # from the bounds 0 and the margin 0.05
    assert float(gap) > 1e-3, "the distinct rows' u must stay away from the bounds"  # the data's premise
    return x, torch.zeros(B, dtype=torch.long), r, z


@pytest.mark.backends("reference", "cpu", "triton")
@pytest.mark.parametrize("params", [dict(margin=0.05, select_low=-3.0, select_high=0.0),
                                    dict(margin=0.05, select_low=0.0, select_high=3.0),
                                    dict(margin=0.0, select_low=-3.0, select_high=3.0)],
                         ids=["hard", "semihard", "margin0"])
def test_a_row_under_two_labels_ties_exactly(backend, device, params):
    x, y, r, z = _duplicated_memory()
    params = dict(params, pos_eps=1e-5)
    rows_e, gx_e, _, counts_e = oracle.evaluate("triplet_all", params, x, y, r, z)
    xa = x.clone().to(device).requires_grad_()
    rows = xk.triplet_all_loss(xa, y.to(device), r.to(device), z.to(device), **params, backend=backend,
                               reduction="none")
    _, counts = xk.losses.compute("triplet_all", x.to(device), y.to(device), r.to(device), z.to(device),
                                  backend=backend, reduction="none", **params)
    assert torch.equal(counts.cpu().long(), counts_e)
    rows.sum().backward()
    assert_close(rows, rows_e, FP32, "rows")
    assert_close(xa.grad, gx_e, FP32, "grad_x")


@pytest.mark.backends("cpu", "triton")
def test_saturated_counts_refuse_the_mean(backend, device):
    """One anchor, 50000 positives at S = 0.5 and 50000 negatives at 0.875: 2.5e9 active triplets."""
    if backend == "triton" and device == "cpu":
        pytest.skip("2.5e9 triplets in blocks: hours under the Triton interpreter; runs on CUDA tensors")
    n = 50000
    x = torch.tensor([[1.0]], device=device)
    r = torch.cat([torch.full((n, 1), 0.5), torch.full((n, 1), 0.875)]).to(device)
    z = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)]).to(device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    total = xk.triplet_all_loss(x, y, r, z, margin=0.125, reduction="sum", backend=backend)
    assert float(total) == pytest.approx(n * n * 0.5, rel=1e-6)
    with pytest.raises(ValueError, match="triplet_all: an anchor has 2147483647 or more active triplets"):
        xk.triplet_all_loss(x, y, r, z, margin=0.125, reduction="mean", backend=backend)


@pytest.mark.backends("reference", "cpu", "triton")
def test_many_duplicates_keep_the_gradient_accurate(backend, device):
    gen = torch.Generator().manual_seed(3)
    D, P = 16, 2000
    x = F.normalize(torch.randn(1, D, generator=gen), dim=1)
    a, b = F.normalize(torch.randn(2, D, generator=gen), dim=1)
    r = torch.cat([a.repeat(P, 1), b.repeat(P, 1)])
    z = torch.cat([torch.zeros(P, dtype=torch.long), torch.ones(P, dtype=torch.long)])
    y = torch.zeros(1, dtype=torch.long)
    params = dict(margin=2.0, select_low=-3.0, select_high=3.0, pos_eps=1e-5)
    _, gx_e, _, _ = oracle.evaluate("triplet_all", params, x, y, r, z)
    xa = x.clone().to(device).requires_grad_()
    xk.triplet_all_loss(xa, y.to(device), r.to(device), z.to(device), **params, backend=backend,
                        reduction="sum").backward()
    assert_close(xa.grad, gx_e, FP32, "grad_x")


@pytest.mark.backends("reference", "cpu", "triton")
def test_the_margin_and_bounds_are_fp32(backend, device):
    """margin and the selection bounds act as fp32 numbers on every backend (a GPU launch passes
    Python floats to a Triton kernel as fp32; the interpreter would keep them in fp64): 22500
    triplets, each with u = 0.1875 exactly and margin 0.1875 + 1e-6, sum 22500 (fp32(margin) - u),
    not 0.0225."""
    x = torch.tensor([[1.0, 0.0]], device=device)
    r = torch.cat([torch.tensor([[0.5, 0.5]]).repeat(150, 1), torch.tensor([[0.3125, 0.5]]).repeat(150, 1)]).to(device)
    z = torch.cat([torch.zeros(150), torch.ones(150)]).long().to(device)
    margin = 0.1875 + 1e-6
    expected = 22500 * (float(torch.tensor(margin, dtype=torch.float32)) - 0.1875)
    for low, high in ((-3.0, 3.0), (0.1875 - 1e-9, 3.0)):  # the lower bound rounds to u itself: excluded
        loss = xk.triplet_all_loss(x, torch.tensor([0], device=device), r, z, margin=margin, select_low=low,
                                   select_high=high, pos_eps=-1.0, reduction="sum", backend=backend)
        assert abs(float(loss) - (expected if low < 0 else 0.0)) <= 1e-9, (low, float(loss))
