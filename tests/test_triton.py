"""The Triton backend: opcheck of its ops, the enqueue ring against a Python model, the
contrastive loss against the float64 loop oracle, both gradients, dtypes, torch.compile.

Runs on CUDA tensors on a GPU, otherwise on CPU tensors under the Triton interpreter, in
its own process (TRITON_INTERPRET must be set before triton is imported):

    TRITON_INTERPRET=1 python -m pytest tests/test_triton.py

Interpreter shapes are small; a GPU adds larger cases and bf16 (the interpreter's bf16
tl.dot is wrong in some Triton versions)."""
import random
import zlib

import pytest
import torch

from triton_env import DEVICE, GPU, INTERPRET, PYTESTMARK  # noqa: E402,F401  (skips when Triton cannot run)

import xbm_kernels as xk  # noqa: E402

from common import CASES as ALL_CASES, GPU_EXTRA_CASES, INTERPRETER_CASES, assert_rel, make_case  # noqa: E402
from common import max_rel_err as _rel_err  # noqa: E402
from oracle import contrastive_oracle, min_threshold_distance, reduce_rows  # noqa: E402
from xbm_kernels.triton import contrastive as tc  # noqa: E402
from xbm_kernels.triton.ops import OPS  # noqa: E402

pytestmark = PYTESTMARK

LOW_DTYPES = [torch.float16] + ([torch.bfloat16] if GPU else [])

# Rows of common.CASES. Under the interpreter (one config, BLOCK_B=16, BLOCK_K=32, 4 target
# programs) "B7-D96-split" takes 4 memory splits and "B33-D130-partial-small" 3 B tiles x 2 splits.
# noise 0.25 puts same-class similarities near 0.9: with many positives at 0.995 the loss
# sum_P (1 - S) cancels so much that fp32 itself (the reference backend too) misses 1e-5.
CASES = {name: ALL_CASES[name] for name in INTERPRETER_CASES + (GPU_EXTRA_CASES if GPU else [])}
SMALL = "B33-D130-partial-small"


def _case(name, dtype=torch.float32):
    B, N, D, classes, ref_valid, self_mode, margin, noise = CASES[name]
    x, y, r, z = make_case(B, N, D, classes, seed=zlib.crc32(name.encode()), thresholds=(margin, 1 - 1e-5),
                           dtype=dtype, ref_valid=ref_valid, noise=noise)
    self_index = None
    if self_mode == "random":
        n = N if ref_valid is None else ref_valid
        self_index = torch.randint(-1, n, (B,), generator=torch.Generator().manual_seed(1))
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dict(x=to(x), y=to(y), r=to(r), z=to(z), ref_valid=ref_valid, self_index=to(self_index), margin=margin)


def _expected(c, weights=None, x=None, r=None):
    """(rows, grad_x, grad_ref, counts) in float64 for sum_i w_i l_i. The loop oracle for
    small cases; for the GPU's large ones the reference backend in float64 (a loop over
    millions of pairs in Python would take minutes)."""
    x = c["x"] if x is None else x
    r = c["r"] if r is None else r
    if x.shape[0] * r.shape[0] <= 100_000:
        return contrastive_oracle(x, c["y"], r, c["z"], c["margin"], 1e-5, c["ref_valid"], c["self_index"],
                                  weights=weights)
    xd = x.detach().double().requires_grad_()
    rd = r.detach().double().requires_grad_()
    n = r.shape[0] if c["ref_valid"] is None else c["ref_valid"]
    rows, counts = xk.reference.contrastive(xd, c["y"], rd, c["z"], margin=c["margin"], pos_eps=1e-5,
                                            ref_valid=n, self_index=c["self_index"])
    w = torch.ones_like(rows) if weights is None else weights.to(rows)
    (rows * w).sum().backward()
    return rows.detach().cpu(), xd.grad.cpu(), rd.grad.cpu(), counts.long().cpu()


def _loss(c, reduction="sum", x=None, r=None, backend="triton"):
    return xk.contrastive_loss(c["x"] if x is None else x, c["y"], c["r"] if r is None else r, c["z"],
                               margin=c["margin"], ref_valid=c["ref_valid"], self_index=c["self_index"],
                               reduction=reduction, backend=backend)


def _op_args(c):
    n = c["r"].shape[0] if c["ref_valid"] is None else c["ref_valid"]
    return c["x"], c["y"].int(), c["r"], c["z"].int(), c["self_index"], n, c["margin"], 1e-5


# --------------------------------------------------------------------------- the ops


def test_schemas_match_the_cpp_ops():
    if not xk._ops.HAS_C:
        pytest.skip(f"the C++ extension did not load: {xk._ops.LOAD_ERROR}")
    for name in ("enqueue_", "contrastive_fwd", "contrastive_bwd"):
        mine = str(getattr(OPS, name).default._schema).replace("xbm_kernels_triton::", "")
        theirs = str(getattr(torch.ops.xbm_kernels, name).default._schema).replace("xbm_kernels::", "")
        assert mine == theirs


@pytest.mark.parametrize("dtype", LOW_DTYPES + [torch.float32])
@pytest.mark.parametrize("need_grad", [True, False])
@pytest.mark.parametrize("with_self", [True, False])
def test_opcheck_contrastive_fwd(dtype, need_grad, with_self):
    c = _case("B7-D96-split", dtype)
    x, y, r, z, si, n, margin, eps = _op_args(c)
    torch.library.opcheck(OPS.contrastive_fwd, (x, y, r, z, si if with_self else None, n, margin, eps, need_grad,
                                                False))


@pytest.mark.parametrize("dtype", LOW_DTYPES + [torch.float32])
def test_opcheck_contrastive_bwd(dtype):
    c = _case("B7-D96-split", dtype)
    x, y, r, z, si, n, margin, eps = _op_args(c)
    g = torch.linspace(0.5, 1.5, x.shape[0], device=DEVICE)
    torch.library.opcheck(OPS.contrastive_bwd, (x, y, r, z, si, n, margin, eps, g, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck_enqueue(dtype):
    mem = torch.zeros(10, 4, dtype=dtype, device=DEVICE)
    labels = torch.full((10,), -1, dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(OPS.enqueue_, (mem, labels, torch.randn(7, 4, device=DEVICE),
                                         torch.arange(7, device=DEVICE), 6))


def test_direct_calls_check_their_arguments():
    c = _case("B5-negative-margin")
    x, y, r, z, si, n, margin, eps = _op_args(c)
    with pytest.raises(ValueError, match="labels: expected int32"):
        OPS.contrastive_fwd(x, y.long(), r, z, si, n, margin, eps, True, False)
    with pytest.raises(ValueError, match="ref_valid"):
        OPS.contrastive_fwd(x, y, r, z, si, r.shape[0] + 1, margin, eps, True, False)
    with pytest.raises(ValueError, match="larger than the memory"):
        OPS.enqueue_(r[:3].clone(), z[:3].clone(), x, y, 0)


# --------------------------------------------------------------------------- enqueue


def _ring_model(size, batches):
    """Slots, rows and labels after writing `batches` into a ring of `size`, one row at a time."""
    rows, labels, ptr, slot_lists = {}, {}, 0, []
    for x, y in batches:
        slots = []
        for i in range(x.shape[0]):
            rows[ptr], labels[ptr] = x[i], int(y[i])
            slots.append(ptr)
            ptr = (ptr + 1) % size
        slot_lists.append(slots)
    return rows, labels, slot_lists


@pytest.mark.parametrize("mem_dtype,in_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.bfloat16), (torch.float32, torch.float16)])
def test_enqueue_wraps_like_the_python_ring(mem_dtype, in_dtype):
    rng = random.Random(0)
    size, D = 23, 6
    mem = torch.zeros(size, D, dtype=mem_dtype, device=DEVICE)
    mem_labels = torch.full((size,), -1, dtype=torch.int32, device=DEVICE)
    batches, ptr = [], 0
    for step in range(12):
        b = [size, 0, 1][step] if step < 3 else rng.randint(1, size)
        x = (torch.randn(D, b, device=DEVICE) + 0.5).to(in_dtype).T  # strided rows
        y = torch.randint(-2 ** 31, 2 ** 31 - 1, (b,), device=DEVICE)  # int64 labels that fit int32
        slots = OPS.enqueue_(mem, mem_labels, x, y, ptr)
        batches.append((x, y))
        expected = _ring_model(size, batches)[2][-1]
        assert slots.dtype == torch.int64 and slots.tolist() == expected
        ptr = (ptr + b) % size
    rows, labels, _ = _ring_model(size, batches)
    # The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even as torch
    # does: there, allow one bf16 ulp.
    truncates = INTERPRET and mem_dtype == torch.bfloat16 and in_dtype == torch.float32
    for slot in range(size):
        expected = rows[slot].to(mem_dtype)
        if truncates:
            torch.testing.assert_close(mem[slot].float(), expected.float(), rtol=2 ** -7, atol=0)
        else:
            assert torch.equal(mem[slot], expected), (slot, mem[slot], expected)
        assert int(mem_labels[slot]) == labels[slot]


def test_memory_module_on_triton_matches_reference_backend():
    dtype = LOW_DTYPES[-1]  # bf16 on a GPU; the interpreter's fp32 -> bf16 truncates
    a = xk.CrossBatchMemory(17, 5, dtype=dtype, device=DEVICE, backend="triton")
    b = xk.CrossBatchMemory(17, 5, dtype=dtype, device=DEVICE, backend="reference")
    gen = torch.Generator().manual_seed(0)
    for bsz in (5, 9, 17, 3, 11):
        x, y = torch.randn(bsz, 5, generator=gen).to(DEVICE), torch.randint(0, 9, (bsz,), generator=gen).to(DEVICE)
        assert torch.equal(a.enqueue(x, y), b.enqueue(x, y))
    assert len(a) == len(b) and a._ptr == b._ptr
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.labels, b.labels)


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("case", list(CASES))
def test_loss_grad_counts_match_oracle(case):
    c = _case(case)
    B = c["x"].shape[0]
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    x = c["x"].clone().requires_grad_()
    rows, counts = xk.losses.compute("contrastive", x, c["y"], c["r"], c["z"], margin=c["margin"],
                                     ref_valid=c["ref_valid"], self_index=c["self_index"], reduction="none",
                                     backend="triton")
    rows.backward(weights.to(rows))
    e_rows, e_grad, _, e_counts = _expected(c, weights=weights)
    assert rows.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert_rel(rows, e_rows, 1e-5, "loss rows")
    assert_rel(x.grad, e_grad, 1e-5, "grad")
    assert torch.equal(counts.cpu().long(), e_counts), (counts, e_counts)


def test_cases_exercise_every_set():
    """The interpreter table must hold positives, active negatives and rows without positives."""
    totals, empty_rows = torch.zeros(2, dtype=torch.int64), 0
    for name in CASES:
        if not name.startswith("gpu-"):
            c = _case(name)
            counts = _expected(c)[3]
            totals += counts.sum(0)
            empty_rows += int((counts[:, 0] == 0).sum())
    assert totals[0] > 100 and totals[1] > 100 and empty_rows > 5, (totals, empty_rows)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["B7-D96-split", "B16-all-same-label"])
def test_reductions(case, reduction):
    c = _case(case)
    x = c["x"].clone().requires_grad_()
    loss = _loss(c, reduction, x=x)
    loss.sum().backward()
    rows, grad, _, _ = _expected(c)
    assert_rel(loss, reduce_rows(rows, reduction), 1e-5, "loss")
    assert_rel(x.grad, grad / x.shape[0] if reduction == "mean" else grad, 1e-5, "grad")


def test_any_split_count_gives_the_same_answer():
    """Splits that do and do not align with tiles, one split, the plan's: all agree with
    the oracle; only the order of fp32 additions differs between them."""
    c = _case("B7-D96-split")
    x, y, r, z, si, n, margin, eps = _op_args(c)
    e_rows, e_grad, _, e_counts = _expected(c)
    outs = [tc.contrastive_fwd_triton(x, y, r, z, si, n, margin, eps, True, False, splits=s)
            for s in (1, 2, 7, n, None)]
    for rows, grad, counts in outs:
        assert_rel(rows, e_rows, 1e-5, "rows")
        assert_rel(grad, e_grad, 1e-5, "grad")
        assert torch.equal(counts.cpu().long(), e_counts)
        assert_rel(rows, outs[0][0], 2e-6, "rows vs one split")


def test_split_plan_fills_the_device_and_covers_the_memory():
    for B, n in [(1, 0), (1, 5), (7, 250), (33, 100), (4096, 10 ** 6), (3, 10 ** 6)]:
        splits, cols = tc.split_plan(B, n, DEVICE)
        assert splits >= 1 and splits * cols >= n and (splits - 1) * cols < max(n, 1), (B, n, splits, cols)
    assert tc.split_plan(7, 250, DEVICE)[0] > 1


def test_config_pruning_for_hopper():
    """The GPU autotune tables (not run by the interpreter) prune to configs that fit."""
    import triton
    fwd = [triton.Config({"BLOCK_B": a, "BLOCK_K": b}, num_warps=w, num_stages=s) for a, b, w, s in tc._FWD_CONFIGS]
    prune = tc._prune("BLOCK_B", "BLOCK_K", "B", 2048)

    def kept(B, D, dtype, precision="ieee"):
        nargs = dict(r_ptr=torch.empty(0, dtype=dtype), B=B)
        return [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                for c in prune(fwd, nargs, BLOCK_D=D, PRECISION=precision)]

    assert len(kept(256, 128, torch.bfloat16)) >= 6
    assert all(b == 16 for b, *_ in kept(3, 128, torch.bfloat16))  # 3 anchors: no 64-row tiles
    assert all(b * k <= 2048 for b, k, *_ in kept(256, 128, torch.float32))  # FMA dots: small tiles
    assert len(kept(256, 128, torch.float32, "tf32")) > len(kept(256, 128, torch.float32))
    for D, dtype in ((512, torch.float32), (1024, torch.bfloat16)):
        configs = kept(256, D, dtype)
        assert configs and all((s * k + b) * D * dtype.itemsize <= tc.SMEM_BUDGET for b, k, w, s in configs)
    assert kept(256, 4096, torch.float32) == [(16, 16, 4, 1)]  # nothing fits: the smallest


def test_repeated_runs_are_bitwise_identical():
    c = _case("B7-D96-split")
    outs = []
    for _ in range(3):
        x = c["x"].clone().requires_grad_()
        r = c["r"].clone().requires_grad_()
        loss = _loss(c, "mean", x=x, r=r)
        loss.backward()
        outs.append((loss.detach(), x.grad, r.grad))
    for out in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, outs[0]))


def test_empty_valid_prefix_gives_zero():
    c = _case("B7-D96-split")
    x = c["x"].clone().requires_grad_()
    r = c["r"].clone().requires_grad_()
    loss = xk.contrastive_loss(x, c["y"], r, c["z"], ref_valid=0, backend="triton")
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(x.grad.abs().max()) == 0.0 and float(r.grad.abs().max()) == 0.0


def test_wrapped_memory_with_self_index():
    """XBM's memory step: the ring has wrapped, the batch was just enqueued (its slots wrap
    too) and its own copies are excluded by index."""
    D, size = 48, 40
    x, y, r, z = make_case(15, 40, D, 6, seed=11, thresholds=(0.1, 1 - 1e-5))
    mem = xk.CrossBatchMemory(size, D, device=DEVICE, backend="triton")
    for lo in (0, 15):
        mem.enqueue(r[lo:lo + 15].to(DEVICE), z[lo:lo + 15].to(DEVICE))
    slots = mem.enqueue(x.to(DEVICE), y.to(DEVICE))
    assert slots.tolist() == list(range(30, 40)) + list(range(5))
    emb, lab = mem.get()
    assert min_threshold_distance(x, emb.cpu(), (0.1, 1 - 1e-5), self_index=slots.cpu()) > 1e-3
    c = dict(x=x.to(DEVICE), y=y.to(DEVICE), r=emb, z=lab, ref_valid=None, self_index=slots, margin=0.1)
    xg = c["x"].clone().requires_grad_()
    loss = _loss(c, "none", x=xg)
    loss.sum().backward()
    rows, grad, _, counts = _expected(c)
    assert counts[:, 0].sum() > 0 and counts[:, 1].sum() > 0
    assert_rel(loss, rows, 1e-5, "loss rows")
    assert_rel(xg.grad, grad, 1e-5, "grad")


# --------------------------------------------------------------------------- both sides


def test_gradient_to_a_separate_reference():
    c = _case(SMALL)
    x = c["x"].clone().requires_grad_()
    r = c["r"].clone().requires_grad_()
    _loss(c, "mean", x=x, r=r).backward()
    _, grad, grad_ref, _ = _expected(c)
    B = x.shape[0]
    assert_rel(x.grad, grad / B, 1e-5, "grad_x")
    assert_rel(r.grad, grad_ref / B, 1e-5, "grad_ref")
    assert float(r.grad[c["ref_valid"]:].abs().max()) == 0.0
    xr = c["x"].clone().requires_grad_()
    rr = c["r"].clone().requires_grad_()
    _loss(c, "mean", x=xr, r=rr, backend="reference").backward()
    assert_rel(x.grad, xr.grad, 1e-5, "grad_x vs reference")
    assert_rel(r.grad, rr.grad, 1e-5, "grad_ref vs reference")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_in_batch_gradient_flows_to_both_sides(reduction):
    B = 29
    x0, y, _, _ = make_case(B, 1, 64, 6, seed=5)
    idx = torch.arange(B)
    assert min_threshold_distance(x0, x0, (0.1, 1 - 1e-5), self_index=idx) > 1e-3
    x0, y, idx = x0.to(DEVICE), y.to(DEVICE), idx.to(DEVICE)
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64) if reduction == "none" else None
    grads = {}
    for backend in ("triton", "reference"):
        x = x0.clone().requires_grad_()
        loss = xk.contrastive_loss(x, y, x, y, margin=0.1, self_index=idx, reduction=reduction, backend=backend)
        loss.backward(weights.to(loss) if weights is not None else None)
        grads[backend] = (loss.detach(), x.grad)
    rows, grad, grad_ref, _ = contrastive_oracle(x0, y, x0, y, 0.1, 1e-5, None, idx, weights=weights)
    total = grad + grad_ref
    assert_rel(grads["triton"][0], reduce_rows(rows, reduction), 1e-5, "loss")
    assert_rel(grads["triton"][1], total / B if reduction == "mean" else total, 1e-5, "grad (both sides)")
    assert_rel(grads["triton"][1], grads["reference"][1], 1e-5, "grad vs reference")


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_low_precision_both_sides_within_twice_reference_error(dtype):
    """16-bit x and ref, both requiring grad; errors against the oracle on the same
    (rounded) inputs, compared with the reference backend's in the same dtype."""
    c = _case(SMALL, dtype)
    errs = {}
    for backend in ("triton", "reference"):
        x = c["x"].clone().requires_grad_()
        r = c["r"].clone().requires_grad_()
        loss = _loss(c, "sum", x=x, r=r, backend=backend)
        loss.backward()
        assert x.grad.dtype == dtype and r.grad.dtype == dtype
        rows, grad, grad_ref, _ = _expected(c)
        errs[backend] = [_rel_err(loss, rows.sum()), _rel_err(x.grad.float(), grad),
                         _rel_err(r.grad.float(), grad_ref)]
    floor = 1e-5  # fp32 accumulation can be exact where the reference happens to be too
    for what, mine, ref in zip(("loss", "grad_x", "grad_ref"), errs["triton"], errs["reference"]):
        assert mine <= max(2 * ref, floor), (what, mine, ref)


@pytest.mark.parametrize("dtype", LOW_DTYPES)
def test_low_precision_memory_loss_within_twice_reference_error(dtype):
    c = _case("B7-D96-split", dtype)
    errs = {}
    for backend in ("triton", "reference"):
        x = c["x"].clone().requires_grad_()
        loss = _loss(c, "sum", x=x, backend=backend)
        loss.backward()
        rows, grad, _, _ = _expected(c)
        errs[backend] = (_rel_err(loss, rows.sum()), _rel_err(x.grad.float(), grad))
    for mine, ref in zip(errs["triton"], errs["reference"]):
        assert mine <= max(2 * ref, 1e-5), (errs)


@pytest.mark.parametrize("mem_dtype", LOW_DTYPES)
def test_fp32_anchors_with_a_16_bit_memory(mem_dtype):
    """fp32 anchors against a 16-bit memory: the anchors go into the tensor cores in 16-bit
    parts (not rounded), so against the oracle on the rounded memory the error is fp32-sized."""
    c = _case("B7-D96-split")
    r16 = c["r"].to(mem_dtype)
    x = c["x"].clone().requires_grad_()
    loss = _loss(c, "none", x=x, r=r16)
    loss.sum().backward()
    rows, grad, _, counts = _expected(c, r=r16)
    assert x.grad.dtype == torch.float32
    assert_rel(loss, rows, 1e-5, "loss rows")
    assert_rel(x.grad, grad, 1e-5, "grad")


@pytest.mark.skipif(not GPU, reason="the interpreter ignores input_precision (numpy fp32 matmul)")
def test_tf32_when_allowed():
    c = _case("gpu-B512-D256")
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        x = c["x"].clone().requires_grad_()
        loss = _loss(c, "sum", x=x)
        loss.backward()
    finally:
        torch.set_float32_matmul_precision(prev)
    rows, grad, _, _ = _expected(c)
    assert_rel(loss, rows.sum(), 2e-3, "loss (tf32)")
    assert_rel(x.grad, grad, 2e-3, "grad (tf32)")


def test_rows_far_into_the_memory():
    """On a GPU, rows whose element offset exceeds int32 (a 4.3 GB bf16 memory): the
    enqueue writes them (and wraps to row 0) and the loss reads them. Every other row is
    zero with a label no anchor has (an inactive negative), so the loss is the oracle's
    on the written rows alone. The interpreter runs the same check on a small memory."""
    D = 128
    K = 2 ** 31 // D + 64 if GPU else 1000
    dtype = LOW_DTYPES[-1]
    x, y, r, z = make_case(5, 40, D, 3, seed=7, thresholds=(0.1, 1 - 1e-5), dtype=dtype)
    mem = torch.zeros(K, D, dtype=dtype, device=DEVICE)
    mem_labels = torch.full((K,), -7, dtype=torch.int32, device=DEVICE)
    slots = OPS.enqueue_(mem, mem_labels, r.to(DEVICE), z.to(DEVICE), K - 30)
    assert slots.tolist() == list(range(K - 30, K)) + list(range(10))
    si = torch.tensor([K - 1, -1, K - 27, 3, K // 2], device=DEVICE)
    rows, grad, counts = OPS.contrastive_fwd(x.to(DEVICE), y.int().to(DEVICE), mem, mem_labels, si, K, 0.1, 1e-5,
                                             True, False)
    # The written rows in column order: 0..9 (r[30:]) then K-30..K-1 (r[:30]).
    sub_r, sub_z = torch.cat([r[30:], r[:30]]), torch.cat([z[30:], z[:30]])
    s = si.cpu()
    sub_si = torch.where(s >= K - 30, s - (K - 30) + 10, torch.where((s >= 0) & (s < 10), s, -1))
    e_rows, e_grad, _, e_counts = contrastive_oracle(x, y, sub_r, sub_z, 0.1, 1e-5, None, sub_si)
    assert e_counts.sum() > 0
    assert_rel(rows, e_rows, 1e-5, "rows")
    assert_rel(grad, e_grad, 1e-5, "grad")
    assert torch.equal(counts.cpu().long(), e_counts)


# --------------------------------------------------------------------------- compile, XBM


def test_torch_compile_matches_eager():
    c = _case("B7-D96-split")

    def step(x, r):
        return xk.contrastive_loss(x, c["y"], r, c["z"], margin=c["margin"], ref_valid=c["ref_valid"],
                                   backend="triton")

    # aot_eager traces through the fakes without inductor's C++ build, which the
    # interpreter run does not need to pay for.
    compiled_step = torch.compile(step, backend="inductor" if GPU else "aot_eager", fullgraph=True)
    for ref_grad in (False, True):
        outs = []
        for fn in (step, compiled_step):
            x = c["x"].clone().requires_grad_()
            r = c["r"].clone().requires_grad_(ref_grad)
            loss = fn(x, r)
            loss.backward()
            outs.append((loss.detach(), x.grad, r.grad))
        torch.testing.assert_close(outs[1][0], outs[0][0])
        torch.testing.assert_close(outs[1][1], outs[0][1])
        if ref_grad:
            torch.testing.assert_close(outs[1][2], outs[0][2])


def test_xbm_loss_on_triton_matches_reference():
    torch.manual_seed(0)
    crits = {b: xk.XBMLoss(memory_size=40, embedding_dim=24, backend=b, margin=0.1).to(DEVICE)
             for b in ("triton", "reference")}
    for step in range(4):
        x0, y, _, _ = make_case(12, 1, 24, 5, seed=100 + step, thresholds=(0.1, 1 - 1e-5))
        out = {}
        for b, crit in crits.items():
            x = x0.to(DEVICE).requires_grad_()
            loss = crit(x, y.to(DEVICE))
            loss.backward()
            out[b] = (loss.detach(), x.grad)
        assert_rel(out["triton"][0], out["reference"][0], 1e-5, f"step {step} loss")
        assert_rel(out["triton"][1], out["reference"][1], 1e-5, f"step {step} grad")
    assert torch.equal(crits["triton"].memory.labels, crits["reference"].memory.labels)
