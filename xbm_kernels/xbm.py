"""XBMLoss: the paper's training scheme (DESIGN.md section 2).

    loss = L(x, y; x, y, self_index = arange(B))                   # in-batch
    if step >= start_iteration:
        slots = memory.enqueue(x.detach(), y)
        loss += weight * L(x, y; memory, self_index = slots)       # cross-batch

`step` counts forward calls (0-based, a persistent buffer), so the memory joins after
`start_iteration` warm-up steps. The batch is enqueued before the memory loss, and its own
slots are excluded exactly by index.
"""
import torch
import torch.distributed as dist
from torch import nn

from . import _validate as V
from . import backends
from .losses import LOSSES, compute
from .memory import CrossBatchMemory


class XBMLoss(nn.Module):
    def __init__(self, memory_size, embedding_dim, loss="contrastive", weight=1.0, start_iteration=0,
                 memory_dtype=torch.float32, gather_distributed=False, backend="auto", reduction="mean",
                 check_finite=True, **loss_kwargs):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss: unknown loss {loss!r}; available: {sorted(LOSSES)}")
        spec = LOSSES[loss]
        unknown = set(loss_kwargs) - set(spec.defaults)
        if unknown:
            raise TypeError(f"XBMLoss: unexpected keyword argument(s) {sorted(unknown)} for loss {loss!r}; "
                            f"accepted: {sorted(spec.defaults)}")
        spec.params(loss_kwargs)  # validates values now, not at the first step
        if reduction not in V.REDUCTIONS:
            raise ValueError(f"reduction: expected one of {V.REDUCTIONS}, got {reduction!r}")
        if backend not in backends.NAMES + ("auto",):
            raise ValueError(f"backend: expected 'auto' or one of {list(backends.NAMES)}, got {backend!r}")
        self.loss_name, self.loss_kwargs, self.reduction, self.backend = loss, dict(loss_kwargs), reduction, backend
        self.weight = V.finite_number("weight", weight)
        self.start_iteration = V.index("start_iteration", start_iteration, 0, 2 ** 62)
        self.gather_distributed = bool(gather_distributed)
        self.memory = CrossBatchMemory(memory_size, embedding_dim, dtype=memory_dtype, backend=backend,
                                       check_finite=check_finite)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        self._iteration = 0
        self.last_stats = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._iteration = int(self.iteration)

    def _loss(self, x, y, ref, ref_labels, **kw):
        return compute(self.loss_name, x, y, ref, ref_labels, reduction=self.reduction, backend=self.backend,
                       **self.loss_kwargs, **kw)

    def _gather(self, x, y, mask):
        """All-gather (x, y, mask) in rank order; returns the global batch and this rank's offset."""
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = [torch.zeros((), dtype=torch.int64, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor(x.shape[0], device=x.device))
        if any(int(s) != x.shape[0] for s in sizes):
            raise ValueError(f"embeddings: gather_distributed needs the same batch size on every rank, "
                             f"got {[int(s) for s in sizes]}")
        def cat(t):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            return torch.cat(parts)
        gm = cat(mask) if mask is not None else None
        return cat(x), cat(y), gm, rank * x.shape[0]

    def forward(self, embeddings, labels, enqueue_mask=None):
        """Returns the XBM loss of the batch; `last_stats` gets the active pair counts."""
        V.tensor("embeddings", embeddings, dim=2, floating=True)
        dev = embeddings.device
        if embeddings.shape[1] != self.memory.dim:
            raise ValueError(f"embeddings: expected dim {self.memory.dim} (embedding_dim), got {embeddings.shape[1]}")
        if self.memory.embeddings.device != dev:
            raise ValueError(f"embeddings: on {dev} but the memory is on {self.memory.embeddings.device}; "
                             f"move the XBMLoss module with .to(device)")
        B = embeddings.shape[0]
        self_idx = torch.arange(B, device=dev)
        # The batch is both sides of the in-batch loss; a view as the reference side keeps the
        # two inputs distinct tensors for torch.compile (autograd.Function rejects duplicates)
        # while the gradients of both sides still reach `embeddings`.
        loss, counts = self._loss(embeddings, labels, embeddings.view_as(embeddings), labels.view_as(labels),
                                  self_index=self_idx)
        use_memory = self._iteration >= self.start_iteration
        if use_memory:  # validate the enqueue before the step counter or the memory change
            if self.gather_distributed and dist.is_available() and dist.is_initialized():
                gx, gy, gmask, offset = self._gather(embeddings.detach(), labels, enqueue_mask)
            else:
                gx, gy, gmask, offset = embeddings.detach(), labels, enqueue_mask, 0
            b = self.memory.check_batch(gx, gy, gmask)
        stats = {"in_batch_pos": counts[:, 0].sum(), "in_batch_neg": counts[:, 1].sum()}
        if use_memory:
            slots = self.memory.write_checked(gx, gy, gmask, b)
            if gmask is None:
                self_index = slots[offset:offset + B]
            else:  # masked-out rows have no copy in the memory
                full = torch.full((gx.shape[0],), -1, dtype=torch.int64, device=dev)
                full[gmask] = slots
                self_index = full[offset:offset + B]
            mem_loss, mcounts = self._loss(embeddings, labels, self.memory.embeddings, self.memory.labels,
                                           ref_valid=len(self.memory), self_index=self_index)
            loss = loss + self.weight * mem_loss
            stats.update(memory_pos=mcounts[:, 0].sum(), memory_neg=mcounts[:, 1].sum())
        self._iteration += 1
        self.iteration.fill_(self._iteration)
        self.last_stats = stats
        return loss
