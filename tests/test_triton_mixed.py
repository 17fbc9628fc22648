"""fp32 anchors against a 16-bit memory on the Triton backend (XBMLoss(memory_dtype=...)):
every loss, loss rows and gradients, against the float64 oracle on the same inputs (the
fp16-rounded memory upcast to float64, the anchors as they are), within twice the error
of the reference backend, which computes S in the promoted dtype (fp32), so its error is
fp32 arithmetic only. Rounding the anchors to the memory's dtype before the product costs
100-500x that; the kernels split them into a high and a low 16-bit part instead.

fp16 only: the interpreter's bf16 tl.dot is unreliable, and it is the memory dtype whose
low part needs care (subnormals). Runs in the Triton process of tests/run.sh:

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_mixed.py"""
import functools

import pytest
import torch

from triton_env import DEVICE, GPU, INTERPRET, PYTESTMARK  # noqa: E402,F401  (skips when Triton cannot run)

import xbm_kernels as xk  # noqa: E402

from common import LOW_PRECISION_FACTOR, make_case, max_rel_err  # noqa: E402
from oracle import (contrastive_oracle, min_threshold_distance, multi_similarity_oracle,  # noqa: E402
                    supcon_oracle, triplet_oracle)
from test_losses import _robust  # noqa: E402

pytestmark = PYTESTMARK

MEM_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])

# name: (public function, oracle); both with the loss's default parameters
LOSSES = {
    "contrastive": (xk.contrastive_loss, contrastive_oracle),
    "multi_similarity": (xk.multi_similarity_loss, multi_similarity_oracle),
    "triplet": (xk.triplet_loss, triplet_oracle),
    "supcon": (xk.supcon_loss, supcon_oracle),
}
# B anchors, N memory rows of which REF_VALID are filled, dim D: under the interpreter's
# one config (16 x 32 tiles, 4 target programs) the memory is cut into 4 splits.
B, N, REF_VALID, D, CLASSES = 16, 200, 180, 64, 8
# Errors are relative to the largest expected entry; FLOOR (about two fp32 ulps of it) is
# the bound where the reference backend happens to be exact.
FLOOR = 2.5e-7


@functools.lru_cache(maxsize=None)
def _case(loss, mem_dtype):
    """(x fp32, y, r in mem_dtype, z, self_index): no decision of the loss within 1e-3 of a
    threshold (the contrastive margin, 1 - pos_eps) or 2e-5 of a mining boundary or a
    hardest-pair tie, judged on the rounded memory."""
    thresholds = (0.5, 1 - 1e-5) if loss == "contrastive" else (1 - 1e-5,)
    for attempt in range(60):
        # noise 1: positives spread over ~[0.2, 0.8] and overlap the negatives
        x, y, r, z = make_case(B, N, D, CLASSES, seed=7100 + attempt, thresholds=thresholds, noise=1.0,
                               ref_valid=REF_VALID)
        r = r.to(mem_dtype)
        si = torch.randint(-1, REF_VALID, (B,), generator=torch.Generator().manual_seed(attempt))
        rd = r.double()
        if (min_threshold_distance(x, rd, thresholds, REF_VALID, si) > 1e-3
                and _robust(loss, x.double(), y, rd, z, REF_VALID, si)):
            return x, y, r, z, si
    raise RuntimeError(f"no robust draw for {loss}")


@functools.lru_cache(maxsize=None)
def _expected(loss, mem_dtype):
    x, y, r, z, si = _case(loss, mem_dtype)
    w = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    return LOSSES[loss][1](x.double(), y, r.double(), z, ref_valid=REF_VALID, self_index=si, weights=w), w


def _errors(loss, mem_dtype, backend):
    """Max relative errors of (loss rows, memory-loss gradient, both sides: grad x, grad r)
    of sum_i w_i l_i."""
    x, y, r, z, si = (t.to(DEVICE) for t in _case(loss, mem_dtype))
    (rows, grad, grad_ref, counts), w = _expected(loss, mem_dtype)
    fn = LOSSES[loss][0]
    kw = dict(ref_valid=REF_VALID, self_index=si, reduction="none", backend=backend)
    xm = x.clone().requires_grad_()
    out = fn(xm, y, r, z, **kw)
    out.backward(w.to(out))
    xb, rb = x.clone().requires_grad_(), r.clone().requires_grad_()
    fn(xb, y, rb, z, **kw).backward(w.to(out))
    assert out.dtype == xm.grad.dtype == xb.grad.dtype == torch.float32 and rb.grad.dtype == mem_dtype
    return {"rows": max_rel_err(out, rows), "grad": max_rel_err(xm.grad, grad),
            "grad_x both": max_rel_err(xb.grad, grad), "grad_ref": max_rel_err(rb.grad.float(), grad_ref)}


@pytest.mark.parametrize("mem_dtype", MEM_DTYPES)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_fp32_anchors_with_a_16_bit_memory_within_twice_reference_error(loss, mem_dtype):
    counts = _expected(loss, mem_dtype)[0][3]
    assert (counts[:, 0] > 0).sum() >= B // 2, counts  # most rows take part
    mine = _errors(loss, mem_dtype, "triton")
    ref = _errors(loss, mem_dtype, "reference")
    for what in mine:
        assert mine[what] <= max(LOW_PRECISION_FACTOR * ref[what], FLOOR), (what, mine, ref)
