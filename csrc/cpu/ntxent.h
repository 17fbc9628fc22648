// The NT-Xent form, shared by the losses built on it (ntxent, tuplet_margin): per positive
// pair (i, p) one softplus term against one anchor-wide log-sum-exp over the negatives,
//   LZ_i = log sum_{n in N_i} exp(a S_in),   l_i = sum_{p in P_i} softplus(LZ_i - a f(S_ip)),
// a the logits' scale (1 / tau for ntxent), f the positive's transform: the identity for
// ntxent, cos(acos(S) - m) for tuplet_margin. ntxent_cpu.cpp implements it (one pass over the
// memory for the negatives, then the positives from the same-label rows only).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <tuple>

namespace xbm_kernels {
namespace cpu {

struct PositiveLogit {
  float scale;          // a: every logit is a times S (negatives) or a times f(S) (positives)
  bool angular = false;  // f(S) = cos(acos(S) - m); else f(S) = S
  double cos_m = 1.0, sin_m = 0.0;

  static PositiveLogit identity(float scale) { return {scale}; }
  // m in radians. sin(theta) = sqrt((1 - S)(1 + S)) counts as 0 where that is <= 2^-16
  // (CONTRACT.md section 1, tuplet_margin).
  static PositiveLogit angular_margin(float scale, double m) { return {scale, true, std::cos(m), std::sin(m)}; }

  // The positive's logit a f(v); `slope` gets f'(v).
  double logit(float v, double& slope) const {
    if (!angular) {
      slope = 1.0;
      return double(v * scale);  // the fp32 product, as the negatives' logits
    }
    const double s = v, t = (1.0 - s) * (1.0 + s);
    const double sin_theta = t > 0x1p-16 ? std::sqrt(t) : 0.0;
    slope = sin_theta > 0 ? cos_m - s * sin_m / sin_theta : cos_m;
    return double(scale) * (s * cos_m + sin_theta * sin_m);
  }
};

// <loss>_fwd / <loss>_bwd of a loss of this form (the registry's op convention); pos_thr =
// 1 - pos_eps.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ntxent_form_fwd(const at::Tensor& x, const at::Tensor& labels,
                                                               const at::Tensor& ref, const at::Tensor& ref_labels,
                                                               const c10::optional<at::Tensor>& self_index,
                                                               int64_t ref_valid, const PositiveLogit& logit,
                                                               float pos_thr, bool need_grad);
std::tuple<at::Tensor, at::Tensor> ntxent_form_bwd(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
                                                   const at::Tensor& ref_labels,
                                                   const c10::optional<at::Tensor>& self_index, int64_t ref_valid,
                                                   const PositiveLogit& logit, float pos_thr,
                                                   const at::Tensor& grad_rows);

}  // namespace cpu
}  // namespace xbm_kernels
