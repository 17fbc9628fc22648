// Float/int32 vectors for the loss epilogues, written with the GCC/Clang vector extension so
// they compile to SSE2 on x86-64 and NEON on aarch64 with no -m flags (the wheel stays
// portable). GCC does not if-convert the epilogues' label and threshold selects into vector
// code on its own, even under `omp simd`, so the loops stay scalar and branchy without this
// (about 2 ns per score against 0.3 ns with it, measured on the development machine). Other
// compilers take the scalar loops that follow each vector loop, which are the definition of
// what the vector code computes.
//
// Wider vectors, chosen at run time: Vec<L> is the same code at L = 4, 8 or 16 lanes. An
// epilogue written as a template on L (always_inline, like every Vec member) and instantiated
// by XBM_CPU_DISPATCH inside functions compiled for AVX2+FMA (8 lanes) and AVX-512 (16) runs
// the widest one the CPU has (simd_lanes()); the rest of the library, and CPUs without them,
// keep the 4-lane build. The exponential is the same polynomial at every width (fused
// multiply-adds at 8 and 16 lanes: at most the same error, see Vec::exp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__SSE2__)
#include <emmintrin.h>
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
#include <arm_neon.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define XBM_CPU_VECTOR 1
#define XBM_INLINE inline __attribute__((always_inline))
// Vec<8> / Vec<16> values live only inside always_inline code compiled for AVX2 / AVX-512:
// the ABI note GCC gives for a 32- or 64-byte vector in a function signature does not apply.
// (Left off for the files that include this header: GCC reports it where the template is
// instantiated.)
#pragma GCC diagnostic ignored "-Wpsabi"

namespace xbm_kernels {
namespace cpu {

template <int L>
struct Lanes {  // (GCC 12 drops a dependent vector_size on a typedef inside Vec itself)
  typedef float F __attribute__((vector_size(4 * L)));
  typedef int32_t I __attribute__((vector_size(4 * L)));
  typedef uint32_t U __attribute__((vector_size(4 * L)));
};

template <int L>
struct Vec {
  typedef typename Lanes<L>::F F;
  typedef typename Lanes<L>::I I;
  typedef typename Lanes<L>::U U;
  static constexpr int lanes = L;

  static XBM_INLINE F load(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static XBM_INLINE I load(const int32_t* p) {
    I v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static XBM_INLINE void store(float* p, F v) { std::memcpy(p, &v, sizeof(v)); }
  // Comparisons: all ones in the lanes where true. Inside a target("avx512f") function GCC 12
  // compiles the `&` of two vector-extension comparisons lane by lane in scalar code (about 10x
  // slower than the 4-lane build); an empty asm on each result keeps it a plain vector there.
  static XBM_INLINE I keep(I m) {
#if defined(__x86_64__) || defined(__i386__)
    if (L >= 8) asm("" : "+v"(m));
#endif
    return m;
  }
  template <class A, class B>
  static XBM_INLINE I lt(A a, B b) { return keep(a < b); }
  template <class A, class B>
  static XBM_INLINE I gt(A a, B b) { return keep(a > b); }
  template <class A, class B>
  static XBM_INLINE I eq(A a, B b) { return keep(a == b); }
  template <class A, class B>
  static XBM_INLINE I ne(A a, B b) { return keep(a != b); }
  static XBM_INLINE F splat(float a) { return F{} + a; }
  // 1.0f where the comparison mask is set (all ones), 0.0f elsewhere.
  static XBM_INLINE F one_where(I m) { return reinterpret_cast<F>(m & reinterpret_cast<I>(splat(1.f))); }
  static XBM_INLINE F select(I m, F a, F b) {
    return reinterpret_cast<F>((m & reinterpret_cast<I>(a)) | (~m & reinterpret_cast<I>(b)));
  }
  // Reductions in a fixed order: halves added lane by lane down to 4, then (0 + 1) + (2 + 3).
  static XBM_INLINE float sum(F v) {
    float t[L];
    std::memcpy(t, &v, sizeof(v));
    for (int h = L / 2; h >= 4; h /= 2)
      for (int k = 0; k < h; ++k) t[k] += t[k + h];
    return (t[0] + t[1]) + (t[2] + t[3]);
  }
  static XBM_INLINE float min(F v) {
    float m = v[0];
    for (int k = 1; k < L; ++k) m = std::min(m, v[k]);
    return m;
  }
  static XBM_INLINE float max(F v) {
    float m = v[0];
    for (int k = 1; k < L; ++k) m = std::max(m, v[k]);
    return m;
  }

  // IEEE square root lane by lane (the same result as std::sqrt per lane): one vsqrtps at 8
  // and 16 lanes (those widths are only compiled for AVX2 / AVX-512, where the instruction
  // exists; an asm because GCC's vector extension has no square root), the SSE2/NEON one at 4.
  static XBM_INLINE F sqrt(F t) {
#if defined(__x86_64__) || defined(__i386__)
    if constexpr (L >= 8) {
      F r;
      asm("vsqrtps %1, %0" : "=v"(r) : "v"(t));
      return r;
    }
#endif
#if defined(__SSE2__)
    if constexpr (L == 4) return reinterpret_cast<F>(_mm_sqrt_ps(reinterpret_cast<__m128>(t)));
#elif defined(__aarch64__)
    if constexpr (L == 4) return reinterpret_cast<F>(vsqrtq_f32(reinterpret_cast<float32x4_t>(t)));
#endif
    F r;
    for (int k = 0; k < L; ++k) r[k] = std::sqrt(t[k]);
    return r;
  }

  // The lanes where m is set (all ones), as bits: lane k is bit k.
  static XBM_INLINE uint32_t bits(I m) {
#if defined(__x86_64__) || defined(__i386__)
    if constexpr (L == 16) {
      uint16_t k;
      asm("vpmovd2m %1, %0" : "=k"(k) : "v"(m));  // AVX-512DQ, part of the 16-lane build's target
      return k;
    }
    if constexpr (L == 8) {
      int r;
      asm("vmovmskps %1, %0" : "=r"(r) : "x"(m));
      return static_cast<uint32_t>(r);
    }
#endif
#if defined(__SSE2__)
    if constexpr (L == 4) return static_cast<uint32_t>(_mm_movemask_ps(reinterpret_cast<__m128>(m)));
#endif
    uint32_t r = 0;
    for (int k = 0; k < L; ++k) r |= (m[k] != 0 ? 1u : 0u) << k;
    return r;
  }
  // a * b + c: one fused multiply-add (one rounding) at 8 and 16 lanes, which are only compiled
  // for AVX2+FMA / AVX-512 (an asm: -ffp-contract=off keeps the compiler from fusing anything
  // else); a multiply and an add at 4 lanes (SSE2 has no FMA).
  static XBM_INLINE F fmadd(F a, F b, F c) {
#if defined(__x86_64__) || defined(__i386__)
    if constexpr (L >= 8) {
      asm("vfmadd213ps %2, %1, %0" : "+v"(a) : "v"(b), "v"(c));  // a = b * a + c
      return a;
    }
#endif
    return a * b + c;
  }
  // min(c, x) lane by lane with NaN kept: x where x is NaN (MINPS returns its second operand then).
  static XBM_INLINE F min_keep_nan(float c, F x) {
    const F cv = splat(c);
#if defined(__x86_64__) || defined(__i386__)
    if constexpr (L >= 8) {
      F r;
      asm("vminps %2, %1, %0" : "=v"(r) : "v"(cv), "v"(x));
      return r;
    }
#endif
#if defined(__SSE2__)
    if constexpr (L == 4) return reinterpret_cast<F>(_mm_min_ps(reinterpret_cast<__m128>(cv), reinterpret_cast<__m128>(x)));
#endif
    return select(lt(cv, x), cv, x);
  }
  // t rounded to the nearest integer, ties to even (the default rounding mode), lane by lane;
  // for NaN or out of range a value the caller discards.
  static XBM_INLINE I round_int(F t) {
#if defined(__x86_64__) || defined(__i386__)
    if constexpr (L >= 8) {
      I n;
      asm("vcvtps2dq %1, %0" : "=v"(n) : "v"(t));
      return n;
    }
#endif
#if defined(__SSE2__)
    if constexpr (L == 4) return reinterpret_cast<I>(_mm_cvtps_epi32(reinterpret_cast<__m128>(t)));
#elif defined(__aarch64__)
    if constexpr (L == 4) return reinterpret_cast<I>(vcvtnq_s32_f32(reinterpret_cast<float32x4_t>(t)));
#endif
    I n;
    for (int k = 0; k < L; ++k)
      n[k] = static_cast<int32_t>(std::nearbyint(t[k] > -256.f ? std::min(t[k], 256.f) : -256.f));
    return n;
  }

  // exp(x) lane by lane: x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2, exp(r) by the
  // Cephes expf polynomial, 2^n built in the exponent bits. Relative error within 2 ulp of
  // std::exp over [-87.3, 88.3] (tests/test_values.py checks the losses that use it against a
  // float64 oracle); 0 below -87.3 (where expf reaches the subnormals), NaN stays NaN (it goes
  // through every step: NaN times anything is NaN), exp(0) exactly 1. At 8 and 16 lanes the
  // reduction and the polynomial are fused multiply-adds (fewer roundings; the 4-lane build
  // agrees within an ulp): about 19 vector instructions.
  static XBM_INLINE F exp(F x) {
    const I under = lt(x, -87.3365447f);
    x = min_keep_nan(88.3762626f, x);
    const I n = round_int(x * 1.44269504088896341f);
    const F nf = __builtin_convertvector(n, F);
    F r = fmadd(nf, splat(-0.693359375f), x);
    r = fmadd(nf, splat(2.12194440e-4f), r);
    F p = fmadd(splat(1.9875691500e-4f), r, splat(1.3981999507e-3f));
    p = fmadd(p, r, splat(8.3334519073e-3f));
    p = fmadd(p, r, splat(4.1665795894e-2f));
    p = fmadd(p, r, splat(1.6666665459e-1f));
    p = fmadd(p, r, splat(5.0000001201e-1f));
    const F y = fmadd(p, r * r, r) + 1.f;
    const F pow2n = reinterpret_cast<F>(reinterpret_cast<U>(n + 127) << 23);
    return select(under, splat(0.f), y * pow2n);
  }
};

// The four-lane names dot() uses.
typedef Vec<4>::F f32x4;
inline f32x4 load4(const float* p) { return Vec<4>::load(p); }
inline float sum4(f32x4 v) { return Vec<4>::sum(v); }

// The widest vector this CPU runs and the OS saves: 16 lanes with AVX-512 (F, DQ, BW, VL), 8
// with AVX2 and FMA, else 4. XBM_CPU_LANES=4 or 8 caps it (tests compare the widths).
inline int detect_lanes() {
  int lanes = 4;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) lanes = 8;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    lanes = 16;
#endif
  const char* cap = std::getenv("XBM_CPU_LANES");
  if (cap != nullptr) lanes = std::min(lanes, std::max(4, std::atoi(cap)));
  return lanes >= 16 ? 16 : (lanes >= 8 ? 8 : 4);
}
inline int simd_lanes() {
  static const int lanes = detect_lanes();
  return lanes;
}

}  // namespace cpu
}  // namespace xbm_kernels

#else
#define XBM_CPU_VECTOR 0
#define XBM_INLINE inline
namespace xbm_kernels {
namespace cpu {
inline int simd_lanes() { return 4; }
}  // namespace cpu
}  // namespace xbm_kernels
#endif

// XBM_CPU_DISPATCH(ret, name, (params), (args)) defines `ret name(params)`, which calls the
// template `name##_lanes<L>(args)` at L = simd_lanes(): each width compiled for its ISA (the
// template and everything it calls being always_inline, the body is compiled in the caller).
#if XBM_CPU_VECTOR && (defined(__x86_64__) || defined(__i386__))
#define XBM_CPU_DISPATCH(ret, name, params, args)                                               \
  __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"))) ret name##_x16 params {         \
    return name##_lanes<16> args;                                                               \
  }                                                                                             \
  __attribute__((target("avx2,fma"))) ret name##_x8 params { return name##_lanes<8> args; }    \
  ret name params {                                                                             \
    switch (::xbm_kernels::cpu::simd_lanes()) {                                                 \
      case 16:                                                                                  \
        return name##_x16 args;                                                                 \
      case 8:                                                                                   \
        return name##_x8 args;                                                                  \
      default:                                                                                  \
        return name##_lanes<4> args;                                                            \
    }                                                                                           \
  }
#else
#define XBM_CPU_DISPATCH(ret, name, params, args) \
  ret name params { return name##_lanes<4> args; }
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

// dot(a, b[r], D) for four rows r at once, each bit for bit that value (the same arithmetic in the
// same order, four independent chains of additions instead of one).
inline void dot4(const float* a, const float* const* b, int64_t D, float* out) {
  int64_t d = 0;
  for (int r = 0; r < 4; ++r) out[r] = 0.f;
#if XBM_CPU_VECTOR
  f32x4 acc[4] = {};
  for (; d + 4 <= D; d += 4) {
    const f32x4 av = load4(a + d);
    for (int r = 0; r < 4; ++r) acc[r] += av * load4(b[r] + d);
  }
  for (int r = 0; r < 4; ++r) out[r] = sum4(acc[r]);
#endif
  for (int r = 0; r < 4; ++r)
    for (int64_t e = d; e < D; ++e) out[r] += a[e] * b[r][e];
}

// The same with b's elements of another type (bf16, fp16) widened exactly to fp32: the same
// value as dot(a, fp32 copy of b) bit for bit.
template <class T>
inline float dot(const float* a, const T* b, int64_t D) {
  int64_t d = 0;
  float out = 0.f;
#if XBM_CPU_VECTOR
  f32x4 acc = {0.f, 0.f, 0.f, 0.f};
  for (; d + 4 <= D; d += 4) {
    const f32x4 bv = {static_cast<float>(b[d]), static_cast<float>(b[d + 1]), static_cast<float>(b[d + 2]),
                      static_cast<float>(b[d + 3])};
    acc += load4(a + d) * bv;
  }
  out = sum4(acc);
#endif
  for (; d < D; ++d) out += a[d] * static_cast<float>(b[d]);
  return out;
}

}  // namespace cpu
}  // namespace xbm_kernels
