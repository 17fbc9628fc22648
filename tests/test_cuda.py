"""The `cuda` backend (csrc/cuda) on CUDA tensors against the float64 loop oracle
(CONTRACT.md sections 1 and 6). Skipped without a GPU and the compiled CUDA kernels.

The shapes are chosen for the kernel's tiling (64 anchors x 64 reference rows per tile,
D in chunks of 128 bytes, dX slices of 128 / 512 columns): K below one tile, partial row
and column tiles, several row tiles, D that is not a multiple of a chunk and rows that are
not 16-byte aligned (element loads instead of cp.async), D large enough for several dX
slices, memory split across CTAs, self_index, partly filled memories and wrap-around.
"""
import functools
import math
import zlib

import pytest
import torch

import xbm_kernels as xk
from common import CASES as ALL_CASES, CUDA_CASES, class_centres, make_case, rows_around
from common import assert_rel as _assert_rel, max_rel_err
from oracle import contrastive_oracle, min_threshold_distance, reduce_rows

HAS_CUDA_BACKEND = torch.cuda.is_available() and "cuda" in xk.available_backends()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="needs a CUDA GPU and the compiled cuda backend")]

CASES = {name: ALL_CASES[name] for name in CUDA_CASES}  # rows of common.CASES
REDUCTIONS = ["mean", "sum", "none"]
LOW_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 runs in IEEE fp32 unless a test asks for TF32."""
    prec, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(prec)
    torch.backends.cuda.matmul.allow_tf32 = tf32


@functools.lru_cache(maxsize=None)
def _cpu_case(name, dtype):
    B, N, D, classes, ref_valid, self_mode, margin, noise = CASES[name]
    x, y, r, z = make_case(B, N, D, classes, seed=zlib.crc32(name.encode()), thresholds=(margin, 1 - 1e-5),
                           dtype=dtype, ref_valid=ref_valid, noise=noise)
    self_index = None
    if self_mode == "random":
        gen = torch.Generator().manual_seed(1)
        self_index = torch.randint(-1, N if ref_valid is None else ref_valid, (B,), generator=gen)
    return dict(x=x, y=y, r=r, z=z, ref_valid=ref_valid, self_index=self_index, margin=margin)


def _case(name, dtype=torch.float32):
    c = dict(_cpu_case(name, dtype))
    for k in ("x", "y", "r", "z", "self_index"):
        if c[k] is not None:
            c[k] = c[k].cuda()
    return c


@functools.lru_cache(maxsize=None)
def _oracle(name, dtype, weighted=False):
    c = _cpu_case(name, dtype)
    weights = torch.linspace(0.5, 1.5, c["x"].shape[0], dtype=torch.float64) if weighted else None
    return contrastive_oracle(c["x"], c["y"], c["r"], c["z"], c["margin"], 1e-5, c["ref_valid"], c["self_index"],
                              weights=weights)


# One pair adds at most 1 to a loss row or a gradient entry: errors are relative to
# max(|expected|, 1.0), so rows made of a few near-duplicate positives (1 - S ~ 1e-3) do not
# ask for more than the fp32 resolution of S itself. The suite's helper, with that floor.
FLOOR = 1.0


def _max_rel_err(actual, expected):
    return max_rel_err(actual, expected, floor=FLOOR)


def assert_rel(actual, expected, tol, what):
    _assert_rel(actual, expected, tol, what, floor=FLOOR)


def _loss(c, reduction, x=None, r=None, backend="cuda"):
    return xk.contrastive_loss(c["x"] if x is None else x, c["y"], c["r"] if r is None else r, c["z"],
                               margin=c["margin"], ref_valid=c["ref_valid"], self_index=c["self_index"],
                               reduction=reduction, backend=backend)


def _fwd_op(c, x=None, r=None, need_grad=True, allow_tf32=False):
    si = c["self_index"]
    N = c["r"].shape[0]
    return torch.ops.xbm_kernels.contrastive_fwd(
        c["x"] if x is None else x, c["y"].int(), c["r"] if r is None else r, c["z"].int(),
        None if si is None else si.long(), N if c["ref_valid"] is None else c["ref_valid"], c["margin"], 1e-5,
        need_grad, allow_tf32)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fp32_loss_and_grad_match_oracle(case, reduction):
    c = _case(case)
    B = c["x"].shape[0]
    x = c["x"].clone().requires_grad_()
    loss = _loss(c, reduction, x=x)
    assert loss.dtype == torch.float32 and loss.device.type == "cuda"
    rows, grad, _, _ = _oracle(case, torch.float32, weighted=reduction == "none")
    assert_rel(loss, reduce_rows(rows, reduction), 1e-5, "loss")
    if reduction == "none":
        loss.backward(torch.linspace(0.5, 1.5, B, device="cuda"))
    else:
        loss.backward()
    assert_rel(x.grad, grad / B if reduction == "mean" else grad, 1e-5, "grad")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_op_outputs_and_counts(case, dtype):
    """contrastive_fwd directly: shapes and dtypes of the contract, exact pair counts, and
    the same loss with and without the gradient."""
    c = _case(case, dtype)
    B, D = c["x"].shape
    rows, grad, counts = _fwd_op(c, need_grad=True)
    rows_ng, grad_ng, counts_ng = _fwd_op(c, need_grad=False)
    assert rows.shape == (B,) and rows.dtype == torch.float32
    assert grad.shape == (B, D) and grad.dtype == torch.float32
    assert counts.shape == (B, 2) and counts.dtype == torch.int32
    assert grad_ng.shape == (0,) and grad_ng.dtype == torch.float32
    exp_rows, exp_grad, _, exp_counts = _oracle(case, dtype)
    assert torch.equal(counts.cpu().long(), exp_counts), (counts, exp_counts)
    assert torch.equal(counts_ng, counts)
    # The oracle sees the same 16-bit inputs; products are exact and sums fp32 on the GPU.
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    assert_rel(rows, exp_rows, tol, "loss rows")
    assert_rel(rows_ng, exp_rows, tol, "loss rows (need_grad=False)")
    assert_rel(grad, exp_grad, tol, "grad")


@pytest.mark.parametrize("case", ["B7-D96-small-K", "B33-D130-partial", "B70-D200-two-row-tiles", "B9-D1030-slices"])
def test_reference_gradient_with_partial_memory(case):
    """grad_ref from contrastive_bwd: rows >= ref_valid get exactly zero."""
    c = _case(case)
    x = c["x"].clone().requires_grad_()
    r = c["r"].clone().requires_grad_()
    _loss(c, "sum", x=x, r=r).backward()
    _, grad, grad_ref, _ = _oracle(case, torch.float32)
    assert_rel(x.grad, grad, 1e-5, "grad_x")
    assert_rel(r.grad, grad_ref, 1e-5, "grad_ref")
    if c["ref_valid"] is not None:
        assert float(r.grad[c["ref_valid"]:].abs().max()) == 0.0


@pytest.mark.parametrize("B,D", [(29, 64), (70, 130), (65, 512)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_in_batch_gradient_flows_to_both_sides(B, D, reduction):
    """Reference = the batch itself, self excluded by index: x gets both gradients."""
    x0, y, _, _ = make_case(B, 1, D, 6, seed=B + D)
    idx = torch.arange(B)
    assert min_threshold_distance(x0, x0, (0.1, 1 - 1e-5), self_index=idx) > 1e-3
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64) if reduction == "none" else None
    rows, grad, grad_ref, _ = contrastive_oracle(x0, y, x0, y, 0.1, 1e-5, None, idx, weights=weights)
    x = x0.cuda().requires_grad_()
    loss = xk.contrastive_loss(x, y.cuda(), x, y.cuda(), margin=0.1, self_index=idx.cuda(), reduction=reduction,
                               backend="cuda")
    assert_rel(loss, reduce_rows(rows, reduction), 1e-5, "loss")
    loss.backward(weights.to(loss) if weights is not None else None)
    total = grad + grad_ref
    assert_rel(x.grad, total / B if reduction == "mean" else total, 1e-5, "grad (both sides)")


def _low_precision_errs(backend, dtype, case):
    c = _case(case, dtype)
    x = c["x"].clone().requires_grad_()
    r = c["r"].clone().requires_grad_()
    loss = _loss(c, "sum", x=x, r=r, backend=backend)
    loss.backward()
    rows, grad, grad_ref, _ = _oracle(case, dtype)
    assert x.grad.dtype == dtype and r.grad.dtype == dtype
    return (_max_rel_err(loss, rows.sum()), _max_rel_err(x.grad.float(), grad),
            _max_rel_err(r.grad.float(), grad_ref))


@pytest.mark.parametrize("dtype", list(LOW_PRECISION.values()), ids=list(LOW_PRECISION))
@pytest.mark.parametrize("case", ["B33-D130-partial", "B33-D96-multi-tile", "B70-D200-two-row-tiles", "B40-D512",
                                  "B9-D1030-slices"])
def test_low_precision_within_twice_reference_error(dtype, case):
    """bf16 / fp16 operands on tensor cores, fp32 accumulation: at most twice the error of
    the reference backend in the same dtype (loss, grad_x, grad_ref)."""
    ref_errs = _low_precision_errs("reference", dtype, case)
    errs = _low_precision_errs("cuda", dtype, case)
    floor = 1e-5  # fp32 accumulation can be exact where the reference happens to be too
    for what, e, re in zip(("loss", "grad_x", "grad_ref"), errs, ref_errs):
        assert e <= max(2 * re, floor), (what, e, re)


@pytest.mark.parametrize("case", ["B33-D96-multi-tile", "B70-D200-two-row-tiles", "B40-D512"])
def test_tf32_close_to_oracle(case):
    """allow_tf32 (float32 matmul precision "high"): tensor cores on tf32-rounded fp32. The
    data stay far enough from the thresholds that tf32 rounding (< 1e-3 on S) flips no pair."""
    torch.set_float32_matmul_precision("high")
    c = _case(case)
    assert min_threshold_distance(c["x"].cpu(), c["r"].cpu(), (c["margin"], 1 - 1e-5), c["ref_valid"],
                                  c["self_index"].cpu() if c["self_index"] is not None else None) > 2e-3
    rows, grad, counts = _fwd_op(c, allow_tf32=True)
    exp_rows, exp_grad, _, exp_counts = _oracle(case, torch.float32)
    assert torch.equal(counts.cpu().long(), exp_counts)
    assert_rel(rows, exp_rows, 2e-3, "loss rows (tf32)")
    assert_rel(grad, exp_grad, 2e-3, "grad (tf32)")
    x = c["x"].clone().requires_grad_()
    loss = _loss(c, "sum", x=x)
    loss.backward()
    assert_rel(loss, exp_rows.sum(), 2e-3, "loss (tf32, public API)")


MIXED_FLOOR = 5e-7  # a few fp32 ulps of the largest entry: where the reference happens to be exact


@pytest.mark.parametrize("mem_dtype", list(LOW_PRECISION.values()), ids=list(LOW_PRECISION))
@pytest.mark.parametrize("case", ["B33-D130-partial", "B33-D96-multi-tile", "B40-D512", "B9-D1030-slices"])
def test_mixed_dtypes_fp32_anchors_16_bit_memory(case, mem_dtype):
    """fp32 anchors against a 16-bit memory: the anchors enter the tensor cores as 16-bit
    parts (2 for fp16, 3 for bf16), so against the oracle on the rounded memory (and the
    anchors as they are) the errors stay within twice the reference backend's, which
    multiplies in fp32: the loss, the memory-loss gradient, both sides (the reference's
    gradient is 16-bit there), and the bwd op's fp32 grad_ref (its transposed pass runs in fp32)."""
    c = _case(case)
    r16 = c["r"].to(mem_dtype)
    cc = _cpu_case(case, torch.float32)
    w = torch.linspace(0.5, 1.5, c["x"].shape[0], dtype=torch.float64)
    rows, grad, grad_ref, _ = contrastive_oracle(cc["x"], cc["y"], r16.cpu(), cc["z"], c["margin"], 1e-5,
                                                 c["ref_valid"], cc["self_index"], weights=w)
    wd = w.float().cuda()
    errs = {}
    for backend in ("cuda", "reference"):
        x = c["x"].clone().requires_grad_()
        out = _loss(c, "none", x=x, r=r16, backend=backend)
        out.backward(wd)
        xb, rb = c["x"].clone().requires_grad_(), r16.clone().requires_grad_()
        _loss(c, "none", x=xb, r=rb, backend=backend).backward(wd)
        assert x.grad.dtype == torch.float32 and rb.grad.dtype == mem_dtype
        errs[backend] = {"rows": _max_rel_err(out, rows), "grad": _max_rel_err(x.grad, grad),
                         "grad_x both": _max_rel_err(xb.grad, grad),
                         "grad_ref": _max_rel_err(rb.grad.float(), grad_ref)}
    for what, mine in errs["cuda"].items():
        assert mine <= max(2 * errs["reference"][what], MIXED_FLOOR), (what, errs)
    si = c["self_index"]
    n = c["r"].shape[0] if c["ref_valid"] is None else c["ref_valid"]
    gx, gr = torch.ops.xbm_kernels.contrastive_bwd(c["x"], c["y"].int(), r16, c["z"].int(), si, n, c["margin"], 1e-5,
                                                   wd, False)
    assert_rel(gx, grad, 1e-6, "bwd op grad_x")
    assert_rel(gr, grad_ref, 1e-6, "bwd op grad_ref (fp32)")


def test_unaligned_storage_uses_element_loads():
    """A reference view that starts 2 bytes into its storage cannot use 16-byte cp.async."""
    c = _case("B33-D96-multi-tile", torch.bfloat16)
    N, D = c["r"].shape
    buf = torch.empty(N * D + 1, dtype=torch.bfloat16, device="cuda")
    buf[1:] = c["r"].flatten()
    r_odd = buf[1:].view(N, D)
    assert r_odd.data_ptr() % 16 != 0
    a = _fwd_op(c)
    b = _fwd_op(c, r=r_odd)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", ["B33-D96-multi-tile", "B70-D200-two-row-tiles", "B9-D1030-slices"])
def test_repeated_runs_are_bitwise_identical(dtype, case):
    """No atomics: the split-K partials are reduced in a fixed order."""
    c = _case(case, dtype)
    outs = []
    for _ in range(3):
        x = c["x"].clone().requires_grad_()
        r = c["r"].clone().requires_grad_()
        loss = _loss(c, "mean", x=x, r=r)
        loss.backward()
        outs.append((loss.detach(), x.grad, r.grad) + tuple(_fwd_op(c)))
    for o in outs[1:]:
        for u, v in zip(o, outs[0]):
            assert torch.equal(u, v)


def test_empty_valid_prefix_gives_zero():
    c = _case("B7-D96-small-K")
    x = c["x"].clone().requires_grad_()
    loss = xk.contrastive_loss(x, c["y"], c["r"], c["z"], ref_valid=0, backend="cuda")
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(x.grad.abs().max()) == 0.0


# ---- enqueue ----------------------------------------------------------------------------

@pytest.mark.parametrize("mem_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["in-fp32", "in-fp64", "in-bf16", "in-fp16"])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_enqueue_op_wraps_and_casts(mem_dtype, in_dtype, label_dtype):
    size, D, b, ptr = 10, 7, 6, 7  # rows 7, 8, 9, 0, 1, 2
    mem = torch.full((size, D), 3.0, dtype=mem_dtype, device="cuda")
    lab = torch.full((size,), -5, dtype=torch.int32, device="cuda")
    emb = torch.randn(b, D, dtype=torch.float64, device="cuda").to(in_dtype)
    labels = torch.arange(100, 100 + b, device="cuda").to(label_dtype)
    slots = torch.ops.xbm_kernels.enqueue_(mem, lab, emb, labels, ptr)
    expected_slots = (torch.arange(b, device="cuda") + ptr) % size
    assert slots.dtype == torch.int64 and torch.equal(slots, expected_slots)
    assert torch.equal(mem[expected_slots], emb.to(mem_dtype))
    assert torch.equal(lab[expected_slots], labels.to(torch.int32))
    untouched = torch.tensor([3, 4, 5, 6], device="cuda")
    assert bool((mem[untouched] == 3.0).all()) and bool((lab[untouched] == -5).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_memory_matches_reference_backend_over_wraparounds(dtype):
    """Batches of varying sizes through a small ring: the cuda enqueue leaves exactly the
    state the reference backend does (embeddings, labels, ptr, num_filled, slots)."""
    gen = torch.Generator().manual_seed(3)
    mems = {b: xk.CrossBatchMemory(23, 17, dtype=dtype, device="cuda", backend=b) for b in ("reference", "cuda")}
    for step, b in enumerate([5, 9, 1, 23, 7, 11, 4]):
        emb = torch.randn(b, 17, generator=gen).cuda()
        lab = torch.randint(0, 50, (b,), generator=gen).cuda()
        slots = {k: m.enqueue(emb, lab) for k, m in mems.items()}
        assert torch.equal(slots["cuda"], slots["reference"]), step
        for name, t in mems["reference"].state_dict().items():
            assert torch.equal(mems["cuda"].state_dict()[name], t), (step, name)


def test_xbm_loss_matches_reference_backend_through_wraparound():
    """XBMLoss over several steps (in-batch + memory loss, self_index from the slots after
    the ring wraps): loss and gradient as the reference backend gives them."""
    B, D, size, steps = 24, 64, 60, 5
    gen = torch.Generator().manual_seed(100)
    centres = class_centres(5, D, gen)  # the same classes every step, fresh rows
    batches = []
    for _ in range(steps):
        y = torch.randint(0, 5, (B,), generator=gen)
        batches.append((rows_around(centres, y, gen, 0.07).float(), y))
    x_all = torch.cat([b[0] for b in batches])
    assert min_threshold_distance(x_all, x_all, (0.5, 1 - 1e-5), self_index=torch.arange(len(x_all))) > 1e-3
    crits = {b: xk.XBMLoss(size, D, backend=b).cuda() for b in ("reference", "cuda")}
    for step, (x0, y) in enumerate(batches):
        y = y.cuda()
        grads, losses = {}, {}
        for name, crit in crits.items():
            x = x0.cuda().requires_grad_()
            loss = crit(x, y)
            loss.backward()
            losses[name], grads[name] = loss.detach(), x.grad
        assert_rel(losses["cuda"], losses["reference"].double(), 1e-5, f"loss at step {step}")
        assert_rel(grads["cuda"], grads["reference"].double(), 1e-5, f"grad at step {step}")
    assert len(crits["cuda"].memory) == size


# ---- 64-bit offsets -----------------------------------------------------------------------

@pytest.mark.slow
def test_large_memory_k_times_d_above_2_31_cuda():
    """K*D = 2^31 + 128 elements (bf16, 4 GiB on the GPU): offsets must be 64-bit. The loss
    and gradient are compared with the sums over two halves of the memory."""
    K, D, B = 2 ** 24 + 1, 128, 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    mem = torch.empty(K, D, dtype=torch.bfloat16, device="cuda")
    chunk = 1 << 22
    for s in range(0, K, chunk):
        e = min(K, s + chunk)
        mem[s:e] = torch.nn.functional.normalize(torch.randn(e - s, D, generator=gen, device="cuda"), dim=1)
    labels = torch.randint(0, 1000, (K,), generator=gen, device="cuda")
    x = mem[-B:].float().clone()  # the anchors' own copies sit in the last rows (offsets > 2^31)
    x[:, 0] += 0.01
    x = torch.nn.functional.normalize(x, dim=1).to(torch.bfloat16).requires_grad_()
    y = labels[-B:].clone()
    self_index = torch.arange(K - B, K, device="cuda")
    loss = xk.contrastive_loss(x, y, mem, labels, margin=0.1, self_index=self_index, reduction="sum",
                               backend="cuda")
    loss.backward()
    half = K // 2
    parts, grads = [], []
    for s, e in ((0, half), (half, K)):
        si = torch.where((self_index >= s) & (self_index < e), self_index - s, torch.full_like(self_index, -1))
        xp = x.detach().clone().requires_grad_()
        part = xk.contrastive_loss(xp, y, mem[s:e], labels[s:e], margin=0.1, self_index=si, reduction="sum",
                                   backend="cuda")
        part.backward()
        parts.append(part.detach())
        grads.append(xp.grad.float())
    assert math.isfinite(float(loss)) and float(loss) > 0
    torch.testing.assert_close(loss.detach(), parts[0] + parts[1], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(x.grad.float(), grads[0] + grads[1], rtol=2e-2, atol=2e-2)
