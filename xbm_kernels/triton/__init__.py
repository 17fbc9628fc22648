"""Triton backend: the memory enqueue and every fused loss of the registry (contrastive,
contrastive_l2, multi_similarity, triplet, supcon, ntxent) as Triton kernels, registered as
torch.library custom ops in `ops` (namespace xbm_kernels_triton). Runs on CUDA tensors, and on
CPU tensors under TRITON_INTERPRET=1 (for tests).

Layout: `<loss>.py` holds a loss's `@triton.jit` kernels (`<loss>_<stage>_kernel`: fwd, stats,
hardest, merge, ref_grad) and its launchers `<loss>_fwd_triton` / `<loss>_bwd_triton`;
`_common.py` holds everything they share (the only module they import). The forward
kernels stream the memory split-K: each program takes a tile of anchors and a *split* (a
contiguous column range); a *merge* kernel combines the splits' partial results in split
order (deterministic, no atomics). fp32 anchors against a 16-bit memory enter the tensor
cores as 16-bit *limbs* (`_common.operand_limbs`).

Importing this package does not import triton; `ops` does."""
