"""Ring-buffer write of a batch into the memory (CONTRACT.md section 2), one launch:

    slot_i = (ptr + i) mod size            for i < b   (b <= size, 0 <= ptr < size)
    memory[slot_i]        = embeddings[i]  cast to the memory dtype
    memory_labels[slot_i] = labels[i]      cast to int32

Since ptr + i < 2 size, the modulo is one conditional subtraction. The grid is (row
blocks) x (column blocks); the first column block also writes the labels and the slots.
"""
import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def enqueue_kernel(mem_ptr, mem_labels_ptr, emb_ptr, labels_ptr, slots_ptr,
                   b, D, size, ptr, stride_eb, stride_ed, stride_l,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < b
    rows64 = rows.to(tl.int64)
    slots = rows64 + ptr
    slots = tl.where(slots >= size, slots - size, slots)

    dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (dims < D)[None, :]
    dims64 = dims.to(tl.int64)
    e = tl.load(emb_ptr + rows64[:, None] * stride_eb + dims64[None, :] * stride_ed, mask=mask)
    tl.store(mem_ptr + slots[:, None] * D + dims64[None, :], e.to(mem_ptr.dtype.element_ty), mask=mask)

    # A mask rather than a branch on pid_d: other column blocks issue no memory traffic.
    # (Built as one comparison: some interpreters give int32 for bool block & bool scalar.)
    first = rows < tl.where(pid_d == 0, b, 0)
    lab = tl.load(labels_ptr + rows64 * stride_l, mask=first, other=0)
    tl.store(mem_labels_ptr + slots, lab.to(tl.int32), mask=first)
    tl.store(slots_ptr + rows64, slots, mask=first)


def enqueue_triton(memory: torch.Tensor, memory_labels: torch.Tensor, embeddings: torch.Tensor,
                   labels: torch.Tensor, ptr: int) -> torch.Tensor:
    """Writes the batch at (ptr + arange(b)) % size in place; returns those slots (int64)."""
    size = memory.shape[0]
    b = embeddings.shape[0]
    if memory.dim() != 2 or embeddings.dim() != 2 or embeddings.shape[1] != memory.shape[1]:
        raise ValueError(f"embeddings: expected shape (b, {memory.shape[1] if memory.dim() == 2 else '?'}), "
                         f"got {tuple(embeddings.shape)}")
    if not memory.is_contiguous() or not memory_labels.is_contiguous():
        raise ValueError("memory: must be contiguous")
    if memory.dtype not in _common.FLOAT_DTYPES or not embeddings.is_floating_point():
        raise TypeError(f"memory, embeddings: expected float tensors, got {memory.dtype} and {embeddings.dtype}")
    if memory_labels.dtype != torch.int32 or memory_labels.shape != (size,):
        raise ValueError(f"memory_labels: expected int32 of shape ({size},), got {memory_labels.dtype} "
                         f"{tuple(memory_labels.shape)}")
    if labels.dim() != 1 or labels.shape[0] != b:
        raise ValueError(f"labels: expected shape ({b},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    if b > size:
        raise ValueError(f"embeddings: batch of {b} rows is larger than the memory ({size})")
    if not 0 <= ptr < size:
        raise ValueError(f"ptr: expected 0 <= ptr < {size}, got {ptr}")
    for name, t in (("memory_labels", memory_labels), ("embeddings", embeddings), ("labels", labels)):
        if t.device != memory.device:
            raise ValueError(f"{name}: expected a tensor on {memory.device}, got {t.device}")
    slots = torch.empty(b, dtype=torch.int64, device=memory.device)
    if b == 0:
        return slots
    _common.check_device("memory", memory)
    D = memory.shape[1]
    BLOCK_D = min(128, triton.next_power_of_2(D))
    BLOCK_R = min(256, 4096 // BLOCK_D)
    grid = (triton.cdiv(b, BLOCK_R), triton.cdiv(D, BLOCK_D))
    with _common.device_guard(memory):
        enqueue_kernel[grid](memory, memory_labels, embeddings, labels, slots, b, D, size, ptr,
                             embeddings.stride(0), embeddings.stride(1), labels.stride(0),
                             BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=4)
    return slots
