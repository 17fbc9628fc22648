"""CrossBatchMemory: the ring buffer of past embeddings and labels (DESIGN.md section 2)."""
import torch
from torch import nn

from . import _validate as V
from . import backends


class CrossBatchMemory(nn.Module):
    """A ring buffer of the last `size` embeddings and their labels.

    Rows are written at (ptr + arange(b)) % size; valid rows are always the prefix
    [0, len(self)). `ptr` and `num_filled` are host integers mirrored into persistent
    buffers, so enqueue never syncs with the device (unless a mask is given) and
    state_dict()/load_state_dict() resume exactly. The memory keeps its own dtype (a
    bf16 memory stays bf16 under autocast and under model.to(dtype)); labels are stored
    as int32.

    Non-finite embeddings never reach the memory: with check_finite=True (the default)
    enqueue raises a ValueError naming `embeddings` and writes nothing. The check is one
    reduction; on a GPU it costs one host sync per enqueue, which check_finite=False
    removes (then keeping NaN out is the caller's job).
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device=None, backend="auto",
                 check_finite: bool = True):
        super().__init__()
        size = V.index("size", size, 1, 2 ** 62)
        dim = V.index("dim", dim, 1, 2 ** 31 - 1)
        if dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"dtype: expected one of {[str(d) for d in V.FLOAT_DTYPES]}, got {dtype}")
        backends.resolve(backend, torch.device(device) if device is not None else torch.device("cpu")) \
            if backend != "auto" else None
        self.size, self.dim, self.backend, self.check_finite = size, dim, backend, bool(check_finite)
        self.register_buffer("embeddings", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.int32, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.int64, device=device))
        self._ptr = 0
        self._num_filled = 0

    @property
    def dtype(self):
        return self.embeddings.dtype

    def __len__(self):
        return self._num_filled

    def extra_repr(self):
        return f"size={self.size}, dim={self.dim}, dtype={self.dtype}, filled={self._num_filled}, ptr={self._ptr}"

    def check_batch(self, embeddings, labels, mask=None):
        """Validates an enqueue batch without changing anything; returns the number of rows
        b that would be written (with a mask, counting it syncs on a GPU)."""
        dev = self.embeddings.device
        V.tensor("embeddings", embeddings, dim=2, floating=True, device=dev)
        V.tensor("labels", labels, dim=1, integer=True, device=dev)
        b = embeddings.shape[0]
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings: expected dim {self.dim} (the memory's), got {embeddings.shape[1]}")
        if labels.shape[0] != b:
            raise ValueError(f"labels: expected {b} labels (one per embedding), got {labels.shape[0]}")
        V.labels_fit_int32("labels", labels)
        if mask is not None:
            V.tensor("mask", mask, dim=1, dtypes=(torch.bool,), device=dev)
            if mask.shape[0] != b:
                raise ValueError(f"mask: expected {b} entries (one per embedding), got {mask.shape[0]}")
            b = int(mask.sum())
        if b > self.size:
            raise ValueError(f"embeddings: batch of {b} rows is larger than the memory (size {self.size})")
        if self.check_finite and embeddings.numel():
            rows = embeddings if mask is None else embeddings[mask]
            # One fp32 sum decides the common case (it is finite unless an entry is not, or
            # it overflows); only then the row-wise check, which tells the two apart. On
            # the CPU this is ~15x cheaper than isfinite().all() over the batch.
            if not bool(torch.isfinite(rows.sum(dtype=torch.float32))):
                bad = ~torch.isfinite(rows).all(dim=1)
                if bool(bad.any()):
                    first = int(bad.nonzero()[0, 0])
                    raise ValueError(f"embeddings: {int(bad.sum())} row(s) with NaN/Inf (first: row {first} of "
                                     f"the {'masked ' if mask is not None else ''}batch); nothing was written")
        return b

    @torch.no_grad()
    def enqueue(self, embeddings, labels, mask=None):
        """Writes the batch (rows where `mask` is True) into the ring, cast to the memory
        dtype; returns the int64 slots written, in batch order."""
        return self.write_checked(embeddings, labels, mask, self.check_batch(embeddings, labels, mask))

    @torch.no_grad()
    def write_checked(self, embeddings, labels, mask, b):
        """enqueue() after check_batch() returned b (for callers that validate first)."""
        if mask is not None:
            embeddings, labels = embeddings[mask], labels[mask]
        if b == 0:
            return torch.empty(0, dtype=torch.int64, device=self.embeddings.device)
        name = backends.resolve(self.backend, self.embeddings.device)
        if name == "reference":
            slots = (torch.arange(b, device=embeddings.device) + self._ptr) % self.size
            self.embeddings[slots] = embeddings.detach().to(self.dtype)
            self.labels[slots] = labels.to(torch.int32)
        else:
            op = backends.kernel_ops(name).enqueue_
            slots = op(self.embeddings, self.labels, embeddings.detach(), labels, self._ptr)
        self._ptr = (self._ptr + b) % self.size
        self._num_filled = min(self.size, self._num_filled + b)
        self.ptr.fill_(self._ptr)
        self.num_filled.fill_(self._num_filled)
        return slots

    def get(self):
        """(embeddings[:n], labels[:n]) of the filled prefix (views, not copies)."""
        n = self._num_filled
        return self.embeddings[:n], self.labels[:n]

    @torch.no_grad()
    def reset(self):
        self._ptr = self._num_filled = 0
        self.ptr.zero_()
        self.num_filled.zero_()
        self.labels.fill_(-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Check the counters before anything is copied, then mirror them to the host.
        ptr, nf = state_dict.get(prefix + "ptr"), state_dict.get(prefix + "num_filled")
        if ptr is not None and nf is not None:
            ptr, nf = int(ptr), int(nf)
            if not (0 <= ptr < self.size and 0 <= nf <= self.size and (nf == self.size or ptr == nf)):
                raise ValueError(f"state_dict: ptr={ptr}, num_filled={nf} are not a valid state of a memory "
                                 f"of size {self.size}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ptr, self._num_filled = int(self.ptr), int(self.num_filled)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would cast the memory; it keeps its own dtype instead.
        dtype = self.embeddings.dtype
        super()._apply(fn, recurse)
        if self.embeddings.dtype != dtype:
            self.embeddings = self.embeddings.to(dtype)
        return self
