// Argument checks shared by the CPU and CUDA loss ops. The Python layer validates user
// input with friendlier messages first; these guard direct torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace xbm_kernels {

inline void check_loss_args(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
                            const at::Tensor& ref_labels, const c10::optional<at::Tensor>& self_index,
                            int64_t ref_valid) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D (B, D) tensor, got ", x.dim(), "-D");
  TORCH_CHECK(ref.dim() == 2, "ref: expected a 2-D (N, D) tensor, got ", ref.dim(), "-D");
  TORCH_CHECK(x.size(1) == ref.size(1), "ref: embedding dim ", ref.size(1), " != x's ", x.size(1));
  TORCH_CHECK(x.is_floating_point() && ref.is_floating_point(), "x, ref: expected floating tensors, got ",
              x.scalar_type(), " and ", ref.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "labels: expected shape (", x.size(0), ",)");
  TORCH_CHECK(ref_labels.dim() == 1 && ref_labels.size(0) == ref.size(0), "ref_labels: expected shape (",
              ref.size(0), ",)");
  TORCH_CHECK(labels.scalar_type() == at::kInt && ref_labels.scalar_type() == at::kInt,
              "labels, ref_labels: expected int32, got ", labels.scalar_type(), " and ", ref_labels.scalar_type());
  TORCH_CHECK(ref_valid >= 0 && ref_valid <= ref.size(0), "ref_valid: expected 0 <= ref_valid <= ", ref.size(0),
              ", got ", ref_valid);
  if (self_index.has_value()) {
    TORCH_CHECK(self_index->scalar_type() == at::kLong && self_index->dim() == 1 &&
                    self_index->size(0) == x.size(0),
                "self_index: expected an int64 tensor of shape (", x.size(0), ",)");
  }
  for (const at::Tensor* t : {&labels, &ref, &ref_labels}) {
    TORCH_CHECK(t->device() == x.device(), "all tensors must be on ", x.device(), ", got ", t->device());
  }
}

}  // namespace xbm_kernels
