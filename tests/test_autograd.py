"""Second derivatives (CONTRACT.md section 1, "Gradients"): the fused backends compute first
derivatives only, so differentiating their gradient again must raise in every form a
gradient penalty takes: `.backward()` of loss + penalty, `autograd.grad(..., inputs)`,
through a normalisation (the common training form), with the reference side requiring grad
(the in-batch loss), and under torch.func. Returning the first-order gradient alone (the
penalty's term silently 0) is the bug this file guards against. The reference backend, plain
autograd, differentiates twice and matches a float64 finite difference of its gradient."""
import pytest
import torch
import torch.nn.functional as F

import xbm_kernels as xk


def _data(device, B=6, N=20, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(B, D, generator=gen).to(device)
    y = (torch.arange(B) % 3).to(device)
    r = F.normalize(torch.randn(N, D, generator=gen), dim=1).to(device)
    z = (torch.arange(N) % 3).to(device)
    return e, y, r, z


def _loss(loss, backend, x, y, r, z, **kw):
    return xk.losses.compute(loss, x, y, r, z, backend=backend, **kw)[0]


@pytest.mark.kernels
@pytest.mark.parametrize("form", ["autograd.grad", "backward", "in-batch", "grad_x-only"])
def test_second_derivative_through_a_fused_kernel_raises(loss, backend, device, form):
    e, y, r, z = _data(device)
    e.requires_grad_()
    x = F.normalize(e, dim=1)
    if form == "in-batch":
        out = _loss(loss, backend, x, y, x.view_as(x), y, self_index=torch.arange(6, device=device))
    else:
        out = _loss(loss, backend, x, y, r, z)
    wrt = x if form == "grad_x-only" else e
    g, = torch.autograd.grad(out, wrt, create_graph=True)
    penalty = out + (g ** 2).sum()
    with pytest.raises(RuntimeError, match="first derivatives only"):
        if form == "backward":
            penalty.backward()
        else:
            torch.autograd.grad(penalty, e)


@pytest.mark.kernels
def test_first_derivative_with_create_graph_still_works(loss, backend, device):
    """create_graph=True alone (no second differentiation) gives the ordinary gradient."""
    e, y, r, z = _data(device)
    x1 = F.normalize(e.clone().requires_grad_(), dim=1)
    e2 = e.clone().requires_grad_()
    g1, = torch.autograd.grad(_loss(loss, backend, x1, y, r, z), x1)
    x2 = F.normalize(e2, dim=1)
    g2, = torch.autograd.grad(_loss(loss, backend, x2, y, r, z), x2, create_graph=True)
    assert torch.equal(g1, g2.detach())


@pytest.mark.kernels
def test_torch_func_transforms_raise(loss, backend, device):
    e, y, r, z = _data(device)
    f = lambda x: _loss(loss, backend, x, y, r, z)  # noqa: E731
    with pytest.raises(RuntimeError):
        torch.func.grad(lambda x: (torch.func.grad(f)(x) ** 2).sum())(e)


@pytest.mark.backends("reference")
def test_reference_backend_differentiates_twice(loss, backend, device):
    """The penalty's gradient equals a float64 central difference of (g ** 2).sum()."""
    e, y, r, z = _data(device)
    e, r = e.double(), r.double()

    def penalty(ee):
        x = F.normalize(ee, dim=1)
        g, = torch.autograd.grad(_loss(loss, backend, x, y, r, z), ee, create_graph=True)
        return (g ** 2).sum()

    ee = e.clone().requires_grad_()
    h, = torch.autograd.grad(penalty(ee), ee)
    direction = torch.randn(e.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    step = 1e-6
    fd = (penalty((e + step * direction).requires_grad_()) - penalty((e - step * direction).requires_grad_())) \
        / (2 * step)
    assert abs(float((h * direction).sum()) - float(fd)) <= 1e-4 * max(1.0, abs(float(fd)))


@pytest.mark.kernels
def test_jacobian_vector_product_by_the_double_backward_trick(loss, backend, device):
    """torch.autograd.functional.jvp differentiates the vector-Jacobian product with respect to
    the incoming gradient: first-order information, which the fused path gives exactly (the
    reference backend's value); with the reference side requiring grad it raises instead."""
    e, y, r, z = _data(device)
    x = F.normalize(e, dim=1)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)
    f = lambda b: (lambda t: _loss(loss, b, t, y, r, z, reduction="none"))  # noqa: E731
    expected = torch.autograd.functional.jvp(f("reference"), x, v)[1]
    got = torch.autograd.functional.jvp(f(backend), x, v)[1]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()
    xx = x.clone().requires_grad_()
    rows = _loss(loss, backend, xx, y, xx.view_as(xx), y, reduction="none", self_index=torch.arange(6, device=device))
    w = torch.ones_like(rows, requires_grad=True)
    g, = torch.autograd.grad(rows, xx, grad_outputs=w, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad((g * v).sum(), w)
