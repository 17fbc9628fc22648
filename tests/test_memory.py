"""CrossBatchMemory (CONTRACT.md section 2): the ring against a plain Python model on every
backend (the enqueue op too: wrap-around, casts, label dtypes), resume from a state dict, a
failed load that changes nothing, the dtype kept under casts and autocast, bad enqueues
refused before anything is written, and nothing non-finite or overflowing entering the
memory, also where the check does not wait for the GPU (CUDA tensors: the batch refused on
the device, reported one call late, the counters rolled back)."""
import importlib.util
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import xbm_kernels as xk

from compare import assert_unchanged, snapshot
from syncs import HostReads

MEM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class RingModel:
    """The ring written from CONTRACT.md section 2 with Python lists."""

    def __init__(self, size):
        self.size, self.ptr, self.filled = size, 0, 0
        self.rows = [None] * size
        self.labels = [None] * size

    def enqueue(self, rows, labels):
        slots = []
        for row, lab in zip(rows, labels):
            self.rows[self.ptr], self.labels[self.ptr] = row, lab
            slots.append(self.ptr)
            self.ptr = (self.ptr + 1) % self.size
            self.filled = min(self.size, self.filled + 1)
        return slots


def _assert_same(mem, model, truncates=False):
    assert len(mem) == model.filled and int(mem.ptr) == model.ptr and int(mem.num_filled) == model.filled
    emb, lab = mem.get()
    assert emb.shape == (model.filled, mem.dim) and lab.shape == (model.filled,)
    if model.filled:
        want = torch.stack(model.rows[:model.filled]).to(mem.dtype).float()
        if truncates:  # the interpreter truncates fp32 -> bf16 where torch rounds: one bf16 ulp
            torch.testing.assert_close(emb.float(), want, rtol=2 ** -7, atol=0)
        else:
            assert torch.equal(emb.float(), want)
        assert lab.tolist() == model.labels[:model.filled]



# --------------------------------------------------------------------------- the ring


@pytest.mark.parametrize("mem_dtype", MEM_DTYPES)
def test_ring_matches_model_over_random_enqueues(backend, device, mem_dtype):
    rng = random.Random(0)
    size, dim = 37, 5
    mem = xk.CrossBatchMemory(size, dim, dtype=mem_dtype, device=device, backend=backend)
    model = RingModel(size)
    truncates = backend == "triton" and device == "cpu" and mem_dtype == torch.bfloat16
    for step in range(300 if device == "cuda" or backend != "triton" else 60):
        b = rng.randint(0, size)
        x = torch.randn(b, dim) + 0.5
        y = torch.randint(-5, 1000, (b,))
        mask = None
        if rng.random() < 0.3:
            mask = torch.rand(b) < 0.5
        slots = mem.enqueue(x.to(device), y.to(device), mask=None if mask is None else mask.to(device))
        if mask is not None:
            x, y = x[mask], y[mask]
        expected = model.enqueue(list(x.to(device)), y.tolist())
        assert slots.dtype == torch.int64 and slots.tolist() == expected
        _assert_same(mem, model, truncates)
        if step % 97 == 96:
            mem.reset()
            model = RingModel(size)
            _assert_same(mem, model)


@pytest.mark.kernels
@pytest.mark.parametrize("mem_dtype", MEM_DTYPES)
def test_enqueue_op_wraps_and_casts(backend, device, mem_dtype):
    """The op itself: rows cast to the memory dtype, labels of any integer dtype to int32,
    slots (ptr + k) % size, untouched slots untouched. The interpreter truncates fp32 -> bf16
    where torch and a GPU round to nearest even: there one bf16 ulp is allowed."""
    op = xk.backends.kernel_ops(backend).enqueue_
    size, D, b = 10, 7, 6
    in_dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if backend != "triton" else [])
    gen = torch.Generator().manual_seed(0)
    for k, (in_dtype, label_dtype) in enumerate([(i, l) for i in in_dtypes
                                                 for l in (torch.int64, torch.int32, torch.int16, torch.uint8)]):
        ptr = (7 + 3 * k) % size  # some wrap
        mem = torch.full((size, D), 3.0, dtype=mem_dtype, device=device)
        lab = torch.full((size,), -5, dtype=torch.int32, device=device)
        emb = (torch.randn(D, b, generator=gen, dtype=torch.float64) + 0.5).to(in_dtype).T.to(device)  # strided rows
        labels = torch.arange(100, 100 + b).to(label_dtype).to(device)
        slots = op(mem, lab, emb, labels, ptr)
        expected_slots = (torch.arange(b, device=device) + ptr) % size
        assert slots.dtype == torch.int64 and torch.equal(slots, expected_slots)
        want = emb.to(mem_dtype)
        if backend == "triton" and device == "cpu" and mem_dtype == torch.bfloat16 and in_dtype != torch.bfloat16:
            torch.testing.assert_close(mem[expected_slots].float(), want.float(), rtol=2 ** -7, atol=0)
        else:
            assert torch.equal(mem[expected_slots], want), (in_dtype, label_dtype)
        assert torch.equal(lab[expected_slots], labels.to(torch.int32))
        untouched = torch.ones(size, dtype=torch.bool, device=device)
        untouched[expected_slots] = False
        assert bool((mem[untouched] == 3.0).all()) and bool((lab[untouched] == -5).all())
    with pytest.raises((ValueError, RuntimeError), match="larger than the memory"):  # the op's own check
        op(mem[:3].clone(), lab[:3].clone(), emb, labels, 0)


@pytest.mark.kernels
@pytest.mark.parametrize("mem_dtype", [torch.float32, torch.bfloat16])
def test_memory_matches_the_reference_backend_over_wraparounds(backend, device, mem_dtype):
    """Batches of varying sizes through a small ring: the same state as the reference backend's
    (rows, labels, ptr, num_filled, slots). The interpreter's fp32 -> bf16 truncates: fp32 there."""
    if backend == "triton" and device == "cpu":
        mem_dtype = torch.float32
    gen = torch.Generator().manual_seed(3)
    mems = {b: xk.CrossBatchMemory(23, 17, dtype=mem_dtype, device=device, backend=b) for b in ("reference", backend)}
    for step, b in enumerate([5, 9, 1, 23, 7, 11, 4]):
        emb = torch.randn(b, 17, generator=gen).to(device)
        lab = torch.randint(0, 50, (b,), generator=gen).to(device)
        slots = {k: m.enqueue(emb, lab) for k, m in mems.items()}
        assert torch.equal(slots[backend], slots["reference"]), step
        for name, t in mems["reference"].state_dict().items():
            assert torch.equal(mems[backend].state_dict()[name], t), (step, name)
        assert mems[backend]._ptr == mems["reference"]._ptr


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



@pytest.mark.parametrize("operations", [10_000, pytest.param(100_000, marks=pytest.mark.slow)])
def test_soak_against_the_model(operations):
    """Random enqueues (random sizes and masks), resets and state_dict round trips, the ring
    checked against the Python model after every operation."""
    rng = random.Random(1234)
    size, dim = 53, 3
    mem = xk.CrossBatchMemory(size, dim)
    model = RingModel(size)
    pool = torch.randn(4096, dim) + 0.5
    for op in range(operations):
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



# --------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("mem_backend", ["reference", "cpu"])
def test_state_dict_resumes_exactly(mem_backend):
    mem = xk.CrossBatchMemory(10, 4, backend=mem_backend)
    mem.enqueue(torch.randn(7, 4), torch.arange(7))
    mem.enqueue(torch.randn(6, 4), torch.arange(6))  # wraps: ptr 3, full
    state = mem.state_dict()
    assert set(state) == {"embeddings", "labels", "ptr", "num_filled"}
    fresh = xk.CrossBatchMemory(10, 4, backend=mem_backend)
    fresh.load_state_dict(state)
    assert len(fresh) == 10 and fresh._ptr == 3
    x, y = torch.randn(4, 4), torch.tensor([9, 8, 7, 6])
    assert torch.equal(fresh.enqueue(x, y), mem.enqueue(x, y))
    assert torch.equal(fresh.embeddings, mem.embeddings) and torch.equal(fresh.labels, mem.labels)
    assert fresh.enqueue(x, y).tolist() == [7, 8, 9, 0]


def test_torch_save_round_trip_weights_only(tmp_path):
    mem = xk.CrossBatchMemory(8, 3, dtype=torch.bfloat16)
    mem.enqueue(torch.randn(5, 3), torch.arange(5))
    torch.save(mem.state_dict(), tmp_path / "m.pt")
    fresh = xk.CrossBatchMemory(8, 3, dtype=torch.bfloat16)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert len(fresh) == 5 and fresh._ptr == 5 and torch.equal(fresh.embeddings, mem.embeddings)


def test_corrupt_state_dict_is_rejected_and_changes_nothing():
    mem = xk.CrossBatchMemory(8, 3)
    mem.enqueue(torch.randn(2, 3), torch.arange(2))
    before = {k: v.clone() for k, v in mem.state_dict().items()}
    bad = dict(before, ptr=torch.tensor(5), num_filled=torch.tensor(3))  # not a reachable state
    with pytest.raises(ValueError, match="state_dict"):
        mem.load_state_dict(bad)
    for k, v in mem.state_dict().items():
        assert torch.equal(v, before[k])
    assert len(mem) == 2 and mem._ptr == 2



def _filled_memory(size=8, dim=3, n=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mem = xk.CrossBatchMemory(size, dim, dtype=dtype)
    mem.enqueue(F.normalize(torch.randn(n, dim, generator=g), dim=1), torch.arange(n) + 10 * seed)
    return mem


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
@pytest.mark.parametrize("what,state", BAD_MEMORY_STATES, ids=[c for c, _ in BAD_MEMORY_STATES])
def test_memory_failed_load_changes_nothing(what, state, strict):
    mem = _filled_memory()
    snap = snapshot(mem)
    with pytest.raises((ValueError, TypeError), match="state_dict"):
        mem.load_state_dict(state, strict=strict)
    assert_unchanged(mem, snap)


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
    snap = snapshot(mem)
    with pytest.raises(ValueError, match="state_dict"):
        mem.load_state_dict(state)
    assert_unchanged(mem, snap)


def test_memory_strict_false_without_its_entries_changes_nothing():
    mem = _filled_memory()
    snap = snapshot(mem)
    result = mem.load_state_dict({}, strict=False)
    assert sorted(result.missing_keys) == ["embeddings", "labels", "num_filled", "ptr"]
    assert_unchanged(mem, snap)



# --------------------------------------------------------------------------- dtypes, arguments


def test_memory_keeps_its_dtype():
    mem = xk.CrossBatchMemory(8, 3, dtype=torch.bfloat16)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    model.mem = mem
    model.float()
    model.to(torch.float16)
    assert mem.embeddings.dtype == torch.bfloat16 and model[0].weight.dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.float16):
        mem.enqueue(torch.randn(2, 3), torch.arange(2))
    assert mem.embeddings.dtype == torch.bfloat16


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "float"])
def test_a_cast_of_the_model_keeps_the_rows_exactly(cast):
    """model.half() leaves the memory's rows as they were, not cast to fp16 and back."""
    mem = xk.CrossBatchMemory(8, 3)
    x = torch.randn(5, 3) * 1.2345678
    mem.enqueue(x, torch.arange(5))
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    model.mem = mem
    getattr(model, cast)()
    emb, _ = mem.get()
    assert emb.dtype == torch.float32 and torch.equal(emb, x)


def test_enqueue_casts_and_detaches():
    mem = xk.CrossBatchMemory(4, 2, dtype=torch.float16)
    x = torch.randn(3, 2, requires_grad=True)
    mem.enqueue(x, torch.tensor([1, 2, 3], dtype=torch.int16))
    emb, lab = mem.get()
    assert emb.dtype == torch.float16 and not emb.requires_grad and lab.dtype == torch.int32
    assert torch.equal(emb, x.detach().half()) and lab.tolist() == [1, 2, 3]


BAD_ENQUEUE = [
    (lambda: (torch.randn(3, 5), torch.arange(3), None), ValueError, "embeddings: expected dim 4"),
    (lambda: (torch.randn(3), torch.arange(3), None), ValueError, "embeddings: expected a 2-D"),
    (lambda: (torch.randn(3, 4), torch.arange(2), None), ValueError, "labels: expected 3 labels"),
    (lambda: (torch.randn(3, 4), torch.ones(3), None), TypeError, "labels: expected an integer"),
    (lambda: (torch.arange(12).view(3, 4), torch.arange(3), None), TypeError, "embeddings: expected a floating"),
    (lambda: (torch.randn(11, 4), torch.arange(11), None), ValueError, "larger than the memory"),
    (lambda: (torch.randn(3, 4), torch.arange(3), torch.ones(3)), TypeError, "mask: expected dtype"),
    (lambda: (torch.randn(3, 4), torch.arange(3), torch.ones(2, dtype=torch.bool)), ValueError, "mask: expected 3"),
    (lambda: (torch.randn(3, 4), torch.tensor([0, 1, 2 ** 40]), None), ValueError, "labels: labels must fit"),
    (lambda: ([[0.0] * 4], torch.arange(1), None), TypeError, "embeddings: expected a torch.Tensor"),
    (lambda: (torch.randn(3, 4, device="meta"), torch.arange(3), None), ValueError, "embeddings: expected a tensor on"),
]


@pytest.mark.parametrize("make,exc,msg", BAD_ENQUEUE)
@pytest.mark.parametrize("mem_backend", ["reference", "cpu"])
def test_bad_enqueue_names_argument_and_changes_nothing(make, exc, msg, mem_backend):
    mem = xk.CrossBatchMemory(10, 4, backend=mem_backend)
    mem.enqueue(torch.randn(6, 4), torch.arange(6))
    before = {k: v.clone() for k, v in mem.state_dict().items()}
    x, y, mask = make()
    with pytest.raises(exc, match=msg):
        mem.enqueue(x, y, mask=mask)
    for k, v in mem.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(mem) == 6 and mem._ptr == 6


@pytest.mark.parametrize("args,exc,msg", [
    ((0, 4), ValueError, "size"), ((4, 0), ValueError, "dim"), ((4.5, 4), TypeError, "size"),
    ((4, 4, torch.int32), TypeError, "dtype"), ((4, 4, torch.float64), TypeError, "dtype"),
])
def test_bad_constructor_arguments(args, exc, msg):
    with pytest.raises(exc, match=msg):
        xk.CrossBatchMemory(*args)



# --------------------------------------------------------------------------- non-finite and overflowing rows


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


def test_check_finite_off_writes_as_given():
    mem = xk.CrossBatchMemory(4, 2, check_finite=False)
    mem.enqueue(torch.tensor([[float("nan"), 0.0]]), torch.tensor([1]))
    assert torch.isnan(mem.get()[0][0, 0])



OVERFLOW = [(torch.float16, 1e5), (torch.float16, -7e4), (torch.bfloat16, 3.4e38), (torch.float16, 65520.0)]


@pytest.mark.parametrize("mem_backend", ["reference", "cpu"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("mem_dtype,value", OVERFLOW)
def test_enqueue_rejects_values_that_overflow_the_memory_dtype(mem_dtype, value, masked, mem_backend):
    mem = xk.CrossBatchMemory(10, 4, dtype=mem_dtype, backend=mem_backend)
    mem.enqueue(torch.randn(3, 4), torch.arange(3))
    snap = snapshot(mem)
    x = torch.randn(4, 4)
    x[2, 1] = value
    mask = torch.tensor([True, False, True, True]) if masked else None
    with pytest.raises(ValueError, match=rf"embeddings: 1 row\(s\) .*{mem_dtype}"):
        mem.enqueue(x, torch.arange(4), mask=mask)
    assert_unchanged(mem, snap)


@pytest.mark.parametrize("mem_dtype,value", [(torch.float16, 65504.0), (torch.float16, 65519.0), (torch.bfloat16, 3.3e38),
                                         (torch.float32, 3.4e38)])
def test_enqueue_keeps_values_that_stay_finite_after_the_cast(mem_dtype, value):
    mem = xk.CrossBatchMemory(4, 2, dtype=mem_dtype)
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



# --------------------------------------------------------------------------- the deferred check (CUDA tensors)
# On CUDA tensors the finiteness check does not wait for the GPU: the batch is written only
# if its device flag says it is finite, the flag reaches the host without a sync, and a bad
# one raises at the next call, which first rolls the counters back. CPU tensors take that
# path with the private switch _deferred_check=True, so it runs here.

def _deferred_memory(backend, device, **kw):
    return xk.CrossBatchMemory(10, 4, backend=backend, device=device,
                               _deferred_check=True if device == "cpu" else None, **kw)


# The calls that read the pending check (and raise for a refused batch).
READS = {
    "enqueue": lambda mem, snap: mem.enqueue(torch.randn(2, 4, device=mem.embeddings.device),
                                             torch.arange(2, device=mem.embeddings.device)),
    "check_batch": lambda mem, snap: mem.check_batch(torch.randn(2, 4, device=mem.embeddings.device),
                                                     torch.arange(2, device=mem.embeddings.device)),
    "get": lambda mem, snap: mem.get(),
    "len": lambda mem, snap: len(mem),
    "state_dict": lambda mem, snap: mem.state_dict(),
    "load_state_dict": lambda mem, snap: mem.load_state_dict(snap[0]),
    "reset": lambda mem, snap: mem.reset(),
    "sync_check": lambda mem, snap: mem.sync_check(),
}


def test_deferred_enqueues_read_nothing_on_the_host(backend, device):
    """Steady-state enqueues (wrapping, fp32 and fp16 memories) read no tensor value on the
    deferred path; the synchronous path reads one per enqueue, so the count can fail."""
    for mem_dtype in (torch.float32, torch.float16):
        counts = {}
        for deferred in (True, False):
            mem = xk.CrossBatchMemory(10, 4, dtype=mem_dtype, backend=backend, device=device, _deferred_check=deferred)
            x, y = torch.randn(3, 4, device=device), torch.arange(3, dtype=torch.int32, device=device)
            mem.enqueue(x, y)
            with HostReads(free=lambda: [mem._flag_host]) as reads:
                for _ in range(6):
                    mem.enqueue(x, y)
            mem.sync_check()
            counts[deferred] = reads.ops
            assert len(mem) == 10 and mem._ptr == 21 % 10
        assert counts[True] == [], f"the deferred path read {counts[True]}"
        assert len(counts[False]) >= 6, counts[False]


@pytest.mark.parametrize("read", list(READS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_deferred_check_refuses_a_nonfinite_batch_and_rolls_back(backend, device, read, bad):
    mem = _deferred_memory(backend, device)
    mem.enqueue(torch.randn(7, 4, device=device), torch.arange(7, device=device))
    snap = snapshot(mem)
    rows, labels = mem.embeddings.clone(), mem.labels.clone()
    x = torch.randn(4, 4, device=device)
    x[2, 1] = bad
    mem.enqueue(x, torch.arange(100, 104, device=device))  # wraps; refused on the device, not yet reported
    assert mem._pending is not None
    assert torch.equal(mem.embeddings, rows) and torch.equal(mem.labels, labels), "a refused batch was written"
    with pytest.raises(ValueError, match=r"embeddings: 1 row\(s\) with NaN/Inf in the memory dtype torch.float32 "
                                         r"\(first: row 2 of the batch of the previous enqueue\); nothing was written"):
        READS[read](mem, snap)
    assert_unchanged(mem, snap)
    # reported once; the ring goes on from where it was before the refused batch
    twin = xk.CrossBatchMemory(10, 4, backend=backend, device=device)
    twin.load_state_dict(snap[0])
    good = torch.randn(5, 4, device=device), torch.arange(5, device=device)
    assert torch.equal(mem.enqueue(*good), twin.enqueue(*good))
    for k, v in mem.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k]), k


@pytest.mark.parametrize("masked", [False, True])
def test_deferred_check_refuses_overflow_of_the_memory_dtype(backend, device, masked):
    mem = _deferred_memory(backend, device, dtype=torch.float16)
    mem.enqueue(torch.randn(3, 4, device=device), torch.arange(3, device=device))
    snap = snapshot(mem)
    rows = mem.embeddings.clone()
    x = torch.randn(4, 4, device=device)
    x[2, 1] = 1e5  # finite in float32, beyond float16's 65504
    mask = torch.tensor([True, False, True, True], device=device) if masked else None
    mem.enqueue(x, torch.arange(4, device=device), mask=mask)
    assert torch.equal(mem.embeddings, rows) and torch.isfinite(mem.embeddings).all()
    what = "masked batch" if masked else "batch"
    with pytest.raises(ValueError, match=rf"embeddings: 1 row\(s\) .*torch.float16 \(first: row {1 if masked else 2} of "
                                         rf"the {what} of the previous enqueue; 1 of them finite in torch.float32 but "
                                         rf"beyond the largest torch.float16"):
        mem.sync_check()
    assert_unchanged(mem, snap)


def test_deferred_check_passes_a_nonfinite_row_masked_out(backend, device):
    mem = _deferred_memory(backend, device)
    x = torch.randn(4, 4, device=device)
    x[1, 0] = float("nan")
    mem.enqueue(x, torch.arange(4, device=device), mask=torch.tensor([True, False, True, True], device=device))
    mem.sync_check()
    assert len(mem) == 3 and torch.isfinite(mem.get()[0]).all()


def test_deferred_check_off_writes_as_given(backend, device):
    mem = _deferred_memory(backend, device, check_finite=False)
    mem.enqueue(torch.tensor([[float("nan"), 0.0, 0.0, 0.0]], device=device), torch.tensor([1], device=device))
    assert mem._pending is None and len(mem) == 1 and torch.isnan(mem.get()[0][0, 0])


HAS_PML = importlib.util.find_spec("pytorch_metric_learning") is not None


def _xbm_loss():
    return xk.XBMLoss(16, 4, loss="contrastive", backend="cpu")


def _pml_drop_in():
    from pytorch_metric_learning import losses as pml_losses
    from xbm_kernels.pml import CrossBatchMemory as PmlMemory
    return PmlMemory(pml_losses.SupConLoss(), 4, memory_size=16)


@pytest.mark.parametrize("make", [_xbm_loss, pytest.param(_pml_drop_in, marks=pytest.mark.skipif(
    not HAS_PML, reason="pytorch-metric-learning is not installed"))], ids=["XBMLoss", "pml"])
def test_deferred_check_is_left_unread_by_its_callers(make):
    """XBMLoss and the PML drop-in add no read of their own to the memory's deferred check:
    each step leaves its check pending (len() or get() would wait for it), and the reads of a
    step drop by exactly the synchronous check's one per step."""
    counts = {}
    for deferred in (True, False):
        torch.manual_seed(0)
        crit = make()
        crit.memory._deferred_check = deferred
        with HostReads(free=lambda: [crit.memory._flag_host]) as reads:
            for _ in range(5):
                x = torch.randn(6, 4, requires_grad=True)
                crit(x, torch.randint(0, 3, (6,), dtype=torch.int32)).backward()
                assert (crit.memory._pending is not None) == deferred
        counts[deferred] = reads.count
        crit.memory.sync_check()
    assert counts[False] - counts[True] == 5, counts


@pytest.mark.cuda_tensors
def test_steady_state_enqueue_does_not_sync_on_cuda(backend, device):
    """On a GPU: enqueues under torch.cuda.set_sync_debug_mode("error") (which raises at any
    synchronising call), then a refused batch reported by the next call."""
    mem = xk.CrossBatchMemory(64, 16, backend=backend, device=device)
    x, y = torch.randn(8, 16, device=device), torch.arange(8, device=device)
    for _ in range(2):  # first calls: kernels load, the pinned flag is allocated
        mem.enqueue(x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            mem.enqueue(x, y)
        bad = x.clone()
        bad[3, 0] = float("nan")
        mem.enqueue(bad, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match=r"embeddings: 1 row\(s\) with NaN/Inf .*row 3 of the batch of the previous"):
        mem.sync_check()
    assert len(mem) == 64 and mem._ptr == 22 * 8 % 64 and torch.isfinite(mem.embeddings).all()

