"""XBMLoss composition: in-batch loss + weight x memory loss after the enqueue."""
import pytest
import torch
import torch.nn.functional as F

import xbm_kernels as xk
from common import make_case
from oracle import contrastive_oracle

BACKENDS = ["reference", "cpu"]


def _batches(n, B=12, D=16, classes=5):
    out = []
    for s in range(n):
        x, y, _, _ = make_case(B, 1, D, classes, seed=100 + s, thresholds=(0.5, 1 - 1e-5))
        out.append((x, y))
    return out


def _expected(x, y, mem_x, mem_y, slots, weight):
    """Oracle of one step: in-batch (self by index) + weight * memory (self slots)."""
    B = x.shape[0]
    rows_b, grad_b, grad_ref_b, _ = contrastive_oracle(x, y, x, y, 0.5, 1e-5, None, torch.arange(B))
    rows_m, grad_m, _, _ = contrastive_oracle(x, y, mem_x, mem_y, 0.5, 1e-5, None, slots)
    loss = rows_b.sum() / B + weight * rows_m.sum() / B
    grad = (grad_b + grad_ref_b) / B + weight * grad_m / B
    return loss, grad


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_match_oracle_with_wraparound(backend, normalize):
    """normalize=True: the oracle sees normalize(x) and the gradient goes back through it,
    d/dx L(x / |x|) = (g - u (u . g)) / |x| with u = x / |x| and g the gradient at u."""
    crit = xk.XBMLoss(30, 16, weight=0.7, backend=backend, normalize=normalize)
    model_x, model_y = [], []
    for step, (raw, y) in enumerate(_batches(5)):  # 5 x 12 rows through a 30-row ring
        raw = raw * (1 + 0.5 * torch.arange(12.0)[:, None]) if normalize else raw  # rows of other norms
        x = raw.clone().requires_grad_()
        loss = crit(x, y)
        loss.backward()
        x0 = F.normalize(raw, dim=1) if normalize else raw
        model_x += list(x0)
        model_y += y.tolist()
        ring_x, ring_y = [None] * 30, [None] * 30
        for k, (row, lab) in enumerate(zip(model_x, model_y)):
            ring_x[k % 30], ring_y[k % 30] = row, lab
        n = min(30, len(model_x))
        mem_x, mem_y = torch.stack(ring_x[:n]), torch.tensor(ring_y[:n])
        slots = torch.tensor([(step * 12 + i) % 30 for i in range(12)])
        exp_loss, exp_grad = _expected(x0, y, mem_x, mem_y, slots, 0.7)
        if normalize:
            u, norm = x0.double(), raw.double().norm(dim=1, keepdim=True)
            exp_grad = (exp_grad - u * (u * exp_grad).sum(1, keepdim=True)) / norm
        assert torch.equal(crit.memory.get()[0], mem_x)
        torch.testing.assert_close(loss.double(), exp_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), exp_grad, rtol=1e-5, atol=1e-6)
        stats = crit.last_stats
        assert set(stats) == {"in_batch_pos", "in_batch_neg", "memory_pos", "memory_neg"}
        counts = contrastive_oracle(x0, y, mem_x, mem_y, 0.5, 1e-5, None, slots)[3].sum(0)
        assert int(stats["memory_pos"]) == int(counts[0]) and int(stats["memory_neg"]) == int(counts[1])
    assert int(crit.iteration) == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_iteration_delays_the_memory(backend):
    crit = xk.XBMLoss(64, 16, start_iteration=2, backend=backend)
    batches = _batches(3)
    for step, (x, y) in enumerate(batches):
        loss = crit(x, y)
        in_batch = xk.contrastive_loss(x, y, x, y, self_index=torch.arange(12), backend="reference")
        if step < 2:  # every key every step: the memory's counts are 0 before it joins
            assert len(crit.memory) == 0 and int(crit.last_stats["memory_pos"]) == 0
            torch.testing.assert_close(loss, in_batch)
        else:
            assert len(crit.memory) == 12
            assert float(loss) > float(in_batch) - 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_enqueue_mask_writes_selected_rows_and_excludes_their_self_slots(backend):
    (x0, y), (x1, y1) = _batches(2)
    crit = xk.XBMLoss(64, 16, backend=backend, normalize=False)
    crit(x0, y)
    mask = torch.tensor([True, False] * 6)
    loss = crit(x1, y1, enqueue_mask=mask)
    assert len(crit.memory) == 18
    mem_x, mem_y = crit.memory.get()
    assert torch.equal(mem_x[12:], x1[mask])
    slots = torch.full((12,), -1, dtype=torch.int64)
    slots[mask] = torch.arange(12, 18)
    exp_loss, _ = _expected(x1, y1, mem_x, mem_y.long(), slots, 1.0)
    torch.testing.assert_close(loss.double(), exp_loss, rtol=1e-5, atol=1e-6)


def test_backends_agree_and_bf16_memory_keeps_dtype():
    batches = _batches(4)
    crits = {b: xk.XBMLoss(40, 16, memory_dtype=torch.bfloat16, backend=b) for b in BACKENDS}
    for x, y in batches:
        losses = {b: c(x, y) for b, c in crits.items()}
        torch.testing.assert_close(losses["cpu"], losses["reference"], rtol=2e-2, atol=1e-3)
    assert all(c.memory.embeddings.dtype == torch.bfloat16 for c in crits.values())


def test_state_dict_resume_gives_identical_losses():
    batches = _batches(6)
    straight = xk.XBMLoss(30, 16, start_iteration=1)
    ref_losses = [float(straight(x, y)) for x, y in batches]
    first = xk.XBMLoss(30, 16, start_iteration=1)
    losses = [float(first(x, y)) for x, y in batches[:3]]
    resumed = xk.XBMLoss(30, 16, start_iteration=1)
    resumed.load_state_dict(first.state_dict())
    losses += [float(resumed(x, y)) for x, y in batches[3:]]
    assert losses == ref_losses


def test_unknown_loss_lists_available():
    with pytest.raises(ValueError, match=r"loss: unknown loss 'arcface'; available: \['contrastive'"):
        xk.XBMLoss(10, 4, loss="arcface")


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(margin=float("nan")), ValueError, "margin"),
    (dict(temperature=0.1), TypeError, "unexpected keyword"),
    (dict(weight="1"), TypeError, "weight"),
    (dict(start_iteration=-1), ValueError, "start_iteration"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(backend="fast"), ValueError, "backend"),
    (dict(memory_dtype=torch.int8), TypeError, "dtype"),
])
def test_bad_constructor_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        xk.XBMLoss(10, 4, **kwargs)


@pytest.mark.parametrize("args,exc,msg", [
    (lambda x, y: (x[:, :3], y), ValueError, "embeddings: expected dim 16"),
    (lambda x, y: (x, y[:5]), ValueError, "labels: expected 12"),
    (lambda x, y: (x, y.float()), TypeError, "labels: expected an integer"),
    (lambda x, y: (torch.cat([x, x, x]), torch.cat([y, y, y])), ValueError, "larger than the memory"),
])
def test_bad_forward_inputs_change_nothing(args, exc, msg):
    crit = xk.XBMLoss(30, 16)
    (x, y), = _batches(1)
    crit(x, y)
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    with pytest.raises(exc, match=msg):
        crit(*args(x, y))
    for k, v in crit.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert crit._iteration == 1 and len(crit.memory) == 12
