// Fused supervised-contrastive (InfoNCE) loss over a reference set on the CPU (CONTRACT.md
// section 1):  l_i = LSE_i - 1/|P_i| sum_{P_i} S_ip / tau,  LSE_i = log sum_{V_i} exp(S_ia / tau)
//   dl_i/dx_i = 1/tau ( sum_{V_i} softmax_ia r_a - 1/|P_i| sum_{P_i} r_p )
// Forward: ONE pass with an online log-sum-exp (cpu/online_lse.h: running max m, sum s, and the softmax
// numerator G = sum exp(S/tau - m) r rescaled when m grows) plus the positives' row sum,
// so the memory is read once and the gradient comes out of the forward (the FlashAttention-
// style alternative, a backward that recomputes S, reads the memory twice for the same
// FLOPs). Splits merge their (m, s, G) in order. The reference-side gradient (in-batch
// loss) recomputes: pass 1 for LSE, pass 2 for C = softmax - [pos]/|P|, dX = C R, dR = C^T X.
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/online_lse.h"
#include "cpu/simd.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;

struct SupconRows {
  Tensor lse;      // (B,) f32
  Tensor loss;     // (B,) f32
  Tensor counts;   // (B, 2) int64, zero for rows without positives
  Tensor g;        // (B, D) f32 softmax-weighted rows (normalised), if accumulated
  Tensor gpos;     // (B, D) f32 sum of positive rows, if accumulated
};

// Merges the splits in order and finishes each row.
SupconRows supcon_merge(const cpu::LseSplits& st, float inv_tau) {
  const cpu::LseMerged merged = cpu::lse_merge(st);
  const Tensor& m = merged.m;
  const Tensor& sum = merged.sum;
  SupconRows out;
  out.counts = merged.counts;
  Tensor n_pos = out.counts.select(1, 0);
  Tensor has_pos = n_pos.gt(0);
  Tensor lse = (m.to(at::kDouble) + sum.log());
  Tensor mean_pos = cpu::sum_splits(st.pos_sum) / n_pos.clamp_min(1).to(at::kDouble);
  Tensor zero = at::zeros({}, lse.options());
  // log(s) + (m - mean_P S / tau) rather than lse - mean: no cancellation of two large terms,
  // >= 0 (m is the largest S / tau, from the same fp32 products as the positives' sum), and
  // 0 when one positive dominates beyond fp32 resolution (s rounds to 1 in fp32), as
  // pytorch-metric-learning's row-max-shifted fp32 form gives.
  Tensor shifted = sum.to(at::kFloat).log().to(at::kDouble) + (m.to(at::kDouble) - mean_pos);
  out.loss = at::where(has_pos, shifted.clamp_min(0), zero).to(at::kFloat);
  out.lse = at::where(has_pos, lse, zero).to(at::kFloat);
  out.counts.mul_(has_pos.unsqueeze(1));
  if (merged.g.defined()) {
    Tensor g = merged.g;
    Tensor inv_sum = at::where(has_pos, sum.reciprocal(), zero).to(at::kFloat).unsqueeze(1);
    Tensor inv_np = at::where(has_pos, n_pos.clamp_min(1).to(at::kDouble).reciprocal(), zero).to(at::kFloat);
    out.g = g.mul_(inv_sum);
    out.gpos = cpu::sum_splits(st.gpos).mul_(inv_np.unsqueeze(1));
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor> supcon_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                  const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                                  int64_t ref_valid, double temperature, double pos_eps,
                                                  bool need_grad, bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  const float inv_tau = cpu::logit_scale_f32(1.0 / temperature);
  const auto plan = cpu::plan_tiles(in.B, in.n);
  const SupconRows rows = supcon_merge(cpu::lse_pass(in, plan, inv_tau, float(1.0 - pos_eps), need_grad), inv_tau);
  Tensor grad = need_grad ? (rows.g - rows.gpos).mul_(inv_tau) : at::empty({0}, rows.loss.options());
  return {rows.loss, grad, rows.counts.to(at::kInt)};
}

std::tuple<Tensor, Tensor> supcon_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                          const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                          int64_t ref_valid, double temperature, double pos_eps,
                                          const Tensor& grad_rows, bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  const int64_t B = in.B;
  const float inv_tau = cpu::logit_scale_f32(1.0 / temperature), pos_thr = static_cast<float>(1.0 - pos_eps);
  const auto plan = cpu::plan_tiles(B, in.n);
  const SupconRows rows = supcon_merge(cpu::lse_pass(in, plan, inv_tau, pos_thr, false), inv_tau);
  // Pass 2: C_ij = g_i / tau (exp(S_ij / tau - LSE_i) - [j in P_i] / |P_i|), rows without positives 0.
  Tensor n_pos = rows.counts.select(1, 0);
  Tensor g = grad_rows.to(at::kFloat).mul(n_pos.gt(0)).mul_(inv_tau);
  Tensor g_pos = (g / n_pos.clamp_min(1).to(at::kFloat)).unsqueeze(1);
  Tensor lse = rows.lse.contiguous();
  const float* lse_p = lse.data_ptr<float>();
  const Tensor g_rows = g.contiguous();
  const float* g_p = g_rows.data_ptr<float>();
  const int32_t* y = in.y_ptr();
  return cpu::coefficient_backward(in, ref.size(0), [&](int64_t, int64_t c0, int64_t w, Tensor& c,
                                                        cpu::TileScratch& scratch) {
    Tensor pos = scratch.aux_tile(B, w);
    float* cp = c.data_ptr<float>();
    float* pp = pos.data_ptr<float>();
    const int32_t* z = in.z_ptr() + c0;
    for (int64_t i = 0; i < B; ++i) {
      float* crow = cp + i * w;
      float* prow = pp + i * w;
      if (g_p[i] == 0.f) {  // no gradient (or no positives: LSE is 0 there, exp could overflow)
        std::fill(crow, crow + w, 0.f);
        std::fill(prow, prow + w, 0.f);
        continue;
      }
      cpu::lse_softmax_row(crow, prow, w, z, y[i], inv_tau, pos_thr, lse_p[i]);
      const int64_t self_col = in.self_col(i) - c0;
      if (self_col >= 0 && self_col < w) crow[self_col] = prow[self_col] = 0.f;  // not in V_i
    }
    c.mul_(g.unsqueeze(1)).sub_(pos.mul_(g_pos));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("supcon_fwd", &supcon_fwd_cpu);
  m.impl("supcon_bwd", &supcon_bwd_cpu);
}

}  // namespace xbm_kernels
