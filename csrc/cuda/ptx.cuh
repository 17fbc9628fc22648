// Thin wrappers over the sm_80 PTX the fused loss kernels use: cp.async (global -> shared,
// zero-filling what lies out of range), ldmatrix, mma.sync (bf16 / fp16 m16n8k16, tf32
// m16n8k8) and the tf32 rounding. Fragment layouts are the PTX ISA's, with
// g = lane / 4 and t = lane % 4:
//   accumulator (16 x 8, f32):  c0, c1 at (g, 2t), (g, 2t + 1); c2, c3 at (g + 8, 2t), (g + 8, 2t + 1)
//   m16n8k16 A (16 x 16):       4 regs of 2 halves: (g, 2t..), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..)
//   m16n8k16 B (16 x 8, k-major): 2 regs: (k = 2t.., n = g), (k = 2t + 8.., n = g)
//   m16n8k8  A tf32:            (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)
//   m16n8k8  B tf32:            (k = t, n = g), (k = t + 4, n = g)
// An ldmatrix 8x8 block of 16-byte rows hands lane l the 32-bit word (row l / 4, word l % 4),
// which is both the 16-bit and the tf32 fragment position above; .trans hands the 16-bit
// pair (rows 2t, 2t + 1; column g).
#pragma once

#include <cstdint>

namespace xbm_kernels {
namespace cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define XBM_NEEDS_SM80 1
#endif

// 16 bytes global -> shared; the src_bytes that follow are zero-filled (0: all zeros).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
#ifndef XBM_NEEDS_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef XBM_NEEDS_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `pending` of this thread's groups are still in flight. Waiting for
// fewer than asked is always safe, so anything above 3 waits for all.
__device__ __forceinline__ void cp_async_wait(int pending) {
#ifndef XBM_NEEDS_SM80
  switch (pending) {
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
  }
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#ifndef XBM_NEEDS_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#ifndef XBM_NEEDS_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#else
  __trap();
#endif
}

// d += a * b on a 16 x 8 x 16 tile, bf16 or fp16 operands, f32 accumulation.
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifndef XBM_NEEDS_SM80
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

// d += a * b on a 16 x 8 x 8 tile, tf32 operands (already rounded), f32 accumulation.
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifndef XBM_NEEDS_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// fp32 bits -> tf32 bits, rounded to nearest (ties away), low 13 bits zero.
__device__ __forceinline__ uint32_t to_tf32(uint32_t f32_bits) {
  uint32_t r;
#ifndef XBM_NEEDS_SM80
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(__uint_as_float(f32_bits)));
#else
  r = f32_bits;
#endif
  return r;
}

}  // namespace cuda
}  // namespace xbm_kernels
