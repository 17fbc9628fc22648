// Fused NT-Xent form (cpu/ntxent.h) over a reference set on the CPU: NT-Xent (InfoNCE per
// positive pair, as pytorch-metric-learning's NTXentLoss, a = 1/tau, f(S) = S) and the tuplet
// margin loss (tuplet_margin_cpu.cpp, f(S) = cos(acos(S) - m)):
//   s_ij = a S_ij,  LZ_i = log sum_{n in N_i} exp(s_in)   (-inf when N_i is empty)
//   l_i = sum_{p in P_i} log(exp(a f_ip) + exp(LZ_i)) - a f_ip = sum_{p in P_i} softplus(LZ_i - a f_ip)
//   dl_i/dS_ip = -a f'_ip sigmoid(LZ_i - a f_ip),  dl_i/dS_in = a w_i exp(s_in - LZ_i),
//   w_i = sum_{p in P_i} sigmoid(LZ_i - a f_ip)
// Pass 1 streams the memory for LZ with an online log-sum-exp over the negatives (running
// max m, sum, and the softmax numerator G = sum exp(s - m) r rescaled when m grows, as in
// supcon_cpu.cpp). Pass 2 visits the positives only: a tile's labels are compared first
// and, when few pairs match (many classes: the usual memory), each matching pair's dot
// product is computed alone, 2 D flops instead of the tile GEMM; tiles where more than
// 1/32 of the pairs match take the GEMM. Then dl_i/dx_i = (1/tau) (w_i G_i / sum_i -
// sum_p sigmoid(.) f'_p r_p), with a = 1/tau. The reference-side gradient (in-batch loss) runs both passes for
// LZ and w, then C = dl/dS per tile: dX = C R, dR = C^T X. Every pass decides a tile's
// sparse or dense form from the labels alone, so all of them see the same S_ip and agree
// on P_i.
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/ntxent.h"
#include "cpu/simd.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;
constexpr float kInf = std::numeric_limits<float>::infinity();

// The valid label-matching columns of one tile, row by row, or `dense` when there are
// more than 1/32 of the tile's pairs (the cut-off of cpu::add_sparse_rows).
struct TileMatches {
  std::vector<int64_t> start;  // B + 1 offsets into cols
  std::vector<int32_t> cols;   // tile columns
  bool dense = false;
};

template <int L>
XBM_INLINE void find_matches_lanes(int64_t B, int64_t w, int64_t c0, const cpu::LossInputs& in, TileMatches& m) {
  const int32_t* y = in.y_ptr();
  const int32_t* z = in.z_ptr() + c0;
  const size_t cap = static_cast<size_t>(B * w / 32);
  m.start.assign(1, 0);
  m.cols.clear();
  m.dense = false;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t self_col = in.self_col(i) - c0;
    const int32_t yi = y[i];
    int64_t j = 0;
#if XBM_CPU_VECTOR
    using V = cpu::Vec<L>;
    for (; j + L <= w; j += L) {  // L labels at a time: most blocks have no match
      if (V::sum(V::one_where(V::eq(V::load(z + j), yi))) == 0.f) continue;
      for (int64_t k = j; k < j + L; ++k)
        if (z[k] == yi && k != self_col) m.cols.push_back(static_cast<int32_t>(k));
    }
#endif
    for (; j < w; ++j)
      if (z[j] == yi && j != self_col) m.cols.push_back(static_cast<int32_t>(j));
    if (m.cols.size() > cap) {
      m.dense = true;
      return;
    }
    m.start.push_back(static_cast<int64_t>(m.cols.size()));
  }
}
XBM_CPU_DISPATCH(void, find_matches, (int64_t B, int64_t w, int64_t c0, const cpu::LossInputs& in, TileMatches& m),
                 (B, w, c0, in, m))

// Pass 1, per split: running max m of s over the negatives, sum of exp(s - m) (f64),
// |N_i|, and (accumulate) G = sum exp(s - m) r.
struct NegSplits {
  Tensor m, sum, count;  // (P, B) f32, f64, int64
  Tensor g;              // (P, B, D) f32 or undefined
};

// One row of a tile whose columns are all valid: the negatives' running state, their
// weights exp(s - m_new) written over the row (0 elsewhere). Returns the rescale factor of
// the previous state.
template <int L>
XBM_INLINE float neg_row_lanes(float* row, int64_t w, const int32_t* z, int32_t yi, float inv_tau, float& m,
                               double& sum, int64_t& count) {
#if XBM_CPU_VECTOR
  using V = cpu::Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
#endif
  int64_t j = 0;
  float vmax = -kInf;
#if XBM_CPU_VECTOR
  F mx = V::splat(-kInf);
  for (; j + L <= w; j += L) {
    const F v = V::load(row + j);
    mx = V::select(V::ne(V::load(z + j), yi) & V::gt(v, mx), v, mx);
  }
  vmax = V::max(mx);
#endif
  for (; j < w; ++j)
    if (z[j] != yi) vmax = std::max(vmax, row[j]);
  const float m_new = std::max(m, vmax * inv_tau);  // max(v) / tau = max(v / tau): rounding is monotone
  const float rescale = m_new == -kInf ? 1.f : std::exp(m - m_new);  // 0 when m was -inf
  // -inf only with no negative yet: shift by 0 (every weight is 0; a -inf column, the row's own,
  // gives exp(-inf) = 0, not exp(-inf + inf))
  const float shift = m_new == -kInf ? 0.f : m_new;
  double acc = 0;
  float nn = 0.f;
  j = 0;
#if XBM_CPU_VECTOR
  const F zero = V::splat(0.f);
  while (j + L <= w) {  // float lanes over blocks of up to 256 columns, each block's sum added in double
    const int64_t end = std::min(w, j + 256);
    F acc4 = zero, nn4 = zero;
    for (; j + L <= end; j += L) {
      const F v = V::load(row + j);
      const I neg = V::ne(V::load(z + j), yi);
      // other lanes may overflow Vec::exp's range; they are clamped there, then zeroed
      const F e = V::select(neg, V::exp(v * inv_tau - shift), zero);
      acc4 += e;
      nn4 += V::one_where(neg);
      V::store(row + j, e);
    }
    acc += V::sum(acc4);
    nn += V::sum(nn4);
  }
#endif
  for (; j < w; ++j) {
    const bool neg = z[j] != yi;
    const float e = neg ? std::exp(row[j] * inv_tau - shift) : 0.f;
    acc += e;
    nn += neg;
    row[j] = e;
  }
  sum = sum * rescale + acc;
  m = m_new;
  count += static_cast<int64_t>(nn);
  return rescale;
}
XBM_CPU_DISPATCH(float, neg_row,
                 (float* row, int64_t w, const int32_t* z, int32_t yi, float inv_tau, float& m, double& sum,
                  int64_t& count),
                 (row, w, z, yi, inv_tau, m, sum, count))

NegSplits negatives_pass(const cpu::LossInputs& in, const cpu::TilePlan& plan, float inv_tau, bool accumulate) {
  const int64_t B = in.B, D = in.D;
  const auto f32 = in.x32.options();
  NegSplits st;
  st.m = at::full({plan.splits, B}, -kInf, f32);
  st.sum = at::zeros({plan.splits, B}, f32.dtype(at::kDouble));
  st.count = at::zeros({plan.splits, B}, f32.dtype(at::kLong));
  if (accumulate) st.g = at::zeros({plan.splits, B, D}, f32);
  Tensor rescale = at::empty({plan.splits, B}, f32);
  cpu::ScratchPool scratch(in, plan);
  const int32_t* y = in.y_ptr();
  // per split pointers made once, not per tile (an ATen select costs microseconds)
  float* m_all = st.m.data_ptr<float>();
  double* sum_all = st.sum.data_ptr<double>();
  int64_t* count_all = st.count.data_ptr<int64_t>();
  float* rs_all = rescale.data_ptr<float>();
  const std::vector<Tensor> g_split = accumulate ? st.g.unbind(0) : std::vector<Tensor>();
  cpu::for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    Tensor e = scratch[p].similarity(in, c0, w);
    float* ep = e.data_ptr<float>();
    float* m = m_all + p * B;
    double* sum = sum_all + p * B;
    int64_t* count = count_all + p * B;
    float* rs = rs_all + p * B;
    const int32_t* z = in.z_ptr() + c0;
    for (int64_t i = 0; i < B; ++i) {
      // The row's own column, -inf (inv_tau > 0, checked), is no negative's maximum and weighs
      // exp(-inf) = 0; counted as a negative if its label differs, which is taken back.
      const int64_t self_col = in.hide_own_column(ep + i * w, i, c0, w);
      rs[i] = neg_row(ep + i * w, w, z, y[i], inv_tau, m[i], sum[i], count[i]);
      if (self_col >= 0 && z[self_col] != y[i]) --count[i];
    }
    if (accumulate) {
      cpu::scale_rows(g_split[p].data_ptr<float>(), rs, B, D);  // G brought to the rows' new max
      scratch[p].add_product(in, e, c0, w, g_split[p]);
    }
  });
  return st;
}

struct NegRows {
  Tensor lz;     // (B,) f64 log sum_N exp(s), -inf without negatives
  Tensor count;  // (B,) int64 |N_i|
  Tensor g;      // (B, D) f32 sum_N softmax_n r_n (0 without negatives), if accumulated
};

// Merges the splits in order.
NegRows merge_negatives(const NegSplits& st) {
  Tensor m = st.m.amax(0);  // exact in any order
  Tensor scale = at::exp(st.m - m.unsqueeze(0)).nan_to_num_(0.f);  // -inf - -inf rows: 0
  Tensor sum = cpu::sum_splits(st.sum * scale.to(at::kDouble));
  NegRows out;
  out.lz = (m.to(at::kDouble) + sum.log()).contiguous();  // log 0 = -inf without negatives
  out.count = cpu::sum_splits(st.count);
  if (st.g.defined()) {
    Tensor g = st.g[0].mul(scale[0].unsqueeze(1));
    for (int64_t p = 1; p < st.g.size(0); ++p) g.add_(st.g[p].mul(scale[p].unsqueeze(1)));
    Tensor inv_sum = at::where(sum.gt(0), sum.reciprocal(), at::zeros({}, sum.options())).to(at::kFloat);
    out.g = g.mul_(inv_sum.unsqueeze(1));
  }
  return out;
}

// One positive pair: adds its loss term to `loss` and q = sigmoid(LZ - a f(v)) to `weight`;
// returns q f'(v). All 0 without negatives.
inline double positive_pair(double lz, float v, const cpu::PositiveLogit& pl, double& loss, double& weight) {
  if (lz == -std::numeric_limits<double>::infinity()) return 0.0;
  double slope;
  const double d = lz - pl.logit(v, slope);
  const double e = std::exp(-std::abs(d));
  loss += std::max(d, 0.0) + std::log1p(e);  // softplus(d)
  const double q = d >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);  // sigmoid(d)
  weight += q;
  return q * slope;
}

// Pass 2, per split: the loss rows, w_i, |P_i| and (accumulate) sum_p sigmoid(.) f'_p r_p.
struct PosSplits {
  Tensor loss, w, count;  // (P, B) f64, f64, int64
  Tensor gpos;            // (P, B, D) f32 or undefined
};

PosSplits positives_pass(const cpu::LossInputs& in, const cpu::TilePlan& plan, const double* lz,
                        const cpu::PositiveLogit& pl, float pos_thr, bool accumulate) {
  const int64_t B = in.B, D = in.D;
  const auto f32 = in.x32.options();
  PosSplits st;
  st.loss = at::zeros({plan.splits, B}, f32.dtype(at::kDouble));
  st.w = at::zeros_like(st.loss);
  st.count = at::zeros({plan.splits, B}, f32.dtype(at::kLong));
  if (accumulate) st.gpos = at::zeros({plan.splits, B, D}, f32);
  cpu::ScratchPool scratch(in, plan);
  std::vector<TileMatches> matches(plan.splits);
  const float* x = in.x32.data_ptr<float>();
  const int32_t* y = in.y_ptr();
  cpu::for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    TileMatches& mt = matches[p];
    find_matches(B, w, c0, in, mt);
    if (!mt.dense && mt.cols.empty()) return;  // no positives here: no GEMM, no conversion
    double* loss = st.loss[p].data_ptr<double>();
    double* wt = st.w[p].data_ptr<double>();
    int64_t* count = st.count[p].data_ptr<int64_t>();
    float* gpos = accumulate ? st.gpos[p].data_ptr<float>() : nullptr;
    if (!mt.dense) {
      // the named rows read in the memory's dtype (a 16-bit row widened exactly: the same S and
      // sums as on an fp32 copy of the tile, without converting the tile)
      auto pairs = [&](const auto* r) {
        for (int64_t i = 0; i < B; ++i) {
          for (int64_t k = mt.start[i]; k < mt.start[i + 1]; ++k) {
            const auto* rj = r + int64_t(mt.cols[k]) * D;
            const float v = cpu::dot(x + i * D, rj, D);
            if (!(v < pos_thr)) continue;
            ++count[i];
            const double coef = positive_pair(lz[i], v, pl, loss[i], wt[i]);
            if (gpos && coef != 0) {
              const float c = static_cast<float>(coef);
              float* gi = gpos + i * D;
              for (int64_t d = 0; d < D; ++d) gi[d] += c * static_cast<float>(rj[d]);
            }
          }
        }
      };
      const int64_t off = c0 * D;
      if (in.ref.scalar_type() == at::kBFloat16)
        pairs(static_cast<const at::BFloat16*>(in.ref.data_ptr()) + off);
      else if (in.ref.scalar_type() == at::kHalf)
        pairs(static_cast<const at::Half*>(in.ref.data_ptr()) + off);
      else
        pairs(scratch[p].ref_tile(in.ref, c0, w).data_ptr<float>());
      return;
    }
    Tensor s = scratch[p].similarity(in, c0, w);
    Tensor c = scratch[p].aux_tile(B, w);
    const float* sp = s.data_ptr<float>();
    float* cp = c.data_ptr<float>();
    const int32_t* z = in.z_ptr() + c0;
    int64_t npos = 0;
    for (int64_t i = 0; i < B; ++i) {
      const int64_t self_col = in.self_col(i) - c0;
      for (int64_t j = 0; j < w; ++j) {
        const float v = sp[i * w + j];
        double coef = 0;
        if (z[j] == y[i] && j != self_col && v < pos_thr) {
          ++count[i];
          ++npos;
          coef = positive_pair(lz[i], v, pl, loss[i], wt[i]);
        }
        cp[i * w + j] = static_cast<float>(coef);
      }
    }
    if (gpos) cpu::add_sparse_rows(scratch[p], in, c, c0, st.gpos[p], npos);
  });
  return st;
}

struct NtxentRows {
  Tensor loss;    // (B,) f32
  Tensor lz, w;   // (B,) f64
  Tensor counts;  // (B, 2) int64 |P_i|, |N_i|
  Tensor grad;    // (B, D) f32 d(sum_i l_i)/dx, if accumulated
};

NtxentRows ntxent_rows(const cpu::LossInputs& in, const cpu::PositiveLogit& pl, float pos_thr, bool need_grad) {
  const auto plan = cpu::plan_tiles(in.B, in.n);
  const NegRows neg = merge_negatives(negatives_pass(in, plan, pl.scale, need_grad));
  const PosSplits pos = positives_pass(in, plan, neg.lz.data_ptr<double>(), pl, pos_thr, need_grad);
  NtxentRows out;
  out.loss = cpu::sum_splits(pos.loss).to(at::kFloat);
  out.lz = neg.lz;
  out.w = cpu::sum_splits(pos.w);
  out.counts = at::stack({cpu::sum_splits(pos.count), neg.count}, 1);
  if (need_grad) {
    // a (w_i G_i - sum_p sigmoid(.) f'_p r_p)
    out.grad = neg.g.mul_(out.w.to(at::kFloat).unsqueeze(1)).sub_(cpu::sum_splits(pos.gpos)).mul_(pl.scale);
  }
  return out;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> cpu::ntxent_form_fwd(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                        const Tensor& ref_labels,
                                                        const c10::optional<Tensor>& self_index, int64_t ref_valid,
                                                        const PositiveLogit& logit, float pos_thr, bool need_grad) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  NtxentRows rows = ntxent_rows(in, logit, pos_thr, need_grad);
  Tensor grad = need_grad ? rows.grad : at::empty({0}, rows.loss.options());
  return {rows.loss, grad, rows.counts.to(at::kInt)};
}

namespace {

// The backward's negatives over one row: c exp(a S - LZ) in place of S; the other columns
// keep S (the positives are done after), the row's own column 0.
template <int L>
XBM_INLINE void backward_neg_row_lanes(float* row, int64_t w, int64_t self_col, const int32_t* z, int32_t yi,
                                       float inv_tau, float lz, float c) {
  int64_t j = 0;
#if XBM_CPU_VECTOR
  using V = cpu::Vec<L>;
  if (self_col < 0 || self_col >= w) {
    for (; j + L <= w; j += L) {
      const typename V::F v = V::load(row + j);
      V::store(row + j, V::select(V::ne(V::load(z + j), yi), V::exp(v * inv_tau - lz) * c, v));
    }
  }
#endif
  for (; j < w; ++j)
    if (z[j] != yi) row[j] = j == self_col ? 0.f : std::exp(row[j] * inv_tau - lz) * c;
}
XBM_CPU_DISPATCH(void, backward_neg_row,
                 (float* row, int64_t w, int64_t self_col, const int32_t* z, int32_t yi, float inv_tau, float lz,
                  float c),
                 (row, w, self_col, z, yi, inv_tau, lz, c))

}  // namespace

std::tuple<Tensor, Tensor> cpu::ntxent_form_bwd(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                                int64_t ref_valid, const PositiveLogit& pl, float pos_thr,
                                                const Tensor& grad_rows) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  const int64_t B = in.B, D = in.D;
  const float inv_tau = pl.scale;
  const NtxentRows rows = ntxent_rows(in, pl, pos_thr, /*need_grad=*/false);
  // Last pass: C_in = g_i a w_i exp(s_in - LZ_i), C_ip = -g_i a sigmoid(LZ_i - a f_ip) f'_ip; rows
  // without negatives 0 (their loss is 0).
  const Tensor g = grad_rows.to(at::kFloat).mul(inv_tau).contiguous();
  const float* gp = g.data_ptr<float>();
  const double* lz = rows.lz.data_ptr<double>();
  const double* wt = rows.w.data_ptr<double>();
  const float* x32 = in.x32.data_ptr<float>();
  const int32_t* y = in.y_ptr();
  std::vector<TileMatches> matches(cpu::plan_tiles(B, in.n).splits);
  return cpu::coefficient_backward(in, ref.size(0), [&](int64_t p, int64_t c0, int64_t w, Tensor& c,
                                                        cpu::TileScratch& scratch) {
    TileMatches& mt = matches[p];
    find_matches(B, w, c0, in, mt);
    const float* r = scratch.current_ref.data_ptr<float>();
    float* cp = c.data_ptr<float>();
    const int32_t* z = in.z_ptr() + c0;
    for (int64_t i = 0; i < B; ++i) {
      float* row = cp + i * w;
      if (gp[i] == 0.f || lz[i] == -std::numeric_limits<double>::infinity()) {
        std::fill(row, row + w, 0.f);
        continue;
      }
      // LZ's fp32 rounding (a scale of 256 puts LZ near 256, an ulp of 3e-5) folded into the
      // weight's factor, in double: exp(a S - lz_f) exp(lz_f - LZ) = exp(a S - LZ)
      const float lzi = static_cast<float>(lz[i]);
      const float cn = static_cast<float>(gp[i] * wt[i] * std::exp(double(lzi) - lz[i]));
      const int64_t self_col = in.self_col(i) - c0;
      // negatives; label-matching columns keep S for the positives below
      backward_neg_row(row, w, self_col, z, y[i], inv_tau, lzi, cn);
      auto positive = [&](int64_t j, float v) {
        double loss = 0, q = 0;
        const double coef = v < pos_thr ? positive_pair(lz[i], v, pl, loss, q) : 0.0;
        row[j] = static_cast<float>(-gp[i] * coef);
      };
      if (mt.dense) {
        for (int64_t j = 0; j < w; ++j)
          if (z[j] == y[i]) {
            if (j == self_col)
              row[j] = 0.f;
            else
              positive(j, row[j]);
          }
      } else {
        if (self_col >= 0 && self_col < w && z[self_col] == y[i]) row[self_col] = 0.f;
        for (int64_t k = mt.start[i]; k < mt.start[i + 1]; ++k)
          positive(mt.cols[k], cpu::dot(x32 + i * D, r + int64_t(mt.cols[k]) * D, D));
      }
    }
  });
}

namespace {

void check_temperature(double temperature) {
  TORCH_CHECK(temperature > 0, "temperature: expected > 0, got ", temperature);
}

std::tuple<Tensor, Tensor, Tensor> ntxent_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                  const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                                  int64_t ref_valid, double temperature, double pos_eps,
                                                  bool need_grad, bool /*allow_tf32*/) {
  check_temperature(temperature);
  return cpu::ntxent_form_fwd(x, labels, ref, ref_labels, self_index, ref_valid,
                              cpu::PositiveLogit::identity(cpu::logit_scale_f32(1.0 / temperature)),
                              static_cast<float>(1.0 - pos_eps), need_grad);
}

std::tuple<Tensor, Tensor> ntxent_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                          const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                          int64_t ref_valid, double temperature, double pos_eps,
                                          const Tensor& grad_rows, bool /*allow_tf32*/) {
  check_temperature(temperature);
  return cpu::ntxent_form_bwd(x, labels, ref, ref_labels, self_index, ref_valid,
                              cpu::PositiveLogit::identity(cpu::logit_scale_f32(1.0 / temperature)),
                              static_cast<float>(1.0 - pos_eps), grad_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("ntxent_fwd", &ntxent_fwd_cpu);
  m.impl("ntxent_bwd", &ntxent_bwd_cpu);
}

}  // namespace xbm_kernels
