// Losses of the form l_i = outer(L_i), L_i = LSE_{P_i} logit + LSE_{N_i} logit, on the CPU
// (CONTRACT.md section 1: circle, generalized_lifted). A Form gives each pair's logit and its
// slope k = dlogit/dS (held constant where the loss says so) and how a row is finished:
//   struct Form {
//     float pos_thr;                                   // 1 - pos_eps
//     void pos(float v, float& logit, float& k) const; // a positive pair of similarity v
//     void neg(float v, float& logit, float& k) const; // a negative pair
//     static constexpr bool kBothSets;  // true: l_i = 0 unless P_i and N_i are both non-empty;
//                                       // false: an empty set's term is 0
//     static constexpr Outer kOuter;    // softplus or relu of L_i
//     // pos() / neg() lane by lane on a Vec<L> (simd.h): the same arithmetic per lane
//     template <class V> void pos_vec(typename V::F v, typename V::F& logit, typename V::F& k) const;
//     template <class V> void neg_vec(typename V::F v, typename V::F& logit, typename V::F& k) const;
//   };
//   XBM_PAIR_LSE_VECTOR(Form)  // after it, in its namespace: the vector row sweeps, see below
//   dl_i/dS_ij = outer'(L_i) softmax_{set(j)}(logit)_j k_ij.
// Forward: ONE pass over the memory with two online log-sum-exps (running max, sum, and the
// weighted rows G = sum exp(logit - max) k r, rescaled when the max grows), one per set; the
// negatives' G through the tile GEMM, the positives' (usually few) through row adds. Splits
// merge (max, sum, G) in order. dl_i/dx_i = outer'(L_i) (G_P / sum_P + G_N / sum_N). The
// reference-side gradient (in-batch loss) recomputes: pass 1 for each set's max and sum, pass 2
// for C = dl/dS per tile, dX = C R, dR = C^T X, the softmax weights as exp(logit - max) / sum
// (not exp(logit - LSE): an LSE of several hundred rounded to fp32 would cost its 2^-24
// relative error in every weight).
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/simd.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace cpu {

enum class Outer { kSoftplus, kRelu };

// Per split running state of each row; index 0 the positives, 1 the negatives.
struct PairLseSplits {
  at::Tensor mx[2];     // (P, B) f32 running max of the set's logits
  at::Tensor sum[2];    // (P, B) f64 sum of exp(logit - max)
  at::Tensor counts;    // (P, B, 2) int64 |P_i|, |N_i|
  at::Tensor g[2];      // (P, B, D) f32 sum of exp(logit - max) k r over the set, or undefined
};

// The scale that brings a sum kept at max `old` to max `now` (1 while both are -inf).
inline float lse_rescale(float old, float now) {
  return now == -std::numeric_limits<float>::infinity() ? 1.f : std::exp(old - now);
}

#if XBM_CPU_VECTOR
// One row of pair_lse_tile whose columns are all valid (its own column is elsewhere), L lanes
// at a time (the CPU's widest, simd.h), the last w % L columns by the scalar Form. Sweep 1
// computes each column's logit (-inf where the pair is in neither set: a same-label column at or
// above pos_thr) and, with crow, its slope k (0 there) into row / crow, the tile's largest logit
// of each set and the counts; sweep 2 the exponentials exp(logit - max_new) (Vec::exp), summed
// in float lanes over blocks of up to 256 columns, each block's sum added in double, and with
// crow the coefficients exp(logit - max_new) k into row (negatives) and crow (positives), 0 in
// the other. Without crow (no G accumulated) the coefficients are not written. Returns the
// row's positive count.
template <int L, class Form>
XBM_INLINE int64_t pair_lse_row_vec_lanes(float* row, float* crow, int64_t w, const int32_t* z, int32_t yi,
                                          const Form& form, float& mx_p, float& mx_n, double& sum_p, double& sum_n,
                                          int64_t* counts, float& scale_p, float& scale_n) {
  const Form prm = form;  // a local copy: the row's stores cannot alias its parameters (kept in registers)
  using V = Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const F zero = V::splat(0.f), ninf = V::splat(-kInf);
  F top_p = ninf, top_n = ninf;
  I np4 = I{}, nn4 = I{};  // -1 per counted lane: exact
  int64_t j = 0;
  for (; j + L <= w; j += L) {
    const F v = V::load(row + j);
    const I same = V::eq(V::load(z + j), yi);
    const I pos = same & V::lt(v, prm.pos_thr);
    F lp, kp, ln, kn;
    prm.template pos_vec<V>(v, lp, kp);
    prm.template neg_vec<V>(v, ln, kn);
    top_p = V::select(pos & V::gt(lp, top_p), lp, top_p);  // std::max(top, logit): NaN keeps top
    top_n = V::select(~same & V::gt(ln, top_n), ln, top_n);
    np4 += pos;
    nn4 += ~same;
    V::store(row + j, V::select(same, V::select(pos, lp, ninf), ln));
    if (crow) V::store(crow + j, V::select(same, V::select(pos, kp, zero), kn));
  }
  float tp = V::max(top_p), tn = V::max(top_n);  // exact in any order (no NaN among them)
  int64_t np = 0, nn = 0;
  for (int k = 0; k < L; ++k) {
    np -= np4[k];
    nn -= nn4[k];
  }
  for (int64_t t = j; t < w; ++t) {  // the last columns: the scalar Form
    const float v = row[t];
    float logit = -kInf, k = 0.f;
    if (z[t] == yi) {
      if (v < prm.pos_thr) {
        prm.pos(v, logit, k);
        tp = std::max(tp, logit);
        ++np;
      }
    } else {
      prm.neg(v, logit, k);
      tn = std::max(tn, logit);
      ++nn;
    }
    row[t] = logit;
    if (crow) crow[t] = k;
  }
  const float new_p = std::max(mx_p, tp), new_n = std::max(mx_n, tn);
  scale_p = lse_rescale(mx_p, new_p);
  scale_n = lse_rescale(mx_n, new_n);
  // -inf only where the set has no pair yet: shift by 0 there (its -inf logits give 0, no inf - inf)
  const float sp = new_p == -kInf ? 0.f : new_p, sn = new_n == -kInf ? 0.f : new_n;
  const F sp4 = V::splat(sp), sn4 = V::splat(sn);
  double acc_p = 0, acc_n = 0;
  for (j = 0; j < w;) {
    const int64_t end = std::min(w, j + 256);
    F ap = zero, an = zero;
    for (; j + L <= end; j += L) {
      const I same = V::eq(V::load(z + j), yi);
      const F e = V::exp(V::load(row + j) - V::select(same, sp4, sn4));
      ap += V::select(same, e, zero);
      an += V::select(same, zero, e);
      if (crow) {
        const F c = e * V::load(crow + j);
        V::store(row + j, V::select(same, zero, c));
        V::store(crow + j, V::select(same, c, zero));
      }
    }
    float a_p = V::sum(ap), a_n = V::sum(an);
    for (; j < end; ++j) {
      const bool same = z[j] == yi;
      const float e = std::exp(row[j] - (same ? sp : sn));
      (same ? a_p : a_n) += e;
      if (crow) {
        const float c = e * crow[j];
        row[j] = same ? 0.f : c;
        crow[j] = same ? c : 0.f;
      }
    }
    acc_p += a_p;
    acc_n += a_n;
  }
  sum_p = sum_p * scale_p + acc_p;
  sum_n = sum_n * scale_n + acc_n;
  mx_p = new_p;
  mx_n = new_n;
  counts[0] += np;
  counts[1] += nn;
  return np;
}

// One row of pair_lse_bwd's coefficients, L lanes at a time: C_ij = w_set exp(logit - top_set) k
// (0 outside P_i and N_i), as the scalar loop there, over crow (the row's S) in place.
template <int L, class Form>
XBM_INLINE void pair_lse_coef_row_vec_lanes(float* crow, int64_t w, const int32_t* z, int32_t yi, const Form& form,
                                            float tp, float tn, float wp, float wn) {
  const Form prm = form;  // as above
  using V = Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  const F zero = V::splat(0.f), tp4 = V::splat(tp), tn4 = V::splat(tn), wp4 = V::splat(wp), wn4 = V::splat(wn);
  int64_t j = 0;
  for (; j + L <= w; j += L) {
    const F v = V::load(crow + j);
    const I same = V::eq(V::load(z + j), yi);
    F lp, kp, ln, kn;
    prm.template pos_vec<V>(v, lp, kp);
    prm.template neg_vec<V>(v, ln, kn);
    const F e = V::exp(V::select(same, lp, ln) - V::select(same, tp4, tn4));
    const F c = V::select(same, wp4, wn4) * e * V::select(same, kp, kn);
    V::store(crow + j, V::select(~same | V::lt(v, prm.pos_thr), c, zero));
  }
  for (; j < w; ++j) {
    const float v = crow[j];
    float logit, k, c_ij = 0.f;
    if (z[j] == yi) {
      if (v < prm.pos_thr) {
        prm.pos(v, logit, k);
        c_ij = wp * std::exp(logit - tp) * k;
      }
    } else {
      prm.neg(v, logit, k);
      c_ij = wn * std::exp(logit - tn) * k;
    }
    crow[j] = c_ij;
  }
}

// The two row functions above for one Form, compiled at each vector width and chosen at run time
// (XBM_CPU_DISPATCH): pair_lse_row_vec(..., const Form&) and pair_lse_coef_row_vec(..., const
// Form&), found by pair_lse_tile / pair_lse_bwd through the Form's namespace. Expanded once per
// Form, after its definition and in its namespace.
#define XBM_PAIR_LSE_VECTOR(Form)                                                                                  \
  using ::xbm_kernels::cpu::pair_lse_row_vec_lanes;                                                              \
  using ::xbm_kernels::cpu::pair_lse_coef_row_vec_lanes;                                                         \
  XBM_CPU_DISPATCH(int64_t, pair_lse_row_vec,                                                                    \
                   (float* row, float* crow, int64_t w, const int32_t* z, int32_t yi, const Form& prm,           \
                    float& mx_p, float& mx_n, double& sum_p, double& sum_n, int64_t* counts, float& scale_p,    \
                    float& scale_n),                                                                             \
                   (row, crow, w, z, yi, prm, mx_p, mx_n, sum_p, sum_n, counts, scale_p, scale_n))                \
  XBM_CPU_DISPATCH(void, pair_lse_coef_row_vec,                                                                  \
                   (float* crow, int64_t w, const int32_t* z, int32_t yi, const Form& prm, float tp, float tn,   \
                    float wp, float wn),                                                                         \
                   (crow, w, z, yi, prm, tp, tn, wp, wn))
#else
#define XBM_PAIR_LSE_VECTOR(Form)
#endif

// One tile of the pass: updates the running state of every row; with coef != nullptr writes
// the tile's coefficients exp(logit - max_new) k into `s` (negatives) and `coef` (positives),
// 0 elsewhere, and each row's rescale factors into scale_p / scale_n. Returns the number of
// positive pairs in the tile.
template <class Form>
int64_t pair_lse_tile(float* s, float* coef, int64_t w, int64_t c0, const LossInputs& in, const Form& prm,
                      float* mx_p, float* mx_n, double* sum_p, double* sum_n, int64_t* counts, float* scale_p,
                      float* scale_n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int32_t* y = in.y_ptr();
  const int32_t* z = in.z_ptr() + c0;
  int64_t tile_pos = 0;
  for (int64_t i = 0; i < in.B; ++i) {
    float* row = s + i * w;
    float* crow = coef ? coef + i * w : nullptr;
    const int64_t self_col = in.self_col(i) - c0;
#if XBM_CPU_VECTOR
    if (self_col < 0 || self_col >= w) {  // every column valid: the vector path
      tile_pos += pair_lse_row_vec(row, crow, w, z, y[i], prm, mx_p[i], mx_n[i], sum_p[i], sum_n[i], counts + 2 * i,
                                   scale_p[i], scale_n[i]);
      continue;
    }
#endif
    // The row whose own column is in this tile (once per row and pass), and the scalar
    // definition of the vector path. First sweep: the tile's largest logit of each set.
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
    const float rp = lse_rescale(mx_p[i], new_p), rn = lse_rescale(mx_n[i], new_n);
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

template <class Form>
PairLseSplits pair_lse_pass(const LossInputs& in, const TilePlan& plan, const Form& prm, bool accumulate) {
  const int64_t B = in.B, D = in.D;
  const auto f32 = in.x32.options();
  PairLseSplits st;
  for (int set = 0; set < 2; ++set) {
    st.mx[set] = at::full({plan.splits, B}, -std::numeric_limits<float>::infinity(), f32);
    st.sum[set] = at::zeros({plan.splits, B}, f32.dtype(at::kDouble));
    if (accumulate) st.g[set] = at::zeros({plan.splits, B, D}, f32);
  }
  st.counts = at::zeros({plan.splits, B, 2}, f32.dtype(at::kLong));
  at::Tensor scales = at::empty({plan.splits, 2, B}, f32);
  ScratchPool scratch(in, plan);
  for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    at::Tensor c_neg = scratch[p].similarity(in, c0, w);
    at::Tensor c_pos = scratch[p].aux_tile(B, w);
    at::Tensor sc = scales[p];
    const int64_t npos = pair_lse_tile(
        c_neg.data_ptr<float>(), accumulate ? c_pos.data_ptr<float>() : nullptr, w, c0, in, prm,
        st.mx[0][p].data_ptr<float>(), st.mx[1][p].data_ptr<float>(), st.sum[0][p].data_ptr<double>(),
        st.sum[1][p].data_ptr<double>(), st.counts[p].data_ptr<int64_t>(), sc[0].data_ptr<float>(),
        sc[1].data_ptr<float>());
    if (accumulate) {
      // G scaled by each row's rescale factor, skipped where every factor is 1 (no row's max
      // grew in this tile: most tiles after the first few)
      auto rescaled = [&](int set) {
        at::Tensor g = st.g[set][p];
        const float* f = sc[set].data_ptr<float>();
        return std::all_of(f, f + B, [](float r) { return r == 1.f; }) ? g : g.mul_(sc[set].unsqueeze(1));
      };
      scratch[p].add_product(in, c_neg, c0, w, rescaled(1));
      add_sparse_rows(scratch[p], in, c_pos, c0, rescaled(0), npos);
    }
  });
  return st;
}

struct PairLseRows {
  at::Tensor loss;     // (B,) f32
  at::Tensor counts;   // (B, 2) int64
  at::Tensor active;   // (B,) bool: the row has a loss (both sets, or either, by kBothSets)
  at::Tensor top[2];   // (B,) f32 the set's largest logit (0 where the set does not count)
  at::Tensor sum[2];   // (B,) f64 sum of exp(logit - top) over the set (1 where it does not count)
  at::Tensor slope;    // (B,) f64 outer'(L_i), 0 where not active
  at::Tensor grad;     // (B, D) f32 dl_i/dx_i, if accumulated
};

// Merges the splits in order and finishes each row.
inline PairLseRows pair_lse_merge(const PairLseSplits& st, bool both_sets, Outer outer) {
  const int64_t P = st.mx[0].size(0);
  PairLseRows out;
  out.counts = sum_splits(st.counts);
  const at::Tensor has[2] = {out.counts.select(1, 0).gt(0), out.counts.select(1, 1).gt(0)};
  out.active = both_sets ? has[0].logical_and(has[1]) : has[0].logical_or(has[1]);
  at::Tensor zero = at::zeros({}, st.sum[0].options());
  at::Tensor scale[2], sum[2], lse[2], counted[2];
  for (int set = 0; set < 2; ++set) {
    counted[set] = out.active.logical_and(has[set]);  // the set's term enters L_i
    at::Tensor top = st.mx[set].amax(0);  // exact in any order (amax: no OpenMP region per call)
    scale[set] = at::exp(st.mx[set] - top.unsqueeze(0)).nan_to_num_(0.f);      // -inf - -inf: 0
    sum[set] = sum_splits(st.sum[set] * scale[set].to(at::kDouble));
    lse[set] = at::where(counted[set], top.to(at::kDouble) + sum[set].log(), zero);
    out.top[set] = at::where(counted[set], top, zero.to(at::kFloat));
    out.sum[set] = at::where(counted[set], sum[set], at::ones({}, zero.options()));
  }
  const at::Tensor total = lse[0] + lse[1];
  at::Tensor value, slope;
  if (outer == Outer::kSoftplus) {
    value = total.clamp_min(0) + at::log1p(at::exp(-total.abs()));  // softplus, stable
    slope = at::sigmoid(total);
  } else {
    value = total.clamp_min(0);
    slope = total.gt(0).to(at::kDouble);  // relu'(0) = 0, as torch.relu
  }
  out.loss = at::where(out.active, value, zero).to(at::kFloat);
  out.slope = at::where(out.active, slope, zero);
  if (st.g[0].defined()) {
    at::Tensor grad;
    for (int set = 0; set < 2; ++set) {
      at::Tensor g = st.g[set][0].mul(scale[set][0].unsqueeze(1));
      for (int64_t p = 1; p < P; ++p) g.add_(st.g[set][p].mul(scale[set][p].unsqueeze(1)));
      at::Tensor factor = at::where(counted[set], out.slope / out.sum[set], zero).to(at::kFloat).unsqueeze(1);
      g.mul_(factor);
      grad = set == 0 ? g : grad.add_(g);
    }
    out.grad = grad;
  }
  return out;
}

template <class Form>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_lse_fwd(const at::Tensor& x, const at::Tensor& labels,
                                                            const at::Tensor& ref, const at::Tensor& ref_labels,
                                                            const c10::optional<at::Tensor>& self_index,
                                                            int64_t ref_valid, const Form& prm, bool need_grad) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto in = prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  const PairLseRows rows =
      pair_lse_merge(pair_lse_pass(in, plan_tiles(in.B, in.n), prm, need_grad), Form::kBothSets, Form::kOuter);
  at::Tensor grad = need_grad ? rows.grad : at::empty({0}, rows.loss.options());
  return {rows.loss, grad, rows.counts.to(at::kInt)};
}

template <class Form>
std::tuple<at::Tensor, at::Tensor> pair_lse_bwd(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
                                                const at::Tensor& ref_labels,
                                                const c10::optional<at::Tensor>& self_index, int64_t ref_valid,
                                                const Form& prm, const at::Tensor& grad_rows) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto in = prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  const PairLseRows rows =
      pair_lse_merge(pair_lse_pass(in, plan_tiles(in.B, in.n), prm, false), Form::kBothSets, Form::kOuter);
  // Pass 2: C_ij = g_i outer'(L_i) exp(logit_ij - top_set) / sum_set k_ij; rows not active: 0.
  const at::Tensor gs = (grad_rows.to(at::kDouble) * rows.slope).to(at::kFloat).contiguous();
  const at::Tensor top_p = rows.top[0].contiguous(), top_n = rows.top[1].contiguous();
  const at::Tensor wp = (grad_rows.to(at::kDouble) * rows.slope / rows.sum[0]).to(at::kFloat).contiguous();
  const at::Tensor wn = (grad_rows.to(at::kDouble) * rows.slope / rows.sum[1]).to(at::kFloat).contiguous();
  const float* gs_p = gs.data_ptr<float>();
  const float* tp = top_p.data_ptr<float>();
  const float* tn = top_n.data_ptr<float>();
  const float* wp_p = wp.data_ptr<float>();
  const float* wn_p = wn.data_ptr<float>();
  const int32_t* y = in.y_ptr();
  return coefficient_backward(in, ref.size(0), [&](int64_t, int64_t c0, int64_t w, at::Tensor& c, TileScratch&) {
    float* cp = c.data_ptr<float>();
    const int32_t* z = in.z_ptr() + c0;
    for (int64_t i = 0; i < in.B; ++i) {
      float* crow = cp + i * w;
      if (gs_p[i] == 0.f) {  // no gradient, or the row is not active (its LSEs are 0 there)
        std::fill(crow, crow + w, 0.f);
        continue;
      }
      const int64_t self_col = in.self_col(i) - c0;
#if XBM_CPU_VECTOR
      if (self_col < 0 || self_col >= w) {  // every column valid: the vector path
        pair_lse_coef_row_vec(crow, w, z, y[i], prm, tp[i], tn[i], wp_p[i], wn_p[i]);
        continue;
      }
#endif
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

}  // namespace cpu
}  // namespace xbm_kernels
