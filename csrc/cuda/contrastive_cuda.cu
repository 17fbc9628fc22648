// Fused contrastive loss over a reference set on CUDA GPUs (CONTRACT.md section 1):
//   l_i = sum_{j in P_i} (1 - S_ij) + sum_{j in N_i, S_ij > m} S_ij,   S = X R^T
//   dl_i/dx_i = sum_j c_ij r_j,  c_ij = -1 (positive), +1 (active negative), 0 otherwise.
// One pass over the reference: per tile of 64 reference rows, tensor cores compute the
// 64 x 64 block of S, the epilogue turns it into C in registers (loss and counts on the
// way), C goes to shared memory in the operand dtype (exact: -1/0/+1) and dX += C R_tile
// reuses the staged tile. csrc/cuda/README.md describes the tiling.
//
// fp32 anchors against a 16-bit reference are cut on the host into 16-bit limbs,
// x = hi + mid (+ lo) (2 limbs for fp16, 3 for bf16: an fp32 mantissa), staged side by
// side; each S-step runs one mma per limb on the R chunk staged once, so S keeps fp32
// accuracy (the reference backend's product is fp32) instead of the 1e-4 .. 1e-3 of x
// rounded to 16 bits. C stays exact (-1/0/+1).
//
// The same kernel runs "transposed" for the reference-side gradient of contrastive_bwd:
// rows are then the reference rows, the streamed columns the anchors,
// grad_ref_j = sum_i g_i c_ij x_i (the g_i goes into C; self_index then names the row).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cuda/ptx.cuh"

namespace xbm_kernels {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;     // 8 warps
constexpr int kBM = 64;           // rows (anchors) per CTA
constexpr int kBN = 64;           // reference rows per tile
constexpr int kChunkBytes = 128;  // one D-chunk of a row: 64 x 16-bit or 32 x fp32
constexpr int kPitch = 144;       // smem row pitch of a chunk: +16 bytes so ldmatrix rows hit distinct banks
constexpr int kRedBytes = 2 * kBM * (int)sizeof(double) + 2 * kBM * 2 * (int)sizeof(int);

// Operand math: bf16 / fp16 mma m16n8k16, tf32 mma m16n8k8, or plain fp32 FMA (IEEE).
enum class Math { kBf16, kF16, kTf32, kF32 };

template <Math kM>
struct Traits {
  static constexpr bool k16 = kM == Math::kBf16 || kM == Math::kF16;
  static constexpr int kEsz = k16 ? 2 : 4;
  static constexpr int kElems = kChunkBytes / kEsz;  // D elements per chunk
  static constexpr int kNtc = k16 ? 2 : 1;           // 8-wide dX column tiles per warp per chunk
  static constexpr int kCPitch = kBN * kEsz + 16;    // smem pitch of the C tile (bytes)
  static constexpr int kNdSmall = 128 / kElems;      // dX chunks per CTA: 128 or 512 columns of D
  static constexpr int kNdLarge = 512 / kElems;
};

struct Params {
  const char* q;  // (q_limbs, M, D) CTA rows: anchors (in limbs), or reference rows when transposed
  const char* k;  // (ncols, D) streamed columns: reference rows, or anchors when transposed
  int64_t M, ncols, D, row_bytes;
  int q_limbs;           // 16-bit limbs of each CTA row, summed in S (1: the row itself)
  int64_t q_limb_bytes;  // M * row_bytes: from one limb to the next
  const int32_t* q_lab;
  const int32_t* k_lab;
  const int64_t* self_index;  // null: none
  int self_on_cols;           // 0: self_index[row] names a column; 1: self_index[col] names a row
  const float* row_scale;     // scales dX rows (grad_rows in the backward), or null
  const float* col_scale;     // scales C columns (transposed backward), or null
  float margin, pos_thr;
  double* loss_ws;   // (splits, M), or null
  int32_t* cnt_ws;   // (splits, M, 2)
  float* dx;         // (M, D) for split s at dx + s * dx_split_stride, or null: no gradient
  int64_t dx_split_stride;
  int64_t tiles;     // column tiles covering [0, ncols)
  int nk;            // D-chunks per row
  int lookahead;     // loads in flight ahead of the one being consumed (2 or 3)
  int nbuf, xbuf;    // chunk slots for the streamed tile / chunk groups (q_limbs slots each) for the CTA rows
  int r_resident;    // all nk chunks of a tile stay staged until its dX is done
  int x_resident;    // the CTA rows' chunks are loaded once and stay
  int vec_ok;        // 16-byte aligned rows: cp.async; otherwise element loads
};

// Stages bytes [128 chunk, 128 chunk + 128) of rows [row0, row0 + 64) into dst (pitch
// kPitch); rows >= nrows and bytes past the row end are zero (never garbage: 0 * NaN).
template <Math kM>
__device__ __forceinline__ void load_chunk(unsigned char* dst, const char* src, int64_t row0, int64_t nrows,
                                           int chunk, const Params& p) {
  for (int v = threadIdx.x; v < 64 * 8; v += kThreads) {
    const int r = v >> 3, seg = v & 7;
    const int64_t row = row0 + r;
    const int64_t byte = (int64_t)chunk * kChunkBytes + seg * 16;
    unsigned char* d = dst + r * kPitch + seg * 16;
    if (p.vec_ok) {  // row_bytes % 16 == 0: a 16-byte segment is all in or all out
      const bool in = row < nrows && byte < p.row_bytes;
      cp_async_16(smem_addr(d), in ? src + row * p.row_bytes + byte : src, in ? 16 : 0);
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      if (row < nrows) {
        const unsigned char* s = reinterpret_cast<const unsigned char*>(src) + row * p.row_bytes;
        if constexpr (Traits<kM>::kEsz == 2) {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const int64_t b = byte + 2 * e;
            if (b < p.row_bytes) w[e >> 1] |= (uint32_t)(*reinterpret_cast<const uint16_t*>(s + b)) << (16 * (e & 1));
          }
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t b = byte + 4 * e;
            if (b < p.row_bytes) w[e] = *reinterpret_cast<const uint32_t*>(s + b);
          }
        }
      }
      *reinterpret_cast<uint4*>(d) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

// acc (16 x 32 of S for this warp) += X_chunk (16 rows at xw) . R_chunk^T (32 rows at rw).
template <Math kM>
__device__ __forceinline__ void s_chunk(float (&acc)[4][4], const unsigned char* xw, const unsigned char* rw,
                                        int lane) {
  if constexpr (kM == Math::kF32) {
    const int g = lane >> 2, t = lane & 3;
    const float* x0 = reinterpret_cast<const float*>(xw + g * kPitch);
    const float* x1 = reinterpret_cast<const float*>(xw + (g + 8) * kPitch);
#pragma unroll
    for (int k4 = 0; k4 < 8; ++k4) {
      const float4 a0 = reinterpret_cast<const float4*>(x0)[k4];
      const float4 a1 = reinterpret_cast<const float4*>(x1)[k4];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float4 b = reinterpret_cast<const float4*>(rw + (8 * nt + 2 * t + c) * kPitch)[k4];
          float& s0 = acc[nt][c];
          float& s1 = acc[nt][2 + c];
          s0 = fmaf(a0.x, b.x, s0); s0 = fmaf(a0.y, b.y, s0); s0 = fmaf(a0.z, b.z, s0); s0 = fmaf(a0.w, b.w, s0);
          s1 = fmaf(a1.x, b.x, s1); s1 = fmaf(a1.y, b.y, s1); s1 = fmaf(a1.z, b.z, s1); s1 = fmaf(a1.w, b.w, s1);
        }
      }
    }
  } else {
    // One k-step is 32 bytes of a row (16 x 16-bit or 8 x tf32); a chunk is 4 k-steps.
    const uint32_t xa = smem_addr(xw + ((lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + (lane >> 4) * 16);
    const uint32_t rb = smem_addr(rw + ((lane & 7) + (lane >> 4) * 8) * kPitch + ((lane >> 3) & 1) * 16);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      uint32_t a[4];
      ldmatrix_x4(a, xa + ks * 32);
      if constexpr (kM == Math::kTf32) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = to_tf32(a[i]);
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {  // two 8-column tiles per ldmatrix
        uint32_t b[4];
        ldmatrix_x4(b, rb + np * 16 * kPitch + ks * 32);
        if constexpr (kM == Math::kTf32) {
#pragma unroll
          for (int i = 0; i < 4; ++i) b[i] = to_tf32(b[i]);
          mma_1688_tf32(acc[2 * np], a, b[0], b[1]);
          mma_1688_tf32(acc[2 * np + 1], a, b[2], b[3]);
        } else {
          mma_16816<kM == Math::kBf16>(acc[2 * np], a, b[0], b[1]);
          mma_16816<kM == Math::kBf16>(acc[2 * np + 1], a, b[2], b[3]);
        }
      }
    }
  }
}

// A-fragments of this warp's 32 rows of the C tile. The 16-bit path with a 512-column
// slice loads them once per tile (up to 8 dX-steps use them); the 128-column one reloads
// them per step to stay within 128 registers.
struct CFrags16 {
  uint32_t a[2][4][4];  // [m-tile][k-step of 16 columns][reg]
};

__device__ __forceinline__ uint32_t c_frag_addr(const unsigned char* c_tile, int cpitch, int wm, int m, int lane) {
  return smem_addr(c_tile + (32 * wm + 16 * m + (lane & 7) + ((lane >> 3) & 1) * 8) * cpitch + (lane >> 4) * 16);
}

template <Math kM>
__device__ __forceinline__ void load_c_frags(CFrags16& f, const unsigned char* c_tile, int wm, int lane) {
  if constexpr (Traits<kM>::k16) {
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const uint32_t base = c_frag_addr(c_tile, Traits<kM>::kCPitch, wm, m, lane);
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) ldmatrix_x4(f.a[m][ks], base + ks * 32);
    }
  }
}

// acc (this warp's 32 rows x kNtc 8-column tiles of one D-chunk) += C (32 x 64) . R_chunk (64 x chunk).
// Warp wd owns the 8-column tiles wd and wd + 4 of a 16-bit chunk, tile wd of an fp32 chunk.
template <Math kM, bool kHoisted>
__device__ __forceinline__ void dx_chunk(float (&acc)[2][Traits<kM>::kNtc][4], const CFrags16& cf,
                                         const unsigned char* c_tile, const unsigned char* rs, int wm, int wd,
                                         int lane) {
  using Tr = Traits<kM>;
  const int g = lane >> 2, t = lane & 3;
  if constexpr (Tr::k16) {
    const uint32_t rb =
        smem_addr(rs + ((lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + (wd + 4 * (lane >> 4)) * 16);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, rb + ks * 16 * kPitch);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        uint32_t a[4];
        if constexpr (kHoisted) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = cf.a[m][ks][i];
        } else {
          ldmatrix_x4(a, c_frag_addr(c_tile, Tr::kCPitch, wm, m, lane) + ks * 32);
        }
        mma_16816<kM == Math::kBf16>(acc[m][0], a, b[0], b[1]);
        mma_16816<kM == Math::kBf16>(acc[m][1], a, b[2], b[3]);
      }
    }
  } else if constexpr (kM == Math::kTf32) {
#pragma unroll
    for (int ks = 0; ks < 8; ++ks) {
      const float* r0 = reinterpret_cast<const float*>(rs + (8 * ks + t) * kPitch) + 8 * wd + g;
      const float* r1 = reinterpret_cast<const float*>(rs + (8 * ks + t + 4) * kPitch) + 8 * wd + g;
      const uint32_t b0 = to_tf32(__float_as_uint(*r0)), b1 = to_tf32(__float_as_uint(*r1));
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        uint32_t a[4];  // C was stored already rounded to tf32
        ldmatrix_x4(a, c_frag_addr(c_tile, Tr::kCPitch, wm, m, lane) + ks * 32);
        mma_1688_tf32(acc[m][0], a, b0, b1);
      }
    }
  } else {
#pragma unroll 4
    for (int j = 0; j < kBN; j += 4) {
      float4 cv[2][2];
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          cv[m][h] = *reinterpret_cast<const float4*>(c_tile + (32 * wm + 16 * m + g + 8 * h) * Tr::kCPitch + j * 4);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const float2 rv = *reinterpret_cast<const float2*>(rs + (j + jj) * kPitch + (8 * wd + 2 * t) * 4);
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float c = jj == 0 ? cv[m][h].x : jj == 1 ? cv[m][h].y : jj == 2 ? cv[m][h].z : cv[m][h].w;
            acc[m][0][2 * h] = fmaf(c, rv.x, acc[m][0][2 * h]);
            acc[m][0][2 * h + 1] = fmaf(c, rv.y, acc[m][0][2 * h + 1]);
          }
      }
    }
  }
}

// Stores the pair (c0, c1) of C at byte offset `off` of the C tile, in the operand format.
template <Math kM>
__device__ __forceinline__ void store_c_pair(unsigned char* c_tile, int off, float c0, float c1) {
  if constexpr (kM == Math::kBf16) {
    const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(c0)), hi = __bfloat16_as_ushort(__float2bfloat16_rn(c1));
    *reinterpret_cast<uint32_t*>(c_tile + off) = lo | (hi << 16);
  } else if constexpr (kM == Math::kF16) {
    const uint32_t lo = __half_as_ushort(__float2half_rn(c0)), hi = __half_as_ushort(__float2half_rn(c1));
    *reinterpret_cast<uint32_t*>(c_tile + off) = lo | (hi << 16);
  } else if constexpr (kM == Math::kTf32) {
    *reinterpret_cast<float2*>(c_tile + off) =
        make_float2(__uint_as_float(to_tf32(__float_as_uint(c0))), __uint_as_float(to_tf32(__float_as_uint(c1))));
  } else {
    *reinterpret_cast<float2*>(c_tile + off) = make_float2(c0, c1);
  }
}

// Grid (row tiles, splits of the columns, dX slices of D). Each CTA streams its column
// tiles; per tile: nk S-steps (one D-chunk each), the epilogue, then the dX steps of its
// slice. Chunk loads form one sequence q = 0, 1, ... (slot q % nbuf): issued `lookahead`
// ahead of use, one cp.async group each, so a slot is rewritten only after every warp has
// passed the barrier that follows its last use.
// The 512-column dX slice holds 128 accumulators per thread (one CTA per SM); the
// 128-column one is capped at 128 registers so two CTAs share an SM.
template <Math kM, int kND>
__global__ void __launch_bounds__(kThreads, kND == Traits<kM>::kNdSmall ? 2 : 1)
    contrastive_tiles_kernel(const Params p) {
  using Tr = Traits<kM>;
  constexpr int kMaxLimbs = Tr::k16 ? 3 : 1;  // fp32 rows never come in limbs
  extern __shared__ __align__(16) unsigned char smem[];
  const bool want_dx = p.dx != nullptr;
  unsigned char* r_ring = smem;
  unsigned char* x_ring = r_ring + p.nbuf * kBN * kPitch;
  unsigned char* c_tile = x_ring + p.xbuf * p.q_limbs * kBM * kPitch;
  double* red_loss = reinterpret_cast<double*>(c_tile + (want_dx ? kBM * Tr::kCPitch : 0));  // [2][kBM]
  int* red_cnt = reinterpret_cast<int*>(red_loss + 2 * kBM);                                  // [2][kBM][2]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wm_s = warp & 3, wn_s = warp >> 2;  // S / epilogue: 4 x 2 warps of 16 x 32
  const int wm_d = warp & 1, wd = warp >> 1;    // dX: 2 x 4 warps of 32 rows x (columns wd mod 4)
  const int64_t row0 = (int64_t)blockIdx.x * kBM;
  const int split = blockIdx.y, slice = blockIdx.z;
  const int64_t tile_begin = p.tiles * split / gridDim.y, tile_end = p.tiles * (split + 1) / gridDim.y;
  const int64_t ntiles = tile_end - tile_begin;
  const int chunk0 = slice * kND;  // first D-chunk of this CTA's dX slice
  const int nd = want_dx ? min(kND, p.nk - chunk0) : 0;
  const int64_t L = p.nk + ((want_dx && !p.r_resident) ? nd : 0);  // loads per tile
  const int64_t total = ntiles * L;

  auto issue = [&](int64_t q) {
    const int64_t tr = q / L;
    const int idx = (int)(q - tr * L);
    const bool s_load = idx < p.nk;
    const int chunk = s_load ? idx : chunk0 + (idx - p.nk);
    load_chunk<kM>(r_ring + (q % p.nbuf) * (kBN * kPitch), p.k, (tile_begin + tr) * kBN, p.ncols, chunk, p);
    if (s_load && (!p.x_resident || tr == 0)) {
      const int64_t xs = p.x_resident ? idx : (tr * p.nk + idx) % p.xbuf;
#pragma unroll
      for (int pt = 0; pt < kMaxLimbs; ++pt) {
        if (pt >= p.q_limbs) break;
        load_chunk<kM>(x_ring + (xs * p.q_limbs + pt) * (kBM * kPitch), p.q + pt * p.q_limb_bytes, row0, p.M,
                       chunk, p);
      }
    }
    cp_async_commit();
  };
  int64_t issued = 0;
  auto issue_upto = [&](int64_t last) {
    const int64_t end = min(last + 1, total);
    for (; issued < end; ++issued) issue(issued);
  };
  // Load q landed for this thread, then the barrier: for every thread, and every warp is
  // done with the steps before (their slots may be refilled after this).
  auto wait_for = [&](int64_t q) {
    cp_async_wait((int)(issued - 1 - q));
    __syncthreads();
  };

  // This lane's two rows of the S tile: 16 wm_s + g and + 8.
  int64_t row_g[2], row_self[2];
  int32_t row_lab[2];
  bool row_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_g[h] = row0 + 16 * wm_s + g + 8 * h;
    row_ok[h] = row_g[h] < p.M;
    row_lab[h] = row_ok[h] ? p.q_lab[row_g[h]] : 0;
    row_self[h] = (row_ok[h] && p.self_index && !p.self_on_cols) ? p.self_index[row_g[h]] : -1;
  }
  double loss_acc[2] = {0.0, 0.0};
  int npos[2] = {0, 0}, nneg[2] = {0, 0};
  float acc_dx[kND][2][Tr::kNtc][4];
#pragma unroll
  for (int d = 0; d < kND; ++d)
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < Tr::kNtc; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dx[d][m][n][e] = 0.f;
  constexpr bool kHoistC = Tr::k16 && kND > Tr::kNdSmall;
  CFrags16 cf;

  issue_upto(p.lookahead - 1);
  for (int64_t tr = 0; tr < ntiles; ++tr) {
    const int64_t col0 = (tile_begin + tr) * kBN;
    int32_t col_lab[4][2];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t col = col0 + 32 * wn_s + 8 * nt + 2 * t + c;
        col_lab[nt][c] = col < p.ncols ? p.k_lab[col] : 0;
      }

    float acc_s[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[nt][e] = 0.f;
    for (int k = 0; k < p.nk; ++k) {
      const int64_t q = tr * L + k;
      wait_for(q);
      issue_upto(q + p.lookahead);
      const int64_t xs = p.x_resident ? k : (tr * p.nk + k) % p.xbuf;
#pragma unroll
      for (int pt = 0; pt < kMaxLimbs; ++pt) {  // the limbs of x against the same R chunk
        if (pt >= p.q_limbs) break;
        s_chunk<kM>(acc_s, x_ring + (xs * p.q_limbs + pt) * (kBM * kPitch) + 16 * wm_s * kPitch,
                    r_ring + (q % p.nbuf) * (kBN * kPitch) + 32 * wn_s * kPitch, lane);
      }
    }

    // Epilogue: masks, loss, counts and C, all in registers.
    float partial[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      float cv[2][2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t col = col0 + 32 * wn_s + 8 * nt + 2 * t + c;
        const bool col_ok = col < p.ncols;
        const int64_t col_self = (col_ok && p.self_index && p.self_on_cols) ? p.self_index[col] : -2;
        const float cscale = (col_ok && p.col_scale) ? p.col_scale[col] : 1.f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float s = acc_s[nt][2 * h + c];
          const bool valid = row_ok[h] && col_ok && row_self[h] != col && col_self != row_g[h];
          const bool same = row_lab[h] == col_lab[nt][c];
          const bool pos = valid && same && s < p.pos_thr;
          const bool neg = valid && !same && s > p.margin;
          partial[h] += pos ? 1.f - s : (neg ? s : 0.f);
          npos[h] += pos;
          nneg[h] += neg;
          cv[h][c] = ((float)neg - (float)pos) * cscale;
        }
      }
      if (want_dx) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
          store_c_pair<kM>(c_tile, (16 * wm_s + g + 8 * h) * Tr::kCPitch + (32 * wn_s + 8 * nt + 2 * t) * Tr::kEsz,
                           cv[h][0], cv[h][1]);
      }
    }
    loss_acc[0] += partial[0];
    loss_acc[1] += partial[1];

    if (want_dx) {
      if (p.r_resident) {  // the tile's chunks are all staged: no barrier between dX steps
        __syncthreads();   // C tile complete
        issue_upto(tr * L + p.nk - 1 + p.lookahead);  // start the next tile's loads
        if constexpr (kHoistC) load_c_frags<kM>(cf, c_tile, wm_d, lane);
        const unsigned char* tile_slots = r_ring;
#pragma unroll
        for (int d = 0; d < kND; ++d) {
          if (d < nd) {
            dx_chunk<kM, kHoistC>(acc_dx[d], cf, c_tile, tile_slots + ((tr * L + d) % p.nbuf) * (kBN * kPitch), wm_d, wd,
                         lane);
          }
        }
      } else {
#pragma unroll
        for (int d = 0; d < kND; ++d) {
          if (d < nd) {
            const int64_t q = tr * L + p.nk + d;
            wait_for(q);  // the first one also publishes the C tile
            issue_upto(q + p.lookahead);
            if constexpr (kHoistC) {
              if (d == 0) load_c_frags<kM>(cf, c_tile, wm_d, lane);
            }
            dx_chunk<kM, kHoistC>(acc_dx[d], cf, c_tile, r_ring + (q % p.nbuf) * (kBN * kPitch), wm_d, wd, lane);
          }
        }
      }
    }
  }

  // Row sums: the 4 lanes of a row, then the two column halves of the tile, in that order.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      loss_acc[h] += __shfl_xor_sync(0xffffffffu, loss_acc[h], o);
      npos[h] += __shfl_xor_sync(0xffffffffu, npos[h], o);
      nneg[h] += __shfl_xor_sync(0xffffffffu, nneg[h], o);
    }
    if (t == 0) {
      const int r = 16 * wm_s + g + 8 * h;
      red_loss[wn_s * kBM + r] = loss_acc[h];
      red_cnt[(wn_s * kBM + r) * 2] = npos[h];
      red_cnt[(wn_s * kBM + r) * 2 + 1] = nneg[h];
    }
  }
  __syncthreads();
  if (p.loss_ws && slice == 0 && tid < kBM && row0 + tid < p.M) {
    const int64_t o = (int64_t)split * p.M + row0 + tid;
    p.loss_ws[o] = red_loss[tid] + red_loss[kBM + tid];
    p.cnt_ws[2 * o] = red_cnt[2 * tid] + red_cnt[2 * (kBM + tid)];
    p.cnt_ws[2 * o + 1] = red_cnt[2 * tid + 1] + red_cnt[2 * (kBM + tid) + 1];
  }

  if (want_dx) {
    float* out = p.dx + split * p.dx_split_stride;
    const bool pairs = (p.D & 1) == 0;  // float2 stores stay 8-byte aligned
#pragma unroll
    for (int d = 0; d < kND; ++d) {
      if (d >= nd) continue;
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t row = row0 + 32 * wm_d + 16 * m + g + 8 * h;
          if (row >= p.M) continue;
          const float scale = p.row_scale ? p.row_scale[row] : 1.f;
#pragma unroll
          for (int n = 0; n < Tr::kNtc; ++n) {
            const int64_t col = (int64_t)(chunk0 + d) * Tr::kElems + 8 * (wd + 4 * n) + 2 * t;
            const float v0 = acc_dx[d][m][n][2 * h] * scale, v1 = acc_dx[d][m][n][2 * h + 1] * scale;
            float* dst = out + row * p.D + col;
            if (pairs && col + 1 < p.D) {
              *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
            } else {
              if (col < p.D) dst[0] = v0;
              if (col + 1 < p.D) dst[1] = v1;
            }
          }
        }
    }
  }
}

// Second stage, fixed order over the splits: per-row loss (double partials) and counts.
__global__ void contrastive_merge_rows_kernel(const double* loss_ws, const int32_t* cnt_ws, int splits,
                                              int64_t M, float* loss, int32_t* counts) {
  const int64_t row = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= M) return;
  double s = 0.0;
  int32_t np = 0, nn = 0;
  for (int sp = 0; sp < splits; ++sp) {
    s += loss_ws[sp * M + row];
    np += cnt_ws[2 * (sp * M + row)];
    nn += cnt_ws[2 * (sp * M + row) + 1];
  }
  if (loss) loss[row] = (float)s;
  if (counts) {
    counts[2 * row] = np;
    counts[2 * row + 1] = nn;
  }
}

// Second stage for dX: out[e] = sum over splits in order of ws[s][e].
__global__ void contrastive_merge_grad_kernel(const float* ws, int splits, int64_t n, float* out) {
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    float s = ws[e];
    for (int sp = 1; sp < splits; ++sp) s += ws[sp * n + e];
    out[e] = s;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Plan {
  int64_t mtiles, tiles;
  int splits, slices;
  bool large;  // dX slices of 512 columns of D instead of 128
  size_t smem;
};

struct Job {  // one launch of the tile kernel: rows q against streamed columns k
  Tensor q, k;  // same dtype, contiguous; q is (limbs, M, D) when the rows come in limbs
  int64_t ncols;
  const int32_t* q_lab;
  const int32_t* k_lab;
  const int64_t* self_index;
  bool self_on_cols;
  const float* row_scale;
  const float* col_scale;
  float margin, pos_thr;
  float* loss;       // (M,) or null
  int32_t* counts;   // (M, 2) or null
  float* dx;         // (M, D) or null
};

template <Math kM, int kND>
void launch_tiles(Params p, const Plan& plan, const Job& job, cudaStream_t stream) {
  auto kernel = contrastive_tiles_kernel<kM, kND>;
  if (plan.smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)plan.smem));
  }
  const int64_t M = p.M, D = p.D;
  const bool ws_rows = job.loss || job.counts;
  const auto opts = job.q.options();
  Tensor loss_ws, cnt_ws, dx_ws;
  if (ws_rows) {
    loss_ws = at::empty({plan.splits, M}, opts.dtype(at::kDouble));
    cnt_ws = at::empty({plan.splits, M, 2}, opts.dtype(at::kInt));
    p.loss_ws = loss_ws.data_ptr<double>();
    p.cnt_ws = cnt_ws.data_ptr<int32_t>();
  }
  if (job.dx && plan.splits > 1) {
    dx_ws = at::empty({plan.splits, M, D}, opts.dtype(at::kFloat));
    p.dx = dx_ws.data_ptr<float>();
    p.dx_split_stride = M * D;
  } else {
    p.dx = job.dx;
    p.dx_split_stride = 0;
  }
  const dim3 grid((unsigned)plan.mtiles, (unsigned)plan.splits, (unsigned)plan.slices);
  kernel<<<grid, kThreads, plan.smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (ws_rows) {
    contrastive_merge_rows_kernel<<<(unsigned)ceil_div(M, 256), 256, 0, stream>>>(p.loss_ws, p.cnt_ws, plan.splits,
                                                                                 M, job.loss, job.counts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (job.dx && plan.splits > 1 && M * D > 0) {
    const int64_t blocks = std::min<int64_t>(ceil_div(M * D, 256), 65536);
    contrastive_merge_grad_kernel<<<(unsigned)blocks, 256, 0, stream>>>(p.dx, plan.splits, M * D, job.dx);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <Math kM>
void run_job(const Job& job, int device, cudaStream_t stream) {
  using Tr = Traits<kM>;
  const int64_t M = job.q.size(-2), D = job.q.size(-1);
  const int q_limbs = job.q.dim() == 3 ? (int)job.q.size(0) : 1;
  const bool want_dx = job.dx != nullptr;
  int sms = 0, smem_optin = 0, smem_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));

  Params p{};
  p.q = static_cast<const char*>(job.q.data_ptr());
  p.k = static_cast<const char*>(job.k.data_ptr());
  p.M = M;
  p.ncols = job.ncols;
  p.D = D;
  p.row_bytes = D * Tr::kEsz;
  p.q_limbs = q_limbs;
  p.q_limb_bytes = M * p.row_bytes;
  p.q_lab = job.q_lab;
  p.k_lab = job.k_lab;
  p.self_index = job.self_index;
  p.self_on_cols = job.self_on_cols ? 1 : 0;
  p.row_scale = job.row_scale;
  p.col_scale = job.col_scale;
  p.margin = job.margin;
  p.pos_thr = job.pos_thr;
  p.nk = (int)std::max<int64_t>(1, ceil_div(p.row_bytes, kChunkBytes));
  p.vec_ok = D > 0 && p.row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(p.q) % 16 == 0 &&
             reinterpret_cast<uintptr_t>(p.k) % 16 == 0;

  Plan plan{};
  plan.mtiles = ceil_div(M, kBM);
  plan.tiles = ceil_div(job.ncols, kBN);
  p.tiles = plan.tiles;
  plan.large = want_dx && p.nk > Tr::kNdSmall;
  const int nd_max = plan.large ? Tr::kNdLarge : Tr::kNdSmall;
  plan.slices = want_dx ? (int)ceil_div(p.nk, nd_max) : 1;

  // Shared memory: keep the whole tile staged for its dX when it fits (one slice only),
  // then keep the CTA rows staged when that fits too; otherwise stream (L2 re-reads).
  // The small variant stays within half an SM so two CTAs fit.
  const size_t c_bytes = want_dx ? (size_t)kBM * Tr::kCPitch : 0;
  auto bytes = [&](int nbuf, int xbuf) {
    return (size_t)(nbuf * kBN + xbuf * q_limbs * kBM) * kPitch + c_bytes + kRedBytes;
  };
  const size_t full = (size_t)std::max(smem_optin, 48 * 1024);
  const size_t half = std::min(full, (size_t)std::max(smem_sm / 2 - 1024, 0));
  auto place = [&](size_t budget) {
    for (int resident = 1; resident >= 0; --resident) {
      if (resident && !(want_dx && plan.slices == 1)) continue;
      for (int la = 3; la >= 2; --la) {
        const int nbuf = resident ? p.nk + la : la + 1;
        if (bytes(nbuf, la + 1) > budget) continue;
        const bool x_res = bytes(nbuf, p.nk) <= budget;
        p.lookahead = la;
        p.nbuf = nbuf;
        p.r_resident = resident;
        p.x_resident = x_res ? 1 : 0;
        p.xbuf = x_res ? p.nk : la + 1;
        plan.smem = bytes(p.nbuf, p.xbuf);
        return true;
      }
    }
    return false;
  };
  const bool placed = (!plan.large && place(half)) || place(full);
  TORCH_CHECK(placed, "contrastive (cuda): no tile configuration fits in ", full, " bytes of shared memory");

  // Split the columns across CTAs (Flash-Decoding) until the GPU has ~2 CTAs per SM, with
  // at least 2 tiles per split and the dX workspace kept under ~64 MiB.
  int64_t splits = ceil_div(2 * (int64_t)sms, plan.mtiles * plan.slices);
  splits = std::min(splits, ceil_div(plan.tiles, 2));
  if (want_dx && M * D > 0) splits = std::min<int64_t>(splits, std::max<int64_t>(1, (int64_t{64} << 20) / (4 * M * D)));
  plan.splits = (int)std::max<int64_t>(1, std::min<int64_t>(splits, 65535));
  TORCH_CHECK(plan.mtiles <= INT32_MAX && plan.slices <= 65535, "contrastive (cuda): problem too large for the grid");

  if (plan.large) {
    launch_tiles<kM, Tr::kNdLarge>(p, plan, job, stream);
  } else {
    launch_tiles<kM, Tr::kNdSmall>(p, plan, job, stream);
  }
}

void run(const Job& job, bool allow_tf32, int device, cudaStream_t stream) {
  switch (job.k.scalar_type()) {
    case at::kBFloat16: return run_job<Math::kBf16>(job, device, stream);
    case at::kHalf: return run_job<Math::kF16>(job, device, stream);
    case at::kFloat:
      return allow_tf32 ? run_job<Math::kTf32>(job, device, stream) : run_job<Math::kF32>(job, device, stream);
    default: TORCH_CHECK(false, "ref: expected float32, float16 or bfloat16, got ", job.k.scalar_type());
  }
}

struct Prepared {
  Tensor xq, ref, y, z, self_idx;  // x in the operand dtype ((limbs, B, D) when limbed); all contiguous
  Tensor x;                        // x as given (contiguous), for the fp32 transposed pass of anchors in limbs
  bool limbed;                     // x is another dtype than a 16-bit ref: xq holds its 16-bit limbs
  int64_t B, D, n;
  const int64_t* self_ptr() const { return self_idx.defined() ? self_idx.data_ptr<int64_t>() : nullptr; }
};

Prepared prepare(const Tensor& x, const Tensor& labels, const Tensor& ref, const Tensor& ref_labels,
                 const c10::optional<Tensor>& self_index, int64_t ref_valid) {
  check_loss_args(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(x.is_cuda(), "x: expected a CUDA tensor, got ", x.device());
  if (self_index.has_value()) {
    TORCH_CHECK(self_index->device() == x.device(), "self_index: must be on ", x.device());
  }
  const auto rt = ref.scalar_type();
  TORCH_CHECK(rt == at::kFloat || rt == at::kHalf || rt == at::kBFloat16,
              "ref: expected float32, float16 or bfloat16, got ", rt);
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index()));
  TORCH_CHECK(major >= 8, "contrastive (cuda): needs compute capability 8.0 or newer (mma.sync), got ", major, ".x");
  Prepared in;
  in.ref = ref.detach().contiguous();
  in.x = x.detach().contiguous();
  // 16-bit memory: the anchors feed the tensor cores in its dtype: as they are when they
  // have it, else as 16-bit limbs hi + mid (+ lo), each the rounding of what the previous
  // ones leave (exact in fp32), 2 limbs for fp16 (22 bits), 3 for bf16 (24).
  in.limbed = rt != at::kFloat && x.scalar_type() != rt;
  if (in.limbed) {
    const int limbs = rt == at::kHalf ? 2 : 3;
    Tensor rest = in.x.to(at::kFloat);
    std::vector<Tensor> xs;
    for (int k = 0; k < limbs; ++k) {
      xs.push_back(rest.to(rt));
      if (k + 1 < limbs) rest = rest.sub(xs.back().to(at::kFloat));
    }
    in.xq = at::stack(xs);
  } else {
    in.xq = in.x.to(rt).contiguous();
  }
  in.y = labels.contiguous();
  in.z = ref_labels.contiguous();
  if (self_index.has_value()) in.self_idx = self_index->contiguous();
  in.B = x.size(0);
  in.D = x.size(1);
  in.n = ref_valid;
  return in;
}

using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

std::tuple<Tensor, Tensor, Tensor> contrastive_fwd_cuda(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                        const Tensor& ref_labels,
                                                        const c10::optional<Tensor>& self_index, int64_t ref_valid,
                                                        double margin, double pos_eps, bool need_grad,
                                                        bool allow_tf32) {
  BelowAutograd below;
  c10::cuda::CUDAGuard guard(x.device());
  const Prepared in = prepare(x, labels, ref, ref_labels, self_index, ref_valid);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor loss = at::empty({in.B}, f32);
  Tensor counts = at::empty({in.B, 2}, f32.dtype(at::kInt));
  Tensor grad = need_grad ? at::empty({in.B, in.D}, f32) : at::empty({0}, f32);
  if (in.B == 0) return {loss, grad, counts};
  Job job{in.xq, in.ref, in.n, in.y.data_ptr<int32_t>(), in.z.data_ptr<int32_t>(), in.self_ptr(), false,
          nullptr, nullptr, static_cast<float>(margin), static_cast<float>(1.0 - pos_eps),
          loss.data_ptr<float>(), counts.data_ptr<int32_t>(), need_grad ? grad.data_ptr<float>() : nullptr};
  run(job, allow_tf32, x.device().index(), c10::cuda::getCurrentCUDAStream().stream());
  return {loss, grad, counts};
}

std::tuple<Tensor, Tensor> contrastive_bwd_cuda(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                                int64_t ref_valid, double margin, double pos_eps,
                                                const Tensor& grad_rows, bool allow_tf32) {
  BelowAutograd below;
  c10::cuda::CUDAGuard guard(x.device());
  const Prepared in = prepare(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  TORCH_CHECK(grad_rows.device() == x.device(), "grad_rows: must be on ", x.device());
  const Tensor g = grad_rows.detach().to(at::kFloat).contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor grad_x = at::empty({in.B, in.D}, f32);
  Tensor grad_ref = at::empty({ref.size(0), in.D}, f32);
  if (in.n < ref.size(0)) grad_ref.narrow(0, in.n, ref.size(0) - in.n).zero_();  // rows >= ref_valid
  const float m = static_cast<float>(margin), thr = static_cast<float>(1.0 - pos_eps);
  const int dev = x.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (in.B > 0) {  // grad_x_i = g_i sum_j c_ij r_j
    Job jx{in.xq, in.ref, in.n, in.y.data_ptr<int32_t>(), in.z.data_ptr<int32_t>(), in.self_ptr(), false,
           g.data_ptr<float>(), nullptr, m, thr, nullptr, nullptr, grad_x.data_ptr<float>()};
    run(jx, allow_tf32, dev, stream);
  }
  if (in.n > 0) {  // grad_ref_j = sum_i g_i c_ij x_i: the transposed problem over the first n rows
    // Anchors in limbs (fp32 x, a 16-bit ref that requires grad: rare) run it in fp32, so S
    // and the product with x keep fp32 accuracy.
    const Tensor ref_rows = in.limbed ? in.ref.narrow(0, 0, in.n).to(at::kFloat) : in.ref.narrow(0, 0, in.n);
    const Tensor cols = in.limbed ? in.x.to(at::kFloat) : in.xq;
    Job jr{ref_rows, cols, in.B, in.z.data_ptr<int32_t>(), in.y.data_ptr<int32_t>(), in.self_ptr(), true,
           nullptr, g.data_ptr<float>(), m, thr, nullptr, nullptr, grad_ref.data_ptr<float>()};
    run(jr, allow_tf32, dev, stream);
  }
  return {grad_x, grad_ref};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(xbm_kernels, CUDA, m) {
  m.impl("contrastive_fwd", &cuda::contrastive_fwd_cuda);
  m.impl("contrastive_bwd", &cuda::contrastive_bwd_cuda);
}

}  // namespace xbm_kernels
