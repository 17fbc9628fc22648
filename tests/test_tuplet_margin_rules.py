"""tuplet_margin's rules of its own (CONTRACT.md section 1): sin(theta) is taken as 0 where
1 - S^2 <= 2^-16, so a positive at S = +-1 has the logit scale S cos(margin) and the slope
cos(margin) (acos' own slope is infinite there); and the negatives' weights stay resolved at a
large scale, where log sum exp(scale S) reaches several hundred and its fp32 rounding would cost
its 2^-24 relative error in every weight. Every backend, anchors only (the forward's gradient)
and with the reference side (the backward op), within 1e-5 of the float64 oracle."""
import pytest
import torch
import torch.nn.functional as F

import xbm_kernels as xk

import oracle
from compare import FP32, assert_close


def _exact_case(device):
    """D = 1: every S is +-1 exactly (positives at both ends of the floor, with pos_eps < 0),
    so the only rounding left is the kernels' own."""
    x = torch.tensor([[1.0], [1.0], [-1.0]])
    y = torch.tensor([0, 0, 1])
    r = torch.tensor([[-1.0], [1.0], [1.0], [-1.0], [1.0], [1.0]])
    z = torch.tensor([0, 0, 1, 1, 0, 1])  # anchors 0 and 1: LZ = scale + log 2, no fp32 number
    return x.to(device), y.to(device), r.to(device), z.to(device), -1.0


def _random_case(device, seed=0, B=12, N=90, D=24):
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, D, generator=gen), dim=1)
    r = F.normalize(torch.randn(N, D, generator=gen), dim=1)
    y = torch.randint(0, 3, (B,), generator=gen)
    z = torch.randint(0, 3, (N,), generator=gen)
    return x.to(device), y.to(device), r.to(device), z.to(device), 1e-5


@pytest.mark.backends("reference", "cpu", "triton")
@pytest.mark.parametrize("scale", [64.0, 256.0, 1024.0])
@pytest.mark.parametrize("make", [_exact_case, _random_case], ids=["exact", "random"])
@pytest.mark.parametrize("ref_grad", [False, True], ids=["anchors", "with-reference"])
def test_floor_and_a_large_scale(backend, device, scale, make, ref_grad):
    x, y, r, z, pos_eps = make(device)
    params = dict(margin=20.0, scale=scale, pos_eps=pos_eps)
    rows_e, gx_e, gr_e, counts_e = oracle.evaluate("tuplet_margin", params, x, y, r, z)
    assert counts_e[:, 0].sum() > 0 and counts_e[:, 1].sum() > 0
    xa = x.clone().requires_grad_()
    ra = r.clone().requires_grad_(ref_grad)
    rows = xk.tuplet_margin_loss(xa, y, ra, z, **params, backend=backend, reduction="none")
    rows.sum().backward()
    assert_close(rows, rows_e, FP32, "rows")
    assert_close(xa.grad, gx_e, FP32, "grad_x")
    if ref_grad:
        assert_close(ra.grad, gr_e, FP32, "grad_ref")
