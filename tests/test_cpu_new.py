"""The multi_similarity flags (mine, skip_incomplete) and the ntxent loss on the C++ CPU ops
(torch.ops.xbm_kernels.*) and the reference functions, against the float64 loop oracle.

The ops run at 3 threads, so the memory splits into up to 3 thread ranges of uneven tile
counts (the "multi-part" case has 5 tiles); the results of each range are combined in
order. Tolerances: fp32 1e-5 relative to the largest expected entry, with a floor of 1.0
(one unit-norm row's contribution); 16-bit inputs at most 2x the reference's error, with
a floor of 1e-5."""
import functools
import zlib

import pytest
import torch

import xbm_kernels  # noqa: F401  (registers torch.ops.xbm_kernels)
from xbm_kernels import reference
from common import make_case
from oracle import _sets, min_threshold_distance, multi_similarity_oracle, ntxent_oracle

OPS = torch.ops.xbm_kernels
THREADS = 3
FLOOR = 1.0
MS = dict(alpha=2.0, beta=40.0, base=0.5, mining_margin=0.1)
TAU = 0.1

# variant: (loss, extra parameters)
VARIANTS = {
    "ms-mine-skip": ("multi_similarity", dict(mine=True, skip_incomplete=True)),
    "ms-mine-noskip": ("multi_similarity", dict(mine=True, skip_incomplete=False)),
    "ms-nomine-skip": ("multi_similarity", dict(mine=False, skip_incomplete=True)),
    "ms-nomine-noskip": ("multi_similarity", dict(mine=False, skip_incomplete=False)),
    "ntxent": ("ntxent", {}),
}

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
    "B5-empty-memory": (5, 40, 16, 3, 0, None, 1e-5, None),
    "B5-N0": (5, 0, 16, 3, None, None, 1e-5, None),
    "B0": (0, 30, 16, 3, None, None, 1e-5, None),
}


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _max_rel_err(actual, expected, floor):
    """Max abs error over max(largest |expected|, floor)."""
    expected = expected.double().cpu()
    err = (actual.detach().double().cpu() - expected).abs()
    if err.numel() == 0:
        return 0.0
    return float(err.max() / expected.abs().max().clamp_min(floor))


def assert_rel(actual, expected, what, tol=1e-5, floor=FLOOR):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    rel = _max_rel_err(actual, expected, floor)
    if rel > tol:
        diff = (actual.detach().double().cpu() - expected.double().cpu()).abs().flatten()
        idx = diff.argsort(descending=True)[:5]
        raise AssertionError(f"{what}: max relative error {rel:.3g} > {tol:g}; worst flat indices {idx.tolist()}: "
                             f"got {actual.detach().double().flatten()[idx].tolist()}, "
                             f"expected {expected.double().flatten()[idx].tolist()}")


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
def _case(name, dtype=torch.float32, ref_dtype=None):
    B, N, D, classes, ref_valid, self_mode, pos_eps, label_mode = CASES[name]
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
                and _mining_robust(x, y, r, z, ref_valid, si, pos_eps)):
            return dict(x=x, y=y.int(), r=r, z=z.int(), ref_valid=n, self_index=si, pos_eps=pos_eps)
    raise RuntimeError(f"no robust draw for {name}")


def _weights(B):
    return torch.linspace(0.5, 1.5, B, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _oracle(variant, name, dtype=torch.float32, ref_dtype=None):
    """(rows, d(sum_i w_i l_i)/dx, .../dref, counts) with the weights of _weights, and
    d(sum_i l_i)/dx: row i of dx depends on l_i only, so it is row i of the first over w_i."""
    loss, extra = VARIANTS[variant]
    c = _case(name, dtype, ref_dtype)
    w = _weights(c["x"].shape[0])
    common = dict(pos_eps=c["pos_eps"], ref_valid=c["ref_valid"], self_index=c["self_index"], weights=w)
    if loss == "multi_similarity":
        rows, gx, gr, counts = multi_similarity_oracle(c["x"], c["y"], c["r"], c["z"], **MS, **extra, **common)
    else:
        rows, gx, gr, counts = ntxent_oracle(c["x"], c["y"], c["r"], c["z"], temperature=TAU, **common)
    return rows, gx, gr, counts, gx / w[:, None]


def _params(variant, c):
    """The op's loss parameters in schema order."""
    loss, extra = VARIANTS[variant]
    if loss == "multi_similarity":
        return (MS["alpha"], MS["beta"], MS["base"], MS["mining_margin"], c["pos_eps"], extra["mine"],
                extra["skip_incomplete"])
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
    return reference.ntxent(x, c["y"], r, c["z"], temperature=TAU, **common)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpu_fwd_matches_oracle(variant, name):
    c = _case(name)
    rows, grad, counts = _fwd(variant, c, True)
    exp_rows, _, _, exp_counts, exp_grad = _oracle(variant, name)
    assert rows.dtype == torch.float32 and grad.dtype == torch.float32 and counts.dtype == torch.int32
    assert_rel(rows, exp_rows, "rows")
    assert_rel(grad, exp_grad, "grad")
    assert torch.equal(counts.long(), exp_counts), (counts, exp_counts)
    rows2, empty, counts2 = _fwd(variant, c, False)  # need_grad=False: the same rows, no gradient
    assert empty.shape == (0,)
    assert torch.equal(rows2, rows) and torch.equal(counts2, counts)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpu_bwd_both_gradients_match_oracle(variant, name):
    c = _case(name)
    B = c["x"].shape[0]
    gx, gr = _bwd(variant, c, _weights(B).float())
    _, exp_gx, exp_gr, _, _ = _oracle(variant, name)
    assert gx.dtype == torch.float32 and gr.dtype == torch.float32
    assert_rel(gx, exp_gx, "grad_x")
    assert_rel(gr, exp_gr, "grad_ref")
    if gr.shape[0] > c["ref_valid"]:  # rows past ref_valid get no gradient
        assert float(gr[c["ref_valid"]:].abs().max()) == 0.0


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_matches_oracle(variant, name):
    c = _case(name)
    x = c["x"].clone().requires_grad_()
    r = c["r"].clone().requires_grad_()
    rows, counts = _reference(variant, c, x=x, r=r)
    exp_rows, exp_gx, exp_gr, exp_counts, _ = _oracle(variant, name)
    assert rows.dtype == torch.float32 and counts.dtype == torch.int32
    assert_rel(rows, exp_rows, "rows")
    assert torch.equal(counts.long(), exp_counts), (counts, exp_counts)
    (rows * _weights(rows.shape[0]).float()).sum().backward()
    assert_rel(x.grad, exp_gx, "grad_x")
    assert_rel(r.grad, exp_gr, "grad_ref")


def test_cases_exercise_the_rules():
    """The table has the rows where the rules differ, and the rules really differ there."""
    names = list(CASES)
    res = {v: [_oracle(v, n) for n in names] for v in VARIANTS}

    def rows_where(variant, pred):
        return sum(int(pred(o[3]).sum()) for o in res[variant])

    for v in VARIANTS:
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
    c = _case(name, *dtypes)
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
        err, ref_err = _max_rel_err(got, exp, FLOOR), _max_rel_err(ref.float(), exp, FLOOR)
        assert err <= max(2 * ref_err, floor), (what, err, ref_err)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bitwise_deterministic(variant):
    c = _case("B33-D96-multi-part")
    w = _weights(c["x"].shape[0]).float()
    a = _fwd(variant, c, True) + _bwd(variant, c, w)
    b = _fwd(variant, c, True) + _bwd(variant, c, w)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_thread_ranges_agree(variant):
    """Each thread range keeps running shifts / maxima of its own, brought to the common
    one when merged: 1 thread and 3 agree beyond rounding."""
    c = _case("B33-D96-multi-part")
    out3 = _fwd(variant, c, True)
    torch.set_num_threads(1)
    out1 = _fwd(variant, c, True)
    assert_rel(out3[0], out1[0].double(), "rows", tol=1e-6)
    assert_rel(out3[1], out1[1].double(), "grad", tol=1e-6)
    assert torch.equal(out3[2], out1[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_self", [True, False])
@pytest.mark.parametrize("variant", ["ms-mine-skip", "ms-nomine-noskip", "ntxent"])
def test_opcheck(variant, dtype, with_self):
    x, y, r, z = make_case(9, 70, 24, 4, seed=3, thresholds=(1 - 1e-5,), dtype=dtype, noise=1.0)
    si = torch.randint(-1, 60, (9,), generator=torch.Generator().manual_seed(0)) if with_self else None
    c = dict(x=x, y=y.int(), r=r, z=z.int(), ref_valid=60, self_index=si, pos_eps=1e-5)
    loss = VARIANTS[variant][0]
    args = (c["x"], c["y"], c["r"], c["z"], si, 60, *_params(variant, c))
    for need_grad in (True, False):
        torch.library.opcheck(getattr(OPS, f"{loss}_fwd"), args + (need_grad, False))
    torch.library.opcheck(getattr(OPS, f"{loss}_bwd"), args + (torch.linspace(0.5, 1.5, 9), False))
