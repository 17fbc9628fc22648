"""The contrastive loss on every backend against the float64 loop oracle (CONTRACT.md
sections 1 and 6). One test function per property, tables of cases."""
import zlib

import pytest
import torch

import xbm_kernels as xk
from common import CASES, CPU_CASES, assert_rel, make_case, max_rel_err as _max_rel_err
from oracle import contrastive_oracle, reduce_rows

# (backend, device) pairs to run here. Triton on CPU tensors runs in its own process
# (tests/test_triton.py under TRITON_INTERPRET=1); on a GPU every backend runs for real.
BACKENDS = [("reference", "cpu"), ("cpu", "cpu")]
if torch.cuda.is_available():
    BACKENDS += [(b, "cuda") for b in ("reference", "triton", "cuda") if b in xk.available_backends()]
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]

REDUCTIONS = ["mean", "sum", "none"]


def _case(name, dtype=torch.float32, device="cpu"):
    B, N, D, classes, ref_valid, self_mode, margin, noise = CASES[name]
    x, y, r, z = make_case(B, N, D, classes, seed=zlib.crc32(name.encode()), thresholds=(margin, 1 - 1e-5),
                           dtype=dtype, ref_valid=ref_valid, noise=noise)
    self_index = None
    if self_mode == "random":
        gen = torch.Generator().manual_seed(1)
        n = N if ref_valid is None else ref_valid
        self_index = torch.randint(-1, n, (B,), generator=gen)
    dev = torch.device(device)
    to = lambda t: None if t is None else t.to(dev)
    return dict(x=to(x), y=to(y), r=to(r), z=to(z), ref_valid=ref_valid, self_index=to(self_index), margin=margin)


def _loss(c, backend, reduction, x=None, r=None):
    return xk.contrastive_loss(c["x"] if x is None else x, c["y"], c["r"] if r is None else r, c["z"],
                               margin=c["margin"], ref_valid=c["ref_valid"], self_index=c["self_index"],
                               reduction=reduction, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", CPU_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_and_grad_match_oracle(backend, device, case, reduction):
    c = _case(case, device=device)
    B = c["x"].shape[0]
    x = c["x"].clone().requires_grad_()
    loss = _loss(c, backend, reduction, x=x)
    assert loss.dtype == torch.float32
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64) if reduction == "none" else None
    rows, grad, _, counts = contrastive_oracle(c["x"], c["y"], c["r"], c["z"], c["margin"], 1e-5, c["ref_valid"],
                                               c["self_index"], weights=weights)
    assert_rel(loss, reduce_rows(rows, reduction), 1e-5, "loss")
    if reduction == "none":
        loss.backward(weights.to(loss))
    else:
        loss.backward()
    expected_grad = grad / B if reduction == "mean" else grad
    assert_rel(x.grad, expected_grad, 1e-5, "grad")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", CPU_CASES)
def test_pair_counts_match_oracle(backend, device, case):
    c = _case(case, device=device)
    _, counts = xk.losses.compute("contrastive", c["x"], c["y"], c["r"], c["z"], margin=c["margin"],
                                  ref_valid=c["ref_valid"], self_index=c["self_index"], backend=backend)
    expected = contrastive_oracle(c["x"], c["y"], c["r"], c["z"], c["margin"], 1e-5, c["ref_valid"],
                                  c["self_index"])[3]
    assert torch.equal(counts.cpu().long(), expected), (counts, expected)


def test_cases_exercise_every_set():
    """The table must contain positives, active negatives and rows without positives."""
    totals = torch.zeros(2, dtype=torch.int64)
    empty_rows = 0
    for name in CPU_CASES:
        c = _case(name)
        counts = contrastive_oracle(c["x"], c["y"], c["r"], c["z"], c["margin"], 1e-5, c["ref_valid"],
                                    c["self_index"])[3]
        totals += counts.sum(0)
        empty_rows += int((counts[:, 0] == 0).sum())
    assert totals[0] > 100 and totals[1] > 100 and empty_rows > 5, (totals, empty_rows)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_in_batch_gradient_flows_to_both_sides(backend, device, reduction):
    """The in-batch loss (reference = the batch itself, self excluded by index) equals
    autograd through the dense formula: x gets the anchor and the reference gradient."""
    x0, y, _, _ = make_case(29, 1, 64, 6, seed=5)
    from oracle import min_threshold_distance
    assert min_threshold_distance(x0, x0, (0.1, 1 - 1e-5), self_index=torch.arange(29)) > 1e-3
    x0, y = x0.to(device), y.to(device)
    x = x0.clone().requires_grad_()
    idx = torch.arange(29, device=device)
    loss = xk.contrastive_loss(x, y, x, y, margin=0.1, self_index=idx, reduction=reduction, backend=backend)
    weights = torch.linspace(0.5, 1.5, 29, dtype=torch.float64) if reduction == "none" else None
    rows, grad, grad_ref, _ = contrastive_oracle(x0, y, x0, y, 0.1, 1e-5, None, idx, weights=weights)
    assert_rel(loss, reduce_rows(rows, reduction), 1e-5, "loss")
    loss.backward(weights.to(loss) if weights is not None else None)
    total = grad + grad_ref
    assert_rel(x.grad, total / 29 if reduction == "mean" else total, 1e-5, "grad (both sides)")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_separate_reference_gradient(backend, device):
    c = _case("B33-D130-partial", device=device)
    x = c["x"].clone().requires_grad_()
    r = c["r"].clone().requires_grad_()
    _loss(c, backend, "sum", x=x, r=r).backward()
    _, grad, grad_ref, _ = contrastive_oracle(c["x"], c["y"], c["r"], c["z"], c["margin"], 1e-5, c["ref_valid"])
    assert_rel(x.grad, grad, 1e-5, "grad_x")
    assert_rel(r.grad, grad_ref, 1e-5, "grad_ref")
    assert float(r.grad[c["ref_valid"]:].abs().max()) == 0.0


def _low_precision_err(backend, device, dtype, case):
    c = _case(case, dtype=dtype, device=device)
    x = c["x"].clone().requires_grad_()
    loss = _loss(c, backend, "sum", x=x)
    loss.backward()
    rows, grad, _, _ = contrastive_oracle(c["x"], c["y"], c["r"], c["z"], c["margin"], 1e-5, c["ref_valid"],
                                          c["self_index"])
    assert x.grad.dtype == dtype
    return _max_rel_err(loss, rows.sum()), _max_rel_err(x.grad.float(), grad)


@pytest.mark.parametrize("backend,device", [bd for bd in BACKENDS if bd[0] != "reference"],
                         ids=[i for i in BACKEND_IDS if not i.startswith("reference")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["B33-D130-partial", "B33-D96-multi-tile"])
def test_low_precision_within_twice_reference_error(backend, device, dtype, case):
    ref_loss_err, ref_grad_err = _low_precision_err("reference", device, dtype, case)
    loss_err, grad_err = _low_precision_err(backend, device, dtype, case)
    floor = 1e-5  # fp32 accumulation can be exact where the reference happens to be too
    assert loss_err <= max(2 * ref_loss_err, floor), (loss_err, ref_loss_err)
    assert grad_err <= max(2 * ref_grad_err, floor), (grad_err, ref_grad_err)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_mixed_dtypes_fp32_anchors_bf16_memory(backend, device):
    c = _case("B33-D96-multi-tile", device=device)
    r16 = c["r"].to(torch.bfloat16)
    x = c["x"].clone().requires_grad_()
    loss = _loss(c, backend, "sum", x=x, r=r16)
    loss.backward()
    rows, grad, _, _ = contrastive_oracle(c["x"], c["y"], r16, c["z"], c["margin"], 1e-5, None, c["self_index"])
    assert x.grad.dtype == torch.float32
    assert_rel(loss, rows.sum(), 1e-2, "loss")  # x may be rounded to bf16 for tensor cores
    assert_rel(x.grad, grad, 1e-2, "grad")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_repeated_runs_are_bitwise_identical(backend, device):
    c = _case("B33-D96-multi-tile", device=device)
    outs = []
    for _ in range(3):
        x = c["x"].clone().requires_grad_()
        loss = _loss(c, backend, "mean", x=x)
        loss.backward()
        outs.append((loss.detach(), x.grad))
    for loss, grad in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(grad, outs[0][1])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_empty_valid_prefix_gives_zero(backend, device):
    c = _case("B7-D96-small-K", device=device)
    x = c["x"].clone().requires_grad_()
    loss = xk.contrastive_loss(x, c["y"], c["r"], c["z"], ref_valid=0, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(x.grad.abs().max()) == 0.0
