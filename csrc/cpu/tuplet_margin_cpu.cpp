// Fused tuplet margin loss (Yu and Tao 2019, as pytorch-metric-learning's TupletMarginLoss)
// over a reference set on the CPU: the NT-Xent form (cpu/ntxent.h, ntxent_cpu.cpp) with the
// logits' scale a = `scale` and the positive's logit a cos(acos(S_ip) - m), m = margin in
// radians:
//   l_i = sum_{p in P_i} softplus(log sum_{n in N_i} exp(a S_in) - a cos(acos(S_ip) - m))
// One pass over the memory for the negatives' log-sum-exp, then the positives from the
// same-label rows only.
#include <torch/library.h>

#include <cmath>

#include "cpu/ntxent.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;

cpu::PositiveLogit tuplet_logit(double margin, double scale) {
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "scale: expected a finite value > 0, got ", scale);
  TORCH_CHECK(std::isfinite(margin), "margin: expected a finite number of degrees, got ", margin);
  return cpu::PositiveLogit::angular_margin(cpu::logit_scale_f32(scale), margin * M_PI / 180.0);
}

std::tuple<Tensor, Tensor, Tensor> tuplet_margin_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                         const Tensor& ref_labels,
                                                         const c10::optional<Tensor>& self_index, int64_t ref_valid,
                                                         double margin, double scale, double pos_eps, bool need_grad,
                                                         bool /*allow_tf32*/) {
  return cpu::ntxent_form_fwd(x, labels, ref, ref_labels, self_index, ref_valid, tuplet_logit(margin, scale),
                              static_cast<float>(1.0 - pos_eps), need_grad);
}

std::tuple<Tensor, Tensor> tuplet_margin_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                 const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                                 int64_t ref_valid, double margin, double scale, double pos_eps,
                                                 const Tensor& grad_rows, bool /*allow_tf32*/) {
  return cpu::ntxent_form_bwd(x, labels, ref, ref_labels, self_index, ref_valid, tuplet_logit(margin, scale),
                              static_cast<float>(1.0 - pos_eps), grad_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("tuplet_margin_fwd", &tuplet_margin_fwd_cpu);
  m.impl("tuplet_margin_bwd", &tuplet_margin_bwd_cpu);
}

}  // namespace xbm_kernels
