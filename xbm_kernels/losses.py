"""Public loss functions. Each validates its arguments, picks a backend, then runs either
the dense reference (autograd through the formula) or a fused kernel through the thin
autograd Function below. DESIGN.md section 1 is the math."""
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

from . import _validate as V
from . import backends, reference


@dataclass(frozen=True)
class LossSpec:
    name: str
    defaults: Dict[str, float]          # loss parameters in schema order, with defaults
    reference: Callable                 # reference.<loss>
    mean_over_anchors_with_pos: bool = False  # supcon's "mean" divides by #anchors with |P_i| > 0

    def params(self, kwargs):
        out = []
        for key, default in self.defaults.items():
            v = kwargs.get(key, default)
            minimum = 0.0 if key in ("pos_eps",) else None
            if key in ("temperature", "alpha", "beta"):
                v = V.finite_number(key, v)
                if v <= 0:
                    raise ValueError(f"{key}: expected > 0, got {v}")
            else:
                v = V.finite_number(key, v, minimum=minimum)
            out.append(v)
        return tuple(out)


LOSSES: Dict[str, LossSpec] = {
    "contrastive": LossSpec("contrastive", {"margin": 0.5, "pos_eps": 1e-5}, reference.contrastive),
    "multi_similarity": LossSpec("multi_similarity", {"alpha": 2.0, "beta": 40.0, "base": 0.5, "mining_margin": 0.1,
                                                      "pos_eps": 1e-5}, reference.multi_similarity),
    "triplet": LossSpec("triplet", {"margin": 0.1, "pos_eps": 1e-5}, reference.triplet),
    "supcon": LossSpec("supcon", {"temperature": 0.1, "pos_eps": 1e-5}, reference.supcon,
                       mean_over_anchors_with_pos=True),
}


@torch.compiler.assume_constant_result  # a global setting: a constant for tracing
def _allow_tf32():
    return torch.get_float32_matmul_precision() != "highest"


def _mean_denominator(spec, rows, counts):
    if spec.mean_over_anchors_with_pos:
        return (counts[:, 0] > 0).sum().clamp_min(1).to(rows.dtype)
    return rows.new_tensor(float(max(rows.shape[0], 1)))


def _reduce(spec, rows, counts, reduction):
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / _mean_denominator(spec, rows, counts)


class _FusedLoss(torch.autograd.Function):
    """Thin wrapper over <loss>_fwd / <loss>_bwd. When only the anchors need a gradient,
    the forward kernel already produced d(sum loss)/dx and backward just scales it; when
    the reference rows need one too (the in-batch loss), backward calls <loss>_bwd."""

    @staticmethod
    def forward(ctx, x, ref, labels, ref_labels, self_index, ref_valid, reduction, spec, ops, params):
        need_x, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        allow_tf32 = _allow_tf32()
        fwd = getattr(ops, f"{spec.name}_fwd")
        rows, grad, counts = fwd(x, labels, ref, ref_labels, self_index, ref_valid, *params,
                                 need_x and not need_ref, allow_tf32)
        out = _reduce(spec, rows, counts, reduction)
        ctx.mark_non_differentiable(counts)
        ctx.spec, ctx.ops, ctx.params, ctx.reduction = spec, ops, params, reduction
        ctx.ref_valid, ctx.allow_tf32, ctx.x_dtype, ctx.ref_dtype = ref_valid, allow_tf32, x.dtype, ref.dtype
        ctx.fused_grad = need_x and not need_ref
        if ctx.fused_grad:
            ctx.save_for_backward(grad, rows, counts)
        elif need_ref:
            ctx.save_for_backward(x, ref, labels, ref_labels, self_index, rows, counts)
        return out, counts

    @staticmethod
    def backward(ctx, grad_out, _grad_counts):
        if ctx.fused_grad:
            grad, rows, counts = ctx.saved_tensors
        else:
            x, ref, labels, ref_labels, self_index, rows, counts = ctx.saved_tensors
        g = grad_out.float()
        if ctx.reduction == "mean":
            g = g / _mean_denominator(ctx.spec, rows, counts)
        grad_rows = g.expand(rows.shape[0]) if ctx.reduction != "none" else g
        grad_x = grad_ref = None
        if ctx.fused_grad:
            grad_x = (grad * grad_rows[:, None]).to(ctx.x_dtype)
        else:
            bwd = getattr(ctx.ops, f"{ctx.spec.name}_bwd")
            gx, gr = bwd(x, labels, ref, ref_labels, self_index, ctx.ref_valid, *ctx.params,
                         grad_rows.contiguous(), ctx.allow_tf32)
            grad_x = gx.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
            grad_ref = gr.to(ctx.ref_dtype)
        return grad_x, grad_ref, None, None, None, None, None, None, None, None


def compute(loss, embeddings, labels, ref_embeddings, ref_labels, *, ref_valid=None, self_index=None,
            reduction="mean", backend="auto", **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validated entry point shared by the public losses and XBMLoss.
    Returns (loss, counts (B, 2) int32: active positive / negative pairs per anchor)."""
    spec = LOSSES[loss]
    unknown = set(kwargs) - set(spec.defaults)
    if unknown:
        raise TypeError(f"{loss}_loss: unexpected keyword argument(s) {sorted(unknown)}; "
                        f"accepted: {sorted(spec.defaults)}")
    V.tensor("embeddings", embeddings)
    name = backends.resolve(backend, embeddings.device, loss)
    n, self_index = V.loss_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_valid, self_index, reduction,
                                  allow_fp64=(name == "reference"))
    params = spec.params(kwargs)
    if name == "reference":
        si = None if self_index is None else self_index.long()
        rows, counts = spec.reference(embeddings, labels, ref_embeddings, ref_labels, ref_valid=n, self_index=si,
                                      **dict(zip(spec.defaults, params)))
        return _reduce(spec, rows, counts, reduction), counts
    y = labels.to(torch.int32)
    z = ref_labels.to(torch.int32)
    si = None if self_index is None else self_index.to(torch.int64).contiguous()
    return _FusedLoss.apply(embeddings, ref_embeddings, y, z, si, n, reduction, spec, backends.kernel_ops(name),
                            params)


def contrastive_loss(embeddings, labels, ref_embeddings, ref_labels, *, margin=0.5, pos_eps=1e-5, ref_valid=None,
                     self_index=None, reduction="mean", backend="auto"):
    """Contrastive loss of each anchor against a reference set (the memory, or the batch).

    l_i = sum_{j in P_i} (1 - S_ij) + sum_{j in N_i, S_ij > margin} S_ij with S = X R^T,
    positives P_i = same label, valid, not self, S < 1 - pos_eps; negatives N_i = other
    label, valid, not self. Columns j >= ref_valid and j == self_index[i] are ignored.
    reduction: "mean" (sum / B), "sum" or "none" (per-anchor vector, float32).
    """
    return compute("contrastive", embeddings, labels, ref_embeddings, ref_labels, margin=margin, pos_eps=pos_eps,
                   ref_valid=ref_valid, self_index=self_index, reduction=reduction, backend=backend)[0]


def multi_similarity_loss(embeddings, labels, ref_embeddings, ref_labels, *, alpha=2.0, beta=40.0, base=0.5,
                          mining_margin=0.1, pos_eps=1e-5, ref_valid=None, self_index=None, reduction="mean",
                          backend="auto"):
    """Multi-similarity loss (Wang et al. 2019) with the paper code's mining, per anchor:
    P~ = positives with S - mining_margin < hardest negative, N~ = negatives with
    S + mining_margin > hardest positive; l_i = 1/alpha log(1 + sum_P~ exp(-alpha (S - base)))
    + 1/beta log(1 + sum_N~ exp(beta (S - base))), 0 when any of the sets is empty.
    Mined-set membership is a constant for the gradient. reduction "mean" divides by B."""
    return compute("multi_similarity", embeddings, labels, ref_embeddings, ref_labels, alpha=alpha, beta=beta,
                   base=base, mining_margin=mining_margin, pos_eps=pos_eps, ref_valid=ref_valid,
                   self_index=self_index, reduction=reduction, backend=backend)[0]


def triplet_loss(embeddings, labels, ref_embeddings, ref_labels, *, margin=0.1, pos_eps=1e-5, ref_valid=None,
                 self_index=None, reduction="mean", backend="auto"):
    """Batch-hard triplet loss: l_i = max(0, max_N S - min_P S + margin), 0 when P_i or N_i
    is empty; ties pick the lowest column, so the gradient is deterministic."""
    return compute("triplet", embeddings, labels, ref_embeddings, ref_labels, margin=margin, pos_eps=pos_eps,
                   ref_valid=ref_valid, self_index=self_index, reduction=reduction, backend=backend)[0]


def supcon_loss(embeddings, labels, ref_embeddings, ref_labels, *, temperature=0.1, pos_eps=1e-5, ref_valid=None,
                self_index=None, reduction="mean", backend="auto"):
    """Supervised contrastive (InfoNCE) loss over the reference set:
    l_i = -1/|P_i| sum_P [S_ip / tau - log sum_{V_i} exp(S_ia / tau)], 0 when P_i is empty;
    reduction "mean" divides by the number of anchors with positives (at least 1)."""
    return compute("supcon", embeddings, labels, ref_embeddings, ref_labels, temperature=temperature,
                   pos_eps=pos_eps, ref_valid=ref_valid, self_index=self_index, reduction=reduction,
                   backend=backend)[0]
