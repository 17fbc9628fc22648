"""Float64 loop oracle written from CONTRACT.md section 1, one anchor and one column at a
time, for clarity rather than speed. Never edit it to agree with a kernel."""
import math

import torch


def _sets(x, y, r, z, pos_eps, ref_valid, self_index):
    """Yields, per anchor i: (S_i as a list of floats, P_i, N_i) with column index sets."""
    x = x.detach().double().cpu()
    r = r.detach().double().cpu()
    y = [int(v) for v in y.cpu()]
    z = [int(v) for v in z.cpu()]
    n = r.shape[0] if ref_valid is None else ref_valid
    si = [-1] * x.shape[0] if self_index is None else [int(v) for v in self_index.cpu()]
    for i in range(x.shape[0]):
        s = [float(torch.dot(x[i], r[j])) for j in range(n)]
        P, N = [], []
        for j in range(n):
            if j == si[i]:
                continue
            if z[j] == y[i]:
                if s[j] < 1.0 - pos_eps:
                    P.append(j)
            else:
                N.append(j)
        yield i, s, P, N


class _Outputs:
    """An oracle's float64 outputs: rows (B,), d(sum_i w_i l_i)/dx (B, D), d(sum_i w_i l_i)/dr
    (N, D) and counts (B, 2) int64, w = 1 by default; add(i, j, c) records dl_i/dS_ij = c."""

    def __init__(self, x, r, weights):
        B, D = x.shape
        self.xd, self.rd = x.detach().double().cpu(), r.detach().double().cpu()
        self.rows = torch.zeros(B, dtype=torch.float64)
        self.grad = torch.zeros(B, D, dtype=torch.float64)
        self.grad_ref = torch.zeros(r.shape[0], D, dtype=torch.float64)
        self.counts = torch.zeros(B, 2, dtype=torch.int64)
        self.w = [1.0] * B if weights is None else [float(v) for v in weights]

    def add(self, i, j, c):
        self.grad[i] += self.w[i] * c * self.rd[j]
        self.grad_ref[j] += self.w[i] * c * self.xd[i]

    def result(self):
        return self.rows, self.grad, self.grad_ref, self.counts


def contrastive_oracle(x, y, r, z, margin=0.5, pos_eps=1e-5, ref_valid=None, self_index=None, weights=None):
    """Returns (loss rows (B,) float64, grad (B, D) float64 = d(sum_i w_i l_i)/dx,
    grad_ref (N, D) float64 = d(sum_i w_i l_i)/dr, counts (B, 2) int64); w = 1 by default."""
    out = _Outputs(x, r, weights)
    rows, counts = out.rows, out.counts
    for i, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        for j in P:
            rows[i] += 1.0 - s[j]
            out.add(i, j, -1.0)
        active = [j for j in N if s[j] > margin]
        for j in active:
            rows[i] += s[j]
            out.add(i, j, 1.0)
        counts[i, 0], counts[i, 1] = len(P), len(active)
    return out.result()


L2_ZERO = 2.0 ** -16  # 2 - 2S at or below it counts as d = 0 (CONTRACT.md section 1, contrastive_l2)


def l2_distance(s):
    t = 2.0 - 2.0 * s
    return math.sqrt(t) if t > L2_ZERO else 0.0


def contrastive_l2_oracle(x, y, r, z, pos_margin=0.0, neg_margin=1.0, pos_eps=1e-5, ref_valid=None, self_index=None,
                          weights=None):
    """d_ij = sqrt(max(2 - 2 S_ij, 0)); l_i = sum_{P_i} max(0, d - pos_margin) + sum_{N_i}
    max(0, neg_margin - d). dl_i/dS_ij = -1/d (active positive), +1/d (active negative), and
    0 at d == 0 (torch.cdist's rule). counts: (active positives, active negatives)."""
    out = _Outputs(x, r, weights)
    rows, counts = out.rows, out.counts
    for i, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        for j in P:
            d = l2_distance(s[j])
            if d > pos_margin:
                rows[i] += d - pos_margin
                counts[i, 0] += 1
                if d > 0:  # dl/dS = dl/dd * dd/dS = 1 * (-1/d)
                    out.add(i, j, -1.0 / d)
        for j in N:
            d = l2_distance(s[j])
            if d < neg_margin:
                rows[i] += neg_margin - d
                counts[i, 1] += 1
                if d > 0:  # dl/dS = (-1) * (-1/d)
                    out.add(i, j, 1.0 / d)
    return out.result()


def reduce_rows(rows, reduction, denominator=None):
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / (denominator or max(rows.shape[0], 1))


def min_threshold_distance(x, r, thresholds, ref_valid=None, self_index=None):
    """Smallest |S_ij - t| over the valid, non-self columns: tests keep it above 1e-3."""
    n = r.shape[0] if ref_valid is None else ref_valid
    S = x.detach().double() @ r[:n].detach().double().T
    if self_index is not None:
        for i, j in enumerate(self_index.tolist()):
            if 0 <= j < n:
                S[i, j] = math.inf
    if S.numel() == 0:
        return math.inf
    return min(float((S - t).abs().min()) for t in thresholds)


def multi_similarity_oracle(x, y, r, z, alpha=2.0, beta=40.0, base=0.5, mining_margin=0.1, pos_eps=1e-5,
                            ref_valid=None, self_index=None, weights=None, mine=True, skip_incomplete=True):
    out = _Outputs(x, r, weights)
    rows, counts = out.rows, out.counts
    for i, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        if mine:
            max_neg = max((s[j] for j in N), default=-math.inf)
            min_pos = min((s[j] for j in P), default=math.inf)
            Pm = [j for j in P if s[j] - mining_margin < max_neg]
            Nm = [j for j in N if s[j] + mining_margin > min_pos]
        else:
            Pm, Nm = list(P), list(N)
        if skip_incomplete and not (P and N and Pm and Nm):
            continue
        ep = {j: math.exp(-alpha * (s[j] - base)) for j in Pm}
        en = {j: math.exp(beta * (s[j] - base)) for j in Nm}
        sp, sn = sum(ep.values()), sum(en.values())
        rows[i] = math.log1p(sp) / alpha + math.log1p(sn) / beta  # an empty set's term is log1p(0) = 0
        for j in Pm:  # d/dS_ij of (1/alpha) log(1 + sp) = -ep_j / (1 + sp)
            c = -ep[j] / (1 + sp)
            out.add(i, j, c)
        for j in Nm:
            c = en[j] / (1 + sn)
            out.add(i, j, c)
        counts[i, 0], counts[i, 1] = len(Pm), len(Nm)
    return out.result()


def triplet_oracle(x, y, r, z, margin=0.1, pos_eps=1e-5, ref_valid=None, self_index=None, weights=None):
    out = _Outputs(x, r, weights)
    rows, counts = out.rows, out.counts
    for i, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        if not P or not N:
            continue
        ap = min(P, key=lambda j: (s[j], j))    # hardest positive, lowest index on ties
        an = min(N, key=lambda j: (-s[j], j))   # hardest negative, lowest index on ties
        v = s[an] - s[ap] + margin
        if v > 0:
            rows[i] = v
            out.add(i, an, 1.0)
            out.add(i, ap, -1.0)
            counts[i] = 1
    return out.result()


def supcon_oracle(x, y, r, z, temperature=0.1, pos_eps=1e-5, ref_valid=None, self_index=None, weights=None):
    out = _Outputs(x, r, weights)
    rows, counts = out.rows, out.counts
    n = r.shape[0] if ref_valid is None else ref_valid
    si = [-1] * x.shape[0] if self_index is None else [int(v) for v in self_index.cpu()]
    for i, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        if not P:
            continue
        V = [j for j in range(n) if j != si[i]]
        top = max(s[j] / temperature for j in V)
        lse = top + math.log(sum(math.exp(s[j] / temperature - top) for j in V))
        rows[i] = -sum(s[p] / temperature - lse for p in P) / len(P)
        for j in V:
            c = math.exp(s[j] / temperature - lse) / temperature - ((1.0 / len(P) / temperature) if j in P else 0.0)
            out.add(i, j, c)
        counts[i, 0], counts[i, 1] = len(P), len(N)
    return out.result()


def ntxent_oracle(x, y, r, z, temperature=0.1, pos_eps=1e-5, ref_valid=None, self_index=None, weights=None):
    """l_i = sum_{p in P_i} -log(exp(s_ip) / (exp(s_ip) + sum_{n in N_i} exp(s_in))), s = S / tau;
    a pair's term is 0 when N_i is empty."""
    out = _Outputs(x, r, weights)
    rows, counts = out.rows, out.counts
    for i, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        counts[i, 0], counts[i, 1] = len(P), len(N)
        if not P or not N:
            continue
        top = max(s[j] / temperature for j in N)
        denom_neg = sum(math.exp(s[j] / temperature - top) for j in N)  # sum_N exp(s_in) / e^top
        coef = {j: 0.0 for j in P + N}  # dl_i/dS_ij, summed over the pairs
        for p in P:
            sp = s[p] / temperature
            total = math.exp(sp - top) + denom_neg
            rows[i] += math.log(total) - (sp - top)
            # pair p's softmax over {p} + N_i: d/dS_ip = (softmax_p - 1) / tau, d/dS_in = softmax_n / tau
            coef[p] += (math.exp(sp - top) / total - 1.0) / temperature
            for n in N:
                coef[n] += math.exp(s[n] / temperature - top) / total / temperature
        for j, c in coef.items():
            out.add(i, j, c)
    return out.result()


def circle_oracle(x, y, r, z, m=0.4, gamma=80.0, pos_eps=1e-5, ref_valid=None, self_index=None, weights=None):
    """l_i = softplus(LSE_P lp + LSE_N ln), lp_ij = -gamma [1 + m - S]_+ (S - (1 - m)),
    ln_ij = gamma [S + m]_+ (S - m), the [.]_+ factors constants for the gradient; 0 when P_i
    or N_i is empty."""
    out = _Outputs(x, r, weights)
    rows, counts = out.rows, out.counts
    for i, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        counts[i, 0], counts[i, 1] = len(P), len(N)
        if not P or not N:
            continue
        scale = {j: -gamma * max(0.0, 1.0 + m - s[j]) for j in P}   # d lp / d S
        scale.update({j: gamma * max(0.0, s[j] + m) for j in N})    # d ln / d S
        logit = {j: scale[j] * (s[j] - (1.0 - m)) for j in P}
        logit.update({j: scale[j] * (s[j] - m) for j in N})
        lse = {}
        for name, cols in (("P", P), ("N", N)):
            top = max(logit[j] for j in cols)
            lse[name] = top + math.log(sum(math.exp(logit[j] - top) for j in cols))
        total = lse["P"] + lse["N"]
        rows[i] = max(total, 0.0) + math.log1p(math.exp(-abs(total)))  # softplus
        sig = 1.0 / (1.0 + math.exp(-total))
        for name, cols in (("P", P), ("N", N)):
            for j in cols:
                c = sig * math.exp(logit[j] - lse[name]) * scale[j]
                out.add(i, j, c)
    return out.result()


def triplet_all_oracle(x, y, r, z, margin=0.2, select_low=-3.0, select_high=3.0, pos_eps=1e-5, ref_valid=None,
                       self_index=None, weights=None):
    """l_i = sum over p in P_i, n in N_i with select_low < S_ip - S_in <= select_high of
    max(0, S_in - S_ip + margin); counts: the selected triplets with a positive loss. One
    anchor at a time (its P x N triplets as a float64 matrix)."""
    out = _Outputs(x, r, weights)
    rows, counts = out.rows, out.counts
    for i, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        if not P or not N:
            continue
        sp = torch.tensor([s[j] for j in P], dtype=torch.float64)
        sn = torch.tensor([s[j] for j in N], dtype=torch.float64)
        u = sp[:, None] - sn[None, :]
        active = (u > select_low) & (u <= select_high) & (margin - u > 0)
        rows[i] = float(torch.where(active, margin - u, torch.zeros(())).sum())
        counts[i, 0] = counts[i, 1] = int(active.sum())
        coef_p = -active.sum(1).double()   # d l / d S_ip: -1 per active triplet of p
        coef_n = active.sum(0).double()    # d l / d S_in: +1 per active triplet of n
        for c, cols in ((coef_p, P), (coef_n, N)):
            for k, j in enumerate(cols):
                if c[k] != 0:
                    out.add(i, j, float(c[k]))
    return out.result()


def generalized_lifted_oracle(x, y, r, z, pos_margin=0.0, neg_margin=1.0, pos_eps=1e-5, ref_valid=None,
                              self_index=None, weights=None):
    """d_ij as contrastive_l2's (0 within its floor); L_i = LSE_{P_i}(d - pos_margin) +
    LSE_{N_i}(neg_margin - d), an empty set's term 0; l_i = max(0, L_i). dl_i/dS_ij = [L_i > 0]
    softmax_set(logit)_j dlogit/dd dd/dS: -1/d on P, +1/d on N, 0 at d == 0. counts: (|P_i|, |N_i|)."""
    out = _Outputs(x, r, weights)
    for i, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        out.counts[i, 0], out.counts[i, 1] = len(P), len(N)
        total, terms = 0.0, []
        for cols, sign, offset in ((P, 1.0, -pos_margin), (N, -1.0, neg_margin)):
            if not cols:
                continue
            d = {j: l2_distance(s[j]) for j in cols}
            logit = {j: sign * d[j] + offset for j in cols}
            top = max(logit.values())
            lse = top + math.log(sum(math.exp(v - top) for v in logit.values()))
            total += lse
            terms.append((d, logit, lse, sign))
        if total <= 0.0:
            continue
        out.rows[i] = total
        for d, logit, lse, sign in terms:
            for j in d:
                if d[j] > 0:  # dl/dS = softmax_j * sign * (-1/d)
                    out.add(i, j, -sign * math.exp(logit[j] - lse) / d[j])
    return out.result()


SIN2_ZERO = 2.0 ** -16  # 1 - S^2 at or below it: sin(theta) = 0 (CONTRACT.md section 1, tuplet_margin)


def tuplet_margin_oracle(x, y, r, z, margin=5.73, scale=64.0, pos_eps=1e-5, ref_valid=None, self_index=None,
                         weights=None):
    """Per positive pair (i, p): log(1 + sum_{n in N_i} exp(scale (S_in - t_ip))), t_ip =
    cos(acos(S_ip) - m), m = margin in radians; dt/dS = sin(theta - m) / sin(theta) (acos' chain
    rule). Where 1 - S^2 <= SIN2_ZERO: sin(theta) = 0, t = S cos m and dt/dS = cos m."""
    out = _Outputs(x, r, weights)
    rows, counts = out.rows, out.counts
    m = math.radians(margin)
    for i, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        counts[i, 0], counts[i, 1] = len(P), len(N)
        if not P or not N:
            continue
        coef = {j: 0.0 for j in P + N}  # dl_i/dS_ij, summed over the pairs
        for p in P:
            if (1.0 - s[p]) * (1.0 + s[p]) > SIN2_ZERO:
                theta = math.acos(s[p])
                t, slope = math.cos(theta - m), math.sin(theta - m) / math.sin(theta)
            else:
                t, slope = s[p] * math.cos(m), math.cos(m)
            logits = [scale * (s[n] - t) for n in N]
            top = max(max(logits), 0.0)
            total = math.exp(-top) + sum(math.exp(v - top) for v in logits)  # (1 + sum exp) / e^top
            rows[i] += top + math.log(total)
            for n, v in zip(N, logits):  # d/dS_in: scale softmax_n; d/dt: -scale sum_n softmax_n
                share = math.exp(v - top) / total
                coef[n] += scale * share
                coef[p] -= scale * share * slope
        for j, c in coef.items():
            out.add(i, j, c)
    return out.result()


def margin_oracle(x, y, r, z, margin=0.2, beta=1.2, pos_eps=1e-5, ref_valid=None, self_index=None, weights=None):
    """Every triplet (p in P_i, n in N_i) of the anchor, d = contrastive_l2's distance: loss
    max(0, d_ip - beta + margin) + max(0, beta - d_in + margin); counts: the triplets with a
    non-zero positive term, those with a non-zero negative term. dl/dS_ip = -1/d_ip per triplet
    whose positive term is non-zero, dl/dS_in = +1/d_in per triplet whose negative term is (0 at
    d = 0). One anchor at a time (its P_i x N_i triplets as a float64 matrix)."""
    out = _Outputs(x, r, weights)
    rows, counts = out.rows, out.counts
    for i, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        if not P or not N:
            continue
        dp = torch.tensor([l2_distance(s[j]) for j in P], dtype=torch.float64)
        dn = torch.tensor([l2_distance(s[j]) for j in N], dtype=torch.float64)
        pos_term = (dp[:, None] - beta + margin).expand(len(P), len(N)).clamp_min(0)
        neg_term = (beta - dn[None, :] + margin).expand(len(P), len(N)).clamp_min(0)
        rows[i] = float((pos_term + neg_term).sum())
        counts[i, 0], counts[i, 1] = int((pos_term > 0).sum()), int((neg_term > 0).sum())
        for k, j in enumerate(P):
            if dp[k] > 0:
                out.add(i, j, -float((pos_term[k] > 0).sum()) / float(dp[k]))
        for k, j in enumerate(N):
            if dn[k] > 0:
                out.add(i, j, float((neg_term[:, k] > 0).sum()) / float(dn[k]))
    return out.result()


def nca_oracle(x, y, r, z, scale=1.0, pos_eps=1e-5, ref_valid=None, self_index=None, weights=None):
    """l_i = log sum_{V_i} exp(a_ij) - log sum_{P_i} exp(a_ij), a = 2 scale S; 0 when P_i is empty.
    dl_i/dS_ij = 2 scale (softmax_V(a)_j - [j in P_i] softmax_P(a)_j)."""
    out = _Outputs(x, r, weights)
    rows, counts = out.rows, out.counts
    n = r.shape[0] if ref_valid is None else ref_valid
    si = [-1] * x.shape[0] if self_index is None else [int(v) for v in self_index.cpu()]
    for i, s, P, N in _sets(x, y, r, z, pos_eps, ref_valid, self_index):
        if not P:
            continue
        V = [j for j in range(n) if j != si[i]]
        a = {j: 2.0 * scale * s[j] for j in V}
        lse = {}
        for name, cols in (("V", V), ("P", P)):
            top = max(a[j] for j in cols)
            lse[name] = top + math.log(sum(math.exp(a[j] - top) for j in cols))
        rows[i] = lse["V"] - lse["P"]
        positives = set(P)
        for j in V:
            c = math.exp(a[j] - lse["V"]) - (math.exp(a[j] - lse["P"]) if j in positives else 0.0)
            out.add(i, j, 2.0 * scale * c)
        counts[i, 0], counts[i, 1] = len(P), len(N)
    return out.result()


# --------------------------------------------------------------------------- lookup


def oracle_for(loss):
    """The oracle of a registry loss: `<loss>_oracle` in this module."""
    return globals()[f"{loss}_oracle"]


def evaluate(loss, params, x, y, r, z, ref_valid=None, self_index=None, weights=None):
    """(rows, grad_x, grad_ref, counts) in float64 of sum_i w_i l_i, on the inputs as given
    (16-bit inputs are the rounded values: the oracle upcasts them exactly)."""
    return oracle_for(loss)(x.cpu(), y.cpu(), r.cpu(), z.cpu(), **params, ref_valid=ref_valid,
                            self_index=None if self_index is None else self_index.cpu(), weights=weights)


# --------------------------------------------------------------------------- decision boundaries
#
# Test data stays away from every decision a loss makes, so that a comparison tests the code
# and not a rounding that flips a set (CONTRACT.md section 6). Each loss declares its
# boundaries in `<loss>_boundaries(S, pos, neg, params)`: S (B, n) float64 similarities of
# the valid columns, pos / neg the masks of P_i and N_i. It returns two 1-D tensors of
# distances to a flip point: `fixed` (a threshold that does not move with the data: a margin)
# and `moving` (a boundary set by other pairs of the row: the mining rule against the hardest
# pair, near-ties of the hardest pair). decision_gap() adds the threshold every loss has,
# S = 1 - pos_eps on same-label columns, and measures both in units of their gap.

FIXED_GAP = 1e-3     # CONTRACT.md section 6
MOVING_GAP = 2e-5    # far above fp32 rounding of S (~1e-7), yet drawable with thousands of pairs per row;
                     # a tenth of it beyond 2000 columns (the GPU sizes: near-ties of 2e-5 are certain there)
_NONE = torch.zeros(0, dtype=torch.float64)


# The "moved" parameter set (cases.variants) of a loss whose fixed thresholds the generic rule
# would put among the data's similarities (tight classes put S near multiples of 1/7): the
# thresholds sit halfway between two multiples instead.
contrastive_moved = dict(margin=1.5 / 7)
# contrastive_l2: d = sqrt(0.05) (S = 0.975) on positives and S = 2.5/7 on negatives
contrastive_l2_moved = dict(pos_margin=0.05 ** 0.5, neg_margin=(2 * (1 - 2.5 / 7)) ** 0.5)
L2_ACTIVE_MIN = 0.02  # an active contrastive_l2 pair keeps 1 - S >= this (d >= 0.2): see below


def contrastive_boundaries(S, pos, neg, p):
    return (S - p["margin"]).abs()[neg], _NONE


def contrastive_l2_boundaries(S, pos, neg, p):
    """d = pos_margin at S = 1 - pos_margin^2 / 2 on P; d = neg_margin on N (never, when
    neg_margin <= 0: the switched-off term). And a conditioning bound: an active pair's
    gradient 1/d magnifies the rounding of S by 1/d^2, so active pairs keep 1 - S >=
    L2_ACTIVE_MIN (as a distance that is below FIXED_GAP exactly when they do not)."""
    fixed = [(S - (1 - p["pos_margin"] ** 2 / 2)).abs()[pos]]
    if p["neg_margin"] > 0:
        fixed.append((S - (1 - p["neg_margin"] ** 2 / 2)).abs()[neg])
    d = (2 - 2 * S).clamp_min(0).sqrt()
    active = (pos & (d > p["pos_margin"])) | (neg & (d < p["neg_margin"]))
    fixed.append((1 - S - L2_ACTIVE_MIN + FIXED_GAP).clamp_min(0)[active])
    return torch.cat(fixed), _NONE


def _extremes(S, pos, neg):
    inf = torch.tensor(math.inf, dtype=S.dtype)
    has = pos.any(1) & neg.any(1)
    return torch.where(pos, S, inf).min(1).values, torch.where(neg, S, -inf).max(1).values, has


def multi_similarity_boundaries(S, pos, neg, p):
    if not p["mine"] or S.shape[1] == 0:
        return _NONE, _NONE
    min_pos, max_neg, has = _extremes(S, pos, neg)
    mm = p["mining_margin"]
    moving = torch.cat([(S - mm - max_neg[:, None]).abs()[pos & has[:, None]],
                        (S + mm - min_pos[:, None]).abs()[neg & has[:, None]]])
    return _NONE, moving


def triplet_boundaries(S, pos, neg, p):
    """The hinge against 0, and near-ties of the hardest positive and negative (exact ties
    are the subject of tests/test_triplet_rules.py)."""
    if S.shape[1] < 2:
        return _NONE, _NONE
    inf = torch.tensor(math.inf, dtype=S.dtype)
    ps = torch.where(pos, S, inf).topk(2, dim=1, largest=False).values
    ns = torch.where(neg, -S, inf).topk(2, dim=1, largest=False).values
    has = pos.any(1) & neg.any(1)
    hinge = (-ns[:, 0] - ps[:, 0] + p["margin"]).abs()[has]
    ties = torch.cat([(ps[:, 1] - ps[:, 0])[has], (ns[:, 1] - ns[:, 0])[has]])
    return hinge, ties[torch.isfinite(ties)]


def supcon_boundaries(S, pos, neg, p):
    return _NONE, _NONE  # smooth in S: only the sets themselves


def ntxent_boundaries(S, pos, neg, p):
    return _NONE, _NONE


# triplet_all: S_ip - S_in clusters near multiples of 1/7 on tight classes; the thresholds sit halfway
triplet_all_moved = dict(margin=3.5 / 7, select_low=-0.5 / 7, select_high=2.5 / 7)


def triplet_all_boundaries(S, pos, neg, p):
    """The hinge and the selection bounds against u = S_ip - S_in, every triplet of every
    anchor (one anchor at a time: B x P x N would not fit). A bound on a difference of two of the
    row's similarities, as multi_similarity's mining rule: moving."""
    out = []
    bounds = [t for t in (p["margin"], p["select_low"], p["select_high"]) if abs(t) < 2.5]  # +-3: no bound
    for i in range(S.shape[0]):
        u = (S[i][pos[i]][:, None] - S[i][neg[i]][None, :]).reshape(-1)
        if u.numel():
            out += [(u - t).abs().min().reshape(1) for t in bounds]  # each anchor's closest triplet
    return _NONE, (torch.cat(out) if out else _NONE)


def circle_boundaries(S, pos, neg, p):
    return _NONE, _NONE  # continuous in S: the [.]_+ factors reach 0 with their terms' slopes


# generalized_lifted: margins a quarter of the way to the range's bounds would put every row below the
# hinge (L = LSE_P(d) - 8 + LSE_N(-d) - 7.25); these put the in-batch case's rows on both sides of it
# (each LSE grows with the log of its set's size: the other cases' rows fall on one side;
# test_generalized_lifted_rules.py places the hinge in every backend's rows)
generalized_lifted_moved = dict(pos_margin=3.0, neg_margin=-0.25)


def generalized_lifted_boundaries(S, pos, neg, p):
    """The hinge max(0, L_i) at L_i = 0, L_i a sum over the whole row (moving, as a mining
    rule), and contrastive_l2's conditioning bound: every pair of a set carries a gradient
    softmax / d, so the pairs keep 1 - S >= L2_ACTIVE_MIN (copies at d = 0 are judged apart)."""
    if S.shape[1] == 0:
        return _NONE, _NONE
    t = 2 - 2 * S
    d = torch.where(t > L2_ZERO, t.clamp_min(0).sqrt(), torch.zeros_like(t))
    ninf = torch.tensor(-math.inf, dtype=S.dtype)
    lse = lambda a, m: torch.where(m.any(1), torch.where(m, a, ninf).logsumexp(1), torch.zeros_like(a[:, 0]))  # noqa: E731
    total = lse(d - p["pos_margin"], pos) + lse(p["neg_margin"] - d, neg)
    fixed = (1 - S - L2_ACTIVE_MIN + FIXED_GAP).clamp_min(0)[pos | neg]
    return fixed, total.abs()[pos.any(1) | neg.any(1)]


TUPLET_POS_MIN = 0.02  # a tuplet_margin positive keeps 1 - |S| >= this: see below


def tuplet_margin_boundaries(S, pos, neg, p):
    """A conditioning bound: a positive's slope cos m - S sin m / sin(theta) magnifies the
    rounding of S by about sin m / sin(theta)^3, so positives keep 1 - |S| >= TUPLET_POS_MIN
    (as a distance that is below FIXED_GAP exactly when they do not); the exact copies of the
    pos_eps < 0 variant (S = 1, sin(theta) = 0 by the contract's floor) are judged apart."""
    return (1 - S.abs() - TUPLET_POS_MIN + FIXED_GAP).clamp_min(0)[pos], _NONE


def _margin_at(s_pos, s_neg):
    """margin's (margin, beta) whose thresholds d = beta -+ margin sit at S = s_pos on positives and
    S = s_neg on negatives (d = sqrt(2 - 2S))."""
    dp, dn = (2 * (1 - s_pos)) ** 0.5, (2 * (1 - s_neg)) ** 0.5
    return dict(margin=(dn - dp) / 2, beta=(dn + dp) / 2)


# margin: PML's defaults (0.2, 1.2) put the negatives' threshold d = 1.4 at S = 0.02, among the
# near-orthogonal rows of other classes (S near 0): the tests' "defaults" are the nearest
# thresholds halfway between multiples of 1/7 (S = 3.5/7 as PML's, and -0.5/7: 0.232, 1.232);
# the moved set puts them at S = 2.5/7 and -1.5/7
margin_defaults = _margin_at(3.5 / 7, -0.5 / 7)
margin_moved = _margin_at(2.5 / 7, -1.5 / 7)


def margin_boundaries(S, pos, neg, p):
    """contrastive_l2's, with pos_margin = beta - margin and neg_margin = beta + margin (a
    triplet's terms are its two pairs' contrastive_l2 terms; |P_i| and |N_i| are set sizes)."""
    return contrastive_l2_boundaries(S, pos, neg, dict(pos_margin=p["beta"] - p["margin"],
                                                       neg_margin=p["beta"] + p["margin"]))


# nca: a sharper softmax than the generic 1.5 x the default (logits 2 scale S spanning 20, as supcon's
# default temperature)
nca_moved = dict(scale=5.0)


def nca_boundaries(S, pos, neg, p):
    return _NONE, _NONE  # smooth in S: only the sets themselves


def decision_gap(loss, params, x, y, r, z, ref_valid=None, self_index=None, copies=()):
    """The smallest distance of a decision of `loss` to its flip point, in units of its gap
    (FIXED_GAP or MOVING_GAP): data with decision_gap > 1 is away from every threshold.
    `copies` lists (anchor, column) pairs holding an exact copy of the anchor (S = 1 up to
    rounding, not excluded by self_index): they sit on the threshold S = 1 by design and are
    judged by the rule for duplicates instead (CONTRACT.md section 1)."""
    n = r.shape[0] if ref_valid is None else ref_valid
    S = x.detach().double().cpu() @ r[:n].detach().double().cpu().T
    B = S.shape[0]
    if S.numel() == 0:
        return math.inf
    cols = torch.arange(n)
    valid = torch.ones(B, n, dtype=torch.bool)
    if self_index is not None:
        valid &= cols[None, :] != self_index.cpu()[:, None]
    same = y.cpu()[:, None].long() == z.cpu()[None, :n].long()
    pos = valid & same & (S < 1 - params["pos_eps"])
    neg = valid & ~same
    judged = torch.ones(B, n, dtype=torch.bool)
    for i, j in copies:
        if j < n:
            judged[i, j] = False
    boundaries = globals()[f"{loss}_boundaries"]
    _, moving = boundaries(S, pos, neg, params)
    fixed, _ = boundaries(S, pos & judged, neg & judged, params)  # the copies' pairs left out
    fixed_all = [(S - (1 - params["pos_eps"])).abs()[valid & same & judged], fixed]
    gaps = [float(t.min()) / FIXED_GAP for t in fixed_all if t.numel()]
    moving_gap = MOVING_GAP if n <= 2000 else MOVING_GAP / 10
    gaps += [float(moving.min()) / moving_gap] if moving.numel() else []
    return min(gaps, default=math.inf)
