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

// One row of lse_tile, L lanes at a time (the CPU's widest, simd.h); the exponentials by
// Vec::exp. The row's own column (self_col, -1 when not in the tile) is -inf already
// (LossInputs::hide_own_column): no max, an exponential of 0, and the same-label lanes skip it. The same-label columns are few (a
// memory of many classes): the lanes that have one are found by a bit mask and handled one by
// one (the positive indicator S < pos_thr, the sum of positive S / tau, the positive's flat
// index i * w + j appended to pos_list when given), so the common lane costs a load, a
// compare, an exponential, an add and a store. With neg_only the other-label columns alone
// enter m, sum and the tile's weights. Returns the row's positive count.
template <int L>
XBM_INLINE int64_t lse_row_vec_lanes(float* row, int64_t w, int64_t self_col, const int32_t* z, int32_t yi,
                                     float inv_tau, float pos_thr, bool neg_only, float& m, double& sum,
                                     double& pos_sum, int64_t* counts, float& rescale, int32_t* pos_list,
                                     int64_t row_offset) {
  int64_t j = 0;
  float vmax = -kLseInf;
#if XBM_CPU_VECTOR
  using V = Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  F mx = V::splat(-kLseInf);
  for (; j + L <= w; j += L) {
    const F v = V::load(row + j);
    if (neg_only)
      mx = V::select(V::gt(v, mx) & ~V::eq(V::load(z + j), yi), v, mx);
    else
      mx = V::select(V::gt(v, mx), v, mx);
  }
  vmax = V::max(mx);
#endif
  for (; j < w; ++j)
    if (!neg_only || z[j] != yi) vmax = std::max(vmax, row[j]);
  const float m_new = std::max(m, vmax * inv_tau);  // max(v) / tau = max(v / tau): rounding is monotone
  // -inf only with neg_only and no negative yet: shift by 0 (every weight is 0), no inf - inf
  const float shift = m_new == -kLseInf ? 0.f : m_new;
  rescale = std::exp(m - shift);                    // 0 when m was -inf
  double acc = 0, psum = 0;
  int64_t np = 0, nsame = 0;
  // a same-label column j whose score (before the exponential) is v
  auto same_label = [&](int64_t jj, float v) {
    if (jj == self_col) return;
    ++nsame;
    if (!(v < pos_thr)) return;
    ++np;
    psum += v * inv_tau;  // S / tau: the same products as m
    if (pos_list) *pos_list++ = static_cast<int32_t>(row_offset + jj);
  };
  for (j = 0; j < w;) {
    // float lanes over blocks of up to 256 columns, each block's sum added in double
    const int64_t end = std::min(w, j + 256);
    float a = 0.f;
#if XBM_CPU_VECTOR
    F acc4 = V::splat(0.f);
    for (; j + L <= end; j += L) {
      const F v = V::load(row + j);
      const I same = V::eq(V::load(z + j), yi);
      F e = V::exp(v * inv_tau - shift);
      if (neg_only) e = V::select(same, V::splat(0.f), e);
      acc4 += e;
      V::store(row + j, e);
      for (uint32_t b = V::bits(same); b != 0; b &= b - 1) {
        const int k = __builtin_ctz(b);
        same_label(j + k, v[k]);
      }
    }
    a = V::sum(acc4);
#endif
    for (; j < end; ++j) {  // the last columns of the row
      const float v = row[j];
      const bool same = z[j] == yi;
      const float e = neg_only && same ? 0.f : std::exp(v * inv_tau - shift);
      a += e;
      row[j] = e;
      if (same) same_label(j, v);
    }
    acc += a;
  }
  sum = sum * rescale + acc;
  m = m_new;
  pos_sum += psum;
  counts[0] += np;
  counts[1] += w - (self_col >= 0 ? 1 : 0) - nsame;
  return np;
}
XBM_CPU_DISPATCH(inline int64_t, lse_row_vec,
                 (float* row, int64_t w, int64_t self_col, const int32_t* z, int32_t yi, float inv_tau, float pos_thr,
                  bool neg_only, float& m, double& sum, double& pos_sum, int64_t* counts, float& rescale,
                  int32_t* pos_list, int64_t row_offset),
                 (row, w, self_col, z, yi, inv_tau, pos_thr, neg_only, m, sum, pos_sum, counts, rescale, pos_list,
                  row_offset))

// Pass over one tile: updates the running state, writes exp(S/tau - m_new) into s (0 outside
// V_i, or outside N_i with neg_only) and with pos_list != nullptr the flat indices i * w + j of
// the positives into it, in row-major order. Returns the number of positives in the tile.
inline int64_t lse_tile(float* s, int32_t* pos_list, int64_t B, int64_t w, int64_t c0, const LossInputs& in,
                        float inv_tau, float pos_thr, bool neg_only, float* m, double* sum, double* pos_sum,
                        int64_t* counts, float* rescale) {
  const int32_t* y = in.y_ptr();
  const int32_t* z = in.z_ptr() + c0;
  int64_t tile_pos = 0;
  for (int64_t i = 0; i < B; ++i) {
    float* row = s + i * w;
    tile_pos += lse_row_vec(row, w, in.hide_own_column(row, i, c0, w), z, y[i], inv_tau, pos_thr, neg_only, m[i],
                            sum[i], pos_sum[i], counts + 2 * i, rescale[i], pos_list ? pos_list + tile_pos : nullptr,
                            i * w);
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
  const std::vector<Tensor> g_split = accumulate ? st.g.unbind(0) : std::vector<Tensor>();
  const std::vector<Tensor> gpos_split = accumulate && positives ? st.gpos.unbind(0) : std::vector<Tensor>();
  float* m_all = st.m.data_ptr<float>();
  double* s_all = st.s.data_ptr<double>();
  double* ps_all = st.pos_sum.data_ptr<double>();
  int64_t* counts_all = st.counts.data_ptr<int64_t>();
  float* rescale_all = rescale.data_ptr<float>();
  ScratchPool scratch(in, plan);
  for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    Tensor e = scratch[p].similarity(in, c0, w);
    int32_t* pos_list = accumulate && positives ? scratch[p].list_buffer(B, w) : nullptr;
    float* rs = rescale_all + p * B;
    const int64_t npos = lse_tile(e.data_ptr<float>(), pos_list, B, w, c0, in, inv_tau, pos_thr, negatives_only,
                                  m_all + p * B, s_all + p * B, ps_all + p * B, counts_all + p * 2 * B, rs);
    if (accumulate) {
      scale_rows(g_split[p].data_ptr<float>(), rs, B, D);  // G brought to the rows' new max
      scratch[p].add_product(in, e, c0, w, g_split[p]);
      if (positives)  // positives: usually few
        add_listed_rows(scratch[p], in, c0, w, scratch[p].listed.data(), nullptr, npos, gpos_split[p]);
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
