// Four-lane float/int32 vectors for the loss epilogues, written with the GCC/Clang vector
// extension so they compile to SSE2 on x86-64 and NEON on aarch64 with no -m flags (the
// wheel stays portable). GCC does not if-convert the epilogues' label and threshold
// selects into vector code on its own, even under `omp simd`, so the loops stay scalar and
// branchy without this (about 2 ns per score against 0.3 ns with it, measured on the
// development machine). Other compilers take the scalar loops that follow each vector
// loop, which are the definition of what the vector code computes.
#pragma once

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

}  // namespace cpu
}  // namespace xbm_kernels
#else
#define XBM_CPU_VECTOR 0
#endif
