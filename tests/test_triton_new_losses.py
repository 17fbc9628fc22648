"""The Triton ntxent and contrastive_l2 kernels, their launchers called directly (fwd: loss
rows, counts, the fused gradient of sum_i l_i; bwd: grad_x and grad_ref of sum_i w_i l_i)
against the float64 loop oracles of tests/oracle.py: odd shapes, a memory below one tile
and one in several splits, partial ref_valid, self_index, rows without positives or
negatives, switched-off terms, 16-bit and mixed operands, determinism.

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_new_losses.py

contrastive_l2's gradient is dl/dS = +-1/d with d^2 = 2 - 2 S, so S's fp32 rounding reaches
it amplified by 1/d^2: the data here use noise 0.25 (same-class S near 0.94, d near 0.35)
rather than 0.07 (S near 0.99, where the fp32 reference backend itself misses 1e-5)."""
import functools
import zlib

import pytest
import torch

from triton_env import DEVICE, GPU, INTERPRET, PYTESTMARK  # noqa: E402,F401  (skips when Triton cannot run)

from xbm_kernels.triton import _common  # noqa: E402
from common import FP32_RTOL, LOW_PRECISION_FACTOR, assert_rel, make_case, max_rel_err  # noqa: E402
from oracle import contrastive_l2_oracle, min_threshold_distance, ntxent_oracle  # noqa: E402
from xbm_kernels import reference  # noqa: E402
from xbm_kernels.triton import contrastive_l2 as tl2  # noqa: E402
from xbm_kernels.triton import ntxent as tnx  # noqa: E402

pytestmark = PYTESTMARK
LOW_DTYPES = [torch.float16] + ([torch.bfloat16] if GPU else [])  # the interpreter's bf16 tl.dot is unreliable

# Parameter sets in schema order (after ref_valid). contrastive_l2: the defaults (no negative
# is within d < 1 of an anchor here but in "B1-D3"); a positive margin and a wide negative
# margin (S > 0.0714, halfway between centre similarities 0 and 1/7: about a third of the
# negatives active); a positive margin no
# positive exceeds; the negative term switched off (neg_margin = -1) and the positive term
# (pos_eps = 3: S < -2 never holds). ntxent: tau 0.1; tau 0.5 with every same-label column a
# positive (pos_eps = -1).
PARAMS = {
    "contrastive_l2": {"defaults": (0.0, 1.0, 1e-5), "margins": (0.1, 1.3628, 1e-5),
                       "no-active-pos": (1.0, 1.0, 1e-5), "neg-off": (0.0, -1.0, 1e-5), "pos-off": (0.1, 1.3628, 3.0)},
    "ntxent": {"tau0.1": (0.1, 1e-5), "tau0.5-all-pos": (0.5, -1.0)},
}
PARAM_CASES = [(loss, p) for loss in PARAMS for p in PARAMS[loss]]
PARAM_IDS = [f"{loss}-{p}" for loss, p in PARAM_CASES]
FWD = {"contrastive_l2": tl2.contrastive_l2_fwd_triton, "ntxent": tnx.ntxent_fwd_triton}
BWD = {"contrastive_l2": tl2.contrastive_l2_bwd_triton, "ntxent": tnx.ntxent_bwd_triton}
ORACLE = {"contrastive_l2": contrastive_l2_oracle, "ntxent": ntxent_oracle}
REFERENCE = {"contrastive_l2": reference.contrastive_l2, "ntxent": reference.ntxent}
NAMES = {"contrastive_l2": ("pos_margin", "neg_margin", "pos_eps"), "ntxent": ("temperature", "pos_eps")}

# name: (B, N, ref_valid, D, classes, self_index). Under the interpreter (32-column tiles, 4
# programs): "B1-D3" is below one tile; "B7-D96-split" takes 4 splits, "B33-D130-partial" 3 B
# tiles x 2 splits; "B7-no-positives" has anchors of classes absent from the memory,
# "B16-one-label" no negatives. "random" self_index: -1, columns inside and past ref_valid,
# with the anchor's own copy in some valid self columns (a positive but for self_index).
CASES = {"B1-D3": (1, 5, 5, 3, 2, None), "B7-D96-split": (7, 300, 250, 96, 5, "random"),
         "B33-D130-partial": (33, 150, 100, 130, 10, "random"), "B7-no-positives": (7, 64, 64, 96, 1000, None),
         "B16-one-label": (16, 90, 77, 32, 1, "random")}
SPLIT_CASE = "B7-D96-split"


def _thresholds(loss):
    """The values of S where a decision flips, for every parameter set of the loss."""
    out = set()
    for prm in PARAMS[loss].values():
        if loss == "contrastive_l2":
            pm, nm, eps = prm
            out |= {1.0 - pm * pm / 2, 1.0 - nm * nm / 2 if nm > 0 else 2.0, 1.0 - eps}
        else:
            out.add(1.0 - prm[1])
    return tuple(sorted(out))


def _threshold_gap(x, r, thresholds, n, si, copies):
    """min_threshold_distance, also skipping the (anchor, column) pairs of `copies`."""
    if not copies:
        return min_threshold_distance(x, r, thresholds, n, si)
    S = x.double() @ r[:n].double().T
    for i, j in copies:
        assert float(S[i, j]) > 1 - 1e-6  # robustly a positive only with pos_eps < 0
        S[i, j] = float("inf")
    rows = torch.arange(x.shape[0])
    keep = (si >= 0) & (si < n)
    S[rows[keep], si[keep]] = float("inf")
    return min(float((S - t).abs().min()) for t in thresholds)


@functools.lru_cache(maxsize=None)
def _case_cpu(loss, name):
    B, N, n, D, classes, self_mode = CASES[name]
    seed = zlib.crc32(f"{loss}-{name}".encode())
    for attempt in range(40):
        x, y, r, z = make_case(B, N, D, classes, seed + attempt, thresholds=_thresholds(loss), ref_valid=n,
                               noise=0.25)
        si = None
        if self_mode == "random":
            gen = torch.Generator().manual_seed(seed + attempt)
            si = torch.randperm(N, generator=gen)[:B]
            si[torch.rand(B, generator=gen) < 0.25] = -1
            for i in range(0, B, 2):
                if 0 <= si[i] < n:
                    r[si[i]], z[si[i]] = x[i], y[i]
        copies = []
        if loss == "ntxent" and self_mode == "random":
            # the anchor's own copy in a column that is not its self column: S = 1 up to fp32
            # rounding, a positive only for pos_eps < 0 (1e-5 from 1 - 1e-5 but robustly above)
            for i in range(1, B, 2):
                j = n - 1 - i
                if j not in si.tolist():
                    r[j], z[j] = x[i], y[i]
                    copies.append((i, j))
        if _threshold_gap(x, r, _thresholds(loss), n, si, copies) > 1e-3:
            return x, y, r, z, si, n
    raise RuntimeError(f"no draw away from the thresholds for {loss}/{name}")


def _args(loss, name, prm, x_dtype=torch.float32, r_dtype=None):
    x, y, r, z, si, n = _case_cpu(loss, name)
    r_dtype = r_dtype or x_dtype
    return (x.to(x_dtype).to(DEVICE), y.int().to(DEVICE), r.to(r_dtype).to(DEVICE), z.int().to(DEVICE),
            None if si is None else si.to(DEVICE), n) + PARAMS[loss][prm]


def _oracle(loss, args, weights=None):
    x, y, r, z, si, n = (a.cpu() if torch.is_tensor(a) else a for a in args[:6])
    return ORACLE[loss](x, y, r, z, *args[6:], ref_valid=n, self_index=si, weights=weights)


@functools.lru_cache(maxsize=None)
def _oracle_cached(loss, name, prm, weighted):
    B = CASES[name][0]
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64) if weighted else None
    return _oracle(loss, _args(loss, name, prm), w)


def _weights(B):
    return torch.linspace(0.5, 1.5, B, dtype=torch.float64)


# --------------------------------------------------------------------------- the table


def test_cases_exercise_the_kernels():
    """The table has what the kernels branch on: rows without positives / negatives, active
    and inactive pairs of both kinds, switched-off terms, a memory below one tile and ones
    in several splits, self columns holding the anchor's own copy."""
    for loss in PARAMS:
        counts = {p: torch.cat([_oracle_cached(loss, name, p, False)[3] for name in CASES]) for p in PARAMS[loss]}
        if loss == "ntxent":
            c = counts["tau0.1"]
            assert (c[:, 0] == 0).any() and (c[:, 1] == 0).any() and ((c[:, 0] > 0) & (c[:, 1] > 0)).any()
            assert (counts["tau0.5-all-pos"][:, 0] > c[:, 0]).any()  # pos_eps = -1: the own copies too
        else:
            assert (counts["margins"] > 0).any(0).all() and (counts["margins"][:, 1] > counts["defaults"][:, 1]).any()
            assert (counts["no-active-pos"][:, 0] == 0).all() and (counts["defaults"][:, 0] > 0).any()
            assert (counts["neg-off"][:, 1] == 0).all() and (counts["neg-off"][:, 0] > 0).any()
            assert (counts["pos-off"][:, 0] == 0).all() and (counts["pos-off"][:, 1] > 0).any()
    assert tl2.split_plan(1, 5, DEVICE)[0] == 1
    if INTERPRET:
        B, N, n = CASES[SPLIT_CASE][:3]
        assert tl2.split_plan(B, n, DEVICE)[0] > 2
        assert _common.split_plan(B, n, DEVICE, tnx._FWD_CONFIGS, tnx._INTERP_FWD)[0] > 2
        assert CASES["B1-D3"][2] < tl2._INTERP_FWD[1]  # 5 columns: below one column tile
    x, _, r, _, si, n = _case_cpu("ntxent", SPLIT_CASE)
    assert any(0 <= si[i] < n and torch.equal(r[si[i]], x[i]) for i in range(x.shape[0]))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("loss,prm", PARAM_CASES, ids=PARAM_IDS)
def test_fwd_matches_oracle(loss, prm, name):
    """Loss rows, counts and the fused gradient of sum_i l_i; need_grad=False gives the same
    rows and counts and an empty gradient."""
    args = _args(loss, name, prm)
    rows, grad, counts = FWD[loss](*args, True, False)
    e_rows, e_grad, _, e_counts = _oracle_cached(loss, name, prm, False)
    assert rows.dtype == grad.dtype == torch.float32 and counts.dtype == torch.int32
    assert rows.shape == (args[0].shape[0],) and grad.shape == args[0].shape and counts.shape == (rows.shape[0], 2)
    assert_rel(rows, e_rows, FP32_RTOL, "rows")
    assert torch.equal(counts.cpu().long(), e_counts), (counts, e_counts)
    assert_rel(grad, e_grad, FP32_RTOL, "grad", floor=1.0)
    rows2, grad2, counts2 = FWD[loss](*args, False, False)
    assert grad2.shape == (0,) and torch.equal(rows2, rows) and torch.equal(counts2, counts)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("loss,prm", PARAM_CASES, ids=PARAM_IDS)
def test_bwd_matches_oracle(loss, prm, name):
    """The bwd op: grad_x and grad_ref of sum_i w_i l_i; rows of grad_ref past ref_valid are 0."""
    args = _args(loss, name, prm)
    w = _weights(args[0].shape[0])
    gx, gr = BWD[loss](*args, w.float().to(DEVICE), False)
    _, e_gx, e_gr, _ = _oracle_cached(loss, name, prm, True)
    assert gx.dtype == gr.dtype == torch.float32 and gr.shape == args[2].shape
    assert_rel(gx, e_gx, FP32_RTOL, "grad_x", floor=1.0)
    assert_rel(gr, e_gr, FP32_RTOL, "grad_ref", floor=1.0)
    assert not gr[args[5]:].any()


@pytest.mark.parametrize("loss,prm", [("contrastive_l2", "margins"), ("ntxent", "tau0.1")])
def test_any_split_count_gives_the_same_answer(loss, prm):
    """One split, splits that do and do not align with tiles, many 5-column splits, the plan's."""
    args = _args(loss, SPLIT_CASE, prm)
    e_rows, e_grad, _, e_counts = _oracle_cached(loss, SPLIT_CASE, prm, False)
    outs = [FWD[loss](*args, True, False, splits=s) for s in (1, 2, 7, args[5] // 5, None)]
    for rows, grad, counts in outs:
        assert_rel(rows, e_rows, FP32_RTOL, "rows")
        assert_rel(grad, e_grad, FP32_RTOL, "grad", floor=1.0)
        assert torch.equal(counts.cpu().long(), e_counts)


@pytest.mark.parametrize("loss", list(PARAMS))
def test_repeated_runs_are_bitwise_identical(loss):
    prm = next(iter(PARAMS[loss]))
    args = _args(loss, SPLIT_CASE, prm)
    g = _weights(args[0].shape[0]).float().to(DEVICE)
    outs = [FWD[loss](*args, True, False) + BWD[loss](*args, g, False) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("loss", list(PARAMS))
def test_empty_valid_prefix_gives_zero(loss):
    prm = next(iter(PARAMS[loss]))
    args = _args(loss, "B7-no-positives", prm)
    args = args[:5] + (0,) + args[6:]
    rows, grad, counts = FWD[loss](*args, True, False)
    gx, gr = BWD[loss](*args, torch.ones(args[0].shape[0], device=DEVICE), False)
    for t in (rows, grad, counts, gx, gr):
        assert not t.any()


def test_zero_distance_pairs():
    """contrastive_l2 at d == 0 (S = 1 exactly: unit basis vectors): a negative counts and adds
    neg_margin with gradient 0; a positive (pos_eps = -1) is never active (d > pos_margin >= 0
    fails)."""
    D = 16
    x = torch.eye(D)[:2]
    r = torch.cat([torch.eye(D)[:2], torch.eye(D)[:2], torch.nn.functional.normalize(torch.ones(3, D), dim=1)])
    y = torch.tensor([0, 1], dtype=torch.int32)
    z = torch.tensor([0, 1, 1, 0, 0, 1, 2], dtype=torch.int32)
    args = (x.to(DEVICE), y.to(DEVICE), r.to(DEVICE), z.to(DEVICE), None, r.shape[0], 0.0, 1.0, -1.0)
    rows, grad, counts = tl2.contrastive_l2_fwd_triton(*args, True, False)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    gx, gr = tl2.contrastive_l2_bwd_triton(*args, w.float().to(DEVICE), False)
    e_rows, _, _, e_counts = contrastive_l2_oracle(x, y, r, z, 0.0, 1.0, -1.0, ref_valid=r.shape[0])
    _, e_gx, e_gr, _ = contrastive_l2_oracle(x, y, r, z, 0.0, 1.0, -1.0, ref_valid=r.shape[0], weights=w)
    assert counts.cpu().tolist() == e_counts.tolist() and counts[:, 1].min() >= 1
    assert torch.isfinite(grad).all() and torch.isfinite(gr).all()
    assert_rel(rows, e_rows, FP32_RTOL, "rows")
    assert rows.min() >= 1.0  # each anchor's zero-distance negative adds neg_margin
    assert_rel(gx, e_gx, FP32_RTOL, "grad_x", floor=1.0)
    assert_rel(gr, e_gr, FP32_RTOL, "grad_ref", floor=1.0)
    # anchor 0 alone: its zero-distance columns (0: an inactive positive, 2: an active
    # negative) get no gradient, its other active pairs do
    _, gr0 = tl2.contrastive_l2_bwd_triton(*args, torch.tensor([1.0, 0.0], device=DEVICE), False)
    assert not gr0[[0, 2]].any() and gr0[[3, 4]].any()


def test_direct_calls_check_their_arguments():
    args = _args("ntxent", "B1-D3", "tau0.1")
    with pytest.raises(ValueError, match="temperature"):
        tnx.ntxent_fwd_triton(*args[:6], 0.0, 1e-5, True, False)
    with pytest.raises(ValueError, match="grad_rows"):
        tnx.ntxent_bwd_triton(*args, torch.ones(3, device=DEVICE), False)
    largs = _args("contrastive_l2", "B1-D3", "defaults")
    with pytest.raises(ValueError, match="ref_valid"):
        tl2.contrastive_l2_fwd_triton(*largs[:5], largs[2].shape[0] + 1, *largs[6:], True, False)
    with pytest.raises(ValueError, match="labels: expected int32"):
        tl2.contrastive_l2_fwd_triton(largs[0], largs[1].long(), *largs[2:], True, False)


# --------------------------------------------------------------------------- dtypes


def _reference_errors(loss, args, oracle):
    """The reference backend's errors (loss, grad_x alone, grad_x and grad_ref on both sides)
    in the inputs' dtypes."""
    x, y, r, z, si, n = args[:6]
    kw = dict(zip(NAMES[loss], args[6:]), ref_valid=n, self_index=si)
    xa = x.clone().requires_grad_()
    rows, _ = REFERENCE[loss](xa, y.long(), r, z.long(), **kw)
    rows.sum().backward()
    xb, rb = x.clone().requires_grad_(), r.clone().requires_grad_()
    REFERENCE[loss](xb, y.long(), rb, z.long(), **kw)[0].sum().backward()
    return [max_rel_err(rows.sum(), oracle[0].sum()), max_rel_err(xa.grad.float(), oracle[1], 1.0),
            max_rel_err(xb.grad.float(), oracle[1], 1.0), max_rel_err(rb.grad.float(), oracle[2], 1.0)]


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("loss,prm", [("contrastive_l2", "margins"), ("ntxent", "tau0.1")])
def test_low_precision_within_twice_reference_error(loss, prm, dtype):
    """16-bit x and ref: errors against the oracle on the same (rounded) inputs, the fused
    gradient and both sides, at most twice the reference backend's in the same dtype."""
    args = _args(loss, "B33-D130-partial", prm, dtype)
    oracle = _oracle(loss, args)
    rows, grad, counts = FWD[loss](*args, True, False)
    gx, gr = BWD[loss](*args, torch.ones(args[0].shape[0], device=DEVICE), False)
    assert torch.equal(counts.cpu().long(), oracle[3])
    mine = [max_rel_err(rows.sum(), oracle[0].sum()), max_rel_err(grad, oracle[1], 1.0),
            max_rel_err(gx, oracle[1], 1.0), max_rel_err(gr, oracle[2], 1.0)]
    ref = _reference_errors(loss, args, oracle)
    floor = 1e-5  # fp32 accumulation can be exact where the reference happens to be too
    for what, m, e in zip(("loss", "grad_x", "grad_x both", "grad_ref"), mine, ref):
        assert m <= max(LOW_PRECISION_FACTOR * e, floor), (what, m, e)


@pytest.mark.parametrize("mem_dtype", LOW_DTYPES)
@pytest.mark.parametrize("loss,prm", [("contrastive_l2", "margins"), ("ntxent", "tau0.1")])
def test_fp32_anchors_with_a_16_bit_memory(loss, prm, mem_dtype):
    """fp32 anchors against a 16-bit memory: anchors and weights enter the products as 16-bit
    parts (_common.operand_split), so against the oracle on the rounded memory the errors stay
    fp32-sized, for the fused gradient and both sides."""
    args = _args(loss, "B33-D130-partial", prm, torch.float32, mem_dtype)
    w = _weights(args[0].shape[0])
    e_rows, e_grad, _, e_counts = _oracle(loss, args)
    _, e_gx, e_gr, _ = _oracle(loss, args, w)
    rows, grad, counts = FWD[loss](*args, True, False)
    gx, gr = BWD[loss](*args, w.float().to(DEVICE), False)
    assert torch.equal(counts.cpu().long(), e_counts)
    assert_rel(rows, e_rows, FP32_RTOL, "rows")
    assert_rel(grad, e_grad, FP32_RTOL, "grad", floor=1.0)
    assert_rel(gx, e_gx, FP32_RTOL, "grad_x", floor=1.0)
    assert_rel(gr, e_gr, FP32_RTOL, "grad_ref", floor=1.0)


def test_config_pruning_for_hopper():
    """The GPU autotune tables (not run by the interpreter) prune to the tiles measured free of
    large spills on sm_90 (ptxas at D = 128): contrastive_l2 keeps up to 32 x 64 IEEE fp32
    tiles, ntxent (two accumulators and the weights) 16 x 32, as multi_similarity."""
    import triton
    table = [triton.Config({"BLOCK_B": a, "BLOCK_K": b}, num_warps=w, num_stages=s)
             for a, b, w, s in _common.TWO_ACC_FWD_CONFIGS]

    def kept(prune, B, D, dtype, precision="ieee"):
        nargs = dict(r_ptr=torch.empty(0, dtype=dtype), B=B)
        return [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"]) for c in prune(table, nargs, BLOCK_D=D, PRECISION=precision)]

    assert tl2._FWD_CONFIGS is _common.TWO_ACC_FWD_CONFIGS  # no 64 x 128 or 128 x 64 tiles
    l2_fp32 = kept(tl2._FWD_PRUNE, 256, 128, torch.float32)
    assert (32, 64) in l2_fp32 and all(b * k <= 2048 for b, k in l2_fp32)
    assert all(b * k <= 512 for b, k in kept(tnx._FWD_PRUNE, 256, 128, torch.float32))
    for prune, tiles in ((tl2._FWD_PRUNE, 2), (tnx._FWD_PRUNE, 3)):
        bf16 = kept(prune, 256, 128, torch.bfloat16)
        assert len(bf16) >= 5 and all(tiles * b * 128 <= 8 * 32 * 128 for b, _ in bf16)
        assert len(kept(prune, 256, 128, torch.float32, "tf32")) > len(kept(prune, 256, 128, torch.float32))
