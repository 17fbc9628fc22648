// Fused circle loss (pair form, as pytorch-metric-learning's CircleLoss) over a reference set
// on the CPU (CONTRACT.md section 1):
//   lp_ij = -gamma [1 + m - S_ij]_+ (S_ij - (1 - m))  on P_i,  ln_ij = gamma [S_ij + m]_+ (S_ij - m)  on N_i
//   L_i = LSE_{P_i} lp + LSE_{N_i} ln,  l_i = softplus(L_i)  (0 when P_i or N_i is empty)
//   dl_i/dS_ij = sigmoid(L_i) softmax_{set(j)}(logit)_j k_ij,  k = -gamma [1 + m - S]_+ on P,
//   gamma [S + m]_+ on N (the [.]_+ factors are constants for the gradient).
// One pass over the memory with two online log-sum-exps: cpu/pair_lse.h.
#include <torch/library.h>

#include "cpu/pair_lse.h"

namespace xbm_kernels {
namespace {

using at::Tensor;

struct CircleForm {
  float m, gamma, pos_thr;
  static constexpr bool kBothSets = true;
  static constexpr cpu::Outer kOuter = cpu::Outer::kSoftplus;
  // The logit and its slope k of a positive / negative pair of similarity v.
  void pos(float v, float& logit, float& k) const {
    k = -gamma * std::max(0.f, 1.f + m - v);
    logit = k * (v - (1.f - m));
  }
  void neg(float v, float& logit, float& k) const {
    k = gamma * std::max(0.f, v + m);
    logit = k * (v - m);
  }
#if XBM_CPU_VECTOR
  // neg() lane by lane (std::max(0, t) is t where 0 < t, else 0, as pair_lse_max(t, 0)).
  template <class V>
  XBM_INLINE void neg_vec(typename V::F v, typename V::F& logit, typename V::F& k) const {
    const typename V::F t = v + m;
    k = gamma * cpu::pair_lse_max<V::lanes>(t, V::splat(0.f));
    logit = k * (v - m);
  }
#endif
};
XBM_PAIR_LSE_VECTOR(CircleForm)

CircleForm params(double m, double gamma, double pos_eps) {
  TORCH_CHECK(gamma > 0, "gamma: expected > 0, got ", gamma);
  return {static_cast<float>(m), static_cast<float>(gamma), static_cast<float>(1.0 - pos_eps)};
}

std::tuple<Tensor, Tensor, Tensor> circle_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                  const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                                  int64_t ref_valid, double m, double gamma, double pos_eps,
                                                  bool need_grad, bool /*allow_tf32*/) {
  return cpu::pair_lse_fwd(x, labels, ref, ref_labels, self_index, ref_valid, params(m, gamma, pos_eps), need_grad);
}

std::tuple<Tensor, Tensor> circle_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                          const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                          int64_t ref_valid, double m, double gamma, double pos_eps,
                                          const Tensor& grad_rows, bool /*allow_tf32*/) {
  return cpu::pair_lse_bwd(x, labels, ref, ref_labels, self_index, ref_valid, params(m, gamma, pos_eps), grad_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("circle_fwd", &circle_fwd_cpu);
  m.impl("circle_bwd", &circle_bwd_cpu);
}

}  // namespace xbm_kernels
