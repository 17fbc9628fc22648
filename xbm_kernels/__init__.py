"""xbm-kernels: fused Cross-Batch Memory losses for PyTorch.

    import xbm_kernels as xk
    crit = xk.XBMLoss(memory_size=8192, embedding_dim=128)     # contrastive, margin 0.5
    loss = crit(embeddings, labels)                             # in-batch + memory loss
"""
from . import _ops  # noqa: F401  (loads the C++ ops and their fakes)
from ._validate import set_value_checks
from .backends import available_backends
from .losses import LOSSES, contrastive_loss, multi_similarity_loss, supcon_loss, triplet_loss
from .memory import CrossBatchMemory
from .xbm import XBMLoss

__version__ = "0.1.0"

__all__ = ["contrastive_loss", "multi_similarity_loss", "triplet_loss", "supcon_loss", "CrossBatchMemory", "XBMLoss", "available_backends", "set_value_checks", "LOSSES"]
