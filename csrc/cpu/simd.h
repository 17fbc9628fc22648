// Four-lane float/int32 vectors for the loss epilogues, written with the GCC/Clang vector
// extension so they compile to SSE2 on x86-64 and NEON on aarch64 with no -m flags (the
// wheel stays portable). GCC does not if-convert the epilogues' label and threshold
// selects into vector code on its own, even under `omp simd`, so the loops stay scalar and
// branchy without this (about 2 ns per score against 0.3 ns with it, measured on the
// development machine). Other compilers take the scalar loops that follow each vector
// loop, which are the definition of what the vector code computes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define XBM_CPU_VECTOR 1

namespace xbm_kernels {
namespace cpu {

typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

inline f32x4 load4(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline i32x4 load4(const int32_t* p) {
  i32x4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store4(float* p, f32x4 v) { std::memcpy(p, &v, sizeof(v)); }
// 1.0f where the comparison mask is set (all ones), 0.0f elsewhere.
inline f32x4 mask_to_one(i32x4 m) {
  const f32x4 one = {1.f, 1.f, 1.f, 1.f};
  return reinterpret_cast<f32x4>(m & reinterpret_cast<i32x4>(one));
}
inline float sum4(f32x4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }
inline float min4(f32x4 v) { return std::min(std::min(v[0], v[1]), std::min(v[2], v[3])); }
inline float max4(f32x4 v) { return std::max(std::max(v[0], v[1]), std::max(v[2], v[3])); }
inline f32x4 select4(i32x4 m, f32x4 a, f32x4 b) {
  return reinterpret_cast<f32x4>((m & reinterpret_cast<i32x4>(a)) | (~m & reinterpret_cast<i32x4>(b)));
}

// exp(x) for four floats: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by the Cephes expf
// polynomial, 2^n built in the exponent bits. Relative error within 2 ulp of std::exp
// over [-87.3, 88.3] (tests/test_losses.py checks the losses that use it against a
// float64 oracle); 0 below -87.3 (where expf reaches the subnormals), NaN stays NaN.
inline f32x4 exp4(f32x4 x) {
  const i32x4 under = x < -87.3365447f;
  const i32x4 nan = x != x;
  x = select4(x > 88.3762626f, f32x4{88.3762626f, 88.3762626f, 88.3762626f, 88.3762626f}, x);
  x = select4(under, f32x4{0.f, 0.f, 0.f, 0.f}, x);
  const f32x4 fx = x * 1.44269504088896341f + 0.5f;
  i32x4 n = __builtin_convertvector(fx, i32x4);  // truncates: make it floor
  n += __builtin_convertvector(n, f32x4) > fx;  // -1 where the truncation rounded up
  const f32x4 nf = __builtin_convertvector(n, f32x4);
  const f32x4 r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  f32x4 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const f32x4 y = p * (r * r) + r + 1.f;
  const f32x4 pow2n = reinterpret_cast<f32x4>((n + 127) << 23);
  f32x4 out = y * pow2n;
  out = select4(under, f32x4{0.f, 0.f, 0.f, 0.f}, out);
  return select4(nan, x + x, out);  // x is still NaN there
}

}  // namespace cpu
}  // namespace xbm_kernels
#else
#define XBM_CPU_VECTOR 0
#endif

namespace xbm_kernels {
namespace cpu {

// <a, b> in fp32, four lanes then the tail, in a fixed order (the same on every call, so
// two passes that compute one pair's S this way agree on it bit for bit).
inline float dot(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  float out = 0.f;
#if XBM_CPU_VECTOR
  f32x4 acc = {0.f, 0.f, 0.f, 0.f};
  for (; d + 4 <= D; d += 4) acc += load4(a + d) * load4(b + d);
  out = sum4(acc);
#endif
  for (; d < D; ++d) out += a[d] * b[d];
  return out;
}

}  // namespace cpu
}  // namespace xbm_kernels
