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


def _first_active(sp, margin):
    """The first fp32 negative score sn at which margin - (sp - sn) > 0 holds in fp32 arithmetic
    (it holds for every larger sn: rounding is monotone), by a search over the float32 bit patterns."""
    import numpy as np
    m, p = np.float32(margin), np.float32(sp)

    def holds(bits):
        s = np.array([bits], dtype=np.int32).view(np.float32)[0]
        with np.errstate(over="ignore", invalid="ignore"):
            return bool(np.float32(m - np.float32(p - s)) > np.float32(0))

    def key(f):  # float32 -> an integer in the floats' order
        b = int(np.array([f], dtype=np.float32).view(np.int32)[0])
        return b if b >= 0 else -(b & 0x7FFFFFFF)

    def unkey(k):
        return k if k >= 0 else (-k) | -0x80000000

    lo, hi = key(np.float32(-np.inf)), key(np.float32(np.inf))
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(unkey(mid)):
            hi = mid
        else:
            lo = mid + 1
    return float(np.array([unkey(lo)], dtype=np.int32).view(np.float32)[0])


@pytest.mark.backends("reference", "cpu", "triton")
@pytest.mark.parametrize("n_pos", [1, 3, 8, 11, 16, 17])
def test_the_margin_decides_at_the_fp32_threshold(backend, device, n_pos):
    """One-dimensional rows (S = the memory's value, exactly), each positive with negatives at its
    first active score (the first fp32 sn with fp32(margin - fp32(sp - sn)) > 0) and 1 and 2 ulp
    either side: every triplet is decided by the contract's fp32 rule, counts exactly, the loss
    and gradient as the float64 sum of margin - u over the active triplets. Several anchors with
    different positives, memories of odd length (the vector kernels' tails)."""
    import numpy as np
    gen = torch.Generator().manual_seed(n_pos)
    margin = 0.2
    xs, rows, labels = [], [], []
    for a in range(3):
        sp = (torch.rand(n_pos, generator=gen) * 1.2 - 0.6).float()
        neg = []
        for v in sp.tolist():
            t = np.float32(_first_active(v, margin))
            neg += [float(t), float(np.nextafter(t, np.float32(-1))), float(np.nextafter(t, np.float32(2))),
                    float(np.nextafter(np.nextafter(t, np.float32(-1)), np.float32(-1))),
                    float(np.nextafter(np.nextafter(t, np.float32(2)), np.float32(2)))]
        neg += (torch.rand(7 + a, generator=gen) * 1.6 - 0.8).tolist()  # away from the thresholds, mostly
        rows += sp.tolist() + neg
        labels += [a] * n_pos + [100 + a] * len(neg)
    x = torch.ones(3, 1)
    y = torch.arange(3)
    r = torch.tensor(rows, dtype=torch.float32)[:, None]
    z = torch.tensor(labels)
    params = dict(margin=margin, select_low=-3.0, select_high=3.0, pos_eps=-1.0)
    # the expected decisions: fp32 arithmetic as written, anchor by anchor
    S = r[:, 0].numpy()
    exp_rows, exp_counts, exp_grad = [], [], []
    m32 = np.float32(margin)
    for a in range(3):
        P = [j for j in range(len(rows)) if labels[j] == a]
        N = [j for j in range(len(rows)) if labels[j] != a]
        u32 = S[P][:, None] - S[N][None, :]  # fp32
        act = (m32 - u32) > 0
        u64 = S[P].astype(np.float64)[:, None] - S[N].astype(np.float64)[None, :]
        exp_rows.append(float(np.where(act, float(m32) - u64, 0.0).sum()))
        exp_counts.append(int(act.sum()))
        exp_grad.append(float((act.sum(0) * S[N].astype(np.float64)).sum() - (act.sum(1) * S[P].astype(np.float64)).sum()))
    xa = x.clone().to(device).requires_grad_()
    out = xk.triplet_all_loss(xa, y.to(device), r.to(device), z.to(device), **params, backend=backend,
                              reduction="none")
    _, counts = xk.losses.compute("triplet_all", x.to(device), y.to(device), r.to(device), z.to(device),
                                  backend=backend, reduction="none", **params)
    assert counts[:, 0].cpu().long().tolist() == exp_counts
    out.sum().backward()
    assert_close(out, torch.tensor(exp_rows, dtype=torch.float64), FP32, "rows")
    assert_close(xa.grad, torch.tensor(exp_grad, dtype=torch.float64)[:, None], FP32, "grad_x")


@pytest.mark.backends("reference", "cpu")  # Triton: a -inf positive gives a NaN row (0 * -inf in its block sums)
@pytest.mark.parametrize("extra", [0, 20], ids=["2-positives", "22-positives"])
@pytest.mark.parametrize("bad", [float("-inf"), -3.4e38, -1e30, 1e30, -100.0])
def test_a_positive_in_no_triplet_adds_nothing(backend, device, extra, bad):
    """A positive whose u is below select_low against every negative forms no selected triplet,
    however large its S or -inf (a prefix sum of the positives' S would lose the others next to
    it, and 0 times -inf is NaN): the row is the other positives' triplets alone."""
    import numpy as np
    pos = [0.5] * (1 + extra) + [bad]
    r = torch.tensor(pos + [0.4], dtype=torch.float32)[:, None].to(device)
    z = torch.tensor([0] * len(pos) + [1]).to(device)
    x = torch.ones(1, 1, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    hinge = float(np.float32(np.float32(0.2) - np.float32(np.float32(0.5) - np.float32(0.4))))
    rows = xk.triplet_all_loss(x, y, r, z, margin=0.2, reduction="none", backend=backend)
    _, counts = xk.losses.compute("triplet_all", x, y, r, z, backend=backend, reduction="none", margin=0.2)
    assert counts[0, 0].item() == 1 + extra
    assert abs(float(rows[0]) - (1 + extra) * hinge) <= 1e-6 * (1 + extra), float(rows[0])
