"""Dtypes (CONTRACT.md section 5): 16-bit inputs, fp32 anchors against a 16-bit memory, and
TF32, on every backend (the reference one included), against the float64 oracle evaluated on
the inputs as they are (16-bit values upcast exactly), with the bounds of compare.py:

- S is accumulated in fp32 from exact products of the 16-bit values, so the active-pair counts
  equal the oracle's (the data keep away from every threshold) and the loss rows, returned in
  fp32, are within FP32;
- a gradient returned in a 16-bit dtype is within one rounding to that dtype of the oracle
  (grad_bound); fp32 results (the anchors' gradient against a 16-bit memory) within FP32.

These bounds do not depend on another backend's error."""
import pytest
import torch

import xbm_kernels as xk

import cases
from compare import FP32, TF32, assert_close, assert_equal_counts, grad_bound


def _check(loss, backend, device, x_dtype, r_dtype):
    case, variant = cases.PARTIAL, "defaults"
    params = cases.variants(loss)[variant]
    d = cases.draw(case, loss, variant, x_dtype, r_dtype).to(device)
    rows_e, gx_e, gr_e, counts_e = cases.expected(case, loss, variant, x_dtype, r_dtype)
    w = cases.weights(d.x.shape[0])
    kw = dict(ref_valid=d.ref_valid, self_index=d.self_index, reduction="none", backend=backend, **params)

    x = d.x.clone().requires_grad_()
    rows, counts = xk.losses.compute(loss, x, d.y, d.r, d.z, **kw)
    assert rows.dtype == torch.float32
    assert_equal_counts(counts, counts_e)
    assert_close(rows, rows_e, FP32, "rows")
    rows.backward(w.to(rows))
    assert x.grad.dtype == x_dtype
    assert_close(x.grad, gx_e, grad_bound(x_dtype), "grad_x (fused)")

    x, r = d.x.clone().requires_grad_(), d.r.clone().requires_grad_()
    xk.losses.compute(loss, x, d.y, r, d.z, **kw)[0].backward(w.to(rows))
    assert x.grad.dtype == x_dtype and r.grad.dtype == r_dtype
    assert_close(x.grad, gx_e, grad_bound(x_dtype), "grad_x (both sides)")
    assert_close(r.grad, gr_e, grad_bound(r_dtype), "grad_ref")


def test_16_bit_inputs(loss, backend, device, dtype):
    _check(loss, backend, device, dtype, dtype)


def test_fp32_anchors_with_a_16_bit_memory(loss, backend, device, dtype):
    """XBMLoss(memory_dtype=...): fp32 anchors against a 16-bit memory. S is the fp32 product
    (the kernels feed the anchors to 16-bit products as limbs, not rounded)."""
    _check(loss, backend, device, torch.float32, dtype)


@pytest.mark.kernels
@pytest.mark.cuda_tensors
def test_tf32_when_allowed(loss, backend, device):
    """float32 matmul precision "high": TF32 products move S by ~1e-4 relative at these D, so
    the loss and the anchors' gradient stay within TF32 of the oracle; triplet's gradient is not
    compared (a hardest pair within that distance of the next may switch columns)."""
    case = "B512-D256"
    params = cases.variants(loss)["defaults"]
    d = cases.draw(case, loss, "defaults").to(device)
    rows_e, gx_e, _, _ = cases.expected(case, loss, "defaults", weighted=False)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        x = d.x.clone().requires_grad_()
        out = xk.losses.compute(loss, x, d.y, d.r, d.z, ref_valid=d.ref_valid, self_index=d.self_index,
                                reduction="sum", backend=backend, **params)[0]
        out.backward()
    finally:
        torch.set_float32_matmul_precision(prev)
    assert_close(out, rows_e.sum(), TF32, "loss (tf32)")
    if loss != "triplet":
        assert_close(x.grad, gx_e, TF32, "grad_x (tf32)")
