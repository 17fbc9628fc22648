// Fused generalized lifted structure loss (as pytorch-metric-learning's
// GeneralizedLiftedStructureLoss, on the L2 distance of unit rows) over a reference set on the
// CPU (CONTRACT.md section 1):
//   d_ij = sqrt(2 - 2 S_ij) (0 within contrastive_l2's floor),
//   L_i = LSE_{P_i}(d - pos_margin) + LSE_{N_i}(neg_margin - d) (an empty set's term 0),
//   l_i = max(0, L_i),  dl_i/dS_ij = [L_i > 0] softmax_{set(j)}(logit)_j k_ij,
//   k = -1/d on P, +1/d on N (dd/dS = -1/d), 0 at d = 0.
// One pass over the memory with two online log-sum-exps, as circle's: cpu/pair_lse.h.
#include <torch/library.h>

#include "cpu/pair_lse.h"

namespace xbm_kernels {
namespace {

using at::Tensor;

// contrastive_l2's floor (contrastive_l2_cpu.cpp, CONTRACT.md section 1): 2 - 2 S at or below
// 2^-16 counts as d = 0, with slope 0, so an exact copy's rounding of S never becomes 1/d ~ 3000.
constexpr float kL2Zero = 1.52587890625e-05f;

struct LiftedForm {
  float pos_margin, neg_margin, pos_thr;
  static constexpr bool kBothSets = false;
  static constexpr cpu::Outer kOuter = cpu::Outer::kRelu;
  // d and dd/dS of a pair of similarity v.
  static void distance(float v, float& d, float& dd) {
    const float t = 2.f - 2.f * v;
    d = t > kL2Zero ? std::sqrt(t) : 0.f;
    dd = d > 0.f ? -1.f / d : 0.f;
  }
  void pos(float v, float& logit, float& k) const {
    float d;
    distance(v, d, k);
    logit = d - pos_margin;
  }
  void neg(float v, float& logit, float& k) const {
    float d, dd;
    distance(v, d, dd);
    logit = neg_margin - d;
    k = -dd;
  }
#if XBM_CPU_VECTOR
  // The same lane by lane (Vec::sqrt is IEEE, as std::sqrt); the lanes a select drops may hold
  // sqrt of a negative or -1/0.
  template <class V>
  static XBM_INLINE void distance_vec(typename V::F v, typename V::F& d, typename V::F& dd) {
    const typename V::F t = 2.f - 2.f * v, zero = V::splat(0.f);
    d = V::select(V::gt(t, kL2Zero), V::sqrt(t), zero);
    dd = V::select(V::gt(d, 0.f), -1.f / d, zero);
  }
  template <class V>
  XBM_INLINE void neg_vec(typename V::F v, typename V::F& logit, typename V::F& k) const {
    typename V::F d, dd;
    distance_vec<V>(v, d, dd);
    logit = neg_margin - d;
    k = -dd;
  }
#endif
};
XBM_PAIR_LSE_VECTOR(LiftedForm)

LiftedForm params(double pos_margin, double neg_margin, double pos_eps) {
  return {static_cast<float>(pos_margin), static_cast<float>(neg_margin), static_cast<float>(1.0 - pos_eps)};
}

std::tuple<Tensor, Tensor, Tensor> generalized_lifted_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                              const Tensor& ref_labels,
                                                              const c10::optional<Tensor>& self_index,
                                                              int64_t ref_valid, double pos_margin, double neg_margin,
                                                              double pos_eps, bool need_grad, bool /*allow_tf32*/) {
  return cpu::pair_lse_fwd(x, labels, ref, ref_labels, self_index, ref_valid,
                           params(pos_margin, neg_margin, pos_eps), need_grad);
}

std::tuple<Tensor, Tensor> generalized_lifted_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                      const Tensor& ref_labels,
                                                      const c10::optional<Tensor>& self_index, int64_t ref_valid,
                                                      double pos_margin, double neg_margin, double pos_eps,
                                                      const Tensor& grad_rows, bool /*allow_tf32*/) {
  return cpu::pair_lse_bwd(x, labels, ref, ref_labels, self_index, ref_valid,
                           params(pos_margin, neg_margin, pos_eps), grad_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("generalized_lifted_fwd", &generalized_lifted_fwd_cpu);
  m.impl("generalized_lifted_bwd", &generalized_lifted_bwd_cpu);
}

}  // namespace xbm_kernels
