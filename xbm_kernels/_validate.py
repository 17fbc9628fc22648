"""Argument checks for the public API. Every check runs before any state changes, and
every message names the argument. Checks that need the data itself (label range,
self_index range, finiteness) run for CPU tensors always and for GPU tensors only when
checks are enabled (`xbm_kernels.set_value_checks(True)` or XBM_KERNELS_CHECKS=1), since
they force a host sync."""
import math
import operator
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
REDUCTIONS = ("mean", "sum", "none")
# Memory rows and embedding widths: int32-indexable (2**31 - 1), far beyond any memory that fits.
MAX_ROWS = 2 ** 31 - 1

_value_checks = os.environ.get("XBM_KERNELS_CHECKS", "0") == "1"


def set_value_checks(enabled: bool) -> None:
    """Also run the data-dependent checks on GPU tensors (costs a host sync per call)."""
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_on(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():  # data-dependent checks would break the graph
        return False
    return t.device.type == "cpu" or _value_checks


def tensor(name, t, *, dim=None, dtypes=None, integer=False, floating=False, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    return t


# Integer dtypes whose every value fits in int32: no data check needed.
_INT32_SAFE = (torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16)


def labels_fit_int32(name, labels, *, always=False):
    """Labels of any integer dtype (unsigned ones included) must hold values that fit in
    int32; a data check (a host sync on a GPU, so it follows value_checks_on unless
    `always`). Many reductions are not implemented for uint16/32/64, so unsigned labels
    are read as int64 (uint64 by reinterpreting its bits: values >= 2**63 read negative)."""
    if not labels.numel() or labels.dtype in _INT32_SAFE or not (always or value_checks_on(labels)):
        return
    if labels.dtype == torch.uint64:
        v = labels.view(torch.int64)
    elif labels.dtype == torch.uint32:
        v = labels.to(torch.int64)
    else:
        v = labels
    lo, hi = (int(t) for t in torch.aminmax(v))
    if labels.dtype == torch.uint64 and lo < 0:  # some values are >= 2**63: report them as unsigned
        big = v[v < 0]
        hi = int(big.max()) + 2 ** 64
        small = v[v >= 0]
        lo = int(small.min()) if small.numel() else int(big.min()) + 2 ** 64
    if lo < INT32_MIN or hi > INT32_MAX:
        raise ValueError(f"{name}: labels must fit in int32, got values in [{lo}, {hi}]")


def finite_number(name, v, *, minimum=None):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {v}")
    return float(v)


def index(name, v, lo, hi):
    """An int in [lo, hi]."""
    if isinstance(v, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name}: expected {lo} <= {name} <= {hi}, got {v}")
    return v


def loss_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_valid, self_index, reduction, allow_fp64):
    """Checks the arguments shared by every loss; returns (ref_valid as int, self_index)."""
    dtypes = FLOAT_DTYPES + ((torch.float64,) if allow_fp64 else ())
    tensor("embeddings", embeddings, dim=2, dtypes=dtypes)
    dev = embeddings.device
    tensor("ref_embeddings", ref_embeddings, dim=2, dtypes=dtypes, device=dev)
    tensor("labels", labels, dim=1, integer=True, device=dev)
    tensor("ref_labels", ref_labels, dim=1, integer=True, device=dev)
    B, D = embeddings.shape
    N = ref_embeddings.shape[0]
    if ref_embeddings.shape[1] != D:
        raise ValueError(f"ref_embeddings: embedding dim {ref_embeddings.shape[1]} != embeddings' {D}")
    if labels.shape[0] != B:
        raise ValueError(f"labels: expected {B} labels (one per embedding), got {labels.shape[0]}")
    if ref_labels.shape[0] != N:
        raise ValueError(f"ref_labels: expected {N} labels (one per ref row), got {ref_labels.shape[0]}")
    n = N if ref_valid is None else index("ref_valid", ref_valid, 0, N)
    if self_index is not None:
        tensor("self_index", self_index, dim=1, integer=True, device=dev)
        if self_index.shape[0] != B:
            raise ValueError(f"self_index: expected {B} entries (one per embedding), got {self_index.shape[0]}")
        if self_index.numel() and value_checks_on(self_index):
            lo, hi = int(self_index.min()), int(self_index.max())
            if lo < -1 or hi >= N:
                raise ValueError(f"self_index: expected values in [-1, {N}), got values in [{lo}, {hi}]")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    labels_fit_int32("labels", labels)
    labels_fit_int32("ref_labels", ref_labels)
    return n, self_index
