"""Values: every loss, parameter set, backend and case against the float64 loop oracle
(CONTRACT.md sections 1 and 6): loss rows, active-pair counts, the anchors' gradient (the
fused path: only the anchors need it) and both gradients (the bwd op: the reference rows
need one too), the reductions with the registry's "mean" rule, the same tensor as anchors
and reference, and an empty reference set."""
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import xbm_kernels as xk
from xbm_kernels.registry import LOSSES

import cases
import oracle
from compare import FP32, assert_close, assert_equal_counts


def _compute(loss, d, x, r, params, reduction, backend):
    return xk.losses.compute(loss, x, d.y, r, d.z, ref_valid=d.ref_valid, self_index=d.self_index,
                             reduction=reduction, backend=backend, **params)


def test_rows_counts_and_gradients(loss, variant, backend, device, case):
    """reduction="none" with per-row weights w: rows and counts; d(sum_i w_i l_i)/dx when only
    x requires grad; d/dx and d/dref when both do. Rows of the reference past ref_valid get 0."""
    params = cases.variants(loss)[variant]
    d = cases.draw(case, loss, variant).to(device)
    rows_e, gx_e, gr_e, counts_e = cases.expected(case, loss, variant)
    w = cases.weights(d.x.shape[0])

    x = d.x.clone().requires_grad_()
    rows, counts = _compute(loss, d, x, d.r, params, "none", backend)
    assert rows.dtype == torch.float32 and counts.dtype == torch.int32 and rows.device.type == device
    assert_close(rows, rows_e, FP32, "rows")
    assert_equal_counts(counts, counts_e)
    rows.backward(w.to(rows))
    assert x.grad.dtype == torch.float32
    assert_close(x.grad, gx_e, FP32, "grad_x (fused)")

    x, r = d.x.clone().requires_grad_(), d.r.clone().requires_grad_()
    rows, _ = _compute(loss, d, x, r, params, "none", backend)
    rows.backward(w.to(rows))
    assert_close(x.grad, gx_e, FP32, "grad_x (both sides)")
    assert_close(r.grad, gr_e, FP32, "grad_ref")
    assert not r.grad[d.ref_valid:].any()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(loss, backend, device, reduction):
    """"sum" adds the rows, "mean" divides by the registry's denominator; the gradients (both
    paths) carry the same factor."""
    case = cases.PARTIAL
    params = cases.variants(loss)["defaults"]
    d = cases.draw(case, loss, "defaults").to(device)
    rows_e, gx_e, gr_e, counts_e = cases.expected(case, loss, "defaults", weighted=False)
    scale = 1.0 / cases.mean_denominator(loss, counts_e) if reduction == "mean" else 1.0
    x = d.x.clone().requires_grad_()
    out, _ = _compute(loss, d, x, d.r, params, reduction, backend)
    assert out.shape == () and out.dtype == torch.float32
    assert_close(out, rows_e.sum() * scale, FP32, "loss", scale)
    out.backward()
    assert_close(x.grad, gx_e * scale, FP32, "grad_x (fused)", scale)
    x, r = d.x.clone().requires_grad_(), d.r.clone().requires_grad_()
    _compute(loss, d, x, r, params, reduction, backend)[0].backward()
    assert_close(x.grad, gx_e * scale, FP32, "grad_x (both sides)", scale)
    assert_close(r.grad, gr_e * scale, FP32, "grad_ref", scale)


@pytest.mark.structure("in-batch")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_tensor_as_anchors_and_reference(loss, backend, device, case, reduction):
    """The in-batch loss passes the batch twice (self excluded by index): its gradient is the
    anchor and the reference gradient added, as autograd through the dense formula."""
    params = cases.variants(loss)["defaults"]
    d = cases.draw(case, loss, "defaults").to(device)
    rows_e, gx_e, gr_e, counts_e = cases.expected(case, loss, "defaults", weighted=reduction == "none")
    scale = 1.0 / cases.mean_denominator(loss, counts_e) if reduction == "mean" else 1.0
    x = d.x.clone().requires_grad_()
    out = xk.losses.compute(loss, x, d.y, x, d.y, self_index=d.self_index, reduction=reduction, backend=backend,
                            **params)[0]
    expected = rows_e if reduction == "none" else rows_e.sum() * scale
    assert_close(out, expected, FP32, "loss", scale)
    out.backward(cases.weights(x.shape[0]).to(out) if reduction == "none" else None)
    assert_close(x.grad, (gx_e + gr_e) * scale, FP32, "grad (both sides)", scale)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("empty", ["N=0", "ref_valid=0", "B=0"])
def test_empty_sets_give_zero(loss, backend, device, empty, reduction):
    """An empty reference set, an empty valid prefix or an empty batch: loss 0 and zero
    gradients for the anchors and the reference, no exception (CONTRACT.md section 8)."""
    g = torch.Generator().manual_seed(0)
    B, N = (0, 30) if empty == "B=0" else (5, 0 if empty == "N=0" else 40)
    x = torch.nn.functional.normalize(torch.randn(B, 16, generator=g), dim=1).to(device).requires_grad_()
    r = torch.nn.functional.normalize(torch.randn(N, 16, generator=g), dim=1).to(device).requires_grad_()
    y, z = torch.arange(B, device=device) % 3, torch.arange(N, device=device) % 3
    ref_valid = 0 if empty == "ref_valid=0" else None
    for need_ref in (False, True):
        xx, rr = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_(need_ref)
        out = xk.losses.compute(loss, xx, y, rr, z, ref_valid=ref_valid, reduction=reduction, backend=backend)[0]
        assert out.dtype == torch.float32 and not out.detach().any(), out
        out.sum().backward()
        assert xx.grad is not None and xx.grad.shape == xx.shape and not xx.grad.any()
        if need_ref:
            assert rr.grad is not None and rr.grad.shape == rr.shape and not rr.grad.any()


def test_the_table_exercises_every_loss():
    """Over the CPU table each loss has active and inactive rows, rows without positives and
    rows without negatives; the moved parameters and some combination of the flags change a
    result on the same data (a variant that equals the defaults tests nothing)."""
    names = [n for n in cases.names("cpu") if cases.CASES[n].B * cases.CASES[n].N <= 20_000]
    for loss in LOSSES:
        counts = torch.cat([cases.expected(n, loss, "defaults")[3] for n in names])
        assert int((counts.sum(1) > 0).sum()) > 20 and int((counts.sum(1) == 0).sum()) > 5, (loss, counts.sum(0))
        defaults = cases.variants(loss)["defaults"]
        results = {}
        for variant, params in cases.variants(loss).items():
            changed = []  # on each variant's own draw: its results against the defaults' on the same data
            for n in names:
                d = cases.draw(n, loss, variant)
                mine = cases.expected(n, loss, variant)
                base = oracle.evaluate(loss, defaults, *d.args(), d.ref_valid, d.self_index, cases.weights(d.x.shape[0]))
                changed.append(not torch.equal(mine[0], base[0]) or not torch.equal(mine[3], base[3]))
            results[variant] = any(changed)
        assert not results.pop("defaults") and results.get("moved", True), (loss, results)
        flags = [v for k, v in results.items() if k not in ("moved", "pos_eps<0")]
        assert not flags or any(flags), (loss, results)  # some combination of the bool flags matters
        # pos_eps < 0 makes the exact copies positives (whether they count is the loss's rule)
        d = cases.draw("B12-copies", loss, "pos_eps<0")
        S = (d.x.double() * d.r.double()).sum(1)
        assert bool((S >= 1 - 1e-5).all()) and d.copies
    structure = {"no positives": False, "no negatives": False, "own copy in a self column": False}
    for n in names:
        d = cases.draw(n, "contrastive", "defaults")
        same = d.y[:, None] == d.z[None, :d.ref_valid]
        if d.self_index is not None:
            same &= torch.arange(d.ref_valid)[None, :] != d.self_index[:, None]
            structure["own copy in a self column"] |= any(
                0 <= int(j) < d.ref_valid and torch.equal(d.r[int(j)], d.x[i]) for i, j in enumerate(d.self_index))
        if d.ref_valid:
            structure["no positives"] |= bool((~same.any(1)).any())
            structure["no negatives"] |= bool(same.all(1).any())
    assert all(structure.values()), structure


@pytest.mark.kernels
def test_need_grad_false_gives_the_same_rows(loss, backend, device):
    """<loss>_fwd without the gradient: the same rows and counts, an empty (0,) gradient."""
    d = cases.draw(cases.PARTIAL, loss, "defaults").to(device)
    args = (d.x, d.y.int(), d.r, d.z.int(), d.self_index, d.ref_valid, *cases.variants(loss)["defaults"].values())
    fwd = getattr(xk.backends.kernel_ops(backend), f"{loss}_fwd")
    rows, grad, counts = fwd(*args, True, False)
    rows2, grad2, counts2 = fwd(*args, False, False)
    assert grad.shape == d.x.shape and grad.dtype == torch.float32 and counts.dtype == torch.int32
    assert grad2.shape == (0,) and torch.equal(rows2, rows) and torch.equal(counts2, counts)


@pytest.mark.kernels
def test_unaligned_reference_storage(loss, backend, device):
    """A reference view starting 2 bytes into its storage (no 16-byte vector loads): the same
    results, bit for bit."""
    d = cases.draw("B7-D96-K50", loss, "defaults", torch.bfloat16).to(device)
    N, D = d.r.shape
    buf = torch.empty(N * D + 1, dtype=d.r.dtype, device=device)
    buf[1:] = d.r.flatten()
    r_odd = buf[1:].view(N, D)
    assert r_odd.data_ptr() % 16 != 0
    fwd = getattr(xk.backends.kernel_ops(backend), f"{loss}_fwd")
    params = cases.variants(loss)["defaults"].values()
    a = fwd(d.x, d.y.int(), d.r, d.z.int(), None, N, *params, True, False)
    b = fwd(d.x, d.y.int(), r_odd, d.z.int(), None, N, *params, True, False)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def _rows_past_int32_element_offsets(loss, backend, device, K):
    """The enqueue writes 40 rows at the end of a memory of K rows and wraps (30 at K - 30..K - 1,
    10 at 0..9); every other row is zero with a label no anchor has. The loss reads them as it
    reads the same rows enqueued at the start (0..39, the zero rows after them): the same rows,
    counts and gradient. The contrastive loss's zero rows are inactive negatives (S = 0 <=
    margin), so there the oracle on the 40 rows alone is the answer too."""
    D = 128
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    params = cases.variants(loss)["defaults"]
    d = cases.draw_case(cases.Case("far", 5, 40, D, 3, noise=0.25), loss, params, dtype, seed=7)
    mem = torch.zeros(K, D, dtype=dtype, device=device)
    mem_labels = torch.full((K,), -7, dtype=torch.int32, device=device)
    ops = xk.backends.kernel_ops(backend)
    fwd = getattr(ops, f"{loss}_fwd")
    x, y = d.x.to(device), d.y.int().to(device)
    slots = ops.enqueue_(mem, mem_labels, d.r.to(device), d.z.to(device), K - 30)
    assert slots.tolist() == list(range(K - 30, K)) + list(range(10))
    si = torch.tensor([K - 1, -1, K - 27, 3, K // 2], device=device)
    far = fwd(x, y, mem, mem_labels, si, K, *params.values(), True, False)
    # the written rows in column order: 0..9 (r[30:]) then K-30..K-1 (r[:30]); K // 2 stays a zero row
    sub_r, sub_z = torch.cat([d.r[30:], d.r[:30]]), torch.cat([d.z[30:], d.z[:30]])
    s = si.cpu()
    sub_si = torch.where(s >= K - 30, s - (K - 30) + 10, torch.where((s >= 0) & (s < 10), s, -1))
    mem.zero_()
    mem_labels.fill_(-7)
    ops.enqueue_(mem, mem_labels, sub_r.to(device), sub_z.to(device), 0)
    near = fwd(x, y, mem, mem_labels, torch.where(sub_si >= 0, sub_si, s).to(device), K, *params.values(), True,
               False)
    assert_equal_counts(far[2], near[2].cpu().long())
    assert_close(far[0], near[0], FP32, "rows (far against near)")
    assert_close(far[1], near[1], FP32, "grad (far against near)")
    if loss == "contrastive":
        e_rows, e_grad, _, e_counts = oracle.evaluate(loss, params, d.x, d.y, sub_r, sub_z, None, sub_si)
        assert e_counts.sum() > 0
        assert_close(far[0], e_rows, FP32, "rows")
        assert_close(far[1], e_grad, FP32, "grad")
        assert_equal_counts(far[2], e_counts)


@pytest.mark.kernels
@pytest.mark.cpu_tensors
def test_rows_past_the_end_of_a_small_memory(loss, backend, device):
    """The check of test_rows_past_int32_element_offsets on CPU tensors and a small memory."""
    _rows_past_int32_element_offsets(loss, backend, device, 1000)


@pytest.mark.slow
@pytest.mark.kernels
@pytest.mark.cuda_tensors
def test_rows_past_int32_element_offsets(loss, backend, device):
    """On a GPU the memory's last rows sit past 2^31 elements (a 4.3 GB bf16 memory, hence
    slow); every loss reads them right (_rows_past_int32_element_offsets)."""
    _rows_past_int32_element_offsets(loss, backend, device, 2 ** 31 // 128 + 64)


@pytest.mark.slow
@pytest.mark.kernels
def test_memory_beyond_int32_elements(backend, device):
    """K*D = 2^31 + 128 elements (bf16, 4 GiB): offsets must be 64-bit everywhere. The loss and
    gradient equal the sums over two halves of the memory. Not under Triton's interpreter, which
    would take hours over 2^31 elements: the Triton kernels run it on a GPU."""
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton's interpreter over 2^31 elements takes hours; runs on a GPU")
    K, D, B = 2 ** 24 + 1, 128, 3
    gen = torch.Generator(device=device).manual_seed(0)
    mem = torch.empty(K, D, dtype=torch.bfloat16, device=device)
    for s in range(0, K, 1 << 20):  # filled in chunks to bound the fp32 temporaries
        e = min(K, s + (1 << 20))
        mem[s:e] = torch.nn.functional.normalize(torch.randn(e - s, D, generator=gen, device=device), dim=1)
    labels = torch.randint(0, 1000, (K,), generator=gen, device=device)
    x = mem[-B:].float().clone()  # the anchors' own copies sit in the last rows (offsets > 2^31)
    x[:, 0] += 0.01
    x = torch.nn.functional.normalize(x, dim=1).to(torch.bfloat16).requires_grad_()
    y = labels[-B:].clone()
    self_index = torch.arange(K - B, K, device=device)
    loss = xk.contrastive_loss(x, y, mem, labels, margin=0.1, self_index=self_index, reduction="sum", backend=backend)
    loss.backward()
    parts, grads = [], []
    for s, e in ((0, K // 2), (K // 2, K)):
        si = torch.where((self_index >= s) & (self_index < e), self_index - s, torch.full_like(self_index, -1))
        xp = x.detach().clone().requires_grad_()
        part = xk.contrastive_loss(xp, y, mem[s:e], labels[s:e], margin=0.1, self_index=si, reduction="sum",
                                   backend=backend)
        part.backward()
        parts.append(part.detach())
        grads.append(xp.grad.float())
    assert math.isfinite(float(loss)) and float(loss) > 0
    torch.testing.assert_close(loss.detach(), parts[0] + parts[1], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(x.grad.float(), grads[0] + grads[1], rtol=2e-2, atol=2e-2)


@pytest.mark.backends("cpu", "cuda")
@given(B=st.integers(1, 20), N=st.integers(1, 300), D=st.integers(1, 70), classes=st.integers(1, 12),
       fill=st.floats(0.0, 1.0), self_mode=st.sampled_from(["none", "random", "in-batch"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2 ** 31 - 1),
       noise=st.sampled_from([0.07, 1.0]), variant_index=st.integers(0, 5))
def test_generated_shapes_match_the_oracle(loss, backend, device, B, N, D, classes, fill, self_mode, reduction, seed,
                                           noise, variant_index):
    """Shapes, fills, self_index modes and parameter sets drawn by hypothesis (fixed seed,
    bounded examples: conftest's profile) against the oracle."""
    variant = list(cases.variants(loss))[variant_index % len(cases.variants(loss))]
    params = cases.variants(loss)[variant]
    N = B if self_mode == "in-batch" else N
    c = cases.Case("generated", B, N, D, classes, int(round(fill * N)) if self_mode != "in-batch" else None,
                   self_mode, noise=noise)
    try:
        d = cases.draw_case(c, loss, params, tries=3, seed=seed)
    except RuntimeError:
        assume(False)
    rows_e, gx_e, _, counts_e = oracle.evaluate(loss, params, *d.args(), d.ref_valid, d.self_index)
    scale = 1.0 / cases.mean_denominator(loss, counts_e) if reduction == "mean" else 1.0
    d = d.to(device)
    x = d.x.clone().requires_grad_()
    out, counts = _compute(loss, d, x, d.r, params, reduction, backend)
    assert_equal_counts(counts, counts_e)
    assert_close(out, rows_e if reduction == "none" else rows_e.sum() * scale, FP32, "loss", scale)
    out.sum().backward()
    assert_close(x.grad, gx_e * scale, FP32, "grad_x", scale)


@pytest.mark.backends("cpu", "cuda")
@pytest.mark.parametrize("loss_name, name, value, self_mode", [
    (loss_name, name, value, self_mode)
    for loss_name, name, value in [("supcon", "temperature", 1e300), ("ntxent", "temperature", 1e300),
                                   ("nca", "scale", 1e-300), ("tuplet_margin", "scale", 1e-300)]
    for self_mode in ["in-batch", "random"]])
def test_a_logit_scale_below_fp32s_range_is_the_limit(loss_name, name, value, self_mode, backend, device):
    """1 / temperature (or the logits' scale) below fp32's range: every logit is S times about 0,
    the oracle's limit, on the rows whose own column is in the memory too (the cpu epilogues keep
    the factor at fp32's smallest normal, so that the -inf they put in that column stays -inf)."""
    params = {**cases.variants(loss_name)[list(cases.variants(loss_name))[0]], name: value}
    N = 6 if self_mode == "in-batch" else 300
    c = cases.Case("generated", 6, N, 16, 3, None if self_mode == "in-batch" else 200, self_mode, noise=1.0)
    d = cases.draw_case(c, loss_name, params, seed=1)
    rows_e, gx_e, _, counts_e = oracle.evaluate(loss_name, params, *d.args(), d.ref_valid, d.self_index)
    d = d.to(device)
    x = d.x.clone().requires_grad_()
    rows, counts = _compute(loss_name, d, x, d.r, params, "none", backend)
    assert_equal_counts(counts, counts_e)
    assert_close(rows, rows_e, FP32, "rows")
    rows.sum().backward()
    assert_close(x.grad, gx_e, FP32, "grad_x")
