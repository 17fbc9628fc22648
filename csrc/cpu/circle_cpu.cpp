// Fused circle loss (pair form, as pytorch-metric-learning's CircleLoss) over a reference set
// on the CPU (CONTRACT.md section 1):
//   lp_ij = -gamma [1 + m - S_ij]_+ (S_ij - (1 - m))  on P_i,  ln_ij = gamma [S_ij + m]_+ (S_ij - m)  on N_i
//   L_i = LSE_{P_i} lp + LSE_{N_i} ln,  l_i = softplus(L_i)  (0 when P_i or N_i is empty)
//   dl_i/dS_ij = sigmoid(L_i) softmax_{set(j)}(logit)_j k_ij,  k = -gamma [1 + m - S]_+ on P,
//   gamma [S + m]_+ on N (the [.]_+ factors are constants for the gradient).
// Forward: ONE pass over the memory with two online log-sum-exps (running max, sum, and the
// weighted rows G = sum exp(logit - max) k r, rescaled when the max grows), one per set; the
// negatives' G through the tile GEMM, the positives' (usually few) through row adds. Splits
// merge (max, sum, G) in order. dl_i/dx_i = sigmoid(L_i) (G_P / sum_P + G_N / sum_N). The
// reference-side gradient (in-batch loss) recomputes: pass 1 for each set's max and sum, pass 2
// for C = dl/dS per tile, dX = C R, dR = C^T X, the softmax weights as exp(logit - max) / sum
// (not exp(logit - LSE): an LSE of several hundred rounded to fp32 would cost its 2^-24
// relative error in every weight).
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct CircleParams {
  float m, gamma, pos_thr;
  // The logit and its slope k of a positive / negative pair of similarity v.
  void pos(float v, float& logit, float& k) const {
    k = -gamma * std::max(0.f, 1.f + m - v);
    logit = k * (v - (1.f - m));
  }
  void neg(float v, float& logit, float& k) const {
    k = gamma * std::max(0.f, v + m);
    logit = k * (v - m);
  }
};

// Per split running state of each row; index 0 the positives, 1 the negatives.
struct CircleSplits {
  Tensor mx[2];     // (P, B) f32 running max of the set's logits
  Tensor sum[2];    // (P, B) f64 sum of exp(logit - max)
  Tensor counts;    // (P, B, 2) int64 |P_i|, |N_i|
  Tensor g[2];      // (P, B, D) f32 sum of exp(logit - max) k r over the set, or undefined
};

// The scale that brings a sum kept at max `old` to max `now` (1 while both are -inf).
inline float rescale(float old, float now) { return now == -kInf ? 1.f : std::exp(old - now); }

// One tile of the pass: updates the running state of every row; with coef != nullptr writes
// the tile's coefficients exp(logit - max_new) k into `s` (negatives) and `coef` (positives),
// 0 elsewhere, and each row's rescale factors into scale_p / scale_n. Returns the number of
// positive pairs in the tile.
int64_t circle_tile(float* s, float* coef, int64_t w, int64_t c0, const cpu::LossInputs& in, const CircleParams& prm,
                    float* mx_p, float* mx_n, double* sum_p, double* sum_n, int64_t* counts, float* scale_p,
                    float* scale_n) {
  const int32_t* y = in.y_ptr();
  const int32_t* z = in.z_ptr() + c0;
  int64_t tile_pos = 0;
  for (int64_t i = 0; i < in.B; ++i) {
    float* row = s + i * w;
    float* crow = coef ? coef + i * w : nullptr;
    const int64_t self_col = in.self_col(i) - c0;
    // First sweep: the tile's largest logit of each set.
    float top_p = -kInf, top_n = -kInf;
    for (int64_t j = 0; j < w; ++j) {
      if (j == self_col) continue;
      const float v = row[j];
      float logit, k;
      if (z[j] == y[i]) {
        if (!(v < prm.pos_thr)) continue;
        prm.pos(v, logit, k);
        top_p = std::max(top_p, logit);
      } else {
        prm.neg(v, logit, k);
        top_n = std::max(top_n, logit);
      }
    }
    const float new_p = std::max(mx_p[i], top_p), new_n = std::max(mx_n[i], top_n);
    const float rp = rescale(mx_p[i], new_p), rn = rescale(mx_n[i], new_n);
    // Second sweep: the exponentials, summed in double per row.
    double acc_p = 0, acc_n = 0;
    int64_t np = 0, nn = 0;
    for (int64_t j = 0; j < w; ++j) {
      const float v = row[j];
      float c_pos = 0.f, c_neg = 0.f;
      if (j != self_col) {
        float logit, k;
        if (z[j] == y[i]) {
          if (v < prm.pos_thr) {
            prm.pos(v, logit, k);
            const float e = std::exp(logit - new_p);
            acc_p += e;
            c_pos = e * k;
            ++np;
          }
        } else {
          prm.neg(v, logit, k);
          const float e = std::exp(logit - new_n);
          acc_n += e;
          c_neg = e * k;
          ++nn;
        }
      }
      row[j] = c_neg;
      if (crow) crow[j] = c_pos;
    }
    sum_p[i] = sum_p[i] * rp + acc_p;
    sum_n[i] = sum_n[i] * rn + acc_n;
    mx_p[i] = new_p;
    mx_n[i] = new_n;
    scale_p[i] = rp;
    scale_n[i] = rn;
    counts[2 * i] += np;
    counts[2 * i + 1] += nn;
    tile_pos += np;
  }
  return tile_pos;
}

CircleSplits circle_pass(const cpu::LossInputs& in, const cpu::TilePlan& plan, const CircleParams& prm,
                         bool accumulate) {
  const int64_t B = in.B, D = in.D;
  const auto f32 = in.x32.options();
  CircleSplits st;
  for (int set = 0; set < 2; ++set) {
    st.mx[set] = at::full({plan.splits, B}, -kInf, f32);
    st.sum[set] = at::zeros({plan.splits, B}, f32.dtype(at::kDouble));
    if (accumulate) st.g[set] = at::zeros({plan.splits, B, D}, f32);
  }
  st.counts = at::zeros({plan.splits, B, 2}, f32.dtype(at::kLong));
  Tensor scales = at::empty({plan.splits, 2, B}, f32);
  cpu::ScratchPool scratch(in, plan);
  cpu::for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    Tensor c_neg = scratch[p].similarity(in, c0, w);
    Tensor c_pos = scratch[p].aux_tile(B, w);
    Tensor sc = scales[p];
    const int64_t npos = circle_tile(
        c_neg.data_ptr<float>(), accumulate ? c_pos.data_ptr<float>() : nullptr, w, c0, in, prm,
        st.mx[0][p].data_ptr<float>(), st.mx[1][p].data_ptr<float>(), st.sum[0][p].data_ptr<double>(),
        st.sum[1][p].data_ptr<double>(), st.counts[p].data_ptr<int64_t>(), sc[0].data_ptr<float>(),
        sc[1].data_ptr<float>());
    if (accumulate) {
      scratch[p].add_product(in, c_neg, c0, w, st.g[1][p].mul_(sc[1].unsqueeze(1)));
      cpu::add_sparse_rows(scratch[p], in, c_pos, c0, st.g[0][p].mul_(sc[0].unsqueeze(1)), npos);
    }
  });
  return st;
}

struct CircleRows {
  Tensor loss;     // (B,) f32
  Tensor counts;   // (B, 2) int64
  Tensor active;   // (B,) bool: P_i and N_i both non-empty
  Tensor lse[2];   // (B,) f64 LSE of each set (0 where the row is not active)
  Tensor top[2];   // (B,) f32 the set's largest logit (0 where the row is not active)
  Tensor sum[2];   // (B,) f64 sum of exp(logit - top) over the set (1 where the row is not active)
  Tensor sig;      // (B,) f64 sigmoid(L_i), 0 where not active
  Tensor grad;     // (B, D) f32 dl_i/dx_i, if accumulated
};

// Merges the splits in order and finishes each row.
CircleRows circle_merge(const CircleSplits& st) {
  const int64_t P = st.mx[0].size(0);
  CircleRows out;
  out.counts = cpu::sum_splits(st.counts);
  out.active = out.counts.select(1, 0).gt(0).logical_and(out.counts.select(1, 1).gt(0));
  Tensor zero = at::zeros({}, st.sum[0].options());
  Tensor scale[2], sum[2];
  for (int set = 0; set < 2; ++set) {
    Tensor top = std::get<0>(st.mx[set].max(0));                              // exact in any order
    scale[set] = at::exp(st.mx[set] - top.unsqueeze(0)).nan_to_num_(0.f);      // -inf - -inf: 0
    sum[set] = cpu::sum_splits(st.sum[set] * scale[set].to(at::kDouble));
    out.lse[set] = at::where(out.active, top.to(at::kDouble) + sum[set].log(), zero);
    out.top[set] = at::where(out.active, top, zero.to(at::kFloat));
    out.sum[set] = at::where(out.active, sum[set], at::ones({}, zero.options()));
  }
  Tensor total = out.lse[0] + out.lse[1];
  // softplus(t) = max(t, 0) + log1p(exp(-|t|))
  Tensor softplus = total.clamp_min(0) + at::log1p(at::exp(-total.abs()));
  out.loss = at::where(out.active, softplus, zero).to(at::kFloat);
  out.sig = at::where(out.active, at::sigmoid(total), zero);
  if (st.g[0].defined()) {
    Tensor grad;
    for (int set = 0; set < 2; ++set) {
      Tensor g = st.g[set][0].mul(scale[set][0].unsqueeze(1));
      for (int64_t p = 1; p < P; ++p) g.add_(st.g[set][p].mul(scale[set][p].unsqueeze(1)));
      Tensor factor = at::where(out.active, out.sig / sum[set], zero).to(at::kFloat).unsqueeze(1);
      g.mul_(factor);
      grad = set == 0 ? g : grad.add_(g);
    }
    out.grad = grad;
  }
  return out;
}

CircleParams params(double m, double gamma, double pos_eps) {
  TORCH_CHECK(gamma > 0, "gamma: expected > 0, got ", gamma);
  return {static_cast<float>(m), static_cast<float>(gamma), static_cast<float>(1.0 - pos_eps)};
}

std::tuple<Tensor, Tensor, Tensor> circle_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                  const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                                  int64_t ref_valid, double m, double gamma, double pos_eps,
                                                  bool need_grad, bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const CircleParams prm = params(m, gamma, pos_eps);
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  const CircleRows rows = circle_merge(circle_pass(in, cpu::plan_tiles(in.B, in.n), prm, need_grad));
  Tensor grad = need_grad ? rows.grad : at::empty({0}, rows.loss.options());
  return {rows.loss, grad, rows.counts.to(at::kInt)};
}

std::tuple<Tensor, Tensor> circle_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                          const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                          int64_t ref_valid, double m, double gamma, double pos_eps,
                                          const Tensor& grad_rows, bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const CircleParams prm = params(m, gamma, pos_eps);
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  const CircleRows rows = circle_merge(circle_pass(in, cpu::plan_tiles(in.B, in.n), prm, false));
  // Pass 2: C_ij = g_i sigmoid(L_i) exp(logit_ij - top_set) / sum_set k_ij; rows not active: 0.
  const Tensor gs = (grad_rows.to(at::kDouble) * rows.sig).to(at::kFloat).contiguous();
  const Tensor top_p = rows.top[0].contiguous(), top_n = rows.top[1].contiguous();
  const Tensor wp = (grad_rows.to(at::kDouble) * rows.sig / rows.sum[0]).to(at::kFloat).contiguous();
  const Tensor wn = (grad_rows.to(at::kDouble) * rows.sig / rows.sum[1]).to(at::kFloat).contiguous();
  const float* gs_p = gs.data_ptr<float>();
  const float* tp = top_p.data_ptr<float>();
  const float* tn = top_n.data_ptr<float>();
  const float* wp_p = wp.data_ptr<float>();
  const float* wn_p = wn.data_ptr<float>();
  const int32_t* y = in.y_ptr();
  return cpu::coefficient_backward(in, ref.size(0), [&](int64_t, int64_t c0, int64_t w, Tensor& c,
                                                        cpu::TileScratch&) {
    float* cp = c.data_ptr<float>();
    const int32_t* z = in.z_ptr() + c0;
    for (int64_t i = 0; i < in.B; ++i) {
      float* crow = cp + i * w;
      if (gs_p[i] == 0.f) {  // no gradient, or the row is not active (its LSEs are 0 there)
        std::fill(crow, crow + w, 0.f);
        continue;
      }
      const int64_t self_col = in.self_col(i) - c0;
      for (int64_t j = 0; j < w; ++j) {
        const float v = crow[j];
        float logit, k, c_ij = 0.f;
        if (j != self_col) {
          if (z[j] == y[i]) {
            if (v < prm.pos_thr) {
              prm.pos(v, logit, k);
              c_ij = wp_p[i] * std::exp(logit - tp[i]) * k;
            }
          } else {
            prm.neg(v, logit, k);
            c_ij = wn_p[i] * std::exp(logit - tn[i]) * k;
          }
        }
        crow[j] = c_ij;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("circle_fwd", &circle_fwd_cpu);
  m.impl("circle_bwd", &circle_bwd_cpu);
}

}  // namespace xbm_kernels
