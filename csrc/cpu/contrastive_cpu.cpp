// Fused contrastive loss over a reference set on the CPU (CONTRACT.md section 1):
//   l_i = sum_{j in P_i} (1 - S_ij) + sum_{j in N_i, S_ij > m} S_ij
//   dl_i/dx_i = sum_j c_ij r_j,  c_ij = -1 (positive), +1 (active negative), 0 otherwise.
// c_ij depends only on its own pair, so one pass over the reference rows gives the loss,
// the active-pair counts and the gradient: per tile S = X R^T (GEMM), the epilogue turns S
// into C in place, then dX += C R reuses the tile of R just read.
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "cpu/simd.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;

// Overwrites s (B x w, row-major) with c_ij, times row_scale[i] where row_scale is given (the
// backward's dL/dl_i, applied as the tile is written); adds per-row loss and active-pair
// counts and returns the tile's number of non-zero c_ij. Columns are c0 .. c0 + w - 1 of the
// reference; all of them are < ref_valid. L lanes at a time (simd.h, the CPU's widest), the
// scalar loop after it the definition.
// With p = [positive], n = [active negative] and c = n - p, the pair's loss is p + c S.
template <int L>
XBM_INLINE int64_t contrastive_epilogue_lanes(float* s, int64_t B, int64_t w, int64_t c0, const int32_t* y,
                                              const int32_t* z, const int64_t* self_idx, float margin,
                                              float pos_thr, const float* row_scale, double* loss,
                                              int64_t* counts) {
  int64_t active = 0;
  for (int64_t i = 0; i < B; ++i) {
    float* row = s + i * w;
    const int32_t yi = y[i];
    const int64_t self_col = self_idx ? self_idx[i] - c0 : -1;
    const bool has_self = self_col >= 0 && self_col < w;
    const float self_s = has_self ? row[self_col] : 0.f;
    const float g = row_scale ? row_scale[i] : 1.f;
    float acc = 0.f, npos = 0.f, nneg = 0.f;  // counts in float: exact, w <= 2^24
    int64_t j = 0;
#if XBM_CPU_VECTOR
    using V = cpu::Vec<L>;
    using F = typename V::F;
    using I = typename V::I;
    F accv = V::splat(0.f), posv = accv, negv = accv;
    for (; j + L <= w; j += L) {
      const F v = V::load(row + j);
      const I same = V::eq(V::load(z + j), yi);
      const F p = V::one_where(same & V::lt(v, pos_thr));
      const F n = V::one_where(~same & V::gt(v, margin));
      const F c = n - p;
      accv += p + c * v;
      posv += p;
      negv += n;
      V::store(row + j, row_scale ? c * g : c);
    }
    acc = V::sum(accv);
    npos = V::sum(posv);
    nneg = V::sum(negv);
#endif
    for (; j < w; ++j) {
      const float v = row[j];
      const bool same = z[j] == yi;
      const float p = (same && v < pos_thr) ? 1.f : 0.f;
      const float n = (!same && v > margin) ? 1.f : 0.f;
      const float c = n - p;
      acc += p + c * v;
      npos += p;
      nneg += n;
      row[j] = row_scale ? c * g : c;
    }
    if (has_self) {  // take the anchor's own column back out
      const bool same = z[self_col] == yi;
      const bool pos = same && self_s < pos_thr, neg = !same && self_s > margin;
      acc -= pos ? 1.f - self_s : (neg ? self_s : 0.f);
      npos -= pos;
      nneg -= neg;
      row[self_col] = row_scale ? 0.f * g : 0.f;
    }
    loss[i] += acc;
    counts[2 * i] += static_cast<int64_t>(npos);
    counts[2 * i + 1] += static_cast<int64_t>(nneg);
    active += static_cast<int64_t>(npos) + static_cast<int64_t>(nneg);
  }
  return active;
}
XBM_CPU_DISPATCH(int64_t, contrastive_epilogue,
                 (float* s, int64_t B, int64_t w, int64_t c0, const int32_t* y, const int32_t* z,
                  const int64_t* self_idx, float margin, float pos_thr, const float* row_scale, double* loss,
                  int64_t* counts),
                 (s, B, w, c0, y, z, self_idx, margin, pos_thr, row_scale, loss, counts))

// The kernels call ATen ops on their own buffers: keep them below autograd.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// contrastive_epilogue bound to one call's inputs and parameters, in the form
// cpu::pairwise_forward / pairwise_backward take.
auto epilogue_for(const cpu::LossInputs& in, double margin, double pos_eps) {
  const float m = static_cast<float>(margin), pos_thr = static_cast<float>(1.0 - pos_eps);
  return [&in, m, pos_thr](float* s, int64_t c0, int64_t w, const float* row_scale, double* loss, int64_t* counts) {
    return contrastive_epilogue(s, in.B, w, c0, in.y_ptr(), in.z_ptr() + c0, in.self_ptr(), m, pos_thr, row_scale,
                                loss, counts);
  };
}

std::tuple<Tensor, Tensor, Tensor> contrastive_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                       const Tensor& ref_labels,
                                                       const c10::optional<Tensor>& self_index, int64_t ref_valid,
                                                       double margin, double pos_eps, bool need_grad,
                                                       bool /*allow_tf32: no TF32 on the CPU*/) {
  BelowAutograd guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  return cpu::pairwise_forward(in, need_grad, epilogue_for(in, margin, pos_eps));
}

std::tuple<Tensor, Tensor> contrastive_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                               const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                               int64_t ref_valid, double margin, double pos_eps,
                                               const Tensor& grad_rows, bool /*allow_tf32*/) {
  BelowAutograd guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  return cpu::pairwise_backward(in, ref.size(0), grad_rows, epilogue_for(in, margin, pos_eps));
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("contrastive_fwd", &contrastive_fwd_cpu);
  m.impl("contrastive_bwd", &contrastive_bwd_cpu);
}

}  // namespace xbm_kernels
