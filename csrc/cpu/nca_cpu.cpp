// Fused NCA loss on the CPU (CONTRACT.md section 1), with a = 2 scale S:
//   l_i = LSE_{V_i}(a) - LSE_{P_i}(a) = log(1 + R_i),  R_i = sum_{V_i \ P_i} exp(a_ij - LSE_{P_i})
//   dl_i/dS_ij = 2 scale ( softmax_V(a)_j - [j in P_i] softmax_P(a)_j )
// The positives first: each anchor's same-label columns by label and their S, by one dot
// product each, or per label by one product of its anchors and columns where they are many
// (cpu/same_label.h), give LSE_{P_i}, and the dropped duplicates' terms. Then ONE
// pass over the memory keeps supcon's online log-sum-exp (cpu/online_lse.h) over the
// negatives only, with their softmax numerator G_N, so the gradient comes out of the forward.
// The loss is formed as log1p(R_i), and a positive's coefficient as softmax_P * expm1(-l_i):
// when the positives hold almost all of the mass (an anchor's own copy among them), the
// result keeps its relative precision instead of being the difference of two sums near 1,
// and it is exactly 0 for P_i = V_i. A positive's S is the dot product's only; the pass
// decides nothing on S. The reference-side gradient (in-batch loss): the same two steps for
// the LSEs, then per tile C_ij = g_i dl_i/dS_ij, dX = C R, dR = C^T X.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/online_lse.h"
#include "cpu/same_label.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

double log_add_exp(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return a + b;  // NaN stays NaN (not dropped with a -inf side)
  if (a < b) std::swap(a, b);
  return a == kNegInf ? kNegInf : a + std::log1p(std::exp(b - a));
}

// Every anchor's same-label columns (cand) with, per anchor, abs(P_i), LSE_{P_i}(a) and the
// LSE over its dropped duplicates (same label, S >= 1 - pos_eps), -inf for an empty set.
struct NcaSameLabel {
  cpu::SameLabel cand;
  std::vector<int64_t> count;
  std::vector<double> lse_pos, lse_dup;
  float pos_thr, a_scale;
  bool is_pos(int64_t k) const { return cand.s[k] < pos_thr; }
  double logit(int64_t k) const { return static_cast<double>(cand.s[k] * a_scale); }  // the fp32 product
};

NcaSameLabel nca_same_label(const cpu::LossInputs& in, float a_scale, float pos_thr) {
  NcaSameLabel out;
  out.pos_thr = pos_thr;
  out.a_scale = a_scale;
  // Uncapped: the loss needs every same-label column's logit, however many there are.
  cpu::gather_same_label_uncapped(in, out.cand);
  out.count.assign(in.B, 0);
  out.lse_pos.assign(in.B, kNegInf);
  out.lse_dup.assign(in.B, kNegInf);
  at::parallel_for(0, in.B, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double top[2] = {kNegInf, kNegInf};  // positives, duplicates
      for (int64_t k = out.cand.start[i]; k < out.cand.start[i + 1]; ++k) {
        const int set = out.is_pos(k) ? 0 : 1;
        top[set] = std::max(top[set], out.logit(k));
        out.count[i] += set == 0;
      }
      double sum[2] = {0, 0};
      for (int64_t k = out.cand.start[i]; k < out.cand.start[i + 1]; ++k) {
        const int set = out.is_pos(k) ? 0 : 1;
        sum[set] += std::exp(out.logit(k) - top[set]);
      }
      // an empty set stays -inf; a NaN logit (S NaN: no positive, in V_i) makes its set's sum NaN,
      // which stays NaN (std::max skipped it for top)
      if (!(sum[0] <= 0)) out.lse_pos[i] = top[0] + std::log(sum[0]);
      if (!(sum[1] <= 0)) out.lse_dup[i] = top[1] + std::log(sum[1]);
    }
  });
  return out;
}

// Per anchor: l_i, LSE_{V_i}, -expm1(-l_i) (the positives' softmax factor), 0 / -inf / 0 without
// positives. lse_neg is LSE_{N_i}(a) from the pass.
struct NcaRows {
  std::vector<double> loss, lse_v, pos_factor;
};

NcaRows nca_rows(const NcaSameLabel& sl, const std::vector<double>& lse_neg) {
  const int64_t B = static_cast<int64_t>(sl.count.size());
  NcaRows out{std::vector<double>(B, 0.0), std::vector<double>(B, kNegInf), std::vector<double>(B, 0.0)};
  for (int64_t i = 0; i < B; ++i) {
    if (sl.count[i] == 0) continue;
    const double log_r = log_add_exp(lse_neg[i], sl.lse_dup[i]) - sl.lse_pos[i];  // log R_i, -inf: P_i = V_i
    // l = log1p(R) = softplus(log R); 1 - exp(-l) = R / (1 + R) = sigmoid(log R)
    out.loss[i] = log_r > 0 ? log_r + std::log1p(std::exp(-log_r)) : std::log1p(std::exp(log_r));
    out.pos_factor[i] = log_r > 0 ? 1.0 / (1.0 + std::exp(-log_r)) : std::exp(log_r) / (1.0 + std::exp(log_r));
    out.lse_v[i] = sl.lse_pos[i] + out.loss[i];
  }
  return out;
}

// LSE_{N_i}(a) per row in double (-inf for a row without negatives) from the merged pass.
std::vector<double> lse_of(const cpu::LseMerged& merged) {
  const Tensor lse = (merged.m.to(at::kDouble) + merged.sum.log()).contiguous();
  const double* p = lse.data_ptr<double>();
  return std::vector<double>(p, p + lse.numel());
}

std::tuple<Tensor, Tensor, Tensor> nca_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                               const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                               int64_t ref_valid, double scale, double pos_eps, bool need_grad,
                                               bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(scale > 0, "scale: expected > 0, got ", scale);
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  const int64_t B = in.B;
  const float a_scale = cpu::logit_scale_f32(2.0 * scale), pos_thr = static_cast<float>(1.0 - pos_eps);
  const NcaSameLabel sl = nca_same_label(in, a_scale, pos_thr);
  const auto plan = cpu::plan_tiles(B, in.n);
  const cpu::LseMerged neg =
      cpu::lse_merge(cpu::lse_pass(in, plan, a_scale, pos_thr, need_grad, /*negatives_only=*/true));
  const std::vector<double> lse_neg = lse_of(neg);
  const NcaRows rows = nca_rows(sl, lse_neg);
  const auto f32 = in.x32.options();
  Tensor loss = at::zeros({B}, f32);
  Tensor counts = at::zeros({B, 2}, f32.dtype(at::kInt));
  const Tensor n_neg = neg.counts.select(1, 1).contiguous();
  float* lp = loss.data_ptr<float>();
  int32_t* cp = counts.data_ptr<int32_t>();
  for (int64_t i = 0; i < B; ++i) {
    if (sl.count[i] == 0) continue;  // 0 and counts (0, 0), as supcon
    lp[i] = static_cast<float>(rows.loss[i]);
    cp[2 * i] = static_cast<int32_t>(sl.count[i]);
    cp[2 * i + 1] = static_cast<int32_t>(n_neg.data_ptr<int64_t>()[i]);
  }
  if (!need_grad) return {loss, at::empty({0}, f32), counts};
  // grad_i = a_scale ( G_N exp(m_N - LSE_V) + sum_dup exp(a_d - LSE_V) r_d
  //                    - pos_factor sum_P exp(a_p - LSE_P) r_p ); 0 without positives
  Tensor grad = neg.g;
  Tensor w_neg = at::zeros({B, 1}, f32);
  std::vector<float> coef(sl.cand.col.size(), 0.f);
  const float* m_n = neg.m.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i) {
    if (sl.count[i] == 0) continue;
    if (m_n[i] != -cpu::kLseInf) w_neg.data_ptr<float>()[i] = static_cast<float>(std::exp(m_n[i] - rows.lse_v[i]));
    for (int64_t k = sl.cand.start[i]; k < sl.cand.start[i + 1]; ++k)
      coef[k] = static_cast<float>(sl.is_pos(k) ? -rows.pos_factor[i] * std::exp(sl.logit(k) - sl.lse_pos[i])
                                                : std::exp(sl.logit(k) - rows.lse_v[i]));
  }
  grad.mul_(w_neg);
  cpu::add_candidate_rows(in, sl.cand, coef, grad);
  grad.mul_(a_scale);
  return {loss, grad, counts};
}

std::tuple<Tensor, Tensor> nca_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                       const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                       int64_t ref_valid, double scale, double pos_eps, const Tensor& grad_rows,
                                       bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(scale > 0, "scale: expected > 0, got ", scale);
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  const int64_t B = in.B;
  const float a_scale = cpu::logit_scale_f32(2.0 * scale), pos_thr = static_cast<float>(1.0 - pos_eps);
  const NcaSameLabel sl = nca_same_label(in, a_scale, pos_thr);
  const auto plan = cpu::plan_tiles(B, in.n);
  const NcaRows rows =
      nca_rows(sl, lse_of(cpu::lse_merge(cpu::lse_pass(in, plan, a_scale, pos_thr, false, /*negatives_only=*/true))));
  // g_i = dL/dl_i 2 scale, 0 for a row without positives
  const Tensor gr = grad_rows.to(at::kFloat).contiguous();
  std::vector<float> g(B), lse_vf(B);
  for (int64_t i = 0; i < B; ++i) {
    g[i] = sl.count[i] > 0 ? gr.data_ptr<float>()[i] * a_scale : 0.f;
    lse_vf[i] = sl.count[i] > 0 ? static_cast<float>(rows.lse_v[i]) : 0.f;
  }
  const int32_t* y = in.y_ptr();
  return cpu::coefficient_backward(in, ref.size(0), [&](int64_t, int64_t c0, int64_t w, Tensor& c,
                                                        cpu::TileScratch&) {
    float* cp = c.data_ptr<float>();
    const int32_t* z = in.z_ptr() + c0;
    for (int64_t i = 0; i < B; ++i) {
      float* crow = cp + i * w;
      if (g[i] == 0.f) {
        std::fill(crow, crow + w, 0.f);
        continue;
      }
      // softmax_V on the tile's S: the negatives' coefficients; the same-label columns'
      // are set from their dot products below, and the anchor's own column is not in V_i
      cpu::lse_softmax_row(crow, nullptr, w, z, y[i], a_scale, pos_thr, lse_vf[i]);
      const int64_t self_col = in.self_col(i) - c0;
      if (self_col >= 0 && self_col < w) crow[self_col] = 0.f;
      const auto first = sl.cand.col.begin() + sl.cand.start[i], last = sl.cand.col.begin() + sl.cand.start[i + 1];
      for (auto it = std::lower_bound(first, last, c0); it != last && *it < c0 + w; ++it) {
        const int64_t k = it - sl.cand.col.begin();
        const double coef = sl.is_pos(k) ? -rows.pos_factor[i] * std::exp(sl.logit(k) - sl.lse_pos[i])
                                         : std::exp(sl.logit(k) - rows.lse_v[i]);
        crow[*it - c0] = static_cast<float>(coef);
      }
      for (int64_t j = 0; j < w; ++j) crow[j] *= g[i];
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("nca_fwd", &nca_fwd_cpu);
  m.impl("nca_bwd", &nca_bwd_cpu);
}

}  // namespace xbm_kernels
