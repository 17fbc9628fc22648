"""CrossBatchMemory: the ring buffer against a plain Python model, resume, dtype."""
import random

import pytest
import torch

import xbm_kernels as xk

BACKENDS = ["reference", "cpu"]


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


def _assert_same(mem, model):
    assert len(mem) == model.filled and int(mem.ptr) == model.ptr and int(mem.num_filled) == model.filled
    emb, lab = mem.get()
    assert emb.shape == (model.filled, mem.dim) and lab.shape == (model.filled,)
    if model.filled:
        assert torch.equal(emb.float(), torch.stack(model.rows[:model.filled]).to(mem.dtype).float())
        assert lab.tolist() == model.labels[:model.filled]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ring_matches_model_over_random_enqueues(backend, dtype):
    rng = random.Random(0)
    size, dim = 37, 5
    mem = xk.CrossBatchMemory(size, dim, dtype=dtype, backend=backend)
    model = RingModel(size)
    for step in range(300):
        b = rng.randint(0, size)
        x = torch.randn(b, dim) + 0.5
        y = torch.randint(-5, 1000, (b,))
        mask = None
        if rng.random() < 0.3:
            mask = torch.rand(b) < 0.5
        slots = mem.enqueue(x, y, mask=mask)
        if mask is not None:
            x, y = x[mask], y[mask]
        expected = model.enqueue(list(x), y.tolist())
        assert slots.dtype == torch.int64 and slots.tolist() == expected
        _assert_same(mem, model)
        if step % 97 == 96:
            mem.reset()
            model = RingModel(size)
            _assert_same(mem, model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_resumes_exactly(backend):
    mem = xk.CrossBatchMemory(10, 4, backend=backend)
    mem.enqueue(torch.randn(7, 4), torch.arange(7))
    mem.enqueue(torch.randn(6, 4), torch.arange(6))  # wraps: ptr 3, full
    state = mem.state_dict()
    assert set(state) == {"embeddings", "labels", "ptr", "num_filled"}
    fresh = xk.CrossBatchMemory(10, 4, backend=backend)
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_enqueue_names_argument_and_changes_nothing(make, exc, msg, backend):
    mem = xk.CrossBatchMemory(10, 4, backend=backend)
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
