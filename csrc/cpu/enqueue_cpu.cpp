// Ring-buffer write of a batch into the memory (CONTRACT.md section 2): rows go to slots
// (ptr + arange(b)) % size, embeddings cast to the memory dtype, labels to int32. At most
// two contiguous block copies (before and after the wrap). Returns the slots written.
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>

namespace xbm_kernels {
namespace {

using at::Tensor;

Tensor enqueue_cpu(Tensor& memory, Tensor& memory_labels, const Tensor& embeddings, const Tensor& labels,
                   int64_t ptr) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t size = memory.size(0), b = embeddings.size(0);
  TORCH_CHECK(memory.dim() == 2 && embeddings.dim() == 2 && embeddings.size(1) == memory.size(1),
              "embeddings: expected shape (b, ", memory.size(1), ")");
  TORCH_CHECK(memory.is_contiguous() && memory_labels.is_contiguous(), "memory: must be contiguous");
  TORCH_CHECK(memory_labels.scalar_type() == at::kInt && memory_labels.size(0) == size,
              "memory_labels: expected int32 of shape (", size, ",)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == b, "labels: expected shape (", b, ",)");
  TORCH_CHECK(b <= size, "embeddings: batch of ", b, " rows is larger than the memory (", size, ")");
  TORCH_CHECK(ptr >= 0 && ptr < size, "ptr: expected 0 <= ptr < ", size, ", got ", ptr);
  const int64_t first = std::min(b, size - ptr);
  memory.narrow(0, ptr, first).copy_(embeddings.narrow(0, 0, first));
  memory_labels.narrow(0, ptr, first).copy_(labels.narrow(0, 0, first));
  if (first < b) {
    memory.narrow(0, 0, b - first).copy_(embeddings.narrow(0, first, b - first));
    memory_labels.narrow(0, 0, b - first).copy_(labels.narrow(0, first, b - first));
  }
  return at::arange(ptr, ptr + b, labels.options().dtype(at::kLong)).remainder_(size);
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) { m.impl("enqueue_", &enqueue_cpu); }

}  // namespace xbm_kernels
