// Fused supervised-contrastive (InfoNCE) loss over a reference set on the CPU (CONTRACT.md
// section 1):  l_i = LSE_i - 1/|P_i| sum_{P_i} S_ip / tau,  LSE_i = log sum_{V_i} exp(S_ia / tau)
//   dl_i/dx_i = 1/tau ( sum_{V_i} softmax_ia r_a - 1/|P_i| sum_{P_i} r_p )
// Forward: ONE pass with an online log-sum-exp (running max m, sum s, and the softmax
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

#include "cpu/simd.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Per split running state of each row.
struct SupconSplits {
  Tensor m, s;        // (P, B) f32 running max of S/tau, f64 sum of exp(S/tau - m)
  Tensor pos_sum;     // (P, B) f64 sum of positive S / tau (fp32 products)
  Tensor counts;      // (P, B, 2) int64 |P_i|, |N_i|
  Tensor g, gpos;     // (P, B, D) f32 softmax numerator x rows, positive rows; or undefined
};

#if XBM_CPU_VECTOR
// One row of supcon_tile whose columns are all valid (its own column is elsewhere), L
// lanes at a time (the CPU's widest, simd.h); the exponentials by Vec::exp. Returns the row's
// positive count.
template <int L>
XBM_INLINE int64_t supcon_row_vec_lanes(float* row, float* pos_row, int64_t w, const int32_t* z, int32_t yi,
                                        float inv_tau, float pos_thr, float& m, double& sum, double& pos_sum,
                                        int64_t* counts, float& rescale) {
  using V = cpu::Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  int64_t j = 0;
  F mx = V::splat(-kInf);
  for (; j + L <= w; j += L) {
    const F v = V::load(row + j);
    mx = V::select(V::gt(v, mx), v, mx);
  }
  float vmax = V::max(mx);
  for (; j < w; ++j) vmax = std::max(vmax, row[j]);
  const float m_new = std::max(m, vmax * inv_tau);  // max(v) / tau = max(v / tau): rounding is monotone
  rescale = std::exp(m - m_new);                    // 0 when m was -inf
  double acc = 0, psum = 0;
  float np = 0.f, nn = 0.f;
  for (j = 0; j < w;) {
    // float lanes over blocks of up to 256 columns, each block's sum added in double
    const int64_t end = std::min(w, j + 256);
    F acc4 = V::splat(0.f), ps4 = acc4, np4 = acc4, nn4 = acc4;
    for (; j + L <= end; j += L) {
      const F v = V::load(row + j);
      const F e = V::exp(v * inv_tau - m_new);
      const I same = V::eq(V::load(z + j), yi);
      const F pos = V::one_where(same & V::lt(v, pos_thr));
      acc4 += e;
      ps4 += pos * (v * inv_tau);  // S / tau: the same products as m
      np4 += pos;
      nn4 += V::one_where(~same);
      V::store(row + j, e);
      if (pos_row) V::store(pos_row + j, pos);
    }
    float a = V::sum(acc4), ps = V::sum(ps4);
    np += V::sum(np4);
    nn += V::sum(nn4);
    for (; j < end; ++j) {  // the last columns of the row
      const float v = row[j];
      const bool same = z[j] == yi, pos = same && v < pos_thr;
      const float e = std::exp(v * inv_tau - m_new);
      a += e;
      ps += pos ? v * inv_tau : 0.f;
      np += pos;
      nn += !same;
      row[j] = e;
      if (pos_row) pos_row[j] = pos ? 1.f : 0.f;
    }
    acc += a;
    psum += ps;
  }
  sum = sum * rescale + acc;
  m = m_new;
  pos_sum += psum;
  counts[0] += static_cast<int64_t>(np);
  counts[1] += static_cast<int64_t>(nn);
  return static_cast<int64_t>(np);
}
XBM_CPU_DISPATCH(int64_t, supcon_row_vec,
                 (float* row, float* pos_row, int64_t w, const int32_t* z, int32_t yi, float inv_tau, float pos_thr,
                  float& m, double& sum, double& pos_sum, int64_t* counts, float& rescale),
                 (row, pos_row, w, z, yi, inv_tau, pos_thr, m, sum, pos_sum, counts, rescale))
#endif

// Pass over one tile: updates the running state; with weights != nullptr writes
// exp(S/tau - m_new) into s (0 outside V_i) and the positive indicator into pos_tile.
// Returns the number of positives in the tile.
int64_t supcon_tile(float* s, float* pos_tile, int64_t B, int64_t w, int64_t c0, const cpu::LossInputs& in,
                    float inv_tau, float pos_thr, float* m, double* sum, double* pos_sum, int64_t* counts,
                    float* rescale) {
  const int32_t* y = in.y_ptr();
  const int32_t* z = in.z_ptr() + c0;
  int64_t tile_pos = 0;
  for (int64_t i = 0; i < B; ++i) {
    float* row = s + i * w;
    const int64_t self_col = in.self_col(i) - c0;
#if XBM_CPU_VECTOR
    if (self_col < 0 || self_col >= w) {  // every column valid: the vector path
      tile_pos += supcon_row_vec(row, pos_tile ? pos_tile + i * w : nullptr, w, z, y[i], inv_tau, pos_thr, m[i],
                                 sum[i], pos_sum[i], counts + 2 * i, rescale[i]);
      continue;
    }
#endif
    // The row whose own column is in this tile (once per row and pass), and the scalar
    // definition of the vector path.
    float tile_max = -kInf;
    for (int64_t j = 0; j < w; ++j)
      if (j != self_col) tile_max = std::max(tile_max, row[j] * inv_tau);
    const float m_new = std::max(m[i], tile_max);
    const float scale = m_new == -kInf ? 1.f : std::exp(m[i] - m_new);
    rescale[i] = scale;
    double acc = 0, psum = 0;
    int64_t np = 0, nn = 0;
    for (int64_t j = 0; j < w; ++j) {
      const float v = row[j];
      const bool valid = j != self_col, same = z[j] == y[i];
      const bool pos = valid && same && v < pos_thr;
      const float e = valid ? std::exp(v * inv_tau - m_new) : 0.f;
      acc += e;
      psum += pos ? v * inv_tau : 0.f;
      np += pos;
      nn += valid && !same;
      row[j] = e;
      if (pos_tile) pos_tile[i * w + j] = pos ? 1.f : 0.f;
    }
    sum[i] = sum[i] * scale + acc;
    m[i] = m_new;
    pos_sum[i] += psum;
    counts[2 * i] += np;
    counts[2 * i + 1] += nn;
    tile_pos += np;
  }
  return tile_pos;
}

SupconSplits supcon_pass(const cpu::LossInputs& in, const cpu::TilePlan& plan, float inv_tau, float pos_thr,
                        bool accumulate) {
  const int64_t B = in.B, D = in.D;
  const auto f32 = in.x32.options();
  SupconSplits st;
  st.m = at::full({plan.splits, B}, -kInf, f32);
  st.s = at::zeros({plan.splits, B}, f32.dtype(at::kDouble));
  st.pos_sum = at::zeros_like(st.s);
  st.counts = at::zeros({plan.splits, B, 2}, f32.dtype(at::kLong));
  if (accumulate) {
    st.g = at::zeros({plan.splits, B, D}, f32);
    st.gpos = at::zeros({plan.splits, B, D}, f32);
  }
  Tensor rescale = at::empty({plan.splits, B}, f32);
  cpu::ScratchPool scratch(in, plan);
  cpu::for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    Tensor e = scratch[p].similarity(in, c0, w);
    Tensor pos = scratch[p].aux_tile(B, w);
    const int64_t npos = supcon_tile(e.data_ptr<float>(), accumulate ? pos.data_ptr<float>() : nullptr, B, w, c0,
                                     in, inv_tau, pos_thr, st.m[p].data_ptr<float>(), st.s[p].data_ptr<double>(),
                                     st.pos_sum[p].data_ptr<double>(), st.counts[p].data_ptr<int64_t>(),
                                     rescale[p].data_ptr<float>());
    if (accumulate) {
      scratch[p].add_product(in, e, c0, w, st.g[p].mul_(rescale[p].unsqueeze(1)));
      cpu::add_sparse_rows(scratch[p], in, pos, c0, st.gpos[p], npos);  // positives: usually few
    }
  });
  return st;
}

struct SupconRows {
  Tensor lse;      // (B,) f32
  Tensor loss;     // (B,) f32
  Tensor counts;   // (B, 2) int64, zero for rows without positives
  Tensor g;        // (B, D) f32 softmax-weighted rows (normalised), if accumulated
  Tensor gpos;     // (B, D) f32 sum of positive rows, if accumulated
};

// Merges the splits in order and finishes each row.
SupconRows supcon_merge(const SupconSplits& st, float inv_tau) {
  const int64_t P = st.m.size(0);
  Tensor m = std::get<0>(st.m.max(0));  // exact in any order
  Tensor scale = at::exp(st.m - m.unsqueeze(0)).nan_to_num_(0.f);  // -inf - -inf rows: 0
  Tensor s = (st.s * scale.to(at::kDouble));
  Tensor sum = cpu::sum_splits(s);
  SupconRows out;
  out.counts = cpu::sum_splits(st.counts);
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
  if (st.g.defined()) {
    Tensor g = st.g[0].mul(scale[0].unsqueeze(1));
    for (int64_t p = 1; p < P; ++p) g.add_(st.g[p].mul(scale[p].unsqueeze(1)));
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
  const float inv_tau = static_cast<float>(1.0 / temperature);
  const auto plan = cpu::plan_tiles(in.B, in.n);
  const SupconRows rows = supcon_merge(supcon_pass(in, plan, inv_tau, float(1.0 - pos_eps), need_grad), inv_tau);
  Tensor grad = need_grad ? (rows.g - rows.gpos).mul_(inv_tau) : at::empty({0}, rows.loss.options());
  return {rows.loss, grad, rows.counts.to(at::kInt)};
}

// One row of the backward's coefficients: the softmax exp(S / tau - LSE) over S, the
// positive indicator into prow (before the row's own column is cleared).
template <int L>
XBM_INLINE void backward_row_lanes(float* crow, float* prow, int64_t w, const int32_t* z, int32_t yi, float inv_tau,
                                   float pos_thr, float lse) {
  int64_t j = 0;
#if XBM_CPU_VECTOR
  using V = cpu::Vec<L>;
  for (; j + L <= w; j += L) {
    const typename V::F v = V::load(crow + j);
    V::store(prow + j, V::one_where(V::eq(V::load(z + j), yi) & V::lt(v, pos_thr)));
    V::store(crow + j, V::exp(v * inv_tau - lse));
  }
#endif
  for (; j < w; ++j) {
    const float v = crow[j];
    prow[j] = (z[j] == yi && v < pos_thr) ? 1.f : 0.f;
    crow[j] = std::exp(v * inv_tau - lse);
  }
}
XBM_CPU_DISPATCH(void, backward_row,
                 (float* crow, float* prow, int64_t w, const int32_t* z, int32_t yi, float inv_tau, float pos_thr,
                  float lse),
                 (crow, prow, w, z, yi, inv_tau, pos_thr, lse))

std::tuple<Tensor, Tensor> supcon_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                          const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                          int64_t ref_valid, double temperature, double pos_eps,
                                          const Tensor& grad_rows, bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  const int64_t B = in.B;
  const float inv_tau = static_cast<float>(1.0 / temperature), pos_thr = static_cast<float>(1.0 - pos_eps);
  const auto plan = cpu::plan_tiles(B, in.n);
  const SupconRows rows = supcon_merge(supcon_pass(in, plan, inv_tau, pos_thr, false), inv_tau);
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
      backward_row(crow, prow, w, z, y[i], inv_tau, pos_thr, lse_p[i]);
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
