// Ring-buffer write of a batch into the memory on the GPU (CONTRACT.md section 2): row i goes
// to slot (ptr + i) % size, cast to the memory dtype; labels to int32; the slots written
// come back as int64. One launch, no host sync.
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>

namespace xbm_kernels {
namespace cuda {
namespace {

using at::Tensor;

// Label element types the kernel reads (converted to int32 inside).
enum class LabelType : int { kI8, kU8, kI16, kI32, kI64 };

__device__ __forceinline__ int32_t load_label(const void* labels, LabelType lt, int64_t i) {
  switch (lt) {
    case LabelType::kI8: return static_cast<const int8_t*>(labels)[i];
    case LabelType::kU8: return static_cast<const uint8_t*>(labels)[i];
    case LabelType::kI16: return static_cast<const int16_t*>(labels)[i];
    case LabelType::kI32: return static_cast<const int32_t*>(labels)[i];
    default: return static_cast<int32_t>(static_cast<const int64_t*>(labels)[i]);
  }
}

// Threads cover the b x D embedding elements; the first b threads also write the label and
// the slot of their row. Casts go through float, as at::Tensor::copy_ does.
template <typename Tin, typename Tmem>
__global__ void enqueue_kernel(Tmem* __restrict__ memory, int32_t* __restrict__ memory_labels,
                               const Tin* __restrict__ emb, const void* __restrict__ labels, LabelType lt,
                               int64_t* __restrict__ slots, int64_t b, int64_t D, int64_t size, int64_t ptr) {
  const int64_t n = b * D;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n || e < b; e += stride) {
    if (e < n) {
      const int64_t i = e / D, col = e - i * D;
      const int64_t slot = (ptr + i) % size;
      memory[slot * D + col] = static_cast<Tmem>(static_cast<float>(emb[e]));
    }
    if (e < b) {
      const int64_t slot = (ptr + e) % size;
      memory_labels[slot] = load_label(labels, lt, e);
      slots[e] = slot;
    }
  }
}

LabelType label_type(at::ScalarType t) {
  switch (t) {
    case at::kChar: return LabelType::kI8;
    case at::kByte: return LabelType::kU8;
    case at::kShort: return LabelType::kI16;
    case at::kInt: return LabelType::kI32;
    case at::kLong: return LabelType::kI64;
    default: TORCH_CHECK(false, "labels: expected an integer tensor (int8/uint8/int16/int32/int64), got ", t);
  }
}

Tensor enqueue_cuda(Tensor& memory, Tensor& memory_labels, const Tensor& embeddings, const Tensor& labels,
                    int64_t ptr) {
  at::AutoDispatchBelowADInplaceOrView below;
  c10::cuda::CUDAGuard guard(memory.device());
  TORCH_CHECK(memory.dim() == 2 && embeddings.dim() == 2 && embeddings.size(1) == memory.size(1),
              "embeddings: expected shape (b, ", memory.dim() == 2 ? memory.size(1) : -1, ")");
  const int64_t size = memory.size(0), D = memory.size(1), b = embeddings.size(0);
  TORCH_CHECK(memory.is_contiguous() && memory_labels.is_contiguous(), "memory: must be contiguous");
  TORCH_CHECK(memory_labels.scalar_type() == at::kInt && memory_labels.dim() == 1 && memory_labels.size(0) == size,
              "memory_labels: expected int32 of shape (", size, ",)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == b, "labels: expected shape (", b, ",)");
  TORCH_CHECK(b <= size, "embeddings: batch of ", b, " rows is larger than the memory (", size, ")");
  TORCH_CHECK(ptr >= 0 && ptr < size, "ptr: expected 0 <= ptr < ", size, ", got ", ptr);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&memory_labels, &embeddings, &labels}) {
    TORCH_CHECK(t->device() == memory.device(), "all tensors must be on ", memory.device(), ", got ", t->device());
  }
  const auto mt = memory.scalar_type();
  TORCH_CHECK(mt == at::kFloat || mt == at::kHalf || mt == at::kBFloat16,
              "memory: expected float32, float16 or bfloat16, got ", mt);
  const LabelType lt = label_type(labels.scalar_type());
  Tensor slots = at::empty({b}, labels.options().dtype(at::kLong));
  if (b == 0) return slots;
  const Tensor emb = embeddings.detach().contiguous();
  const Tensor lab = labels.contiguous();
  const int64_t work = std::max(b * D, b);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((work + threads - 1) / threads, 65536);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, emb.scalar_type(), "enqueue_cuda_in", [&] {
    using Tin = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mt, "enqueue_cuda_mem", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        enqueue_kernel<Tin, scalar_t><<<(unsigned)blocks, threads, 0, stream>>>(
            memory.data_ptr<scalar_t>(), memory_labels.data_ptr<int32_t>(), emb.data_ptr<Tin>(), lab.data_ptr(), lt,
            slots.data_ptr<int64_t>(), b, D, size, ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return slots;
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(xbm_kernels, CUDA, m) { m.impl("enqueue_", &cuda::enqueue_cuda); }

}  // namespace xbm_kernels
