"""The loss registry: every loss is declared once, here.

A declaration gives the loss's name, its parameters (defaults, the range where they mean
something, kernel-only switch-off values), the rule its "mean" reduction divides by, which
kernel backends implement it and a one-paragraph description of the math (CONTRACT.md has the
full contract). From it come: the op schemas and fakes of every op (C++ ops in _ops.py,
Triton ops in triton/ops.py), the backend tables, the public wrappers (`xk.contrastive_loss`,
...) with their signatures and docstrings, parameter validation, and the tests' parameters
(tests/conftest.py).

Adding a loss: one `Loss(...)` entry below, its reference function in reference.py, its
kernels (CPU/CUDA kernels registered with TORCH_LIBRARY_IMPL under the registry's op names,
and/or a Triton module with `<name>_fwd_triton` and `<name>_bwd_triton`), its CONTRACT.md
section, its oracle and decision boundaries in tests/oracle.py, and a tests/test_<name>_rules.py
only where it has a rule of its own.

Every loss op shares one convention (Loss.schema; csrc/xbm_ops.cpp describes it for C++):
  <name>_fwd(x, labels, ref, ref_labels, self_index, ref_valid, *params, need_grad, allow_tf32)
      -> (loss_rows (B,) f32, grad (B, D) f32 = d(sum_i loss_i)/dx or (0,), counts (B, 2) i32)
  <name>_bwd(x, labels, ref, ref_labels, self_index, ref_valid, *params, grad_rows, allow_tf32)
      -> (grad_x (B, D) f32, grad_ref (N, D) f32)
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")

# What "mean" divides the summed rows by (the denominator is at least 1).
MEAN_OVER = {
    "anchors": "the number of anchors B",
    "anchors_with_positives": "the number of anchors with at least one positive",
    "positive_pairs": "the number of positive pairs",
    "active_triplets": "the number of selected triplets with a non-zero loss",
    "active_triplet_terms": "the number of triplets with a non-zero positive term plus the number with a non-zero "
                            "negative term (pytorch-metric-learning's MarginLoss divisor)",
}


@dataclass(frozen=True)
class Param:
    """A loss parameter. `low`/`high` bound the meaningful range (None: unbounded);
    `open_low`/`open_high` exclude the bound itself."""
    name: str
    default: object
    doc: str
    kind: str = "float"  # "float" or "bool"
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False
    # Kernel-only values outside the public range, {value: what it does}: callers inside the
    # package (the PML drop-in) use them to switch a term off; the public functions reject them.
    switch_off: Tuple[Tuple[float, str], ...] = ()

    def check(self, value, where=""):
        """The validated value (float or bool); raises naming the parameter."""
        name = f"{where}{self.name}"
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value}")
        lo_bad = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        hi_bad = self.high is not None and (value >= self.high if self.open_high else value > self.high)
        if lo_bad or hi_bad:
            raise ValueError(f"{name}: expected a value in {self.range_text()}, got {value}")
        return value

    def range_text(self):
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.open_low or self.low is None else '['}{lo}, {hi}{')' if self.open_high or self.high is None else ']'}"

    def schema(self):
        return f"{self.kind} {self.name}"


POS_EPS = Param("pos_eps", 1e-5, "same-label columns with S >= 1 - pos_eps are not positives (drops exact "
                "duplicates); a negative value keeps every same-label column", low=-1.0, high=1.0,
                switch_off=((3.0, "no positives: S < 1 - 3 never holds"),))


@dataclass(frozen=True)
class Loss:
    name: str
    parameters: Tuple[Param, ...]
    summary: str                      # one line
    math: str                         # the per-anchor formula, for docstrings
    mean_over: str = "anchors"        # a key of MEAN_OVER
    kernels: frozenset = field(default_factory=frozenset)  # kernel backends with this loss

    @property
    def defaults(self) -> Dict[str, object]:
        return {p.name: p.default for p in self.parameters}

    def values(self, kwargs, where=""):
        """Validated parameter values in schema order; unknown names raise TypeError."""
        unknown = set(kwargs) - set(self.defaults)
        if unknown:
            raise TypeError(f"{where or self.name + '_loss: '}unexpected keyword argument(s) {sorted(unknown)}; "
                            f"accepted: {sorted(self.defaults)}")
        return tuple(p.check(kwargs.get(p.name, p.default)) for p in self.parameters)

    def kernel_values(self, **named):
        """Parameter values in schema order, by name, for callers inside the package: every
        parameter must be named; each is checked against its range, or is one of its declared
        `switch_off` values. Raises (TypeError/ValueError naming the parameter) otherwise."""
        missing, unknown = set(self.defaults) - set(named), set(named) - set(self.defaults)
        if missing or unknown:
            raise TypeError(f"{self.name}: kernel_values needs exactly {list(self.defaults)}, got {sorted(named)}")
        return tuple(named[p.name] if any(named[p.name] == v for v, _ in p.switch_off)
                     else p.check(named[p.name], where=f"{self.name}: ") for p in self.parameters)

    @property
    def reference(self):
        """The dense PyTorch implementation: reference.<name>."""
        from . import reference
        return getattr(reference, self.name)

    def schema(self, phase: str) -> str:
        """The op schema (without the name) of <name>_fwd or <name>_bwd."""
        head = ("Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, int ref_valid, "
                + ", ".join(p.schema() for p in self.parameters))
        if phase == "fwd":
            return f"({head}, bool need_grad, bool allow_tf32) -> (Tensor, Tensor, Tensor)"
        return f"({head}, Tensor grad_rows, bool allow_tf32) -> (Tensor, Tensor)"

    def op_names(self):
        return (f"{self.name}_fwd", f"{self.name}_bwd")


ENQUEUE_SCHEMA = "(Tensor(a!) memory, Tensor(b!) memory_labels, Tensor embeddings, Tensor labels, int ptr) -> Tensor"

LOSSES: Dict[str, Loss] = {loss.name: loss for loss in (
    Loss("contrastive",
         (Param("margin", 0.5, "negatives with S > margin are hard", low=-1.0, high=1.0, open_low=True,
                open_high=True, switch_off=((2.0, "no hard negatives: S > 2 never holds"),)),
          POS_EPS),
         "Contrastive loss (the XBM paper's).",
         "l_i = sum_{j in P_i} (1 - S_ij) + sum_{j in N_i, S_ij > margin} S_ij",
         kernels=frozenset({"cpu", "triton", "cuda"})),
    Loss("contrastive_l2",
         (Param("pos_margin", 0.0, "positives with d > pos_margin contribute d - pos_margin", low=0.0, high=2.0),
          Param("neg_margin", 1.0, "negatives with d < neg_margin contribute neg_margin - d", low=0.0, high=2.0,
                switch_off=((-1.0, "no active negatives: d < -1 never holds"),)),
          POS_EPS),
         "Contrastive loss on the L2 distance of unit rows, d_ij = sqrt(max(2 - 2 S_ij, 0)) "
         "(pytorch-metric-learning's default ContrastiveLoss).",
         "l_i = sum_{j in P_i} max(0, d_ij - pos_margin) + sum_{j in N_i} max(0, neg_margin - d_ij)",
         kernels=frozenset({"cpu", "triton"})),
    Loss("multi_similarity",
         (Param("alpha", 2.0, "scale of the positive term", low=0.0, open_low=True),
          Param("beta", 40.0, "scale of the negative term", low=0.0, open_low=True),
          Param("base", 0.5, "the similarity the terms are centred on", low=-1.0, high=1.0),
          Param("mining_margin", 0.1, "pair-mining margin", low=-2.0, high=2.0),
          POS_EPS,
          Param("mine", True, "mine P~ and N~ with mining_margin (False: P~ = P, N~ = N)", kind="bool"),
          Param("skip_incomplete", True, "an anchor with an empty P, N, P~ or N~ contributes 0 (the paper's "
                "code); False: each term is 0 only when its own mined set is empty (pytorch-metric-learning). "
                "With mine=True the two mined sets are empty together, so it matters with mine=False",
                kind="bool")),
         "Multi-similarity loss (Wang et al. 2019) with the paper code's pair mining.",
         "P~_i = {j in P_i : S_ij - mining_margin < max_{N_i} S}, N~_i = {j in N_i : S_ij + mining_margin > "
         "min_{P_i} S};\n    l_i = 1/alpha log(1 + sum_{P~_i} exp(-alpha (S_ij - base))) + 1/beta log(1 + "
         "sum_{N~_i} exp(beta (S_ij - base)))\n    (mined-set membership is a constant for the gradient)",
         kernels=frozenset({"cpu", "triton"})),
    Loss("triplet",
         (Param("margin", 0.1, "the hinge's margin", low=0.0, high=2.0), POS_EPS),
         "Batch-hard triplet loss.",
         "l_i = max(0, max_{N_i} S - min_{P_i} S + margin), 0 when P_i or N_i is empty; ties pick the lowest "
         "column",
         kernels=frozenset({"cpu", "triton"})),
    Loss("supcon",
         (Param("temperature", 0.1, "softmax temperature", low=0.0, open_low=True), POS_EPS),
         "Supervised contrastive (InfoNCE) loss over the reference set.",
         "l_i = -1/|P_i| sum_{p in P_i} [S_ip / tau - log sum_{a in V_i} exp(S_ia / tau)], 0 when P_i is empty",
         mean_over="anchors_with_positives",
         kernels=frozenset({"cpu", "triton"})),
    Loss("ntxent",
         (Param("temperature", 0.1, "softmax temperature", low=0.0, open_low=True), POS_EPS),
         "NT-Xent loss: one InfoNCE term per positive pair against the anchor's negatives.",
         "l_i = sum_{p in P_i} -log(exp(S_ip / tau) / (exp(S_ip / tau) + sum_{n in N_i} exp(S_in / tau)))",
         mean_over="positive_pairs",
         kernels=frozenset({"cpu", "triton"})),
    Loss("circle",
         (Param("m", 0.4, "the relaxation margin: optima 1 - m (positives) and m (negatives)", low=-1.0,
                high=1.0),
          Param("gamma", 80.0, "the scale", low=0.0, open_low=True),
          POS_EPS),
         "Circle loss (Sun et al. 2020), pair form, as pytorch-metric-learning's CircleLoss.",
         "l_i = softplus(log sum_{P_i} exp(lp_ij) + log sum_{N_i} exp(ln_ij)), lp = -gamma [1 + m - S]_+ "
         "(S - (1 - m)),\n    ln = gamma [S + m]_+ (S - m) ([.]_+ factors constant for the gradient); 0 when P_i "
         "or N_i is empty",
         kernels=frozenset({"cpu", "triton"})),
    Loss("triplet_all",
         (Param("margin", 0.2, "the hinge's margin", low=0.0, high=2.0),
          Param("select_low", -3.0, "triplets with u = S_ip - S_in > select_low are selected (-3: no bound)",
                low=-3.0, high=3.0),
          Param("select_high", 3.0, "... and u <= select_high (3: no bound)", low=-3.0, high=3.0),
          POS_EPS),
         "Triplet margin loss over every (positive, negative) triplet of the anchor in a selection interval "
         "(pytorch-metric-learning's TripletMarginLoss with all triplets or a TripletMarginMiner).",
         "l_i = sum_{p in P_i, n in N_i, select_low < S_ip - S_in <= select_high} max(0, S_in - S_ip + margin)",
         mean_over="active_triplets",
         kernels=frozenset({"cpu", "triton"})),
    Loss("generalized_lifted",
         (Param("pos_margin", 0.0, "positives enter their log-sum-exp as d - pos_margin (d in [0, 2]; a set's "
                "log-sum-exp reaches log of its size, 21.5 for 2^31 pairs)", low=-32.0, high=32.0),
          Param("neg_margin", 1.0, "negatives enter theirs as neg_margin - d", low=-32.0, high=32.0),
          POS_EPS),
         "Generalized lifted structure loss on the L2 distance of unit rows, d_ij = sqrt(max(2 - 2 S_ij, 0)) "
         "(pytorch-metric-learning's GeneralizedLiftedStructureLoss).",
         "l_i = max(0, log sum_{P_i} exp(d_ij - pos_margin) + log sum_{N_i} exp(neg_margin - d_ij)), the term "
         "of an empty set 0",
         kernels=frozenset({"cpu", "triton"})),
    Loss("tuplet_margin",
         (Param("margin", 5.73, "the angular margin in degrees (as pytorch-metric-learning's constructor takes it): "
                "a positive's logit is scale cos(theta - margin), theta = acos(S)", low=-180.0, high=180.0),
          Param("scale", 64.0, "the scale of the logits (at most 1e6: a pair's logit and its gradient sums stay "
                "finite in fp32)", low=0.0, high=1e6, open_low=True),
          POS_EPS),
         "Tuplet margin loss (Yu and Tao 2019), as pytorch-metric-learning's TupletMarginLoss: one log-sum-exp "
         "term per positive pair against the anchor's negatives, the positive's angle widened by the margin.",
         "l_i = sum_{p in P_i} softplus(log sum_{n in N_i} exp(scale S_in) - scale cos(acos(S_ip) - margin)), "
         "margin in degrees;\n    a pair's term is 0 when N_i is empty (CONTRACT.md: sin(theta) is 0 where "
         "1 - S^2 <= 2^-16)",
         mean_over="positive_pairs",
         kernels=frozenset({"cpu", "triton"})),
    Loss("margin",
         (Param("margin", 0.2, "the margin around beta", low=0.0, high=2.0),
          Param("beta", 1.2, "the boundary between positive and negative distances (d is in [0, 2]: beyond +-4 "
                "every term is constant)", low=-4.0, high=4.0),
          POS_EPS),
         "Margin loss (Wu et al. 2017) over every (positive, negative) triplet of the anchor, on the L2 distance "
         "of unit rows d = sqrt(max(2 - 2 S, 0)) (pytorch-metric-learning's MarginLoss, all triplets).",
         "l_i = sum_{p in P_i, n in N_i} [max(0, d_ip - beta + margin) + max(0, beta - d_in + margin)]\n"
         "    = |N_i| sum_{P_i} max(0, d_ip - beta + margin) + |P_i| sum_{N_i} max(0, beta - d_in + margin)",
         mean_over="active_triplet_terms",
         kernels=frozenset({"cpu", "triton"})),
    Loss("nca",
         (Param("scale", 1.0, "the softmax scale on the squared L2 distance of unit rows, d^2 = 2 - 2 S (logits "
                "2 scale S up to a constant; at most 1e6: 2 scale S stays finite in fp32)", low=0.0, high=1e6,
                open_low=True),
          POS_EPS),
         "Neighbourhood components analysis loss (Goldberger et al. 2004), pytorch-metric-learning's NCALoss on "
         "unit rows.",
         "l_i = log sum_{a in V_i} exp(2 scale S_ia) - log sum_{p in P_i} exp(2 scale S_ip), 0 when P_i is empty",
         mean_over="anchors_with_positives",
         kernels=frozenset({"cpu", "triton"})),
)}

COMMON_ARGS_DOC = """S = X R^T accumulated in fp32 (inputs are expected L2-normalised; the functional losses do not
normalise). Positives P_i: same label, valid, not self, S < 1 - pos_eps; negatives N_i: other label,
valid, not self; V_i = all valid columns but self. Columns j >= ref_valid and j == self_index[i]
are ignored. reduction: "mean", "sum" or "none" (the per-anchor vector, float32). Gradients reach
`embeddings`, and `ref_embeddings` when it requires grad. backend: "auto" or one of
xk.available_backends()."""


def docstring(loss: Loss) -> str:
    params = "\n".join(f"    {p.name} ({p.default!r}, in {p.range_text() if p.kind == 'float' else 'bool'}): {p.doc}"
                       for p in loss.parameters)
    return (f"{loss.summary}\n\n    {loss.math}\n\n{COMMON_ARGS_DOC}\n\"mean\" divides by "
            f"{MEAN_OVER[loss.mean_over]}.\n\nParameters:\n{params}\n\nCONTRACT.md section 1 has the full "
            f"definition.")
