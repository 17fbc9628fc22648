"""Reliability: property-based tests against the oracle, a long soak of the ring against a
plain Python model, the non-finite policy, and K*D > 2^31 (slow, not in CI)."""
import math
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import xbm_kernels as xk
from common import make_case
from oracle import contrastive_oracle, multi_similarity_oracle, reduce_rows, supcon_oracle, triplet_oracle
from test_contrastive import _max_rel_err
from test_losses import _robust
from test_memory import RingModel, _assert_same

settings.register_profile("ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ORACLES = {"contrastive": contrastive_oracle, "multi_similarity": multi_similarity_oracle,
           "triplet": triplet_oracle, "supcon": supcon_oracle}
KERNEL_BACKENDS = [b for b in ("cpu",) if b in xk.available_backends()]


@given(loss=st.sampled_from(sorted(ORACLES)), backend=st.sampled_from(KERNEL_BACKENDS),
       B=st.integers(1, 20), N=st.integers(1, 300), D=st.integers(1, 70), classes=st.integers(1, 12),
       fill=st.floats(0.0, 1.0), self_mode=st.sampled_from(["none", "random", "in-batch"]),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2 ** 31 - 1),
       noise=st.sampled_from([0.07, 1.0]))
def test_property_kernels_match_oracle(loss, backend, B, N, D, classes, fill, self_mode, reduction, seed, noise):
    if self_mode == "in-batch":
        N = B
    margin = {"contrastive": 0.5, "triplet": 0.1}.get(loss)
    thresholds = (1 - 1e-5,) + ((margin,) if loss == "contrastive" else ())
    ref_valid = int(round(fill * N))
    try:
        x, y, r, z = make_case(B, N, D, classes, seed=seed, thresholds=thresholds, ref_valid=ref_valid,
                               noise=noise, tries=3)
    except RuntimeError:
        assume(False)
    gen = torch.Generator().manual_seed(seed)
    self_index = None
    if self_mode == "in-batch":
        r, z, ref_valid = x, y, B
        self_index = torch.arange(B)
    elif self_mode == "random":
        self_index = torch.randint(-1, max(ref_valid, 1), (B,), generator=gen)
    assume(loss == "contrastive" or _robust(loss, x, y, r, z, ref_valid, self_index))
    if self_mode == "in-batch":  # the diagonal is excluded; the rest must be away from thresholds
        from oracle import min_threshold_distance
        assume(min_threshold_distance(x, r, thresholds, None, self_index) > 1e-3)
    xx = x.clone().requires_grad_()
    out, counts = xk.losses.compute(loss, xx, y, r, z, ref_valid=ref_valid, self_index=self_index,
                                    reduction=reduction, backend=backend)
    rows, grad, _, exp_counts = ORACLES[loss](x, y, r, z, ref_valid=ref_valid, self_index=self_index)
    denom = max(int((exp_counts[:, 0] > 0).sum()), 1) if loss == "supcon" else B
    unit = 1.0 / denom if reduction == "mean" else 1.0
    assert _max_rel_err(out, reduce_rows(rows, reduction, denom), unit) <= 1e-5
    assert torch.equal(counts.long(), exp_counts)
    out.sum().backward()
    expected = grad / denom if reduction == "mean" else grad
    assert _max_rel_err(xx.grad, expected, unit) <= 1e-5


@given(size=st.integers(1, 40), dim=st.integers(1, 6), ops=st.lists(
    st.tuples(st.sampled_from(["enqueue", "mask", "reset", "resume"]), st.integers(0, 45), st.integers(0, 2 ** 16)),
    max_size=40))
def test_property_ring_matches_model(size, dim, ops):
    mem = xk.CrossBatchMemory(size, dim)
    model = RingModel(size)
    for kind, b, seed in ops:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(b, dim, generator=gen) + 0.25
        y = torch.randint(0, 7, (b,), generator=gen)
        if kind == "reset":
            mem.reset()
            model = RingModel(size)
        elif kind == "resume":
            fresh = xk.CrossBatchMemory(size, dim)
            fresh.load_state_dict(mem.state_dict())
            mem = fresh
        else:
            mask = (torch.rand(b, generator=gen) < 0.5) if kind == "mask" else None
            n = b if mask is None else int(mask.sum())
            if n > size:
                before = {k: v.clone() for k, v in mem.state_dict().items()}
                with pytest.raises(ValueError, match="larger than the memory"):
                    mem.enqueue(x, y, mask=mask)
                assert all(torch.equal(v, before[k]) for k, v in mem.state_dict().items())
                continue
            slots = mem.enqueue(x, y, mask=mask)
            sel = x if mask is None else x[mask]
            ysel = y if mask is None else y[mask]
            assert slots.tolist() == model.enqueue(list(sel), ysel.tolist())
        _assert_same(mem, model)


def test_soak_100k_operations_against_the_model():
    """100k random enqueues (random sizes and masks), resets and state_dict round trips,
    the ring checked against the Python model after every operation."""
    rng = random.Random(1234)
    size, dim = 53, 3
    mem = xk.CrossBatchMemory(size, dim)
    model = RingModel(size)
    pool = torch.randn(4096, dim) + 0.5
    for op in range(100_000):
        u = rng.random()
        if u < 0.002:
            mem.reset()
            model = RingModel(size)
        elif u < 0.01:
            fresh = xk.CrossBatchMemory(size, dim)
            fresh.load_state_dict(mem.state_dict())
            mem = fresh
        else:
            b = rng.randint(0, 20)
            start = rng.randint(0, pool.shape[0] - b)
            x = pool[start:start + b]
            y = torch.arange(start, start + b)
            mask = None
            if u < 0.3:
                mask = torch.tensor([rng.random() < 0.6 for _ in range(b)], dtype=torch.bool)
                x, y = x[mask], y[mask]
            slots = mem.enqueue(pool[start:start + b], torch.arange(start, start + b), mask=mask)
            expected = model.enqueue(list(range(start, start + b)) if mask is None else
                                     [start + i for i in range(b) if mask[i]], y.tolist())
            if slots.tolist() != expected:
                raise AssertionError(f"op {op}: slots {slots.tolist()} != {expected}")
        assert len(mem) == model.filled and mem._ptr == model.ptr, op
        if model.filled and (op % 50 == 0 or u < 0.01):
            emb, lab = mem.get()
            assert lab.tolist() == model.labels[:model.filled], op
            assert torch.equal(emb, pool[lab.long()]), op


@pytest.mark.parametrize("loss", sorted(ORACLES))
def test_long_training_loop_stays_finite(loss):
    torch.manual_seed(0)
    net = torch.nn.Linear(20, 16)
    crit = xk.XBMLoss(256, 16, loss=loss, memory_dtype=torch.bfloat16, start_iteration=5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    centres = torch.randn(30, 20)
    for step in range(150):
        y = torch.randint(0, 30, (24,))
        emb = torch.nn.functional.normalize(net(centres[y] + 0.5 * torch.randn(24, 20)), dim=1)
        loss_v = crit(emb, y)
        opt.zero_grad()
        loss_v.backward()
        assert math.isfinite(float(loss_v.detach())), step
        assert all(torch.isfinite(p.grad).all() for p in net.parameters()), step
        opt.step()
    assert torch.isfinite(crit.memory.embeddings.float()).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("masked", [False, True])
def test_nonfinite_rows_are_rejected_and_nothing_is_written(bad, masked):
    mem = xk.CrossBatchMemory(10, 4)
    mem.enqueue(torch.randn(3, 4), torch.arange(3))
    before = {k: v.clone() for k, v in mem.state_dict().items()}
    x = torch.randn(4, 4)
    x[2, 1] = bad
    mask = torch.tensor([True, False, True, True]) if masked else None
    with pytest.raises(ValueError, match=r"embeddings: 1 row\(s\) with NaN/Inf"):
        mem.enqueue(x, torch.arange(4), mask=mask)
    assert all(torch.equal(v, before[k]) for k, v in mem.state_dict().items()) and len(mem) == 3


def test_nonfinite_row_masked_out_is_fine():
    mem = xk.CrossBatchMemory(10, 4)
    x = torch.randn(4, 4)
    x[1, 0] = float("nan")
    mem.enqueue(x, torch.arange(4), mask=torch.tensor([True, False, True, True]))
    assert len(mem) == 3 and torch.isfinite(mem.get()[0]).all()


def test_xbm_loss_rejects_nonfinite_batch_without_changing_state():
    crit = xk.XBMLoss(32, 4)
    crit(torch.nn.functional.normalize(torch.randn(6, 4), dim=1), torch.arange(6) % 3)
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    x = torch.randn(6, 4)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        crit(x, torch.arange(6) % 3)
    assert all(torch.equal(v, before[k]) for k, v in crit.state_dict().items()) and crit._iteration == 1


def test_check_finite_off_writes_as_given():
    mem = xk.CrossBatchMemory(4, 2, check_finite=False)
    mem.enqueue(torch.tensor([[float("nan"), 0.0]]), torch.tensor([1]))
    assert torch.isnan(mem.get()[0][0, 0])


@pytest.mark.slow
def test_large_memory_k_times_d_above_2_31_cpu():
    """K*D = 2^31 + 128 elements (bf16, 4 GiB): offsets must be 64-bit everywhere. The
    loss is compared with the sum of reference losses over two halves of the memory."""
    K, D, B = 2 ** 24 + 1, 128, 3
    gen = torch.Generator().manual_seed(0)
    mem = torch.empty(K, D, dtype=torch.bfloat16)
    chunk = 1 << 20
    for s in range(0, K, chunk):  # filled in chunks to bound the fp32 temporaries
        e = min(K, s + chunk)
        mem[s:e] = torch.nn.functional.normalize(torch.randn(e - s, D, generator=gen), dim=1)
    labels = torch.randint(0, 1000, (K,), generator=gen)
    x = mem[-B:].float().clone()  # the anchors' own copies sit in the last columns (> 2^31 / D)
    x[:, 0] += 0.01
    x = torch.nn.functional.normalize(x, dim=1).requires_grad_()
    y = labels[-B:].clone()
    self_index = torch.arange(K - B, K)
    loss = xk.contrastive_loss(x, y, mem, labels, margin=0.1, self_index=self_index, reduction="sum", backend="cpu")
    loss.backward()
    half = K // 2
    parts = []
    for s, e in ((0, half), (half, K)):
        si = torch.where((self_index >= s) & (self_index < e), self_index - s, torch.full_like(self_index, -1))
        parts.append(xk.contrastive_loss(x.detach(), y, mem[s:e], labels[s:e], margin=0.1, self_index=si,
                                         reduction="sum", backend="cpu"))
    expected = parts[0] + parts[1]
    assert math.isfinite(float(loss)) and float(loss) > 0
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-3)
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
