// Fused all-triplets margin loss over a reference set on the CPU (CONTRACT.md section 1):
//   l_i = sum_{p in P_i, n in N_i, lo < u <= hi} max(0, margin - u),  u = S_ip - S_in
// (pytorch-metric-learning's TripletMarginLoss with CosineSimilarity over all triplets, or
// over those a TripletMarginMiner selects: lo < u <= hi).
// Positives first: each anchor's positives (same label, valid, S < 1 - pos_eps: few in a memory
// of many classes) are found by label, their S computed by one dot product each and sorted.
// Then ONE pass over the memory: for a negative n, the triplets it forms are a contiguous range
// [a, b) of the sorted positives (u is monotone in S_ip, and so are the predicates u > lo,
// u <= hi and margin - u > 0, evaluated in fp32 as written), found by binary search; the
// range's loss is b - a times (S_in + margin) minus a prefix sum of S_ip. The gradient:
// dl/dS_in = b - a (the tile's coefficients times R, as the other losses), dl/dS_ip = minus
// the number of negatives whose range holds p (a difference array per split over the sorted
// positives), applied to the positive rows after the pass. A positive's S comes from the
// gather only and a negative's from the tile GEMM only, so every triplet is decided on one
// value; a negative whose u lies within 1e-5 of a bound or the margin for some positive is
// decided on its S recomputed by the gather's own dot product instead, so that a row held twice
// under two labels gives u = 0 exactly, as one GEMM over all columns (pytorch-metric-learning's)
// does. The reference-side gradient (in-batch loss) runs the pass for the positives' counts,
// then C = dl/dS per tile: dX = C R, dR = C^T X.
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/same_label.h"
#include "cpu/simd.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;

struct TripletParams {
  float margin, lo, hi, pos_thr;
  // The range [a, b) of positives (S sorted ascending) that form an active triplet with a
  // negative of similarity sn: lo < fl(sp - sn) <= hi and fl(margin - fl(sp - sn)) > 0.
  std::pair<int64_t, int64_t> range(const float* sp, int64_t np, float sn) const {
    const float* a = std::partition_point(sp, sp + np, [&](float v) { return !(v - sn > lo); });
    const float* b = std::partition_point(a, sp + np, [&](float v) {
      const float u = v - sn;
      return u <= hi && margin - u > 0.f;
    });
    return {a - sp, b - sp};
  }
};

// Each anchor's positives, sorted by S: offsets start[i]..start[i+1] into s (S), col (column)
// and prefix (prefix[start[i] + i + k] = sum of the anchor's first k S, in double).
struct Positives {
  std::vector<int64_t> start;
  std::vector<float> s;
  std::vector<int64_t> col;
  std::vector<double> prefix;
  int64_t total() const { return start.back(); }
};

// S_ij by the gather's dot product (cpu::gather_same_label's: the fp32 anchor against row j's
// fp32 value), for a negative decided on it (negative_s).
float pair_dot(const cpu::LossInputs& in, int64_t i, int64_t j) {
  thread_local std::vector<float> buf;
  buf.resize(in.D);
  return cpu::dot(in.x32.data_ptr<float>() + i * in.D, cpu::ref_row(in.ref, j, in.D, buf.data()), in.D);
}

// Each anchor's positives: its same-label columns (cpu::gather_same_label, uncapped: every
// anchor is served this way) with S < 1 - pos_eps, sorted by S.
Positives gather_positives(const cpu::LossInputs& in, float pos_thr) {
  const int64_t B = in.B;
  cpu::SameLabel cand;
  cpu::gather_same_label(in, cand, /*capped=*/false);
  std::vector<std::vector<std::pair<float, int64_t>>> per(B);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t k = cand.start[i]; k < cand.start[i + 1]; ++k)
      if (cand.s[k] < pos_thr) per[i].emplace_back(cand.s[k], cand.col[k]);
    std::sort(per[i].begin(), per[i].end());  // by S, then column: a fixed order
  }
  Positives out;
  out.start.assign(1, 0);
  for (int64_t i = 0; i < B; ++i) {
    double acc = 0;
    out.prefix.push_back(0.0);
    for (const auto& [s, j] : per[i]) {
      out.s.push_back(s);
      out.col.push_back(j);
      acc += s;
      out.prefix.push_back(acc);
    }
    out.start.push_back(static_cast<int64_t>(out.s.size()));
  }
  return out;
}

// The pass over the memory. Per split: loss (double), active triplets and, with accumulate,
// the negatives' gradient C R; always the difference array of the positives' counts.
struct TripletSplits {
  Tensor loss;     // (P, B) f64
  Tensor active;   // (P, B) int64
  Tensor grad;     // (P, B, D) f32, or undefined
  Tensor diff;     // (P, total positives + B) int64: anchor i's np + 1 entries from start[i] + i
};

// The coefficient of a negative of similarity sn for anchor i (the number of its active
// triplets) and its range; nullptr-safe for anchors without positives.
inline std::pair<int64_t, int64_t> negative_range(const Positives& pos, const TripletParams& prm, int64_t i,
                                                  float sn) {
  const int64_t s0 = pos.start[i], np = pos.start[i + 1] - s0;
  if (np == 0) return {0, 0};
  return prm.range(pos.s.data() + s0, np, sn);
}

// The S a negative (anchor i, column j, sn from the tile GEMM) is decided on: sn, or where some
// positive puts u = S_ip - sn within 1e-5 of a bound or the margin, the gather's dot product (a
// GEMM and a dot product round one row differently; a row held under two labels must give u = 0).
inline float negative_s(const cpu::LossInputs& in, const Positives& pos, const TripletParams& prm, int64_t i,
                        int64_t j, float sn) {
  const float* sp = pos.s.data() + pos.start[i];
  const float* end = pos.s.data() + pos.start[i + 1];
  if (sp == end) return sn;
  const float tol = 1e-5f * (1.f + std::abs(sn));
  for (const float t : {prm.lo, prm.hi, prm.margin}) {
    if (std::abs(t) > 2.5f) continue;  // +-3: no bound
    const float* near = std::lower_bound(sp, end, sn + t - tol);
    if (near != end && *near <= sn + t + tol) return pair_dot(in, i, j);
  }
  return sn;
}

TripletSplits triplet_pass(const cpu::LossInputs& in, const cpu::TilePlan& plan, const Positives& pos,
                           const TripletParams& prm, bool accumulate) {
  const int64_t B = in.B, D = in.D;
  const auto f32 = in.x32.options();
  TripletSplits st;
  st.loss = at::zeros({plan.splits, B}, f32.dtype(at::kDouble));
  st.active = at::zeros({plan.splits, B}, f32.dtype(at::kLong));
  st.diff = at::zeros({plan.splits, pos.total() + B}, f32.dtype(at::kLong));
  if (accumulate) st.grad = at::zeros({plan.splits, B, D}, f32);
  const int32_t* y = in.y_ptr();
  cpu::ScratchPool scratch(in, plan);
  cpu::for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    Tensor tile = scratch[p].similarity(in, c0, w);
    float* s = tile.data_ptr<float>();
    const int32_t* z = in.z_ptr() + c0;
    double* loss = st.loss[p].data_ptr<double>();
    int64_t* active = st.active[p].data_ptr<int64_t>();
    int64_t* diff = st.diff[p].data_ptr<int64_t>();
    int64_t nonzero = 0;
    for (int64_t i = 0; i < B; ++i) {
      float* row = s + i * w;
      const int64_t self_col = in.self_col(i) - c0, s0 = pos.start[i];
      for (int64_t j = 0; j < w; ++j) {
        float c = 0.f;
        if (z[j] != y[i] && j != self_col) {  // a negative (other label, valid)
          const float sn = negative_s(in, pos, prm, i, c0 + j, row[j]);
          const auto [a, b] = negative_range(pos, prm, i, sn);
          if (b > a) {
            const int64_t k = b - a;
            loss[i] += static_cast<double>(k) * (static_cast<double>(sn) + prm.margin) -
                       (pos.prefix[s0 + i + b] - pos.prefix[s0 + i + a]);
            active[i] += k;
            diff[s0 + i + a] += 1;
            diff[s0 + i + b] -= 1;
            c = static_cast<float>(k);
            ++nonzero;
          }
        }
        row[j] = c;
      }
    }
    if (accumulate) cpu::add_sparse_rows(scratch[p], in, tile, c0, st.grad[p], nonzero);
  });
  return st;
}

// Per positive (in the sorted order): the number of active triplets it is in.
std::vector<int64_t> positive_counts(const Positives& pos, const Tensor& diff_splits) {
  const Tensor diff = cpu::sum_splits(diff_splits);
  const int64_t* d = diff.data_ptr<int64_t>();
  std::vector<int64_t> counts(pos.total());
  for (size_t i = 0; i + 1 < pos.start.size(); ++i) {
    int64_t run = 0;
    for (int64_t k = pos.start[i]; k < pos.start[i + 1]; ++k) counts[k] = (run += d[k + i]);
  }
  return counts;
}

TripletParams params(double margin, double lo, double hi, double pos_eps) {
  return {static_cast<float>(margin), static_cast<float>(lo), static_cast<float>(hi),
          static_cast<float>(1.0 - pos_eps)};
}

// Counts as the op returns them: int32, saturated.
Tensor int32_counts(const Tensor& active) {
  const Tensor c = active.clamp_max(std::numeric_limits<int32_t>::max()).to(at::kInt);
  return at::stack({c, c}, 1);
}

std::tuple<Tensor, Tensor, Tensor> triplet_all_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                       const Tensor& ref_labels,
                                                       const c10::optional<Tensor>& self_index, int64_t ref_valid,
                                                       double margin, double select_low, double select_high,
                                                       double pos_eps, bool need_grad, bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const TripletParams prm = params(margin, select_low, select_high, pos_eps);
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  const Positives pos = gather_positives(in, prm.pos_thr);
  const TripletSplits st = triplet_pass(in, cpu::plan_tiles(in.B, in.n), pos, prm, need_grad);
  const Tensor loss = cpu::sum_splits(st.loss).to(at::kFloat);
  const Tensor counts = int32_counts(cpu::sum_splits(st.active));
  if (!need_grad) return {loss, at::empty({0}, loss.options()), counts};
  // The negatives' part (the splits' C R) and the positives' part -count_p r_p, anchor by anchor
  // in the sorted order, added in double: with many triplets the two are large integers times
  // rows that cancel, and an fp32 sum of them would keep only their leading digits.
  Tensor grad = st.grad.select(0, 0).to(at::kDouble);
  for (int64_t p = 1; p < st.grad.size(0); ++p) grad.add_(st.grad.select(0, p));
  const std::vector<int64_t> pc = positive_counts(pos, st.diff);
  double* g = grad.data_ptr<double>();
  const int64_t D = in.D;
  at::parallel_for(0, in.B, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(D);
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t k = pos.start[i]; k < pos.start[i + 1]; ++k) {
        if (pc[k] == 0) continue;
        const double c = -static_cast<double>(pc[k]);
        const float* rp = cpu::ref_row(in.ref, pos.col[k], D, buf.data());
        for (int64_t d = 0; d < D; ++d) g[i * D + d] += c * static_cast<double>(rp[d]);
      }
  });
  return {loss, grad.to(at::kFloat), counts};
}

std::tuple<Tensor, Tensor> triplet_all_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                               const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                               int64_t ref_valid, double margin, double select_low,
                                               double select_high, double pos_eps, const Tensor& grad_rows,
                                               bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const TripletParams prm = params(margin, select_low, select_high, pos_eps);
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  const Positives pos = gather_positives(in, prm.pos_thr);
  const std::vector<int64_t> pc =
      positive_counts(pos, triplet_pass(in, cpu::plan_tiles(in.B, in.n), pos, prm, false).diff);
  // Each anchor's positives by column, with their coefficient -count_p.
  std::vector<std::vector<std::pair<int64_t, float>>> by_col(in.B);
  for (int64_t i = 0; i < in.B; ++i) {
    for (int64_t k = pos.start[i]; k < pos.start[i + 1]; ++k)
      by_col[i].emplace_back(pos.col[k], -static_cast<float>(pc[k]));
    std::sort(by_col[i].begin(), by_col[i].end());
  }
  const Tensor g_rows = grad_rows.to(at::kFloat).contiguous();
  const float* gp = g_rows.data_ptr<float>();
  const int32_t* y = in.y_ptr();
  return cpu::coefficient_backward(in, ref.size(0), [&](int64_t, int64_t c0, int64_t w, Tensor& c,
                                                        cpu::TileScratch&) {
    float* cp = c.data_ptr<float>();
    const int32_t* z = in.z_ptr() + c0;
    for (int64_t i = 0; i < in.B; ++i) {
      float* row = cp + i * w;
      const int64_t self_col = in.self_col(i) - c0;
      for (int64_t j = 0; j < w; ++j) {
        float coef = 0.f;
        if (z[j] != y[i] && j != self_col) {
          const auto [a, b] = negative_range(pos, prm, i, negative_s(in, pos, prm, i, c0 + j, row[j]));
          coef = static_cast<float>(b - a);
        }
        row[j] = coef * gp[i];
      }
      // the positives in this tile (by column), from the gather: their S never from the tile
      const auto& list = by_col[i];
      auto it = std::lower_bound(list.begin(), list.end(), std::make_pair(c0, -std::numeric_limits<float>::infinity()));
      for (; it != list.end() && it->first < c0 + w; ++it) row[it->first - c0] = it->second * gp[i];
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("triplet_all_fwd", &triplet_all_fwd_cpu);
  m.impl("triplet_all_bwd", &triplet_all_bwd_cpu);
}

}  // namespace xbm_kernels
