"""XBMLoss (CONTRACT.md section 2): in-batch loss + weight x memory loss after the enqueue,
against the oracle over a wrapping memory; the same steps on every kernel backend as on the
reference; the warm-up, the enqueue mask, resume, normalisation, reset, statistics, the
docstring and repr; every configuration error raised at the first step and a failed step or
load that changes nothing; long training that stays finite."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import xbm_kernels as xk
from xbm_kernels import xbm as xbm_module

import cases
from compare import FP32, assert_close, assert_unchanged, snapshot
from oracle import contrastive_oracle

BACKENDS = ["reference", "cpu"]


def _batches(n, B=12, D=16, classes=5):
    """n batches whose pairs, within and across batches, keep away from the contrastive thresholds."""
    c = cases.Case("xbm-steps", B * n, B * n, D, classes, None, "in-batch", noise=0.07)
    d = cases.draw_case(c, "contrastive", cases.variants("contrastive")["defaults"], seed=100)
    return [(d.x[s * B:(s + 1) * B], d.y[s * B:(s + 1) * B]) for s in range(n)]


def _expected(x, y, mem_x, mem_y, slots, weight):
    """Oracle of one step: in-batch (self by index) + weight * memory (self slots)."""
    B = x.shape[0]
    rows_b, grad_b, grad_ref_b, _ = contrastive_oracle(x, y, x, y, 0.5, 1e-5, None, torch.arange(B))
    rows_m, grad_m, _, _ = contrastive_oracle(x, y, mem_x, mem_y, 0.5, 1e-5, None, slots)
    loss = rows_b.sum() / B + weight * rows_m.sum() / B
    grad = (grad_b + grad_ref_b) / B + weight * grad_m / B
    return loss, grad


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("xbm_backend", BACKENDS)
def test_steps_match_oracle_with_wraparound(xbm_backend, normalize):
    """normalize=True: the oracle sees normalize(x) and the gradient goes back through it,
    d/dx L(x / |x|) = (g - u (u . g)) / |x| with u = x / |x| and g the gradient at u."""
    crit = xk.XBMLoss(30, 16, loss="contrastive", weight=0.7, backend=xbm_backend, normalize=normalize)
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


@pytest.mark.parametrize("xbm_backend", BACKENDS)
def test_start_iteration_delays_the_memory(xbm_backend):
    crit = xk.XBMLoss(64, 16, loss="contrastive", start_iteration=2, backend=xbm_backend)
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


@pytest.mark.parametrize("xbm_backend", BACKENDS)
def test_enqueue_mask_writes_selected_rows_and_excludes_their_self_slots(xbm_backend):
    (x0, y), (x1, y1) = _batches(2)
    crit = xk.XBMLoss(64, 16, loss="contrastive", backend=xbm_backend, normalize=False)
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
    with pytest.raises(ValueError, match=re.escape(f"loss: unknown loss 'arcface'; available: {sorted(xk.LOSSES)}")):
        xk.XBMLoss(10, 4, loss="arcface")


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(loss="contrastive", margin=float("nan")), ValueError, "margin"),
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



@pytest.mark.kernels
def test_steps_on_every_backend_match_the_reference(loss, backend, device):
    """A few steps through a wrapping memory (in-batch + memory loss, self slots after the
    wrap): loss and gradient as the reference backend gives them."""
    crits = {b: xk.XBMLoss(memory_size=40, embedding_dim=24, loss=loss, backend=b).to(device)
             for b in ("reference", backend)}
    for step in range(4):
        x0, y = cases.rows_around(cases.class_centres(5, 24, torch.Generator().manual_seed(9)),
                                  torch.arange(12) % 5, torch.Generator().manual_seed(step), 0.3).float(), \
            torch.arange(12) % 5
        out = {}
        for b, crit in crits.items():
            x = x0.to(device).requires_grad_()
            val = crit(x, y.to(device))
            val.backward()
            out[b] = (val.detach(), x.grad)
        assert_close(out[backend][0], out["reference"][0].double(), FP32, f"step {step} loss")
        assert_close(out[backend][1], out["reference"][1].double(), FP32, f"step {step} grad")
    assert torch.equal(crits[backend].memory.labels, crits["reference"].memory.labels)


def test_xbm_loss_accepts_every_loss(loss):
    crit = xk.XBMLoss(64, 16, loss=loss)
    (x, y), = _batches(1)
    for _ in range(3):
        xx = x.clone().requires_grad_()
        out = crit(xx, y)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(xx.grad).all()
    assert len(crit.memory) == 36


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


def test_xbm_loss_rejects_nonfinite_batch_without_changing_state():
    crit = xk.XBMLoss(32, 4)
    crit(torch.nn.functional.normalize(torch.randn(6, 4), dim=1), torch.arange(6) % 3)
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    x = torch.randn(6, 4)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        crit(x, torch.arange(6) % 3)
    assert all(torch.equal(v, before[k]) for k, v in crit.state_dict().items()) and crit._iteration == 1



def _trained_xbm(size, steps=2, **kw):
    crit = xk.XBMLoss(size, 4, **kw)
    g = torch.Generator().manual_seed(size)
    for _ in range(steps):
        crit(F.normalize(torch.randn(6, 4, generator=g), dim=1), torch.arange(6) % 3)
    return crit


def _bad_xbm_states():
    good = _trained_xbm(16, steps=3).state_dict()
    yield "size-8 state", _trained_xbm(8).state_dict()
    yield "negative step", dict(good, iteration=torch.tensor(-1))
    yield "float step", dict(good, iteration=torch.tensor(2.0))
    yield "memory counters", {**good, "memory.ptr": torch.tensor(5), "memory.num_filled": torch.tensor(3)}
    yield "missing step", {k: v for k, v in good.items() if k != "iteration"}
    yield "memory missing", {"iteration": good["iteration"]}


BAD_XBM_STATES = list(_bad_xbm_states())


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("what,state", BAD_XBM_STATES, ids=[c for c, _ in BAD_XBM_STATES])
def test_xbm_failed_load_changes_nothing(what, state, strict):
    crit = _trained_xbm(16, steps=1)
    snap = snapshot(crit)
    with pytest.raises((ValueError, TypeError), match="state_dict"):
        crit.load_state_dict(state, strict=strict)
    assert_unchanged(crit, snap)


def test_xbm_failed_load_inside_a_model_changes_nothing():
    model = torch.nn.Module()
    model.crit = _trained_xbm(16, steps=1)
    state = {"crit." + k: v for k, v in _trained_xbm(8).state_dict().items()}
    snap = snapshot(model.crit)
    with pytest.raises(ValueError, match=r"state_dict: 'crit\.memory\.embeddings'"):
        model.load_state_dict(state)
    assert_unchanged(model.crit, snap)


def test_xbm_loss_rejects_overflow_into_an_fp16_memory_without_changing_state():
    crit = xk.XBMLoss(32, 4, memory_dtype=torch.float16, normalize=False)
    crit(F.normalize(torch.randn(6, 4), dim=1), torch.arange(6) % 3)
    snap = snapshot(crit)
    x = F.normalize(torch.randn(6, 4), dim=1)
    x[3, 2] = 1e5
    with pytest.raises(ValueError, match=r"embeddings: 1 row\(s\)"):
        crit(x, torch.arange(6) % 3)
    assert_unchanged(crit, snap)


@pytest.mark.parametrize("xbm_backend", BACKENDS)
@pytest.mark.parametrize("bad", ["nan", "overflow"])
def test_deferred_check_refuses_a_bad_step_and_the_next_step_raises(xbm_backend, bad):
    """The CUDA path (forced on CPU tensors): a step with a bad batch returns its loss without
    writing its rows; the next step raises naming `embeddings` before it changes anything, and
    the memory is then as it was before the bad step (the step counter counts the bad step,
    whose loss was returned). The step after that trains on as if the bad batch never came."""
    crit = xk.XBMLoss(16, 16, loss="contrastive", backend=xbm_backend, memory_dtype=torch.float16, normalize=False)
    crit.memory._deferred_check = True
    batches = _batches(4, B=6)
    for x, y in batches[:2]:
        crit(x, y)
    snap = snapshot(crit.memory)
    rows = crit.memory.embeddings.clone()
    x, y = batches[2]
    x = x.clone()
    x[1, 3] = float("nan") if bad == "nan" else 1e5  # 1e5: finite in fp32, beyond float16's 65504
    crit(x, y)  # no error yet: the flag is on the device
    assert torch.equal(crit.memory.embeddings, rows), "the bad batch was written"
    with pytest.raises(ValueError, match=r"embeddings: 1 row\(s\) with NaN/Inf in the memory dtype torch.float16 "
                                         r"\(first: row 1 of the batch of the previous enqueue"):
        crit(*batches[3])
    assert_unchanged(crit.memory, snap)
    assert crit._iteration == 3
    # the next step goes on from the memory before the bad batch: the same loss as a module
    # that never saw it
    twin = xk.XBMLoss(16, 16, loss="contrastive", backend=xbm_backend, memory_dtype=torch.float16, normalize=False)
    for x, y in batches[:2]:
        twin(x, y)
    assert torch.equal(crit(*batches[3]), twin(*batches[3]))
    assert all(torch.equal(v, twin.memory.state_dict()[k]) for k, v in crit.memory.state_dict().items())


FIRST_STEP = [
    (dict(), lambda x, y: (x, y, None), ValueError, "larger than the memory"),
    (dict(memory_size=16), lambda x, y: (x, y, torch.ones(5, dtype=torch.bool)), ValueError, "enqueue_mask: expected 16"),
    (dict(memory_size=16), lambda x, y: (x, y, torch.ones(16)), TypeError, "enqueue_mask: expected dtype"),
    (dict(memory_size=16), lambda x, y: (x, y, torch.ones(16, dtype=torch.bool).to("meta")), ValueError,
     "enqueue_mask: expected a tensor on"),
    (dict(memory_size=16), lambda x, y: (x, y.tolist(), None), TypeError, "labels: expected a torch.Tensor"),
    (dict(memory_size=16), lambda x, y: (x, y.float(), None), TypeError, "labels: expected an integer"),
    (dict(memory_size=16), lambda x, y: (x[:, :3], y, None), ValueError, "embeddings: expected dim 4"),
    (dict(memory_size=16), lambda x, y: (x.to("meta"), y.to("meta"), None), ValueError, "memory is on"),
    (dict(memory_size=16), lambda x, y: (x.tolist(), y, None), TypeError, "embeddings: expected a torch.Tensor"),
]


@pytest.mark.parametrize("kw,make,exc,msg", FIRST_STEP)
def test_configuration_errors_surface_at_the_first_step(kw, make, exc, msg):
    crit = xk.XBMLoss(**{"memory_size": 8, **kw}, embedding_dim=4, start_iteration=5)
    x, y = F.normalize(torch.randn(16, 4), dim=1), torch.arange(16) % 4
    snap = snapshot(crit)
    args = make(x, y)
    with pytest.raises(exc, match=msg):
        crit(args[0], args[1], enqueue_mask=args[2])
    assert_unchanged(crit, snap)


def test_masked_batch_larger_than_the_memory_is_fine_when_few_rows_are_enqueued():
    crit = xk.XBMLoss(8, 4, start_iteration=1)
    x, y = F.normalize(torch.randn(16, 4), dim=1), torch.arange(16) % 4
    mask = torch.arange(16) < 6
    crit(x, y, enqueue_mask=mask)
    crit(x, y, enqueue_mask=mask)
    assert len(crit.memory) == 6


def test_gathered_batch_is_checked_against_the_memory_before_it_joins(monkeypatch):
    crit = xk.XBMLoss(16, 4, start_iteration=5, gather_distributed=True)
    x, y = F.normalize(torch.randn(12, 4), dim=1), torch.arange(12) % 4
    crit(x, y)  # one process: 12 rows fit
    monkeypatch.setattr(xbm_module.dist, "is_available", lambda: True)
    monkeypatch.setattr(xbm_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(xbm_module.dist, "get_world_size", lambda *a: 2)
    snap = snapshot(crit)
    with pytest.raises(ValueError, match=r"embeddings: .*2 ranks x 12 rows.*larger than the memory \(size 16\)"):
        crit(x, y)
    assert_unchanged(crit, snap)


NORMALIZE_CASES = [(loss, "reference") for loss in sorted(xk.LOSSES)] + [("contrastive", b) for b in BACKENDS
                                                                          if b != "reference"]


@pytest.mark.parametrize("norm_loss,xbm_backend", NORMALIZE_CASES)
def test_normalize_makes_the_loss_scale_free(norm_loss, xbm_backend):
    g = torch.Generator().manual_seed(5)
    batches = [(F.normalize(torch.randn(12, 8, generator=g), dim=1), torch.randint(0, 4, (12,), generator=g))
               for _ in range(3)]
    a, b = xk.XBMLoss(64, 8, loss=norm_loss, backend=xbm_backend), xk.XBMLoss(64, 8, loss=norm_loss, backend=xbm_backend)
    for x, y in batches:
        x1, x3 = x.clone().requires_grad_(), (3 * x).requires_grad_()
        la, lb = a(x1, y), b(x3, y)
        la.backward()
        lb.backward()
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(3 * x3.grad, x1.grad, rtol=1e-4, atol=1e-6)  # d/dx of L(x / |x|) at 3x
    torch.testing.assert_close(b.memory.get()[0], a.memory.get()[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.memory.get()[0].norm(dim=1), torch.ones(36))


def test_normalize_false_keeps_the_raw_batch():
    g = torch.Generator().manual_seed(5)
    x, y = F.normalize(torch.randn(12, 8, generator=g), dim=1), torch.arange(12) % 4
    raw = xk.XBMLoss(64, 8, loss="contrastive", normalize=False)
    expected = xk.contrastive_loss(3 * x, y, 3 * x, y, self_index=torch.arange(12), backend="reference")
    expected = expected + xk.contrastive_loss(3 * x, y, 3 * x, y, self_index=torch.arange(12), backend="reference")
    torch.testing.assert_close(raw(3 * x, y), expected)
    assert torch.equal(raw.memory.get()[0], 3 * x)
    assert float(xk.XBMLoss(64, 8, loss="contrastive")(3 * x, y)) < float(expected) / 2


def test_memory_reset_keeps_the_step_and_xbm_reset_restarts_the_warm_up():
    crit = xk.XBMLoss(32, 4, start_iteration=2)
    x, y = F.normalize(torch.randn(6, 4), dim=1), torch.arange(6) % 3
    for _ in range(3):
        crit(x, y)
    assert len(crit.memory) == 6 and crit._iteration == 3
    crit.memory.reset()  # the memory only
    assert len(crit.memory) == 0 and crit._iteration == 3 and int(crit.iteration) == 3
    crit(x, y)
    assert len(crit.memory) == 6
    crit.reset(step=False)
    assert len(crit.memory) == 0 and crit._iteration == 4
    crit.reset()
    assert len(crit.memory) == 0 and crit._iteration == 0 and int(crit.iteration) == 0
    crit(x, y)
    crit(x, y)
    assert len(crit.memory) == 0  # warm-up again: the memory joins at step 2
    crit(x, y)
    assert len(crit.memory) == 6


def test_xbm_loss_has_a_docstring_and_a_repr():
    doc = xk.XBMLoss.__doc__
    assert doc is not None
    for word in ("memory_size", "embedding_dim", "loss", "weight", "start_iteration", "memory_dtype",
                 "gather_distributed", "backend", "reduction", "check_finite", "normalize", "enqueue_mask",
                 "last_stats", "in_batch_pos", "memory_neg", "reset"):
        assert word in doc, word
    crit = xk.XBMLoss(64, 8, loss="triplet", weight=0.25, start_iteration=7, margin=0.2)
    crit(F.normalize(torch.randn(4, 8), dim=1), torch.arange(4) % 2)
    text = repr(crit)
    for part in ("loss='triplet'", "margin=0.2", "pos_eps=1e-05", "weight=0.25", "start_iteration=7",
                 "reduction='mean'", "backend='auto'", "normalize=True", "step=1"):
        assert part in text, (part, text)


@pytest.mark.parametrize("xbm_backend", BACKENDS)
def test_last_stats_has_every_key_every_step(xbm_backend):
    crit = xk.XBMLoss(32, 4, start_iteration=1, backend=xbm_backend)
    x, y = F.normalize(torch.randn(6, 4), dim=1), torch.arange(6) % 3
    crit(x, y)
    stats = crit.last_stats
    assert set(stats) == {"in_batch_pos", "in_batch_neg", "memory_pos", "memory_neg"}
    assert int(stats["memory_pos"]) == 0 and int(stats["memory_neg"]) == 0
    assert int(stats["in_batch_pos"]) > 0 and all(v.dtype == stats["in_batch_pos"].dtype for v in stats.values())
    crit(x, y)
    assert int(crit.last_stats["memory_pos"]) > 0



def test_a_step_checks_each_argument_once(monkeypatch):
    """XBMLoss validates a step once (CONTRACT.md section 7; STYLE.md item 15): one check of
    `embeddings` per step and no loss-parameter check after the constructor, also once the
    memory has joined (in-batch loss, enqueue and memory loss)."""
    import collections

    from xbm_kernels import _validate
    from xbm_kernels.registry import Param
    crit = xk.XBMLoss(32, 8, loss="multi_similarity", backend="cpu")
    calls = collections.Counter()
    tensor, check = _validate.tensor, Param.check

    def counting_tensor(name, *a, **k):
        calls[name] += 1
        return tensor(name, *a, **k)

    def counting_check(self, *a, **k):
        calls["param " + self.name] += 1
        return check(self, *a, **k)

    monkeypatch.setattr(_validate, "tensor", counting_tensor)
    monkeypatch.setattr(Param, "check", counting_check)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        calls.clear()
        crit(torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g))
        assert calls["embeddings"] == 1 and calls["labels"] == 1, (step, dict(calls))
        assert not [k for k in calls if k.startswith("param ")], (step, dict(calls))
