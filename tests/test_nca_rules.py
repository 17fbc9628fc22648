"""nca's rule of its own (CONTRACT.md section 1): each row is evaluated as
softplus(LSE_{V \\ P} - LSE_P) and a positive's coefficient as softmax_P times -(1 - exp(-l)),
never as the difference of two sums near 1. Where the positives hold almost all of the mass
(the drop-in's anchors meet their own copy, S = 1) the loss and the gradient are tiny and the
difference form returns them with an absolute error of ~1e-7 x scale; and where every valid
column is a positive both are exactly 0. Every backend."""
import torch
import torch.nn.functional as F

import xbm_kernels as xk

import oracle


def _dominated_case(device, seed=0, B=16, N=120, D=32):
    """Each anchor's exact copy in the memory (a positive for pos_eps < 0) and one further
    positive, the other columns at S <= ~0.5: at scale 8 (logits 16 S) they weigh ~e^-8 to
    e^-32 against the copy."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(B, D, generator=gen, dtype=torch.float64), dim=1)
    near = F.normalize(x + 0.3 * F.normalize(torch.randn(B, D, generator=gen, dtype=torch.float64), dim=1), dim=1)
    other = F.normalize(torch.randn(N - 2 * B, D, generator=gen, dtype=torch.float64), dim=1)
    r = torch.cat([x, near, other])
    y = torch.arange(B)
    z = torch.cat([y, y, B + torch.arange(N - 2 * B)])
    return x.float().to(device), y.to(device), r.float().to(device), z.to(device)


def _run(backend, x, y, r, z, params):
    xg = x.clone().requires_grad_()
    rows = xk.nca_loss(xg, y, r, z, **params, backend=backend, reduction="none")
    rows.sum().backward()
    return rows.detach().double().cpu(), xg.grad.double().cpu()


def test_dominant_positives_keep_relative_precision(backend, device):
    params = dict(scale=8.0, pos_eps=-1.0)
    for seed in range(3):
        x, y, r, z = _dominated_case(device, seed)
        rows, grad = _run(backend, x, y, r, z, params)
        e_rows, e_grad, _, _ = oracle.evaluate("nca", params, x, y, r, z)
        assert float(e_rows.max()) < 1e-2 and float(e_grad.abs().max()) < 0.5  # the regime this tests
        err = (rows - e_rows).abs().max()
        assert float(err) <= 1e-4 * float(e_rows.abs().max()), f"rows: max error {float(err):.3g}"
        gerr = (grad - e_grad).abs().max()
        assert float(gerr) <= 1e-4 * float(e_grad.abs().max()), f"grad: max error {float(gerr):.3g}"


def test_every_column_a_positive_gives_exactly_zero(backend, device):
    """One label everywhere, duplicates kept (pos_eps < 0): P_i = V_i, so l_i = 0 and its
    gradient is 0, exactly, on the anchors and (in-batch) on the reference."""
    gen = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(9, 16, generator=gen), dim=1).to(device)
    r = F.normalize(torch.randn(70, 16, generator=gen), dim=1).to(device)
    y, z = torch.zeros(9, dtype=torch.long, device=device), torch.zeros(70, dtype=torch.long, device=device)
    for ref, ref_labels, si in ((r, z, None), (x, y, torch.arange(9, device=device))):
        xg, rg = x.clone().requires_grad_(), ref.clone().requires_grad_()
        rows = xk.nca_loss(xg, y, rg, ref_labels, scale=4.0, pos_eps=-1.0, self_index=si, backend=backend,
                           reduction="none")
        rows.sum().backward()
        assert bool((rows == 0).all()), rows.tolist()
        assert bool((xg.grad == 0).all()) and bool((rg.grad == 0).all())


def test_a_nan_same_label_column_makes_the_row_nan(backend, device):
    """S = NaN in one of an anchor's same-label columns: not a positive (NaN < 1 - pos_eps is
    false) but in V_i, so the row's normaliser, and the row, are NaN as in the float64 oracle
    (not the row without that column); the NaN columns of another label are the other anchor's
    negatives (the negatives' pass), its row NaN as well."""
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(2, 8, generator=gen), dim=1)
    r = F.normalize(torch.randn(40, 8, generator=gen), dim=1)
    y = torch.tensor([0, 1])
    z = torch.arange(40) % 4
    r[4, 0] = float("nan")  # label 0: anchor 0's same-label column, anchor 1's negative
    rows = xk.nca_loss(x.to(device), y.to(device), r.to(device), z.to(device), backend=backend, reduction="none")
    expected = oracle.evaluate("nca", {}, x.double(), y, r.double(), z, 40, None)[0]
    assert torch.isnan(expected).all()
    assert torch.isnan(rows.cpu()).all(), rows
    finite = xk.nca_loss(x.to(device), y.to(device), r[5:].to(device), z[5:].to(device), backend=backend,
                         reduction="none")
    assert not torch.isnan(finite.cpu()).any(), finite  # the NaN row is the cause
