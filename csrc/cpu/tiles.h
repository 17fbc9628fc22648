// Shared machinery of the fused CPU loss kernels: the reference rows are streamed in
// column tiles; per tile a small GEMM with fp32 accumulation and fp32 output writes
// S_tile = X R_tile^T into a buffer that fits in cache (16-bit products where the anchors
// and the memory share a 16-bit dtype and the CPU multiplies it fast, see gemm16_enabled), a loss-specific epilogue runs over it, and (optionally) the same tile of
// R is reused for the gradient. Tiles are grouped into P splits (contiguous column ranges), one
// accumulator set per split, combined in split order: the result is the same on
// every run with the same thread count. Nothing here is proportional to B x N.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "cpu/simd.h"

namespace xbm_kernels {
namespace cpu {

struct TilePlan {
  int64_t cols;    // columns per tile
  int64_t tiles;   // number of tiles covering [0, n)
  int64_t splits;   // splits (each owns a contiguous range of tiles)
};

// A positive logit scale (1 / temperature, 2 scale, ...) in fp32, at least the smallest normal
// float: one that underflows fp32 stays positive, so that -inf times it is -inf (the epilogues
// set a row's own column to -inf) and every logit is still S times about 0.
inline float logit_scale_f32(double v) { return std::max(static_cast<float>(v), std::numeric_limits<float>::min()); }

inline TilePlan plan_tiles(int64_t B, int64_t n) {
  // Keep the B x cols fp32 score tile near 256 KiB (L2), at least 64 and at most 1024 cols.
  int64_t cols = std::max<int64_t>(64, std::min<int64_t>(1024, (int64_t{1} << 16) / std::max<int64_t>(B, 1)));
  cols = (cols + 15) / 16 * 16;
  const int64_t tiles = n > 0 ? (n + cols - 1) / cols : 0;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles));
  return {cols, tiles, splits};
}

// Whether S tiles of 16-bit anchors against a memory of the same 16-bit dtype use 16-bit
// products with fp32 accumulation and fp32 output (exact products: a bf16 or fp16 product
// fits in fp32, so S is the same fp32 accumulation of the same values as the fp32 GEMM's,
// in another order, and is never rounded to 16 bits). Decided at run time: ATen's
// cpublas::could_pack is true where oneDNN finds AMX for that dtype (AMX-BF16 from
// Sapphire Rapids on, AMX-FP16 from Granite Rapids on); there the 16-bit GEMM measured
// 2-2.5x the fp32 one on the tile shapes used here. Elsewhere (AVX2 or AVX-512 without AMX,
// the AMD EPYC CI machine, aarch64) the 16-bit GEMM was not measured faster, or falls back
// to a slow kernel, so the tiles keep today's fp32 GEMM on an fp32 copy of the tile.
// XBM_CPU_GEMM16=0 forces the fp32 GEMM (benchmarks compare the two in one process).
inline bool gemm16_enabled(at::ScalarType t) {
  if (t != at::kBFloat16 && t != at::kHalf) return false;
  const char* env = std::getenv("XBM_CPU_GEMM16");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return at::native::cpublas::could_pack(t);
}

// C (M x N, fp32, row stride ldc) = A (M x K, row stride lda) B (K x N), A row-major in the
// 16-bit dtype t, products accumulated in fp32; C += when add_c. B is row-major with row
// stride ldb, or with vnni in the layout of ATen's brgemm on AMX (pack_vnni below: ldb = 64).
// ATen's brgemm without VNNI is its plain 16-bit-input, fp32-output GEMM (oneDNN/MKL; it
// packs B itself on every call); with VNNI it runs oneDNN's AMX micro-kernel on B as given,
// about 1.7x faster on the S tiles here. Callers end a run of VNNI calls with
// brgemm_release(), so that no other AMX user on the thread finds this tile configuration.
inline void gemm16(at::ScalarType t, bool vnni, int64_t M, int64_t N, int64_t K, const void* a, int64_t lda,
                   const void* b, int64_t ldb, float* c, int64_t ldc, bool add_c) {
  if (t == at::kBFloat16) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_c, static_cast<const at::BFloat16*>(a),
                                static_cast<const at::BFloat16*>(b), c, vnni);
  } else {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_c, static_cast<const at::Half*>(a),
                                static_cast<const at::Half*>(b), c, vnni);
  }
}

// The VNNI layout of a K x N 16-bit B (K even) in blocks of 64 columns: block b holds columns
// [64 b, 64 b + 64) as [K / 2][64][2], element (k, n) at (k / 2) * 128 + (n % 64) * 2 + k % 2.
// Written from the memory's rows, the two B operands here need no transposed copy first:
// R_tile^T (K = D, N = cols; a pair (k, k+1) of one row is one 32-bit word, so the block is a
// 32-bit transpose) and R_tile (K = cols, N = D; rows 2k and 2k+1 interleaved).
// `r` is the tile's first row, row stride D; n_cols multiple of 64.
inline void pack_vnni_rt_scalar(const uint16_t* r, int64_t w, int64_t D, uint16_t* out) {  // R^T: K = D, N = w
  const int64_t D2 = D / 2;
  for (int64_t j0 = 0; j0 < w; j0 += 64) {
    for (int64_t jj = 0; jj < 64; ++jj) {
      const uint16_t* src = r + (j0 + jj) * D;
      uint16_t* dst = out + j0 * D + jj * 2;
      for (int64_t k = 0; k < D2; ++k) std::memcpy(dst + k * 128, src + 2 * k, 4);
    }
  }
}
#if XBM_CPU_VECTOR && (defined(__x86_64__) || defined(__i386__))
// The same block as 16 x 16 transposes of 32-bit words in AVX-512 registers (the scalar loop's
// scattered 4-byte stores took ~4x as long per tile, measured at w = 512, D = 128): the source
// block is 64 rows of D / 2 words, the packed one D / 2 rows of 64 words.
__attribute__((target("avx512f"))) inline void transpose16_words(const uint32_t* s, int64_t ss, uint32_t* d,
                                                                 int64_t ds) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(s + i * ss);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4 g + q]: its 128-bit lane L holds the 4 x 4 block (rows 4 g.., column 4 L + q); gather
  // each column's four blocks across the four registers of the same q
  for (int q = 0; q < 4; ++q) {
    const __m512i lo01 = _mm512_shuffle_i32x4(r[q], r[4 + q], 0x44), hi01 = _mm512_shuffle_i32x4(r[q], r[4 + q], 0xEE);
    const __m512i lo23 = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0x44);
    const __m512i hi23 = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0xEE);
    t[0 + q] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);
    t[4 + q] = _mm512_shuffle_i32x4(lo01, lo23, 0xDD);
    t[8 + q] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);
    t[12 + q] = _mm512_shuffle_i32x4(hi01, hi23, 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(d + i * ds, t[i]);
}
__attribute__((target("avx512f"))) inline void pack_vnni_rt_avx512(const uint16_t* r, int64_t w, int64_t D,
                                                                   uint16_t* out) {
  const int64_t D2 = D / 2, full = D2 / 16 * 16;
  const uint32_t* src = reinterpret_cast<const uint32_t*>(r);  // row pairs (k, k+1) as words
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (int64_t j0 = 0; j0 < w; j0 += 64) {
    uint32_t* block = dst + j0 * D2;
    for (int64_t n0 = 0; n0 < 64; n0 += 16)
      for (int64_t k0 = 0; k0 < full; k0 += 16)
        transpose16_words(src + (j0 + n0) * D2 + k0, D2, block + k0 * 64 + n0, 64);
    for (int64_t k = full; k < D2; ++k)
      for (int64_t n = 0; n < 64; ++n) std::memcpy(block + k * 64 + n, r + ((j0 + n) * D2 + k) * 2, 4);
  }
}
#endif
inline void pack_vnni_rt(const uint16_t* r, int64_t w, int64_t D, uint16_t* out) {
#if XBM_CPU_VECTOR && (defined(__x86_64__) || defined(__i386__))
  if (simd_lanes() == 16 && reinterpret_cast<uintptr_t>(r) % 4 == 0) return pack_vnni_rt_avx512(r, w, D, out);
#endif
  pack_vnni_rt_scalar(r, w, D, out);
}
inline void pack_vnni_r(const uint16_t* r, int64_t w, int64_t D, int64_t n_cols, uint16_t* out) {  // R: K = w, N = n_cols of D
  for (int64_t d0 = 0; d0 < n_cols; d0 += 64) {
    uint16_t* ob = out + d0 * w;
    for (int64_t k = 0; k < w / 2; ++k) {
      const uint16_t* a = r + 2 * k * D + d0;
      const uint16_t* b = a + D;
      uint16_t* dst = ob + k * 128;
      for (int64_t jj = 0; jj < 64; ++jj) {
        dst[2 * jj] = a[jj];
        dst[2 * jj + 1] = b[jj];
      }
    }
  }
}

// Whether ATen's pack (oneDNN's) writes the layout above for dtype t, checked once on a small
// matrix: a later oneDNN with another packed format turns the VNNI path off, not wrong.
inline bool vnni_layout_matches(at::ScalarType t) {
  const int64_t K = 4, N = 64;  // 256 distinct values, exact in both dtypes
  at::Tensor r = at::arange(N * K, at::TensorOptions().dtype(at::kFloat)).to(t).view({N, K});  // R: N x K
  at::Tensor rt = r.t().contiguous();                                                           // B = R^T: K x N
  at::Tensor ours = at::zeros({K * N}, r.options()), theirs = at::zeros({K * N}, r.options());
  at::native::cpublas::pack(K, N, N, 64, t, t, rt.data_ptr(), theirs.data_ptr());
  pack_vnni_rt(static_cast<const uint16_t*>(r.data_ptr()), N, K, static_cast<uint16_t*>(ours.data_ptr()));
  return at::equal(ours, theirs);
}
inline bool vnni_enabled(at::ScalarType t) {
  static const bool bf16 = at::native::cpublas::could_pack(at::kBFloat16) && vnni_layout_matches(at::kBFloat16);
  static const bool f16 = at::native::cpublas::could_pack(at::kHalf) && vnni_layout_matches(at::kHalf);
  return t == at::kBFloat16 ? bf16 : f16;
}

// Coefficients c[0, n) as 16-bit limbs for a 16-bit GEMM: hi = c rounded to the dtype,
// lo = (c - hi) rounded to it. Returns 0 when every c equals its hi (lo not needed: the
// product is exact, e.g. the -1/0/+1 of the contrastive loss), 1 when hi + lo carry c
// (bf16 only: lo holds the next 8 bits, so hi + lo is within 2^-17 |c|, far below the bf16
// rounding of the returned gradient), 2 when they cannot (a non-finite value, an overflow,
// or an inexact fp16 coefficient, whose lo could fall in fp16's subnormals): keep fp32.
// (Compiled at every vector width like the epilogues: the compiler vectorises the bf16 loop, 4
// lanes in the portable build, 16 with AVX-512; integer arithmetic, the same result at each.)
template <int L>
XBM_INLINE int split_limbs_lanes(at::ScalarType t, const float* c, int64_t n, void* hi_, void* lo_) {
  if (t == at::kBFloat16) {
    uint16_t* hi = static_cast<uint16_t*>(hi_);
    uint16_t* lo = static_cast<uint16_t*>(lo_);
    uint32_t inexact = 0, bad = 0;
    for (int64_t k = 0; k < n; ++k) {  // round to nearest even by integer arithmetic (vectorises)
      uint32_t u;
      std::memcpy(&u, c + k, 4);
      const uint32_t h = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
      bad |= static_cast<uint32_t>((u & 0x7F800000u) == 0x7F800000u) |
             static_cast<uint32_t>((h & 0x7F800000u) == 0x7F800000u);
      float hf;
      std::memcpy(&hf, &h, 4);
      const float d = c[k] - hf;  // exact (Sterbenz)
      uint32_t ud;
      std::memcpy(&ud, &d, 4);
      inexact |= static_cast<uint32_t>((ud & 0x7FFFFFFFu) != 0);
      hi[k] = static_cast<uint16_t>(h >> 16);
      lo[k] = static_cast<uint16_t>((ud + 0x7FFFu + ((ud >> 16) & 1u)) >> 16);
    }
    return bad ? 2 : (inexact ? 1 : 0);
  }
  at::Half* hi = static_cast<at::Half*>(hi_);
  for (int64_t k = 0; k < n; ++k) {
    hi[k] = at::Half(c[k]);
    if (static_cast<float>(hi[k]) != c[k]) return 2;
  }
  return 0;
}
XBM_CPU_DISPATCH(inline int, split_limbs, (at::ScalarType t, const float* c, int64_t n, void* hi_, void* lo_),
                 (t, c, n, hi_, lo_))

// The loss ops' inputs in the layout the kernels read: fp32 anchors, contiguous rows.
struct LossInputs {
  at::Tensor x32, ref, y, z, self_idx;
  at::Tensor x16;  // the anchors in the memory's 16-bit dtype where gemm16_enabled, else undefined
  bool vnni = false;  // with x16: B operands packed for the AMX micro-kernel (vnni_enabled)
  int64_t B, D, n;
  const int64_t* self_ptr() const { return self_idx.defined() ? self_idx.data_ptr<int64_t>() : nullptr; }
  const int32_t* y_ptr() const { return y.data_ptr<int32_t>(); }
  const int32_t* z_ptr() const { return z.data_ptr<int32_t>(); }
  // The column of anchor i's own copy, or -1.
  int64_t self_col(int64_t i) const { return self_idx.defined() ? self_idx.data_ptr<int64_t>()[i] : -1; }
  // Anchor i's own column in the tile of columns [c0, c0 + w) whose row i is `row`, set to -inf
  // there (no maximum, an exponential of 0, above no threshold: the epilogues take the vector
  // path for every row); its index in the tile, or -1 when it is not in the tile.
  int64_t hide_own_column(float* row, int64_t i, int64_t c0, int64_t w) const {
    const int64_t j = self_col(i) - c0;
    if (j < 0 || j >= w) return -1;
    row[j] = -std::numeric_limits<float>::infinity();
    return j;
  }
};

// One worker's scratch: the score tile, an optional second tile of the same size (losses
// with two coefficient sets), for non-fp32 references an fp32 copy of R_tile, and for the
// 16-bit GEMM R_tile transposed.
struct TileScratch {
  at::Tensor scores;  // (B * cols,) f32
  at::Tensor aux;     // (B * cols,) f32
  at::Tensor ref32;   // (cols, D) f32, or undefined when ref is already fp32
  at::Tensor ref16t;  // (D * cols,) 16-bit: R_tile^T row-major, or undefined without gemm16
  at::Tensor limbs;   // (2, B * cols) 16-bit: a coefficient tile's hi and lo limbs, likewise
  std::vector<int32_t> listed;  // a tile's pairs i * w + j listed by an epilogue (add_listed_rows)
  TileScratch(int64_t B, int64_t D, int64_t cols, const at::Tensor& ref, bool gemm16) {
    auto opts = ref.options().dtype(at::kFloat);
    scores = at::empty({B * cols}, opts);
    aux = at::empty({B * cols}, opts);
    if (ref.scalar_type() != at::kFloat) ref32 = at::empty({cols, D}, opts);
    if (gemm16) {
      ref16t = at::empty({D * cols}, ref.options());
      limbs = at::empty({2, B * cols}, ref.options());
    }
  }
  at::Tensor aux_tile(int64_t B, int64_t w) { return aux.narrow(0, 0, B * w).view({B, w}); }
  // Room for every pair of a (B, w) tile in `listed`.
  int32_t* list_buffer(int64_t B, int64_t w) {
    if (static_cast<int64_t>(listed.size()) < B * w) listed.resize(B * w);
    return listed.data();
  }
  at::Tensor current_ref;  // the tile ref_tile returned last (epilogues that read R rows)
  int64_t current_c0 = -1, current_w = -1;
  // Whether ref_tile(ref, c0, w) is an fp32 copy made already (no conversion to ask for it).
  bool holds_ref32(int64_t c0, int64_t w) const { return ref32.defined() && c0 == current_c0 && w == current_w; }
  // fp32 view of ref rows [c0, c0 + w); converted once per tile however often it is asked for
  at::Tensor ref_tile(const at::Tensor& ref, int64_t c0, int64_t w) {
    if (c0 == current_c0 && w == current_w) return current_ref;
    at::Tensor rt = ref.narrow(0, c0, w);
    if (ref32.defined()) {
      rt = ref32.narrow(0, 0, w);
      rt.copy_(ref.narrow(0, c0, w));
    }
    current_ref = rt;
    current_c0 = c0;
    current_w = w;
    return rt;
  }
  // S_tile = X R_tile^T for ref rows [c0, c0 + w), (B, w) fp32, living in `scores`.
  at::Tensor similarity(const LossInputs& in, int64_t c0, int64_t w) {
    at::Tensor st = scores.narrow(0, 0, in.B * w).view({in.B, w});
    if (in.x16.defined()) {
      const at::ScalarType t = in.ref.scalar_type();
      const int64_t B = in.B, D = in.D;
      // Full blocks of 64 columns packed for the AMX kernel; the rest (and odd D) through the
      // plain GEMM, which takes B row-major as K x N: those columns of R_tile transposed.
      const int64_t full = in.vnni && D % 2 == 0 ? w / 64 * 64 : 0;
      float* sp = st.data_ptr<float>();
      if (full > 0) {
        uint16_t* packed = static_cast<uint16_t*>(ref16t.data_ptr());
        pack_vnni_rt(static_cast<const uint16_t*>(in.ref.data_ptr()) + c0 * D, full, D, packed);
        for (int64_t j0 = 0; j0 < full; j0 += 64)
          gemm16(t, true, B, 64, D, in.x16.data_ptr(), D, packed + j0 * D, 64, sp + j0, w, /*add_c=*/false);
        at::native::cpublas::brgemm_release(true);
      }
      if (full < w) {
        at::Tensor rt16 = ref16t.narrow(0, 0, D * (w - full)).view({D, w - full});
        rt16.copy_(in.ref.narrow(0, c0 + full, w - full).t());
        gemm16(t, false, B, w - full, D, in.x16.data_ptr(), D, rt16.data_ptr(), w - full, sp + full, w,
               /*add_c=*/false);
      }
    } else {
      at::mm_out(st, in.x32, ref_tile(in.ref, c0, w).t());
    }
    return st;
  }
  // out (B, D) fp32 += C R_tile for a (B, w) fp32 coefficient tile C of ref rows [c0, c0 + w):
  // with gemm16, C's limbs times the 16-bit rows where split_limbs allows, else fp32.
  void add_product(const LossInputs& in, const at::Tensor& c, int64_t c0, int64_t w, at::Tensor out) {
    if (in.x16.defined()) {
      const at::ScalarType t = in.ref.scalar_type();
      void* hi = limbs[0].data_ptr();
      void* lo = limbs[1].data_ptr();
      const int parts = split_limbs(t, c.data_ptr<float>(), in.B * w, hi, lo);
      if (parts < 2) {
        TORCH_INTERNAL_ASSERT(out.is_contiguous() && c.is_contiguous());
        const int64_t B = in.B, D = in.D;
        const uint16_t* r = static_cast<const uint16_t*>(in.ref.data_ptr()) + c0 * D;
        float* o = out.data_ptr<float>();
        // Full blocks of 64 of D's columns packed for the AMX kernel (w even), the rest plain.
        const int64_t full = in.vnni && w % 2 == 0 ? D / 64 * 64 : 0;
        if (full > 0) {
          uint16_t* packed = static_cast<uint16_t*>(ref16t.data_ptr());
          pack_vnni_r(r, w, D, full, packed);
          for (int limb = 0; limb <= parts; ++limb)
            for (int64_t d0 = 0; d0 < full; d0 += 64)
              gemm16(t, true, B, 64, w, limb ? lo : hi, w, packed + d0 * w, 64, o + d0, D, /*add_c=*/true);
          at::native::cpublas::brgemm_release(true);
        }
        if (full < D)
          for (int limb = 0; limb <= parts; ++limb)
            gemm16(t, false, B, D - full, w, limb ? lo : hi, w, r + full, D, o + full, D, /*add_c=*/true);
        return;
      }
    }
    out.addmm_(c, ref_tile(in.ref, c0, w));
  }
};

// Runs fn(split, tile_begin_col, width) over every tile, splits in parallel.
template <typename Fn>
void for_each_tile(const TilePlan& plan, int64_t n, const Fn& fn) {
  at::parallel_for(0, plan.splits, 1, [&](int64_t p0, int64_t p1) {
    // Dispatch state is thread-local: worker threads must also stay below autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t t0 = p * plan.tiles / plan.splits, t1 = (p + 1) * plan.tiles / plan.splits;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c0 = t * plan.cols;
        fn(p, c0, std::min(plan.cols, n - c0));
      }
    }
  });
}

inline LossInputs prepare_inputs(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
                                 const at::Tensor& ref_labels, const c10::optional<at::Tensor>& self_index,
                                 int64_t ref_valid) {
  check_loss_args(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(x.device().is_cpu(), "x: expected a CPU tensor, got ", x.device());
  LossInputs in;
  in.x32 = x.detach().to(at::kFloat).contiguous();
  in.ref = ref.detach().contiguous();
  in.y = labels.contiguous();
  in.z = ref_labels.contiguous();
  if (self_index.has_value()) in.self_idx = self_index->contiguous();
  // fp32 anchors against a 16-bit memory keep the fp32 GEMM: their products need fp32.
  if (x.scalar_type() == ref.scalar_type() && gemm16_enabled(ref.scalar_type())) {
    in.x16 = x.detach().contiguous();
    in.vnni = vnni_enabled(ref.scalar_type());
  }
  in.B = x.size(0);
  in.D = x.size(1);
  in.n = ref_valid;
  return in;
}

// Lazily built per-split scratch.
struct ScratchPool {
  std::vector<std::unique_ptr<TileScratch>> splits;
  const LossInputs& in;
  int64_t cols;
  ScratchPool(const LossInputs& in_, const TilePlan& plan) : splits(plan.splits), in(in_), cols(plan.cols) {}
  TileScratch& operator[](int64_t p) {
    if (!splits[p]) splits[p] = std::make_unique<TileScratch>(in.B, in.D, cols, in.ref, in.x16.defined());
    return *splits[p];
  }
};

// Sum of a (P, ...) tensor over its first dim, in split order (deterministic).
inline at::Tensor sum_splits(const at::Tensor& splits) {
  at::Tensor out = splits.select(0, 0).clone();
  for (int64_t p = 1; p < splits.size(0); ++p) out.add_(splits.select(0, p));
  return out;
}

// o (B x D) += C r for a mostly zero (B x w) C: one row add per nonzero, in row-major order.
// The zeros are skipped a vector at a time (the scan reads all of C, the adds few rows). r's
// rows are fp32, or 16-bit rows read as they are (each element widened exactly: the same sums
// as on an fp32 copy of the tile, without converting the rows no coefficient names).
template <int L, class T>
XBM_INLINE void sparse_row_adds_typed(const float* cp, int64_t B, int64_t w, const T* r, int64_t D, float* o) {
  for (int64_t i = 0; i < B; ++i) {
    const float* ci = cp + i * w;
    float* oi = o + i * D;
    auto add = [&](int64_t j) {
      const float cij = ci[j];
      if (cij == 0.f) return;
      const T* rj = r + j * D;
      for (int64_t d = 0; d < D; ++d) oi[d] += cij * static_cast<float>(rj[d]);
    };
    int64_t j = 0;
#if XBM_CPU_VECTOR
    using V = Vec<L>;
    for (; j + L <= w; j += L) {
      if (V::sum(V::one_where(V::ne(V::load(ci + j), 0.f))) == 0.f) continue;
      for (int64_t k = j; k < j + L; ++k) add(k);
    }
#endif
    for (; j < w; ++j) add(j);
  }
}
template <int L>
XBM_INLINE void sparse_row_adds_lanes(const float* cp, int64_t B, int64_t w, const float* r, int64_t D, float* o) {
  sparse_row_adds_typed<L>(cp, B, w, r, D, o);
}
template <int L>
XBM_INLINE void sparse_row_adds_bf16_lanes(const float* cp, int64_t B, int64_t w, const at::BFloat16* r, int64_t D,
                                           float* o) {
  sparse_row_adds_typed<L>(cp, B, w, r, D, o);
}
template <int L>
XBM_INLINE void sparse_row_adds_f16_lanes(const float* cp, int64_t B, int64_t w, const at::Half* r, int64_t D,
                                          float* o) {
  sparse_row_adds_typed<L>(cp, B, w, r, D, o);
}
XBM_CPU_DISPATCH(inline void, sparse_row_adds,
                 (const float* cp, int64_t B, int64_t w, const float* r, int64_t D, float* o),
                 (cp, B, w, r, D, o))
XBM_CPU_DISPATCH(inline void, sparse_row_adds_bf16,
                 (const float* cp, int64_t B, int64_t w, const at::BFloat16* r, int64_t D, float* o),
                 (cp, B, w, r, D, o))
XBM_CPU_DISPATCH(inline void, sparse_row_adds_f16,
                 (const float* cp, int64_t B, int64_t w, const at::Half* r, int64_t D, float* o),
                 (cp, B, w, r, D, o))

// out += C R_tile for a (B x w) coefficient tile C with about `nonzeros` nonzero entries.
// Sparse tiles (the positives of a memory of many classes) take one row add per nonzero,
// 2 D flops per nonzero instead of the 2 B w D of a GEMM; tiles denser than 1/32 take the
// GEMM (the row adds run several times below the GEMM's flop rate, so the cut-off is kept
// low). Both add in a fixed order.
inline void add_sparse_rows(TileScratch& scratch, const LossInputs& in, const at::Tensor& c, int64_t c0,
                            at::Tensor out, int64_t nonzeros) {
  const int64_t B = c.size(0), w = c.size(1), D = in.D;
  if (nonzeros * 32 > B * w) {
    scratch.add_product(in, c, c0, w, out);
    return;
  }
  if (nonzeros == 0) return;
  const at::ScalarType t = in.ref.scalar_type();
  if ((t == at::kBFloat16 || t == at::kHalf) && !scratch.holds_ref32(c0, w)) {
    // a 16-bit memory whose tile has no fp32 copy yet (the 16-bit GEMM read it as it is): read
    // the named rows as they are rather than converting the whole tile
    const int64_t off = c0 * D;
    if (t == at::kBFloat16)
      sparse_row_adds_bf16(c.data_ptr<float>(), B, w, static_cast<const at::BFloat16*>(in.ref.data_ptr()) + off, D,
                           out.data_ptr<float>());
    else
      sparse_row_adds_f16(c.data_ptr<float>(), B, w, static_cast<const at::Half*>(in.ref.data_ptr()) + off, D,
                          out.data_ptr<float>());
    return;
  }
  sparse_row_adds(c.data_ptr<float>(), B, w, scratch.ref_tile(in.ref, c0, w).data_ptr<float>(), D,
                  out.data_ptr<float>());
}

// The rows of a (B, D) fp32 accumulator g times f[i], skipped where f[i] is 1 (an online
// log-sum-exp's numerator brought to a running max that grew in this tile).
inline void scale_rows(float* g, const float* f, int64_t B, int64_t D) {
  for (int64_t i = 0; i < B; ++i) {
    if (f[i] == 1.f) continue;
    float* gi = g + i * D;
    for (int64_t d = 0; d < D; ++d) gi[d] *= f[i];
  }
}

// out += C R_tile for the tile C whose nonzeros are the n listed pairs idx[k] (flat i * w + j,
// in row-major order, as an epilogue found them) with coefficients coef[k] (1 without coef):
// one row add per nonzero pair, in that order (the sums sparse_row_adds makes of the same tile
// written out), or the GEMM on the tile written out into the scratch's aux tile (which must be
// free) when it is denser than add_sparse_rows' cut-off.
template <class T>
inline void listed_row_adds(const int32_t* idx, const float* coef, int64_t n, int64_t w, const T* r, int64_t D,
                            float* o) {
  for (int64_t k = 0; k < n; ++k) {
    const float ck = coef ? coef[k] : 1.f;
    if (ck == 0.f) continue;
    const int64_t i = idx[k] / w, j = idx[k] % w;
    float* oi = o + i * D;
    const T* rj = r + j * D;
    for (int64_t d = 0; d < D; ++d) oi[d] += ck * static_cast<float>(rj[d]);
  }
}
inline void add_listed_rows(TileScratch& scratch, const LossInputs& in, int64_t c0, int64_t w, const int32_t* idx,
                            const float* coef, int64_t n, at::Tensor out) {
  const int64_t B = in.B, D = in.D;
  if (n == 0) return;
  if (n * 32 > B * w) {
    at::Tensor c = scratch.aux_tile(B, w);
    c.zero_();
    float* cp = c.data_ptr<float>();
    for (int64_t k = 0; k < n; ++k) cp[idx[k]] = coef ? coef[k] : 1.f;
    scratch.add_product(in, c, c0, w, out);
    return;
  }
  const at::ScalarType t = in.ref.scalar_type();
  float* o = out.data_ptr<float>();
  if ((t == at::kBFloat16 || t == at::kHalf) && !scratch.holds_ref32(c0, w)) {
    // a 16-bit memory whose tile has no fp32 copy (the 16-bit GEMM read it as it is): the listed
    // rows read as they are, each element widened exactly
    if (t == at::kBFloat16)
      listed_row_adds(idx, coef, n, w, static_cast<const at::BFloat16*>(in.ref.data_ptr()) + c0 * D, D, o);
    else
      listed_row_adds(idx, coef, n, w, static_cast<const at::Half*>(in.ref.data_ptr()) + c0 * D, D, o);
    return;
  }
  listed_row_adds(idx, coef, n, w, scratch.ref_tile(in.ref, c0, w).data_ptr<float>(), D, o);
}

// The reference-side backward shared by the losses whose gradient is a coefficient matrix:
// per tile, to_coefficients(p, c0, w, tile, scratch) turns the score tile S (B x w) into
// G = diag(dL/dl) dl/dS in place; then dX += G R_tile and dR[c0:c0+w] = G^T X (tiles own
// disjoint rows of dR, so only dX needs a split reduction). Returns (dX, dR) in fp32.
template <typename Fn>
std::tuple<at::Tensor, at::Tensor> coefficient_backward(const LossInputs& in, int64_t ref_rows,
                                                        const Fn& to_coefficients) {
  const auto plan = plan_tiles(in.B, in.n);
  const auto f32 = in.x32.options();
  at::Tensor grad_splits = at::zeros({plan.splits, in.B, in.D}, f32);
  at::Tensor grad_ref = at::zeros({ref_rows, in.D}, f32);  // rows >= ref_valid get no gradient
  ScratchPool scratch(in, plan);
  for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    at::Tensor c = scratch[p].similarity(in, c0, w);
    at::Tensor rt = scratch[p].ref_tile(in.ref, c0, w);
    to_coefficients(p, c0, w, c, scratch[p]);
    scratch[p].add_product(in, c, c0, w, grad_splits[p]);
    at::Tensor gr = grad_ref.narrow(0, c0, w);
    at::mm_out(gr, c.t(), in.x32);
  });
  return {sum_splits(grad_splits), grad_ref};
}

// The two passes of a loss whose coefficient dl_i/dS_ij depends on that pair alone
// (contrastive, contrastive_l2, margin's negatives). epilogue(s, c0, w, row_scale, loss, counts)
// turns the score tile S (B x w, row-major) into C in place, row i times row_scale[i] where
// row_scale is given, adds the tile's per-row loss and counts and returns its number of
// non-zero c_ij.
// Forward: (loss_rows, dX = sum over tiles of C R_tile (row adds when C is sparse) or (0,),
// counts), partial results combined in range order.
template <typename Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_forward(const LossInputs& in, bool need_grad,
                                                                const Epilogue& epilogue) {
  const auto plan = plan_tiles(in.B, in.n);
  const auto f32 = in.x32.options();
  at::Tensor loss_splits = at::zeros({plan.splits, in.B}, f32.dtype(at::kDouble));
  at::Tensor count_splits = at::zeros({plan.splits, in.B, 2}, f32.dtype(at::kLong));
  at::Tensor grad_splits = need_grad ? at::zeros({plan.splits, in.B, in.D}, f32) : at::Tensor();
  ScratchPool scratch(in, plan);
  for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    at::Tensor st = scratch[p].similarity(in, c0, w);
    const int64_t active = epilogue(st.data_ptr<float>(), c0, w, nullptr, loss_splits[p].data_ptr<double>(),
                                    count_splits[p].data_ptr<int64_t>());
    // Few active pairs in the tile (the hard negatives are few, or a term is switched off):
    // row adds instead of the GEMM.
    if (need_grad) add_sparse_rows(scratch[p], in, st, c0, grad_splits[p], active);
  });
  at::Tensor grad = need_grad ? sum_splits(grad_splits) : at::empty({0}, f32);
  return {sum_splits(loss_splits).to(at::kFloat), grad, sum_splits(count_splits).to(at::kInt)};
}

// Backward: C recomputed per tile, each row scaled by grad_rows as the epilogue writes it (no
// second sweep over the tile); (dX, dR) as coefficient_backward.
template <typename Epilogue>
std::tuple<at::Tensor, at::Tensor> pairwise_backward(const LossInputs& in, int64_t ref_rows,
                                                     const at::Tensor& grad_rows, const Epilogue& epilogue) {
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  const at::Tensor g = grad_rows.to(at::kFloat).contiguous();
  const float* gp = g.data_ptr<float>();
  const auto plan = plan_tiles(in.B, in.n);
  at::Tensor loss_scratch = at::zeros({plan.splits, in.B}, in.x32.options().dtype(at::kDouble));
  at::Tensor count_scratch = at::zeros({plan.splits, in.B, 2}, in.x32.options().dtype(at::kLong));
  return coefficient_backward(in, ref_rows, [&](int64_t p, int64_t c0, int64_t w, at::Tensor& c, TileScratch&) {
    epilogue(c.data_ptr<float>(), c0, w, gp, loss_scratch[p].data_ptr<double>(), count_scratch[p].data_ptr<int64_t>());
  });
}

}  // namespace cpu
}  // namespace xbm_kernels
