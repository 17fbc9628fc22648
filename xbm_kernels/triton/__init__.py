"""Triton backend: the memory enqueue and the fused contrastive, multi-similarity, triplet
and supcon losses as Triton kernels, registered as torch.library custom ops in `ops`
(namespace xbm_kernels_triton). Runs on CUDA tensors, and on CPU tensors under
TRITON_INTERPRET=1 (for tests).

Importing this package does not import triton; `ops` does."""
