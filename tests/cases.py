"""The suite's one case model, its one table, the loss parameter variants (derived from the
registry) and the data drawn for them.

A case is a shape and a structure (labels, self_index, a partly filled memory); its data are
drawn per loss and parameter set until no decision of the loss is near its flip point
(oracle.decision_gap, CONTRACT.md section 6), and cached. Construction: each class has a
centre with m = 7 (3 when D < 7) entries of +-1/sqrt(m), so centre similarities are
multiples of 1/m; every row is its centre plus dense Gaussian noise of norm `noise`,
renormalised (noise 1: positives spread over ~[0.2, 0.8] and overlap the negatives, so that
mining, hardest pairs and the softmax have work to do; 0.25: same-class S near 0.94).

Tags say which runs take a case: "cpu" (the compiled CPU kernels and the reference backend
on CPU tensors), "interpreter" (the Triton interpreter: small, it is slow), "gpu" (every
backend on CUDA tensors), "gpu-large" (GPU only: the expected values come from the dense
float64 evaluation, a Python loop would take minutes), "quick" (the gpu_quick subset).
"""
import functools
import itertools
import math
import zlib
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

import oracle
from xbm_kernels.registry import LOSSES

ALL = frozenset({"cpu", "interpreter", "gpu"})


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    N: int
    D: int
    classes: int
    ref_valid: Optional[int] = None  # None: every column
    self_index: str = "none"
    # "none"; "random": a column (inside or past ref_valid) or -1 per anchor, every second
    # valid one holding the anchor's own copy (excluded by index only); "in-batch": the
    # reference is the batch, self_index = arange(B); "copies": the reference is the batch
    # and no self_index, so every anchor meets its exact copy (a positive only for pos_eps < 0)
    noise: float = 1.0
    labels: str = "random"
    # "random"; "one-ref-class": every reference row class 0, anchors alternating 0 / 1 (rows
    # without negatives next to rows without positives); "absent": three anchors of a class
    # the reference does not have
    tags: frozenset = ALL
    why: str = ""


CASES = {c.name: c for c in (
    Case("B1-D3", 1, 5, 3, 2, tags=ALL | {"quick"}, why="a memory below one tile, D below a vector"),
    Case("B7-D96-K50", 7, 50, 96, 5, why="two interpreter tiles; dense label matches (ntxent's tile GEMM)"),
    Case("B7-D96-split", 7, 300, 96, 5, 250, "random", noise=0.25, tags=ALL | {"quick"},
         why="interpreter: 4 memory splits; partial memory; own copies in self columns"),
    Case("B33-D130-partial-self", 33, 150, 130, 10, 100, "random", tags=ALL | {"quick"},
         why="unaligned rows; interpreter: 3 anchor tiles x 2 splits"),
    Case("B33-D96-multi-tile", 33, 2100, 96, 40, None, "random", tags=frozenset({"cpu", "gpu"}),
         why="many tiles, several CPU thread ranges"),
    Case("B33-D96-sparse", 33, 5000, 96, 200, 4700, "random", tags=frozenset({"cpu", "gpu"}),
         why="CPU thread ranges of uneven tile counts; label matches below 1/64 (ntxent's pair dots)"),
    Case("B7-no-positives", 7, 64, 96, 1000, why="anchors without positives"),
    Case("B16-one-label", 16, 90, 32, 1, 77, "random", noise=0.25, why="no negatives"),
    Case("B9-one-ref-class", 9, 40, 16, 2, labels="one-ref-class",
         why="rows without negatives next to rows without positives"),
    Case("B24-absent-class", 24, 120, 32, 6, 100, "random", labels="absent",
         why="anchors of a class the memory lacks, among full rows"),
    Case("B25-in-batch", 25, 25, 48, 5, None, "in-batch", tags=ALL | {"quick"},
         why="the in-batch loss: self excluded by index"),
    Case("B29-D64-in-batch", 29, 29, 64, 6, None, "in-batch", tags=frozenset({"gpu"}), why="in-batch, a partial tile"),
    Case("B70-D130-in-batch", 70, 70, 130, 6, None, "in-batch", tags=frozenset({"gpu"}),
         why="in-batch: two anchor and reference tiles, unaligned rows"),
    Case("B65-D512-in-batch", 65, 65, 512, 6, None, "in-batch", tags=frozenset({"gpu"}),
         why="in-batch: one anchor past a tile of 64, wide rows"),
    Case("B12-copies", 12, 12, 24, 3, None, "copies",
         why="each anchor's exact copy, not excluded: dropped by pos_eps > 0, a positive at S = 1 for pos_eps < 0"),
    Case("B5-ref-valid-0", 5, 40, 16, 3, 0, why="an empty valid prefix"),
    Case("B5-N0", 5, 0, 16, 3, why="an empty reference set"),
    Case("B0", 0, 30, 16, 3, why="an empty batch"),
    Case("B70-D200", 70, 700, 200, 20, 650, "random", tags=frozenset({"gpu"}), why="two anchor tiles of 64 (CUDA)"),
    Case("B40-D512", 40, 1000, 512, 30, 999, "random", tags=frozenset({"gpu"})),
    Case("B9-D1030", 9, 150, 1030, 8, tags=frozenset({"gpu"}), why="several dX slices, unaligned rows (CUDA)"),
    Case("B5-D1024", 5, 130, 1024, 6, None, "random", tags=frozenset({"gpu"})),
    Case("B3-K100k", 3, 100_000, 64, 50, None, "random", noise=0.25, tags=frozenset({"gpu-large"})),
    Case("B64-K50k-partial", 64, 50_000, 128, 200, 45_000, "random", noise=0.25, tags=frozenset({"gpu-large"})),
    Case("B512-D256", 512, 8192, 256, 100, None, "random", noise=0.25, tags=frozenset({"gpu-large", "quick"})),
    Case("B200-D512", 200, 4000, 512, 60, 3999, noise=0.25, tags=frozenset({"gpu-large"})),
)}

# The 16-bit, mixed-dtype, determinism and reduction tests take one case each run: the one
# with a partial memory, random self_index, several tiles and splits.
PARTIAL = "B33-D130-partial-self"
SPLIT = "B7-D96-split"
MANY_SPLITS = {"cpu": "B33-D96-sparse", "interpreter": "B7-D96-split", "gpu": "B33-D96-multi-tile"}


def run_kind(backend, device):
    """Which cases a backend takes: "gpu" (CUDA tensors), "interpreter" (Triton on CPU tensors) or "cpu"."""
    if device == "cuda":
        return "gpu"
    return "interpreter" if backend == "triton" else "cpu"


def names(kind):
    """The cases of a run kind: "cpu", "interpreter" or "gpu" (with "gpu-large")."""
    tags = {kind} | ({"gpu-large"} if kind == "gpu" else set())
    return [n for n, c in CASES.items() if c.tags & tags]


# --------------------------------------------------------------------------- loss parameters


def _moved(p):
    """A value away from the default: a quarter of the way to the farther finite bound, or
    1.5 x the default when that side is unbounded."""
    lo = -math.inf if p.low is None else p.low
    hi = math.inf if p.high is None else p.high
    far = lo if p.default - lo > hi - p.default else hi
    return p.default * 1.5 if math.isinf(far) else p.default + 0.25 * (far - p.default)


@functools.lru_cache(maxsize=None)
def variants(loss):
    """Parameter sets of a loss, from its registry entry: the defaults; every float parameter
    moved (_moved, pos_eps kept; or `<loss>_moved` where oracle.py declares one); each other combination of its bool parameters; pos_eps = -1
    (every same-label column a positive, exact copies too). name -> params (schema order)."""
    spec = LOSSES[loss]
    # `<loss>_defaults` in oracle.py: where the registry defaults put a fixed threshold among the
    # data's similarities (margin: d = beta + margin = 1.4, S = 0.02, among the orthogonal rows)
    d = {**spec.defaults, **getattr(oracle, f"{loss}_defaults", {})}
    out = {"defaults": d}
    floats = [p for p in spec.parameters if p.kind == "float" and p.name != "pos_eps"]
    if floats:
        declared = getattr(oracle, f"{loss}_moved", None)
        out["moved"] = {**d, **(declared if declared is not None else {p.name: _moved(p) for p in floats})}
    bools = [p for p in spec.parameters if p.kind == "bool"]
    for combo in itertools.product((True, False), repeat=len(bools)):
        flags = {p.name: v for p, v in zip(bools, combo)}
        if any(flags[p.name] != p.default for p in bools):
            out[",".join(f"{k}={v}" for k, v in flags.items())] = {**d, **flags}
    if "pos_eps" in d:
        out["pos_eps<0"] = {**d, "pos_eps": -1.0}
    return out


# --------------------------------------------------------------------------- data


def class_centres(n_classes, D, gen):
    m = 7 if D >= 7 else 3 if D >= 3 else 1
    centres = torch.zeros(n_classes, D, dtype=torch.float64)
    for c in range(n_classes):
        cols = torch.randperm(D, generator=gen)[:m]
        signs = torch.randint(0, 2, (m,), generator=gen).double() * 2 - 1
        centres[c, cols] = signs / m ** 0.5
    return centres


def rows_around(centres, labels, gen, noise):
    n, D = labels.shape[0], centres.shape[1]
    eps = F.normalize(torch.randn(n, D, generator=gen, dtype=torch.float64), dim=1)
    return F.normalize(centres[labels] + noise * eps, dim=1)


@dataclass(frozen=True)
class Data:
    x: torch.Tensor
    y: torch.Tensor
    r: torch.Tensor
    z: torch.Tensor
    ref_valid: int
    self_index: Optional[torch.Tensor]
    copies: Tuple[Tuple[int, int], ...] = field(default=())

    def to(self, device):
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Data(mv(self.x), mv(self.y), mv(self.r), mv(self.z), self.ref_valid, mv(self.self_index), self.copies)

    def args(self):
        return self.x, self.y, self.r, self.z


NOISE_LADDER = (0.25, 0.07)  # tighter classes where the case's noise leaves no draw away from a fixed threshold


def _draw_once(c, gen, noise):
    B, N, n = c.B, c.N, c.N if c.ref_valid is None else c.ref_valid
    extra = 1 if c.labels == "absent" else 0
    centres = class_centres(c.classes + extra, c.D, gen)
    y = torch.randint(0, c.classes, (B,), generator=gen)
    z = torch.randint(0, c.classes, (N,), generator=gen)
    if c.labels == "one-ref-class":
        z.zero_()
        y = torch.arange(B) % 2
    elif c.labels == "absent":
        y[:3] = c.classes
    x = rows_around(centres, y, gen, noise)
    r = rows_around(centres, z, gen, noise)
    si, copies = None, ()
    if c.self_index == "random":
        si = torch.randperm(N, generator=gen)[:B] if N >= B else torch.randint(0, max(N, 1), (B,), generator=gen)
        si[torch.rand(B, generator=gen) < 0.25] = -1
        for i in range(0, B, 2):
            if 0 <= si[i] < n:
                r[si[i]], z[si[i]] = x[i], y[i]
    elif c.self_index in ("in-batch", "copies"):
        r, z = x.clone(), y.clone()
        if c.self_index == "in-batch":
            si = torch.arange(B)
        else:
            copies = tuple((i, i) for i in range(B))
    return Data(x, y, r, z, n, si, copies)


@functools.lru_cache(maxsize=None)
def draw(case, loss, variant, x_dtype=torch.float32, r_dtype=None, tries=60):
    """The data of the table's case `case` for `loss` with parameters variants(loss)[variant]
    (cached): see draw_case."""
    return draw_case(CASES[case], loss, variants(loss)[variant], x_dtype, r_dtype, tries,
                     seed=zlib.crc32(f"{case}/{loss}/{variant}".encode()))


def draw_case(c, loss, params, x_dtype=torch.float32, r_dtype=None, tries=60, seed=0):
    """Data of case `c` in x_dtype (anchors) and r_dtype (reference; default x_dtype), redrawn
    until oracle.decision_gap > 1 for `loss` with `params` on the rounded values, first with
    the case's noise, then with tighter classes (NOISE_LADDER: S clusters near multiples of
    1/7, so a fixed threshold between them is drawable with any number of pairs). CPU tensors."""
    r_dtype = r_dtype or x_dtype
    tighter = [v for v in NOISE_LADDER if v < c.noise]
    schedule = [c.noise] * 8 + [v for v in tighter for _ in range(8)] + [v for v in tighter[-1:] for _ in range(tries)]
    schedule = schedule if tighter else [c.noise] * tries
    for attempt, noise in enumerate(schedule[:tries]):
        d = _draw_once(c, torch.Generator().manual_seed(seed + attempt), noise)
        x = d.x.to(x_dtype)
        r = x.to(r_dtype) if c.self_index in ("in-batch", "copies") else d.r.to(r_dtype)
        d = Data(x, d.y, r, d.z, d.ref_valid, d.self_index, d.copies)
        if oracle.decision_gap(loss, params, x, d.y, r, d.z, d.ref_valid, d.self_index, d.copies) > 1:
            return d
    raise RuntimeError(f"{c.name}: no draw away from the thresholds of {loss} ({params}) in {tries} tries")


def weights(B):
    """Per-row weights of sum_i w_i l_i (the incoming gradient of reduction="none")."""
    return torch.linspace(0.5, 1.5, B, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def expected(case, loss, variant, x_dtype=torch.float32, r_dtype=None, weighted=True):
    """(rows, grad_x, grad_ref, counts) in float64 of sum_i w_i l_i (w = weights(B), or 1) on
    the drawn (rounded) data: the loop oracle, or for "gpu-large" cases the dense evaluation
    (the reference functions on float64 inputs, S in float64; a Python loop over millions of
    pairs would take minutes)."""
    d = draw(case, loss, variant, x_dtype, r_dtype)
    params = variants(loss)[variant]
    w = weights(d.x.shape[0]) if weighted else None
    if "gpu-large" not in CASES[case].tags:
        return oracle.evaluate(loss, params, *d.args(), d.ref_valid, d.self_index, w)
    return dense_expected(loss, params, d, w)


def dense_expected(loss, params, d, w=None):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    xd = d.x.to(device).double().requires_grad_()
    rd = d.r.to(device).double().requires_grad_()
    si = None if d.self_index is None else d.self_index.to(device)
    rows, counts = LOSSES[loss].reference(xd, d.y.to(device), rd, d.z.to(device), ref_valid=d.ref_valid,
                                          self_index=si, **params)
    w = torch.ones(rows.shape[0], dtype=torch.float64) if w is None else w
    (rows.double() * w.to(device)).sum().backward()
    return rows.detach().double().cpu(), xd.grad.cpu(), rd.grad.cpu(), counts.long().cpu()


def mean_denominator(loss, counts):
    """What reduction="mean" divides by: the registry's rule (CONTRACT.md section 1)."""
    rule = LOSSES[loss].mean_over
    if rule == "anchors_with_positives":
        return max(int((counts[:, 0] > 0).sum()), 1)
    if rule in ("positive_pairs", "active_triplets"):
        return max(int(counts[:, 0].sum()), 1)
    if rule == "active_triplet_terms":
        return max(int(counts.sum()), 1)
    assert rule == "anchors", rule
    return max(counts.shape[0], 1)
