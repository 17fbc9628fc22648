"""The multi_similarity flags (mine, skip_incomplete), the ntxent loss and the contrastive_l2
loss on the C++ CPU ops (torch.ops.xbm_kernels.*) and the reference functions, against the
float64 loop oracle.

The ops run at 3 threads, so the memory splits into up to 3 thread ranges of uneven tile
counts (the "multi-part" case has 5 tiles); the results of each range are combined in
order. Tolerances: fp32 1e-5 relative to the largest expected entry, with a floor of 1.0
(one unit-norm row's contribution), compared with common.assert_rel; 16-bit inputs at most
2x the reference's error, with a floor of 1e-5."""
import functools
import zlib

import pytest
import torch

import xbm_kernels  # noqa: F401  (registers torch.ops.xbm_kernels)
from xbm_kernels import reference
from common import FP32_RTOL, LOW_PRECISION_FACTOR, assert_rel, make_case, max_rel_err
from oracle import _sets, contrastive_l2_oracle, min_threshold_distance, multi_similarity_oracle, ntxent_oracle

OPS = torch.ops.xbm_kernels
THREADS = 3
FLOOR = 1.0
MS = dict(alpha=2.0, beta=40.0, base=0.5, mining_margin=0.1)
TAU = 0.1

# variant: (loss, extra parameters; for contrastive_l2 pos_margin, neg_margin and optionally
# pos_eps, which then replaces the case's)
VARIANTS = {
    "ms-mine-skip": ("multi_similarity", dict(mine=True, skip_incomplete=True)),
    "ms-mine-noskip": ("multi_similarity", dict(mine=True, skip_incomplete=False)),
    "ms-nomine-skip": ("multi_similarity", dict(mine=False, skip_incomplete=True)),
    "ms-nomine-noskip": ("multi_similarity", dict(mine=False, skip_incomplete=False)),
    "ntxent": ("ntxent", {}),
    "cl2-default": ("contrastive_l2", dict(pos_margin=0.0, neg_margin=1.0)),
    "cl2-margins": ("contrastive_l2", dict(pos_margin=0.9, neg_margin=1.2)),  # both margins inside the data
    # the values the PML drop-in uses to switch a term off (outside the public ranges), next to
    # cl2-margins' other term (it has more active negatives than the defaults on this data)
    "cl2-no-negatives": ("contrastive_l2", dict(pos_margin=0.9, neg_margin=-1.0)),
    "cl2-no-positives": ("contrastive_l2", dict(pos_margin=0.9, neg_margin=1.2, pos_eps=3.0)),
}
# The S values where a contrastive_l2 variant's pair changes state: d = m at S = 1 - m^2 / 2.
L2_THRESHOLDS = (1 - 1.0 ** 2 / 2, 1 - 0.9 ** 2 / 2, 1 - 1.2 ** 2 / 2)

# name: (B, N, D, classes, ref_valid, self_index, pos_eps, labels)
#   self_index: None, "random" (a random column or -1 per row) or "copy" (the reference is
#   the batch: row i's own copy is column i); labels: None, or "one-ref-class" (every
#   reference row class 0, anchors of classes 0 and 1: rows without negatives next to
#   rows without positives).
CASES = {
    "B1-D3-small-K": (1, 6, 3, 2, None, None, 1e-5, None),
    "B7-D96-small-K": (7, 50, 96, 5, None, None, 1e-5, None),
    "B33-D130-partial-self": (33, 300, 130, 10, 200, "random", 1e-5, None),
    "B33-D96-multi-tile": (33, 2100, 96, 40, None, "random", 1e-5, None),
    "B33-D96-multi-part": (33, 5000, 96, 200, 4700, "random", 1e-5, None),
    "B7-no-positives": (7, 64, 96, 1000, None, None, 1e-5, None),
    "B16-all-same-label": (16, 90, 32, 1, 77, "random", 1e-5, None),
    "B9-one-ref-class": (9, 40, 16, 2, None, None, 1e-5, "one-ref-class"),
    "B12-in-batch-pos-eps-neg": (12, 12, 24, 3, None, None, -1.0, "in-batch"),
    "B12-in-batch-self": (12, 12, 24, 3, None, "copy", 1e-5, "in-batch"),
    "B12-in-batch-self-pos-eps-neg": (12, 12, 24, 3, None, "copy", -1.0, "in-batch"),
    "B5-empty-memory": (5, 40, 16, 3, 0, None, 1e-5, None),
    "B5-N0": (5, 0, 16, 3, None, None, 1e-5, None),
    "B0": (0, 30, 16, 3, None, None, 1e-5, None),
}


# Cases a loss does not take: contrastive_l2 on the in-batch case with pos_eps < 0 and no
# self_index makes each anchor's own copy a positive at d = sqrt(2 - 2 S_ii), a distance made
# of the rounding of S_ii = |x_i|^2 (fp32 against the oracle's float64: 0 or ~3e-4), with
# gradient 1/d; the d == 0 rule is tested on exact copies (test_contrastive_l2_zero_distance)
# and pos_eps < 0 on the same case with self_index.
NOT_FOR = {"contrastive_l2": {"B12-in-batch-pos-eps-neg"}}
VARIANT_CASES = [pytest.param(v, n, id=f"{v}-{n}") for v in VARIANTS for n in CASES
                 if n not in NOT_FOR.get(VARIANTS[v][0], ())]


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _close(actual, expected, what, tol=FP32_RTOL):
    """common.assert_rel at this file's floor, after checking the shapes (the shared helper
    would broadcast)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert_rel(actual, expected, tol, what, floor=FLOOR)


def _l2_robust(x, y, r, z, ref_valid, self_index, pos_eps, gap=1e-6):
    """No valid pair within `gap` of a contrastive_l2 variant's state change in S (10x the
    fp32 rounding of S at these D, ~1e-7; a wider gap is not drawable with 1e5 pairs)."""
    return min_threshold_distance(x, r, L2_THRESHOLDS, ref_valid, self_index) > gap


def _mining_robust(x, y, r, z, ref_valid, self_index, pos_eps, gap=2e-5):
    """No positive within `gap` of the mining boundary against the hardest negative and no
    negative within `gap` of the one against the hardest positive (far above fp32 rounding
    of S, ~1e-7)."""
    m = MS["mining_margin"]
    for _, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        if P and N:
            max_neg, min_pos = max(s[j] for j in N), min(s[j] for j in P)
            if any(abs(s[j] - m - max_neg) < gap for j in P) or any(abs(s[j] + m - min_pos) < gap for j in N):
                return False
    return True


@functools.lru_cache(maxsize=None)
def _case(name, dtype=torch.float32, ref_dtype=None, loss="multi_similarity"):
    """The case's data, redrawn until it is robust for `loss` (multi_similarity and ntxent share
    the mining-robust draws)."""
    B, N, D, classes, ref_valid, self_mode, pos_eps, label_mode = CASES[name]
    robust = _l2_robust if loss == "contrastive_l2" else _mining_robust
    seed = zlib.crc32(name.encode())
    for attempt in range(60):
        # noise 1: positives spread over ~[0.2, 0.8] and overlap the negatives, so that
        # mining and the softmax have work to do
        x, y, r, z = make_case(B, N, D, classes, seed=seed + attempt, thresholds=(1 - pos_eps,), dtype=dtype,
                               ref_valid=ref_valid, noise=1.0)
        if label_mode == "in-batch":
            r, z = x.clone(), y.clone()
        elif label_mode == "one-ref-class":
            z = torch.zeros_like(z)
            y = torch.arange(B) % 2
        if ref_dtype is not None:
            r = r.to(ref_dtype)
        n = N if ref_valid is None else ref_valid
        si = None
        if self_mode == "random":
            si = torch.randint(-1, max(n, 1), (B,), generator=torch.Generator().manual_seed(attempt))
        elif self_mode == "copy":
            si = torch.arange(B)
        if (min_threshold_distance(x, r, (1 - pos_eps,), ref_valid, si) > 1e-3
                and robust(x, y, r, z, ref_valid, si, pos_eps)):
            return dict(x=x, y=y.int(), r=r, z=z.int(), ref_valid=n, self_index=si, pos_eps=pos_eps)
    raise RuntimeError(f"no robust draw for {name}")


def _variant_case(variant, name, dtype=torch.float32, ref_dtype=None):
    return _case(name, dtype, ref_dtype, loss=VARIANTS[variant][0])


def _weights(B):
    return torch.linspace(0.5, 1.5, B, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _oracle(variant, name, dtype=torch.float32, ref_dtype=None):
    """(rows, d(sum_i w_i l_i)/dx, .../dref, counts) with the weights of _weights, and
    d(sum_i l_i)/dx: row i of dx depends on l_i only, so it is row i of the first over w_i."""
    loss, extra = VARIANTS[variant]
    c = _variant_case(variant, name, dtype, ref_dtype)
    w = _weights(c["x"].shape[0])
    common = dict(pos_eps=c["pos_eps"], ref_valid=c["ref_valid"], self_index=c["self_index"], weights=w)
    if loss == "multi_similarity":
        rows, gx, gr, counts = multi_similarity_oracle(c["x"], c["y"], c["r"], c["z"], **MS, **extra, **common)
    elif loss == "contrastive_l2":
        rows, gx, gr, counts = contrastive_l2_oracle(c["x"], c["y"], c["r"], c["z"], **{**common, **extra})
    else:
        rows, gx, gr, counts = ntxent_oracle(c["x"], c["y"], c["r"], c["z"], temperature=TAU, **common)
    return rows, gx, gr, counts, gx / w[:, None]


def _params(variant, c):
    """The op's loss parameters in schema order."""
    loss, extra = VARIANTS[variant]
    if loss == "multi_similarity":
        return (MS["alpha"], MS["beta"], MS["base"], MS["mining_margin"], c["pos_eps"], extra["mine"],
                extra["skip_incomplete"])
    if loss == "contrastive_l2":
        return (extra["pos_margin"], extra["neg_margin"], extra.get("pos_eps", c["pos_eps"]))
    return (TAU, c["pos_eps"])


def _fwd(variant, c, need_grad):
    op = getattr(OPS, f"{VARIANTS[variant][0]}_fwd")
    return op(c["x"], c["y"], c["r"], c["z"], c["self_index"], c["ref_valid"], *_params(variant, c), need_grad, False)


def _bwd(variant, c, grad_rows):
    op = getattr(OPS, f"{VARIANTS[variant][0]}_bwd")
    return op(c["x"], c["y"], c["r"], c["z"], c["self_index"], c["ref_valid"], *_params(variant, c), grad_rows,
              False)


def _reference(variant, c, x=None, r=None):
    loss, extra = VARIANTS[variant]
    x = c["x"] if x is None else x
    r = c["r"] if r is None else r
    common = dict(pos_eps=c["pos_eps"], ref_valid=c["ref_valid"], self_index=c["self_index"])
    if loss == "multi_similarity":
        return reference.multi_similarity(x, c["y"], r, c["z"], **MS, **extra, **common)
    if loss == "contrastive_l2":
        return reference.contrastive_l2(x, c["y"], r, c["z"], **{**common, **extra})
    return reference.ntxent(x, c["y"], r, c["z"], temperature=TAU, **common)


@pytest.mark.parametrize("variant,name", VARIANT_CASES)
def test_cpu_fwd_matches_oracle(variant, name):
    c = _variant_case(variant, name)
    rows, grad, counts = _fwd(variant, c, True)
    exp_rows, _, _, exp_counts, exp_grad = _oracle(variant, name)
    assert rows.dtype == torch.float32 and grad.dtype == torch.float32 and counts.dtype == torch.int32
    _close(rows, exp_rows, "rows")
    _close(grad, exp_grad, "grad")
    assert torch.equal(counts.long(), exp_counts), (counts, exp_counts)
    rows2, empty, counts2 = _fwd(variant, c, False)  # need_grad=False: the same rows, no gradient
    assert empty.shape == (0,)
    assert torch.equal(rows2, rows) and torch.equal(counts2, counts)


@pytest.mark.parametrize("variant,name", VARIANT_CASES)
def test_cpu_bwd_both_gradients_match_oracle(variant, name):
    c = _variant_case(variant, name)
    B = c["x"].shape[0]
    gx, gr = _bwd(variant, c, _weights(B).float())
    _, exp_gx, exp_gr, _, _ = _oracle(variant, name)
    assert gx.dtype == torch.float32 and gr.dtype == torch.float32
    _close(gx, exp_gx, "grad_x")
    _close(gr, exp_gr, "grad_ref")
    if gr.shape[0] > c["ref_valid"]:  # rows past ref_valid get no gradient
        assert float(gr[c["ref_valid"]:].abs().max()) == 0.0


@pytest.mark.parametrize("variant,name", VARIANT_CASES)
def test_reference_matches_oracle(variant, name):
    c = _variant_case(variant, name)
    x = c["x"].clone().requires_grad_()
    r = c["r"].clone().requires_grad_()
    rows, counts = _reference(variant, c, x=x, r=r)
    exp_rows, exp_gx, exp_gr, exp_counts, _ = _oracle(variant, name)
    assert rows.dtype == torch.float32 and counts.dtype == torch.int32
    _close(rows, exp_rows, "rows")
    assert torch.equal(counts.long(), exp_counts), (counts, exp_counts)
    (rows * _weights(rows.shape[0]).float()).sum().backward()
    _close(x.grad, exp_gx, "grad_x")
    _close(r.grad, exp_gr, "grad_ref")


def test_cases_exercise_the_rules():
    """The table has the rows where the rules differ, and the rules really differ there."""
    names = list(CASES)
    res = {v: [_oracle(v, n) for n in names] for v in VARIANTS if VARIANTS[v][0] != "contrastive_l2"}

    def rows_where(variant, pred):
        return sum(int(pred(o[3]).sum()) for o in res[variant])

    for v in res:
        assert rows_where(v, lambda counts: (counts[:, 0] > 0) & (counts[:, 1] > 0)) > 40, v  # active rows
    # rows without positives and rows without negatives (with the other set non-empty)
    full = res["ms-nomine-noskip"]  # counts = (|P|, |N|)
    assert rows_where("ms-nomine-noskip", lambda counts: (counts[:, 0] == 0) & (counts[:, 1] > 0)) >= 5
    assert rows_where("ms-nomine-noskip", lambda counts: (counts[:, 0] > 0) & (counts[:, 1] == 0)) >= 5
    # mining drops pairs
    assert sum(int(o[3].sum()) for o in res["ms-mine-noskip"]) < sum(int(o[3].sum()) for o in full)
    # without mining, skip_incomplete zeroes the one-sided rows' loss and counts
    differ = sum(int((a[0] != b[0]).sum()) for a, b in zip(res["ms-nomine-skip"], res["ms-nomine-noskip"]))
    assert differ >= 10, differ
    # with mining, P~ is empty exactly when N~ is (both say min P - margin >= max N), so
    # skip_incomplete changes nothing: the oracle agrees
    for a, b in zip(res["ms-mine-skip"], res["ms-mine-noskip"]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])
    # negative pos_eps makes the exact copies positives
    i = names.index("B12-in-batch-pos-eps-neg")
    c = _case(names[i])
    assert int(full[i][3][:, 0].sum()) > int(sum(len(P) for _, s, P, _ in _sets(c["x"], c["y"], c["r"], c["z"], 1e-5,
                                                                                 None, None)))
    # ntxent: a pair without negatives adds exactly 0
    i = names.index("B16-all-same-label")
    rows, counts = res["ntxent"][i][0], res["ntxent"][i][3]
    assert int(counts[:, 0].sum()) > 0 and float(rows.abs().max()) == 0.0
    # ntxent's positives: the table has memory tiles with few label matches (pair dot
    # products) and with many (the tile GEMM); the cut-off is 1/32 of the pairs
    density = {n: float((_case(n)["y"][:, None] == _case(n)["z"][None, :]).double().mean())
               for n in ("B33-D96-multi-part", "B7-D96-small-K")}
    assert density["B33-D96-multi-part"] < 1 / 64 and density["B7-D96-small-K"] > 1 / 16, density


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, None), (torch.float16, None), (torch.float32, torch.bfloat16)],
                         ids=["bf16", "fp16", "fp32-anchors-bf16-memory"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", ["B33-D130-partial-self", "B33-D96-multi-part"])
def test_low_precision_within_twice_reference_error(variant, dtypes, name):
    c = _variant_case(variant, name, *dtypes)
    exp_rows, exp_gx, exp_gr, _, _ = _oracle(variant, name, *dtypes)
    w = _weights(c["x"].shape[0]).float()
    rows = _fwd(variant, c, False)[0]
    gx, gr = _bwd(variant, c, w)
    x = c["x"].clone().requires_grad_()
    r = c["r"].clone().requires_grad_()
    ref_rows, _ = _reference(variant, c, x=x, r=r)
    (ref_rows * w).sum().backward()
    floor = 1e-5
    for what, got, ref, exp in [("rows", rows, ref_rows, exp_rows), ("grad_x", gx, x.grad, exp_gx),
                                ("grad_ref", gr, r.grad, exp_gr)]:
        err, ref_err = max_rel_err(got, exp, FLOOR), max_rel_err(ref.float(), exp, FLOOR)
        assert err <= max(LOW_PRECISION_FACTOR * ref_err, floor), (what, err, ref_err)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bitwise_deterministic(variant):
    c = _variant_case(variant, "B33-D96-multi-part")
    w = _weights(c["x"].shape[0]).float()
    a = _fwd(variant, c, True) + _bwd(variant, c, w)
    b = _fwd(variant, c, True) + _bwd(variant, c, w)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_thread_ranges_agree(variant):
    """Each thread range keeps running shifts / maxima of its own, brought to the common
    one when merged: 1 thread and 3 agree beyond rounding."""
    c = _variant_case(variant, "B33-D96-multi-part")
    out3 = _fwd(variant, c, True)
    torch.set_num_threads(1)
    out1 = _fwd(variant, c, True)
    _close(out3[0], out1[0].double(), "rows", tol=1e-6)
    _close(out3[1], out1[1].double(), "grad", tol=1e-6)
    assert torch.equal(out3[2], out1[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_self", [True, False])
@pytest.mark.parametrize("variant", ["ms-mine-skip", "ms-nomine-noskip", "ntxent", "cl2-default", "cl2-no-negatives",
                                     "cl2-no-positives"])
def test_opcheck(variant, dtype, with_self):
    x, y, r, z = make_case(9, 70, 24, 4, seed=3, thresholds=(1 - 1e-5,), dtype=dtype, noise=1.0)
    si = torch.randint(-1, 60, (9,), generator=torch.Generator().manual_seed(0)) if with_self else None
    c = dict(x=x, y=y.int(), r=r, z=z.int(), ref_valid=60, self_index=si, pos_eps=1e-5)
    loss = VARIANTS[variant][0]
    args = (c["x"], c["y"], c["r"], c["z"], si, 60, *_params(variant, c))
    for need_grad in (True, False):
        torch.library.opcheck(getattr(OPS, f"{loss}_fwd"), args + (need_grad, False))
    torch.library.opcheck(getattr(OPS, f"{loss}_bwd"), args + (torch.linspace(0.5, 1.5, 9), False))


def test_contrastive_l2_cases_exercise_the_rules():
    """The contrastive_l2 variants meet active and inactive pairs of both kinds, and the
    switched-off values leave exactly one term."""
    names = [n for n in CASES if n not in NOT_FOR["contrastive_l2"]]
    res = {v: [_oracle(v, n) for n in names] for v in VARIANTS if VARIANTS[v][0] == "contrastive_l2"}
    total = {v: sum(o[3].sum(0) for o in outs) for v, outs in res.items()}  # (active pos, active neg) pairs
    assert int(total["cl2-default"][0]) > 100 and int(total["cl2-default"][1]) > 20, total
    assert int(total["cl2-margins"][0]) > 100 and int(total["cl2-margins"][1]) > 100, total
    # the margins drop pairs of both kinds that the defaults keep, and keep negatives they drop
    assert int(total["cl2-margins"][0]) < int(total["cl2-default"][0]), total
    assert int(total["cl2-margins"][1]) > int(total["cl2-default"][1]), total
    # neg_margin = -1: no negative term; pos_eps = 3: no positive term; the other term unchanged
    assert int(total["cl2-no-negatives"][1]) == 0 and int(total["cl2-no-positives"][0]) == 0, total
    for a, b, keep in (("cl2-no-negatives", "cl2-margins", 0), ("cl2-no-positives", "cl2-margins", 1)):
        for oa, ob in zip(res[a], res[b]):
            assert torch.equal(oa[3][:, keep], ob[3][:, keep])
    # rows without any active pair (the loss is 0 there) and rows with only one kind
    counts = torch.cat([o[3] for o in res["cl2-margins"]])
    assert int(((counts[:, 0] == 0) & (counts[:, 1] > 0)).sum()) >= 5
    assert int(((counts[:, 0] > 0) & (counts[:, 1] == 0)).sum()) >= 5


@pytest.mark.parametrize("pos_margin", [0.0, -0.5], ids=["pos-margin-0", "pos-margin-negative"])
def test_contrastive_l2_zero_distance(pos_margin):
    """Exact copies (one-hot rows: S = 1 in any precision, d = 0): an other-label copy is an
    active negative contributing neg_margin with gradient 0, a same-label copy kept by
    pos_eps < 0 is inactive at pos_margin = 0 and active with gradient 0 below it (the
    cdist rule); op, bwd and the reference's autograd agree with the oracle, no inf or NaN."""
    D = 8
    x = torch.eye(D)[:5]
    y = torch.tensor([0, 1, 2, 0, 1], dtype=torch.int32)
    noise = torch.nn.functional.normalize(torch.randn(20, D, generator=torch.Generator().manual_seed(5)), dim=1)
    r = torch.cat([x, x, noise])  # copies with the anchors' labels, copies with other labels, distinct rows
    z = torch.cat([y, (y + 1) % 3, torch.arange(20, dtype=torch.int32) % 3])
    c = dict(x=x, y=y, r=r, z=z, ref_valid=30, self_index=None, pos_eps=-1.0)
    params = (pos_margin, 1.0, -1.0)
    w = _weights(5)
    exp_rows, exp_gx, exp_gr, exp_counts = contrastive_l2_oracle(x, y, r, z, pos_margin=pos_margin, neg_margin=1.0,
                                                                 pos_eps=-1.0, ref_valid=30, weights=w)
    assert bool((exp_counts[:, 1] >= 1).all())  # the other-label copy is always active
    rows, grad, counts = OPS.contrastive_l2_fwd(x, y, r, z, None, 30, *params, True, False)
    gx, gr = OPS.contrastive_l2_bwd(x, y, r, z, None, 30, *params, w.float(), False)
    _close(rows, exp_rows, "rows")
    _close(grad, exp_gx / w[:, None], "grad")
    _close(gx, exp_gx, "grad_x")
    _close(gr, exp_gr, "grad_ref")
    assert torch.equal(counts.long(), exp_counts), (counts, exp_counts)
    xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    ref_rows, ref_counts = reference.contrastive_l2(xr, y, rr, z, pos_margin=pos_margin, neg_margin=1.0, pos_eps=-1.0,
                                                    ref_valid=30, self_index=None)
    (ref_rows * w.float()).sum().backward()
    assert torch.isfinite(xr.grad).all() and torch.isfinite(rr.grad).all()
    _close(ref_rows, exp_rows, "reference rows")
    _close(xr.grad, exp_gx, "reference grad_x")
    _close(rr.grad, exp_gr, "reference grad_ref")
    assert torch.equal(ref_counts.long(), exp_counts)
    # the copy columns' gradient comes from the other anchors' sqrt(2) positives only: none
    # from the anchor at d = 0
    copies_grad = torch.zeros(10, D, dtype=torch.float64)
    for j in range(10):
        for i in range(5):
            if i != j % 5 and int(z[j]) == int(y[i]):
                copies_grad[j] -= float(w[i]) / 2 ** 0.5 * x[i].double()
    assert float(copies_grad.abs().max()) > 0
    _close(gr[:10], copies_grad, "grad_ref of the copies")
    _close(rr.grad[:10], copies_grad, "reference grad_ref of the copies")
    # by hand, the ten copy columns' part of each row: d = 0 to the anchor's own copies, sqrt(2)
    # to the other one-hot rows (a positive when the label matches, never an active negative)
    _, _, _, distinct_counts = contrastive_l2_oracle(x, y, r[10:], z[10:], pos_margin=pos_margin, neg_margin=1.0,
                                                     pos_eps=-1.0)
    distinct_rows = contrastive_l2_oracle(x, y, r[10:], z[10:], pos_margin=pos_margin, neg_margin=1.0,
                                          pos_eps=-1.0)[0]
    for i in range(5):
        others = sum(int(z[j] == y[i]) for j in range(10) if j % 5 != i)
        own = (-pos_margin if pos_margin < 0 else 0.0) + 1.0  # the same-label copy, the other-label copy
        assert abs(float(exp_rows[i] - distinct_rows[i]) - (own + others * (2 ** 0.5 - pos_margin))) < 1e-9
        assert int(exp_counts[i, 0] - distinct_counts[i, 0]) == others + int(pos_margin < 0)
        assert int(exp_counts[i, 1] - distinct_counts[i, 1]) == 1
