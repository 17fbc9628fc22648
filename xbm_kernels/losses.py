"""Public loss functions, one per entry of the loss registry (registry.py). Each validates
its arguments, picks a backend, then runs either the dense reference (autograd through the
formula) or a fused kernel through the thin autograd Function below. CONTRACT.md section 1
is the math."""
import inspect
from typing import Tuple

import torch

from . import _validate as V
from . import backends
from .registry import LOSSES, MEAN_OVER, Loss, docstring

def _first_order_only(outputs, inputs, grad_out=None):
    """The gradients `outputs` (one per input of the Function, None for those without one),
    made to raise when they are differentiated with respect to the Function's inputs: the
    fused kernels compute first derivatives only. Each gradient gets + 0 through a node that
    raises when backpropagated, tied to its own input (a scalar of it), so that node lies on
    every path from a gradient penalty back to the inputs: `.backward()`,
    `autograd.grad(..., inputs)`, through a normalisation. Without it the gradients would be
    constants there and a penalty would silently add nothing. With `grad_out` (a backward
    that is not differentiable in the incoming gradient either) the node is tied to it too;
    otherwise the gradients are computed tracked in the incoming gradient, and the
    double-backward trick of torch.autograd.functional.jvp (d grad / d grad_out, first-order
    information) gives the true Jacobian-vector product."""
    if not torch.is_grad_enabled():
        return outputs
    live = [i for i, o in enumerate(outputs) if o is not None]
    if not live:
        return outputs

    def scalar(t):
        return t.reshape(-1)[:1].sum()

    links = [(scalar(inputs[i]) * 0).float() + (0 if grad_out is None else (scalar(grad_out) * 0).float())
             for i in live]
    err = torch._C._functions.DelayedError(
        b"xbm_kernels: the fused kernels compute first derivatives only, so they cannot differentiate twice "
        b"(use backend='reference' for a gradient penalty)", len(links))
    wrapped = err(*links)
    wrapped = iter(wrapped if isinstance(wrapped, tuple) else (wrapped,))
    out = list(outputs)
    for i in live:
        out[i] = outputs[i] + next(wrapped).to(outputs[i].dtype)
    return tuple(out)


@torch.compiler.assume_constant_result  # a global setting: a constant for tracing
def _allow_tf32():
    return torch.get_float32_matmul_precision() != "highest"


COUNT_LIMIT = 2 ** 31 - 1  # counts are int32: an anchor's count saturates here


def active_triplets(counts, loss="triplet_all"):
    """The number of active triplets (int64) from triplet_all's counts (column 0), or for
    loss="margin" the active triplet terms (both columns: positive and negative terms); raises
    where one anchor's count reached the int32 limit, beyond which it saturates and the total
    would be wrong (a value check, so a host sync on a GPU, for these losses' mean only; like the
    other value checks it does not run while torch.compile traces)."""
    c, what = (counts, "triplet terms") if loss == "margin" else (counts[:, :1], "triplets")
    if not torch.compiler.is_compiling() and c.numel() and bool((c >= COUNT_LIMIT).any()):
        raise ValueError(f"{loss}: an anchor has {COUNT_LIMIT} or more active {what}, past the int32 count "
                         f"the op returns, so the mean over active {what} cannot be formed; use reduction='sum'")
    return c.sum()


def _mean_denominator(spec: Loss, rows, counts):
    if spec.mean_over == "anchors_with_positives":
        return (counts[:, 0] > 0).sum().clamp_min(1).to(rows.dtype)
    if spec.mean_over == "active_triplets":
        return active_triplets(counts).clamp_min(1).to(rows.dtype)
    if spec.mean_over == "active_triplet_terms":
        return active_triplets(counts, spec.name).clamp_min(1).to(rows.dtype)
    if spec.mean_over == "positive_pairs":
        return counts[:, 0].sum().clamp_min(1).to(rows.dtype)
    assert spec.mean_over == "anchors", spec.mean_over
    return float(max(rows.shape[0], 1))  # a Python number: no host-to-device copy (a sync on a GPU)


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
        # x and ref first (the double-backward guard ties each gradient to its input); saving
        # an input keeps a reference, not a copy
        if ctx.fused_grad:
            ctx.save_for_backward(x, ref, grad, rows, counts)
        elif need_ref:
            ctx.save_for_backward(x, ref, labels, ref_labels, self_index, rows, counts)
        return out, counts

    @staticmethod
    def backward(ctx, grad_out, _grad_counts):
        # double backward raises instead of returning 0 (_first_order_only)
        x, ref = ctx.saved_tensors[:2]
        rest = ctx.saved_tensors[2:]
        if ctx.fused_grad:
            grad, rows, counts = rest
        else:
            labels, ref_labels, self_index, rows, counts = rest
        g = grad_out.float()
        if ctx.reduction == "mean":
            g = g / _mean_denominator(ctx.spec, rows, counts)
        grad_rows = g.expand(rows.shape[0]) if ctx.reduction != "none" else g
        tail = (None,) * 8
        if ctx.fused_grad:  # linear in grad_out, tracked: d/d grad_out is exact
            grad_x = (grad * grad_rows[:, None]).to(ctx.x_dtype)
            return _first_order_only((grad_x, None) + tail, (x, ref))
        with torch.no_grad():  # the bwd op has no derivative of its own: tied to grad_out as well
            bwd = getattr(ctx.ops, f"{ctx.spec.name}_bwd")
            gx, gr = bwd(x, labels, ref, ref_labels, self_index, ctx.ref_valid, *ctx.params,
                         grad_rows.contiguous(), ctx.allow_tf32)
        grad_x = gx.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return _first_order_only((grad_x, gr.to(ctx.ref_dtype)) + tail, (x, ref), grad_out)


def compute(loss, embeddings, labels, ref_embeddings, ref_labels, *, ref_valid=None, self_index=None,
            reduction="mean", backend="auto", **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validated entry point shared by the public losses and XBMLoss.
    Returns (loss, counts (B, 2) int32: active positive / negative pairs per anchor)."""
    if loss not in LOSSES:
        raise ValueError(f"loss: unknown loss {loss!r}; available: {sorted(LOSSES)}")
    spec = LOSSES[loss]
    params = spec.values(kwargs)
    name, n, self_index = check_inputs(spec, embeddings, labels, ref_embeddings, ref_labels, ref_valid, self_index,
                                       reduction, backend)
    return run(spec, params, name, embeddings, labels, ref_embeddings, ref_labels, n, self_index, reduction)


def check_inputs(spec, embeddings, labels, ref_embeddings, ref_labels, ref_valid, self_index, reduction, backend):
    """Validates the tensors and picks the backend; returns (backend, ref_valid as int, self_index)."""
    V.tensor("embeddings", embeddings)
    # the shape lets `auto` pass over a Triton kernel that cannot launch for it (backends.resolve)
    dim = embeddings.shape[-1] if embeddings.dim() == 2 else None
    dtypes = (embeddings.dtype, ref_embeddings.dtype) if isinstance(ref_embeddings, torch.Tensor) else None
    name = backends.resolve(backend, embeddings.device, spec.name, dim=dim, dtypes=dtypes)
    n, self_index = V.loss_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_valid, self_index, reduction,
                                  allow_fp64=(name == "reference"))
    return name, n, self_index


_FMA_WARNED = []


def _warn_fp32_on_fma(backend, x, ref):
    """Once per process: fp32 rows on a GPU kernel under the default float32 matmul precision
    ("highest") multiply in IEEE fp32 on the FMA units, several times slower than the tensor
    cores (CONTRACT.md section 5). Not while torch.compile traces."""
    if _FMA_WARNED or backend not in ("triton", "cuda") or x.device.type != "cuda" \
            or torch.compiler.is_compiling():
        return
    if x.dtype == torch.float32 and ref.dtype == torch.float32 and not _allow_tf32():
        _FMA_WARNED.append(True)
        import warnings
        warnings.warn("xbm_kernels: float32 embeddings and memory on a GPU run in IEEE fp32 on the FMA units "
                      "(torch.get_float32_matmul_precision() is 'highest'); for the tensor cores use a bfloat16 "
                      "memory (memory_dtype=torch.bfloat16) or torch.set_float32_matmul_precision('high') (TF32). "
                      "This warning is shown once.", stacklevel=3)


def run(spec, params, backend, embeddings, labels, ref_embeddings, ref_labels, n, self_index, reduction):
    """The loss after check_inputs(); `params` in schema order (already validated, or chosen by
    the caller: the PML drop-in uses values outside the public ranges to switch a term off)."""
    if backend == "reference":
        si = None if self_index is None else self_index.long()
        rows, counts = spec.reference(embeddings, labels, ref_embeddings, ref_labels, ref_valid=n, self_index=si,
                                      **dict(zip(spec.defaults, params)))
        return _reduce(spec, rows, counts, reduction), counts
    _warn_fp32_on_fma(backend, embeddings, ref_embeddings)
    y = labels.to(torch.int32)
    z = ref_labels.to(torch.int32)
    si = None if self_index is None else self_index.to(torch.int64).contiguous()
    return _FusedLoss.apply(embeddings, ref_embeddings, y, z, si, n, reduction, spec, backends.kernel_ops(backend),
                            tuple(params))


_COMMON = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
           for n in ("embeddings", "labels", "ref_embeddings", "ref_labels")]
_TAIL = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
         for n, d in (("ref_valid", None), ("self_index", None), ("reduction", "mean"), ("backend", "auto"))]


def _public(spec: Loss):
    """xk.<name>_loss: the registry entry as a function with a real signature and docstring."""
    sig = inspect.Signature(_COMMON + [inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default)
                                       for p in spec.parameters] + _TAIL)

    def loss_fn(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:  # name the function: "contrastive_loss: got an unexpected keyword argument 'margn'"
            raise TypeError(f"{spec.name}_loss: {e}; accepted keywords: {list(sig.parameters)[4:]}") from None
        bound.apply_defaults()
        a = dict(bound.arguments)
        tensors = [a.pop(n) for n in ("embeddings", "labels", "ref_embeddings", "ref_labels")]
        return compute(spec.name, *tensors, **a)[0]

    loss_fn.__name__ = loss_fn.__qualname__ = f"{spec.name}_loss"
    loss_fn.__signature__ = sig
    loss_fn.__doc__ = docstring(spec)
    loss_fn.__module__ = __name__
    return loss_fn


PUBLIC = {name: _public(spec) for name, spec in LOSSES.items()}
globals().update({fn.__name__: fn for fn in PUBLIC.values()})
__all__ = ["compute", "LOSSES", "MEAN_OVER"] + [fn.__name__ for fn in PUBLIC.values()]
