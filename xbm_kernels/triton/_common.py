"""Helpers shared by the Triton launchers: interpreter detection, device facts, argument
checks for direct op calls. Launchers call torch.cuda only for CUDA tensors, so the same
code runs under TRITON_INTERPRET=1 on CPU tensors."""
import contextlib
import functools
import os
import warnings

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    # Triton reads the variable when a kernel is decorated, i.e. at import of our modules.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_d(D: int) -> int:
    # Whole rows per tile (the tile of R is reused for dX); tl.dot needs K >= 16.
    return max(16, triton.next_power_of_2(max(D, 1)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs fill the device: two per SM on a GPU. Under the interpreter a
    small number, so that small test shapes still take the split-K path."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def _loop_probe_kernel(out_ptr, n):
    acc = 0
    for _ in range(0, n):  # a loop bounded by a runtime argument
        acc += 1
    tl.store(out_ptr, acc)


@functools.lru_cache(maxsize=None)
def interpreter_problem():
    """None when the kernels can run here; otherwise why not. Some Triton interpreters
    (3.6) cannot run loops bounded by runtime values with numpy >= 2."""
    if not interpreting():
        return None
    out = torch.zeros(1, dtype=torch.int32)
    try:
        with warnings.catch_warnings():  # numpy 1.25+ deprecation noise from the interpreter itself
            warnings.simplefilter("ignore", DeprecationWarning)
            _loop_probe_kernel[(1,)](out, 3)
    except Exception as exc:  # the interpreter wraps the numpy TypeError
        import numpy
        return (f"Triton {triton.__version__}'s interpreter cannot run runtime-bounded loops with numpy "
                f"{numpy.__version__} ({exc}); install numpy<2 or a newer Triton")
    return None if int(out[0]) == 3 else "Triton interpreter probe returned a wrong loop count"


def check_device(name: str, t: torch.Tensor):
    if t.is_cuda:
        return
    if t.device.type == "cpu" and interpreting():
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(f"{name}: {problem}")
        return
    raise ValueError(f"{name}: the triton backend runs on CUDA tensors (CPU tensors only under "
                     f"TRITON_INTERPRET=1), got a tensor on {t.device}")


def check_loss_args(x, labels, ref, ref_labels, self_index, ref_valid):
    """The checks csrc/checks.h makes for the C++ ops, for direct calls of the Triton ops."""
    if x.dim() != 2 or ref.dim() != 2:
        raise ValueError(f"x, ref: expected 2-D tensors, got shapes {tuple(x.shape)} and {tuple(ref.shape)}")
    if x.shape[1] != ref.shape[1]:
        raise ValueError(f"ref: embedding dim {ref.shape[1]} != x's {x.shape[1]}")
    if x.dtype not in FLOAT_DTYPES or ref.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x, ref: expected float32/float16/bfloat16, got {x.dtype} and {ref.dtype}")
    B, N = x.shape[0], ref.shape[0]
    if labels.dim() != 1 or labels.shape[0] != B or labels.dtype != torch.int32:
        raise ValueError(f"labels: expected int32 of shape ({B},), got {labels.dtype} {tuple(labels.shape)}")
    if ref_labels.dim() != 1 or ref_labels.shape[0] != N or ref_labels.dtype != torch.int32:
        raise ValueError(f"ref_labels: expected int32 of shape ({N},), got {ref_labels.dtype} "
                         f"{tuple(ref_labels.shape)}")
    if not 0 <= ref_valid <= N:
        raise ValueError(f"ref_valid: expected 0 <= ref_valid <= {N}, got {ref_valid}")
    if N >= 2 ** 31:
        raise ValueError(f"ref: at most 2^31 - 1 rows (column indices are int32), got {N}")
    tensors = [labels, ref, ref_labels]
    if self_index is not None:
        if self_index.dim() != 1 or self_index.shape[0] != B or self_index.dtype != torch.int64:
            raise ValueError(f"self_index: expected int64 of shape ({B},), got {self_index.dtype} "
                             f"{tuple(self_index.shape)}")
        tensors.append(self_index)
    for t in tensors:
        if t.device != x.device:
            raise ValueError(f"all tensors must be on {x.device}, got one on {t.device}")
    check_device("x", x)
