// Fused multi-similarity loss over a reference set on the CPU (CONTRACT.md section 1):
//   P~_i = { j in P_i : S_ij - mm < max_{N_i} S },  N~_i = { j in N_i : S_ij + mm > min_{P_i} S }
//   (mine = false: P~_i = P_i, N~_i = N_i)
//   l_i = 1/alpha log(1 + sum_{P~_i} exp(-alpha (S_ij - base)))
//       + 1/beta  log(1 + sum_{N~_i} exp( beta (S_ij - base)))
//   skip_incomplete: l_i = 0 if any of P_i, N_i, P~_i, N~_i is empty; else a term is 0
//   when its own mined set is empty. (With mining the two agree: P~_i and N~_i are both
//   empty exactly when min_P S - mm >= max_N S, and both are empty when P_i or N_i is.)
// Each sum is taken with its largest exponent subtracted (shift_p = -alpha (min_pos - base),
// shift_n = beta (max_neg - base)), so every weight exp(a - shift) is <= 1, and the weighted
// row sums w_j r_j for the gradient are scaled once at the end by dl/dsum.
// With mining and few label matches (a memory of many classes, the usual case): ONE pass
// over the memory. The positives come first, by label: one scan of the reference labels finds
// each anchor's same-label columns, and each pair's S is one dot product (gather_positives),
// 2 D flops instead of a tile GEMM. That gives min_pos, hence the negatives' mining threshold,
// before the pass; the pass skips same-label columns by label, sums the mined negatives'
// weights with a running max_neg (the split's sums and weighted rows rescaled when it grows)
// and multiplies the weights into R (a GEMM, the mined negatives are dense). After the pass,
// max_neg mines the gathered positives. A positive's S is computed in the gather only and a
// negative's in the pass only, in the forward and the backward alike, so every decision about
// a pair (P_i, the pos_eps cut, both mined sets) is made on one value of its S.
// With many label matches (the gather would cost more than a GEMM) pass 1 streams the
// reference for min positive / max negative per row and pass 2 computes the weights. Without
// mining the statistics are needed only for the shifts, so ONE pass keeps them per split as
// it goes (each tile's own min / max first, then its weights) and rescales the split's sums
// when a shift grows; splits are brought to the common shift when merged. Mined-set
// membership is a constant for the gradient. pos_eps may be negative (every same-label column
// a positive). The reference-side gradient (in-batch loss) recomputes the forward's state,
// then one pass for C = dl/dS: dX = C R, dR = C^T X.
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/same_label.h"
#include "cpu/simd.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct MsParams {
  float alpha, beta, base, mining_margin, pos_thr;
  bool mine, skip_incomplete;
  // The largest exponent of each sum, from the row's min positive / max negative (the
  // same float expressions as the weights, so that every weight is <= 1).
  float shift_p(float min_pos) const { return -alpha * (min_pos - base); }
  float shift_n(float max_neg) const { return beta * (max_neg - base); }
};

using Counts2 = std::array<int64_t, 2>;

// Pass 1: per-row min positive and max negative over one tile.
template <int L>
XBM_INLINE void ms_stats_tile_lanes(const float* s, int64_t B, int64_t w, int64_t c0, const cpu::LossInputs& in,
                                    float pos_thr, float* min_pos, float* max_neg) {
#if XBM_CPU_VECTOR
  using V = cpu::Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
#endif
  const int32_t* y = in.y_ptr();
  const int32_t* z = in.z_ptr() + c0;
  for (int64_t i = 0; i < B; ++i) {
    const float* row = s + i * w;
    const int64_t self_col = in.self_col(i) - c0;
    float mp = min_pos[i], mn = max_neg[i];
    int64_t j = 0;
#if XBM_CPU_VECTOR
    if (self_col < 0 || self_col >= w) {  // every column valid: L lanes at a time, then the tail
      F mp4 = V::splat(mp), mn4 = V::splat(mn);
      for (; j + L <= w; j += L) {
        const F v = V::load(row + j);
        const I same = V::eq(V::load(z + j), y[i]);
        mp4 = V::select(same & V::lt(v, pos_thr) & V::lt(v, mp4), v, mp4);
        mn4 = V::select(~same & V::gt(v, mn4), v, mn4);
      }
      mp = V::min(mp4);
      mn = V::max(mn4);
    }
#endif
    for (; j < w; ++j) {
      if (j == self_col) continue;
      const float v = row[j];
      if (z[j] == y[i]) {
        if (v < pos_thr) mp = std::min(mp, v);
      } else {
        mn = std::max(mn, v);
      }
    }
    min_pos[i] = mp;
    max_neg[i] = mn;
  }
}
XBM_CPU_DISPATCH(void, ms_stats_tile,
                 (const float* s, int64_t B, int64_t w, int64_t c0, const cpu::LossInputs& in, float pos_thr,
                  float* min_pos, float* max_neg),
                 (s, B, w, c0, in, pos_thr, min_pos, max_neg))

// Pass 2: writes the shifted positive weights into s and the negative ones into aux;
// adds their row sums and mined counts. Positives are mined against mine_max_neg and
// negatives against mine_min_pos (+inf / -inf: no mining); shift_p / shift_n are the
// rows' exponent shifts. Returns the tile's mined (positive, negative) counts.
template <int L>
XBM_INLINE Counts2 ms_weights_tile_lanes(float* s, float* aux, int64_t B, int64_t w, int64_t c0,
                                       const cpu::LossInputs& in, const MsParams& prm, const float* mine_min_pos,
                                       const float* mine_max_neg, const float* shift_p, const float* shift_n,
                                       double* sum_p, double* sum_n, int64_t* counts) {
#if XBM_CPU_VECTOR
  using V = cpu::Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
#endif
  const int32_t* y = in.y_ptr();
  const int32_t* z = in.z_ptr() + c0;
  std::array<int64_t, 2> tile = {0, 0};
  for (int64_t i = 0; i < B; ++i) {
    float* row = s + i * w;
    float* nrow = aux + i * w;
    const int64_t self_col = in.self_col(i) - c0;
    const float sh_p = shift_p[i], sh_n = shift_n[i];
    double sp = 0, sn = 0;
    int64_t np = 0, nn = 0;
    int64_t j = 0;
#if XBM_CPU_VECTOR
    if (self_col < 0 || self_col >= w) {  // every column valid: L lanes at a time, then the tail
      const float mp = mine_min_pos[i], mn = mine_max_neg[i];
      const F zero = V::splat(0.f);
      while (j + L <= w) {  // float lanes over blocks of up to 256 columns, each block's sum added in double
        const int64_t end = std::min(w, j + 256);
        F sp4 = zero, sn4 = zero, np4 = zero, nn4 = zero;
        for (; j + L <= end; j += L) {
          const F v = V::load(row + j);
          const I same = V::eq(V::load(z + j), y[i]);
          const I mined_p = same & V::lt(v, prm.pos_thr) & V::lt(v - prm.mining_margin, mn);
          const I mined_n = ~same & V::gt(v + prm.mining_margin, mp);
          // Unmined lanes may overflow Vec::exp's range; they are clamped there, then zeroed.
          const F wp = V::select(mined_p, V::exp(-prm.alpha * (v - prm.base) - sh_p), zero);
          const F wn = V::select(mined_n, V::exp(prm.beta * (v - prm.base) - sh_n), zero);
          sp4 += wp;
          sn4 += wn;
          np4 += V::one_where(mined_p);
          nn4 += V::one_where(mined_n);
          V::store(row + j, wp);
          V::store(nrow + j, wn);
        }
        sp += V::sum(sp4);
        sn += V::sum(sn4);
        np += static_cast<int64_t>(V::sum(np4));
        nn += static_cast<int64_t>(V::sum(nn4));
      }
    }
#endif
    for (; j < w; ++j) {
      const float v = row[j];
      const bool valid = j != self_col, same = z[j] == y[i];
      const bool mined_p = valid && same && v < prm.pos_thr && v - prm.mining_margin < mine_max_neg[i];
      const bool mined_n = valid && !same && v + prm.mining_margin > mine_min_pos[i];
      const float wp = mined_p ? std::exp(-prm.alpha * (v - prm.base) - sh_p) : 0.f;
      const float wn = mined_n ? std::exp(prm.beta * (v - prm.base) - sh_n) : 0.f;
      np += mined_p;
      nn += mined_n;
      sp += wp;
      sn += wn;
      row[j] = wp;
      nrow[j] = wn;
    }
    sum_p[i] += sp;
    sum_n[i] += sn;
    counts[2 * i] += np;
    counts[2 * i + 1] += nn;
    tile[0] += np;
    tile[1] += nn;
  }
  return tile;
}
XBM_CPU_DISPATCH(Counts2, ms_weights_tile,
                 (float* s, float* aux, int64_t B, int64_t w, int64_t c0, const cpu::LossInputs& in,
                  const MsParams& prm, const float* mine_min_pos, const float* mine_max_neg, const float* shift_p,
                  const float* shift_n, double* sum_p, double* sum_n, int64_t* counts),
                 (s, aux, B, w, c0, in, prm, mine_min_pos, mine_max_neg, shift_p, shift_n, sum_p, sum_n, counts))

// Per row shifts of the statistics.
void ms_shifts(const MsParams& prm, const float* min_pos, const float* max_neg, int64_t B, float* shift_p,
               float* shift_n) {
  for (int64_t i = 0; i < B; ++i) {
    shift_p[i] = prm.shift_p(min_pos[i]);
    shift_n[i] = prm.shift_n(max_neg[i]);
  }
}

// exp(old - new) for a shift that grew from old to new; 1 when it did not move (also when
// both are -inf), 0 from -inf (nothing was summed there).
inline double shift_scale(float old_shift, float new_shift) {
  return old_shift == new_shift ? 1.0 : std::exp(double(old_shift) - double(new_shift));
}

// Scales row i of a split's (B, D) accumulator (when there is one).
inline void scale_row(const Tensor& splits, int64_t p, int64_t i, double scale) {
  if (!splits.defined()) return;
  const int64_t B = splits.size(1), D = splits.size(2);
  float* row = splits.data_ptr<float>() + (p * B + i) * D;
  const float f = static_cast<float>(scale);
  for (int64_t d = 0; d < D; ++d) row[d] *= f;
}

struct MsState {
  Tensor min_pos, max_neg;     // (B,) f32
  Tensor shift_p, shift_n;     // (B,) f32 the exponent shifts of the sums
  Tensor sum_p, sum_n;         // (B,) f64: sums of shifted weights
  Tensor counts;               // (B, 2) int64: mined positives / negatives
  Tensor grad_p, grad_n;       // (B, D) f32: sums of shifted weights x rows, or undefined
};

// The mining thresholds ms_weights_tile takes: the statistics, or (no mining) +-inf.
std::pair<Tensor, Tensor> mining_thresholds(const MsParams& prm, const MsState& st) {
  if (prm.mine) return {st.min_pos, st.max_neg};
  return {at::full_like(st.min_pos, -kInf), at::full_like(st.max_neg, kInf)};
}

// ---- With mining and few label matches: positives gathered by label, one pass for the rest.

using Positives = cpu::SameLabel;
using cpu::ref_row;

// The candidates (same-label columns) of the one-pass form with their S, or false when they are
// more than 1/32 of the pairs (cpu::find_candidates).
inline bool gather_positives(const cpu::LossInputs& in, Positives& pos) { return cpu::gather_same_label(in, pos); }

// The largest S over the negatives of one row of a tile (different label; -inf if none; the
// anchor's own column, if in the tile, is -inf by then).
template <int L>
XBM_INLINE float neg_max_row_lanes(const float* row, int64_t w, const int32_t* z, int32_t yi) {
#if XBM_CPU_VECTOR
  using V = cpu::Vec<L>;
  using F = typename V::F;
#endif
  int64_t j = 0;
  float mx = -kInf;
#if XBM_CPU_VECTOR
  F mx4 = V::splat(-kInf);
  for (; j + L <= w; j += L) {
    const F v = V::load(row + j);
    mx4 = V::select(V::ne(V::load(z + j), yi) & V::gt(v, mx4), v, mx4);
  }
  mx = V::max(mx4);
#endif
  for (; j < w; ++j)
    if (z[j] != yi && row[j] > mx) mx = row[j];
  return mx;
}
XBM_CPU_DISPATCH(float, neg_max_row, (const float* row, int64_t w, const int32_t* z, int32_t yi), (row, w, z, yi))

// Over one row of a tile: the mined negatives' weights exp(beta (S - base) - shift) (S + mm >
// min_pos) written over the row, 0 in every other column (same-label columns included: the
// positives are the gather's); adds their sum and count.
template <int L>
XBM_INLINE void neg_weights_row_lanes(float* row, int64_t w, const int32_t* z, int32_t yi, const MsParams& prm,
                                      float min_pos, float shift, double& sum, int64_t& count) {
#if XBM_CPU_VECTOR
  using V = cpu::Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
#endif
  double sn = 0;
  int64_t nn = 0;
  int64_t j = 0;
#if XBM_CPU_VECTOR
  const F zero = V::splat(0.f);
  while (j + L <= w) {  // float lanes over blocks of up to 256 columns, each block's sum added in double
    const int64_t end = std::min(w, j + 256);
    F sn4 = zero, nn4 = zero;
    for (; j + L <= end; j += L) {
      const F v = V::load(row + j);
      const I mined = V::ne(V::load(z + j), yi) & V::gt(v + prm.mining_margin, min_pos);
      // Unmined lanes may overflow Vec::exp's range; they are clamped there, then zeroed.
      const F wn = V::select(mined, V::exp(prm.beta * (v - prm.base) - shift), zero);
      sn4 += wn;
      nn4 += V::one_where(mined);
      V::store(row + j, wn);
    }
    sn += V::sum(sn4);
    nn += static_cast<int64_t>(V::sum(nn4));
  }
#endif
  for (; j < w; ++j) {
    const float v = row[j];
    const bool mined = z[j] != yi && v + prm.mining_margin > min_pos;
    const float wn = mined ? std::exp(prm.beta * (v - prm.base) - shift) : 0.f;
    sn += wn;
    nn += mined;
    row[j] = wn;
  }
  sum += sn;
  count += nn;
}
XBM_CPU_DISPATCH(void, neg_weights_row,
                 (float* row, int64_t w, const int32_t* z, int32_t yi, const MsParams& prm, float min_pos,
                  float shift, double& sum, int64_t& count),
                 (row, w, z, yi, prm, min_pos, shift, sum, count))

// min_pos per row from the gathered positives (+inf without positives).
Tensor positives_min(const cpu::LossInputs& in, const Positives& pos, float pos_thr) {
  Tensor min_pos = at::full({in.B}, kInf, in.x32.options());
  float* mp = min_pos.data_ptr<float>();
  for (int64_t i = 0; i < in.B; ++i)
    for (int64_t k = pos.start[i]; k < pos.start[i + 1]; ++k)
      if (pos.s[k] < pos_thr) mp[i] = std::min(mp[i], pos.s[k]);
  return min_pos;
}

// Whether gathered candidate k of row i is in P~_i, and its shifted weight.
inline bool mined_positive(const MsParams& prm, float v, float max_neg) {
  return v < prm.pos_thr && v - prm.mining_margin < max_neg;
}
inline float positive_weight(const MsParams& prm, float v, float shift_p) {
  return std::exp(-prm.alpha * (v - prm.base) - shift_p);
}

// The state of ms_passes for mine = true from gathered positives and one pass over the memory.
MsState ms_one_pass_mined(const cpu::LossInputs& in, const MsParams& prm, const Positives& pos, bool accumulate) {
  const int64_t B = in.B, D = in.D;
  const auto plan = cpu::plan_tiles(B, in.n);
  const auto f32 = in.x32.options();
  MsState st;
  st.min_pos = positives_min(in, pos, prm.pos_thr);
  const float* min_pos = st.min_pos.data_ptr<float>();
  Tensor max_splits = at::full({plan.splits, B}, -kInf, f32);
  Tensor shift_splits = at::full({plan.splits, B}, -kInf, f32);  // the shift each split has summed with
  Tensor sn_splits = at::zeros({plan.splits, B}, f32.dtype(at::kDouble));
  Tensor nn_splits = at::zeros({plan.splits, B}, f32.dtype(at::kLong));
  Tensor gn_splits = accumulate ? at::zeros({plan.splits, B, D}, f32) : Tensor();
  cpu::ScratchPool scratch(in, plan);
  const int32_t* y = in.y_ptr();
  // per split pointers and views made once, not per tile (an ATen select costs microseconds)
  float* mx_all = max_splits.data_ptr<float>();
  float* sh_all = shift_splits.data_ptr<float>();
  double* sn_all = sn_splits.data_ptr<double>();
  int64_t* nn_all = nn_splits.data_ptr<int64_t>();
  const std::vector<Tensor> gn_split = accumulate ? gn_splits.unbind(0) : std::vector<Tensor>();
  cpu::for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    Tensor s_tile = scratch[p].similarity(in, c0, w);
    float* s = s_tile.data_ptr<float>();
    const int32_t* z = in.z_ptr() + c0;
    float* mx = mx_all + p * B;
    float* sh = sh_all + p * B;
    double* sn = sn_all + p * B;
    int64_t* nn = nn_all + p * B;
    int64_t mined = 0;
    for (int64_t i = 0; i < B; ++i) {
      float* row = s + i * w;
      if (min_pos[i] == kInf) {  // no positives: l_i = 0 and nothing is mined, whatever max_neg is
        std::fill(row, row + w, 0.f);
        continue;
      }
      in.hide_own_column(row, i, c0, w);  // -inf: no negative's maximum, never mined
      const float m = neg_max_row(row, w, z, y[i]);
      if (m > mx[i]) {  // the shift grows: bring the split's sums to it
        mx[i] = m;
        const float new_shift = prm.shift_n(m);
        if (sh[i] != -kInf) {  // from -inf: nothing summed yet
          const double scale = shift_scale(sh[i], new_shift);
          sn[i] *= scale;
          scale_row(gn_splits, p, i, scale);
        }
        sh[i] = new_shift;
      }
      int64_t row_mined = 0;
      neg_weights_row(row, w, z, y[i], prm, min_pos[i], sh[i], sn[i], row_mined);
      nn[i] += row_mined;
      mined += row_mined;
    }
    if (accumulate) cpu::add_sparse_rows(scratch[p], in, s_tile, c0, gn_split[p], mined);
  });
  st.max_neg = max_splits.amax(0).contiguous();  // exact in any order
  st.shift_p = at::empty_like(st.min_pos);
  st.shift_n = at::empty_like(st.max_neg);
  ms_shifts(prm, min_pos, st.max_neg.data_ptr<float>(), B, st.shift_p.data_ptr<float>(),
            st.shift_n.data_ptr<float>());
  // Every split's sums to the common shift, then summed in split order.
  const float* shn = st.shift_n.data_ptr<float>();
  for (int64_t p = 0; p < plan.splits; ++p) {
    const float* psh = shift_splits[p].data_ptr<float>();
    double* sn = sn_splits[p].data_ptr<double>();
    for (int64_t i = 0; i < B; ++i) {
      const double scale = shift_scale(psh[i], shn[i]);
      sn[i] *= scale;
      if (scale != 1.0) scale_row(gn_splits, p, i, scale);
    }
  }
  st.sum_n = cpu::sum_splits(sn_splits);
  const Tensor nn = cpu::sum_splits(nn_splits);
  // The positives, mined against max_neg.
  st.sum_p = at::zeros({B}, f32.dtype(at::kDouble));
  Tensor np = at::zeros({B}, f32.dtype(at::kLong));
  if (accumulate) st.grad_p = at::zeros({B, D}, f32);
  const float* max_neg = st.max_neg.data_ptr<float>();
  const float* shp = st.shift_p.data_ptr<float>();
  double* sp = st.sum_p.data_ptr<double>();
  int64_t* npp = np.data_ptr<int64_t>();
  at::parallel_for(0, B, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(D);
    for (int64_t i = i0; i < i1; ++i) {
      float* g = accumulate ? st.grad_p.data_ptr<float>() + i * D : nullptr;
      for (int64_t k = pos.start[i]; k < pos.start[i + 1]; ++k) {
        if (!mined_positive(prm, pos.s[k], max_neg[i])) continue;
        const float wp = positive_weight(prm, pos.s[k], shp[i]);
        sp[i] += wp;
        ++npp[i];
        if (g) {
          const float* r = ref_row(in.ref, pos.col[k], D, buf.data());
          for (int64_t d = 0; d < D; ++d) g[d] += wp * r[d];
        }
      }
    }
  });
  st.counts = at::stack({np, nn}, 1).contiguous();
  if (accumulate) st.grad_n = cpu::sum_splits(gn_splits);
  return st;
}

// The reference-side gradient of the one-pass form: C_ij = g_i dl_i/dS_ij per tile, the
// negatives' weights from the tile's S and the positives' from the gathered S.
std::tuple<Tensor, Tensor> ms_one_pass_backward(const cpu::LossInputs& in, const MsParams& prm,
                                                const Positives& pos, const MsState& st, const Tensor& gp,
                                                const Tensor& gn, int64_t ref_rows) {
  const int64_t B = in.B;
  const float* min_pos = st.min_pos.data_ptr<float>();
  const float* max_neg = st.max_neg.data_ptr<float>();
  const float* shp = st.shift_p.data_ptr<float>();
  const float* shn = st.shift_n.data_ptr<float>();
  const float* gpp = gp.data_ptr<float>();
  const float* gnp = gn.data_ptr<float>();
  const int32_t* y = in.y_ptr();
  return cpu::coefficient_backward(in, ref_rows, [&](int64_t, int64_t c0, int64_t w, Tensor& c,
                                                     cpu::TileScratch&) {
    float* cp = c.data_ptr<float>();
    const int32_t* z = in.z_ptr() + c0;
    for (int64_t i = 0; i < B; ++i) {
      float* row = cp + i * w;
      if (gpp[i] == 0.f && gnp[i] == 0.f) {  // a skipped row, or no gradient
        std::fill(row, row + w, 0.f);
        continue;
      }
      double sum = 0;
      int64_t count = 0;
      in.hide_own_column(row, i, c0, w);  // as in the forward
      neg_weights_row(row, w, z, y[i], prm, min_pos[i], shn[i], sum, count);
      const float f = gnp[i];
      for (int64_t j = 0; j < w; ++j) row[j] *= f;
      const int64_t k1 = pos.start[i + 1];
      for (int64_t k = std::lower_bound(pos.col.begin() + pos.start[i], pos.col.begin() + k1, c0) - pos.col.begin();
           k < k1 && pos.col[k] < c0 + w; ++k)
        if (mined_positive(prm, pos.s[k], max_neg[i]))
          row[pos.col[k] - c0] = gpp[i] * positive_weight(prm, pos.s[k], shp[i]);
    }
  });
}

// The passes; when accumulate is true also the weighted row sums for the gradient.
MsState ms_passes(const cpu::LossInputs& in, const MsParams& prm, bool accumulate) {
  const int64_t B = in.B, D = in.D;
  const auto plan = cpu::plan_tiles(B, in.n);
  const auto f32 = in.x32.options();
  cpu::ScratchPool scratch(in, plan);
  Tensor min_splits = at::full({plan.splits, B}, kInf, f32), max_splits = at::full({plan.splits, B}, -kInf, f32);
  Tensor sp_splits = at::zeros({plan.splits, B}, f32.dtype(at::kDouble)), sn_splits = at::zeros_like(sp_splits);
  Tensor count_splits = at::zeros({plan.splits, B, 2}, f32.dtype(at::kLong));
  Tensor gp_splits, gn_splits;
  if (accumulate) {
    gp_splits = at::zeros({plan.splits, B, D}, f32);
    gn_splits = at::zeros({plan.splits, B, D}, f32);
  }
  // The weights pass over one tile whose score tile s_tile is computed, against the given
  // thresholds and shifts, into split p's sums.
  auto weights = [&](int64_t p, int64_t c0, int64_t w, Tensor& s_tile, const float* mine_min,
                     const float* mine_max, const float* sh_p, const float* sh_n) {
    Tensor n_tile = scratch[p].aux_tile(B, w);
    const auto tile_counts =
        ms_weights_tile(s_tile.data_ptr<float>(), n_tile.data_ptr<float>(), B, w, c0, in, prm, mine_min, mine_max,
                        sh_p, sh_n, sp_splits[p].data_ptr<double>(), sn_splits[p].data_ptr<double>(),
                        count_splits[p].data_ptr<int64_t>());
    if (accumulate) {
      cpu::add_sparse_rows(scratch[p], in, s_tile, c0, gp_splits[p], tile_counts[0]);  // mined positives: usually few
      cpu::add_sparse_rows(scratch[p], in, n_tile, c0, gn_splits[p], tile_counts[1]);
    }
  };
  MsState st;
  auto merge_stats = [&]() {
    st.min_pos = min_splits.amin(0).contiguous();  // min/max are exact: any order
    st.max_neg = max_splits.amax(0).contiguous();
    st.shift_p = at::empty_like(st.min_pos);
    st.shift_n = at::empty_like(st.max_neg);
    ms_shifts(prm, st.min_pos.data_ptr<float>(), st.max_neg.data_ptr<float>(), B, st.shift_p.data_ptr<float>(),
              st.shift_n.data_ptr<float>());
  };
  if (prm.mine) {
    cpu::for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
      Tensor s_tile = scratch[p].similarity(in, c0, w);
      ms_stats_tile(s_tile.data_ptr<float>(), B, w, c0, in, prm.pos_thr, min_splits[p].data_ptr<float>(),
                    max_splits[p].data_ptr<float>());
    });
    merge_stats();
    const float* min_pos = st.min_pos.data_ptr<float>();
    const float* max_neg = st.max_neg.data_ptr<float>();
    const float* sh_p = st.shift_p.data_ptr<float>();
    const float* sh_n = st.shift_n.data_ptr<float>();
    cpu::for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
      Tensor s_tile = scratch[p].similarity(in, c0, w);
      weights(p, c0, w, s_tile, min_pos, max_neg, sh_p, sh_n);
    });
  } else {
    // the shifts each split has summed with so far
    Tensor split_shift_p = at::full({plan.splits, B}, -kInf, f32);
    Tensor split_shift_n = at::full({plan.splits, B}, -kInf, f32);
    const Tensor no_min = at::full({B}, -kInf, f32), no_max = at::full({B}, kInf, f32);
    cpu::for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
      Tensor s_tile = scratch[p].similarity(in, c0, w);
      float* mn = min_splits[p].data_ptr<float>();
      float* mx = max_splits[p].data_ptr<float>();
      ms_stats_tile(s_tile.data_ptr<float>(), B, w, c0, in, prm.pos_thr, mn, mx);
      float* sh_p = split_shift_p[p].data_ptr<float>();
      float* sh_n = split_shift_n[p].data_ptr<float>();
      double* sp = sp_splits[p].data_ptr<double>();
      double* sn = sn_splits[p].data_ptr<double>();
      for (int64_t i = 0; i < B; ++i) {  // bring the split's sums to the grown shifts
        const float new_p = prm.shift_p(mn[i]), new_n = prm.shift_n(mx[i]);
        if (new_p != sh_p[i]) {
          if (sh_p[i] != -kInf) {  // from -inf: nothing summed yet
            const double scale = shift_scale(sh_p[i], new_p);
            sp[i] *= scale;
            scale_row(gp_splits, p, i, scale);
          }
          sh_p[i] = new_p;
        }
        if (new_n != sh_n[i]) {
          if (sh_n[i] != -kInf) {
            const double scale = shift_scale(sh_n[i], new_n);
            sn[i] *= scale;
            scale_row(gn_splits, p, i, scale);
          }
          sh_n[i] = new_n;
        }
      }
      weights(p, c0, w, s_tile, no_min.data_ptr<float>(), no_max.data_ptr<float>(), sh_p, sh_n);
    });
    merge_stats();
    // Every split's sums to the common shift (in place; then summed in order below).
    const float* shp = st.shift_p.data_ptr<float>();
    const float* shn = st.shift_n.data_ptr<float>();
    for (int64_t p = 0; p < plan.splits; ++p) {
      const float* psh_p = split_shift_p[p].data_ptr<float>();
      const float* psh_n = split_shift_n[p].data_ptr<float>();
      double* sp = sp_splits[p].data_ptr<double>();
      double* sn = sn_splits[p].data_ptr<double>();
      for (int64_t i = 0; i < B; ++i) {
        const double scale_p = shift_scale(psh_p[i], shp[i]), scale_n = shift_scale(psh_n[i], shn[i]);
        sp[i] *= scale_p;
        sn[i] *= scale_n;
        if (scale_p != 1.0) scale_row(gp_splits, p, i, scale_p);
        if (scale_n != 1.0) scale_row(gn_splits, p, i, scale_n);
      }
    }
  }
  st.sum_p = cpu::sum_splits(sp_splits);
  st.sum_n = cpu::sum_splits(sn_splits);
  st.counts = cpu::sum_splits(count_splits);
  if (accumulate) {
    st.grad_p = cpu::sum_splits(gp_splits);
    st.grad_n = cpu::sum_splits(gn_splits);
  }
  return st;
}

// Per row: loss, dl/d(sum of shifted positive weights) and likewise for negatives
// (factor_p <= 0, factor_n >= 0), zero for inactive rows and terms; zeroes the counts of
// the rows skip_incomplete drops.
void ms_finish(MsState& st, const MsParams& prm, Tensor& loss, Tensor& factor_p, Tensor& factor_n) {
  const int64_t B = st.sum_p.size(0);
  loss = at::zeros({B}, st.sum_p.options().dtype(at::kFloat));
  factor_p = at::zeros({B}, loss.options());
  factor_n = at::zeros({B}, loss.options());
  auto* l = loss.data_ptr<float>();
  auto* fp = factor_p.data_ptr<float>();
  auto* fn = factor_n.data_ptr<float>();
  const double* sp = st.sum_p.data_ptr<double>();
  const double* sn = st.sum_n.data_ptr<double>();
  const float* min_pos = st.min_pos.data_ptr<float>();
  const float* max_neg = st.max_neg.data_ptr<float>();
  const float* sh_p = st.shift_p.data_ptr<float>();
  const float* sh_n = st.shift_n.data_ptr<float>();
  int64_t* counts = st.counts.data_ptr<int64_t>();
  // log(1 + sum) with sum = s * e^shift, evaluated without overflow
  auto log1p_shifted = [](double s, double shift) {
    return shift > 0 ? shift + std::log(std::exp(-shift) + s) : std::log1p(s * std::exp(shift));
  };
  for (int64_t i = 0; i < B; ++i) {
    const bool has_p = counts[2 * i] > 0, has_n = counts[2 * i + 1] > 0;
    if (prm.skip_incomplete &&
        !(std::isfinite(min_pos[i]) && std::isfinite(max_neg[i]) && has_p && has_n)) {
      counts[2 * i] = counts[2 * i + 1] = 0;
      continue;
    }
    double li = 0;
    if (has_p) {  // a term over an empty set is log(1 + 0) = 0 with no gradient
      const double shift_p = sh_p[i];
      li += log1p_shifted(sp[i], shift_p) / prm.alpha;
      fp[i] = static_cast<float>(-1.0 / (std::exp(-shift_p) + sp[i]));
    }
    if (has_n) {
      const double shift_n = sh_n[i];
      li += log1p_shifted(sn[i], shift_n) / prm.beta;
      fn[i] = static_cast<float>(1.0 / (std::exp(-shift_n) + sn[i]));
    }
    l[i] = static_cast<float>(li);
  }
}

MsParams params(double alpha, double beta, double base, double mining_margin, double pos_eps, bool mine,
                bool skip_incomplete) {
  TORCH_CHECK(alpha > 0 && beta > 0, "alpha, beta: expected > 0");
  return {float(alpha), float(beta), float(base), float(mining_margin), float(1.0 - pos_eps), mine, skip_incomplete};
}

// Whether the one-pass form (positives' S by their own dot product, negatives' by the tile GEMM)
// may decide the mined sets. Not with a mining margin of 0: a row held under two labels then sits
// exactly on both mining boundaries (S_p < max_neg, S_n > min_pos with S_p == S_n), and the two
// products round that one row differently, so the two-pass form (every S from the one GEMM, as
// the reference's single product) decides it. Other exact ties need S values exactly
// mining_margin apart: data on a boundary, which CONTRACT.md section 6 leaves to rounding.
inline bool one_pass_applies(const MsParams& prm) { return prm.mine && prm.mining_margin != 0.f; }

std::tuple<Tensor, Tensor, Tensor> multi_similarity_fwd_cpu(
    const Tensor& x, const Tensor& labels, const Tensor& ref, const Tensor& ref_labels,
    const c10::optional<Tensor>& self_index, int64_t ref_valid, double alpha, double beta, double base,
    double mining_margin, double pos_eps, bool mine, bool skip_incomplete, bool need_grad, bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  const MsParams prm = params(alpha, beta, base, mining_margin, pos_eps, mine, skip_incomplete);
  Positives pos;
  MsState st = one_pass_applies(prm) && gather_positives(in, pos) ? ms_one_pass_mined(in, prm, pos, need_grad)
                                                                  : ms_passes(in, prm, need_grad);
  Tensor loss, fp, fn;
  ms_finish(st, prm, loss, fp, fn);
  Tensor grad = need_grad ? st.grad_p.mul_(fp.unsqueeze(1)).add_(st.grad_n.mul_(fn.unsqueeze(1)))
                          : at::empty({0}, loss.options());
  return {loss, grad, st.counts.to(at::kInt)};
}

std::tuple<Tensor, Tensor> multi_similarity_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                    const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                                    int64_t ref_valid, double alpha, double beta, double base,
                                                    double mining_margin, double pos_eps, bool mine,
                                                    bool skip_incomplete, const Tensor& grad_rows,
                                                    bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  const MsParams prm = params(alpha, beta, base, mining_margin, pos_eps, mine, skip_incomplete);
  Positives pos;
  const bool one_pass = one_pass_applies(prm) && gather_positives(in, pos);
  MsState st = one_pass ? ms_one_pass_mined(in, prm, pos, /*accumulate=*/false)
                        : ms_passes(in, prm, /*accumulate=*/false);
  Tensor loss, fp, fn;
  ms_finish(st, prm, loss, fp, fn);
  const Tensor g = grad_rows.to(at::kFloat);
  if (one_pass)
    return ms_one_pass_backward(in, prm, pos, st, (fp * g).contiguous(), (fn * g).contiguous(), ref.size(0));
  const Tensor gp = (fp * g).unsqueeze(1), gn = (fn * g).unsqueeze(1);
  // Last pass: C = g (factor_p W_p + factor_n W_n); dX = C R, dR_tile = C^T X.
  const auto plan = cpu::plan_tiles(in.B, in.n);
  const auto f64 = loss.options().dtype(at::kDouble);
  Tensor sp_scratch = at::zeros({plan.splits, in.B}, f64), sn_scratch = at::zeros({plan.splits, in.B}, f64);
  Tensor count_scratch = at::zeros({plan.splits, in.B, 2}, f64.dtype(at::kLong));
  const auto thresholds = mining_thresholds(prm, st);
  const float* mine_min = thresholds.first.data_ptr<float>();
  const float* mine_max = thresholds.second.data_ptr<float>();
  const float* sh_p = st.shift_p.data_ptr<float>();
  const float* sh_n = st.shift_n.data_ptr<float>();
  return cpu::coefficient_backward(in, ref.size(0), [&](int64_t p, int64_t c0, int64_t w, Tensor& c,
                                                        cpu::TileScratch& scratch) {
    Tensor n_tile = scratch.aux_tile(in.B, w);
    ms_weights_tile(c.data_ptr<float>(), n_tile.data_ptr<float>(), in.B, w, c0, in, prm, mine_min, mine_max, sh_p,
                    sh_n, sp_scratch[p].data_ptr<double>(), sn_scratch[p].data_ptr<double>(),
                    count_scratch[p].data_ptr<int64_t>());
    c.mul_(gp).add_(n_tile.mul_(gn));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("multi_similarity_fwd", &multi_similarity_fwd_cpu);
  m.impl("multi_similarity_bwd", &multi_similarity_bwd_cpu);
}

}  // namespace xbm_kernels
