"""XBMLoss: the paper's training scheme (CONTRACT.md section 2).

    x = normalize(embeddings)                                      # normalize=True (default)
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
from .losses import LOSSES, run
from .memory import CrossBatchMemory
from .reference import normalize_rows

STAT_KEYS = ("in_batch_pos", "in_batch_neg", "memory_pos", "memory_neg")


def gather_batch(x, y, mask, verified=None):
    """All-gather (x, y, mask) across the torch.distributed ranks in rank order (the batch
    size must be the same on every rank); returns the global batch, this rank's offset, and
    None or a guard for CrossBatchMemory.write_checked. Shared by XBMLoss and the PML
    drop-in (gather_distributed=True).

    Every rank all-gathers the batch sizes at every call (a collective: the same calls in
    the same order on every rank). They are read on the host (one sync on a GPU) only when
    this rank's batch size differs from `verified`, the size the caller last saw verified
    on every rank (None: always read), and a mismatch raises at once. Otherwise the sizes
    are compared on the device, and the guard (flag, exception builder) makes the enqueue
    refuse the batch and report the mismatch at the next call. A rank whose size changes
    while the others' do not raises at once; the others, which did not read the sizes,
    wait in the next all-gather (until the process group's timeout)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    B = x.shape[0]
    parts = [torch.zeros((), dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(parts, torch.full((), B, dtype=torch.int64, device=x.device))  # no host-to-device copy
    sizes = torch.stack(parts)
    guard = None
    if B != verified:
        got = sizes.tolist()  # one read for every rank's size
        if any(s != B for s in got):
            raise ValueError(f"embeddings: gather_distributed needs the same batch size on every rank, got {got}")
    else:
        def error():
            got = sizes.tolist()
            if all(s == B for s in got):
                return None
            return ValueError(f"embeddings: gather_distributed needs the same batch size on every rank, got {got} "
                              f"at the previous enqueue; nothing was written")
        guard = ((sizes == B).all(), error)

    def cat(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    return cat(x), cat(y), (cat(mask) if mask is not None else None), rank * B, guard


class XBMLoss(nn.Module):
    """Cross-Batch Memory loss (Wang et al., CVPR 2020): the batch's loss against itself
    plus `weight` x its loss against a memory of the last `memory_size` embeddings.

    Each call is one training step t = 0, 1, ... (counted by the module, saved in its
    state_dict as `iteration`)::

        x = normalize(embeddings)                 # when normalize=True
        loss = L(x, y; x, y, self_index=arange(B))
        if t >= start_iteration:                  # the memory joins after the warm-up
            slots = memory.enqueue(x.detach(), y, enqueue_mask)
            loss = loss + weight * L(x, y; memory, self_index=slots)

    The batch is enqueued before the memory loss and each anchor's own slot is excluded by
    index, not by a similarity threshold.

    Args:
        memory_size: rows K of the memory (a ring buffer; the oldest rows are overwritten).
        embedding_dim: D, the embeddings' width.
        loss: "multi_similarity" (default: the configuration the README's study shows helping)
            or another name in xk.LOSSES: LOSS_NAMES. "contrastive" is the XBM paper's loss;
            in the study it hurt at weight 1 in every setting tried.
        weight: the memory loss's factor (the paper's code uses 1.0).
        start_iteration: warm-up steps without the memory (0: it joins at the first step).
        memory_dtype: float32 (default), bfloat16 or float16; the memory keeps it when the
            module is cast, and rows that overflow it are rejected at the enqueue.
        gather_distributed: under torch.distributed, every rank all-gathers the batch (in
            rank order) and enqueues the global batch, so the memories stay identical; each
            rank's memory loss covers its local anchors. The batch size must be equal on
            every rank and world_size x B must fit in the memory.
        backend: "auto" (default), "reference", "cpu", "triton" or "cuda".
        reduction: "mean" (default), "sum" or "none" (then the in-batch and memory losses
            are added per anchor).
        check_finite: reject non-finite rows (NaN/Inf, or overflowing the memory dtype) at
            the enqueue with a ValueError (on CUDA tensors without a host sync: a refused batch
            is not written and is reported at the next step, CrossBatchMemory); False removes
            the check.
        normalize: L2-normalise the batch first (autograd through it), so that both losses
            and the memory see unit rows; a scaled batch then gives the same loss. False
            uses the embeddings as given (they should then be L2-normalised already).
        **loss_kwargs: the loss's parameters, with the defaults of its function
            (xk.<loss>_loss): LOSS_PARAMS.

    forward(embeddings (B, D) float, labels (B,) integer tensor, enqueue_mask=None): with
    `enqueue_mask` (B,) bool only the rows where it is True are enqueued (the others are
    still anchors, with no copy in the memory). Every argument, and whether the batch fits
    in the memory, is checked at every step, also before the memory joins; a bad call
    raises before the memory or the step counter change.

    `last_stats` holds, after every step, the active pair counts as 0-dim int64 tensors
    (no host sync): in_batch_pos, in_batch_neg, memory_pos, memory_neg (the memory ones 0
    before the memory joins).

    state_dict() holds the step and the memory's rows, labels and counters, none of which
    depends on the loss: loading it into an XBMLoss of another loss is allowed (the memory
    carries over), and rows saved in another memory dtype are cast to this memory's dtype.

    `memory` is the CrossBatchMemory. `reset()` empties it and restarts the step counter
    (so the warm-up runs again); `reset(step=False)`, like `memory.reset()`, empties the
    memory only. state_dict()/load_state_dict() resume exactly (memory, pointer, fill and
    step); a load that fails changes nothing.
    """

    def __init__(self, memory_size, embedding_dim, loss="multi_similarity", weight=1.0, start_iteration=0,
                 memory_dtype=torch.float32, gather_distributed=False, backend="auto", reduction="mean",
                 check_finite=True, normalize=True, **loss_kwargs):
        super().__init__()
        memory_size = V.index("memory_size", memory_size, 1, V.MAX_ROWS)
        embedding_dim = V.index("embedding_dim", embedding_dim, 1, V.MAX_ROWS)
        if memory_dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"memory_dtype: expected one of {[str(d) for d in V.FLOAT_DTYPES]}, got {memory_dtype}")
        if loss not in LOSSES:
            raise ValueError(f"loss: unknown loss {loss!r}; available: {sorted(LOSSES)}")
        # names and values validated once, now: the steps pass them on as they are
        self._params = LOSSES[loss].values(loss_kwargs, where=f"XBMLoss(loss={loss!r}): ")
        if reduction not in V.REDUCTIONS:
            raise ValueError(f"reduction: expected one of {V.REDUCTIONS}, got {reduction!r}")
        if backend not in backends.NAMES + ("auto",):
            raise ValueError(f"backend: expected 'auto' or one of {list(backends.NAMES)}, got {backend!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
        self.loss_name, self.loss_kwargs, self.reduction, self.backend = loss, dict(loss_kwargs), reduction, backend
        self.weight = V.finite_number("weight", weight)
        self.start_iteration = V.index("start_iteration", start_iteration, 0, 2 ** 62)
        self.gather_distributed = bool(gather_distributed)
        self.normalize = normalize
        self.memory = CrossBatchMemory(memory_size, embedding_dim, dtype=memory_dtype, backend=backend,
                                       check_finite=check_finite)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))
        self._iteration = 0
        self._gathered_size = None  # the batch size last verified on every rank (gather_batch)
        self.last_stats = {}

    # (the docstring's lists of losses and parameters come from the registry, below the class)

    def extra_repr(self):
        spec = LOSSES[self.loss_name]
        params = "".join(f", {k}={self.loss_kwargs.get(k, v)!r}" for k, v in spec.defaults.items())
        return (f"loss={self.loss_name!r}{params}, weight={self.weight!r}, start_iteration={self.start_iteration}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}, normalize={self.normalize}, "
                f"gather_distributed={self.gather_distributed}, step={self._iteration}")

    @torch.no_grad()
    def reset(self, step=True):
        """Empties the memory; with step=True (the default) also sets the step counter to 0,
        so the memory joins again after `start_iteration` steps. step=False empties the
        memory only (the same as `self.memory.reset()`)."""
        self.memory.reset()
        if step:
            self._iteration = 0
            self.iteration.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The step and the memory are one state: both are checked before anything is
        # copied (the memory's entries load after this module's own), and a state that
        # has one without the other is rejected.
        key = prefix + "iteration"
        has_memory = self.memory.check_state(state_dict, prefix + "memory.")
        if (key in state_dict) != has_memory:
            have, lack = (key, prefix + "memory.*") if key in state_dict else (prefix + "memory.*", key)
            raise ValueError(f"state_dict: has {have!r} but not {lack!r}; the step and the memory load together; "
                             f"nothing was loaded")
        if key in state_dict:
            t = state_dict[key]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) not in ((), (1,)) or t.is_floating_point() \
                    or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"state_dict: {key!r}: expected an integer scalar tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}; nothing was loaded")
            if not 0 <= int(t.reshape(())) <= 2 ** 62:
                raise ValueError(f"state_dict: {key!r}: expected a step >= 0, got {int(t.reshape(()))}; "
                                 f"nothing was loaded")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.iteration.dtype != torch.int64 or self.iteration.dim():  # load_state_dict(assign=True)
            self.iteration = self.iteration.reshape(()).to(torch.int64)
        self._iteration = int(self.iteration)

    def _loss(self, backend, x, y, ref, ref_labels, n, self_index):
        """The loss on tensors _check_step() checked (run() validates nothing again)."""
        return run(LOSSES[self.loss_name], self._params, backend, x, y, ref, ref_labels, n, self_index,
                   self.reduction)

    def _check_step(self, embeddings, labels, enqueue_mask, distributed):
        """Every check of a step, once (CONTRACT.md section 7), whether or not the memory has
        joined; returns the backend that runs the loss."""
        V.tensor("embeddings", embeddings, dim=2, floating=True)
        dev = embeddings.device
        name = backends.resolve(self.backend, dev, self.loss_name, dim=embeddings.shape[1],
                                dtypes=(embeddings.dtype, self.memory.dtype))
        allowed = V.FLOAT_DTYPES + ((torch.float64,) if name == "reference" else ())
        if embeddings.dtype not in allowed:
            raise TypeError(f"embeddings: expected dtype in {[str(d) for d in allowed]} (backend {name!r}), got "
                            f"{embeddings.dtype}")
        if embeddings.shape[1] != self.memory.dim:
            raise ValueError(f"embeddings: expected dim {self.memory.dim} (embedding_dim), got {embeddings.shape[1]}")
        if self.memory.embeddings.device != dev:
            raise ValueError(f"embeddings: on {dev} but the memory is on {self.memory.embeddings.device}; "
                             f"move the XBMLoss module with .to(device)")
        V.tensor("labels", labels, dim=1, integer=True, device=dev)
        B = embeddings.shape[0]
        if labels.shape[0] != B:
            raise ValueError(f"labels: expected {B} labels (one per embedding), got {labels.shape[0]}")
        V.labels_fit_int32("labels", labels)
        if enqueue_mask is not None:
            V.tensor("enqueue_mask", enqueue_mask, dim=1, dtypes=(torch.bool,), device=dev)
            if enqueue_mask.shape[0] != B:
                raise ValueError(f"enqueue_mask: expected {B} entries (one per embedding), got "
                                 f"{enqueue_mask.shape[0]}")
        size = self.memory.size
        world = dist.get_world_size() if distributed else 1
        if enqueue_mask is None and world * B > size:
            what = f"the global batch of {world} ranks x {B} rows" if world > 1 else f"batch of {B} rows"
            raise ValueError(f"embeddings: {what} is larger than the memory (size {size})")
        if enqueue_mask is not None and world == 1 and B > size and V.value_checks_on(enqueue_mask):
            b = int(enqueue_mask.sum())
            if b > size:
                raise ValueError(f"embeddings: batch of {b} rows (enqueue_mask) is larger than the memory "
                                 f"(size {size})")
        return name

    def forward(self, embeddings, labels, enqueue_mask=None):
        """Returns the XBM loss of the batch; `last_stats` gets the active pair counts."""
        distributed = self.gather_distributed and dist.is_available() and dist.is_initialized()
        name = self._check_step(embeddings, labels, enqueue_mask, distributed)
        dev = embeddings.device
        B = embeddings.shape[0]
        x = embeddings
        if self.normalize:  # in fp32 for half inputs, so that a large row's norm cannot overflow
            x = normalize_rows(x).to(x.dtype)
        self_idx = torch.arange(B, device=dev)
        # The batch is both sides of the in-batch loss; a view as the reference side keeps the
        # two inputs distinct tensors for torch.compile (autograd.Function rejects duplicates)
        # while the gradients of both sides still reach `embeddings`.
        loss, counts = self._loss(name, x, labels, x.view_as(x), labels.view_as(labels), B, self_idx)
        use_memory = self._iteration >= self.start_iteration
        if use_memory:  # validate the enqueue before the step counter or the memory change
            guard = None
            if distributed:  # the sizes read on the host only for a new batch size where reads stall
                gx, gy, gmask, offset, guard = gather_batch(
                    x.detach(), labels, enqueue_mask, self._gathered_size if self.memory._deferred() else None)
                self._gathered_size = B
            else:
                gx, gy, gmask, offset = x.detach(), labels, enqueue_mask, 0
            b = self.memory.check_batch(gx, gy, gmask, checked=True)
        pos, neg = counts[:, 0].sum(), counts[:, 1].sum()
        stats = {"in_batch_pos": pos, "in_batch_neg": neg}
        if use_memory:
            slots = self.memory.write_checked(gx, gy, gmask, b, guard=guard)
            if gmask is None:
                self_index = slots[offset:offset + B]
            else:  # masked-out rows have no copy in the memory
                full = torch.full((gx.shape[0],), -1, dtype=torch.int64, device=dev)
                full[gmask] = slots
                self_index = full[offset:offset + B]
            # the host counter as written: len() would wait for this step's deferred check
            mem_loss, mcounts = self._loss(name, x, labels, self.memory.embeddings, self.memory.labels,
                                           self.memory._num_filled, self_index)
            loss = loss + self.weight * mem_loss
            stats.update(memory_pos=mcounts[:, 0].sum(), memory_neg=mcounts[:, 1].sum())
        else:
            zero = torch.zeros((), dtype=pos.dtype, device=dev)
            stats.update(memory_pos=zero, memory_neg=zero.clone())
        self._iteration += 1
        self.iteration.fill_(self._iteration)
        self.last_stats = stats
        return loss


XBMLoss.__doc__ = XBMLoss.__doc__.replace("LOSS_NAMES", ", ".join(sorted(LOSSES))).replace(
    "LOSS_PARAMS", "; ".join(f"{name}: {', '.join(spec.defaults)}" for name, spec in sorted(LOSSES.items())))
