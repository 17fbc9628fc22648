"""Drop-in for pytorch-metric-learning's `losses.CrossBatchMemory`.

    from pytorch_metric_learning import losses, miners, distances
    from xbm_kernels.pml import CrossBatchMemory          # was: losses.CrossBatchMemory
    loss_fn = CrossBatchMemory(losses.ContrastiveLoss(pos_margin=1, neg_margin=0.5,
                                                      distance=distances.CosineSimilarity()),
                               embedding_size=128, memory_size=16384)
    loss = loss_fn(embeddings, labels)                 # PML's numbers, on the fused kernels

Semantics are PML's (CONTRACT.md, "pytorch-metric-learning drop-in"): the batch is enqueued
first, then the loss of the batch against the memory alone (no in-batch term), each anchor's
own copy excluded by its slot; `enqueue_mask` rows are enqueued and are not anchors (and
have no copy to exclude); the loss's reducer as PML applies it. Self-pairs are removed
before mining (PML 3's order); PML 2.9 mines first and then drops mined self-pairs, which
differs only for an anchor whose one positive in the memory is its own copy.

Underneath is xbm_kernels' memory: an exact ring, `state_dict()` resume (PML 2.x keeps its
pointer and fill flag outside the state dict), the memory's own dtype (`memory_dtype`), and
with `gather_distributed=True` one global batch enqueued in rank order on every rank, so the
memories stay identical across DDP ranks.

A configuration with a fused equivalent (`fused_configurations()`; `.fused` names the one
chosen) runs on the fused kernels; every other PML loss runs through PML's own loss function
against this memory. A configuration runs fused only where the numbers are PML's.
"""
import importlib.util

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import _validate as V
from .losses import check_inputs, run
from .memory import CrossBatchMemory as _Memory
from .registry import LOSSES
from .xbm import gather_batch

SUPPORTED_LOSSES = ("AngularLoss", "CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss",
                    "IntraPairVarianceLoss", "LiftedStructureLoss", "MarginLoss", "MultiSimilarityLoss", "NCALoss",
                    "NTXentLoss", "SignalToNoiseRatioContrastiveLoss", "SupConLoss", "TripletMarginLoss",
                    "TupletMarginLoss")

# Kernel parameter values that switch a contrastive term off: S is a cosine similarity,
# so S > 2 (no hard negatives) and S < 1 - 3 (no positives) never hold.
_NO_NEGATIVES_MARGIN, _NO_POSITIVES_EPS = 2.0, 3.0
# pos_eps = -1: every same-label valid column is a positive (PML drops no duplicates).
_ALL_POSITIVES = -1.0


def _pml():
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        raise ImportError("xbm_kernels.pml needs pytorch-metric-learning: pip install pytorch-metric-learning")
    from pytorch_metric_learning import distances, losses, miners, reducers
    from pytorch_metric_learning.utils import common_functions as c_f
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    return distances, losses, miners, reducers, c_f, lmu


# --------------------------------------------------------------------------- fused plans


def _is_plain_cosine(distance):
    distances = _pml()[0]
    return (type(distance) is distances.CosineSimilarity and distance.normalize_embeddings and distance.p == 2
            and distance.power == 1)


def _reducer_is(reducer, name, **attrs):
    reducers = _pml()[3]
    if type(reducer) is not getattr(reducers, name):
        return False
    return all(getattr(reducer, k, None) == v for k, v in attrs.items())


def _avg_nonzero(reducer):
    return _reducer_is(reducer, "AvgNonZeroReducer", low=0, high=None)


def _plain_loss(loss):
    return getattr(loss, "embedding_regularizer", None) is None and _is_plain_cosine(loss.distance)


def _mean_nonzero(rows):
    """PML's AvgNonZeroReducer over per-element losses: the mean of those > 0 (0 if none)."""
    nonzero = rows > 0
    return torch.where(nonzero, rows, rows.new_zeros(())).sum() / nonzero.sum().clamp_min(1)


class _Step:
    """One memory-loss evaluation: the normalised anchors, labels, the memory's filled
    prefix and the anchors' own slots (or None); `run(loss, params)` -> (rows, counts)."""

    def __init__(self, x, y, mem, mem_labels, n, self_index, backend):
        self.x, self.y, self.mem, self.mem_labels, self.n, self.self_index = x, y, mem, mem_labels, n, self_index
        self.backend = backend
        self._checked = {}  # loss name -> (backend, ref_valid, self_index): one check per step, not per pass

    def run(self, loss, params):
        spec = LOSSES[loss]
        if loss not in self._checked:
            self._checked[loss] = check_inputs(spec, self.x, self.y, self.mem, self.mem_labels, self.n,
                                               self.self_index, "none", self.backend)
        name, n, si = self._checked[loss]
        return run(spec, params, name, self.x, self.y, self.mem, self.mem_labels, n, si, "none")

    def total_pairs(self):
        """Number of (anchor, valid column) pairs, known on the host."""
        own = 0 if self.self_index is None else self.x.shape[0]  # every anchor's copy is in the memory
        return self.x.shape[0] * self.n - own

    def few_pairs_zero(self, loss):
        """PML's pair losses return 0 when at most one positive and one negative pair exist;
        that can only happen with <= 2 pairs in all, counted then exactly (tiny)."""
        if self.total_pairs() > 2:
            return loss
        same = self.y[:, None] == self.mem_labels[None, :self.n]
        valid = torch.ones_like(same)
        if self.self_index is not None:
            valid &= torch.arange(self.n, device=same.device)[None, :] != self.self_index[:, None]
        n_pos, n_neg = int((same & valid).sum()), int((~same & valid).sum())
        return loss * 0 if n_pos <= 1 and n_neg <= 1 else loss

    def any_negative_pair(self):
        """Whether some anchor has a negative: a copy has its anchor's label, so this is
        'not every label of the anchors and the memory is the same'."""
        if self.n == 0 or self.x.shape[0] == 0:
            return torch.zeros((), dtype=torch.bool, device=self.x.device)
        first = self.y[0].to(self.mem_labels.dtype)
        return (self.mem_labels[:self.n] != first).any() | (self.y.to(self.mem_labels.dtype) != first).any()


def _is_plain_l2(distance):
    distances = _pml()[0]
    return (type(distance) is distances.LpDistance and distance.normalize_embeddings and distance.p == 2
            and distance.power == 1)


def _contrastive(loss, miner):
    if miner is not None or getattr(loss, "embedding_regularizer", None) is not None:
        return None
    if not (type(loss.reducer).__name__ == "MultipleReducers" and set(loss.reducer.reducers) == {"pos_loss", "neg_loss"}
            and all(_avg_nonzero(r) for r in loss.reducer.reducers.values())):
        return None
    pm, nm = float(loss.pos_margin), float(loss.neg_margin)
    if _is_plain_cosine(loss.distance):
        def terms(step):
            # relu(pm - S) over positives and relu(S - nm) over negatives: two passes of the
            # contrastive kernel (the other term switched off), whose rows sum 1 - S over
            # {S < pm} and S over {S > nm}; the offsets are exact counts.
            pos_rows, pos_counts = step.run("contrastive", (_NO_NEGATIVES_MARGIN, 1.0 - pm))
            neg_rows, neg_counts = step.run("contrastive", (nm, _NO_POSITIVES_EPS))
            n_pos, n_neg = pos_counts[:, 0].sum(), neg_counts[:, 1].sum()
            return pos_rows.sum() - (1.0 - pm) * n_pos, n_pos, neg_rows.sum() - nm * n_neg, n_neg
    elif _is_plain_l2(loss.distance):
        def terms(step):
            # relu(d - pm) over positives and relu(nm - d) over negatives, d the L2 distance
            # of unit rows: two passes of contrastive_l2 (neg_margin -1: no negative is active)
            pos_rows, pos_counts = step.run("contrastive_l2", (pm, -1.0, _ALL_POSITIVES))
            neg_rows, neg_counts = step.run("contrastive_l2", (pm, nm, _NO_POSITIVES_EPS))
            return pos_rows.sum(), pos_counts[:, 0].sum(), neg_rows.sum(), neg_counts[:, 1].sum()
    else:
        return None

    def fused(step):
        # PML averages each term over its own non-zero pairs, so the two need their own passes
        pos, n_pos, neg, n_neg = terms(step)
        return step.few_pairs_zero(pos / n_pos.clamp_min(1) + neg / n_neg.clamp_min(1))

    return fused


def _multi_similarity(loss, miner):
    miners = _pml()[2]
    if not (_plain_loss(loss) and _reducer_is(loss.reducer, "MeanReducer")):
        return None
    if miner is not None and not (type(miner) is miners.MultiSimilarityMiner and _is_plain_cosine(miner.distance)):
        return None
    eps = float(miner.epsilon) if miner is not None else 0.0
    params = (float(loss.alpha), float(loss.beta), float(loss.base), eps, _ALL_POSITIVES, miner is not None, False)

    def fused(step):
        rows, counts = step.run("multi_similarity", params)
        out = rows.mean() if rows.numel() else rows.sum()
        if miner is None:
            return step.few_pairs_zero(out)
        few = (counts[:, 0].sum() <= 1) & (counts[:, 1].sum() <= 1)  # mined pairs, as PML counts them
        return torch.where(few, out * 0, out)

    return fused


def _supcon(loss, miner):
    if miner is not None or not (_plain_loss(loss) and _avg_nonzero(loss.reducer)):
        return None
    params = (float(loss.temperature), _ALL_POSITIVES)

    def fused(step):
        rows, counts = step.run("supcon", params)
        out = _mean_nonzero(rows)
        computed = (counts[:, 0].sum() > 0) & step.any_negative_pair()  # PML: some positive and some negative pair
        return step.few_pairs_zero(torch.where(computed, out, out * 0))

    return fused


def _ntxent(loss, miner):
    if miner is not None or not (_plain_loss(loss) and _reducer_is(loss.reducer, "MeanReducer")):
        return None
    params = (float(loss.temperature), _ALL_POSITIVES)

    def fused(step):
        rows, counts = step.run("ntxent", params)
        # the mean over positive pairs; 0 without positives or negatives (each pair's term is 0 then)
        return step.few_pairs_zero(rows.sum() / counts[:, 0].sum().clamp_min(1))

    return fused


def _triplet(loss, miner):
    miners = _pml()[2]
    if not (_plain_loss(loss) and _avg_nonzero(loss.reducer) and not loss.swap and not loss.smooth_loss):
        return None
    if not (type(miner) is miners.BatchHardMiner and _is_plain_cosine(miner.distance)
            and miner.allowed_pos_range is None and miner.allowed_neg_range is None):
        return None
    params = (float(loss.margin), _ALL_POSITIVES)

    def fused(step):
        rows, _ = step.run("triplet", params)
        return _mean_nonzero(rows)

    return fused


# (name, PML loss class name, planner): the fused configurations, in the order tried.
_PLANS = (
    ("contrastive: ContrastiveLoss() (LpDistance, PML's default) or ContrastiveLoss(distance=CosineSimilarity()), "
     "no miner", "ContrastiveLoss", _contrastive),
    ("multi_similarity: MultiSimilarityLoss(), no miner or MultiSimilarityMiner()", "MultiSimilarityLoss",
     _multi_similarity),
    ("supcon: SupConLoss(), no miner", "SupConLoss", _supcon),
    ("ntxent: NTXentLoss(), no miner", "NTXentLoss", _ntxent),
    ("triplet: TripletMarginLoss(distance=CosineSimilarity()) with BatchHardMiner(distance=CosineSimilarity())",
     "TripletMarginLoss", _triplet),
)


def fused_configurations():
    """The PML configurations that run on the fused kernels (default reducers, no embedding
    regularizer, CosineSimilarity() with its defaults (the contrastive loss: also
    LpDistance() with its defaults); any loss parameters)."""
    return [name for name, _, _ in _PLANS]


def plan(loss, miner=None):
    """(name, fused function) for a PML loss and miner, or (None, None): PML's own loss."""
    for name, cls, planner in _PLANS:
        if type(loss).__name__ == cls:
            fn = planner(loss, miner)
            if fn is not None:
                return name, fn
    return None, None


# --------------------------------------------------------------------------- the module


class CrossBatchMemory(nn.Module):
    """PML's `CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)` on
    xbm_kernels' memory and fused kernels.

    forward(embeddings, labels, indices_tuple=None, enqueue_mask=None) -> loss: enqueues the
    batch (or the rows where enqueue_mask is True, which are then not anchors), then returns
    the loss of the anchors against the memory, as PML defines it. reset_queue() empties the
    memory. Extra keywords (ours): memory_dtype (the memory's dtype, kept under model.half()),
    backend ("auto" or an xbm_kernels backend for the fused kernels), gather_distributed
    (enqueue the all-gathered batch on every rank). `.fused` names the fused configuration in
    use, or is None when PML's loss runs against the memory.
    """

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None, *, memory_dtype=torch.float32,
                 backend="auto", gather_distributed=False, check_finite=True):
        super().__init__()
        name = type(loss).__name__
        if name not in SUPPORTED_LOSSES:
            raise ValueError(f"loss: CrossBatchMemory not supported for {name}; supported: {list(SUPPORTED_LOSSES)}")
        _pml()
        self.loss, self.miner = loss, miner
        self.embedding_size = V.index("embedding_size", embedding_size, 1, 2 ** 31 - 1)
        self.memory_size = V.index("memory_size", memory_size, 1, 2 ** 62)
        self.backend, self.gather_distributed = backend, bool(gather_distributed)
        self.fused, self._fused_fn = plan(loss, miner)
        # Rows are stored as the distances see them: normalised when they normalise (every
        # fused configuration), which is what PML computes from its raw rows each step.
        dists = [getattr(m, "distance", None) for m in (loss, miner) if m is not None]
        self.normalize = all(d is not None and d.normalize_embeddings and d.p == 2 for d in dists)
        self.memory = _Memory(self.memory_size, self.embedding_size, dtype=memory_dtype, backend=backend,
                              check_finite=check_finite)

    def extra_repr(self):
        return (f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, fused={self.fused!r}, "
                f"filled={len(self.memory)}")

    def reset_queue(self):
        """Empties the memory (PML's name for it)."""
        self.memory.reset()

    def _gathered(self, x, y, mask):
        """The batch all-gathered in rank order with gather_distributed, and this rank's offset."""
        if not (self.gather_distributed and dist.is_available() and dist.is_initialized()):
            return x, y, mask, 0
        return gather_batch(x, y, mask)

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        V.tensor("embeddings", embeddings, dim=2, floating=True, device=self.memory.embeddings.device)
        labels = V.tensor("labels", torch.as_tensor(labels, device=embeddings.device), dim=1, integer=True)
        B = embeddings.shape[0]
        if enqueue_mask is not None:
            V.tensor("enqueue_mask", enqueue_mask, dim=1, dtypes=(torch.bool,), device=embeddings.device)
            if enqueue_mask.shape[0] != B:
                raise ValueError(f"enqueue_mask: expected {B} entries (one per embedding), got {enqueue_mask.shape[0]}")
        stored = F.normalize(embeddings.detach(), dim=1) if self.normalize else embeddings.detach()
        gx, gy, gmask, offset = self._gathered(stored, labels, enqueue_mask)
        b = self.memory.check_batch(gx, gy, gmask)  # everything checked before the memory changes
        slots = self.memory.write_checked(gx, gy, gmask, b)
        if enqueue_mask is not None:
            anchors, anchor_labels, self_index = embeddings[~enqueue_mask], labels[~enqueue_mask], None
        else:
            anchors, anchor_labels, self_index = embeddings, labels, slots[offset:offset + B]
        n = len(self.memory)
        if self._fused_fn is not None and indices_tuple is None:
            x = F.normalize(anchors, dim=1)
            step = _Step(x, anchor_labels, self.memory.embeddings, self.memory.labels, n, self_index, self.backend)
            return self._fused_fn(step)
        return self._pml_loss(anchors, anchor_labels, self_index, n, indices_tuple)

    def _pml_loss(self, x, y, self_index, n, input_indices_tuple):
        """PML's own loss against this memory: its miner (or all pairs), mined self-pairs
        removed, the caller's indices_tuple appended, as PML's wrapper does."""
        _, _, _, _, c_f, lmu = _pml()
        mem = self.memory.embeddings[:n].to(x.dtype)
        mem_labels = self.memory.labels[:n].to(y.dtype)
        if self.miner is not None:
            indices = self.miner(x, y, mem, mem_labels)
        else:
            indices = lmu.get_all_pairs_indices(y, mem_labels)
        if self_index is not None:
            a, p = indices[0], indices[1]
            keep = p != self_index[a]
            indices = tuple(t[keep] for t in indices[:2]) + tuple(indices[2:]) if len(indices) == 4 \
                else tuple(t[keep] for t in indices)
        if input_indices_tuple is not None:
            if len(input_indices_tuple) == 3 and len(indices) == 4:
                input_indices_tuple = lmu.convert_to_pairs(input_indices_tuple, y)
            elif len(input_indices_tuple) == 4 and len(indices) == 3:
                input_indices_tuple = lmu.convert_to_triplets(input_indices_tuple, y)
            indices = c_f.concatenate_indices_tuples(indices, input_indices_tuple)
        return self.loss(x, y, indices, mem, mem_labels)
