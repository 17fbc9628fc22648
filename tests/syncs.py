"""Counting the reads of tensor values on the host: on CUDA tensors each one waits for the GPU
(a host sync), so a CPU run that counts them shows whether a code path would stall a GPU.

    with HostReads() as reads:
        ...
    assert reads.count == 0, reads.ops

Counted: every op that returns a value to Python (`bool(t)`, `int(t)`, `t.item()`: the
dispatcher's `_local_scalar_dense`; `torch.equal`), every op whose output size depends on the
values (`nonzero`, `masked_select`, `unique`, indexing with a bool mask), and `t.tolist()`
(which reads without going through the dispatcher). `free`, a callable, gives the host
tensors whose reads cost nothing on a GPU either (a pinned host copy that an event already
waited for)."""
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_READS = {aten._local_scalar_dense, aten.equal, aten.nonzero, aten.masked_select, aten.unique_consecutive,
          aten._unique, aten._unique2, aten.unique_dim, aten.repeat_interleave}
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class HostReads(TorchDispatchMode):
    def __init__(self, free=lambda: ()):
        super().__init__()
        self.ops = []
        self._free = free

    @property
    def count(self):
        return len(self.ops)

    def _is_free(self, t):
        return isinstance(t, torch.Tensor) and any(t.untyped_storage().data_ptr() == f.untyped_storage().data_ptr()
                                                   for f in self._free() if f is not None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in _READS and not (args and self._is_free(args[0])):
            self.ops.append(str(packet))
        elif packet in _INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                         for i in (args[1] if len(args) > 1 else ()) or ()):
            self.ops.append(f"{packet} (bool mask)")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        tolist = torch.Tensor.tolist
        reads = self

        def counted_tolist(t):
            if not reads._is_free(t):
                reads.ops.append("tolist")
            return tolist(t)

        self._patch = mock.patch.object(torch.Tensor, "tolist", counted_tolist)
        self._patch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patch.__exit__(*exc)
