// The pair terms of contrastive_l2 on the L2 distance of unit rows (CONTRACT.md section 1):
//   d_ij = sqrt(max(2 - 2 S_ij, 0))   (0 where 2 - 2S <= 2^-16)
//   positive: max(0, d_ij - pos_margin), dl/dS = -1/d_ij where active
//   negative: max(0, neg_margin - d_ij), dl/dS = +1/d_ij where active
// and their tile epilogue, shared by contrastive_l2 (both terms) and margin (the negatives'
// pass; its positives, found first, take l2_pair one at a time), at the CPU's widest vector.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/simd.h"

namespace xbm_kernels {
namespace cpu {

// 2 - 2 S at or below 2^-16 counts as d = 0 (CONTRACT.md section 1, contrastive_l2): a unit
// row's similarity with its own copy comes out of fp32 accumulation within a few ulp of 1, on
// either side, so without a floor a copy gets d ~ 3e-4 and a gradient of 1/d ~ 3000 on one
// backend and 0 on another. Every backend, the reference and the oracle use this floor.
constexpr float kL2Zero = 1.52587890625e-05f;

struct PairRule {
  float pos_margin, neg_margin, pos_thr;  // pos_thr = 1 - pos_eps
  float neg_t;                            // no_negative_above(neg_margin)
};

// One pair (the definition the vector loop below follows): returns its loss term, writes
// its coefficient dl/dS and whether it is an active positive / negative (0 or 1).
inline float l2_pair(float v, bool same, const PairRule& q, float& c, float& p, float& n) {
  float t = 2.f - 2.f * v;
  t = t <= kL2Zero ? 0.f : t;
  const float d = std::sqrt(t);
  p = (same && v < q.pos_thr && d > q.pos_margin) ? 1.f : 0.f;
  n = (!same && d < q.neg_margin) ? 1.f : 0.f;
  const float inv = d > 0.f ? 1.f / d : 0.f;
  c = (n - p) * inv;
  return p * (d - q.pos_margin) + n * (q.neg_margin - d);
}

#if XBM_CPU_VECTOR
// Whether any lane of a comparison mask is set: one test instruction at 8 and 16 lanes (an asm,
// as Vec's members: those widths are compiled only for AVX2 / AVX-512, and an intrinsic would
// not inline into this template), a movemask at 4 with SSE2; Vec::sum elsewhere.
template <int L>
XBM_INLINE bool any_lane(typename Vec<L>::I m) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (L == 16) {
    bool r;
    uint16_t k;
    asm("vptestmd %2, %2, %0\n\tkortestw %0, %0" : "=&k"(k), "=@ccnz"(r) : "v"(m));
    return r;
  }
  if constexpr (L == 8) {
    bool r;
    asm("vptest %1, %1" : "=@ccnz"(r) : "x"(m));
    return r;
  }
#endif
#if defined(__SSE2__)
  if constexpr (L == 4) return _mm_movemask_epi8(reinterpret_cast<__m128i>(m)) != 0;
#endif
  return Vec<L>::sum(Vec<L>::one_where(m)) != 0.f;
}
#endif

// Overwrites s (B x w, row-major) with c_ij, times row_scale[i] where row_scale is given (the
// backward's dL/dl_i: ((n - p) (1 / d)) g_i, the product the separate scaling of C computed); adds
// per-row loss and active-pair counts. Columns are c0 .. c0 + w - 1 of the reference; all of
// them are < ref_valid. Returns the number of nonzero-coefficient candidates of the tile (the
// active pairs), for the choice between a GEMM and row adds in the gradient.
// L lanes at a time (simd.h, the CPU's widest): l2_pair's arithmetic lane by lane. A block of
// L columns where no lane can be active (no same-label column below pos_thr, every
// t >= neg_t, no NaN) gets c = 0 (times g) and adds nothing, without the square root and the
// division: the values the full computation gives there.
template <int L>
XBM_INLINE int64_t contrastive_l2_epilogue_lanes(float* s, int64_t B, int64_t w, int64_t c0, const int32_t* y,
                                                 const int32_t* z, const int64_t* self_idx, const PairRule& q,
                                                 const float* row_scale, double* loss, int64_t* counts) {
  int64_t active = 0;
  [[maybe_unused]] int64_t tested = 0, skipped = 0;  // blocks tested for a skip, and skipped
  for (int64_t i = 0; i < B; ++i) {
    float* row = s + i * w;
    const int32_t yi = y[i];
    const int64_t self_col = self_idx ? self_idx[i] - c0 : -1;
    const bool has_self = self_col >= 0 && self_col < w;
    const float self_s = has_self ? row[self_col] : 0.f;
    const float g = row_scale ? row_scale[i] : 1.f;
    float acc = 0.f, npos = 0.f, nneg = 0.f;  // counts in float: exact, w <= 2^24
    int64_t j = 0;
#if XBM_CPU_VECTOR
    using V = Vec<L>;
    using F = typename V::F;
    using I = typename V::I;
    const F zero = V::splat(0.f), one = V::splat(1.f), scaled_zero = V::splat(row_scale ? 0.f * g : 0.f);
    F accv = zero, posv = zero, negv = zero;
    // The test pays where blocks are skipped often; where most are not (an unpredictable branch
    // that saves little) it is left off, tried again every 16th row.
    const bool try_skip = i % 16 == 0 || 2 * skipped > tested;
    for (; j + L <= w; j += L) {
      const F v = V::load(row + j);
      const I same = V::eq(V::load(z + j), yi);
      F t = 2.f - 2.f * v;
      t = V::select(V::keep(t <= kL2Zero), zero, t);
      const I pos_cand = same & V::lt(v, q.pos_thr);
      if (try_skip) {
        ++tested;
        if (!any_lane<L>(pos_cand | ~V::keep(t >= q.neg_t))) {
          ++skipped;
          V::store(row + j, scaled_zero);
          continue;
        }
      }
      const F d = V::sqrt(t);
      const F inv = V::select(V::gt(d, 0.f), one / d, zero);  // 1/0 lanes are dropped
      const F p = V::one_where(pos_cand & V::gt(d, q.pos_margin));
      const F n = V::one_where(~same & V::lt(d, q.neg_margin));
      accv += p * (d - q.pos_margin) + n * (q.neg_margin - d);
      posv += p;
      negv += n;
      const F c = (n - p) * inv;
      V::store(row + j, row_scale ? c * g : c);
    }
    acc = V::sum(accv);
    npos = V::sum(posv);
    nneg = V::sum(negv);
#endif
    for (; j < w; ++j) {
      float c, p, n;
      acc += l2_pair(row[j], z[j] == yi, q, c, p, n);
      npos += p;
      nneg += n;
      row[j] = row_scale ? c * g : c;
    }
    if (has_self) {  // take the anchor's own column back out
      float c, p, n;
      acc -= l2_pair(self_s, z[self_col] == yi, q, c, p, n);
      npos -= p;
      nneg -= n;
      row[self_col] = row_scale ? 0.f * g : 0.f;
    }
    loss[i] += acc;
    counts[2 * i] += static_cast<int64_t>(npos);
    counts[2 * i + 1] += static_cast<int64_t>(nneg);
    active += static_cast<int64_t>(npos) + static_cast<int64_t>(nneg);
  }
  return active;
}
XBM_CPU_DISPATCH(inline int64_t, contrastive_l2_epilogue,
                 (float* s, int64_t B, int64_t w, int64_t c0, const int32_t* y, const int32_t* z,
                  const int64_t* self_idx, const PairRule& q, const float* row_scale, double* loss, int64_t* counts),
                 (s, B, w, c0, y, z, self_idx, q, row_scale, loss, counts))

// The smallest float t >= nm^2 (exact: nm^2 in double): sqrt(t) >= nm there, so d < nm is false
// for every t >= neg_t (IEEE square root and rounding are monotone). 0 where nm <= 0 or NaN (no
// d is below it).
inline float no_negative_above(float nm) {
  if (!(nm > 0.f)) return 0.f;
  const double sq = static_cast<double>(nm) * static_cast<double>(nm);
  float t = static_cast<float>(sq);
  if (static_cast<double>(t) < sq) t = std::nextafter(t, std::numeric_limits<float>::infinity());
  return t;
}

inline PairRule make_rule(double pos_margin, double neg_margin, double pos_eps) {
  const float nm = static_cast<float>(neg_margin);
  return {static_cast<float>(pos_margin), nm, static_cast<float>(1.0 - pos_eps), no_negative_above(nm)};
}

}  // namespace cpu
}  // namespace xbm_kernels
