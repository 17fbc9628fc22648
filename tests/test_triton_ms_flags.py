"""multi_similarity's `mine` and `skip_incomplete` flags on the Triton kernels: the launchers
called directly (fwd: loss rows, counts, the fused gradient; bwd: both gradients) against a
float64 loop oracle of the flags' definition (tests/oracle.py, written from the op's contract):

    P_i, N_i as always (valid, not self; same label and S < 1 - pos_eps / other label)
    mine:     P~_i = {j in P_i : S_ij - mm < max_{N_i} S},  N~_i = {j in N_i : S_ij + mm > min_{P_i} S}
              (max over an empty set = -inf, min = +inf)
    not mine: P~_i = P_i, N~_i = N_i
    skip_incomplete: l_i = 0, counts (0, 0) unless P_i, N_i, P~_i, N~_i are all non-empty
    otherwise l_i = pos + neg, each term 0 when its own mined set is empty,
    pos = 1/alpha log(1 + sum_{P~} exp(-alpha (S - base))), neg = 1/beta log(1 + sum_{N~} exp(beta (S - base))),
    counts (|P~_i|, |N~_i|); mined-set membership is a constant for the gradient.

Where the rules differ: without mining, a row without positives still has its negative
term (and one without negatives its positive term) unless skip_incomplete; mining empties
P~ and N~ of such rows, and of rows whose positives all beat every negative by the margin.
With mine, skip_incomplete cannot change a row: for non-empty P and N, P~ is empty exactly
when min_P S - mm >= max_N S, which is when N~ is empty (test_cases_exercise_the_rules
checks the oracle agrees). pos_eps = -1 makes every same-label valid column a positive.

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_ms_flags.py"""
import functools
import math

import pytest
import torch

from triton_env import DEVICE, GPU, INTERPRET, PYTESTMARK  # noqa: E402,F401  (skips when Triton cannot run)


from common import FP32_RTOL, assert_rel, class_centres, rows_around  # noqa: E402
from oracle import min_threshold_distance, multi_similarity_oracle  # noqa: E402
from xbm_kernels.triton import multi_similarity as tms  # noqa: E402

pytestmark = PYTESTMARK

ALPHA, BETA, BASE, MM = 2.0, 40.0, 0.5, 0.1
FLAGS = [(True, True), (True, False), (False, True), (False, False)]  # (mine, skip_incomplete)
FLAG_IDS = ["mine-skip", "mine-noskip", "nomine-skip", "nomine-noskip"]
POS_EPS = [1e-5, -1.0]
# name: (B, N, ref_valid, D, classes). "mixed": 3 anchors of a class absent from the
# reference (no positives), anchors from tight to loose around their centres against a loose
# reference (positives that beat every negative by the margin, and overlapping ones);
# "one-label": one class, so no negatives. Both: a random self_index (-1, inside and past
# ref_valid), the anchor's own copy in its self column where that is a valid one.
CASES = {"mixed": (24, 120, 100, 32, 6), "one-label": (9, 40, 37, 16, 1)}


def _kinds(x, y, r, z, pos_eps, ref_valid, self_index):
    """Per row: "no P", "no N", "P~ empty" (P, N non-empty but nothing mined), or "full";
    and the smallest distance of a pair to a mining boundary."""
    S = x.double() @ r[:ref_valid].double().T
    kinds, gap = [], math.inf
    for i in range(x.shape[0]):
        cols = [j for j in range(ref_valid) if j != int(self_index[i])]
        P = [j for j in cols if int(z[j]) == int(y[i]) and S[i, j] < 1 - pos_eps]
        N = [j for j in cols if int(z[j]) != int(y[i])]
        if not P or not N:
            kinds.append("no P" if not P else "no N")
            continue
        max_neg, min_pos = max(float(S[i, j]) for j in N), min(float(S[i, j]) for j in P)
        gap = min([gap] + [abs(float(S[i, j]) - MM - max_neg) for j in P]
                  + [abs(float(S[i, j]) + MM - min_pos) for j in N])
        kinds.append("full" if min_pos - MM < max_neg else "P~ empty")
    return kinds, gap


@functools.lru_cache(maxsize=None)
def _case(name, pos_eps):
    B, N, n, D, classes = CASES[name]
    for attempt in range(40):
        gen = torch.Generator().manual_seed(500 + attempt)
        centres = class_centres(classes + 1, D, gen)  # the last class has no reference rows
        y = torch.randint(0, classes, (B,), generator=gen)
        if classes > 1:
            y[:3] = classes
        z = torch.randint(0, classes, (N,), generator=gen)
        x_noise = torch.tensor([0.07, 1.0], dtype=torch.float64)[torch.randint(0, 2, (B, 1), generator=gen)]
        x = rows_around(centres, y, gen, x_noise).float()
        r = rows_around(centres, z, gen, 1.0).float()
        si = torch.randperm(N, generator=gen)[:B]
        si[torch.rand(B, generator=gen) < 0.25] = -1
        for i in range(B):
            # the anchor's own copy: a positive (with pos_eps = -1) but for self_index
            if 0 <= si[i] < n and i % 2 == 0 and y[i] < classes:
                r[si[i]], z[si[i]] = x[i], y[i]
        kinds, gap = _kinds(x, y, r, z, pos_eps, n, si)
        if min_threshold_distance(x, r, (1 - pos_eps,), n, si) > 1e-3 and gap > 1e-4:
            return x, y, r, z, si, n, kinds
    raise RuntimeError(f"no draw away from the boundaries for {name}")


def _args(name, pos_eps):
    x, y, r, z, si, n, _ = _case(name, pos_eps)
    return (x.to(DEVICE), y.int().to(DEVICE), r.to(DEVICE), z.int().to(DEVICE), si.to(DEVICE), n,
            ALPHA, BETA, BASE, MM, pos_eps)


def _oracle(name, pos_eps, mine, skip, weights=None):
    x, y, r, z, si, n, _ = _case(name, pos_eps)
    return multi_similarity_oracle(x, y, r, z, alpha=ALPHA, beta=BETA, base=BASE, mining_margin=MM, pos_eps=pos_eps,
                                   mine=mine, skip_incomplete=skip, ref_valid=n, self_index=si, weights=weights)


@pytest.mark.parametrize("pos_eps", POS_EPS)
def test_cases_exercise_the_rules(pos_eps):
    """Every kind of row occurs, the flags change results where the rules say they do, and
    nowhere else (mine makes skip_incomplete moot)."""
    kinds = {k for name in CASES for k in _case(name, pos_eps)[6]}
    assert kinds == {"no P", "no N", "P~ empty", "full"}, kinds
    for name in CASES:
        out = {f: _oracle(name, pos_eps, *f) for f in FLAGS}
        rows_mine = out[(True, True)][0]
        assert torch.equal(rows_mine, out[(True, False)][0])  # skip_incomplete moot with mining
        assert torch.equal(out[(True, True)][3], out[(True, False)][3])
        assert not torch.equal(out[(False, True)][0], out[(False, False)][0])  # rows without P or N
        assert not torch.equal(rows_mine, out[(False, False)][0])
    kinds = _case("mixed", pos_eps)[6]
    rows_skip, rows_all = _oracle("mixed", pos_eps, False, True)[0], _oracle("mixed", pos_eps, False, False)[0]
    for i, k in enumerate(kinds):  # rows without positives: only the negative term, unless skipped
        if k == "no P":
            assert rows_skip[i] == 0 and rows_all[i] > 0
    if pos_eps < 0:  # the anchors' own copies would be positives but for self_index
        x, y, r, z, si, n, _ = _case("mixed", pos_eps)
        assert any(0 <= si[i] < n and torch.equal(r[si[i]], x[i]) for i in range(x.shape[0]))


@pytest.mark.parametrize("splits", [None, 1, 7])
@pytest.mark.parametrize("mine,skip", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("pos_eps", POS_EPS)
@pytest.mark.parametrize("name", list(CASES))
def test_fwd_matches_oracle(name, pos_eps, mine, skip, splits):
    """Loss rows, counts and the fused gradient of sum_i l_i; any split count (the running
    maxima of mine=False merge across splits)."""
    args = _args(name, pos_eps)
    rows, grad, counts = tms.multi_similarity_fwd_triton(*args, mine, skip, True, False, splits=splits)
    e_rows, e_grad, _, e_counts = _oracle(name, pos_eps, mine, skip)
    assert rows.dtype == grad.dtype == torch.float32
    assert_rel(rows, e_rows, FP32_RTOL, "rows")
    assert torch.equal(counts.cpu().long(), e_counts), (counts, e_counts)
    assert_rel(grad, e_grad, FP32_RTOL, "grad", floor=1.0)
    rows2, grad2, counts2 = tms.multi_similarity_fwd_triton(*args, mine, skip, False, False, splits=splits)
    assert grad2.numel() == 0 and torch.equal(rows2, rows) and torch.equal(counts2, counts)


@pytest.mark.parametrize("mine,skip", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("pos_eps", POS_EPS)
@pytest.mark.parametrize("name", list(CASES))
def test_bwd_matches_oracle(name, pos_eps, mine, skip):
    """The bwd op's grad_x and grad_ref of sum_i w_i l_i."""
    args = _args(name, pos_eps)
    w = torch.linspace(0.5, 1.5, args[0].shape[0], dtype=torch.float64)
    gx, gr = tms.multi_similarity_bwd_triton(*args, mine, skip, w.float().to(DEVICE), False)
    _, e_grad, e_gref, _ = _oracle(name, pos_eps, mine, skip, weights=w)
    assert gx.dtype == gr.dtype == torch.float32 and gr.shape == args[2].shape
    assert_rel(gx, e_grad, FP32_RTOL, "grad_x", floor=1.0)
    assert_rel(gr, e_gref, FP32_RTOL, "grad_ref", floor=1.0)
    assert float(gr[args[5]:].abs().max()) == 0.0


class _NotLaunched:
    def __getitem__(self, grid):
        raise AssertionError("the statistics pass ran with mine=False")


def test_no_statistics_pass_without_mining(monkeypatch):
    args = _args("mixed", 1e-5)
    monkeypatch.setattr(tms, "ms_stats_kernel", _NotLaunched())
    rows, _, counts = tms.multi_similarity_fwd_triton(*args, False, False, True, False)
    e_rows, _, _, e_counts = _oracle("mixed", 1e-5, False, False)
    assert_rel(rows, e_rows, FP32_RTOL, "rows")
    assert torch.equal(counts.cpu().long(), e_counts)
    with pytest.raises(AssertionError, match="statistics pass"):
        tms.multi_similarity_fwd_triton(*args, True, True, True, False)
