"""CrossBatchMemory: the ring buffer of past embeddings and labels (CONTRACT.md section 2)."""
import torch
from torch import nn

from . import _validate as V
from . import backends


# The largest finite value of each floating dtype a batch or a memory can have.
_LARGEST = {d: torch.finfo(d).max for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


class CrossBatchMemory(nn.Module):
    """A ring buffer of the last `size` embeddings and their labels.

    Rows are written at (ptr + arange(b)) % size; valid rows are always the prefix
    [0, len(self)). `ptr` and `num_filled` are host integers mirrored into persistent
    buffers, so enqueue never syncs with the device (unless a mask is given) and
    state_dict()/load_state_dict() resume exactly. The memory keeps its own dtype (a
    bf16 memory stays bf16 under autocast and under model.to(dtype)); labels are stored
    as int32.

    Non-finite embeddings never reach the memory: with check_finite=True (the default)
    enqueue raises a ValueError naming `embeddings` and writes nothing when a row holds
    NaN/Inf or a value that overflows on the cast to the memory dtype (1e5 into float16,
    3.4e38 into bfloat16). On CPU tensors the check runs before the write. On CUDA tensors
    it does not wait for the GPU: the batch is written only if its flag (computed on the
    device) says every row is finite, else the slots keep their rows; the flag reaches the
    host by a non-blocking copy, and a bad one is reported one call late (by the next
    enqueue, check_batch, get(), len(), state_dict(), load_state_dict(), reset() or
    sync_check()), which first rolls the counters back, so the memory is exactly as before
    the refused batch. check_finite=False removes the check (then keeping NaN out is the
    caller's job). An enqueue with a mask reads the mask's count (a host sync on a GPU:
    the pointer depends on it).

    Labels may be any integer dtype whose values fit in int32 (unsigned ones included).

    load_state_dict() checks every entry first (shapes, dtypes that cast, the counters, the
    finiteness of the filled rows in the memory dtype) and copies nothing when one is wrong;
    the four entries load together or not at all (strict=False too). reset() empties the
    memory only: XBMLoss.reset() also restarts XBMLoss's step counter.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device=None, backend="auto",
                 check_finite: bool = True, *, _dtypes=V.FLOAT_DTYPES, _deferred_check=None):
        super().__init__()
        size = V.index("size", size, 1, V.MAX_ROWS)
        dim = V.index("dim", dim, 1, V.MAX_ROWS)
        if dtype not in _dtypes:  # the PML drop-in also takes float64 (its rows, as PML keeps them)
            raise TypeError(f"dtype: expected one of {[str(d) for d in _dtypes]}, got {dtype}")
        backends.resolve(backend, torch.device(device) if device is not None else torch.device("cpu")) \
            if backend != "auto" else None
        self.size, self.dim, self.backend, self.check_finite = size, dim, backend, bool(check_finite)
        self.register_buffer("embeddings", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.int32, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.int64, device=device))
        self._ptr = 0
        self._num_filled = 0
        self._version = 0  # +1 at every change of the rows (write, reset, load): caches beside it follow
        # The deferred check (CUDA tensors): None decides by the device; True/False forces it
        # (tests run the CUDA path on CPU tensors with True).
        self._deferred_check = _deferred_check
        self._pending = None    # the last enqueue's unread check: _Pending or None
        self._flag_host = None  # its flag's host copy (pinned on CUDA), reused every step

    @property
    def dtype(self):
        return self.embeddings.dtype

    def __len__(self):
        self.sync_check()
        return self._num_filled

    def _deferred(self):
        """Whether checks on this memory's device are read one call late (CUDA tensors)."""
        if self._deferred_check is not None:
            return bool(self._deferred_check)
        return self.embeddings.device.type == "cuda"

    def extra_repr(self):
        return f"size={self.size}, dim={self.dim}, dtype={self.dtype}, filled={self._num_filled}, ptr={self._ptr}"

    def check_batch(self, embeddings, labels, mask=None, *, checked=False):
        """Validates an enqueue batch without changing anything; returns the number of rows
        b that would be written (with a mask, counting it syncs on a GPU). checked=True: the
        caller (XBMLoss) already checked the tensors' types, shapes, device and labels this
        step; only what depends on the memory (the size, finiteness in its dtype) is left.
        A pending check of the previous enqueue is read first (and raises if it failed). On
        the deferred path (CUDA tensors) finiteness is left to write_checked(), which writes
        the batch only if it is finite and reports a bad one at the next call."""
        self.sync_check()
        dev = self.embeddings.device
        if not checked:
            V.tensor("embeddings", embeddings, dim=2, floating=True, device=dev)
            V.tensor("labels", labels, dim=1, integer=True, device=dev)
        b = embeddings.shape[0]
        if not checked:
            if embeddings.shape[1] != self.dim:
                raise ValueError(f"embeddings: expected dim {self.dim} (the memory's), got {embeddings.shape[1]}")
            if labels.shape[0] != b:
                raise ValueError(f"labels: expected {b} labels (one per embedding), got {labels.shape[0]}")
            V.labels_fit_int32("labels", labels)
        if mask is not None:
            if not checked:
                V.tensor("mask", mask, dim=1, dtypes=(torch.bool,), device=dev)
                if mask.shape[0] != b:
                    raise ValueError(f"mask: expected {b} entries (one per embedding), got {mask.shape[0]}")
            b = int(mask.sum())  # a host sync on a GPU: the pointer and the slots depend on it
        if b > self.size:
            raise ValueError(f"embeddings: batch of {b} rows is larger than the memory (size {self.size})")
        if self.check_finite and b and not self._deferred():
            self._check_finite("embeddings", embeddings if mask is None else embeddings[mask],
                               "masked batch" if mask is not None else "batch", "nothing was written")
        return b

    def _check_finite(self, name, rows, what, consequence):
        """Raises unless every entry of `rows` is finite after the cast to the memory dtype."""
        # One reduction decides the common case. When the cast cannot overflow (the memory
        # dtype's range covers the batch dtype's: float32 into float32, float16 into
        # bfloat16), an fp32 sum: it is finite unless an entry is not, or the sum itself
        # overflows. When it can (float32 into bfloat16 or float16), the batch's min and max
        # against the memory dtype's largest value: within it, every entry stays finite on
        # any rounding path (NaN fails both comparisons). Only when that fails are the rows
        # cast, as the enqueue will, to find the bad ones exactly.
        rows = rows.detach()
        top = _LARGEST[self.dtype]
        if _LARGEST.get(rows.dtype, float("inf")) <= top:
            if bool(torch.isfinite(rows.sum(dtype=torch.float32))):
                return
        else:
            lo, hi = torch.aminmax(rows)
            if bool((lo >= -top) & (hi <= top)):
                return
        bad = ~torch.isfinite(rows.to(self.dtype)).all(dim=1)
        if not bool(bad.any()):  # beyond the largest value, but rounds down to it
            return
        first = int(bad.nonzero()[0, 0])
        overflow = int((bad & torch.isfinite(rows).all(dim=1)).sum())
        note = (f"; {overflow} of them finite in {rows.dtype} but beyond the largest {self.dtype}, "
                f"{torch.finfo(self.dtype).max:.6g}" if overflow else "")
        raise ValueError(f"{name}: {int(bad.sum())} row(s) with NaN/Inf in the memory dtype {self.dtype} (first: "
                         f"row {first} of the {what}{note}); {consequence}")

    @torch.no_grad()
    def enqueue(self, embeddings, labels, mask=None):
        """Writes the batch (rows where `mask` is True) into the ring, cast to the memory
        dtype; returns the int64 slots written, in batch order."""
        return self.write_checked(embeddings, labels, mask, self.check_batch(embeddings, labels, mask))

    @torch.no_grad()
    def write_checked(self, embeddings, labels, mask, b, *, guard=None):
        """enqueue() after check_batch() returned b (for callers that validate first).

        On the deferred path (CUDA tensors) with check_finite, and whenever `guard` is given
        (a (0-dim bool device tensor, callable building the exception) pair: a check of the
        caller's, such as gather_batch's batch sizes), the rows are written only where the
        flags say the batch is good (else the slots keep their rows and labels), the counters
        advance as usual, and the flags are read at the next call (sync_check)."""
        self.sync_check()
        if mask is not None:
            embeddings, labels = embeddings[mask], labels[mask]
        rows = embeddings.detach()
        ok = None
        if b and self.check_finite and self._deferred():
            # the rule of _check_finite, on the device: every entry finite in the memory dtype
            rows = rows.to(self.dtype)
            ok = torch.isfinite(rows).all()
        if guard is not None:
            ok = guard[0] if ok is None else ok & guard[0]
        pre = (self._ptr, self._num_filled)
        if b and ok is not None:  # a refused batch leaves every slot as it was
            old = (torch.arange(b, device=self.embeddings.device) + self._ptr) % self.size
            rows = torch.where(ok, rows.to(self.dtype), self.embeddings[old])
            labels = torch.where(ok, labels.to(torch.int32), self.labels[old])
        if b == 0:
            slots = torch.empty(0, dtype=torch.int64, device=self.embeddings.device)
        else:
            name = backends.resolve(self.backend, self.embeddings.device)
            if name == "reference" or self.dtype == torch.float64:  # the kernels store 32- and 16-bit rows
                slots = (torch.arange(b, device=rows.device) + self._ptr) % self.size
                self.embeddings[slots] = rows.to(self.dtype)
                self.labels[slots] = labels.to(torch.int32)
            else:
                op = backends.kernel_ops(name).enqueue_
                slots = op(self.embeddings, self.labels, rows, labels, self._ptr)
            self._ptr = (self._ptr + b) % self.size
            self._num_filled = min(self.size, self._num_filled + b)
            self._version += 1
            self.ptr.fill_(self._ptr)
            self.num_filled.fill_(self._num_filled)
        if ok is not None:
            self._defer(ok, pre, embeddings.detach(), "masked batch" if mask is not None else "batch",
                        guard[1] if guard is not None else None)
        return slots

    @torch.compiler.disable
    def _defer(self, ok, pre, rows, what, guard_error):
        """Keeps the flag `ok` as the pending check: copied to the host without waiting
        (pinned memory and an event on CUDA), read by sync_check()."""
        cuda = ok.device.type == "cuda"
        if self._flag_host is None or self._flag_host.is_pinned() != cuda:
            self._flag_host = torch.empty((), dtype=torch.bool, pin_memory=cuda)
        self._flag_host.copy_(ok, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(ok.device))
        self._pending = _Pending(event, pre, rows, what, guard_error)

    def sync_check(self):
        """Reads the pending check of the last enqueue (CUDA tensors; waits for the GPU only
        up to that enqueue) and raises if the batch was refused, after rolling the counters
        back: the memory is then exactly as it was before that enqueue. Called by every
        enqueue, get(), len(), state_dict(), load_state_dict() and reset(); a no-op when
        nothing is pending (always on CPU tensors, whose checks run before the write)."""
        if self._pending is not None:  # (a constant for torch.compile when nothing is pending)
            self._resolve()

    @torch.compiler.disable
    def _resolve(self):
        p, self._pending = self._pending, None
        if p.event is not None:
            p.event.synchronize()
        if self._flag_host.item():  # host memory, filled by the copy the event waited for
            return
        self._ptr, self._num_filled = p.pre
        self._version += 1  # never back to a value a cache beside the memory may hold
        self.ptr.fill_(self._ptr)
        self.num_filled.fill_(self._num_filled)
        consequence = "nothing was written (found at the next call: checks on CUDA tensors do not wait for the GPU)"
        if p.guard_error is not None:
            err = p.guard_error()
            if err is not None:
                raise err
        self._check_finite("embeddings", p.rows, f"{p.what} of the previous enqueue", consequence)
        raise ValueError(f"embeddings: the {p.what} of the previous enqueue was refused; {consequence}")

    def get(self):
        """(embeddings[:n], labels[:n]) of the filled prefix (views, not copies)."""
        self.sync_check()
        n = self._num_filled
        return self.embeddings[:n], self.labels[:n]

    @torch.no_grad()
    def reset(self):
        self.sync_check()  # a refused batch is reported, not dropped
        self._ptr = self._num_filled = 0
        self._version += 1
        self.ptr.zero_()
        self.num_filled.zero_()
        self.labels.fill_(-1)

    STATE_KEYS = ("embeddings", "labels", "ptr", "num_filled")

    def check_state(self, state_dict, prefix=""):
        """Validates this memory's entries of `state_dict` (under `prefix`) without changing
        anything. Returns False when none is there, True when all four are there and valid;
        raises (naming the key) when some are missing or one is wrong."""
        self.sync_check()
        keys = [prefix + k for k in self.STATE_KEYS]
        present = [k for k in keys if k in state_dict]
        if not present:
            return False
        if len(present) < len(keys):
            missing = [k for k in keys if k not in state_dict]
            raise ValueError(f"state_dict: has {present} but not {missing}; a memory's entries load all together or "
                             f"not at all; nothing was loaded")
        emb, lab, ptr, nf = (state_dict[k] for k in keys)
        for key, t in zip(keys, (emb, lab, ptr, nf)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"state_dict: {key!r}: expected a torch.Tensor, got {type(t).__name__}; "
                                f"nothing was loaded")
        k_emb, k_lab, k_ptr, k_nf = keys
        if tuple(emb.shape) != (self.size, self.dim):
            raise ValueError(f"state_dict: {k_emb!r} has shape {tuple(emb.shape)}, expected {(self.size, self.dim)} "
                             f"(a memory of size {self.size}, dim {self.dim}); nothing was loaded")
        if not emb.is_floating_point():
            raise TypeError(f"state_dict: {k_emb!r} has dtype {emb.dtype}, expected a floating-point dtype; "
                            f"nothing was loaded")
        if tuple(lab.shape) != (self.size,):
            raise ValueError(f"state_dict: {k_lab!r} has shape {tuple(lab.shape)}, expected {(self.size,)}; "
                             f"nothing was loaded")
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
            raise TypeError(f"state_dict: {k_lab!r} has dtype {lab.dtype}, expected an integer dtype; "
                            f"nothing was loaded")
        counters = []
        for key, t in ((k_ptr, ptr), (k_nf, nf)):
            if tuple(t.shape) not in ((), (1,)) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"state_dict: {key!r}: expected an integer scalar tensor, got dtype {t.dtype} and "
                                f"shape {tuple(t.shape)}; nothing was loaded")
            counters.append(int(t.reshape(())))
        p, n = counters
        if not (0 <= p < self.size and 0 <= n <= self.size and (n == self.size or p == n)):
            raise ValueError(f"state_dict: ptr={p}, num_filled={n} are not a valid state of a memory of size "
                             f"{self.size}; nothing was loaded")
        try:
            V.labels_fit_int32(k_lab, lab, always=True)
        except ValueError as e:
            raise ValueError(f"state_dict: {e}; nothing was loaded") from None
        if self.check_finite and n:
            self._check_finite(f"state_dict: {k_emb!r}", emb[:n], "checkpoint", "nothing was loaded")
        return True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.sync_check()  # the counters saved are the memory's, not those of a refused batch
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Everything is checked before anything is copied: the default path would copy the
        # entries that fit and report the others only afterwards.
        self.check_state(state_dict, prefix)
        dtype = self.embeddings.dtype
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # load_state_dict(assign=True) puts the checkpoint's tensors in place: keep the
        # memory's own dtypes and layout.
        if self.embeddings.dtype != dtype or not self.embeddings.is_contiguous():
            self.embeddings = self.embeddings.to(dtype).contiguous()
        if self.labels.dtype != torch.int32 or not self.labels.is_contiguous():
            self.labels = self.labels.to(torch.int32).contiguous()
        for name in ("ptr", "num_filled"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or t.dim():
                setattr(self, name, t.reshape(()).to(torch.int64))
        self._ptr, self._num_filled = int(self.ptr), int(self.num_filled)
        self._version += 1

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would cast the memory; it keeps its own dtype, and its rows
        # exactly (not cast there and back: .half() would round them to fp16), on the new device.
        rows = self.embeddings
        super()._apply(fn, recurse)
        if self.embeddings.dtype != rows.dtype:
            self.embeddings = rows.to(self.embeddings.device)
        return self


class _Pending:
    """The unread check of the last enqueue: its event (CUDA) or None, the counters before it
    (ptr, num_filled), its rows and what they were (for the message), and the guard's
    exception builder (or None)."""
    __slots__ = ("event", "pre", "rows", "what", "guard_error")

    def __init__(self, event, pre, rows, what, guard_error):
        self.event, self.pre, self.rows, self.what, self.guard_error = event, pre, rows, what, guard_error
