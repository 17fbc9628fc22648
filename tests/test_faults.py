"""Regressions for faults found by probing the memory, XBMLoss, the argument checks and
the build: failed loads that changed state, overflow on the cast into the memory, errors
that surfaced only when the memory joined, unsigned and list labels, the build without
torch, the unnormalised batch, and the module's reset, docstring, repr and statistics."""
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import xbm_kernels as xk
from xbm_kernels import xbm as xbm_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = [b for b in ("reference", "cpu") if b in xk.available_backends()]


def _snapshot(module):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    host = {name: (m._ptr, m._num_filled) for name, m in module.named_modules() if isinstance(m, xk.CrossBatchMemory)}
    if isinstance(module, xk.XBMLoss):
        host["step"] = module._iteration
    return state, host


def _assert_unchanged(module, snap):
    state, host = _snapshot(module)
    before_state, before_host = snap
    assert set(state) == set(before_state)
    for k, v in state.items():
        assert v.dtype == before_state[k].dtype and torch.equal(v, before_state[k]), f"{k} changed"
    assert host == before_host


def _filled_memory(size=8, dim=3, n=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mem = xk.CrossBatchMemory(size, dim, dtype=dtype)
    mem.enqueue(F.normalize(torch.randn(n, dim, generator=g), dim=1), torch.arange(n) + 10 * seed)
    return mem


# --- a failed load_state_dict changes nothing -------------------------------------------

def _bad_memory_states():
    good = _filled_memory(seed=1).state_dict()
    yield "other dim", _filled_memory(dim=4, n=6, seed=1).state_dict()
    yield "other size", _filled_memory(size=16, n=6, seed=1).state_dict()
    yield "labels shape", dict(good, labels=good["labels"][:4])
    yield "float labels", dict(good, labels=good["labels"].float())
    yield "integer embeddings", dict(good, embeddings=good["embeddings"].long())
    yield "2-D ptr", dict(good, ptr=good["ptr"].view(1, 1))
    yield "float counters", dict(good, ptr=torch.tensor(3.0), num_filled=torch.tensor(3.0))
    yield "bad counters", dict(good, ptr=torch.tensor(5), num_filled=torch.tensor(3))
    yield "labels beyond int32", dict(good, labels=good["labels"].long() + 2 ** 40)
    yield "missing ptr", {k: v for k, v in good.items() if k != "ptr"}
    yield "missing embeddings", {k: v for k, v in good.items() if k != "embeddings"}


BAD_MEMORY_STATES = list(_bad_memory_states())


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("case,state", BAD_MEMORY_STATES, ids=[c for c, _ in BAD_MEMORY_STATES])
def test_memory_failed_load_changes_nothing(case, state, strict):
    mem = _filled_memory()
    snap = _snapshot(mem)
    with pytest.raises((ValueError, TypeError), match="state_dict"):
        mem.load_state_dict(state, strict=strict)
    _assert_unchanged(mem, snap)


def test_memory_load_casts_a_checkpoint_of_another_dtype_and_keeps_its_own():
    src = _filled_memory(n=8)
    mem = xk.CrossBatchMemory(8, 3, dtype=torch.bfloat16)
    state = dict(src.state_dict(), labels=src.labels.long())
    mem.load_state_dict(state)
    assert mem.dtype == torch.bfloat16 and mem.labels.dtype == torch.int32 and len(mem) == 8
    assert torch.equal(mem.embeddings, src.embeddings.bfloat16()) and torch.equal(mem.labels, src.labels)


def test_memory_load_with_assign_keeps_dtypes():
    src = _filled_memory(n=8)
    mem = xk.CrossBatchMemory(8, 3, dtype=torch.bfloat16)
    mem.load_state_dict(dict(src.state_dict(), labels=src.labels.long()), assign=True)
    assert mem.dtype == torch.bfloat16 and mem.labels.dtype == torch.int32 and len(mem) == 8
    assert mem.enqueue(torch.randn(2, 3), torch.arange(2)).tolist() == [0, 1]


def test_memory_load_of_an_overflowing_checkpoint_changes_nothing():
    src = _filled_memory(n=8)
    state = src.state_dict()
    state["embeddings"] = state["embeddings"].clone()
    state["embeddings"][2, 1] = 1e5  # finite in fp32, inf in the fp16 memory
    mem = _filled_memory(dtype=torch.float16)
    snap = _snapshot(mem)
    with pytest.raises(ValueError, match="state_dict"):
        mem.load_state_dict(state)
    _assert_unchanged(mem, snap)


def test_memory_strict_false_without_its_entries_changes_nothing():
    mem = _filled_memory()
    snap = _snapshot(mem)
    result = mem.load_state_dict({}, strict=False)
    assert sorted(result.missing_keys) == ["embeddings", "labels", "num_filled", "ptr"]
    _assert_unchanged(mem, snap)


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
@pytest.mark.parametrize("case,state", BAD_XBM_STATES, ids=[c for c, _ in BAD_XBM_STATES])
def test_xbm_failed_load_changes_nothing(case, state, strict):
    crit = _trained_xbm(16, steps=1)
    snap = _snapshot(crit)
    with pytest.raises((ValueError, TypeError), match="state_dict"):
        crit.load_state_dict(state, strict=strict)
    _assert_unchanged(crit, snap)


def test_xbm_failed_load_inside_a_model_changes_nothing():
    model = torch.nn.Module()
    model.crit = _trained_xbm(16, steps=1)
    state = {"crit." + k: v for k, v in _trained_xbm(8).state_dict().items()}
    snap = _snapshot(model.crit)
    with pytest.raises(ValueError, match=r"state_dict: 'crit\.memory\.embeddings'"):
        model.load_state_dict(state)
    _assert_unchanged(model.crit, snap)


# --- values that overflow the memory dtype are rejected ---------------------------------

OVERFLOW = [(torch.float16, 1e5), (torch.float16, -7e4), (torch.bfloat16, 3.4e38), (torch.float16, 65520.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype,value", OVERFLOW)
def test_enqueue_rejects_values_that_overflow_the_memory_dtype(dtype, value, masked, backend):
    mem = xk.CrossBatchMemory(10, 4, dtype=dtype, backend=backend)
    mem.enqueue(torch.randn(3, 4), torch.arange(3))
    snap = _snapshot(mem)
    x = torch.randn(4, 4)
    x[2, 1] = value
    mask = torch.tensor([True, False, True, True]) if masked else None
    with pytest.raises(ValueError, match=rf"embeddings: 1 row\(s\) .*{dtype}"):
        mem.enqueue(x, torch.arange(4), mask=mask)
    _assert_unchanged(mem, snap)


@pytest.mark.parametrize("dtype,value", [(torch.float16, 65504.0), (torch.float16, 65519.0), (torch.bfloat16, 3.3e38),
                                         (torch.float32, 3.4e38)])
def test_enqueue_keeps_values_that_stay_finite_after_the_cast(dtype, value):
    mem = xk.CrossBatchMemory(4, 2, dtype=dtype)
    mem.enqueue(torch.tensor([[value, -value], [value, value]]), torch.arange(2))
    assert torch.isfinite(mem.get()[0]).all()


@pytest.mark.parametrize("batch_dtype,memory_dtype,value", [(torch.bfloat16, torch.float16, 1e5),
                                                            (torch.float64, torch.float32, 1e39),
                                                            (torch.float64, torch.bfloat16, 3.4e38)])
def test_enqueue_rejects_overflow_from_other_batch_dtypes(batch_dtype, memory_dtype, value):
    mem = xk.CrossBatchMemory(4, 2, dtype=memory_dtype)
    x = torch.tensor([[0.5, 0.5], [value, 0.0]], dtype=batch_dtype)
    with pytest.raises(ValueError, match=r"embeddings: 1 row\(s\) .*first: row 1 .*beyond the largest"):
        mem.enqueue(x, torch.arange(2))
    assert len(mem) == 0 and torch.equal(mem.labels, torch.full((4,), -1, dtype=torch.int32))


def test_overflow_masked_out_is_fine():
    mem = xk.CrossBatchMemory(4, 2, dtype=torch.float16)
    mem.enqueue(torch.tensor([[1e5, 0.0], [0.5, 0.5]]), torch.arange(2), mask=torch.tensor([False, True]))
    assert len(mem) == 1 and torch.isfinite(mem.get()[0]).all()


def test_xbm_loss_rejects_overflow_into_an_fp16_memory_without_changing_state():
    crit = xk.XBMLoss(32, 4, memory_dtype=torch.float16, normalize=False)
    crit(F.normalize(torch.randn(6, 4), dim=1), torch.arange(6) % 3)
    snap = _snapshot(crit)
    x = F.normalize(torch.randn(6, 4), dim=1)
    x[3, 2] = 1e5
    with pytest.raises(ValueError, match=r"embeddings: 1 row\(s\)"):
        crit(x, torch.arange(6) % 3)
    _assert_unchanged(crit, snap)


# --- configuration errors are raised at the first step ----------------------------------

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
    snap = _snapshot(crit)
    args = make(x, y)
    with pytest.raises(exc, match=msg):
        crit(args[0], args[1], enqueue_mask=args[2])
    _assert_unchanged(crit, snap)


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
    snap = _snapshot(crit)
    with pytest.raises(ValueError, match=r"embeddings: .*2 ranks x 12 rows.*larger than the memory \(size 16\)"):
        crit(x, y)
    _assert_unchanged(crit, snap)


# --- unsigned and list labels -----------------------------------------------------------

UNSIGNED = [torch.uint8, torch.uint16, torch.uint32, torch.uint64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", UNSIGNED)
def test_unsigned_labels_give_the_int64_loss(dtype, backend):
    g = torch.Generator().manual_seed(3)
    x, r = F.normalize(torch.randn(6, 8, generator=g), dim=1), F.normalize(torch.randn(20, 8, generator=g), dim=1)
    y, z = torch.arange(6) % 3 + 40000, torch.arange(20) % 3 + 40000
    if dtype == torch.uint8:
        y, z = y - 40000, z - 40000
    expected = xk.contrastive_loss(x, y, r, z, backend=backend)
    got = xk.contrastive_loss(x, y.to(dtype), r, z.to(dtype), backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("arg", ["labels", "ref_labels"])
@pytest.mark.parametrize("dtype,value", [(torch.uint32, 2 ** 31), (torch.uint64, 2 ** 31), (torch.uint64, 2 ** 63 + 5)])
def test_unsigned_labels_beyond_int32_name_the_argument(arg, dtype, value):
    g = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    a = {"labels": torch.arange(6).to(dtype), "ref_labels": torch.arange(6).to(dtype)}
    big = torch.tensor([value], dtype=torch.uint64).to(dtype)
    a[arg] = torch.cat([a[arg][:5], big])
    with pytest.raises(ValueError, match=rf"{arg}: labels must fit in int32, got values in \[0, {value}\]"):
        xk.contrastive_loss(x, a["labels"], x, a["ref_labels"])


@pytest.mark.parametrize("dtype", UNSIGNED)
def test_unsigned_labels_enqueue_and_xbm(dtype):
    mem = xk.CrossBatchMemory(8, 2)
    mem.enqueue(torch.randn(3, 2), torch.tensor([7, 0, 200]).to(dtype))
    assert mem.get()[1].tolist() == [7, 0, 200]
    big = torch.tensor([2 ** 32 - 1], dtype=torch.int64).to(dtype) if dtype in (torch.uint32, torch.uint64) else None
    if big is not None:
        with pytest.raises(ValueError, match="labels: labels must fit in int32"):
            mem.enqueue(torch.randn(1, 2), big)
    crit = xk.XBMLoss(16, 4)
    x = F.normalize(torch.randn(6, 4), dim=1)
    y = torch.arange(6) % 3
    torch.testing.assert_close(crit(x, y.to(dtype)), xk.XBMLoss(16, 4)(x, y))


# --- the build without torch, and the torch it pins -------------------------------------

def test_setup_without_torch_says_what_to_run():
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "pip install torch==" in proc.stderr and "pip install --no-build-isolation ." in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("version,req", [("2.13.0+cpu", "torch==2.13.*"), ("2.4.1", "torch==2.4.*"),
                                         ("2.6.0a0+git1234", "torch==2.6.*"), ("2.10.0+cu128", "torch==2.10.*")])
def test_setup_pins_the_torch_it_builds_against(version, req):
    helpers = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_helpers")
    assert helpers["torch_requirement"](version) == req


# --- normalize --------------------------------------------------------------------------

NORMALIZE_CASES = [(loss, "reference") for loss in sorted(xk.LOSSES)] + [("contrastive", b) for b in BACKENDS
                                                                          if b != "reference"]


@pytest.mark.parametrize("loss,backend", NORMALIZE_CASES)
def test_normalize_makes_the_loss_scale_free(loss, backend):
    g = torch.Generator().manual_seed(5)
    batches = [(F.normalize(torch.randn(12, 8, generator=g), dim=1), torch.randint(0, 4, (12,), generator=g))
               for _ in range(3)]
    a, b = xk.XBMLoss(64, 8, loss=loss, backend=backend), xk.XBMLoss(64, 8, loss=loss, backend=backend)
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
    raw = xk.XBMLoss(64, 8, normalize=False)
    expected = xk.contrastive_loss(3 * x, y, 3 * x, y, self_index=torch.arange(12), backend="reference")
    expected = expected + xk.contrastive_loss(3 * x, y, 3 * x, y, self_index=torch.arange(12), backend="reference")
    torch.testing.assert_close(raw(3 * x, y), expected)
    assert torch.equal(raw.memory.get()[0], 3 * x)
    assert float(xk.XBMLoss(64, 8)(3 * x, y)) < float(expected) / 2


# --- reset, docstring, repr, statistics --------------------------------------------------

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_stats_has_every_key_every_step(backend):
    crit = xk.XBMLoss(32, 4, start_iteration=1, backend=backend)
    x, y = F.normalize(torch.randn(6, 4), dim=1), torch.arange(6) % 3
    crit(x, y)
    stats = crit.last_stats
    assert set(stats) == {"in_batch_pos", "in_batch_neg", "memory_pos", "memory_neg"}
    assert int(stats["memory_pos"]) == 0 and int(stats["memory_neg"]) == 0
    assert int(stats["in_batch_pos"]) > 0 and all(v.dtype == stats["in_batch_pos"].dtype for v in stats.values())
    crit(x, y)
    assert int(crit.last_stats["memory_pos"]) > 0


# --- the contract ----------------------------------------------------------------------

def test_contract_exists_and_every_citation_names_a_section():
    path = os.path.join(ROOT, "xbm_kernels", "CONTRACT.md")
    text = open(path, encoding="utf-8").read()
    sections = set(re.findall(r"^## (\d+)\.", text, flags=re.M))
    assert {"1", "2", "5", "6"} <= sections
    assert re.search(r"^## pytorch-metric-learning drop-in", text, flags=re.M)
    for word in ("ref_valid", "self_index", "pos_eps", "multi_similarity", "triplet", "supcon", "start_iteration",
                 "enqueue_mask", "normalize", "gather_distributed", "set_value_checks"):
        assert word in text, word
    cited = []
    for base in ("xbm_kernels", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for name in files:
                if name.endswith((".py", ".md", ".cpp", ".cu", ".h")):
                    src = open(os.path.join(dirpath, name), encoding="utf-8").read()
                    cited += [(name, s) for s in re.findall(r"CONTRACT\.md sections? (\d+)", src)]
    assert cited, "nothing cites CONTRACT.md"
    missing = [(name, s) for name, s in cited if s not in sections]
    assert not missing, missing


def test_import_names_the_torch_the_extension_was_built_for():
    """A build is tied to one torch release: the metadata pins it and a failed load of the
    extension under another torch says which one to rebuild against."""
    from xbm_kernels import _ops
    pin = _ops.built_for_torch()
    if pin is not None:  # installed (editable or not): the pin is this torch's release
        assert _ops._torch_mismatch(pin) is None
    assert _ops._torch_mismatch("1.0.*") == ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert _ops._torch_mismatch(None) is None
