"""multi_similarity's rules of its own (CONTRACT.md section 1): with mining, P~ is empty exactly
when N~ is, so skip_incomplete changes nothing; without mining it zeroes the one-sided rows;
the table has every kind of row the flags treat differently; the Triton launcher runs no
positives kernel without mining. tests/test_values.py runs every flag combination
(cases.variants) on every backend and case against the oracle."""
import pytest
import torch

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
