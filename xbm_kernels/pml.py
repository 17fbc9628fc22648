"""Drop-in for pytorch-metric-learning's `losses.CrossBatchMemory`.

    from pytorch_metric_learning import losses, miners, distances
    from xbm_kernels.pml import CrossBatchMemory          # was: losses.CrossBatchMemory
    loss_fn = CrossBatchMemory(losses.ContrastiveLoss(pos_margin=1, neg_margin=0.5,
                                                      distance=distances.CosineSimilarity()),
                               embedding_size=128, memory_size=16384)
    loss = loss_fn(embeddings, labels)                 # PML's numbers, on the fused kernels

Semantics are PML 2.9's (CONTRACT.md, "pytorch-metric-learning drop-in"): the batch is
enqueued first, then the loss of the batch against the memory alone (no in-batch term);
the miner (or all pairs) sees the memory with the batch's own copies in it, and the
(anchor, own slot) pairs are dropped afterwards; `enqueue_mask` rows are enqueued and are
not anchors (and have no copy to exclude); the loss's reducer as PML applies it. The memory
holds the rows PML holds (as given, detached, in `memory_dtype`).

Underneath is xbm_kernels' memory: an exact ring, `state_dict()` resume (PML 2.x keeps its
pointer and fill flag outside the state dict), the memory's own dtype (`memory_dtype`), and
with `gather_distributed=True` one global batch enqueued in rank order on every rank, so the
memories stay identical across DDP ranks.

The loss and miner are read at every call, as PML does: changing a temperature, a margin,
a reducer or `.miner` between steps takes effect at the next step. A call whose
configuration has a fused equivalent (`fused_configurations()`; `.fused` names the one the
current settings give) runs on the fused kernels against the memory's rows normalised
(kept beside the memory, updated at each enqueue); every other call runs PML's own loss
function against the memory. A configuration runs fused only where the numbers are PML's.
"""
import functools
import importlib.util
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import _validate as V
from .losses import active_triplets, check_inputs, run
from .memory import CrossBatchMemory as _Memory
from .reference import normalize_rows
from .registry import LOSSES
from .xbm import gather_batch

SUPPORTED_LOSSES = ("AngularLoss", "CircleLoss", "ContrastiveLoss", "GeneralizedLiftedStructureLoss",
                    "IntraPairVarianceLoss", "LiftedStructureLoss", "MarginLoss", "MultiSimilarityLoss", "NCALoss",
                    "NTXentLoss", "SignalToNoiseRatioContrastiveLoss", "SupConLoss", "TripletMarginLoss",
                    "TupletMarginLoss")


@functools.lru_cache(maxsize=None)
def _pml():
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        raise ImportError("xbm_kernels.pml needs pytorch-metric-learning: pip install pytorch-metric-learning")
    from pytorch_metric_learning import distances, losses, miners, reducers
    from pytorch_metric_learning.utils import common_functions as c_f
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
    return distances, losses, miners, reducers, c_f, lmu


def _count_in(sorted_values, queries):
    """How many times each query occurs in a sorted 1-D tensor: O(log n) each, not a B x n
    comparison."""
    return torch.searchsorted(sorted_values, queries, right=True) - torch.searchsorted(sorted_values, queries)


# --------------------------------------------------------------------------- fused plans


def _is_plain(distance, name):
    distances = _pml()[0]
    return (type(distance) is getattr(distances, name) and distance.normalize_embeddings is True
            and distance.p == 2 and distance.power == 1)


def _reducer_is(reducer, name, **attrs):
    reducers = _pml()[3]
    if type(reducer) is not getattr(reducers, name):
        return False
    return all(getattr(reducer, k, None) == v for k, v in attrs.items())


def _avg_nonzero(reducer):
    return _reducer_is(reducer, "AvgNonZeroReducer", low=0, high=None)


def _plain_loss(loss):
    return getattr(loss, "embedding_regularizer", None) is None and _is_plain(loss.distance, "CosineSimilarity")


def _number(v):
    """A loss or miner setting as a float (PML accepts Python numbers and 0-dim tensors);
    None when it is neither (the plan then falls back to PML's own loss)."""
    if isinstance(v, torch.Tensor):
        return float(v) if v.numel() == 1 and not v.requires_grad else None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _params(loss_name, **named):
    """Kernel parameters by name through the registry, or None when a value is outside what
    the kernels accept (the call then runs PML's own loss)."""
    if any(v is None for v in named.values()):
        return None
    try:
        return LOSSES[loss_name].kernel_values(**named)
    except (TypeError, ValueError):
        return None


def _mean_nonzero(rows):
    """PML's AvgNonZeroReducer over per-element losses: the mean of those > 0 (0 if none)."""
    nonzero = rows > 0
    return torch.where(nonzero, rows, rows.new_zeros(())).sum() / nonzero.sum().clamp_min(1)


class _Step:
    """One memory-loss evaluation: the normalised anchors x, labels y, the memory's unit rows
    and labels, its filled length n and the anchors' own slots (or None); run(loss, params)
    -> (rows, counts) on the kernels (the reference backend for float64 anchors)."""

    def __init__(self, x, y, mem, mem_labels, n, self_index, backend):
        self.x, self.y, self.mem, self.mem_labels, self.n, self.self_index = x, y, mem, mem_labels, n, self_index
        # the kernels take 32- and 16-bit rows: float64 anchors or memory run the reference
        self.backend = "reference" if torch.float64 in (x.dtype, mem.dtype) else backend
        self._checked = {}  # loss name -> (backend, ref_valid, self_index): one check per step, not per pass
        self._same_counts = None  # same_label_counts(), once per step

    def run(self, loss, params, subset=None):
        """(rows, counts) of `loss`; with `subset` (anchor indices), those anchors alone with
        no own slot excluded (their copy counts as a column). Checked once per step and loss."""
        spec = LOSSES[loss]
        if loss not in self._checked:
            self._checked[loss] = check_inputs(spec, self.x, self.y, self.mem, self.mem_labels, self.n,
                                               self.self_index, "none", self.backend)
        name, n, si = self._checked[loss]
        if subset is None:
            return run(spec, params, name, self.x, self.y, self.mem, self.mem_labels, n, si, "none")
        return run(spec, params, name, self.x[subset], self.y[subset], self.mem, self.mem_labels, n, None, "none")

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

    def same_label_counts(self):
        """Per anchor, the filled memory rows with its label, its own copy included (int (B,)):
        counted once per step by sorting the memory's labels, O(n log n), not a B x n
        comparison."""
        if self._same_counts is None:
            self._same_counts = _same_label_counts(self.mem_labels, self.n, self.y)
        return self._same_counts

    def same_label_pairs(self):
        """The number of (anchor, valid same-label column) pairs, own slots excluded (a copy has
        its anchor's label)."""
        own = 0 if self.self_index is None else self.x.shape[0]
        return self.same_label_counts().sum() - own

    def any_triplet(self):
        """Whether some anchor has a positive (a same-label row other than its copy) and a
        negative."""
        same = self.same_label_counts()
        own = 0 if self.self_index is None else 1
        return ((same - own > 0) & (same < self.n)).any()

    def lonely(self):
        """Anchors whose only same-label row in the memory is their own copy (bool (B,))."""
        return self.same_label_counts() <= 1


def _same_label_counts(mem_labels, n, y):
    """How many of the first n memory labels equal each of y (int (B,)), by one sort."""
    labels, _ = mem_labels[:n].sort()
    return _count_in(labels, y.to(labels.dtype).contiguous())


def _contrastive(loss, miner):
    if miner is not None or getattr(loss, "embedding_regularizer", None) is not None:
        return None
    r = loss.reducer
    if not (type(r) is _pml()[3].MultipleReducers and set(r.reducers) == {"pos_loss", "neg_loss"}
            and all(_avg_nonzero(v) for v in r.reducers.values())):
        return None
    pm, nm = _number(loss.pos_margin), _number(loss.neg_margin)
    if _is_plain(loss.distance, "CosineSimilarity"):
        # relu(pm - S) over positives and relu(S - nm) over negatives: two passes of the
        # contrastive kernel (the other term switched off), whose rows sum 1 - S over
        # {S < pm} and S over {S > nm}; the offsets are exact counts.
        pos_p = _params("contrastive", margin=2.0, pos_eps=None if pm is None else 1.0 - pm)
        neg_p = _params("contrastive", margin=nm, pos_eps=3.0)
        if pos_p is None or neg_p is None:
            return None

        def terms(step):
            pos_rows, pos_counts = step.run("contrastive", pos_p)
            neg_rows, neg_counts = step.run("contrastive", neg_p)
            n_pos = pos_counts[:, 0].sum().to(pos_rows.dtype)
            n_neg = neg_counts[:, 1].sum().to(neg_rows.dtype)
            return pos_rows.sum() - (1.0 - pm) * n_pos, n_pos, neg_rows.sum() - nm * n_neg, n_neg
        needs_nonzero_rows = None
    elif _is_plain(loss.distance, "LpDistance"):
        # relu(d - pm) over positives and relu(nm - d) over negatives, d the L2 distance of
        # unit rows: two passes of contrastive_l2 (neg_margin -1: no negative is active)
        pos_p = _params("contrastive_l2", pos_margin=pm, neg_margin=-1.0, pos_eps=-1.0)
        neg_p = _params("contrastive_l2", pos_margin=pm, neg_margin=nm, pos_eps=3.0)
        if pos_p is None or neg_p is None:
            return None

        def terms(step):
            pos_rows, pos_counts = step.run("contrastive_l2", pos_p)
            neg_rows, neg_counts = step.run("contrastive_l2", neg_p)
            return pos_rows.sum(), pos_counts[:, 0].sum(), neg_rows.sum(), neg_counts[:, 1].sum()
        # d = sqrt(2 - 2S) holds for unit rows; a zero row (PML: distance 1 to every unit
        # row) runs PML's own loss for that step
        needs_nonzero_rows = "anchors+memory"
    else:
        return None

    def fused(step):
        # PML averages each term over its own non-zero pairs, so the two need their own passes
        pos, n_pos, neg, n_neg = terms(step)
        return step.few_pairs_zero(pos / n_pos.clamp_min(1) + neg / n_neg.clamp_min(1))

    fused.needs_nonzero_rows = needs_nonzero_rows
    return fused


def _multi_similarity(loss, miner):
    miners = _pml()[2]
    if not (_plain_loss(loss) and _reducer_is(loss.reducer, "MeanReducer")):
        return None
    if miner is not None and not (type(miner) is miners.MultiSimilarityMiner and _is_plain(miner.distance,
                                                                                          "CosineSimilarity")):
        return None
    eps = _number(miner.epsilon) if miner is not None else 0.0
    alpha, beta, base = _number(loss.alpha), _number(loss.beta), _number(loss.base)
    params = _params("multi_similarity", alpha=alpha, beta=beta, base=base, mining_margin=eps, pos_eps=-1.0,
                     mine=miner is not None, skip_incomplete=False)
    if params is None:
        return None

    def fused(step):
        rows, counts = step.run("multi_similarity", params)
        if miner is not None and step.self_index is not None:
            rows, counts = _mine_with_copies(step, rows, counts, params, alpha, base)
        out = rows.mean() if rows.numel() else rows.sum()
        if miner is None:
            return step.few_pairs_zero(out)
        few = (counts[:, 0].sum() <= 1) & (counts[:, 1].sum() <= 1)  # mined pairs, as PML counts them
        return torch.where(few, out * 0, out)

    return fused


def _mine_with_copies(step, rows, counts, params, alpha, base):
    """PML 2.9 mines with the batch's copies in the memory and drops mined self-pairs
    afterwards. The kernel excludes the copy before mining, which differs only for an anchor
    whose one same-label row is its copy: PML's hardest positive is then the copy (S ~ 1), so
    the negatives with S + epsilon > S_copy are mined, and the copy itself is dropped. Those
    anchors run again with the copy as their one positive (self_index none), and the copy's
    own term, softplus(-alpha (S_copy - base)) / alpha where it was mined, is taken out."""
    lonely = step.lonely()
    idx = lonely.nonzero()[:, 0]
    if idx.numel() == 0:
        return rows, counts
    x, slots = step.x[idx], step.self_index[idx]
    rows2, counts2 = step.run("multi_similarity", params, subset=idx)
    dtype = torch.promote_types(torch.promote_types(x.dtype, step.mem.dtype), torch.float32)
    s_copy = (x.to(dtype) * step.mem[slots].to(dtype)).sum(1)
    mined = counts2[:, 0] > 0  # the copy is the anchor's only positive
    copy_term = F.softplus(-alpha * (s_copy - base)) / alpha
    rows2 = rows2 - torch.where(mined, copy_term, copy_term.new_zeros(()))
    counts2 = counts2 - torch.stack([mined.to(counts2.dtype), torch.zeros_like(counts2[:, 1])], dim=1)
    return rows.index_put((idx,), rows2.to(rows.dtype)), counts.index_put((idx,), counts2)


def _supcon(loss, miner):
    if miner is not None or not (_plain_loss(loss) and _avg_nonzero(loss.reducer)):
        return None
    params = _params("supcon", temperature=_number(loss.temperature), pos_eps=-1.0)
    if params is None:
        return None

    def fused(step):
        rows, counts = step.run("supcon", params)
        out = _mean_nonzero(rows)
        computed = (counts[:, 0].sum() > 0) & step.any_negative_pair()  # PML: some positive and some negative pair
        return step.few_pairs_zero(torch.where(computed, out, out * 0))

    return fused


def _ntxent(loss, miner):
    if miner is not None or not (_plain_loss(loss) and _reducer_is(loss.reducer, "MeanReducer")):
        return None
    params = _params("ntxent", temperature=_number(loss.temperature), pos_eps=-1.0)
    if params is None:
        return None

    def fused(step):
        rows, counts = step.run("ntxent", params)
        # the mean over positive pairs; 0 without positives or negatives (each pair's term is 0 then)
        return step.few_pairs_zero(rows.sum() / counts[:, 0].sum().clamp_min(1))

    return fused


def _circle(loss, miner):
    if miner is not None or not (_plain_loss(loss) and _avg_nonzero(loss.reducer)):
        return None
    # PML's loss reads op, on, delta_p and delta_n, which its constructor derives from m (a
    # later change of m alone changes nothing): the kernel's one m is delta_n, when the other
    # three are still what m = delta_n gives; else PML's own loss runs.
    m = _number(loss.delta_n)
    if m is None or (_number(loss.op), _number(loss.on), _number(loss.delta_p)) != (1 + m, -m, 1 - m):
        return None
    params = _params("circle", m=m, gamma=_number(loss.gamma), pos_eps=-1.0)
    if params is None:
        return None

    def fused(step):
        # PML's rows are 0 without a positive or a negative pair, as the kernel's
        rows, _ = step.run("circle", params)
        return step.few_pairs_zero(_mean_nonzero(rows))

    return fused


# tuplet_margin's pos_eps in the drop-in: PML takes every same-label pair as a positive, and its
# acos is NaN beyond S = 1 and has an infinite slope at S = 1 (an exact duplicate), ill
# conditioned near it; a step where a same-label pair has S >= 1 - this runs PML's own loss.
TUPLET_NEAR_ONE = 1e-5


def _tuplet_margin(loss, miner):
    if miner is not None or not (_plain_loss(loss) and _reducer_is(loss.reducer, "MeanReducer")):
        return None
    if loss.collect_stats:  # PML's loss then records avg_pos_angle / avg_neg_angle, which the op does not
        return None
    margin = _number(loss.margin)  # radians: PML's constructor converts its degrees, and reads radians
    params = _params("tuplet_margin", margin=None if margin is None else math.degrees(margin),
                     scale=_number(loss.scale), pos_eps=TUPLET_NEAR_ONE)
    if params is None:
        return None

    def fused(step):
        rows, counts = step.run("tuplet_margin", params)
        n_pos = counts[:, 0].sum()
        if bool(n_pos != step.same_label_pairs()):  # a same-label pair at S >= 1 - TUPLET_NEAR_ONE
            return None
        # the mean over positive pairs; a pair without negatives contributes 0 and counts (PML's
        # log(1 + empty sum)); 0 without any positive pair
        return step.few_pairs_zero(rows.sum() / n_pos.clamp_min(1))

    return fused


def _triplet_interval(miner):
    """(select_low, select_high) on u = S_ip - S_in of the triplets a TripletMarginMiner with
    CosineSimilarity keeps (its triplet margin is S_ap - S_an), or None for another miner or
    setting; (-3, 3) (every triplet) without a miner."""
    miners = _pml()[2]
    if miner is None:
        return -3.0, 3.0
    if not (type(miner) is miners.TripletMarginMiner and _is_plain(miner.distance, "CosineSimilarity")):
        return None
    mm = _number(miner.margin)
    if mm is None:
        return None
    kind = miner.type_of_triplets
    if kind == "easy":
        return mm, 3.0                   # u > mm
    if kind == "all":
        return -3.0, mm                  # u <= mm
    if kind == "hard":
        return -3.0, min(mm, 0.0)        # u <= mm and u <= 0
    if kind == "semihard":
        return 0.0, mm                   # 0 < u <= mm
    return None


def _plain_triplet_loss(loss):
    return _plain_loss(loss) and _avg_nonzero(loss.reducer) and not loss.swap and not loss.smooth_loss


def _triplet_all(loss, miner):
    if not _plain_triplet_loss(loss):
        return None
    interval = _triplet_interval(miner)
    if interval is None:
        return None
    params = _params("triplet_all", margin=_number(loss.margin), select_low=interval[0], select_high=interval[1],
                     pos_eps=-1.0)
    if params is None:
        return None

    def fused(step):
        # every (anchor, positive, negative) triplet the miner keeps (all without one), the
        # anchor's own slot never a positive (PML drops those triplets after mining); PML's
        # AvgNonZeroReducer: the mean over the triplets with a loss > 0
        rows, counts = step.run("triplet_all", params)
        return rows.sum() / active_triplets(counts).clamp_min(1).to(rows.dtype)

    return fused


def _generalized_lifted(loss, miner):
    if miner is not None or getattr(loss, "embedding_regularizer", None) is not None \
            or not (_is_plain(loss.distance, "LpDistance") and _reducer_is(loss.reducer, "MeanReducer")):
        return None
    params = _params("generalized_lifted", pos_margin=_number(loss.pos_margin),
                     neg_margin=_number(loss.neg_margin), pos_eps=-1.0)
    if params is None:
        return None

    def fused(step):
        # PML's rows: relu(LSE_P(d - pm) + LSE_N(nm - d)), an empty set's LSE 0; the mean over
        # every anchor (MeanReducer over PML's per-element losses)
        rows, _ = step.run("generalized_lifted", params)
        return step.few_pairs_zero(rows.mean())

    # d = sqrt(2 - 2S) holds for unit rows; a zero row (PML: distance 1 to every unit row) runs
    # PML's own loss for that step, as for the contrastive loss with LpDistance
    fused.needs_nonzero_rows = "anchors+memory"
    return fused


def _triplet(loss, miner):
    miners = _pml()[2]
    if not (_plain_triplet_loss(loss) and type(miner) is miners.BatchHardMiner):
        return None
    if not (_is_plain(miner.distance, "CosineSimilarity") and miner.pos_strategy == miner.HARD
            and miner.neg_strategy == miner.HARD and miner.allowed_pos_range is None
            and miner.allowed_neg_range is None):
        return None
    params = _params("triplet", margin=_number(loss.margin), pos_eps=-1.0)
    if params is None:
        return None

    def fused(step):
        # PML's hardest positive is the copy only for an anchor whose one positive it is; the
        # copy's triplet is then dropped, as the kernel (no positive) gives 0 for that anchor
        rows, _ = step.run("triplet", params)
        return _mean_nonzero(rows)

    # PML's argmin over the positives sees the anchor's copy, which the kernel never picks: they
    # differ where the copy ties the hardest other positive, i.e. for an anchor whose row has an
    # exact duplicate among its other positives, or a zero anchor (every S is 0). Such a step
    # runs PML's own loss.
    fused.needs_nonzero_rows = "anchors"
    fused.no_duplicate_copies = True
    return fused


def _margin(loss, miner):
    reducers = _pml()[3]
    r = loss.reducer
    if miner is not None or getattr(loss, "embedding_regularizer", None) is not None \
            or not _is_plain(loss.distance, "LpDistance") or loss.triplets_per_anchor != "all":
        return None
    if not (type(r) is reducers.MultipleReducers and set(r.reducers) == {"margin_loss", "beta_reg_loss"}
            and all(type(v) is reducers.DivisorReducer for v in r.reducers.values())):
        return None
    # one beta for every anchor (a per-class beta, num_classes, runs PML's own loss: its thresholds
    # would differ per anchor label); a learned beta is read at its current value
    beta = loss.beta
    if not (isinstance(beta, torch.Tensor) and beta.numel() == 1):
        return None
    nu = _number(loss.nu)
    params = _params("margin", margin=_number(loss.margin), beta=float(beta.detach()), pos_eps=-1.0)
    if params is None or nu is None:
        return None
    learn_beta = bool(loss.learn_beta)
    grad_beta = beta.requires_grad  # PML differentiates beta whenever it requires grad, learn_beta or not

    def fused(step):
        # every triplet of the anchor: the op's rows sum its triplets' losses and its counts are
        # the triplets with a non-zero positive / negative term, PML's DivisorReducer's divisor
        rows, counts = step.run("margin", params)
        divisor = active_triplets(counts, "margin").clamp_min(1).to(rows.dtype)
        out = rows.sum() / divisor
        if not (learn_beta or grad_beta) or not bool(step.any_triplet()):
            return out  # PML: no triplet, zero losses (beta gets no gradient, not even nu's)
        # PML differentiates beta: d out / d beta = (active negative terms - active positive
        # terms) / divisor; beta enters with that slope at its value; with learn_beta, PML adds
        # beta * nu
        b = beta.to(device=rows.device, dtype=rows.dtype).reshape(())
        slope = (counts[:, 1].sum() - counts[:, 0].sum()).to(rows.dtype) / divisor
        out = out + (b - b.detach()) * slope
        return out + b * nu if learn_beta else out

    # d = sqrt(2 - 2S) holds for unit rows; a zero row (PML: distance 1 to every unit row) runs
    # PML's own loss for that step
    fused.needs_nonzero_rows = "anchors+memory"
    return fused


# The largest kernel scale the NCA drop-in runs fused: the logits 2 scale S then span at most 80,
# so PML's fp32 softmax keeps every positive mass above 0 (exp(-80) / n is at least a subnormal);
# with a wider span it can round a row's mass to 0 and drop the row, which a log-sum-exp does not.
NCA_MAX_SCALE = 20.0


def _is_squared_l2(distance):
    distances = _pml()[0]
    return (type(distance) is distances.LpDistance and distance.normalize_embeddings is True and distance.p == 2
            and distance.power == 2)


def _nca(loss, miner):
    if miner is not None or getattr(loss, "embedding_regularizer", None) is not None \
            or not _reducer_is(loss.reducer, "MeanReducer"):
        return None
    softmax_scale = _number(loss.softmax_scale)
    if softmax_scale is None:
        return None
    # PML's logits: -softmax_scale d^2 = 2 softmax_scale S - 2 softmax_scale on unit rows
    # (LpDistance(power=2), its default), or softmax_scale S (CosineSimilarity): the kernel's
    # logits are 2 scale S, the constant cancels
    if _is_squared_l2(loss.distance):
        scale, needs_nonzero_rows = softmax_scale, "anchors+memory"  # d^2 = 2 - 2S holds for unit rows only
    elif _is_plain(loss.distance, "CosineSimilarity"):
        scale, needs_nonzero_rows = softmax_scale / 2, None
    else:
        return None
    params = _params("nca", scale=scale, pos_eps=-1.0)
    if params is None or scale > NCA_MAX_SCALE:
        return None

    def fused(step):
        # PML compares the anchors with the whole memory (query is not reference): the anchor's
        # own copy is in its softmax and among its positives, so no slot is excluded; every
        # anchor appears in as many pairs, so convert_to_weights gives each weight 1
        rows, counts = step.run("nca", params, subset=slice(None))
        if step.x.shape[0] <= 1:
            return rows.sum() * 0  # PML's NCALoss: zero losses for at most one anchor
        # MeanReducer over the anchors with a positive mass (the rest are dropped); 0 without
        # one (PML: NaN, see _nca_without_positives)
        return rows.sum() / (counts[:, 0] > 0).sum().clamp_min(1).to(rows.dtype)

    fused.needs_nonzero_rows = needs_nonzero_rows
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
    ("triplet_all: TripletMarginLoss(distance=CosineSimilarity()), no miner or TripletMarginMiner("
     "distance=CosineSimilarity()) of any type", "TripletMarginLoss", _triplet_all),
    ("circle: CircleLoss(), no miner", "CircleLoss", _circle),
    ("generalized_lifted: GeneralizedLiftedStructureLoss() (LpDistance()), no miner", "GeneralizedLiftedStructureLoss",
     _generalized_lifted),
    ("tuplet_margin: TupletMarginLoss(), no miner", "TupletMarginLoss", _tuplet_margin),
    ("margin: MarginLoss() (LpDistance, scalar beta, learned or not), no miner", "MarginLoss", _margin),
    ("nca: NCALoss() (LpDistance(power=2), PML's default) or NCALoss(distance=CosineSimilarity()), no miner",
     "NCALoss", _nca),
)


def fused_configurations():
    """The PML configurations that run on the fused kernels (default reducers, no embedding
    regularizer, CosineSimilarity() with its defaults (the contrastive loss: also
    LpDistance() with its defaults; the generalized lifted structure loss: LpDistance() only);
    any loss parameters the kernels accept)."""
    return [name for name, _, _ in _PLANS]


def plan(loss, miner=None):
    """(name, fused function) for a PML loss and miner as they are now, or (None, None):
    PML's own loss."""
    for name, cls, planner in _PLANS:
        if type(loss) is getattr(_pml()[1], cls):  # PML's class itself: a subclass may change its loss
            fn = planner(loss, miner)
            if fn is not None:
                return name, fn
    return None, None


# --------------------------------------------------------------------------- the module


def _not_unit(rows):
    """Rows that F.normalize does not make unit (bool (n,)): norm <= 1e-12 (its eps), or a
    norm that overflows the rows' dtype (finite entries whose squares do not fit: x / inf is a
    zero row). PML's distances then see a zero row, which the fused plans with
    `needs_nonzero_rows` leave to PML's own loss."""
    return (rows.float().norm(dim=1) <= 1e-12) | torch.isinf(rows.norm(dim=1))


def _check_indices_tuple(indices_tuple, n_anchors, n_ref, device):
    """PML's indices_tuple: (anchors, positives, negatives) or (anchors1, positives, anchors2,
    negatives), 1-D integer tensors; anchors index the batch, the others the memory's filled
    rows after this step's enqueue. Checked before anything changes."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError(f"indices_tuple: expected a tuple of 3 (triplets) or 4 (pairs) index tensors, got "
                         f"{type(indices_tuple).__name__} of length {len(indices_tuple) if hasattr(indices_tuple, '__len__') else '?'}")
    names = ("anchors", "positives", "negatives") if len(indices_tuple) == 3 else \
        ("anchors1", "positives", "anchors2", "negatives")
    for k, (what, t) in enumerate(zip(names, indices_tuple)):
        V.tensor(f"indices_tuple[{k}] ({what})", t, dim=1, integer=True, device=device)
    lengths = [t.shape[0] for t in indices_tuple]
    if len(indices_tuple) == 3 and len(set(lengths)) != 1:
        raise ValueError(f"indices_tuple: the three tensors of a triplet tuple need one length, got {lengths}")
    if len(indices_tuple) == 4 and (lengths[0] != lengths[1] or lengths[2] != lengths[3]):
        raise ValueError(f"indices_tuple: anchors1/positives and anchors2/negatives need equal lengths, got {lengths}")
    for k, (what, t) in enumerate(zip(names, indices_tuple)):
        bound = n_anchors if what.startswith("anchors") else n_ref
        if t.numel() and V.value_checks_on(t):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= bound:
                rows = "embeddings" if what.startswith("anchors") else "the memory's filled rows after the enqueue"
                raise ValueError(f"indices_tuple[{k}] ({what}): expected values in [0, {bound}) ({rows}), got values "
                                 f"in [{lo}, {hi}]")


class CrossBatchMemory(nn.Module):
    """PML's `CrossBatchMemory(loss, embedding_size, memory_size=1024, miner=None)` on
    xbm_kernels' memory and fused kernels.

    forward(embeddings, labels, indices_tuple=None, enqueue_mask=None) -> loss: enqueues the
    batch (or the rows where enqueue_mask is True, which are then not anchors), then returns
    the loss of the anchors against the memory, as PML 2.9 defines it. reset_queue() empties
    the memory. The loss and miner are read at every call. Extra keywords (ours):
    memory_dtype (the memory's dtype, kept under model.half()), backend ("auto" or an
    xbm_kernels backend for the fused kernels), gather_distributed (enqueue the all-gathered
    batch on every rank), check_finite (reject NaN/Inf rows before anything is written).
    `.fused` names the fused configuration the current settings run, or is None when PML's
    loss runs against the memory.
    """

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None, *, memory_dtype=torch.float32,
                 backend="auto", gather_distributed=False, check_finite=True):
        super().__init__()
        name = type(loss).__name__
        if name not in SUPPORTED_LOSSES:
            raise ValueError(f"loss: CrossBatchMemory not supported for {name}; supported: {list(SUPPORTED_LOSSES)}")
        _pml()
        self.loss, self.miner = loss, miner
        self.embedding_size = V.index("embedding_size", embedding_size, 1, V.MAX_ROWS)
        self.memory_size = V.index("memory_size", memory_size, 1, V.MAX_ROWS)
        self.backend, self.gather_distributed = backend, bool(gather_distributed)
        dtypes = V.FLOAT_DTYPES + (torch.float64,)
        if memory_dtype not in dtypes:
            raise TypeError(f"memory_dtype: expected one of {[str(d) for d in dtypes]}, got {memory_dtype}")
        # PML's rows, as given. Beside them, for the fused kernels: the rows normalised, which
        # rows are not unit after normalising (norm <= 1e-12) and a key of each row's bits (to
        # find exact duplicates); built at the first fused step, then kept in step with the
        # memory (its version counter); not part of the state dict.
        self.memory = _Memory(self.memory_size, self.embedding_size, dtype=memory_dtype, backend=backend,
                              check_finite=check_finite, _dtypes=dtypes)
        self._unit = None  # (unit rows, not-unit flags, row keys) or None
        self._unit_version = -1
        self._gathered_size = None  # the batch size last verified on every rank (gather_batch)

    @property
    def fused(self):
        """The fused configuration the loss and miner give as they are now, or None."""
        return plan(self.loss, self.miner)[0]

    def extra_repr(self):
        return (f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, fused={self.fused!r}, "
                f"filled={self.memory._num_filled}")

    def reset_queue(self):
        """Empties the memory (PML's name for it)."""
        self.memory.reset()

    def _gathered(self, x, y, mask):
        """The batch all-gathered in rank order with gather_distributed, this rank's offset and
        the guard of the batch sizes (gather_batch: read on the host only for a new size)."""
        if not (self.gather_distributed and dist.is_available() and dist.is_initialized()):
            return x, y, mask, 0, None
        out = gather_batch(x, y, mask, self._gathered_size if self.memory._deferred() else None)
        self._gathered_size = x.shape[0]
        return out

    @torch.no_grad()
    def _derived(self, rows):
        """(unit rows, not-unit flags, keys) of raw rows: normalised as PML's distances do, in
        the memory's dtype; a row of norm <= 1e-12 (F.normalize's eps) or whose norm overflows its
        dtype (F.normalize then gives a zero row) is not unit after it (_not_unit); the
        key is an exact integer function of the row's bits (equal rows, equal keys)."""
        unit = normalize_rows(rows).to(rows.dtype)  # as PML's distances normalise them
        tiny = _not_unit(rows)
        bits = rows.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[rows.element_size()]).long()
        coef = torch.arange(1, rows.shape[1] + 1, device=rows.device, dtype=torch.int64) * 2654435761 % (1 << 20)
        keys = ((bits & 0xFFFF) * coef).sum(1) + (((bits >> 16) & 0xFFFF) * (coef + 1)).sum(1) * 7 \
            + ((bits >> 32) * (coef + 3)).sum(1) * 13
        return unit, tiny, keys

    @torch.no_grad()
    def _unit_memory(self):
        """The derived rows of the memory's filled prefix, rebuilt whenever the memory changed
        other than through this module's own enqueue (memory.enqueue, load_state_dict, reset, an
        in-place edit of its rows), was cast or moved."""
        mem = self.memory.embeddings
        n = self.memory._num_filled  # as written this step (len() would wait for its deferred check)
        u = self._unit
        if u is None or self._unit_version != self._stamp() or u[0].dtype != mem.dtype \
                or u[0].device != mem.device or u[0].shape != mem.shape:
            unit = torch.zeros_like(mem)
            tiny = torch.zeros(mem.shape[0], dtype=torch.bool, device=mem.device)
            keys = torch.zeros(mem.shape[0], dtype=torch.int64, device=mem.device)
            unit[:n], tiny[:n], keys[:n] = self._derived(mem[:n])
            self._unit, self._unit_version = (unit, tiny, keys), self._stamp()
        return self._unit

    def _stamp(self):
        """What changes with the memory's rows: its own version (its operations), and its rows
        tensor's identity and autograd version counter (an in-place edit by anyone)."""
        mem = self.memory.embeddings
        return self.memory._version, mem.data_ptr(), mem._version

    @torch.no_grad()
    def _write(self, gx, gy, gmask, b, guard):
        """The enqueue, keeping the derived rows in step when they were."""
        u = self._unit
        in_step = u is not None and self._unit_version == self._stamp() \
            and u[0].dtype == self.memory.dtype and u[0].device == self.memory.embeddings.device
        slots = self.memory.write_checked(gx, gy, gmask, b, guard=guard)
        if in_step:
            if slots.numel():
                unit, tiny, keys = u
                unit[slots], tiny[slots], keys[slots] = self._derived(self.memory.embeddings[slots])
            self._unit_version = self._stamp()
        return slots

    def _has_duplicate_copies(self, keys, self_index, n):
        """Whether some anchor's copy has an exact duplicate with its label elsewhere in the
        memory (sorting the filled rows' (key, label) pairs: O(n log n))."""
        combined = keys[:n] * 1000003 + self.memory.labels[:n].long()
        sorted_keys, _ = combined.sort()
        return bool((_count_in(sorted_keys, combined[self_index]) > 1).any())

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        dev = self.memory.embeddings.device
        V.tensor("embeddings", embeddings, dim=2, floating=True, device=dev)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings: expected dim {self.embedding_size} (embedding_size), got "
                             f"{embeddings.shape[1]}")
        if not isinstance(labels, torch.Tensor):
            try:
                labels = torch.as_tensor(labels, device=embeddings.device)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"labels: expected a tensor or a sequence of integers, got {type(labels).__name__}") \
                    from None
        labels = V.tensor("labels", labels, dim=1, integer=True, device=embeddings.device)
        B = embeddings.shape[0]
        if labels.shape[0] != B:
            raise ValueError(f"labels: expected {B} labels (one per embedding), got {labels.shape[0]}")
        if enqueue_mask is not None:
            V.tensor("enqueue_mask", enqueue_mask, dim=1, dtypes=(torch.bool,), device=embeddings.device)
            if enqueue_mask.shape[0] != B:
                raise ValueError(f"enqueue_mask: expected {B} entries (one per embedding), got {enqueue_mask.shape[0]}")
        gx, gy, gmask, offset, guard = self._gathered(embeddings.detach(), labels, enqueue_mask)
        V.labels_fit_int32("labels", labels)
        b = self.memory.check_batch(gx, gy, gmask, checked=True)  # the tensors were checked above
        if indices_tuple is not None:
            n_after = min(self.memory.size, self.memory._num_filled + b)
            _check_indices_tuple(indices_tuple, B, n_after, embeddings.device)
        name, fused_fn = plan(self.loss, self.miner)  # the settings as they are at this call
        # everything is checked: the memory changes from here on
        slots = self._write(gx, gy, gmask, b, guard)
        if enqueue_mask is not None:
            anchors, anchor_labels, self_index = embeddings[~enqueue_mask], labels[~enqueue_mask], None
        else:
            anchors, anchor_labels, self_index = embeddings, labels, slots[offset:offset + B]
        n = self.memory._num_filled  # as written (len() would wait for this step's deferred check)
        if anchors.shape[0] == 0 or n == 0:
            # no anchor or no memory row: no pair, a loss of 0 (PML raises or returns NaN here)
            return embeddings.sum() * 0
        if fused_fn is not None and indices_tuple is None:
            unit, tiny, keys = self._unit_memory()
            # 16-bit anchors stay fp32 after normalising (the kernels take fp32 anchors against any
            # memory dtype): no second rounding of the anchors
            x = normalize_rows(anchors)
            rule = getattr(fused_fn, "needs_nonzero_rows", None)
            off_path = rule is not None and bool(_not_unit(anchors.detach()).any()
                                                 | (rule == "anchors+memory" and tiny[:n].any()))
            if not off_path and getattr(fused_fn, "no_duplicate_copies", False) and self_index is not None:
                off_path = self._has_duplicate_copies(keys, self_index, n)
            if not off_path:
                step = _Step(x, anchor_labels, unit, self.memory.labels, n, self_index, self.backend)
                loss = fused_fn(step)
                if loss is not None:  # None: the plan declined this step's rows (PML's loss runs)
                    return loss
        out = self._pml_loss(anchors, anchor_labels, self_index, n, indices_tuple)
        return self._nca_without_positives(out, anchor_labels, n)

    def _nca_without_positives(self, out, y, n):
        """PML's NCALoss drops the anchors without a same-label row in the memory (a positive
        mass of 0), and MeanReducer's mean of no anchor is NaN (only with an enqueue_mask,
        whose anchors have no copy): 0 instead, with zero gradients, as the fused path gives
        and as a step without pairs gives on every loss."""
        if not (type(self.loss) is _pml()[1].NCALoss and isinstance(self.loss.reducer, _pml()[3].MeanReducer)):
            return out
        none = (_same_label_counts(self.memory.labels, n, y) == 0).all()
        return torch.where(none, out.new_zeros(()), out)

    def _pml_loss(self, x, y, self_index, n, input_indices_tuple):
        """PML's own loss against this memory, as PML 2.9's wrapper runs it: its miner (or all
        pairs) over the memory with the batch's copies in it, then the (anchor, own slot)
        pairs dropped, the caller's indices_tuple appended. A miner whose distance is the
        loss's computes no matrix of its own (_SharedMatrix)."""
        _, _, _, _, c_f, lmu = _pml()
        mem = self.memory.embeddings[:n].to(x.dtype)
        mem_labels = self.memory.labels[:n].to(y.dtype)
        with _SharedMatrix(self.miner, self.loss, x, mem):
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
                input_indices_tuple = tuple(t.long() for t in input_indices_tuple)
                if len(input_indices_tuple) == 3 and len(indices) == 4:
                    input_indices_tuple = lmu.convert_to_pairs(input_indices_tuple, y)
                elif len(input_indices_tuple) == 4 and len(indices) == 3:
                    input_indices_tuple = lmu.convert_to_triplets(input_indices_tuple, y)
                indices = c_f.concatenate_indices_tuples(indices, input_indices_tuple)
            return self.loss(x, y, indices, mem, mem_labels)


class _SharedMatrix:
    """While a miner and then its loss run on (x, mem): where the miner only reads its matrix
    (READ_ONLY_MINERS) and both distances compute the same matrix (the same PML distance class,
    not a subclass, with the same settings, collecting no statistics), it is computed once, by
    the distance's own forward (bitwise what each would compute), under the caller's grad mode:
    the miner (which mines under no_grad) gets it detached, the loss (under grad) the matrix
    itself, once. PML computes it twice. A miner that writes into its matrix
    (MultiSimilarityMiner fills entries in place) would need a copy, which costs what the saved
    product does: it computes its own, as in PML. A call on any other tensors runs the distance
    as usual; outside the block the distances are untouched."""

    SETTINGS = ("normalize_embeddings", "p", "power", "is_inverted")
    READ_ONLY_MINERS = ("PairMarginMiner", "TripletMarginMiner")  # read the matrix by indexing only

    def __init__(self, miner, loss, x, mem):
        self.x, self.mem, self.grad, self.mat, self.given = x, mem, torch.is_grad_enabled(), None, False
        dm, dl = getattr(miner, "distance", None), getattr(loss, "distance", None)
        read_only = any(type(miner) is getattr(_pml()[2], n) for n in self.READ_ONLY_MINERS)
        self.distances = [d for d in {id(dm): dm, id(dl): dl}.values()] if read_only and self._same(dm, dl) else []

    @staticmethod
    def _same(a, b):
        classes = tuple(getattr(_pml()[0], n) for n in ("CosineSimilarity", "DotProductSimilarity", "LpDistance"))
        return (type(a) in classes and type(a) is type(b)
                and all(getattr(a, k) == getattr(b, k) for k in _SharedMatrix.SETTINGS)
                and not a.collect_stats and not b.collect_stats)

    def _forward(self, distance):
        own = type(distance).forward

        def forward(query_emb, ref_emb=None):
            if query_emb is not self.x or ref_emb is not self.mem or self.given:
                return own(distance, query_emb, ref_emb)
            if self.mat is None:
                with torch.set_grad_enabled(self.grad):
                    self.mat = own(distance, query_emb, ref_emb)
            if torch.is_grad_enabled():  # the loss: the matrix itself, once
                self.given = True
                return self.mat
            return self.mat.detach()  # the miner (no grad), which only reads it
        return forward

    def __enter__(self):
        for d in self.distances:
            d.forward = self._forward(d)  # an instance attribute: nn.Module calls it
        return self

    def __exit__(self, *exc):
        for d in self.distances:
            del d.forward
        return False
