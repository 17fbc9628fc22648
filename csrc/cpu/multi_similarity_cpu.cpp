// Fused multi-similarity loss over a reference set on the CPU (CONTRACT.md section 1):
//   P~_i = { j in P_i : S_ij - mm < max_{N_i} S },  N~_i = { j in N_i : S_ij + mm > min_{P_i} S }
//   (mine = false: P~_i = P_i, N~_i = N_i)
//   l_i = 1/alpha log(1 + sum_{P~_i} exp(-alpha (S_ij - base)))
//       + 1/beta  log(1 + sum_{N~_i} exp( beta (S_ij - base)))
//   skip_incomplete: l_i = 0 if any of P_i, N_i, P~_i, N~_i is empty; else a term is 0
//   when its own mined set is empty. (With mining the two agree: P~_i and N~_i are both
//   empty exactly when min_P S - mm >= max_N S, and both are empty when P_i or N_i is.)
// With mining, pass 1 streams the reference for min positive / max negative per row. Those
// give the largest exponent of each sum in advance (shift_p = -alpha (min_pos - base),
// shift_n = beta (max_neg - base)), so pass 2 sums exp(a - shift) <= 1 with no running
// maximum and accumulates the weighted rows sum w_j r_j for the gradient; it is scaled
// once at the end by dl/dsum. Without mining the statistics are needed only for the shifts,
// so ONE pass keeps them per split as it goes (each tile's own min / max first, then
// its weights) and rescales the split's sums when a shift grows; splits are
// brought to the common shift when merged. Mined-set membership is a constant for the
// gradient. pos_eps may be negative (every same-label column a positive).
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <utility>

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

// Pass 1: per-row min positive and max negative over one tile.
void ms_stats_tile(const float* s, int64_t B, int64_t w, int64_t c0, const cpu::LossInputs& in, float pos_thr,
                   float* min_pos, float* max_neg) {
  const int32_t* y = in.y_ptr();
  const int32_t* z = in.z_ptr() + c0;
  for (int64_t i = 0; i < B; ++i) {
    const float* row = s + i * w;
    const int64_t self_col = in.self_col(i) - c0;
    float mp = min_pos[i], mn = max_neg[i];
    int64_t j = 0;
#if XBM_CPU_VECTOR
    if (self_col < 0 || self_col >= w) {  // every column valid: four lanes at a time, then the tail
      cpu::f32x4 mp4 = {mp, mp, mp, mp}, mn4 = {mn, mn, mn, mn};
      for (; j + 4 <= w; j += 4) {
        const cpu::f32x4 v = cpu::load4(row + j);
        const cpu::i32x4 same = cpu::load4(z + j) == y[i];
        mp4 = cpu::select4(same & (v < pos_thr) & (v < mp4), v, mp4);
        mn4 = cpu::select4(~same & (v > mn4), v, mn4);
      }
      mp = cpu::min4(mp4);
      mn = cpu::max4(mn4);
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

// Pass 2: writes the shifted positive weights into s and the negative ones into aux;
// adds their row sums and mined counts. Positives are mined against mine_max_neg and
// negatives against mine_min_pos (+inf / -inf: no mining); shift_p / shift_n are the
// rows' exponent shifts. Returns the tile's mined (positive, negative) counts.
std::array<int64_t, 2> ms_weights_tile(float* s, float* aux, int64_t B, int64_t w, int64_t c0,
                                       const cpu::LossInputs& in, const MsParams& prm, const float* mine_min_pos,
                                       const float* mine_max_neg, const float* shift_p, const float* shift_n,
                                       double* sum_p, double* sum_n, int64_t* counts) {
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
    if (self_col < 0 || self_col >= w) {  // every column valid: four lanes at a time, then the tail
      const float mp = mine_min_pos[i], mn = mine_max_neg[i];
      const cpu::f32x4 zero = {0.f, 0.f, 0.f, 0.f};
      while (j + 4 <= w) {  // float lanes over blocks of up to 256 columns, each block's sum added in double
        const int64_t end = std::min(w, j + 256);
        cpu::f32x4 sp4 = zero, sn4 = zero, np4 = zero, nn4 = zero;
        for (; j + 4 <= end; j += 4) {
          const cpu::f32x4 v = cpu::load4(row + j);
          const cpu::i32x4 same = cpu::load4(z + j) == y[i];
          const cpu::i32x4 mined_p = same & (v < prm.pos_thr) & (v - prm.mining_margin < mn);
          const cpu::i32x4 mined_n = ~same & (v + prm.mining_margin > mp);
          // Unmined lanes may overflow exp4's range; they are clamped there, then zeroed.
          const cpu::f32x4 wp = cpu::select4(mined_p, cpu::exp4(-prm.alpha * (v - prm.base) - sh_p), zero);
          const cpu::f32x4 wn = cpu::select4(mined_n, cpu::exp4(prm.beta * (v - prm.base) - sh_n), zero);
          sp4 += wp;
          sn4 += wn;
          np4 += cpu::mask_to_one(mined_p);
          nn4 += cpu::mask_to_one(mined_n);
          cpu::store4(row + j, wp);
          cpu::store4(nrow + j, wn);
        }
        sp += cpu::sum4(sp4);
        sn += cpu::sum4(sn4);
        np += static_cast<int64_t>(cpu::sum4(np4));
        nn += static_cast<int64_t>(cpu::sum4(nn4));
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
    st.min_pos = std::get<0>(min_splits.min(0)).contiguous();  // min/max are exact: any order
    st.max_neg = std::get<0>(max_splits.max(0)).contiguous();
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

std::tuple<Tensor, Tensor, Tensor> multi_similarity_fwd_cpu(
    const Tensor& x, const Tensor& labels, const Tensor& ref, const Tensor& ref_labels,
    const c10::optional<Tensor>& self_index, int64_t ref_valid, double alpha, double beta, double base,
    double mining_margin, double pos_eps, bool mine, bool skip_incomplete, bool need_grad, bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  const MsParams prm = params(alpha, beta, base, mining_margin, pos_eps, mine, skip_incomplete);
  MsState st = ms_passes(in, prm, need_grad);
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
  MsState st = ms_passes(in, prm, /*accumulate=*/false);
  Tensor loss, fp, fn;
  ms_finish(st, prm, loss, fp, fn);
  const Tensor g = grad_rows.to(at::kFloat);
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
