"""xbm_kernels.pml.CrossBatchMemory against pytorch-metric-learning 2.9's own
CrossBatchMemory, run side by side on the same generated step sequences: every loss PML's
wrapper accepts, its miners, reducers, distances and regularizers, enqueue_mask,
indices_tuple, wrap-around, float16/bfloat16/float32/float64, settings changed between
steps, rows that are not unit-norm and zero rows. After every step the loss, the gradients
(of the embeddings and of the loss's own parameters) and the memory are compared.

Where PML 2.9 itself is wrong, the comparison is with PML with that bug fixed (`FixedPML`):
a one-row batch keeps its self-pair (its wrap-around test `e <= s` holds for one row), an
all-False enqueue_mask marks the memory full, an empty batch raises, NCALoss's mean over no
anchor is NaN. CONTRACT.md says so.

Tolerances (compare.py's meaning: the largest error over the largest expected entry):
float32 and float64 within 1e-5 of PML, or of PML in float64 within twice PML's own error;
16-bit within 2e-2 of PML run in float32 on the same rounded inputs (S in fp32, as the
contract computes it), or twice PML's own 16-bit error, whichever is larger."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances, losses, miners, reducers, regularizers  # noqa: E402
from pytorch_metric_learning.losses import cross_batch_memory as pml_cbm  # noqa: E402

from xbm_kernels import pml as xpml  # noqa: E402

COS, LP = distances.CosineSimilarity, distances.LpDistance


class FixedPML(pml_cbm.CrossBatchMemory):
    """PML 2.9's wrapper with its bugs fixed, nothing else changed: self-pairs are the pairs
    (a, curr_batch_idx[a]) for every batch size; an empty enqueue changes nothing; a step
    without anchors, or against an empty memory, has no pair and returns 0 (PML raises from
    inside its miner, or returns NaN through an embedding regularizer)."""

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        anchors = len(embeddings) if enqueue_mask is None else int((~enqueue_mask).sum())
        queued = len(embeddings) if enqueue_mask is None else int(enqueue_mask.sum())
        empty = not self.has_been_filled and self.queue_idx == 0 and queued == 0
        if anchors and not empty:
            out = super().forward(embeddings, labels, indices_tuple, enqueue_mask)
            anchor_labels = labels if enqueue_mask is None else labels[~enqueue_mask]
            return self._nca_without_positives(out, embeddings, anchor_labels)
        self.embedding_memory = self.embedding_memory.to(embeddings.device, embeddings.dtype)
        self.label_memory = self.label_memory.to(labels.device, labels.dtype)
        keep = slice(None) if enqueue_mask is None else enqueue_mask
        self.add_to_memory(embeddings[keep], labels[keep], queued)
        return embeddings.sum() * 0

    def _nca_without_positives(self, out, embeddings, anchor_labels):
        """PML's NCALoss under a MeanReducer when no anchor has a same-label row in the memory
        (an enqueue_mask step): NaN (the mean of no element) in PML, 0 here."""
        n = self.memory_size if self.has_been_filled else self.queue_idx
        if isinstance(self.loss, losses.NCALoss) and isinstance(self.loss.reducer, reducers.MeanReducer) \
                and not (anchor_labels[:, None] == self.label_memory[:n][None, :]).any():
            return embeddings.sum() * 0
        return out

    def add_to_memory(self, embeddings, labels, batch_size):
        if batch_size == 0:
            self.curr_batch_idx = torch.zeros(0, dtype=torch.long, device=labels.device)
            return
        super().add_to_memory(embeddings, labels, batch_size)

    def create_indices_tuple(self, embeddings, labels, E_mem, L_mem, input_indices_tuple, do_remove_self_comparisons):
        orig = pml_cbm.lmu.remove_self_comparisons

        def remove(indices_tuple, curr_batch_idx, ref_size):
            keep = indices_tuple[1] != curr_batch_idx[indices_tuple[0]]
            if len(indices_tuple) == 3:
                return tuple(t[keep] for t in indices_tuple)
            return indices_tuple[0][keep], indices_tuple[1][keep], indices_tuple[2], indices_tuple[3]

        pml_cbm.lmu.remove_self_comparisons = remove
        try:
            return super().create_indices_tuple(embeddings, labels, E_mem, L_mem, input_indices_tuple,
                                                do_remove_self_comparisons)
        finally:
            pml_cbm.lmu.remove_self_comparisons = orig


class SameAsMean(reducers.MeanReducer):
    """PML's MeanReducer under another type: never fused, so the fallback path runs."""


# name: (factory of (loss, miner), the fused plan, [settings changes between steps])
def _set(obj_attr, value):
    def change(loss, miner, module):
        target = {"loss": loss, "miner": miner}[obj_attr[0]] if obj_attr[0] != "module" else module
        setattr(target, obj_attr[1], value() if callable(value) else value)
    return change


def _circle_margin(m):
    """CircleLoss derives op, on, delta_p and delta_n from m in its constructor and reads only
    those: a change of m alone changes nothing in PML; this changes all five."""
    def change(loss, miner, module):
        loss.m, loss.op, loss.on, loss.delta_p, loss.delta_n = m, 1 + m, -m, 1 - m, m
    return change


def _margin_beta(beta):
    """MarginLoss's beta (a Parameter with learn_beta) set in place, as an optimizer step would."""
    def change(loss, miner, module):
        with torch.no_grad():
            loss.beta.fill_(beta)
    return change


def _beta_parameter(loss):
    """A MarginLoss whose beta a user made a Parameter without learn_beta: PML differentiates it
    through the margin terms (no nu term)."""
    loss.beta = torch.nn.Parameter(loss.beta.clone())
    return loss


CONFIGS = {
    "contrastive-lp": (lambda: (losses.ContrastiveLoss(), None), "contrastive",
                       [_set(("loss", "pos_margin"), 0.3), _set(("loss", "neg_margin"), 1.3)]),
    "contrastive-cos": (lambda: (losses.ContrastiveLoss(pos_margin=0.9, neg_margin=0.3, distance=COS()), None),
                        "contrastive", [_set(("loss", "neg_margin"), 0.1)]),
    "contrastive-lp-squared": (lambda: (losses.ContrastiveLoss(distance=LP(power=2)), None), None, []),
    "multi_similarity": (lambda: (losses.MultiSimilarityLoss(), None), "multi_similarity",
                         [_set(("loss", "base"), 0.3), _set(("loss", "alpha"), 3.0)]),
    "multi_similarity+miner": (lambda: (losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner(0.1)),
                               "multi_similarity", [_set(("miner", "epsilon"), 0.3)]),
    "multi_similarity+miner-mean-subclass": (
        lambda: (losses.MultiSimilarityLoss(reducer=SameAsMean()), miners.MultiSimilarityMiner(0.1)), None, []),
    "supcon": (lambda: (losses.SupConLoss(temperature=0.1), None), "supcon",
               [_set(("loss", "temperature"), 0.5), _set(("loss", "reducer"), reducers.SumReducer)]),
    "supcon-cold": (lambda: (losses.SupConLoss(temperature=0.03), None), "supcon", []),
    "ntxent": (lambda: (losses.NTXentLoss(temperature=0.07), None), "ntxent",
               [_set(("loss", "temperature"), 0.2)]),
    "triplet+batchhard": (lambda: (losses.TripletMarginLoss(margin=0.1, distance=COS()),
                                   miners.BatchHardMiner(distance=COS())), "triplet",
                          [_set(("loss", "margin"), 0.4)]),
    "triplet-all-lp": (lambda: (losses.TripletMarginLoss(), None), None,
                       [_set(("module", "miner"), lambda: miners.TripletMarginMiner(0.2, type_of_triplets="semihard"))]),
    "triplet-all": (lambda: (losses.TripletMarginLoss(margin=0.1, distance=COS()), None), "triplet_all",
                    [_set(("loss", "margin"), 0.3),
                     _set(("module", "miner"), lambda: miners.TripletMarginMiner(0.2, distance=COS()))]),
    "triplet+semihard": (lambda: (losses.TripletMarginLoss(margin=0.2, distance=COS()),
                                  miners.TripletMarginMiner(0.2, distance=COS(), type_of_triplets="semihard")),
                         "triplet_all", [_set(("miner", "margin"), 0.4), _set(("miner", "type_of_triplets"), "hard")]),
    "triplet+easy": (lambda: (losses.TripletMarginLoss(margin=0.3, distance=COS()),
                              miners.TripletMarginMiner(0.05, distance=COS(), type_of_triplets="easy")),
                     "triplet_all", [_set(("miner", "type_of_triplets"), "all")]),
    "circle": (lambda: (losses.CircleLoss(), None), "circle",
               [_set(("loss", "m"), 0.25), _circle_margin(0.3), _set(("loss", "gamma"), 256.0),
                _set(("loss", "delta_n"), 0.2)]),
    "circle+miner": (lambda: (losses.CircleLoss(), miners.MultiSimilarityMiner(0.1)), None, []),
    "lifted": (lambda: (losses.LiftedStructureLoss(), None), None, []),
    "generalized-lifted": (lambda: (losses.GeneralizedLiftedStructureLoss(), None), "generalized_lifted",
                           [_set(("loss", "pos_margin"), 0.3), _set(("loss", "neg_margin"), 1.4),
                            _set(("loss", "neg_margin"), -0.5)]),
    "generalized-lifted-cos": (lambda: (losses.GeneralizedLiftedStructureLoss(distance=COS()), None), None, []),
    "generalized-lifted-wide-margin": (lambda: (losses.GeneralizedLiftedStructureLoss(neg_margin=40.0), None), None,
                                       []),
    "generalized-lifted+miner": (lambda: (losses.GeneralizedLiftedStructureLoss(),
                                          miners.MultiSimilarityMiner(0.1)), None, []),
    "margin": (lambda: (losses.MarginLoss(learn_beta=True, num_classes=None), None), "margin",
               [_margin_beta(0.9), _set(("loss", "nu"), 0.1), _set(("loss", "margin"), 0.35), _margin_beta(1.35)]),
    "margin-fixed-beta": (lambda: (losses.MarginLoss(margin=0.1, beta=1.0), None), "margin",
                          [_set(("loss", "margin"), 0.25)]),
    "margin-beta-parameter-not-learned": (lambda: (_beta_parameter(losses.MarginLoss()), None), "margin",
                                          [_margin_beta(0.9)]),
    "margin-per-class-beta": (lambda: (losses.MarginLoss(learn_beta=True, num_classes=CLASSES), None), None, []),
    "margin+miner": (lambda: (losses.MarginLoss(), miners.TripletMarginMiner(0.2)), None, []),
    "nca": (lambda: (losses.NCALoss(), None), "nca",
            [_set(("loss", "softmax_scale"), 4.0), _set(("loss", "softmax_scale"), 0.5),
             _set(("loss", "softmax_scale"), 20.0)]),
    "nca-cos": (lambda: (losses.NCALoss(softmax_scale=8, distance=COS()), None), "nca",
                [_set(("loss", "softmax_scale"), 30.0), _set(("loss", "softmax_scale"), 40.0)]),
    "nca-hot": (lambda: (losses.NCALoss(softmax_scale=25), None), None, []),
    "nca+miner": (lambda: (losses.NCALoss(), miners.MultiSimilarityMiner(0.1)), None, []),
    "angular": (lambda: (losses.AngularLoss(), None), None, []),
    "angular+miner": (lambda: (losses.AngularLoss(), miners.AngularMiner()), None, []),
    "intra-pair-variance": (lambda: (losses.IntraPairVarianceLoss(), None), None, []),
    "snr": (lambda: (losses.SignalToNoiseRatioContrastiveLoss(), None), None, []),
    "tuplet-margin": (lambda: (losses.TupletMarginLoss(), None), "tuplet_margin",
                      [_set(("loss", "scale"), 32.0), _set(("loss", "margin"), math.radians(20.0)),
                       _set(("loss", "margin"), -0.3)]),  # PML reads the margin in radians after construction
    "tuplet-margin-nonzero": (lambda: (losses.TupletMarginLoss(margin=2.0, scale=16,
                                                               reducer=reducers.AvgNonZeroReducer()), None), None, []),
    "tuplet-margin-stats": (lambda: (losses.TupletMarginLoss(collect_stats=True), None), None, []),
    "ntxent+regularizer": (lambda: (losses.NTXentLoss(embedding_regularizer=regularizers.LpRegularizer()), None),
                           None, []),
    "multi_similarity-dot": (lambda: (losses.MultiSimilarityLoss(distance=distances.DotProductSimilarity()), None),
                             None, []),
    "contrastive+pair-margin-miner": (lambda: (losses.ContrastiveLoss(), miners.PairMarginMiner(0.2, 0.8)), None,
                                      []),
}

MEMORY, D, CLASSES = 24, 8, 4


def _tol(dtype):
    return {torch.float32: 1e-5, torch.float64: 1e-5}.get(dtype)


def _err(actual, expected, floor=1e-3):
    expected = torch.as_tensor(expected).detach().double()
    actual = torch.as_tensor(actual).detach().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not expected.numel():
        return 0.0
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(floor))


@st.composite
def step_sequences(draw, with_indices=True):
    """Steps of (seed, batch size, kind, change): kind is 'plain', 'mask' (enqueue_mask),
    'indices' (a caller indices_tuple); change applies the config's next settings change."""
    n = draw(st.integers(3, 6))
    steps = []
    for k in range(n):
        kinds = ["plain", "plain", "mask"] + (["indices"] if with_indices else [])
        steps.append((draw(st.integers(0, 2 ** 31 - 1)), draw(st.integers(1, 10)), draw(st.sampled_from(kinds)),
                      draw(st.booleans()) and k > 0))
    return steps


def _batch(seed, B, dtype, zero_rows=True):
    """Rows around CLASSES centres (same-class cosine ~0.6-0.95), norms in [0.3, 3], now and
    then a zero row or an exact copy of another row of the batch."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(CLASSES, D, generator=gen, dtype=torch.float64), dim=1)
    y = torch.randint(0, CLASSES, (B,), generator=gen)
    x = F.normalize(centres[y] + 0.5 * torch.randn(B, D, generator=gen, dtype=torch.float64), dim=1)
    x = x * (0.3 + 2.7 * torch.rand(B, 1, generator=gen, dtype=torch.float64))
    if zero_rows and B > 2 and torch.rand((), generator=gen) < 0.2:
        x[int(torch.randint(0, B, (), generator=gen))] = 0
    if B > 3 and torch.rand((), generator=gen) < 0.2:
        i, j = torch.randperm(B, generator=gen)[:2].tolist()
        x[i], y[i] = x[j], y[j]
    mask = torch.rand(B, generator=gen) < 0.5
    return x.to(dtype), y, mask


def _indices(seed, y, mem_labels, self_slot):
    """A caller's indices_tuple that PML accepts: pairs (or triplets) whose positives share
    the anchor's label and whose negatives do not, the first positive pair being anchor 0
    with its own slot."""
    gen = torch.Generator().manual_seed(seed + 1)
    B, n = y.shape[0], mem_labels.shape[0]
    a = torch.randint(0, B, (40,), generator=gen)
    r = torch.randint(0, n, (40,), generator=gen)
    same = y[a] == mem_labels[r]
    ap, p = torch.cat([torch.tensor([0]), a[same][:4]]), torch.cat([torch.tensor([self_slot]), r[same][:4]])
    an, neg = a[~same][:4], r[~same][:4]
    if seed % 2 == 0:
        return ap, p, an, neg
    trip = [(int(i), int(j), int(c)) for i, j in zip(ap, p)
            for c in (mem_labels != y[i]).nonzero()[:1, 0]]  # each positive pair with a negative of its anchor
    return tuple(torch.tensor([t[k] for t in trip], dtype=torch.long) for k in range(3))


def _run_step(module, x0, y, mask, indices, params):
    x = x0.clone().requires_grad_()
    for p in params:
        p.grad = None
    loss = module(x, y, indices_tuple=indices, enqueue_mask=mask)
    if loss.requires_grad:
        loss.backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x)]
    grads += [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return loss.detach(), grads


def _memory_of(module):
    if isinstance(module, xpml.CrossBatchMemory):
        e, l = module.memory.get()
        return e, l.long()
    n = module.memory_size if module.has_been_filled else module.queue_idx
    return module.embedding_memory[:n], module.label_memory[:n].long()


def _side_by_side(name, steps, dtype, backend, pml_raises_ok=False, zero_rows=True):
    """Runs the steps through ours, FixedPML in the same dtype and FixedPML in float64 (float32
    for 16-bit inputs) on the same rounded inputs; returns per step (kind, ours, theirs,
    exact), each (loss, grads),
    and checks after each step that our memory holds PML's rows and labels."""
    make, _, changes = CONFIGS[name]
    loss, miner = make()
    memory_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # PML keeps float64 rows
    ours = xpml.CrossBatchMemory(copy.deepcopy(loss), D, MEMORY, copy.deepcopy(miner), backend=backend,
                                 memory_dtype=memory_dtype)
    theirs = FixedPML(copy.deepcopy(loss), D, MEMORY, copy.deepcopy(miner))
    # the "exact" run: float64, or for 16-bit inputs float32 on the rounded values (the
    # contract's precision: S accumulated in fp32; in float64 an anchor's 1e-9 loss counts as
    # non-zero for PML's AvgNonZero, in fp32 it is 0 for PML and the kernels alike)
    exact_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64
    exact = FixedPML(copy.deepcopy(loss).to(exact_dtype), D, MEMORY, copy.deepcopy(miner))
    modules = (ours, theirs, exact)
    change_at = 0
    out = []
    for seed, B, kind, change in steps:
        if change and change_at < len(changes):
            for m in modules:
                changes[change_at](m.loss, m.miner, m)
            change_at += 1
        x, y, mask = _batch(seed, B, dtype, zero_rows=zero_rows)
        mask = mask if kind == "mask" else None
        indices = None
        if kind == "indices":
            n_after = min(MEMORY, len(ours.memory) + B)
            labels_after = torch.cat([ours.memory.labels[:len(ours.memory)].long(), y])  # before any wrap
            mem_labels = ours.memory.labels.long().clone()
            slots = (ours.memory._ptr + torch.arange(B)) % MEMORY
            mem_labels[slots] = y
            indices = _indices(seed, y, mem_labels[:n_after] if n_after else labels_after[:0], int(slots[0]))
        results = []
        for m, xin in ((ours, x), (theirs, x), (exact, x.to(exact_dtype))):
            try:
                results.append(_run_step(m, xin, y, mask, indices, list(m.loss.parameters())))
            except NotImplementedError:  # PML's LpDistance in bf16: torch.cdist has no bf16 kernel
                if not (pml_raises_ok and m is theirs):
                    raise
                results.append(None)
        mo, lo = _memory_of(ours)
        mt, lt = _memory_of(theirs if results[1] is not None else exact)
        assert torch.equal(lo, lt), "memory labels differ"
        lower = mo.dtype if mo.element_size() <= mt.element_size() else mt.dtype
        assert torch.equal(mo.to(lower), mt.to(lower)), "memory rows differ"
        out.append((kind, *results))
    return out


def _close(actual, theirs, exact, tol, floor):
    """Ours within tol of PML in the same dtype, or within max(tol, twice PML's own error)
    of PML in float64; non-finite entries (PML's own NaN/inf) must be the same as PML's."""
    actual, theirs, exact = (torch.as_tensor(t).detach().double() for t in (actual, theirs, exact))
    bad = ~torch.isfinite(theirs)
    if bad.any():
        if not torch.equal(torch.isnan(actual), torch.isnan(theirs)) or \
                not torch.equal(actual[torch.isinf(theirs)], theirs[torch.isinf(theirs)]):
            return False
        actual, theirs, exact = actual[~bad], theirs[~bad], exact[~bad]
        exact = torch.where(torch.isfinite(exact), exact, theirs)
    if _err(actual, theirs, floor) <= tol:
        return True
    return _err(actual, exact, floor) <= max(tol, 2 * _err(theirs, exact, floor))


def _check(out, tol, what=""):
    for k, (kind, (lo, go), (lt, gt), (le, ge)) in enumerate(out):
        assert _close(lo, lt, le, tol, 1.0), \
            f"{what}step {k} ({kind}): loss {float(lo)}, PML {float(lt)}, PML in float64 {float(le)}"
        for j, (a, b, e) in enumerate(zip(go, gt, ge)):
            finite = e[torch.isfinite(e)]
            floor = 1e-3 * max(float(finite.abs().max()), 1e-3) if j == 0 and finite.numel() else 1e-3
            assert _close(a, b, e, tol, floor), f"{what}step {k} ({kind}): gradient {j} off by {_err(a, b, floor):.3g}"


def _runs(precisions):
    """(name, precision, kernel backend): the fused configurations on both CPU backends in
    fp32; float64 (the reference backend, whatever is asked) and the configurations that run
    PML's own loss (no kernel) once."""
    out = []
    for name, (_, fused, _) in CONFIGS.items():
        for p in precisions:
            for b in (("reference", "cpu") if fused and p == torch.float32 else ("cpu",)):
                out.append(pytest.param(name, p, b, id=f"{name}-{str(p)[6:]}-{b}"))
    return out


@pytest.mark.parametrize("name, precision, kernel_backend", _runs([torch.float32, torch.float64]))
@settings(max_examples=5)
@given(steps=step_sequences())
def test_same_steps_as_pml(name, precision, kernel_backend, steps):
    """Loss, gradients and memory as PML's after every step, with the settings changed
    between steps as the config lists: within 1e-5 of PML, or of PML in float64 within twice
    PML's own error in that dtype where that is larger (beta = 40 makes fp32 weights noisy)."""
    _check(_side_by_side(name, steps, precision, kernel_backend), 1e-5)


def _is_pmls_own(actual, theirs):
    """Whether `actual` is PML's own result `theirs` bit for bit, NaN and inf included: a step
    the drop-in hands to PML's loss (TupletMarginLoss with a same-label pair at S ~ 1, where
    PML's acos is NaN or has an infinite slope in any precision)."""
    return theirs is not None and actual.shape == theirs.shape and actual.dtype == theirs.dtype \
        and torch.equal(actual.isnan(), theirs.isnan()) and torch.equal(actual.nan_to_num(), theirs.nan_to_num())


@pytest.mark.parametrize("name", [n for n, (_, fused, _) in CONFIGS.items() if fused])
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@settings(max_examples=4)
@given(steps=step_sequences(with_indices=False))
def test_16bit_steps_as_accurate_as_pml(name, half, steps):
    """16-bit embeddings on the fused configurations: finite, and within 2e-2 of PML run in
    float32 on the same rounded inputs, or twice PML's own 16-bit error where that is larger
    and finite (PML's fp16 overflows to NaN where the fused kernels, accumulating in fp32, do
    not; PML's LpDistance has no bf16 cdist). No zero rows here: normalising one has a
    gradient of 1/eps = 1e12, inf in 16 bits in any implementation. Where PML itself is not
    finite (TupletMarginLoss at an exact duplicate), ours must be PML's own result bit for bit."""
    for k, (kind, (lo, go), theirs, (le, ge)) in enumerate(_side_by_side(name, steps, half, "cpu",
                                                                          pml_raises_ok=True, zero_rows=False)):
        pairs = [(lo, theirs and theirs[0], le, 1.0), (go[0], theirs and theirs[1][0], ge[0], 1e-2)]
        for what, (a, t, e, floor) in zip(("loss", "gradient"), pairs):
            if not (torch.isfinite(e).all() and (t is None or torch.isfinite(t).all())) and _is_pmls_own(a, t):
                continue  # PML itself is not finite here, and the step ran PML's own loss (CONTRACT.md)
            assert torch.isfinite(a).all(), f"{half}: step {k}: {what} not finite"
            pml_err = _err(t, e, floor) if t is not None and torch.isfinite(t).all() else 0.0
            assert _err(a, e, floor) <= max(2e-2, 2 * pml_err), \
                f"{half}: step {k} ({kind}): {what} off by {_err(a, e, floor):.3g} (PML's own: {pml_err:.3g})"


def test_plans_follow_the_settings_at_each_call():
    for name, (make, expected, _) in CONFIGS.items():
        loss, miner = make()
        assert (xpml.plan(loss, miner)[0] or "").split(":")[0] == (expected or ""), name
    loss = losses.SupConLoss()
    m = xpml.CrossBatchMemory(loss, D, MEMORY)
    assert m.fused.startswith("supcon")
    loss.reducer = reducers.SumReducer()
    assert m.fused is None
    loss.reducer = reducers.AvgNonZeroReducer()
    loss.temperature = -1.0  # outside what the kernel takes: PML's own loss runs
    assert m.fused is None


def test_sum_reducer_swapped_in_mid_run_is_used():
    """The issue's example: a SumReducer swapped in after construction is used at once."""
    ours, theirs, unswapped = (make(losses.SupConLoss(), D, MEMORY) for make in
                               (xpml.CrossBatchMemory, FixedPML, xpml.CrossBatchMemory))
    for seed in range(3):
        x, y, _ = _batch(seed, 8, torch.float32)
        if seed == 2:
            ours.loss.reducer = reducers.SumReducer()
            theirs.loss.reducer = reducers.SumReducer()
        lo, lt, lu = (float(m(x, y)) for m in (ours, theirs, unswapped))
        assert abs(lo - lt) <= 1e-5 * abs(lt)
    assert lo > 2 * lu  # the sum over anchors, not the mean


def test_low_temperature_supcon_counts_the_same_anchors():
    """At temperature 0.03 many anchors' losses are ~1e-8: the fused value must be >= 0 and
    zero where PML's row-max-shifted fp32 form is zero, over many steps."""
    out = _side_by_side("supcon-cold", [(s, 10, "plain", False) for s in range(40)], torch.float32, "cpu")
    for k, (_, (lo, _), (lt, _), _) in enumerate(out):
        assert _err(lo, lt, floor=1.0) <= 1e-5, f"step {k}: {float(lo)} vs PML {float(lt)}"
    _check(out, 1e-5)


def test_mining_order_is_one_on_both_paths():
    """MultiSimilarityLoss + MultiSimilarityMiner: the fused path (default reducer) and the
    fallback (a MeanReducer subclass) give the same numbers, PML 2.9's, also for an anchor
    whose only same-label row in the memory is its own copy, with a negative near it."""
    gen = torch.Generator().manual_seed(0)
    mem_x = F.normalize(torch.randn(30, D, generator=gen), dim=1)
    mem_y = torch.arange(30) % 3
    x = F.normalize(torch.randn(6, D, generator=gen), dim=1)
    y = torch.arange(6) % 3
    y[0] = 99  # no other row has label 99
    mem_x[3] = F.normalize(x[0] + 0.05 * mem_x[3], dim=0)  # a negative of anchor 0 at S ~ 0.999
    results = []
    for reducer in (None, SameAsMean()):
        kw = {} if reducer is None else {"reducer": reducer}
        for make in (xpml.CrossBatchMemory, FixedPML):
            m = make(losses.MultiSimilarityLoss(**kw), D, 64, miners.MultiSimilarityMiner(0.1))
            with torch.no_grad():
                m(mem_x, mem_y)
            xx = x.clone().requires_grad_()
            loss = m(xx, y)
            loss.backward()
            results.append((float(loss), xx.grad))
    fused, fused_pml, fallback, fallback_pml = results
    assert abs(fused[0] - fused_pml[0]) <= 1e-5 * abs(fused_pml[0])
    assert abs(fallback[0] - fused[0]) <= 1e-5 * abs(fused[0])
    assert _err(fused[1], fused_pml[1]) <= 1e-5 and _err(fallback[1], fused[1]) <= 1e-5
    assert fused[1][0].abs().sum() > 0  # anchor 0's mined negative contributes, as in PML 2.9


def test_zero_row_under_lp_distance():
    """ContrastiveLoss() (L2): PML's distance of a zero row to every unit row is 1."""
    x, y, _ = _batch(5, 8, torch.float32, zero_rows=False)
    x[2] = 0
    for rows in ([x, x[:4]], [x[:4], x]):  # a zero anchor; then a zero row in the memory
        ours = xpml.CrossBatchMemory(losses.ContrastiveLoss(), D, MEMORY)
        theirs = FixedPML(losses.ContrastiveLoss(), D, MEMORY)
        for r in rows:
            lo, go = _run_step(ours, r, y[:r.shape[0]], None, None, [])
            lt, gt = _run_step(theirs, r, y[:r.shape[0]], None, None, [])
            assert _err(lo, lt) <= 1e-5 and _err(go[0], gt[0]) <= 1e-5


@pytest.mark.parametrize("kernel_backend", ["reference", "cpu"])
def test_margin_beta_without_triplets_or_active_terms(kernel_backend):
    """MarginLoss(learn_beta=True, nu=0.1): a step without any triplet (every anchor's one
    same-label row is its copy) is PML's zero losses, beta gets no gradient at all (not nu); a
    step with triplets but no active term (positives near, negatives opposite) is beta * nu, and
    beta's gradient nu; then a step with active terms. Loss, embedding and beta gradients as PML's."""
    e = torch.zeros(D, dtype=torch.float64)
    e[0] = 1.0
    gen = torch.Generator().manual_seed(4)
    near = lambda sign, k: F.normalize(sign * e + 0.01 * torch.randn(k, D, generator=gen, dtype=torch.float64),
                                       dim=1).float()  # noqa: E731
    steps = [(torch.cat([near(1, 3), near(-1, 3)]), torch.tensor([0, 0, 0, 1, 1, 1])),  # none active
             (torch.randn(4, D, generator=gen), torch.arange(7, 11)),                  # no triplet
             (torch.randn(6, D, generator=gen), torch.tensor([0, 1, 0, 1, 2, 2]))]
    make = lambda: losses.MarginLoss(learn_beta=True, nu=0.1)  # noqa: E731
    ours = xpml.CrossBatchMemory(make(), D, MEMORY, backend=kernel_backend)
    theirs = FixedPML(make(), D, MEMORY)
    assert ours.fused.startswith("margin")
    for k, (x, y) in enumerate(steps):
        for m in (ours, theirs):
            m.loss.beta.grad = None
        lo, go = _run_step(ours, x, y, None, None, [])
        lt, gt = _run_step(theirs, x, y, None, None, [])
        bo, bt = ours.loss.beta.grad, theirs.loss.beta.grad
        assert (bo is None) == (bt is None) == (k == 1), (k, bo, bt)
        assert _err(lo, lt) <= 1e-5 and _err(go[0], gt[0]) <= 1e-5, k
        if k != 1:
            assert abs(float(bo) - float(bt)) <= 1e-5 * max(1.0, abs(float(bt))), (k, bo, bt)
    assert abs(float(bt) - 0.1) > 1e-3  # the last step's gradient is not nu alone


def test_float64_embeddings_on_a_fused_configuration():
    ours = xpml.CrossBatchMemory(losses.SupConLoss(), D, MEMORY)
    theirs = FixedPML(losses.SupConLoss(), D, MEMORY)
    for seed in range(3):
        x, y, _ = _batch(seed, 8, torch.float64)
        lo, go = _run_step(ours, x, y, None, None, [])
        lt, gt = _run_step(theirs, x, y, None, None, [])
        assert lo.dtype == torch.float64 or lo.dtype == torch.float32
        assert _err(lo, lt) <= 1e-6 and _err(go[0], gt[0]) <= 1e-6 and go[0].dtype == torch.float64


def test_tuplet_margin_duplicate_positive_runs_pmls_loss(monkeypatch):
    """TupletMarginLoss: a step where a same-label pair sits at S = 1 (an exact duplicate of an
    earlier row; PML's acos is NaN beyond 1 and its slope infinite at 1) runs PML's own loss,
    giving PML's numbers bit for bit, non-finite ones included; a step without such a pair runs
    fused, within 1e-5 of PML."""
    gen = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(6, D, generator=gen), dim=1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    fused_runs = []
    run = xpml._Step.run
    monkeypatch.setattr(xpml._Step, "run", lambda self, *a, **k: fused_runs.append(a[0]) or run(self, *a, **k))
    ours = xpml.CrossBatchMemory(losses.TupletMarginLoss(), D, MEMORY)
    theirs = FixedPML(losses.TupletMarginLoss(), D, MEMORY)
    lo, go = _run_step(ours, x, y, None, None, [])
    lt, gt = _run_step(theirs, x, y, None, None, [])
    assert fused_runs == ["tuplet_margin"] and _err(lo, lt, 1.0) <= 1e-5 and _err(go[0], gt[0]) <= 1e-5
    lo, go = _run_step(ours, x[:4], y[:4], None, None, [])  # rows 0-3 again: each meets its earlier copy
    lt, gt = _run_step(theirs, x[:4], y[:4], None, None, [])
    assert len(fused_runs) == 2  # the kernel ran, found the pairs at S ~ 1 and declined the step
    torch.testing.assert_close(lo, lt, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(go[0], gt[0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad, match", [
    ((torch.tensor([0, 9]), torch.tensor([0, 1]), torch.tensor([1, 2])), r"indices_tuple\[0\] \(anchors\)"),
    ((torch.tensor([0]), torch.tensor([40]), torch.tensor([1])), r"indices_tuple\[1\] \(positives\)"),
    ((torch.tensor([0]), torch.tensor([1]), torch.tensor([-1])), r"indices_tuple\[2\] \(negatives\)"),
    ((torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([1, 2])), "one length"),
    ((torch.tensor([0]), torch.tensor([1])), "tuple of 3"),
    ((torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2])), "integer"),
])
def test_bad_indices_tuple_names_it_and_changes_nothing(bad, match):
    ours = xpml.CrossBatchMemory(losses.SupConLoss(), D, MEMORY)
    x, y, _ = _batch(1, 6, torch.float32)
    ours(x, y)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match):
        ours(x, y, indices_tuple=bad)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_call_leaves_memory_unchanged():
    ours = xpml.CrossBatchMemory(losses.SupConLoss(), 8, memory_size=10)
    x, y = torch.randn(6, 8), torch.arange(6) % 3
    ours(x, y)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    bad = x.clone()
    bad[2, 1] = float("nan")
    for args, err in [((bad, y), ValueError), ((torch.randn(11, 8), torch.arange(11)), ValueError),
                      ((x, y[:5]), ValueError), ((torch.randn(6, 7), y), ValueError),
                      ((x.int(), y), TypeError)]:
        with pytest.raises(err):
            ours(*args)
    with pytest.raises(ValueError, match="mutually exclusive"):
        ours(x, y, indices_tuple=(y, y, y), enqueue_mask=torch.ones(6, dtype=torch.bool))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_memory_holds_the_rows_pml_holds():
    """Raw rows (not normalised), so PML code that reads rows sees PML's data."""
    ours = xpml.CrossBatchMemory(losses.SupConLoss(), D, MEMORY)
    x, y, _ = _batch(2, 8, torch.float32)
    ours(x, y)
    assert torch.equal(ours.memory.get()[0], x)


def test_unsupported_loss_is_refused_by_name():
    with pytest.raises(ValueError, match="ProxyAnchorLoss"):
        xpml.CrossBatchMemory(losses.ProxyAnchorLoss(10, 8), 8)


def test_resume_is_exact_where_pml_loses_the_pointer():
    batches = [_batch(s, 10, torch.float32) for s in range(6)]
    a = xpml.CrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY)
    for x, y, _ in batches[:3]:
        _run_step(a, x, y, None, None, [])
    b = xpml.CrossBatchMemory(losses.SupConLoss(), D, memory_size=MEMORY)
    b.load_state_dict(a.state_dict())
    for x, y, _ in batches[3:]:
        la, ga = _run_step(a, x, y, None, None, [])
        lb, gb = _run_step(b, x, y, None, None, [])
        assert torch.equal(la, lb) and torch.equal(ga[0], gb[0])


def test_reset_queue():
    m = xpml.CrossBatchMemory(losses.SupConLoss(), 8, memory_size=10)
    m(torch.randn(4, 8), torch.arange(4))
    m.reset_queue()
    assert len(m.memory) == 0
    assert float(m(torch.randn(4, 8), torch.arange(4))) == 0.0  # no other rows: no pairs


def test_importing_xbm_kernels_does_not_need_pml():
    import subprocess
    import sys
    code = ("import sys; sys.modules['pytorch_metric_learning'] = None; import xbm_kernels; "
            "import xbm_kernels.pml as p; print(len(p.fused_configurations()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(len({fused for _, fused, _ in CONFIGS.values() if fused}))


# --------------------------------------------------------------------------- found by a probe


def _pair(make, steps, dtype=torch.float32, memory=8, ours_kw=None, pml_dtype=None):
    """The last step's (loss, grad) through ours and FixedPML after the same earlier steps."""
    out = []
    for cls, dt in ((xpml.CrossBatchMemory, dtype), (FixedPML, pml_dtype or dtype)):
        loss, miner = make()
        kw = (ours_kw or {}) if cls is xpml.CrossBatchMemory else {}
        m = cls(loss, steps[0][0].shape[1], memory, miner, **kw)
        for x, y in steps[:-1]:
            m(x.to(dt), y)
        x = steps[-1][0].to(dt).clone().requires_grad_()
        loss = m(x, steps[-1][1])
        loss.backward()
        out.append((loss.detach().double(), x.grad.double()))
    return out


def _triplet_batch_hard():
    return losses.TripletMarginLoss(margin=1.0, distance=COS()), miners.BatchHardMiner(distance=COS())


@pytest.mark.parametrize("wrap", [False, True])
def test_triplet_anchor_with_an_exact_duplicate_in_the_batch(wrap):
    """Two identical rows of one label: PML's argmin over the positives ties the anchor's copy
    and the duplicate at S = 1 and picks the lower slot (the copy, then dropped); the step
    runs PML's own loss, so the numbers are PML's."""
    a, b, c = torch.tensor([1.0, 0.2, 0.1]), torch.tensor([0.1, 1.0, 0.3]), torch.tensor([0.5, 0.5, 0.7])
    steps = ([(torch.stack([c, a, b]), torch.tensor([2, 0, 1])), (torch.stack([b, a, b]), torch.tensor([1, 0, 1]))]
             if wrap else [(torch.stack([a, b, b, torch.tensor([0.9, 0.3, 0.0])]), torch.tensor([0, 1, 1, 0]))])
    (lo, go), (lt, gt) = _pair(_triplet_batch_hard, steps, memory=4 if wrap else 8, pml_dtype=torch.float64)
    assert abs(float(lo - lt)) <= 1e-6 and _err(go, gt) <= 1e-5


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_casting_the_wrapper_keeps_the_memory_and_its_normalised_copy_in_step(cast):
    """model.half() with the wrapper inside: the memory keeps its dtype (CONTRACT.md section 2)
    and the next step runs, as without the cast."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 4, generator=g), torch.randn(3, 4, generator=g)
    y0, y1 = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2])
    ref = xpml.CrossBatchMemory(losses.SupConLoss(), 4, 8)
    m = xpml.CrossBatchMemory(losses.SupConLoss(), 4, 8)
    for w in (ref, m):
        w(x0, y0)
    getattr(m, cast)()
    assert m.memory.dtype == torch.float32
    assert float(m(x1, y1)) == float(ref(x1, y1))


@pytest.mark.parametrize("how", ["memory.enqueue", "memory.load_state_dict", "memory.reset", "in-place edit"])
def test_rows_changed_through_the_public_memory_reach_the_fused_kernels(how):
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 4, generator=g), torch.randn(3, 4, generator=g)
    y0, y1 = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2])
    extra, extra_y = torch.randn(4, 4, generator=g) * 3, torch.tensor([2, 2, 0, 1])
    ours, theirs = xpml.CrossBatchMemory(losses.SupConLoss(), 4, 8), FixedPML(losses.SupConLoss(), 4, 8)
    for w in (ours, theirs):
        w(x0, y0)
    if how == "memory.enqueue":
        ours.memory.enqueue(extra, extra_y)
        theirs.add_to_memory(extra, extra_y, 4)
    elif how == "memory.reset":
        ours.memory.reset()
        theirs.reset_queue()
    elif how == "in-place edit":  # the rows tensor edited in place: no call of the memory's
        with torch.no_grad():
            ours.memory.embeddings[2] *= -1
            theirs.embedding_memory[2] *= -1
    else:
        other = xpml.CrossBatchMemory(losses.SupConLoss(), 4, 8)
        other(extra, extra_y)
        ours.memory.load_state_dict(other.memory.state_dict())
        theirs.reset_queue()
        theirs(extra, extra_y)
    assert abs(float(ours(x1, y1)) - float(theirs(x1, y1))) <= 1e-6


@pytest.mark.parametrize("name", ["multi_similarity+regularizer", "triplet-l2+batchhard", "nca", "supcon",
                                  "triplet+batchhard"])
@pytest.mark.parametrize("situation", ["empty batch", "all-False mask on an empty memory", "all-True mask"])
def test_no_anchor_or_no_memory_gives_zero(name, situation):
    make = {"multi_similarity+regularizer": lambda: (losses.MultiSimilarityLoss(
                embedding_regularizer=regularizers.LpRegularizer()), None),
            "triplet-l2+batchhard": lambda: (losses.TripletMarginLoss(), miners.BatchHardMiner()),
            "nca": lambda: (losses.NCALoss(), None), "supcon": lambda: (losses.SupConLoss(), None),
            "triplet+batchhard": _triplet_batch_hard}[name]
    m = xpml.CrossBatchMemory(*make()[:1], D, MEMORY, make()[1])
    x, y, _ = _batch(3, 5, torch.float32, zero_rows=False)
    if situation == "empty batch":
        out = m(x[:0].requires_grad_(), y[:0])
    else:
        mask = torch.full((5,), situation == "all-True mask")
        xx = x.clone().requires_grad_()
        out = m(xx, y, enqueue_mask=mask)
        out.backward()
        assert bool((xx.grad == 0).all())
    assert float(out) == 0.0


@pytest.mark.parametrize("scale", [1e-14, 1e-20])
def test_rows_normalised_to_almost_zero_under_lp_distance(scale):
    """A row of norm <= 1e-12 is ~0 after F.normalize, not a unit row: PML's loss runs."""
    x, y, _ = _batch(4, 6, torch.float32, zero_rows=False)
    x[1] *= scale
    (lo, go), (lt, gt) = _pair(lambda: (losses.ContrastiveLoss(), None), [(x, y)])
    assert abs(float(lo - lt)) <= 1e-6 * max(1.0, abs(float(lt))) and _err(go, gt) <= 1e-5


@pytest.mark.parametrize("name", ["contrastive-cos", "multi_similarity+miner"])
def test_float64_memory_gives_float64_numbers(name):
    """memory_dtype=float64: PML's float64 numbers to 1e-12, the lonely anchors' copy term and
    the cosine contrastive offsets included."""
    make = CONFIGS[name][0]
    g = torch.Generator().manual_seed(1)
    steps = [(torch.randn(6, D, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 7, 8]))
             for _ in range(3)]
    (lo, go), (lt, gt) = _pair(make, steps, dtype=torch.float64, memory=MEMORY,
                               ours_kw=dict(memory_dtype=torch.float64))
    assert abs(float(lo - lt)) <= 1e-12 * max(1.0, abs(float(lt))) and _err(go, gt) <= 1e-12


def test_batch_hard_strategies_changed_between_steps():
    loss, miner = _triplet_batch_hard()
    m = xpml.CrossBatchMemory(loss, D, MEMORY, miner)
    assert m.fused.startswith("triplet")
    m.miner.pos_strategy = m.miner.EASY
    assert m.fused is None


def test_argument_names_for_labels_and_memory_dtype():
    m = xpml.CrossBatchMemory(losses.SupConLoss(), D, MEMORY)
    with pytest.raises(TypeError, match="^labels: "):
        m(torch.randn(3, D), "abc")
    with pytest.raises(TypeError, match="^memory_dtype: "):
        xpml.CrossBatchMemory(losses.SupConLoss(), D, MEMORY, memory_dtype=torch.int32)


@pytest.mark.parametrize("make", [
    lambda: (losses.TripletMarginLoss(margin=0.0, distance=COS()), None),
    lambda: (losses.TripletMarginLoss(margin=0.1, distance=COS()),
             miners.TripletMarginMiner(0.1, distance=COS(), type_of_triplets="semihard")),
    lambda: (losses.TripletMarginLoss(margin=0.1, distance=COS()),
             miners.TripletMarginMiner(0.1, distance=COS(), type_of_triplets="hard"))],
    ids=["all-margin0", "semihard", "hard"])
def test_triplets_with_a_row_under_two_labels(make):
    """A row held in the memory under two labels (label noise) puts u = S_ap - S_an = 0 exactly on
    PML's side; the fused all-triplets path must see the same tie (found by a probe)."""
    gen = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(4, 16, generator=gen), dim=1)
    first = (torch.cat([rows, rows]), torch.tensor([0, 1, 2, 3, 1, 0, 3, 2]))
    second = (F.normalize(torch.randn(6, 16, generator=gen), dim=1), torch.tensor([0, 1, 2, 3, 0, 1]))
    (ours, ours_g), (theirs, theirs_g) = _pair(make, [first, second], memory=16)
    assert xpml.plan(*make())[0].startswith("triplet_all")
    assert abs(float(ours) - float(theirs)) <= 1e-5 * max(1.0, abs(float(theirs)))
    assert float((ours_g - theirs_g).abs().max()) <= 1e-5 * max(1.0, float(theirs_g.abs().max()))


@pytest.mark.parametrize("make, computed", [
    (lambda: (losses.ContrastiveLoss(), miners.PairMarginMiner(0.2, 0.8)), 1),
    (lambda: (losses.TripletMarginLoss(), miners.TripletMarginMiner(0.2, type_of_triplets="semihard")), 1),
    (lambda: (losses.ContrastiveLoss(), miners.PairMarginMiner(0.2, 0.8, distance=LP(power=2))), 2),
    (lambda: (losses.CircleLoss(), miners.MultiSimilarityMiner(0.1)), 2),  # writes into its matrix
    (lambda: (losses.AngularLoss(), miners.AngularMiner()), None)])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_a_miner_with_the_loss_distance_computes_no_matrix_of_its_own(make, computed, grad):
    """On PML's loss with a miner that only reads its matrix and whose distance is the loss's,
    the (anchors, memory) matrix is computed once per step (PML: twice), and loss and gradient
    are PML's bitwise; with another distance, a miner that writes into its matrix, or another
    call, each computes its own. The distances are restored."""
    counts = {"xbm": 0, "pml": 0}
    torch.manual_seed(0)
    batches = [(F.normalize(torch.randn(6, D), dim=1), torch.randint(0, 3, (6,))) for _ in range(5)]
    results = {}
    for side, cls in (("pml", pml_cbm.CrossBatchMemory), ("xbm", xpml.CrossBatchMemory)):
        loss, miner = make()
        dists = {id(d): d for d in (loss.distance, miner.distance)}.values()
        originals = {id(d): type(d).compute_mat for d in dists}

        def counting(d, q, r, own, side=side):
            counts[side] += q.shape[0] != r.shape[0] or q.data_ptr() != r.data_ptr()
            return own(d, q, r)
        for d in dists:
            d.compute_mat = (lambda d, own: lambda q, r: counting(d, q, r, own))(d, type(d).compute_mat)
        module, out = cls(loss, D, memory_size=16, miner=miner), []
        for x0, y in batches:
            x = x0.clone().requires_grad_()
            with torch.set_grad_enabled(grad):
                value = module(x, y)
                if grad:
                    value.backward()
            out.append((value.detach(), x.grad))
        results[side] = out
        assert all("forward" not in vars(d) for d in dists)
        assert all(type(d).compute_mat is originals[id(d)] for d in dists)
    for (lx, gx), (lp, gp) in zip(results["xbm"], results["pml"]):
        assert torch.equal(lx, lp) and (gx is None and gp is None or torch.equal(gx, gp))
    if computed is not None:
        assert counts["xbm"] == computed * len(batches) and counts["pml"] == 2 * len(batches), counts


def test_a_subclass_with_the_name_of_a_fused_loss_runs_its_own_loss():
    """The plan matches PML's class itself, not its name: a user's subclass (here squaring
    PML's rows) runs its own code, as in PML."""
    class ContrastiveLoss(losses.ContrastiveLoss):
        def _compute_loss(self, *args):
            out = super()._compute_loss(*args)
            for v in out.values():
                v["losses"] = v["losses"] ** 2
            return out
    torch.manual_seed(0)
    x, y = F.normalize(torch.randn(12, D), dim=1), torch.arange(12) % 3
    ours, theirs = xpml.CrossBatchMemory(ContrastiveLoss(), D, 32), pml_cbm.CrossBatchMemory(ContrastiveLoss(), D, 32)
    assert ours.fused is None
    lo, lt = ours(x, y), theirs(x, y)
    assert torch.allclose(lo, lt, rtol=1e-6) and not torch.allclose(lo, xpml.CrossBatchMemory(
        losses.ContrastiveLoss(), D, 32)(x, y), rtol=1e-3)


@pytest.mark.parametrize("where", ["anchor", "memory"])
def test_a_row_whose_norm_overflows_is_a_zero_row_as_in_pml(where):
    """Finite entries whose squared norm overflows fp32: F.normalize (PML's distances) makes
    the row zero, so under LpDistance the step runs PML's own loss, as for a zero row."""
    torch.manual_seed(0)
    first, x, y = F.normalize(torch.randn(8, D), dim=1), F.normalize(torch.randn(8, D), dim=1), torch.arange(8) % 3
    (first if where == "memory" else x)[2] *= 1e20  # squared norm 1e40
    ours, theirs = xpml.CrossBatchMemory(losses.ContrastiveLoss(), D, 32), \
        pml_cbm.CrossBatchMemory(losses.ContrastiveLoss(), D, 32)
    for m in (ours, theirs):
        m(first, y)
    lo, lt = ours(x.clone(), y), theirs(x.clone(), y)
    assert torch.isfinite(lo) and torch.allclose(lo, lt, rtol=1e-5, atol=1e-7), (float(lo), float(lt))


@pytest.mark.parametrize("scale", [1.0, 25.0], ids=["fused", "pml-loss"])
def test_nca_step_without_same_label_rows_gives_zero(scale):
    """An enqueue_mask step whose anchors have no same-label row in the memory: PML's NCALoss
    drops every row and its MeanReducer returns NaN; the drop-in returns 0 with zero gradients,
    fused or on PML's own loss (softmax_scale above 20)."""
    x, _, _ = _batch(5, 8, torch.float32, zero_rows=False)
    y = torch.tensor([0, 0, 1, 1, 2, 3, 2, 3])
    mask = torch.tensor([True, True, True, True, False, False, False, False])
    raw = pml_cbm.CrossBatchMemory(losses.NCALoss(softmax_scale=scale), D, MEMORY)
    assert torch.isnan(raw(x, y, enqueue_mask=mask))  # the PML behaviour this deviates from
    ours = xpml.CrossBatchMemory(losses.NCALoss(softmax_scale=scale), D, MEMORY)
    assert (ours.fused is not None) == (scale <= xpml.NCA_MAX_SCALE)
    xx = x.clone().requires_grad_()
    out = ours(xx, y, enqueue_mask=mask)
    out.backward()
    assert float(out) == 0.0 and bool((xx.grad == 0).all())
    theirs = FixedPML(losses.NCALoss(softmax_scale=scale), D, MEMORY)
    assert float(theirs(x, y, enqueue_mask=mask)) == 0.0  # the parity tests' PML has the same fix
    assert float(ours(x, y)) == pytest.approx(float(theirs(x, y)), rel=1e-5, abs=1e-6)  # then PML's numbers
