"""contrastive_l2's rules of its own (CONTRACT.md section 1): d = 0 (2 - 2S within fp32
rounding of 0) has gradient 0, as torch.cdist's; an other-label copy is an active negative
adding neg_margin; a same-label copy kept by pos_eps < 0 is an inactive positive at
pos_margin = 0. The switched-off values the PML drop-in passes (neg_margin = -1: no negative
term; pos_eps = 3: no positive term) leave exactly the other term. Every backend against the
oracle; tests/test_values.py runs the copies case (B12-copies) with pos_eps < 0 for every loss."""
import pytest
import torch

import xbm_kernels as xk
from xbm_kernels.registry import LOSSES

import cases
from compare import FP32, assert_close, assert_equal_counts
import oracle
from oracle import contrastive_l2_oracle

SPEC = LOSSES["contrastive_l2"]


def _run(backend, x, y, r, z, params, ref_valid, self_index=None):
    """The loss rows through the public path, parameters unchecked (as the drop-in passes them)."""
    return xk.losses.run(SPEC, tuple(params.values()), backend, x, y, r, z, ref_valid, self_index, "none")


def test_exact_copies_at_zero_distance(backend, device):
    """One-hot rows: S = 1 exactly in any precision. Anchor i meets a same-label copy (a
    positive for pos_eps < 0), an other-label copy (an active negative at d = 0) and distinct
    rows at d = sqrt(2); no inf or NaN, the copies' columns get gradient from the other anchors only."""
    D = 8
    x = torch.eye(D)[:5]
    y = torch.tensor([0, 1, 2, 0, 1])
    noise = torch.nn.functional.normalize(torch.randn(20, D, generator=torch.Generator().manual_seed(5)), dim=1)
    r = torch.cat([x, x, noise])
    z = torch.cat([y, (y + 1) % 3, torch.arange(20) % 3])
    params = dict(pos_margin=0.0, neg_margin=1.0, pos_eps=-1.0)
    w = cases.weights(5)
    rows_e, gx_e, gr_e, counts_e = contrastive_l2_oracle(x, y, r, z, **params, ref_valid=30, weights=w)
    assert bool((counts_e[:, 1] >= 1).all()) and float(rows_e.min()) >= 1.0  # each other-label copy adds 1
    xx, rr = x.clone().to(device).requires_grad_(), r.clone().to(device).requires_grad_()
    rows, counts = _run(backend, xx, y.to(device), rr, z.to(device), params, 30)
    rows.backward(w.to(rows))
    assert torch.isfinite(xx.grad).all() and torch.isfinite(rr.grad).all()
    assert_close(rows, rows_e, FP32, "rows")
    assert_equal_counts(counts, counts_e)
    assert_close(xx.grad, gx_e, FP32, "grad_x")
    assert_close(rr.grad, gr_e, FP32, "grad_ref")
    own = torch.zeros(10, D, dtype=torch.float64)  # the copies' gradient: the other anchors' sqrt(2) positives
    for j in range(10):
        for i in range(5):
            if i != j % 5 and int(z[j]) == int(y[i]):
                own[j] -= float(w[i]) / 2 ** 0.5 * x[i].double()
    assert float(own.abs().max()) > 0
    assert_close(rr.grad[:10], own, FP32, "grad_ref of the copies")


def test_rounded_copies_count_as_zero_distance(backend, device):
    """Normalised float rows and their fp32 copies (S = 1 up to rounding, on either side of 1 by
    backend): with pos_eps < 0 each copy is a positive at d = 0 on every backend, no gradient."""
    d = cases.draw("B12-copies", "contrastive_l2", "pos_eps<0").to(device)
    params = cases.variants("contrastive_l2")["pos_eps<0"]
    rows_e, gx_e, gr_e, counts_e = cases.expected("B12-copies", "contrastive_l2", "pos_eps<0")
    x, r = d.x.clone().requires_grad_(), d.r.clone().requires_grad_()
    rows, counts = _run(backend, x, d.y, r, d.z, params, d.ref_valid)
    rows.backward(cases.weights(x.shape[0]).to(rows))
    assert_equal_counts(counts, counts_e)
    assert_close(x.grad, gx_e, FP32, "grad_x")
    assert_close(r.grad, gr_e, FP32, "grad_ref")


@pytest.mark.parametrize("off", ["neg_margin=-1", "pos_eps=3"])
def test_switched_off_terms(backend, device, off):
    # both terms active: positives near S = 0.94 (d near 0.35) on either side of d = 0.1,
    # negatives on either side of S = 0.5/7 (d = 1.3628)
    base = dict(cases.variants("contrastive_l2")["defaults"], pos_margin=0.1, neg_margin=(2 * (1 - 0.5 / 7)) ** 0.5)
    params = dict(base, **({"neg_margin": -1.0} if off == "neg_margin=-1" else {"pos_eps": 3.0}))
    keep = 0 if off == "neg_margin=-1" else 1  # the count column that stays
    c = cases.Case("switched-off", 16, 150, 130, 10, 100, "random", noise=0.25)
    d = cases.draw_case(c, "contrastive_l2", base, seed=3)
    w = cases.weights(d.x.shape[0])
    rows_e, gx_e, gr_e, counts_e = contrastive_l2_oracle(*d.args(), **params, ref_valid=d.ref_valid,
                                                         self_index=d.self_index, weights=w)
    both = contrastive_l2_oracle(*d.args(), **base, ref_valid=d.ref_valid, self_index=d.self_index)[3]
    assert not counts_e[:, 1 - keep].any() and counts_e[:, keep].any()
    assert torch.equal(counts_e[:, keep], both[:, keep])
    dd = d.to(device)
    x, r = dd.x.clone().requires_grad_(), dd.r.clone().requires_grad_()
    rows, counts = _run(backend, x, dd.y, r, dd.z, params, dd.ref_valid, dd.self_index)
    rows.backward(w.to(rows))
    assert_close(rows, rows_e, FP32, "rows")
    assert_equal_counts(counts, counts_e)
    assert_close(x.grad, gx_e, FP32, "grad_x")
    assert_close(r.grad, gr_e, FP32, "grad_ref")
