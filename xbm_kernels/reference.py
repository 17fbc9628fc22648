"""The `reference` backend: dense, readable PyTorch, differentiable by autograd.

It builds the full B x N similarity matrix and boolean masks, exactly as CONTRACT.md
section 1 writes the math. It is the backend the fused kernels are tested against and a
fallback on any device; it is slow and memory-hungry for large memories by design.

Every function returns (loss_rows (B,) float32, counts (B, 2) int32) where counts holds
the active positive / negative pairs per anchor.
"""
import math

import torch


def normalize_rows(x):
    """L2-normalised rows (a zero row stays zero, as F.normalize), computed in fp32 for 16-bit
    rows, whose squared norm can overflow; returned in fp32 for them, else in x's dtype."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.nn.functional.normalize(x.float(), dim=1)
    return torch.nn.functional.normalize(x, dim=1)


def similarity(x, ref):
    """S = X R^T accumulated in fp32 (float64 when an input is float64), returned as float32
    or float64: 16-bit inputs are multiplied as fp32 values, never rounded to 16 bits on the
    way (CONTRACT.md section 5), so set membership is decided on the fp32 similarity."""
    dtype = torch.float64 if torch.float64 in (x.dtype, ref.dtype) else torch.float32
    S = x.to(dtype) @ ref.to(dtype).T
    return S if dtype == torch.float64 else S.float()


def pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps):
    """Boolean (B, N) masks of the positive set P and the negative set N."""
    B, N = S.shape
    cols = torch.arange(N, device=S.device)
    valid = (cols < ref_valid).expand(B, N)
    if self_index is not None:
        valid = valid & (cols[None, :] != self_index[:, None])
    same = labels[:, None] == ref_labels[None, :]
    pos = valid & same & (S < 1.0 - pos_eps)
    neg = valid & ~same
    return pos, neg


def contrastive(x, labels, ref, ref_labels, *, margin, pos_eps, ref_valid, self_index):
    S = similarity(x, ref)
    pos, neg = pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps)
    hard_neg = neg & (S > margin)
    zero = S.new_zeros(())
    rows = torch.where(pos, 1.0 - S, zero).sum(1) + torch.where(hard_neg, S, zero).sum(1)
    counts = torch.stack([pos.sum(1), hard_neg.sum(1)], dim=1).to(torch.int32)
    return rows, counts


# 2 - 2S at or below this counts as d = 0 (CONTRACT.md section 1, contrastive_l2): a unit row's
# similarity with its own copy comes out of fp32 accumulation a few ulp from 1, on either side.
L2_ZERO = 2.0 ** -16


def _l2_distance(S):
    """d = sqrt(2 - 2 S) for 2 - 2S > L2_ZERO, else 0: the L2 distance of unit rows, with
    gradient 0 where d == 0 (as torch.cdist's backward): sqrt's derivative there is infinite,
    so the square root only ever sees the entries above the floor."""
    t = 2.0 - 2.0 * S
    positive = t > L2_ZERO
    return torch.where(positive, torch.sqrt(torch.where(positive, t, torch.ones_like(t))), torch.zeros_like(t))


def contrastive_l2(x, labels, ref, ref_labels, *, pos_margin, neg_margin, pos_eps, ref_valid, self_index):
    """pytorch-metric-learning's default ContrastiveLoss on unit rows, summed per anchor:
    l_i = sum_{P_i} max(0, d_ij - pos_margin) + sum_{N_i} max(0, neg_margin - d_ij)."""
    S = similarity(x, ref)
    pos, neg = pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps)
    d = _l2_distance(S)
    active_pos = pos & (d > pos_margin)
    active_neg = neg & (d < neg_margin)
    zero = S.new_zeros(())
    rows = torch.where(active_pos, d - pos_margin, zero).sum(1) + torch.where(active_neg, neg_margin - d, zero).sum(1)
    counts = torch.stack([active_pos.sum(1), active_neg.sum(1)], dim=1).to(torch.int32)
    return rows, counts


def _valid_mask(B, N, device, ref_valid, self_index):
    cols = torch.arange(N, device=device)
    valid = (cols < ref_valid).expand(B, N)
    if self_index is not None:
        valid = valid & (cols[None, :] != self_index[:, None])
    return valid


def _masked_logsumexp(a, mask):
    """log sum_{mask} exp(a) per row; -inf for an empty row (gradient 0 there). Written as
    top + log sum exp(a - top), top the row's largest member (a constant): its gradient is then
    exp(a - top) / sum, where torch.logsumexp's is exp(a - LSE), which costs the rounding of an
    LSE of several hundred (tuplet_margin's scale) in every weight."""
    masked = torch.where(mask, a, a.new_tensor(float("-inf")))
    has = mask.any(1, keepdim=True)
    masked = torch.where(has, masked, a.new_zeros(()))  # no all -inf rows
    top = masked.amax(1, keepdim=True).detach() if a.shape[1] else a.new_zeros(a.shape[0], 1)
    lse = top[:, 0] + torch.log(torch.exp(masked - top).sum(1))
    return torch.where(has[:, 0], lse, a.new_tensor(float("-inf")))


def _log1p_sum_exp(a, mask):
    """log(1 + sum_{mask} exp(a)) per row, stable for large a."""
    masked = torch.where(mask, a, a.new_tensor(float("-inf")))
    return torch.logsumexp(torch.cat([a.new_zeros(a.shape[0], 1), masked], dim=1), dim=1)


def _pad_empty(S, pos, neg):
    """An empty reference set (N = 0) gets one column that is in no set, so that the row
    minima / maxima below are defined; every row's loss is then 0."""
    if S.shape[1] > 0:
        return S, pos, neg
    pad = lambda t, v: torch.cat([t, t.new_full((t.shape[0], 1), v)], dim=1)
    return pad(S, 0.0), pad(pos, False), pad(neg, False)


def multi_similarity(x, labels, ref, ref_labels, *, alpha, beta, base, mining_margin, pos_eps, ref_valid,
                     self_index, mine=True, skip_incomplete=True):
    """mine: keep only the pairs that pass the mining rule (else P~ = P, N~ = N).
    skip_incomplete: the paper code's rule, l_i = 0 unless P, N, P~ and N~ are all
    non-empty; else (pytorch-metric-learning's rule) each term is 0 only when its own
    mined set is empty."""
    S = similarity(x, ref)
    pos, neg = pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps)
    S, pos, neg = _pad_empty(S, pos, neg)
    if mine:
        inf = S.new_tensor(float("inf"))
        min_pos = torch.where(pos, S, inf).min(1).values.detach()   # mined-set membership is
        max_neg = torch.where(neg, S, -inf).max(1).values.detach()  # a constant for the gradient
        pos_m = pos & (S - mining_margin < max_neg[:, None])
        neg_m = neg & (S + mining_margin > min_pos[:, None])
    else:
        pos_m, neg_m = pos, neg
    pos_term = _log1p_sum_exp(-alpha * (S - base), pos_m) / alpha   # 0 when the set is empty
    neg_term = _log1p_sum_exp(beta * (S - base), neg_m) / beta
    rows = pos_term + neg_term
    counts = torch.stack([pos_m.sum(1), neg_m.sum(1)], dim=1)
    if skip_incomplete:
        active = pos.any(1) & neg.any(1) & pos_m.any(1) & neg_m.any(1)
        rows = torch.where(active, rows, S.new_zeros(()))
        counts = counts * active[:, None]
    return rows, counts.to(torch.int32)


def _first_index(mask):
    """Index of the first True per row (lowest column on ties)."""
    return mask.to(torch.uint8).argmax(1)


def triplet(x, labels, ref, ref_labels, *, margin, pos_eps, ref_valid, self_index):
    S = similarity(x, ref)
    pos, neg = pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps)
    S, pos, neg = _pad_empty(S, pos, neg)
    inf = S.new_tensor(float("inf"))
    hardest_pos = torch.where(pos, S, inf).min(1, keepdim=True).values
    hardest_neg = torch.where(neg, S, -inf).max(1, keepdim=True).values
    ap = _first_index(pos & (S == hardest_pos))
    an = _first_index(neg & (S == hardest_neg))
    rows_idx = torch.arange(S.shape[0], device=S.device)
    hinge = torch.relu(S[rows_idx, an] - S[rows_idx, ap] + margin)
    rows = torch.where(pos.any(1) & neg.any(1), hinge, S.new_zeros(()))
    active = (rows > 0).to(torch.int32)
    return rows, torch.stack([active, active], dim=1)


def supcon(x, labels, ref, ref_labels, *, temperature, pos_eps, ref_valid, self_index):
    S = similarity(x, ref)
    pos, neg = pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps)
    valid = _valid_mask(S.shape[0], S.shape[1], S.device, ref_valid, self_index)
    has_valid = valid.any(1, keepdim=True)
    logits = torch.where(valid, S / temperature, S.new_tensor(float("-inf")))
    logits = torch.where(has_valid, logits, S.new_zeros(()))  # no -inf rows
    # log(sum exp(logits - m)) + (m - mean_P logits), m the row's largest valid logit: no
    # cancellation of two large terms, and >= 0 (CONTRACT.md section 1, supcon)
    m = logits.amax(1, keepdim=True).detach() if logits.shape[1] else logits.new_zeros(logits.shape[0], 1)
    log_s = torch.logsumexp(logits - m, dim=1)
    n_pos = pos.sum(1)
    mean_pos = torch.where(pos, logits, S.new_zeros(())).sum(1) / n_pos.clamp_min(1)
    has_pos = n_pos > 0
    rows = torch.where(has_pos, (log_s + (m[:, 0] - mean_pos)).clamp_min(0.0), S.new_zeros(()))
    counts = torch.stack([n_pos, neg.sum(1)], dim=1) * has_pos[:, None]
    return rows, counts.to(torch.int32)


def ntxent(x, labels, ref, ref_labels, *, temperature, pos_eps, ref_valid, self_index):
    """NT-Xent per positive pair: l_i = sum_{p in P_i} softplus(LZ_i - S_ip / tau) with
    LZ_i = log sum_{n in N_i} exp(S_in / tau); 0 for a pair when N_i is empty."""
    S = similarity(x, ref)
    pos, neg = pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps)
    logits = S / temperature
    lz = _masked_logsumexp(logits, neg)[:, None]  # -inf without negatives: softplus(-inf) = 0, gradient 0
    rows = torch.where(pos, torch.nn.functional.softplus(lz - logits), logits.new_zeros(())).sum(1)
    counts = torch.stack([pos.sum(1), neg.sum(1)], dim=1)
    return rows, counts.to(torch.int32)


def _circle_terms(S, pos, neg, m, gamma):
    """(L, logits, slopes, lse_p, lse_n, both) of the circle loss from S: L = LSE_P lp + LSE_N ln
    (0 where P or N is empty), the logits lp / ln on P / N and their slopes k (dlogit/dS with
    the [.]_+ factor held constant)."""
    k = torch.where(pos, -gamma * torch.relu(1.0 + m - S), gamma * torch.relu(S + m))
    logits = k * torch.where(pos, S - (1.0 - m), S - m)
    lse_p, lse_n = _masked_logsumexp(logits, pos), _masked_logsumexp(logits, neg)
    both = pos.any(1) & neg.any(1)
    return torch.where(both, lse_p + lse_n, S.new_zeros(())), logits, k, lse_p, lse_n, both


class _CircleRows(torch.autograd.Function):
    """Circle loss rows from S. Its gradient treats the [.]_+ factors as constants, so it is not
    the derivative of the rows; the backward is written in differentiable ops of S, so that a
    second derivative differentiates that gradient as a function of S."""

    @staticmethod
    def forward(ctx, S, pos, neg, m, gamma):
        ctx.save_for_backward(S, pos, neg)
        ctx.m, ctx.gamma = m, gamma
        L, _, _, _, _, both = _circle_terms(S, pos, neg, m, gamma)
        return torch.where(both, torch.nn.functional.softplus(L), S.new_zeros(()))

    @staticmethod
    def backward(ctx, grad_rows):
        S, pos, neg = ctx.saved_tensors
        L, logits, k, _, _, both = _circle_terms(S, pos, neg, ctx.m, ctx.gamma)

        def set_softmax(mask):
            # torch.softmax subtracts the row's max: exp(logit - LSE) would cost the rounding of an
            # LSE of several hundred (gamma 256) in every weight; rows without members give 0
            t = torch.where(mask, logits, S.new_tensor(float("-inf")))
            t = torch.where(mask.any(1, keepdim=True), t, S.new_zeros(()))
            return torch.where(mask, torch.softmax(t, dim=1), S.new_zeros(()))

        softmax = set_softmax(pos & both[:, None]) + set_softmax(neg & both[:, None])
        weight = torch.where(both, grad_rows * torch.sigmoid(L), S.new_zeros(()))
        return weight[:, None] * softmax * k, None, None, None, None


def circle(x, labels, ref, ref_labels, *, m, gamma, pos_eps, ref_valid, self_index):
    """Circle loss (Sun et al. 2020), pair form: l_i = softplus(LSE_{P_i} lp + LSE_{N_i} ln),
    lp = -gamma [1 + m - S]_+ (S - (1 - m)), ln = gamma [S + m]_+ (S - m), the [.]_+ factors
    constants for the gradient; 0 when P_i or N_i is empty."""
    S = similarity(x, ref)
    pos, neg = pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps)
    rows = _CircleRows.apply(S, pos, neg, m, gamma)
    counts = torch.stack([pos.sum(1), neg.sum(1)], dim=1)
    return rows, counts.to(torch.int32)


def triplet_all(x, labels, ref, ref_labels, *, margin, select_low, select_high, pos_eps, ref_valid, self_index):
    """Every triplet (i, p, n), p in P_i, n in N_i, with select_low < u <= select_high for
    u = S_ip - S_in, loss max(0, S_in - S_ip + margin); counts: the selected triplets with a
    non-zero loss, twice. One anchor at a time (its P_i x N_i triplets; B x N x N would not fit)."""
    S = similarity(x, ref)
    pos, neg = pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps)
    rows, active = [], []
    for i in range(S.shape[0]):
        sp, sn = S[i][pos[i]], S[i][neg[i]]
        u = sp[:, None] - sn[None, :]
        selected = (u > select_low) & (u <= select_high)
        hinge = torch.where(selected, torch.relu((sn[None, :] - sp[:, None]) + margin), S.new_zeros(()))
        rows.append(hinge.sum())
        active.append((hinge > 0).sum())
    if not rows:  # no anchors: an empty row vector still tied to the inputs
        return S.sum(1), torch.zeros(0, 2, dtype=torch.int32, device=S.device)
    active = torch.stack(active).clamp_max(2 ** 31 - 1)  # int32 counts saturate, as the kernels'
    return torch.stack(rows), torch.stack([active, active], dim=1).to(torch.int32)


def generalized_lifted(x, labels, ref, ref_labels, *, pos_margin, neg_margin, pos_eps, ref_valid, self_index):
    """pytorch-metric-learning's GeneralizedLiftedStructureLoss on unit rows: l_i =
    max(0, LSE_{P_i}(d - pos_margin) + LSE_{N_i}(neg_margin - d)), an empty set's LSE 0, d the
    L2 distance of unit rows (0, with gradient 0, within contrastive_l2's floor)."""
    S = similarity(x, ref)
    pos, neg = pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps)
    d = _l2_distance(S)
    zero = S.new_zeros(())
    lse_p = torch.where(pos.any(1), _masked_logsumexp(d - pos_margin, pos), zero)
    lse_n = torch.where(neg.any(1), _masked_logsumexp(neg_margin - d, neg), zero)
    rows = torch.relu(lse_p + lse_n)
    counts = torch.stack([pos.sum(1), neg.sum(1)], dim=1)
    return rows, counts.to(torch.int32)


# 1 - S^2 at or below this: sin(theta) counts as 0 (CONTRACT.md section 1, tuplet_margin): S
# within 7.6e-6 of +-1, where acos' gradient is infinite and an exact copy's fp32 S lands on
# either side of 1.
SIN2_ZERO = 2.0 ** -16


def _cos_minus_margin(S, margin):
    """cos(acos(S) - margin) = S cos(margin) + sin(theta) sin(margin), sin(theta) = sqrt((1 - S)
    (1 + S)) where that product exceeds SIN2_ZERO, else 0 with gradient 0; margin in radians."""
    t = (1.0 - S) * (1.0 + S)
    above = t > SIN2_ZERO
    sin = torch.where(above, torch.sqrt(torch.where(above, t, torch.ones_like(t))), torch.zeros_like(t))
    return S * math.cos(margin) + sin * math.sin(margin)


def tuplet_margin(x, labels, ref, ref_labels, *, margin, scale, pos_eps, ref_valid, self_index):
    """Tuplet margin loss per positive pair: l_i = sum_{p in P_i} softplus(LZ_i - scale
    cos(acos(S_ip) - margin)), LZ_i = log sum_{n in N_i} exp(scale S_in), margin in degrees; 0
    for a pair when N_i is empty (ntxent's form with the positive's logit transformed)."""
    S = similarity(x, ref)
    pos, neg = pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps)
    lz = _masked_logsumexp(scale * S, neg)[:, None]  # -inf without negatives: softplus(-inf) = 0, gradient 0
    pos_logit = scale * _cos_minus_margin(S, math.radians(margin))
    rows = torch.where(pos, torch.nn.functional.softplus(lz - pos_logit), S.new_zeros(())).sum(1)
    counts = torch.stack([pos.sum(1), neg.sum(1)], dim=1)
    return rows, counts.to(torch.int32)


def margin(x, labels, ref, ref_labels, *, margin, beta, pos_eps, ref_valid, self_index):
    """pytorch-metric-learning's MarginLoss over every triplet (i, p, n), p in P_i, n in N_i, on
    the L2 distance of unit rows (contrastive_l2's d): each triplet's loss max(0, d_ip - beta +
    margin) + max(0, beta - d_in + margin) depends on one pair per term, so the row factors into
    |N_i| sum_{P_i} max(0, d - (beta - margin)) + |P_i| sum_{N_i} max(0, beta + margin - d).
    counts: (|N_i| x active positives, |P_i| x active negatives), the triplets with a non-zero
    positive / negative term, saturating at the int32 limit as the kernels'."""
    S = similarity(x, ref)
    pos, neg = pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps)
    d = _l2_distance(S)
    active_pos = pos & (d > beta - margin)
    active_neg = neg & (d < beta + margin)
    zero = S.new_zeros(())
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    rows = n_neg.to(S.dtype) * torch.where(active_pos, d - (beta - margin), zero).sum(1) \
        + n_pos.to(S.dtype) * torch.where(active_neg, (beta + margin) - d, zero).sum(1)
    counts = torch.stack([n_neg * active_pos.sum(1), n_pos * active_neg.sum(1)], dim=1)
    return rows, counts.clamp_max(2 ** 31 - 1).to(torch.int32)


def nca(x, labels, ref, ref_labels, *, scale, pos_eps, ref_valid, self_index):
    """NCA: minus the log of the softmax mass of the positives, the softmax of 2 scale S over V_i
    (pytorch-metric-learning's -scale d^2 on unit rows, up to a constant that cancels):
    l_i = LSE_{V_i}(2 scale S) - LSE_{P_i}(2 scale S), 0 when P_i is empty. Evaluated as
    softplus(LSE_{V_i \\ P_i} - LSE_{P_i}) (CONTRACT.md section 1): exactly 0, with a zero gradient,
    when P_i = V_i, and no difference of two sums near 1 when the positives hold almost all the mass."""
    S = similarity(x, ref)
    pos, neg = pair_sets(S, labels, ref_labels, ref_valid, self_index, pos_eps)
    valid = _valid_mask(S.shape[0], S.shape[1], S.device, ref_valid, self_index)
    logits = (2.0 * scale) * S
    has_pos = pos.any(1)
    rest = valid & ~pos  # the negatives and the dropped duplicates
    # log R_i = LSE_rest - LSE_P: -inf for an empty rest (softplus 0, gradient 0); rows without
    # positives never reach the subtraction (their LSE_P is -inf)
    zero = S.new_zeros(())
    lse_p = torch.where(has_pos, _masked_logsumexp(logits, pos), zero)
    log_r = torch.where(has_pos, _masked_logsumexp(logits, rest) - lse_p, zero)
    rows = torch.where(has_pos, torch.nn.functional.softplus(log_r), zero)
    counts = torch.stack([pos.sum(1), neg.sum(1)], dim=1) * has_pos[:, None]
    return rows, counts.to(torch.int32)
