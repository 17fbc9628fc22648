"""Multi-similarity, triplet and supcon on every backend against the float64 loop oracle
(CONTRACT.md section 1). Data is redrawn until no pair sits near a decision boundary of the
loss (thresholds, mining boundaries, hardest-pair near-ties, the hinge)."""
import functools
import zlib

import pytest
import torch

import xbm_kernels as xk
from common import CASES as ALL_CASES, LOSS_CASES, assert_rel, make_case, max_rel_err as _max_rel_err
from oracle import (_sets, contrastive_l2_oracle, multi_similarity_oracle, ntxent_oracle, reduce_rows, supcon_oracle,
                    triplet_oracle)
from test_contrastive import BACKENDS, BACKEND_IDS

# One row per loss of the registry (contrastive has its own file): the public function and its oracle.
LOSSES = {
    "multi_similarity": (xk.multi_similarity_loss, multi_similarity_oracle, {}),
    "triplet": (xk.triplet_loss, triplet_oracle, {}),
    "supcon": (xk.supcon_loss, supcon_oracle, {}),
    "ntxent": (xk.ntxent_loss, ntxent_oracle, {}),
    "contrastive_l2": (xk.contrastive_l2_loss, contrastive_l2_oracle, {}),
}


def _with_kernels(backends, losses):
    """(backend, device, loss) for every loss the registry gives a kernel on that backend."""
    out = [pytest.param(b, d, l, id=f"{b}-{d}-{l}") for (b, d) in backends for l in losses
           if b == "reference" or b in xk.LOSSES[l].kernels]
    return out


BACKEND_LOSSES = _with_kernels(BACKENDS, LOSSES)
KERNEL_LOSSES = _with_kernels([bd for bd in BACKENDS if bd[0] != "reference"], LOSSES)

CASES = LOSS_CASES  # rows of common.CASES


def _robust(loss, x, y, r, z, ref_valid, self_index, gap=1e-3, tie_gap=2e-5):
    """True when no decision of `loss` is within `gap` of flipping. Data-dependent
    boundaries (the mining rule against the hardest pair, hardest-pair near-ties) use
    `tie_gap`, far above fp32 rounding of S (~1e-7) yet drawable with thousands of pairs
    per row; exact ties have their own test."""
    for i, s, P, N in _sets(x, y, r, z, 1e-5, ref_valid, self_index):
        if loss == "multi_similarity" and P and N:
            max_neg, min_pos = max(s[j] for j in N), min(s[j] for j in P)
            if any(abs(s[j] - 0.1 - max_neg) < tie_gap for j in P) or any(abs(s[j] + 0.1 - min_pos) < tie_gap for j in N):
                return False
        if loss == "contrastive_l2" and any(abs(s[j] - 0.5) < gap for j in N):  # d = 1 = neg_margin at S = 0.5
            return False
        if loss == "triplet" and P and N:
            ps, ns = sorted(s[j] for j in P), sorted((s[j] for j in N), reverse=True)
            if (len(ps) > 1 and ps[1] - ps[0] < tie_gap) or (len(ns) > 1 and ns[0] - ns[1] < tie_gap):
                return False
            if abs(ns[0] - ps[0] + 0.1) < gap:
                return False
    return True


@functools.lru_cache(maxsize=None)
def _case(loss, name, dtype=torch.float32, device="cpu"):
    B, N, D, classes, ref_valid, self_mode, _, noise = ALL_CASES[name]
    rand_self = self_mode == "random"
    seed = zlib.crc32(f"{loss}-{name}".encode())
    for attempt in range(60):
        # noise 1: positives spread over ~[0.2, 0.8] and overlap the negatives, so mining,
        # hardest pairs and the softmax all have work to do
        x, y, r, z = make_case(B, N, D, classes, seed=seed + attempt, thresholds=(1 - 1e-5,), dtype=dtype,
                               ref_valid=ref_valid, noise=max(noise, 1.0))
        n = N if ref_valid is None else ref_valid
        si = torch.randint(-1, n, (B,), generator=torch.Generator().manual_seed(attempt)) if rand_self else None
        if _robust(loss, x, y, r, z, ref_valid, si):
            dev = torch.device(device)
            return dict(x=x.to(dev), y=y.to(dev), r=r.to(dev), z=z.to(dev), ref_valid=ref_valid,
                        self_index=None if si is None else si.to(dev))
    raise RuntimeError(f"no robust draw for {loss}/{name}")


def _run(loss, c, backend, reduction, x=None, r=None):
    fn = LOSSES[loss][0]
    return fn(c["x"] if x is None else x, c["y"], c["r"] if r is None else r, c["z"], ref_valid=c["ref_valid"],
              self_index=c["self_index"], reduction=reduction, backend=backend)


def _oracle(loss, c, weights=None):
    return LOSSES[loss][1](c["x"], c["y"], c["r"], c["z"], ref_valid=c["ref_valid"], self_index=c["self_index"],
                           weights=weights)


@functools.lru_cache(maxsize=None)
def _oracle_cached(loss, name, weighted):
    c = _case(loss, name)
    B = c["x"].shape[0]
    return _oracle(loss, c, torch.linspace(0.5, 1.5, B, dtype=torch.float64) if weighted else None)


def _denominator(loss, counts, B):
    """What "mean" divides by: the registry's rule."""
    rule = xk.LOSSES[loss].mean_over
    if rule == "anchors_with_positives":
        return max(int((counts[:, 0] > 0).sum()), 1)
    if rule == "positive_pairs":
        return max(int(counts[:, 0].sum()), 1)
    return B


@pytest.mark.parametrize("backend,device,loss", BACKEND_LOSSES)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_grad_and_counts_match_oracle(backend, device, name, loss, reduction):
    c = _case(loss, name, device=device)
    B = c["x"].shape[0]
    x = c["x"].clone().requires_grad_()
    out, counts = xk.losses.compute(loss, x, c["y"], c["r"], c["z"], ref_valid=c["ref_valid"],
                                    self_index=c["self_index"], reduction=reduction, backend=backend)
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64) if reduction == "none" else None
    rows, grad, _, exp_counts = _oracle_cached(loss, name, weights is not None)
    denom = _denominator(loss, exp_counts, B)
    assert out.dtype == torch.float32
    unit = 1.0 / denom if reduction == "mean" else 1.0  # one unit-norm row's contribution
    assert_rel(out, reduce_rows(rows, reduction, denom), 1e-5, f"{loss} loss", floor=unit)
    assert torch.equal(counts.cpu().long(), exp_counts), (counts, exp_counts)
    out.backward(weights.to(out) if weights is not None else None)
    assert_rel(x.grad, grad / denom if reduction == "mean" else grad, 1e-5, f"{loss} grad", floor=unit)


def test_cases_exercise_the_losses():
    """Every loss has active rows and inactive rows somewhere in the table."""
    for loss in LOSSES:
        active = inactive = 0
        for name in CASES:
            counts = _oracle_cached(loss, name, False)[3]
            active += int((counts[:, 0] > 0).sum())
            inactive += int((counts[:, 0] == 0).sum())
        assert active > 20 and inactive > 5, (loss, active, inactive)


@pytest.mark.parametrize("backend,device,loss", BACKEND_LOSSES)
def test_reference_side_gradient(backend, device, loss):
    c = _case(loss, "B33-D130-partial", device=device)
    x = c["x"].clone().requires_grad_()
    r = c["r"].clone().requires_grad_()
    _run(loss, c, backend, "sum", x=x, r=r).backward()
    _, grad, grad_ref, _ = _oracle(loss, c)
    assert_rel(x.grad, grad, 1e-5, "grad_x", floor=1.0)
    assert_rel(r.grad, grad_ref, 1e-5, "grad_ref", floor=1.0)


@pytest.mark.parametrize("backend,device,loss", BACKEND_LOSSES)
def test_in_batch_loss_gradient_through_both_sides(backend, device, loss):
    idx = torch.arange(25)
    for seed in range(11, 200):  # noisy classes so that every loss has active rows
        x0, y, _, _ = make_case(25, 1, 48, 5, seed=seed, noise=2.0)
        _, grad, grad_ref, counts = LOSSES[loss][1](x0, y, x0, y, self_index=idx)
        if _robust(loss, x0, y, x0, y, None, idx) and int((counts[:, 0] > 0).sum()) >= 5:
            break
    assert int((counts[:, 0] > 0).sum()) >= 5, counts
    x0, y, idx = x0.to(device), y.to(device), idx.to(device)
    x = x0.clone().requires_grad_()
    LOSSES[loss][0](x, y, x, y, self_index=idx, reduction="sum", backend=backend).backward()
    assert_rel(x.grad, grad + grad_ref, 1e-5, "grad (both sides)", floor=1.0)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("k", [12, 13], ids=["copies-same-lane", "copies-other-lanes"])
def test_triplet_ties_pick_the_lowest_column(backend, device, k):
    """Exact duplicates in the reference tie in any precision: the lowest column wins.
    With k = 13 the copies of a column fall in different lanes of the CPU's 4-lane scan."""
    x, y, r, z = make_case(6, k, 16, 3, seed=4)
    r = torch.cat([r, r, r])          # every column appears three times
    z = torch.cat([z, z, z])
    rr = r.clone().requires_grad_()
    xx = x.clone().requires_grad_()
    xk.triplet_loss(xx.to(device), y.to(device), rr.to(device), z.to(device), margin=2.0, reduction="sum",
                    backend=backend).backward()
    _, grad, grad_ref, _ = triplet_oracle(x, y, r, z, margin=2.0)
    assert_rel(rr.grad, grad_ref, 1e-6, "grad_ref")
    assert float(rr.grad[k:].abs().max()) == 0.0  # the copies at higher columns never win


@pytest.mark.parametrize("backend,device,loss", KERNEL_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_within_twice_reference_error(backend, device, loss, dtype):
    c = _case(loss, "B33-D130-partial", dtype=dtype, device=device)
    rows, grad, _, _ = _oracle(loss, c)
    errs = {}
    for b in ("reference", backend):
        x = c["x"].clone().requires_grad_()
        out = _run(loss, c, b, "sum", x=x)
        out.backward()
        errs[b] = (_max_rel_err(out, rows.sum()), _max_rel_err(x.grad.float(), grad))
    floor = 1e-5
    assert errs[backend][0] <= max(2 * errs["reference"][0], floor), errs
    assert errs[backend][1] <= max(2 * errs["reference"][1], floor), errs


@pytest.mark.parametrize("backend,device,loss", BACKEND_LOSSES)
def test_bitwise_deterministic(backend, device, loss):
    c = _case(loss, "B33-D96-multi-tile", device=device)
    outs = []
    for _ in range(2):
        x = c["x"].clone().requires_grad_()
        out = _run(loss, c, backend, "mean", x=x)
        out.backward()
        outs.append((out.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("loss", list(LOSSES))
def test_xbm_loss_accepts_every_loss(loss):
    crit = xk.XBMLoss(64, 16, loss=loss)
    x, y, _, _ = make_case(12, 1, 16, 3, seed=2)
    for _ in range(3):
        xx = x.clone().requires_grad_()
        out = crit(xx, y)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(xx.grad).all()
    assert len(crit.memory) == 36


@pytest.mark.parametrize("loss,kwargs,msg", [
    ("multi_similarity", dict(alpha=0.0), "alpha"),
    ("multi_similarity", dict(beta=float("inf")), "beta"),
    ("supcon", dict(temperature=-1.0), "temperature"),
    ("triplet", dict(margin=float("nan")), "margin"),
    ("triplet", dict(margin=-0.5), "margin"),
    ("contrastive", dict(margin=2.0), r"margin: expected a value in \(-1, 1\)"),
    ("contrastive", dict(margin=-1.0), "margin"),
    ("supcon", dict(pos_eps=1.5), "pos_eps"),
    ("multi_similarity", dict(base=3.0), "base"),
])
def test_bad_loss_parameters(loss, kwargs, msg):
    """Values outside the range where a parameter means something (registry.py) are refused
    by the functional loss and by XBMLoss, naming the parameter."""
    c = _case("triplet", "B7-D96-small-K")
    fn = getattr(xk, f"{loss}_loss")
    with pytest.raises(ValueError, match=msg):
        fn(c["x"], c["y"], c["r"], c["z"], **kwargs)
    with pytest.raises(ValueError, match=msg):
        xk.XBMLoss(10, 96, loss=loss, **kwargs)


def test_bool_parameter_must_be_bool():
    c = _case("multi_similarity", "B7-D96-small-K")
    with pytest.raises(TypeError, match="mine: expected a bool"):
        xk.multi_similarity_loss(c["x"], c["y"], c["r"], c["z"], mine=1)


@pytest.mark.parametrize("backend,device", [bd for bd in BACKENDS if bd[0] != "reference"],
                         ids=[i for i in BACKEND_IDS if not i.startswith("reference")])
@pytest.mark.parametrize("loss", ["contrastive"] + list(LOSSES))
def test_double_backward_is_refused_by_kernels(backend, device, loss):
    """The fused kernels give first derivatives only: a gradient penalty through them raises
    (it used to add nothing, silently); the reference backend computes it."""
    c = _case(loss if loss in LOSSES else "supcon", "B7-D96-small-K", device=device)
    fn = getattr(xk, f"{loss}_loss")
    penalties = {}
    for b in ("reference", backend):
        x = c["x"].clone().requires_grad_()
        out = fn(x, c["y"], c["r"], c["z"], backend=b)
        (g,) = torch.autograd.grad(out, x, create_graph=True)
        total = out + g.pow(2).sum()
        if b == "reference":
            total.backward()
            penalties[b] = x.grad
        else:
            with pytest.raises(RuntimeError, match="first derivatives only"):
                total.backward()
    if loss in ("supcon", "multi_similarity"):  # contrastive and triplet are linear in S: no curvature
        assert float(penalties["reference"].abs().max()) > 0
