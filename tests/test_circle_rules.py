"""circle's rules of its own (CONTRACT.md section 1): the slopes k are constants of the
gradient, and the softmax weights of each set are evaluated as exp(logit - max) / sum, never
as exp(logit - LSE): at gamma = 256 the logits reach several hundred, and an LSE rounded to
fp32 costs its 2^-24 relative error (~2e-5 here) in every weight. Every backend, anchors only
(the forward's gradient) and with the reference side (the backward op), within 1e-5 of the
float64 oracle."""
import pytest
import torch
import torch.nn.functional as F

import xbm_kernels as xk

import oracle
from compare import FP32, assert_close


def _exact_case(device):
    """D = 1: every S is +-1 exactly, so the only rounding left is the kernels' own."""
    x = torch.tensor([[1.0], [1.0], [-1.0]])
    y = torch.tensor([0, 0, 1])
    r = torch.tensor([[-1.0], [-1.0], [1.0], [-1.0]])
    z = torch.tensor([0, 0, 1, 1])
    return x.to(device), y.to(device), r.to(device), z.to(device)


def _random_case(device, seed=0, B=12, N=90, D=24):
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, D, generator=gen), dim=1)
    r = F.normalize(torch.randn(N, D, generator=gen), dim=1)
    y = torch.randint(0, 3, (B,), generator=gen)
    z = torch.randint(0, 3, (N,), generator=gen)
    return x.to(device), y.to(device), r.to(device), z.to(device)


@pytest.mark.backends("reference", "cpu", "triton")
@pytest.mark.parametrize("gamma", [256.0, 1024.0])
@pytest.mark.parametrize("make", [_exact_case, _random_case], ids=["exact", "random"])
@pytest.mark.parametrize("ref_grad", [False, True], ids=["anchors", "with-reference"])
def test_gradients_resolved_at_a_large_scale(backend, device, gamma, make, ref_grad):
    x, y, r, z = make(device)
    params = dict(m=0.25, gamma=gamma, pos_eps=1e-5)
    rows_e, gx_e, gr_e, _ = oracle.evaluate("circle", params, x, y, r, z)
    xa = x.clone().requires_grad_()
    ra = r.clone().requires_grad_(ref_grad)
    rows = xk.circle_loss(xa, y, ra, z, **params, backend=backend, reduction="none")
    rows.sum().backward()
    assert_close(rows, rows_e, FP32, "rows")
    assert_close(xa.grad, gx_e, FP32, "grad_x")
    if ref_grad:
        assert_close(ra.grad, gr_e, FP32, "grad_ref")
