// The pair terms of contrastive_l2 on the L2 distance of unit rows (CONTRACT.md section 1):
//   d_ij = sqrt(max(2 - 2 S_ij, 0))   (0 where 2 - 2S <= 2^-16)
//   positive: max(0, d_ij - pos_margin), dl/dS = -1/d_ij where active
//   negative: max(0, neg_margin - d_ij), dl/dS = +1/d_ij where active
// and their tile epilogue, shared by contrastive_l2 (both terms) and margin (the negatives'
// pass; its positives, found first, take l2_pair one at a time).
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/simd.h"

#if XBM_CPU_VECTOR && defined(__SSE2__)
#include <emmintrin.h>
#elif XBM_CPU_VECTOR && defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace xbm_kernels {
namespace cpu {

// 2 - 2 S at or below 2^-16 counts as d = 0 (CONTRACT.md section 1, contrastive_l2): a unit
// row's similarity with its own copy comes out of fp32 accumulation within a few ulp of 1, on
// either side, so without a floor a copy gets d ~ 3e-4 and a gradient of 1/d ~ 3000 on one
// backend and 0 on another. Every backend, the reference and the oracle use this floor.
constexpr float kL2Zero = 1.52587890625e-05f;

struct PairRule {
  float pos_margin, neg_margin, pos_thr;  // pos_thr = 1 - pos_eps
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
// IEEE square root of four floats (the same result as std::sqrt per lane).
inline cpu::f32x4 sqrt4(cpu::f32x4 t) {
#if defined(__SSE2__)
  return reinterpret_cast<cpu::f32x4>(_mm_sqrt_ps(reinterpret_cast<__m128>(t)));
#elif defined(__aarch64__)
  return reinterpret_cast<cpu::f32x4>(vsqrtq_f32(reinterpret_cast<float32x4_t>(t)));
#else
  return cpu::f32x4{std::sqrt(t[0]), std::sqrt(t[1]), std::sqrt(t[2]), std::sqrt(t[3])};
#endif
}
#endif

// Overwrites s (B x w, row-major) with c_ij; adds per-row loss and active-pair counts.
// Columns are c0 .. c0 + w - 1 of the reference; all of them are < ref_valid. Returns the
// number of nonzero-coefficient candidates of the tile (the active pairs), for the choice
// between a GEMM and row adds in the gradient.
inline int64_t contrastive_l2_epilogue(float* s, int64_t B, int64_t w, int64_t c0, const int32_t* y, const int32_t* z,
                                const int64_t* self_idx, const PairRule& q, double* loss, int64_t* counts) {
  int64_t active = 0;
  for (int64_t i = 0; i < B; ++i) {
    float* row = s + i * w;
    const int32_t yi = y[i];
    const int64_t self_col = self_idx ? self_idx[i] - c0 : -1;
    const bool has_self = self_col >= 0 && self_col < w;
    const float self_s = has_self ? row[self_col] : 0.f;
    float acc = 0.f, npos = 0.f, nneg = 0.f;  // counts in float: exact, w <= 2^24
    int64_t j = 0;
#if XBM_CPU_VECTOR
    const cpu::f32x4 zero = {0.f, 0.f, 0.f, 0.f}, one = {1.f, 1.f, 1.f, 1.f};
    cpu::f32x4 acc4 = zero, pos4 = zero, neg4 = zero;
    for (; j + 4 <= w; j += 4) {
      const cpu::f32x4 v = cpu::load4(row + j);
      const cpu::i32x4 same = cpu::load4(z + j) == yi;
      cpu::f32x4 t = 2.f - 2.f * v;
      t = cpu::select4(t <= kL2Zero, zero, t);
      const cpu::f32x4 d = sqrt4(t);
      const cpu::f32x4 inv = cpu::select4(d > 0.f, one / d, zero);  // 1/0 lanes are dropped
      const cpu::f32x4 p = cpu::mask_to_one(same & (v < q.pos_thr) & (d > q.pos_margin));
      const cpu::f32x4 n = cpu::mask_to_one(~same & (d < q.neg_margin));
      acc4 += p * (d - q.pos_margin) + n * (q.neg_margin - d);
      pos4 += p;
      neg4 += n;
      cpu::store4(row + j, (n - p) * inv);
    }
    acc = cpu::sum4(acc4);
    npos = cpu::sum4(pos4);
    nneg = cpu::sum4(neg4);
#endif
    for (; j < w; ++j) {
      float c, p, n;
      acc += l2_pair(row[j], z[j] == yi, q, c, p, n);
      npos += p;
      nneg += n;
      row[j] = c;
    }
    if (has_self) {  // take the anchor's own column back out
      float c, p, n;
      acc -= l2_pair(self_s, z[self_col] == yi, q, c, p, n);
      npos -= p;
      nneg -= n;
      row[self_col] = 0.f;
    }
    loss[i] += acc;
    counts[2 * i] += static_cast<int64_t>(npos);
    counts[2 * i + 1] += static_cast<int64_t>(nneg);
    active += static_cast<int64_t>(npos) + static_cast<int64_t>(nneg);
  }
  return active;
}

inline PairRule make_rule(double pos_margin, double neg_margin, double pos_eps) {
  return {static_cast<float>(pos_margin), static_cast<float>(neg_margin), static_cast<float>(1.0 - pos_eps)};
}

}  // namespace cpu
}  // namespace xbm_kernels
