// The online log-sum-exp of S / tau over a row's columns, one pass over the memory (CONTRACT.md
// section 1), shared by supcon (over V_i) and nca (over N_i).
// Per split and row: the running max m of S / tau, the sum s of exp(S / tau - m) (double), and
// with `accumulate` the softmax numerator G = sum exp(S / tau - m) r, rescaled when m grows,
// so that the memory is read once and the gradient comes out of the forward. Over V_i
// (supcon) the pass also decides P_i on the tile's S (the positive indicator, the sum of
// positive S / tau and the positives' rows). With `negatives_only` (nca, whose same-label
// columns are gathered first) the other-label columns alone enter m, s and G, a set decided
// by label, and nothing is decided on S. Splits merge their (m, s, G) in order.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/simd.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace cpu {

using at::Tensor;
constexpr float kLseInf = std::numeric_limits<float>::infinity();

// Per split running state of each row.
struct LseSplits {
  Tensor m, s;        // (P, B) f32 running max of S/tau, f64 sum of exp(S/tau - m)
  Tensor pos_sum;     // (P, B) f64 sum of positive S / tau (fp32 products)
  Tensor counts;      // (P, B, 2) int64 |P_i|, |N_i|
  Tensor g, gpos;     // (P, B, D) f32 softmax numerator x rows, positive rows; or undefined
};

#if XBM_CPU_VECTOR
// One row of lse_tile whose columns are all valid (its own column is elsewhere), L
// lanes at a time (the CPU's widest, simd.h); the exponentials by Vec::exp. With neg_only,
// the other-label columns alone enter m, sum and the tile's weights. Returns the row's
// positive count.
template <int L>
XBM_INLINE int64_t lse_row_vec_lanes(float* row, float* pos_row, int64_t w, const int32_t* z, int32_t yi,
                                     float inv_tau, float pos_thr, bool neg_only, float& m, double& sum,
                                     double& pos_sum, int64_t* counts, float& rescale) {
  using V = Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  int64_t j = 0;
  F mx = V::splat(-kLseInf);
  for (; j + L <= w; j += L) {
    const F v = V::load(row + j);
    if (neg_only)
      mx = V::select(V::gt(v, mx) & ~V::eq(V::load(z + j), yi), v, mx);
    else
      mx = V::select(V::gt(v, mx), v, mx);
  }
  float vmax = V::max(mx);
  for (; j < w; ++j)
    if (!neg_only || z[j] != yi) vmax = std::max(vmax, row[j]);
  const float m_new = std::max(m, vmax * inv_tau);  // max(v) / tau = max(v / tau): rounding is monotone
  // -inf only with neg_only and no negative yet: shift by 0 (every weight is 0), no inf - inf
  const float shift = m_new == -kLseInf ? 0.f : m_new;
  rescale = std::exp(m - shift);                    // 0 when m was -inf
  double acc = 0, psum = 0;
  float np = 0.f, nn = 0.f;
  for (j = 0; j < w;) {
    // float lanes over blocks of up to 256 columns, each block's sum added in double
    const int64_t end = std::min(w, j + 256);
    F acc4 = V::splat(0.f), ps4 = acc4, np4 = acc4, nn4 = acc4;
    for (; j + L <= end; j += L) {
      const F v = V::load(row + j);
      const I same = V::eq(V::load(z + j), yi);
      const F e = neg_only ? V::select(same, V::splat(0.f), V::exp(v * inv_tau - shift)) : V::exp(v * inv_tau - shift);
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
      const float e = neg_only && same ? 0.f : std::exp(v * inv_tau - shift);
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
XBM_CPU_DISPATCH(inline int64_t, lse_row_vec,
                 (float* row, float* pos_row, int64_t w, const int32_t* z, int32_t yi, float inv_tau, float pos_thr,
                  bool neg_only, float& m, double& sum, double& pos_sum, int64_t* counts, float& rescale),
                 (row, pos_row, w, z, yi, inv_tau, pos_thr, neg_only, m, sum, pos_sum, counts, rescale))
#endif

// Pass over one tile: updates the running state, writes exp(S/tau - m_new) into s (0 outside
// V_i, or outside N_i with neg_only) and with pos_tile != nullptr the positive indicator into it.
// Returns the number of positives in the tile.
inline int64_t lse_tile(float* s, float* pos_tile, int64_t B, int64_t w, int64_t c0, const LossInputs& in,
                        float inv_tau, float pos_thr, bool neg_only, float* m, double* sum, double* pos_sum,
                        int64_t* counts, float* rescale) {
  const int32_t* y = in.y_ptr();
  const int32_t* z = in.z_ptr() + c0;
  int64_t tile_pos = 0;
  for (int64_t i = 0; i < B; ++i) {
    float* row = s + i * w;
    const int64_t self_col = in.self_col(i) - c0;
#if XBM_CPU_VECTOR
    if (self_col < 0 || self_col >= w) {  // every column valid: the vector path
      tile_pos += lse_row_vec(row, pos_tile ? pos_tile + i * w : nullptr, w, z, y[i], inv_tau, pos_thr, neg_only,
                              m[i], sum[i], pos_sum[i], counts + 2 * i, rescale[i]);
      continue;
    }
#endif
    // The row whose own column is in this tile (once per row and pass), and the scalar
    // definition of the vector path.
    float tile_max = -kLseInf;
    for (int64_t j = 0; j < w; ++j)
      if (j != self_col && (!neg_only || z[j] != y[i])) tile_max = std::max(tile_max, row[j] * inv_tau);
    const float m_new = std::max(m[i], tile_max);
    const float scale = m_new == -kLseInf ? 1.f : std::exp(m[i] - m_new);
    rescale[i] = scale;
    double acc = 0, psum = 0;
    int64_t np = 0, nn = 0;
    for (int64_t j = 0; j < w; ++j) {
      const float v = row[j];
      const bool valid = j != self_col, same = z[j] == y[i];
      const bool pos = valid && same && v < pos_thr;
      const float e = valid && !(neg_only && same) ? std::exp(v * inv_tau - m_new) : 0.f;
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

inline LseSplits lse_pass(const LossInputs& in, const TilePlan& plan, float inv_tau, float pos_thr, bool accumulate,
                          bool negatives_only = false) {
  const bool positives = !negatives_only;
  if (negatives_only) pos_thr = -kLseInf;  // S < -inf never holds: no positive indicator, pos_sum or gpos
  const int64_t B = in.B, D = in.D;
  const auto f32 = in.x32.options();
  LseSplits st;
  st.m = at::full({plan.splits, B}, -kLseInf, f32);
  st.s = at::zeros({plan.splits, B}, f32.dtype(at::kDouble));
  st.pos_sum = at::zeros_like(st.s);
  st.counts = at::zeros({plan.splits, B, 2}, f32.dtype(at::kLong));
  if (accumulate) {
    st.g = at::zeros({plan.splits, B, D}, f32);
    if (positives) st.gpos = at::zeros({plan.splits, B, D}, f32);
  }
  Tensor rescale = at::empty({plan.splits, B}, f32);
  // Per split views and pointers made once, not per tile (an ATen select costs microseconds).
  std::vector<Tensor> g_split(plan.splits), gpos_split(plan.splits);
  if (accumulate)
    for (int64_t p = 0; p < plan.splits; ++p) {
      g_split[p] = st.g[p];
      if (positives) gpos_split[p] = st.gpos[p];
    }
  float* m_all = st.m.data_ptr<float>();
  double* s_all = st.s.data_ptr<double>();
  double* ps_all = st.pos_sum.data_ptr<double>();
  int64_t* counts_all = st.counts.data_ptr<int64_t>();
  float* rescale_all = rescale.data_ptr<float>();
  ScratchPool scratch(in, plan);
  for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    Tensor e = scratch[p].similarity(in, c0, w);
    Tensor pos = scratch[p].aux_tile(B, w);
    float* pos_tile = accumulate && positives ? pos.data_ptr<float>() : nullptr;
    float* rs = rescale_all + p * B;
    const int64_t npos = lse_tile(e.data_ptr<float>(), pos_tile, B, w, c0, in, inv_tau, pos_thr, negatives_only,
                                  m_all + p * B, s_all + p * B, ps_all + p * B, counts_all + p * 2 * B, rs);
    if (accumulate) {
      float* g = g_split[p].data_ptr<float>();
      for (int64_t i = 0; i < B; ++i) {  // G rescaled where the row's max grew (x 1 elsewhere: skipped)
        if (rs[i] == 1.f) continue;
        float* gi = g + i * D;
        for (int64_t d = 0; d < D; ++d) gi[d] *= rs[i];
      }
      scratch[p].add_product(in, e, c0, w, g_split[p]);
      if (positives) add_sparse_rows(scratch[p], in, pos, c0, gpos_split[p], npos);  // positives: usually few
    }
  });
  return st;
}

// The splits merged in order: the row max m, each split's factor exp(m_p - m), the sum of
// exp(S / tau - m) in double, the counts, and (when accumulated) G merged, not yet divided by the sum.
struct LseMerged {
  Tensor m, scale, sum, counts, g;
};

inline LseMerged lse_merge(const LseSplits& st) {
  LseMerged out;
  // exact in any order; amax, not max(0): ATen's max with indices over a short dimension opens an
  // OpenMP region per call (0.4-2 ms on a busy machine, measured), amax does not
  out.m = st.m.amax(0);
  out.scale = at::exp(st.m - out.m.unsqueeze(0)).nan_to_num_(0.f);  // -inf - -inf rows: 0
  out.sum = sum_splits(st.s * out.scale.to(at::kDouble));
  out.counts = sum_splits(st.counts);
  if (st.g.defined()) {
    out.g = st.g[0].mul(out.scale[0].unsqueeze(1));
    for (int64_t p = 1; p < st.m.size(0); ++p) out.g.add_(st.g[p].mul(out.scale[p].unsqueeze(1)));
  }
  return out;
}

// One row of a backward's softmax exp(S / tau - lse) over the score row crow, in place; with
// prow, the positive indicator (same label, S < pos_thr) into prow first.
template <int L>
XBM_INLINE void lse_softmax_row_lanes(float* crow, float* prow, int64_t w, const int32_t* z, int32_t yi,
                                      float inv_tau, float pos_thr, float lse) {
  int64_t j = 0;
#if XBM_CPU_VECTOR
  using V = Vec<L>;
  for (; j + L <= w; j += L) {
    const typename V::F v = V::load(crow + j);
    if (prow) V::store(prow + j, V::one_where(V::eq(V::load(z + j), yi) & V::lt(v, pos_thr)));
    V::store(crow + j, V::exp(v * inv_tau - lse));
  }
#endif
  for (; j < w; ++j) {
    const float v = crow[j];
    if (prow) prow[j] = (z[j] == yi && v < pos_thr) ? 1.f : 0.f;
    crow[j] = std::exp(v * inv_tau - lse);
  }
}
XBM_CPU_DISPATCH(inline void, lse_softmax_row,
                 (float* crow, float* prow, int64_t w, const int32_t* z, int32_t yi, float inv_tau, float pos_thr,
                  float lse),
                 (crow, prow, w, z, yi, inv_tau, pos_thr, lse))

}  // namespace cpu
}  // namespace xbm_kernels
