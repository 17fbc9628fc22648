"""multi_similarity's rules of its own (CONTRACT.md section 1): with mining, P~ is empty exactly
when N~ is, so skip_incomplete changes nothing; without mining it zeroes the one-sided rows;
the table has every kind of row the flags treat differently; the Triton launcher runs no
positives kernel without mining. tests/test_values.py runs every flag combination
(cases.variants) on every backend and case against the oracle."""
import pytest
import torch

import xbm_kernels as xk

import cases
import oracle
from compare import FP32, assert_close, assert_equal_counts

NAMES = [n for n in cases.names("cpu") if n != "B33-D96-sparse"]


def _kinds(case):
    """Per row: "no P", "no N", "P~ empty" (P, N non-empty, nothing mined) or "full"."""
    d = cases.draw(case, "multi_similarity", "defaults")
    mm = cases.variants("multi_similarity")["defaults"]["mining_margin"]
    S = d.x.double() @ d.r[:d.ref_valid].double().T
    valid = torch.ones_like(S, dtype=torch.bool)
    if d.self_index is not None:
        valid &= torch.arange(d.ref_valid)[None, :] != d.self_index[:, None]
    same = d.y[:, None] == d.z[None, :d.ref_valid]
    pos, neg = valid & same & (S < 1 - 1e-5), valid & ~same
    kinds = []
    for i in range(S.shape[0]):
        if not pos[i].any() or not neg[i].any():
            kinds.append("no P" if not pos[i].any() else "no N")
        else:
            kinds.append("full" if S[i][pos[i]].min() - mm < S[i][neg[i]].max() else "P~ empty")
    return kinds


def test_the_table_has_every_kind_of_row():
    kinds = {k for n in NAMES for k in _kinds(n) if cases.draw(n, "multi_similarity", "defaults").ref_valid}
    assert kinds == {"no P", "no N", "P~ empty", "full"}, kinds


def test_skip_incomplete_is_moot_with_mining_and_not_without():
    """The oracle on the same data under each flag combination."""
    differ = 0
    for n in NAMES:
        d = cases.draw(n, "multi_similarity", "defaults")
        out = {v: oracle.evaluate("multi_similarity", cases.variants("multi_similarity")[v], *d.args(), d.ref_valid,
                                  d.self_index)
               for v in ("defaults", "mine=True,skip_incomplete=False", "mine=False,skip_incomplete=True",
                         "mine=False,skip_incomplete=False")}
        a, b = out["defaults"], out["mine=True,skip_incomplete=False"]
        assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3]), n
        differ += int((out["mine=False,skip_incomplete=True"][0] != out["mine=False,skip_incomplete=False"][0]).sum())
    assert differ >= 10, differ


class _NotLaunched:
    def __getitem__(self, grid):
        raise AssertionError("the positives kernel ran with mine=False")


@pytest.mark.backends("triton")
def test_no_positives_kernel_without_mining(backend, device, monkeypatch):
    from xbm_kernels.triton import multi_similarity as tms
    variant = "mine=False,skip_incomplete=False"
    d = cases.draw(cases.PARTIAL, "multi_similarity", variant).to(device)
    params = cases.variants("multi_similarity")[variant]
    args = (d.x, d.y.int(), d.r, d.z.int(), d.self_index, d.ref_valid, *params.values())
    rows_e, _, _, counts_e = cases.expected(cases.PARTIAL, "multi_similarity", variant)
    monkeypatch.setattr(tms, "multi_similarity_pos_kernel", _NotLaunched())
    rows, _, counts = tms.multi_similarity_fwd_triton(*args, True, False)
    assert_close(rows, rows_e, FP32, "rows")
    assert_equal_counts(counts, counts_e)
    mined = args[:-2] + (True, True)
    with pytest.raises(AssertionError, match="positives kernel"):
        tms.multi_similarity_fwd_triton(*mined, True, False)


def _boundary_data(classes, dtype):
    """A memory with, per anchor, its own copy (self_index), a same-label exact copy (S ~ 1: in
    neither set) and a same-label near copy (S ~ 1 - 3e-4); pos_eps cut through the near copies'
    S and the mining margin equal to one anchor's min_pos - max_neg, all in float64, so that the
    fp32 S of those pairs falls on either side of each rule."""
    g = torch.Generator().manual_seed(21)
    B, K, D = 24, 3000, 64
    centres = torch.nn.functional.normalize(torch.randn(classes, D, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, classes, (B,), generator=g)
    z = torch.randint(0, classes, (K,), generator=g)

    def rows(labels, noise):
        e = centres[labels] + noise * torch.randn(len(labels), D, generator=g, dtype=torch.float64)
        return torch.nn.functional.normalize(e, dim=1)

    x = rows(y, 0.1)
    r = rows(z, 0.1)
    r[:B], z[:B] = x, y                                   # the anchors' own copies
    r[B:2 * B], z[B:2 * B] = x, y                         # exact copies elsewhere
    r[2 * B:3 * B] = torch.nn.functional.normalize(x + 3e-3 * torch.randn(B, D, generator=g, dtype=torch.float64))
    z[2 * B:3 * B] = y
    x, r = x.to(dtype), r.to(dtype)
    S = x.double() @ r.double().T
    pos_eps = float(1 - S[torch.arange(B), 2 * B + torch.arange(B)].median())
    valid = torch.ones_like(S, dtype=torch.bool)
    valid[torch.arange(B), torch.arange(B)] = False
    same = y[:, None] == z[None, :]
    pos, neg = valid & same & (S < 1 - pos_eps), valid & ~same
    gaps = [float(S[i][pos[i]].min() - S[i][neg[i]].max()) for i in range(B) if pos[i].any() and neg[i].any()]
    margin = sorted(gaps)[len(gaps) // 2]
    return x, y.int(), r, z.int(), torch.arange(B), pos_eps, margin


@pytest.mark.backends("cpu")
@pytest.mark.parametrize("classes", [600, 4], ids=["many-classes", "few-classes"])
@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_backward_mine_the_same_sets(backend, device, classes, precision):
    """The CPU forward's gradient (the memory path) and its backward's (the reference-side path,
    which recomputes every set) on pairs that sit on the pos_eps cut and the mining margins: the
    same sets, hence the same dX to rounding (a pair decided differently would move a row by a
    whole pair's coefficient). Many classes take the one-pass form (positives' S from a gather,
    negatives' from the tile GEMM), few classes the two-pass form."""
    x, y, r, z, si, pos_eps, margin = _boundary_data(classes, precision)
    for skip_incomplete in (True, False):
        params = (2.0, 40.0, 0.5, margin, pos_eps, True, skip_incomplete)
        rows, grad, counts = torch.ops.xbm_kernels.multi_similarity_fwd(x, y, r, z, si, r.shape[0], *params, True,
                                                                         False)
        gx, _ = torch.ops.xbm_kernels.multi_similarity_bwd(x, y, r, z, si, r.shape[0], *params,
                                                           torch.ones(x.shape[0]), False)
        assert int(counts.sum()) > 0
        assert_close(grad.double(), gx.double(), 1e-6, f"forward dX against backward dX ({skip_incomplete=})")


@pytest.mark.backends("reference", "cpu", "triton")
@pytest.mark.parametrize("skip_incomplete", [True, False])
def test_a_row_under_two_labels_with_a_zero_mining_margin(backend, device, skip_incomplete):
    """A row held twice in the memory, under the anchor's label and another, with
    mining_margin = 0: the two copies sit exactly on both mining boundaries (S_p < max_neg,
    S_n > min_pos with S_p == S_n), and with S a function of the values neither is mined.
    Many classes, so the CPU's one-pass form would apply (found by an independent probe)."""
    D, N = 33, 40
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(1, D, generator=g), dim=1)
    v = torch.nn.functional.normalize(x + torch.randn(1, D, generator=g), dim=1)[0]
    r = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    r = r - 2 * (r @ x[0]).clamp(min=0)[:, None] * x  # the other rows less similar than the copies
    r[0] = v
    r[1] = v
    y = torch.tensor([0])
    z = torch.arange(1, N + 1)
    z[0] = 0  # column 0 a positive, column 1 (the same row) a negative
    params = dict(alpha=2.0, beta=40.0, base=0.5, mining_margin=0.0, pos_eps=1e-5, mine=True,
                  skip_incomplete=skip_incomplete)
    rows_e, _, _, counts_e = oracle.evaluate("multi_similarity", params, x, y, r, z)
    rows, counts = xk.losses.compute("multi_similarity", x.to(device), y.to(device), r.to(device), z.to(device),
                                     backend=backend, reduction="none", **params)
    assert torch.equal(counts.cpu().long(), counts_e), (counts, counts_e)
    assert torch.allclose(rows.double().cpu(), rows_e, atol=1e-6)
