"""xbm-kernels: fused Cross-Batch Memory losses for PyTorch.

    import xbm_kernels as xk
    crit = xk.XBMLoss(memory_size=8192, embedding_dim=128)     # multi-similarity (the default)
    loss = crit(embeddings, labels)                             # in-batch + weight x memory loss
"""
from . import _ops  # noqa: F401  (defines the ops and their fakes, loads the C++ kernels)
from ._validate import set_value_checks
from .backends import available_backends
from .losses import PUBLIC as _PUBLIC_LOSSES
from .registry import LOSSES
from .memory import CrossBatchMemory
from .xbm import XBMLoss

__version__ = "0.1.0"

# xk.contrastive_loss, xk.multi_similarity_loss, ...: one per registry entry (registry.py)
globals().update({fn.__name__: fn for fn in _PUBLIC_LOSSES.values()})

__all__ = [fn.__name__ for fn in _PUBLIC_LOSSES.values()] + ["CrossBatchMemory", "XBMLoss", "available_backends", "set_value_checks", "LOSSES"]
