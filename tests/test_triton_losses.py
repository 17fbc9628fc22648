"""The Triton multi-similarity, triplet and supcon kernels: opcheck of their ops, the
float64 loop oracle tables of tests/test_losses.py, reductions, both gradients, exact
triplet ties, split-K merges, determinism, 16-bit inputs, torch.compile.

Runs on CUDA tensors on a GPU, otherwise on CPU tensors under the Triton interpreter, in
its own process (TRITON_INTERPRET must be set before triton is imported):

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_losses.py

Interpreter shapes are small; a GPU adds large memories, bf16 and TF32."""
import functools

import pytest
import torch

from triton_env import DEVICE, GPU, INTERPRET, PYTESTMARK  # noqa: E402,F401  (skips when Triton cannot run)

import xbm_kernels as xk  # noqa: E402
from xbm_kernels.triton import _common  # noqa: E402

from common import make_case  # noqa: E402
from oracle import min_threshold_distance, reduce_rows, triplet_oracle  # noqa: E402
from common import CASES as ALL_CASES, assert_rel, max_rel_err as _max_rel_err  # noqa: E402
from test_losses import CASES, LOSSES, _case, _denominator, _oracle, _oracle_cached, _robust  # noqa: E402
from xbm_kernels.triton import contrastive_l2 as tcl2  # noqa: E402
from xbm_kernels.triton import multi_similarity as tms  # noqa: E402
from xbm_kernels.triton import ntxent as tnx  # noqa: E402
from xbm_kernels.triton import supcon as tsc  # noqa: E402
from xbm_kernels.triton import triplet as ttr  # noqa: E402
from xbm_kernels.triton.ops import OPS  # noqa: E402

pytestmark = PYTESTMARK

LOW_DTYPES = [torch.float16] + ([torch.bfloat16] if GPU else [])  # the interpreter's bf16 tl.dot is unreliable
NAMES = [l for l in LOSSES if "triton" in xk.LOSSES[l].kernels]  # the registry says which have kernels
FWD = {"multi_similarity": tms.multi_similarity_fwd_triton, "triplet": ttr.triplet_fwd_triton,
       "supcon": tsc.supcon_fwd_triton, "ntxent": tnx.ntxent_fwd_triton,
       "contrastive_l2": tcl2.contrastive_l2_fwd_triton}
SMALL = "B7-D96-small-K"      # N = 50: two interpreter tiles
PARTIAL = "B33-D130-partial-self"  # 3 B tiles x 2 splits under the interpreter, random self_index


def _params(loss):
    return xk.losses.LOSSES[loss].values({})


def _op_args(loss, c):
    n = c["r"].shape[0] if c["ref_valid"] is None else c["ref_valid"]
    return (c["x"], c["y"].int(), c["r"], c["z"].int(), c["self_index"], n) + _params(loss)


def _run(loss, c, reduction, x=None, r=None, backend="triton"):
    return LOSSES[loss][0](c["x"] if x is None else x, c["y"], c["r"] if r is None else r, c["z"],
                           ref_valid=c["ref_valid"], self_index=c["self_index"], reduction=reduction, backend=backend)


# --------------------------------------------------------------------------- the ops


def test_schemas_match_the_cpp_ops():
    if not xk._ops.HAS_C:
        pytest.skip(f"the C++ extension did not load: {xk._ops.LOAD_ERROR}")
    for loss in NAMES:
        for phase in ("fwd", "bwd"):
            name = f"{loss}_{phase}"
            mine = str(getattr(OPS, name).default._schema).replace("xbm_kernels_triton::", "")
            theirs = str(getattr(torch.ops.xbm_kernels, name).default._schema).replace("xbm_kernels::", "")
            assert mine == theirs


def test_backend_reports_the_losses():
    assert all(xk.backends.supports("triton", loss) for loss in NAMES)
    assert {"multi_similarity", "triplet", "supcon"} <= set(NAMES)
    assert not any(xk.backends.supports("triton", l.name) for l in xk.LOSSES.values() if "triton" not in l.kernels)


@pytest.mark.parametrize("loss", NAMES)
@pytest.mark.parametrize("dtype", LOW_DTYPES + [torch.float32])
@pytest.mark.parametrize("need_grad,with_self", [(True, True), (False, False)])
def test_opcheck_fwd(loss, dtype, need_grad, with_self):
    c = _case(loss, SMALL, dtype, DEVICE.type)
    args = _op_args(loss, c)
    si = torch.arange(c["x"].shape[0], device=DEVICE) * 3 - 1 if with_self else None  # -1 and columns
    args = args[:4] + (si,) + args[5:]
    torch.library.opcheck(getattr(OPS, f"{loss}_fwd"), args + (need_grad, False))


@pytest.mark.parametrize("loss", NAMES)
@pytest.mark.parametrize("dtype", LOW_DTYPES + [torch.float32])
def test_opcheck_bwd(loss, dtype):
    c = _case(loss, SMALL, dtype, DEVICE.type)
    g = torch.linspace(0.5, 1.5, c["x"].shape[0], device=DEVICE)
    torch.library.opcheck(getattr(OPS, f"{loss}_bwd"), _op_args(loss, c) + (g, False))


def test_direct_calls_check_their_arguments():
    c = _case("supcon", SMALL, device=DEVICE.type)
    x, y, r, z, si, n = _op_args("supcon", c)[:6]
    with pytest.raises(ValueError, match="labels: expected int32"):
        OPS.supcon_fwd(x, y.long(), r, z, si, n, 0.1, 1e-5, True, False)
    with pytest.raises(ValueError, match="ref_valid"):
        OPS.triplet_fwd(x, y, r, z, si, r.shape[0] + 1, 0.1, 1e-5, True, False)
    with pytest.raises(ValueError, match="temperature"):
        OPS.supcon_fwd(x, y, r, z, si, n, 0.0, 1e-5, True, False)
    with pytest.raises(ValueError, match="alpha"):
        OPS.multi_similarity_fwd(x, y, r, z, si, n, -2.0, 40.0, 0.5, 0.1, 1e-5, True, True, True, False)
    with pytest.raises(ValueError, match="grad_rows"):
        OPS.triplet_bwd(x, y, r, z, si, n, 0.1, 1e-5, torch.ones(3, device=DEVICE), False)


# --------------------------------------------------------------------------- the oracle table


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("loss", NAMES)
def test_rows_grad_counts_match_oracle(loss, name):
    """Per-anchor rows, active-pair counts and the fused anchor gradient of sum_i w_i l_i."""
    c = _case(loss, name, device=DEVICE.type)
    B = c["x"].shape[0]
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    x = c["x"].clone().requires_grad_()
    rows, counts = xk.losses.compute(loss, x, c["y"], c["r"], c["z"], ref_valid=c["ref_valid"],
                                     self_index=c["self_index"], reduction="none", backend="triton")
    rows.backward(weights.to(rows))
    e_rows, e_grad, _, e_counts = _oracle_cached(loss, name, True)
    assert rows.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert_rel(rows, e_rows, 1e-5, f"{loss} rows")
    assert_rel(x.grad, e_grad, 1e-5, f"{loss} grad", floor=1.0)
    assert torch.equal(counts.cpu().long(), e_counts), (counts, e_counts)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", NAMES)
def test_reductions(loss, reduction):
    c = _case(loss, PARTIAL, device=DEVICE.type)
    B = c["x"].shape[0]
    x = c["x"].clone().requires_grad_()
    out = _run(loss, c, reduction, x=x)
    out.sum().backward()
    rows, grad, _, counts = _oracle_cached(loss, PARTIAL, False)
    denom = _denominator(loss, counts, B)
    unit = 1.0 / denom if reduction == "mean" else 1.0  # one unit-norm row's contribution
    assert out.dtype == torch.float32
    assert_rel(out, reduce_rows(rows, reduction, denom), 1e-5, f"{loss} loss", floor=unit)
    assert_rel(x.grad, grad / denom if reduction == "mean" else grad, 1e-5, f"{loss} grad", floor=unit)


@pytest.mark.parametrize("loss", NAMES)
def test_any_split_count_gives_the_same_answer(loss):
    """Splits that do and do not align with tiles, one split, many 5-column splits, the
    plan's: every merge agrees with the oracle; only fp32 addition order differs."""
    c = _case(loss, PARTIAL, device=DEVICE.type)
    args = _op_args(loss, c)
    e_rows, e_grad, _, e_counts = _oracle_cached(loss, PARTIAL, False)
    outs = [FWD[loss](*args, True, False, splits=s) for s in (1, 2, 7, args[5] // 5, None)]
    for rows, grad, counts in outs:
        assert_rel(rows, e_rows, 1e-5, "rows")
        assert_rel(grad, e_grad, 1e-5, "grad", floor=1.0)
        assert torch.equal(counts.cpu().long(), e_counts)
        assert_rel(rows, outs[0][0], 2e-6, "rows vs one split", floor=1.0)  # S ~ 1: fp32 ulps of S


def test_cases_exercise_the_splits():
    """The interpreter's plan splits the partial and multi-tile memories (test_losses'
    tables run with one split on the CPU backend's tiles)."""
    for name in (PARTIAL, "B33-D96-multi-tile"):
        B, N, _, _, ref_valid, _, _, _ = ALL_CASES[name]
        assert _common.split_plan(B, ref_valid or N, DEVICE, tms._FWD_CONFIGS, tms._INTERP_FWD)[0] > 1


def test_config_pruning_for_hopper():
    """The GPU autotune tables (not run by the interpreter) prune to configs without large
    spills on sm_90: three fp32 (rows x D) register tiles per program, small IEEE fp32 tiles."""
    import triton
    table = [triton.Config({"BLOCK_B": a, "BLOCK_K": b}, num_warps=w, num_stages=s)
             for a, b, w, s in _common.TWO_ACC_FWD_CONFIGS]

    def kept(prune, B, D, dtype, precision="ieee"):
        nargs = dict(r_ptr=torch.empty(0, dtype=dtype), B=B)
        return [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                for c in prune(table, nargs, BLOCK_D=D, PRECISION=precision)]

    for prune in (tms._FWD_PRUNE, tsc._FWD_PRUNE):
        bf16 = kept(prune, 256, 128, torch.bfloat16)
        assert len(bf16) >= 5 and all(3 * b * 128 <= w * 32 * 128 for b, _, w, _ in bf16)
        assert all(b * k <= 512 for b, k, *_ in kept(prune, 256, 128, torch.float32))
        assert len(kept(prune, 256, 128, torch.float32, "tf32")) > len(kept(prune, 256, 128, torch.float32))
        assert all(b == 16 for b, *_ in kept(prune, 3, 128, torch.bfloat16))  # 3 anchors: 16-row tiles
        assert kept(prune, 256, 512, torch.bfloat16) == [(16, 16, 4, 1)]  # nothing fits: the smallest


# --------------------------------------------------------------------------- both sides


@pytest.mark.parametrize("loss", NAMES)
def test_gradient_to_a_separate_reference(loss):
    c = _case(loss, PARTIAL, device=DEVICE.type)
    x = c["x"].clone().requires_grad_()
    r = c["r"].clone().requires_grad_()
    _run(loss, c, "sum", x=x, r=r).backward()
    _, grad, grad_ref, _ = _oracle_cached(loss, PARTIAL, False)
    assert x.grad.dtype == torch.float32 and r.grad.dtype == torch.float32
    assert_rel(x.grad, grad, 1e-5, "grad_x", floor=1.0)
    assert_rel(r.grad, grad_ref, 1e-5, "grad_ref", floor=1.0)
    assert float(r.grad[c["ref_valid"]:].abs().max()) == 0.0


@pytest.mark.parametrize("loss", NAMES)
def test_bwd_op_weights_rows(loss):
    """<loss>_bwd with per-row weights: grad_x and grad_ref of sum_i w_i l_i."""
    c = _case(loss, PARTIAL, device=DEVICE.type)
    w = torch.linspace(0.5, 1.5, c["x"].shape[0], dtype=torch.float64)
    gx, gr = getattr(OPS, f"{loss}_bwd")(*_op_args(loss, c), w.float().to(DEVICE), False)
    _, grad, grad_ref, _ = _oracle(loss, {k: v.cpu() if torch.is_tensor(v) else v for k, v in c.items()}, w)
    assert_rel(gx, grad, 1e-5, "grad_x", floor=1.0)
    assert_rel(gr, grad_ref, 1e-5, "grad_ref", floor=1.0)


def _in_batch_case(loss, B=25, D=48):
    """A batch whose in-batch loss (self excluded by index) has no decision near a boundary."""
    idx = torch.arange(B)
    for attempt in range(60):
        x, y, _, _ = make_case(B, 1, D, 5, seed=11 + attempt, thresholds=(1 - 1e-5,), noise=2.0)
        if min_threshold_distance(x, x, (1 - 1e-5,), self_index=idx) > 1e-3 and _robust(loss, x, y, x, y, None, idx):
            return x, y, idx
    raise RuntimeError(f"no robust in-batch draw for {loss}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss", NAMES)
def test_in_batch_gradient_flows_to_both_sides(loss, reduction):
    """x is both the anchors and the reference, its own column excluded by index: x gets
    the anchor and the reference gradient, as autograd through the dense formula."""
    x0, y, idx = _in_batch_case(loss)
    B = x0.shape[0]
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64) if reduction == "none" else None
    rows, grad, grad_ref, counts = LOSSES[loss][1](x0, y, x0, y, self_index=idx, weights=weights)
    assert counts[:, 0].sum() > 0 and (counts[:, 0] == 0).sum() < B // 2
    x = x0.to(DEVICE).requires_grad_()
    out = LOSSES[loss][0](x, y.to(DEVICE), x, y.to(DEVICE), self_index=idx.to(DEVICE), reduction=reduction,
                          backend="triton")
    out.backward(weights.to(out) if weights is not None else None)
    denom = _denominator(loss, counts, B)
    unit = 1.0 / denom if reduction == "mean" else 1.0
    total = grad + grad_ref
    assert_rel(out, reduce_rows(rows, reduction, denom), 1e-5, "loss", floor=unit)
    assert_rel(x.grad, total / denom if reduction == "mean" else total, 1e-5, "grad (both sides)", floor=unit)


# --------------------------------------------------------------------------- triplet ties


def _tied_case():
    """Every reference row appears three times (columns j, j + 12, j + 24), with the
    interpreter's 32-column tiles across tiles too. Entries are multiples of 1/16 in
    [-3/16, 3/16]: every partial sum of S is exact in fp32, so copies (and other equal
    values) tie exactly whatever the summation order (numpy's matmul, which the
    interpreter's tl.dot runs, sums edge columns in another order than the rest)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randint(-3, 4, (6, 16), generator=gen).float() / 16
    r = torch.randint(-3, 4, (12, 16), generator=gen).float() / 16
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    z = torch.arange(12) % 3
    return x, y, torch.cat([r, r, r]), torch.cat([z, z, z])


def test_triplet_ties_pick_the_lowest_column():
    x, y, r, z = _tied_case()
    xx = x.to(DEVICE).requires_grad_()
    rr = r.to(DEVICE).requires_grad_()
    rows = xk.triplet_loss(xx, y.to(DEVICE), rr, z.to(DEVICE), margin=2.0, reduction="none", backend="triton")
    rows.sum().backward()
    e_rows, grad, grad_ref, _ = triplet_oracle(x, y, r, z, margin=2.0)
    assert (e_rows > 0).all()
    assert_rel(rows, e_rows, 1e-6, "rows")
    assert_rel(xx.grad, grad, 1e-6, "grad_x")
    assert_rel(rr.grad, grad_ref, 1e-6, "grad_ref")
    assert float(rr.grad[12:].abs().max()) == 0.0  # the copies at higher columns never win


@pytest.mark.parametrize("splits", [1, 2, 3, 5, 36])
def test_triplet_ties_across_splits_keep_the_earlier_split(splits):
    """With 3 splits each copy sits in its own split: the merge keeps split 0's column."""
    x, y, r, z = _tied_case()
    args = [t.to(DEVICE) for t in (x, y.int(), r, z.int())]
    _, _, counts, chosen = ttr._forward(*args, None, 36, 2.0, 1e-5, False, False, splits)
    assert counts.min() == 1
    assert int(chosen.max()) < 12 and int(chosen.min()) >= 0
    _, _, _, one_split = ttr._forward(*args, None, 36, 2.0, 1e-5, False, False, 1)
    assert torch.equal(chosen, one_split)


def test_triplet_reference_gradient_sums_shared_rows():
    """Several anchors choosing the same reference row add up there (no atomics)."""
    x, y, r, z = make_case(20, 6, 16, 2, seed=8)  # 20 anchors, 3 rows per class: rows are shared
    rr = r.to(DEVICE).requires_grad_()
    xk.triplet_loss(x.to(DEVICE), y.to(DEVICE), rr, z.to(DEVICE), margin=2.0, reduction="sum",
                    backend="triton").backward()
    _, _, grad_ref, counts = triplet_oracle(x, y, r, z, margin=2.0)
    assert counts[:, 0].sum() > 6
    assert_rel(rr.grad, grad_ref, 1e-6, "grad_ref")


# --------------------------------------------------------------------------- edges, determinism


@pytest.mark.parametrize("loss", NAMES)
def test_empty_valid_prefix_gives_zero(loss):
    c = _case(loss, SMALL, device=DEVICE.type)
    x = c["x"].clone().requires_grad_()
    r = c["r"].clone().requires_grad_()
    out = LOSSES[loss][0](x, c["y"], r, c["z"], ref_valid=0, backend="triton")
    out.backward()
    assert float(out.detach()) == 0.0 and float(x.grad.abs().max()) == 0.0 and float(r.grad.abs().max()) == 0.0


@pytest.mark.parametrize("loss", NAMES)
def test_repeated_runs_are_bitwise_identical(loss):
    c = _case(loss, PARTIAL, device=DEVICE.type)
    outs = []
    for _ in range(2):
        x = c["x"].clone().requires_grad_()
        r = c["r"].clone().requires_grad_()
        out = _run(loss, c, "mean", x=x, r=r)
        out.backward()
        xf = c["x"].clone().requires_grad_()  # the fused path: the gradient from the forward
        _run(loss, c, "mean", x=xf).backward()
        outs.append((out.detach(), x.grad, r.grad, xf.grad))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("loss", NAMES)
@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_low_precision_within_twice_reference_error(loss, dtype):
    """16-bit x and ref: errors against the oracle on the same (rounded) inputs, both the
    memory loss (fused gradient) and both sides, at most twice the reference backend's
    in the same dtype."""
    c = _case(loss, PARTIAL, dtype, DEVICE.type)
    rows, grad, grad_ref, _ = _oracle(loss, {k: v.cpu() if torch.is_tensor(v) else v for k, v in c.items()})
    errs = {}
    for backend in ("triton", "reference"):
        x = c["x"].clone().requires_grad_()
        out = _run(loss, c, "sum", x=x, backend=backend)
        out.backward()
        xb = c["x"].clone().requires_grad_()
        rb = c["r"].clone().requires_grad_()
        _run(loss, c, "sum", x=xb, r=rb, backend=backend).backward()
        assert x.grad.dtype == dtype and rb.grad.dtype == dtype
        errs[backend] = [_max_rel_err(out, rows.sum()), _max_rel_err(x.grad.float(), grad),
                         _max_rel_err(xb.grad.float(), grad), _max_rel_err(rb.grad.float(), grad_ref)]
    floor = 1e-5  # fp32 accumulation can be exact where the reference happens to be too
    for what, mine, ref in zip(("loss", "grad_x", "grad_x both", "grad_ref"), errs["triton"], errs["reference"]):
        assert mine <= max(2 * ref, floor), (what, mine, ref)


@pytest.mark.parametrize("loss", NAMES)
@pytest.mark.parametrize("mem_dtype", LOW_DTYPES)
def test_fp32_anchors_with_a_16_bit_memory(loss, mem_dtype):
    """fp32 anchors against a 16-bit memory: anchors and weights go into the tensor cores as
    16-bit parts (2 for fp16, 3 for bf16), so against the oracle on the rounded memory the
    error stays fp32-sized."""
    c = _case(loss, PARTIAL, device=DEVICE.type)
    r16 = c["r"].to(mem_dtype)
    x = c["x"].clone().requires_grad_()
    rows = _run(loss, c, "none", x=x, r=r16)
    rows.sum().backward()
    rounded = dict(c, x=c["x"].cpu(), r=r16.cpu(), y=c["y"].cpu(), z=c["z"].cpu(),
                   self_index=None if c["self_index"] is None else c["self_index"].cpu())
    e_rows, e_grad, _, _ = _oracle(loss, rounded)
    tol = 1e-5  # the anchors and weights go in as 16-bit parts: fp32-sized errors
    assert x.grad.dtype == torch.float32
    assert_rel(rows, e_rows, 1e-5, "rows")
    assert_rel(x.grad, e_grad, tol, "grad", floor=1.0)


# --------------------------------------------------------------------------- compile, XBM


@pytest.mark.parametrize("loss", NAMES)
def test_torch_compile_matches_eager(loss):
    c = _case(loss, SMALL, device=DEVICE.type)

    def step(x, r):
        return LOSSES[loss][0](x, c["y"], r, c["z"], ref_valid=c["ref_valid"], backend="triton")

    # aot_eager traces through the fakes without inductor's C++ build
    compiled_step = torch.compile(step, backend="inductor" if GPU else "aot_eager", fullgraph=True)
    outs = []
    for fn in (step, compiled_step):
        x = c["x"].clone().requires_grad_()
        r = c["r"].clone().requires_grad_()
        out = fn(x, r)
        out.backward()
        outs.append((out.detach(), x.grad, r.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("loss", NAMES)
def test_xbm_loss_on_triton_matches_reference(loss):
    crits = {b: xk.XBMLoss(memory_size=40, embedding_dim=24, loss=loss, backend=b).to(DEVICE)
             for b in ("triton", "reference")}
    for step in range(3):
        x0, y, _, _ = make_case(12, 1, 24, 4, seed=200 + step, noise=0.3)
        out = {}
        for b, crit in crits.items():
            x = x0.to(DEVICE).requires_grad_()
            val = crit(x, y.to(DEVICE))
            val.backward()
            out[b] = (val.detach(), x.grad)
        assert_rel(out["triton"][0], out["reference"][0], 1e-5, f"step {step} loss", floor=1.0)
        assert_rel(out["triton"][1], out["reference"][1], 1e-5, f"step {step} grad", floor=1.0)


# --------------------------------------------------------------------------- GPU sizes

# name: (loss, B, N, D, classes, ref_valid, random self_index)
GPU_CASES = {
    "ms-B3-huge-K": ("multi_similarity", 3, 100_000, 64, 50, None, True),
    "ms-B256-D256-partial": ("multi_similarity", 256, 20_000, 256, 100, 19_000, True),
    "triplet-B3-huge-K": ("triplet", 3, 100_000, 64, 50, None, True),
    "triplet-B512-D128": ("triplet", 512, 20_000, 128, 100, None, True),
    "supcon-B3-huge-K": ("supcon", 3, 100_000, 64, 50, None, True),
    "supcon-B200-D512-partial": ("supcon", 200, 8_000, 512, 60, 7_999, False),
}


def _robust_dense(loss, x, y, r, z, n, si, gap=1e-4, tie_gap=2e-6):
    """tests/test_losses.py's _robust, vectorised for large memories. Smaller gaps: with
    thousands of pairs per row, 2e-5 near-ties are certain; fp32 errors of S are ~1e-7
    here (IEEE fp32 dots; the reference rounds a float64 S to fp32)."""
    S = x.double() @ r[:n].double().T
    valid = torch.ones_like(S, dtype=torch.bool)
    if si is not None:
        valid &= torch.arange(n, device=S.device)[None, :] != si[:, None]
    same = y[:, None] == z[None, :n]
    pos, neg = valid & same & (S < 1 - 1e-5), valid & ~same
    has = pos.any(1) & neg.any(1)
    inf = torch.tensor(float("inf"), dtype=S.dtype, device=S.device)
    if loss == "multi_similarity":
        max_neg = torch.where(neg, S, -inf).max(1).values[:, None]
        min_pos = torch.where(pos, S, inf).min(1).values[:, None]
        near = (pos & ((S - 0.1 - max_neg).abs() < tie_gap)) | (neg & ((S + 0.1 - min_pos).abs() < tie_gap))
        return not bool((near & has[:, None]).any())
    if loss == "triplet":
        ps = torch.where(pos, S, inf).topk(2, dim=1, largest=False).values
        ns = torch.where(neg, S, -inf).topk(2, dim=1).values
        ties = (ps[:, 1] - ps[:, 0] < tie_gap) | (ns[:, 0] - ns[:, 1] < tie_gap)
        return not bool((has & (ties | ((ns[:, 0] - ps[:, 0] + 0.1).abs() < gap))).any())
    return True


@functools.lru_cache(maxsize=None)
def _gpu_case(name):
    loss, B, N, D, classes, ref_valid, rand_self = GPU_CASES[name]
    n = N if ref_valid is None else ref_valid
    for attempt in range(20):
        x, y, r, z = make_case(B, N, D, classes, seed=1000 + attempt, thresholds=(1 - 1e-5,), ref_valid=ref_valid,
                               noise=1.0)
        si = torch.randint(-1, n, (B,), generator=torch.Generator().manual_seed(attempt)) if rand_self else None
        c = dict(x=x.to(DEVICE), y=y.to(DEVICE), r=r.to(DEVICE), z=z.to(DEVICE), ref_valid=ref_valid,
                 self_index=None if si is None else si.to(DEVICE))
        if _robust_dense(loss, c["x"], c["y"], c["r"], c["z"], n, c["self_index"]):
            return loss, c
    raise RuntimeError(f"no robust draw for {name}")


def _expected_dense(loss, c, weights, x=None, r=None):
    """(rows, grad_x, grad_ref, counts) of sum_i w_i l_i from the reference backend in
    float64 (a Python loop over millions of pairs would take minutes)."""
    xd = (c["x"] if x is None else x).detach().double().requires_grad_()
    rd = (c["r"] if r is None else r).detach().double().requires_grad_()
    n = rd.shape[0] if c["ref_valid"] is None else c["ref_valid"]
    spec = xk.losses.LOSSES[loss]
    rows, counts = spec.reference(xd, c["y"], rd, c["z"], ref_valid=n, self_index=c["self_index"],
                                  **dict(zip(spec.defaults, spec.values({}))))
    (rows * weights.to(rows)).sum().backward()
    return rows.detach().cpu(), xd.grad.cpu(), rd.grad.cpu(), counts.long().cpu()


@pytest.mark.skipif(not GPU, reason="GPU sizes; the interpreter runs the small tables above")
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_sizes_match_float64(name):
    loss, c = _gpu_case(name)
    B = c["x"].shape[0]
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64, device=DEVICE)
    x = c["x"].clone().requires_grad_()
    rows, counts = xk.losses.compute(loss, x, c["y"], c["r"], c["z"], ref_valid=c["ref_valid"],
                                     self_index=c["self_index"], reduction="none", backend="triton")
    rows.backward(w.to(rows))
    e_rows, e_grad, e_gref, e_counts = _expected_dense(loss, c, w)
    assert e_counts[:, 0].sum() > 0
    assert_rel(rows, e_rows, 1e-5, "rows")
    assert_rel(x.grad, e_grad, 1e-5, "grad", floor=1.0)
    assert torch.equal(counts.cpu().long(), e_counts)
    gx, gr = getattr(OPS, f"{loss}_bwd")(*_op_args(loss, c), w.float(), False)
    assert_rel(gx, e_grad, 1e-5, "bwd grad_x", floor=1.0)
    assert_rel(gr, e_gref, 1e-5, "bwd grad_ref", floor=1.0)


@pytest.mark.skipif(not GPU, reason="the interpreter ignores input_precision (numpy fp32 matmul)")
@pytest.mark.parametrize("loss", NAMES)
def test_tf32_when_allowed(loss):
    """TF32 moves S by ~3e-5 at D >= 128: losses stay within 2e-3. Gradients too, except
    triplet's, where a hardest pair within that distance of the next may switch rows."""
    _, c = _gpu_case({"multi_similarity": "ms-B256-D256-partial", "triplet": "triplet-B512-D128",
                      "supcon": "supcon-B200-D512-partial"}[loss])
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        x = c["x"].clone().requires_grad_()
        out = _run(loss, c, "sum", x=x)
        out.backward()
    finally:
        torch.set_float32_matmul_precision(prev)
    rows, grad, _, _ = _expected_dense(loss, c, torch.ones(c["x"].shape[0], dtype=torch.float64, device=DEVICE))
    assert_rel(out, rows.sum(), 2e-3, "loss (tf32)")
    if loss != "triplet":
        assert_rel(x.grad, grad, 2e-3, "grad (tf32)", floor=1.0)
