"""The `reference` backend: dense, readable PyTorch, differentiable by autograd.

It builds the full B x N similarity matrix and boolean masks, exactly as DESIGN.md
section 1 writes the math. It is the backend the fused kernels are tested against and a
fallback on any device; it is slow and memory-hungry for large memories by design.

Every function returns (loss_rows (B,) float32, counts (B, 2) int32) where counts holds
the active positive / negative pairs per anchor.
"""
import torch


def similarity(x, ref):
    """S = X R^T in the inputs' (promoted) dtype, returned as float32."""
    dtype = torch.promote_types(x.dtype, ref.dtype)
    return (x.to(dtype) @ ref.to(dtype).T).float()


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
