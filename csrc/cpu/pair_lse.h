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
//     // neg() lane by lane on a Vec<L> (simd.h): the same arithmetic per lane (the positives,
//     // few in a memory of many classes, are taken one by one by pos())
//     template <class V> void neg_vec(typename V::F v, typename V::F& logit, typename V::F& k) const;
//   };
//   XBM_PAIR_LSE_VECTOR(Form)  // after it, in its namespace: the vector row sweeps, see below
//   dl_i/dS_ij = outer'(L_i) softmax_{set(j)}(logit)_j k_ij.
// Forward: ONE pass over the memory with two online log-sum-exps (running max, sum, and the
// weighted rows G = sum exp(logit - max) k r, rescaled when the max grows), one per set; the
// negatives' G through the tile GEMM, the positives' (usually few, listed as the tile is read)
// through row adds. Splits merge (max, sum, G) in order.
// dl_i/dx_i = outer'(L_i) (G_P / sum_P + G_N / sum_N). The reference-side gradient (in-batch
// loss) recomputes: pass 1 for each set's max and sum, pass 2 for C = dl/dS per tile,
// dX = C R, dR = C^T X, the softmax weights as exp(logit - max) / sum
// (not exp(logit - LSE): an LSE of several hundred rounded to fp32 would cost its 2^-24
// relative error in every weight).
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

// The sum of exp(logit - sp) over a row's np listed positives (flat indices pidx, less base:
// their columns of row), their coefficients exp(logit - sp) k into pcoef when given.
template <class Form>
inline double pair_lse_positives(const float* row, const Form& prm, const int32_t* pidx, int64_t np, int32_t base,
                                 float sp, float* pcoef) {
  double acc = 0;
  for (int64_t q = 0; q < np; ++q) {
    float logit, k;
    prm.pos(row[pidx[q] - base], logit, k);
    const float e = std::exp(logit - sp);
    acc += e;
    if (pcoef) pcoef[q] = e * k;
  }
  return acc;
}

// A row's tile folded into its running state: both sets' maxima to new_p / new_n, their sums
// rescaled (the factors into scale_p / scale_n) and the tile's sums acc_p / acc_n added, the
// counts np / nn added. Returns np.
inline int64_t pair_lse_commit(float new_p, float new_n, double acc_p, double acc_n, int64_t np, int64_t nn,
                               float& mx_p, float& mx_n, double& sum_p, double& sum_n, int64_t* counts,
                               float& scale_p, float& scale_n) {
  scale_p = lse_rescale(mx_p, new_p);
  scale_n = lse_rescale(mx_n, new_n);
  sum_p = sum_p * scale_p + acc_p;
  sum_n = sum_n * scale_n + acc_n;
  mx_p = new_p;
  mx_n = new_n;
  counts[0] += np;
  counts[1] += nn;
  return np;
}

// One row of pair_lse_tile: the positives of the row found in `row` (S, read only) are listed
// in pidx (flat index base + j, in column order; the return value is their number), their
// coefficients exp(logit - max_new) k in pcoef (with crow), the negatives' coefficients written
// into crow (0 at every other column, the row's own column self_col included; self_col is -1
// when it is not in this tile). The scalar definition of the vector path below: it reads the
// tile once to find each set's largest logit, then computes the exponentials at the new max.
template <class Form>
inline int64_t pair_lse_row_scalar(const float* row, float* crow, int64_t w, int64_t self_col, const int32_t* z,
                                   int32_t yi, const Form& prm, int32_t* pidx, int32_t base, float* pcoef,
                                   float& mx_p, float& mx_n, double& sum_p, double& sum_n, int64_t* counts,
                                   float& scale_p, float& scale_n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float top_p = -kInf, top_n = -kInf;
  int64_t np = 0, nn = 0;
  for (int64_t j = 0; j < w; ++j) {
    if (j == self_col) continue;
    const float v = row[j];
    float logit, k;
    if (z[j] == yi) {
      if (!(v < prm.pos_thr)) continue;
      prm.pos(v, logit, k);
      top_p = std::max(top_p, logit);
      pidx[np++] = base + static_cast<int32_t>(j);
    } else {
      prm.neg(v, logit, k);
      top_n = std::max(top_n, logit);
      ++nn;
    }
  }
  const float new_p = std::max(mx_p, top_p), new_n = std::max(mx_n, top_n);
  // -inf only where the set has no pair yet: shift by 0 there (no inf - inf)
  const float sp = new_p == -kInf ? 0.f : new_p, sn = new_n == -kInf ? 0.f : new_n;
  const double acc_p = pair_lse_positives(row, prm, pidx, np, base, sp, crow ? pcoef : nullptr);
  double acc_n = 0;
  for (int64_t j = 0; j < w; ++j) {
    float c = 0.f;
    if (j != self_col && z[j] != yi) {
      float logit, k;
      prm.neg(row[j], logit, k);
      const float e = std::exp(logit - sn);
      acc_n += e;
      c = e * k;
    }
    if (crow) crow[j] = c;
  }
  return pair_lse_commit(new_p, new_n, acc_p, acc_n, np, nn, mx_p, mx_n, sum_p, sum_n, counts, scale_p, scale_n);
}

// One row of pair_lse_bwd's coefficients C_ij = w_set exp(logit - top_set) k (0 outside P_i and
// N_i) over crow (the row's S) in place: the definition of the vector path.
template <class Form>
inline void pair_lse_coef_row_scalar(float* crow, int64_t w, int64_t self_col, const int32_t* z, int32_t yi,
                                     const Form& prm, float tp, float tn, float wp, float wn) {
  for (int64_t j = 0; j < w; ++j) {
    const float v = crow[j];
    float logit, k, c_ij = 0.f;
    if (j != self_col) {
      if (z[j] == yi) {
        if (v < prm.pos_thr) {
          prm.pos(v, logit, k);
          c_ij = wp * std::exp(logit - tp) * k;
        }
      } else {
        prm.neg(v, logit, k);
        c_ij = wn * std::exp(logit - tn) * k;
      }
    }
    crow[j] = c_ij;
  }
}

#if XBM_CPU_VECTOR
// (a > b ? a : b) lane by lane, b where either is NaN: std::max(b, a) of each lane (one vmaxps
// at 8 and 16 lanes, which are only compiled for AVX2 / AVX-512; maxps at 4 with SSE2).
template <int L>
XBM_INLINE typename Vec<L>::F pair_lse_max(typename Vec<L>::F a, typename Vec<L>::F b) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (L >= 8) {
    typename Vec<L>::F r;
    asm("vmaxps %2, %1, %0" : "=v"(r) : "v"(a), "v"(b));
    return r;
  }
#endif
#if defined(__SSE2__)
  if constexpr (L == 4) return reinterpret_cast<typename Vec<L>::F>(_mm_max_ps(reinterpret_cast<__m128>(a), reinterpret_cast<__m128>(b)));
#endif
  return Vec<L>::select(Vec<L>::gt(a, b), a, b);
}

#if defined(__x86_64__) || defined(__i386__)
// At 16 lanes (compiled for AVX-512 only) the sweep keeps its lane sets in mask registers, as
// bits (lane k = bit k): the lanes where a != b, and an add, a max and a product on the lanes
// of m only (asm, as simd.h: its compares give vector masks, which cost a conversion each way).
XBM_INLINE uint32_t pair_lse_ne16(Vec<16>::I a, Vec<16>::I b) {
  uint16_t m;
  asm("vpcmpd $4, %2, %1, %0" : "=Yk"(m) : "v"(a), "v"(b));
  return m;
}
// acc + x on the lanes of m, acc elsewhere
XBM_INLINE Vec<16>::F pair_lse_add_on16(Vec<16>::F acc, uint32_t m, Vec<16>::F x) {
  const uint16_t k = static_cast<uint16_t>(m);
  asm("vaddps %1, %0, %0%{%2%}" : "+v"(acc) : "v"(x), "Yk"(k));
  return acc;
}
// pair_lse_max(x, top) on the lanes of m, top elsewhere
XBM_INLINE Vec<16>::F pair_lse_max_on16(Vec<16>::F top, uint32_t m, Vec<16>::F x) {
  const uint16_t k = static_cast<uint16_t>(m);
  asm("vmaxps %0, %1, %0%{%2%}" : "+v"(top) : "v"(x), "Yk"(k));
  return top;
}
// a * b on the lanes of m, 0 elsewhere
XBM_INLINE Vec<16>::F pair_lse_mul_on16(uint32_t m, Vec<16>::F a, Vec<16>::F b) {
  const uint16_t k = static_cast<uint16_t>(m);
  Vec<16>::F r;
  asm("vmulps %2, %1, %0%{%3%}%{z%}" : "=v"(r) : "v"(a), "v"(b), "Yk"(k));
  return r;
}
#endif

// One sweep of pair_lse_row_vec_lanes over the row, L lanes at a time (the last w % L columns by
// the scalar Form). The lanes evaluate the negative Form only; the excluded lanes (same label,
// or with kSelf the row's own column self_col) are found as a bit mask. With kScan: the
// positives listed (scalar Form, one by one: they are few), the counts and the largest negative
// logit (tn). With kExp: the negatives' exp(logit - sh) (Vec::exp) summed in float lanes over
// blocks of up to 256 columns, each block's sum added in double (returned), and with crow their
// coefficients exp(logit - sh) k (0 at the excluded columns).
template <int L, bool kScan, bool kExp, bool kSelf, class Form>
XBM_INLINE double pair_lse_sweep_at(const float* row, float* crow, int64_t w, int64_t self_col, const int32_t* z,
                                    int32_t yi, const Form& prm, float sh, float& tn, float& tp, int64_t& np,
                                    int64_t& nn, int32_t* pidx, int32_t base) {
  using V = Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const F zero = V::splat(0.f), sh4 = V::splat(sh), ninf = V::splat(-kInf);
  I iota;
  for (int k = 0; k < L; ++k) iota[k] = k;
  F top = ninf;
  float tp_s = tp;
  int64_t np_s = np, nn_s = nn;
  double acc = 0;
  // the same-label lanes (bits) of the block at j0, one by one: the positives' max logit and list
  auto same_label = [&](int64_t j0, uint32_t bits) {
    for (uint32_t b = bits; b; b &= b - 1) {
      const int64_t col = j0 + __builtin_ctz(b);
      const float vc = row[col];
      if ((kSelf && col == self_col) || !(vc < prm.pos_thr)) continue;
      float logit, k;
      prm.pos(vc, logit, k);
      tp_s = std::max(tp_s, logit);
      pidx[np_s++] = base + static_cast<int32_t>(col);
    }
  };
  int64_t j = 0;
  for (; j < w;) {
    const int64_t end = std::min(w, j + 256);
    F an = zero;
    for (; j + L <= end; j += L) {
      const F v = V::load(row + j);
      F ln, kn;
      prm.template neg_vec<V>(v, ln, kn);
#if defined(__x86_64__) || defined(__i386__)
      if constexpr (L == 16) {
        // the same lane by lane as the generic body below, the negatives' lanes as mask bits
        uint32_t negs = pair_lse_ne16(V::load(z + j), I{} + yi);
        if constexpr (kSelf) {
          const int64_t o = self_col - j;
          if (o >= 0 && o < L) negs &= ~(1u << o);
        }
        if constexpr (kScan) {
          top = pair_lse_max_on16(top, negs, ln);
          nn_s += __builtin_popcount(negs);
          same_label(j, ~negs & 0xFFFFu);
        }
        if constexpr (kExp) {
          const F e = V::exp(ln - sh4);
          an = pair_lse_add_on16(an, negs, e);
          if (crow) V::store(crow + j, pair_lse_mul_on16(negs, e, kn));
        }
        continue;
      }
#endif
      I excl = V::eq(V::load(z + j), yi);
      if constexpr (kSelf) excl |= V::eq(iota, static_cast<int32_t>(self_col - j));
      if constexpr (kScan) {
        top = pair_lse_max<L>(V::select(excl, ninf, ln), top);  // std::max(top, logit): NaN keeps top
        const uint32_t bits = V::bits(excl);
        nn_s += L - __builtin_popcount(bits);
        same_label(j, bits);
      }
      if constexpr (kExp) {
        const F e = V::exp(ln - sh4);
        an += V::select(excl, zero, e);
        if (crow) V::store(crow + j, V::select(excl, zero, e * kn));
      }
    }
    float a = V::sum(an);
    for (; j < end; ++j) {  // the last columns: the scalar Form
      const float v = row[j];
      const bool neg = j != self_col && z[j] != yi;
      float logit = 0.f, k = 0.f;
      if (neg) prm.neg(v, logit, k);
      if constexpr (kScan) {
        if (neg) {
          tn = std::max(tn, logit);
          ++nn_s;
        } else if (j != self_col && v < prm.pos_thr) {
          float lp, kp;
          prm.pos(v, lp, kp);
          tp_s = std::max(tp_s, lp);
          pidx[np_s++] = base + static_cast<int32_t>(j);
        }
      }
      if constexpr (kExp) {
        float c = 0.f;
        if (neg) {
          const float e = std::exp(logit - sh);
          a += e;
          c = e * k;
        }
        if (crow) crow[j] = c;
      }
    }
    acc += a;
  }
  if constexpr (kScan) {
    tn = std::max(tn, V::max(top));  // exact in any order (no NaN among them)
    tp = tp_s;
    np = np_s;
    nn = nn_s;
  }
  return acc;
}
template <int L, bool kScan, bool kExp, class Form>
XBM_INLINE double pair_lse_sweep(const float* row, float* crow, int64_t w, int64_t self_col, const int32_t* z,
                                 int32_t yi, const Form& prm, float sh, float& tn, float& tp, int64_t& np,
                                 int64_t& nn, int32_t* pidx, int32_t base) {
  if (self_col >= 0)
    return pair_lse_sweep_at<L, kScan, kExp, true>(row, crow, w, self_col, z, yi, prm, sh, tn, tp, np, nn, pidx, base);
  return pair_lse_sweep_at<L, kScan, kExp, false>(row, crow, w, self_col, z, yi, prm, sh, tn, tp, np, nn, pidx, base);
}

// pair_lse_row_scalar, L lanes at a time. The negatives' shift is the running max of the
// earlier tiles where there is one: one sweep computes the sums and coefficients there while
// finding the tile's largest logit, and only a row whose max grew in this tile (a few tiles per
// row and pass) sweeps again at its new max; the first tile of a split finds its max first.
// Either way each exponential is taken at the new max, as in the definition.
template <int L, class Form>
XBM_INLINE int64_t pair_lse_row_vec_lanes(const float* row, float* crow, int64_t w, int64_t self_col,
                                          const int32_t* z, int32_t yi, const Form& form, int32_t* pidx, int32_t base,
                                          float* pcoef, float& mx_p, float& mx_n, double& sum_p, double& sum_n,
                                          int64_t* counts, float& scale_p, float& scale_n) {
  const Form prm = form;  // a local copy: the row's stores cannot alias its parameters (kept in registers)
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float tp = -kInf, tn = -kInf;
  int64_t np = 0, nn = 0;
  double acc_n;
  float new_n;
  if (mx_n == -kInf) {
    pair_lse_sweep<L, true, false>(row, crow, w, self_col, z, yi, prm, 0.f, tn, tp, np, nn, pidx, base);
    new_n = tn;
    acc_n = pair_lse_sweep<L, false, true>(row, crow, w, self_col, z, yi, prm, new_n == -kInf ? 0.f : new_n, tn, tp,
                                           np, nn, pidx, base);
  } else {
    acc_n = pair_lse_sweep<L, true, true>(row, crow, w, self_col, z, yi, prm, mx_n, tn, tp, np, nn, pidx, base);
    new_n = std::max(mx_n, tn);
    if (new_n != mx_n)  // the max grew (tn > mx_n): the exponentials again at the new max
      acc_n = pair_lse_sweep<L, false, true>(row, crow, w, self_col, z, yi, prm, new_n, tn, tp, np, nn, pidx, base);
  }
  const float new_p = std::max(mx_p, tp);
  const float sp = new_p == -kInf ? 0.f : new_p;
  const double acc_p = pair_lse_positives(row, prm, pidx, np, base, sp, crow ? pcoef : nullptr);
  return pair_lse_commit(new_p, new_n, acc_p, acc_n, np, nn, mx_p, mx_n, sum_p, sum_n, counts, scale_p, scale_n);
}

// One row of pair_lse_bwd's coefficients, L lanes at a time, over crow (the row's S) in place,
// as pair_lse_coef_row_scalar: the lanes evaluate the negative Form, the same-label columns are
// then rewritten one by one by the scalar positive Form.
template <int L, class Form>
XBM_INLINE void pair_lse_coef_row_vec_lanes(float* crow, int64_t w, int64_t self_col, const int32_t* z, int32_t yi,
                                            const Form& form, float tp, float tn, float wp, float wn) {
  const Form prm = form;  // as above
  using V = Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  const F zero = V::splat(0.f), tn4 = V::splat(tn), wn4 = V::splat(wn);
  I iota;
  for (int k = 0; k < L; ++k) iota[k] = k;
  int64_t j = 0;
  for (; j + L <= w; j += L) {
    const F v = V::load(crow + j);
    const I excl = V::eq(V::load(z + j), yi) | V::eq(iota, static_cast<int32_t>(self_col - j));
    F ln, kn;
    prm.template neg_vec<V>(v, ln, kn);
    const F c = wn4 * V::exp(ln - tn4) * kn;
    V::store(crow + j, V::select(excl, zero, c));
    for (uint32_t b = V::bits(excl); b; b &= b - 1) {
      const int k = __builtin_ctz(b);
      const float vc = v[k];
      if (j + k == self_col || !(vc < prm.pos_thr)) continue;
      float logit, kp;
      prm.pos(vc, logit, kp);
      crow[j + k] = wp * std::exp(logit - tp) * kp;
    }
  }
  // the last columns: the scalar definition
  pair_lse_coef_row_scalar(crow + j, w - j, self_col - j, z + j, yi, prm, tp, tn, wp, wn);
}

// The two row functions above for one Form, compiled at each vector width and chosen at run time
// (XBM_CPU_DISPATCH): pair_lse_row_vec(..., const Form&, ...) and pair_lse_coef_row_vec(...,
// const Form&, ...), found by pair_lse_tile / pair_lse_bwd through the Form's namespace.
// Expanded once per Form, after its definition and in its namespace.
#define XBM_PAIR_LSE_VECTOR(Form)                                                                                  \
  using ::xbm_kernels::cpu::pair_lse_row_vec_lanes;                                                              \
  using ::xbm_kernels::cpu::pair_lse_coef_row_vec_lanes;                                                         \
  XBM_CPU_DISPATCH(int64_t, pair_lse_row_vec,                                                                    \
                   (const float* row, float* crow, int64_t w, int64_t self_col, const int32_t* z, int32_t yi,    \
                    const Form& prm, int32_t* pidx, int32_t base, float* pcoef, float& mx_p, float& mx_n,        \
                    double& sum_p, double& sum_n, int64_t* counts, float& scale_p, float& scale_n),              \
                   (row, crow, w, self_col, z, yi, prm, pidx, base, pcoef, mx_p, mx_n, sum_p, sum_n, counts,     \
                    scale_p, scale_n))                                                                           \
  XBM_CPU_DISPATCH(void, pair_lse_coef_row_vec,                                                                  \
                   (float* crow, int64_t w, int64_t self_col, const int32_t* z, int32_t yi, const Form& prm,     \
                    float tp, float tn, float wp, float wn),                                                     \
                   (crow, w, self_col, z, yi, prm, tp, tn, wp, wn))
#else
#define XBM_PAIR_LSE_VECTOR(Form)
#endif

// One tile of the pass over the score tile s (read only): updates the running state of every
// row and each row's rescale factors (scale_p / scale_n); lists the tile's positive pairs in
// pidx (flat i * w + j, row-major order) and returns their number; with coef != nullptr writes
// the negatives' coefficients exp(logit - max_new) k into `coef` (0 elsewhere) and the listed
// positives' into pcoef.
template <class Form>
int64_t pair_lse_tile(const float* s, float* coef, int64_t w, int64_t c0, const LossInputs& in, const Form& prm,
                      int32_t* pidx, float* pcoef, float* mx_p, float* mx_n, double* sum_p, double* sum_n,
                      int64_t* counts, float* scale_p, float* scale_n) {
  const int32_t* y = in.y_ptr();
  const int32_t* z = in.z_ptr() + c0;
  int64_t tile_pos = 0;
  for (int64_t i = 0; i < in.B; ++i) {
    const float* row = s + i * w;
    float* crow = coef ? coef + i * w : nullptr;
    int64_t self_col = in.self_col(i) - c0;
    if (self_col < 0 || self_col >= w) self_col = -1;
    const int32_t base = static_cast<int32_t>(i * w);
    float* pc = pcoef ? pcoef + tile_pos : nullptr;
#if XBM_CPU_VECTOR
    tile_pos += pair_lse_row_vec(row, crow, w, self_col, z, y[i], prm, pidx + tile_pos, base, pc, mx_p[i], mx_n[i],
                                 sum_p[i], sum_n[i], counts + 2 * i, scale_p[i], scale_n[i]);
#else
    tile_pos += pair_lse_row_scalar(row, crow, w, self_col, z, y[i], prm, pidx + tile_pos, base, pc, mx_p[i], mx_n[i],
                                    sum_p[i], sum_n[i], counts + 2 * i, scale_p[i], scale_n[i]);
#endif
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
  // Per split views and pointers made once, not per tile (an ATen select costs microseconds).
  std::vector<at::Tensor> g_split[2];
  for (int set = 0; set < 2; ++set) {
    g_split[set].resize(plan.splits);
    if (accumulate)
      for (int64_t p = 0; p < plan.splits; ++p) g_split[set][p] = st.g[set][p];
  }
  float* mx_all[2] = {st.mx[0].data_ptr<float>(), st.mx[1].data_ptr<float>()};
  double* sum_all[2] = {st.sum[0].data_ptr<double>(), st.sum[1].data_ptr<double>()};
  int64_t* counts_all = st.counts.data_ptr<int64_t>();
  float* scales_all = scales.data_ptr<float>();
  std::vector<std::vector<float>> pos_coef(plan.splits);  // the listed positives' coefficients
  ScratchPool scratch(in, plan);
  for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    TileScratch& sc = scratch[p];
    at::Tensor s = sc.similarity(in, c0, w);
    at::Tensor c_neg = sc.aux_tile(B, w);
    int32_t* pidx = sc.list_buffer(B, w);
    std::vector<float>& pc = pos_coef[p];
    if (accumulate && static_cast<int64_t>(pc.size()) < B * w) pc.resize(B * w);
    float* sc_p = scales_all + p * 2 * B;
    float* sc_n = sc_p + B;
    const int64_t npos = pair_lse_tile(s.data_ptr<float>(), accumulate ? c_neg.data_ptr<float>() : nullptr, w, c0,
                                       in, prm, pidx, accumulate ? pc.data() : nullptr, mx_all[0] + p * B,
                                       mx_all[1] + p * B, sum_all[0] + p * B, sum_all[1] + p * B,
                                       counts_all + p * 2 * B, sc_p, sc_n);
    if (accumulate) {
      // G scaled by each row's rescale factor where it is not 1 (the row's max grew in this
      // tile: most rows of most tiles after the first few do not)
      auto rescale = [&](int set, const float* f) {
        float* g = g_split[set][p].data_ptr<float>();
        for (int64_t i = 0; i < B; ++i) {
          if (f[i] == 1.f) continue;
          float* gi = g + i * D;
          for (int64_t d = 0; d < D; ++d) gi[d] *= f[i];
        }
      };
      rescale(1, sc_n);
      rescale(0, sc_p);
      sc.add_product(in, c_neg, c0, w, g_split[1][p]);
      // after the negatives' GEMM: the dense fallback reuses the aux tile
      add_listed_rows(sc, in, c0, w, pidx, pc.data(), npos, g_split[0][p]);
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
      int64_t self_col = in.self_col(i) - c0;
      if (self_col < 0 || self_col >= w) self_col = -1;
#if XBM_CPU_VECTOR
      pair_lse_coef_row_vec(crow, w, self_col, z, y[i], prm, tp[i], tn[i], wp_p[i], wn_p[i]);
#else
      pair_lse_coef_row_scalar(crow, w, self_col, z, y[i], prm, tp[i], tn[i], wp_p[i], wn_p[i]);
#endif
    }
  });
}

}  // namespace cpu
}  // namespace xbm_kernels
