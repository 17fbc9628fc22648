// Each anchor's same-label columns, found by label, and their S by one dot product each:
// the "positives first" step of the losses that know their few positives before the pass
// over the memory (multi_similarity with mining, triplet_all). Shared by their CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/simd.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace cpu {

// Anchor i's same-label valid columns (ascending) and their S, one dot product each. A
// candidate is a positive exactly when its S < 1 - pos_eps (the others, same-label columns
// at least that close to the anchor, are in neither set).
struct SameLabel {
  std::vector<int64_t> start;  // B + 1 offsets into col and s
  std::vector<int64_t> col;
  std::vector<float> s;
};

// Finds the candidates by label with one scan of the reference labels (an open-addressing
// table of the batch's labels). With `capped`, returns false, finding nothing, when they are
// more than 1/32 of the B x n pairs (the cut-off of cpu::add_sparse_rows): their dot products would cost
// more than the statistics pass they replace. Decided from the labels alone, so the forward
// and the backward take the same path.
inline bool find_candidates(const LossInputs& in, SameLabel& out, bool capped = true) {
  const int64_t B = in.B, n = in.n;
  const int32_t* y = in.y_ptr();
  const int32_t* z = in.z_ptr();
  std::vector<int32_t> labs(y, y + B);
  std::sort(labs.begin(), labs.end());
  labs.erase(std::unique(labs.begin(), labs.end()), labs.end());
  const int64_t U = static_cast<int64_t>(labs.size());
  int bits = 4;
  while ((int64_t{1} << bits) < 2 * U) ++bits;
  const uint32_t mask = (uint32_t{1} << bits) - 1;
  auto slot = [&](int32_t v) { return (static_cast<uint32_t>(v) * 0x9E3779B1u) >> (32 - bits); };
  std::vector<int32_t> table(size_t{1} << bits, -1);  // label index, -1 empty
  for (int64_t u = 0; u < U; ++u) {
    uint32_t h = slot(labs[u]);
    while (table[h] >= 0) h = (h + 1) & mask;
    table[h] = static_cast<int32_t>(u);
  }
  auto find = [&](int32_t v) -> int64_t {
    for (uint32_t h = slot(v);; h = (h + 1) & mask) {
      const int32_t u = table[h];
      if (u < 0 || labs[u] == v) return u;
    }
  };
  // Columns per batch label, in column order (CSR).
  std::vector<int64_t> lab_start(U + 1, 0);
  std::vector<int32_t> col_lab(n);
  for (int64_t j = 0; j < n; ++j) {
    col_lab[j] = static_cast<int32_t>(find(z[j]));
    if (col_lab[j] >= 0) ++lab_start[col_lab[j] + 1];
  }
  for (int64_t u = 0; u < U; ++u) lab_start[u + 1] += lab_start[u];
  int64_t total = 0;
  std::vector<int64_t> anchor_lab(B);
  for (int64_t i = 0; i < B; ++i) {
    anchor_lab[i] = std::lower_bound(labs.begin(), labs.end(), y[i]) - labs.begin();
    total += lab_start[anchor_lab[i] + 1] - lab_start[anchor_lab[i]];
  }
  if (capped && total * 32 > B * n) return false;
  std::vector<int64_t> lab_cols(lab_start[U]);
  {
    std::vector<int64_t> fill(lab_start.begin(), lab_start.end() - 1);
    for (int64_t j = 0; j < n; ++j)
      if (col_lab[j] >= 0) lab_cols[fill[col_lab[j]]++] = j;
  }
  out.start.assign(1, 0);
  out.col.clear();
  out.col.reserve(total);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t self_col = in.self_col(i);
    for (int64_t k = lab_start[anchor_lab[i]]; k < lab_start[anchor_lab[i] + 1]; ++k)
      if (lab_cols[k] != self_col) out.col.push_back(lab_cols[k]);
    out.start.push_back(static_cast<int64_t>(out.col.size()));
  }
  out.s.assign(out.col.size(), 0.f);
  return true;
}

// Row j of the reference as fp32: the row itself, or converted into buf.
inline const float* ref_row(const at::Tensor& ref, int64_t j, int64_t D, float* buf) {
  switch (ref.scalar_type()) {
    case at::kFloat:
      return ref.data_ptr<float>() + j * D;
    case at::kBFloat16: {
      const at::BFloat16* r = ref.data_ptr<at::BFloat16>() + j * D;
      for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(r[d]);
      return buf;
    }
    default: {
      const at::Half* r = ref.data_ptr<at::Half>() + j * D;
      for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<float>(r[d]);
      return buf;
    }
  }
}

// The candidates of find_candidates with their S (cpu::dot of the fp32 anchor and the fp32
// value of the row: the same fp32 products as the GEMM's, in a fixed order of its own).
inline bool gather_same_label(const LossInputs& in, SameLabel& pos, bool capped = true) {
  if (!find_candidates(in, pos, capped)) return false;
  const float* x = in.x32.data_ptr<float>();
  const int64_t D = in.D;
  at::parallel_for(0, in.B, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(D);
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t k = pos.start[i]; k < pos.start[i + 1]; ++k)
        pos.s[k] = dot(x + i * D, ref_row(in.ref, pos.col[k], D, buf.data()), D);
  });
  return true;
}

// Whether the candidates are few: at most 1/32 of the B x n pairs (find_candidates' cap).
inline bool few_candidates(const LossInputs& in, const SameLabel& pos) {
  return static_cast<int64_t>(pos.col.size()) * 32 <= in.B * in.n;
}

// Per anchor label: fn(anchors, cols, a0, a1, k_slot) for its anchors (order[a0, a1), an int64
// tensor of them) and the union of their candidates, kLabelBlock columns at a time (cols, an
// int64 tensor); k_slot(a, k) is candidate k of anchor order[a]'s place in the block, or -1.
constexpr int64_t kLabelBlock = 2048;  // columns per product: (anchors of the label) x kLabelBlock fp32

template <typename Fn>
inline void for_each_label_block(const LossInputs& in, const SameLabel& pos, const Fn& fn) {
  const int64_t B = in.B;
  const int32_t* y = in.y_ptr();
  std::vector<int64_t> order(B);
  for (int64_t i = 0; i < B; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return y[a] < y[b]; });
  std::vector<int64_t> slot(in.n, -1);  // a column's place among the label's columns
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  for (int64_t g0 = 0; g0 < B;) {
    int64_t g1 = g0;
    while (g1 < B && y[order[g1]] == y[order[g0]]) ++g1;
    std::vector<int64_t> cols;  // the union of the group's candidates (each anchor's: all but its own)
    for (int64_t a = g0; a < g1; ++a)
      for (int64_t k = pos.start[order[a]]; k < pos.start[order[a] + 1]; ++k)
        if (slot[pos.col[k]] < 0) {
          slot[pos.col[k]] = static_cast<int64_t>(cols.size());
          cols.push_back(pos.col[k]);
        }
    const at::Tensor anchors = at::from_blob(order.data() + g0, {g1 - g0}, i64).clone();
    const int64_t m = static_cast<int64_t>(cols.size());
    for (int64_t c0 = 0; c0 < m; c0 += kLabelBlock) {
      const int64_t w = std::min(kLabelBlock, m - c0);
      const at::Tensor block = at::from_blob(cols.data() + c0, {w}, i64).clone();
      fn(anchors, block, [&](int64_t a, int64_t k) {
        const int64_t j = slot[pos.col[k]] - c0;
        return j >= 0 && j < w ? j : int64_t{-1};
      }, order.data(), g0, g1);
    }
    for (int64_t c : cols) slot[c] = -1;
    g0 = g1;
  }
}

// The candidates of find_candidates with their S for any number of them: gather_same_label's
// dot products where they are few, else one product per label (its anchors against its
// columns, a block at a time): the same fp32 products at the GEMM's rate where a label's
// columns are many (a memory of few labels).
inline void gather_same_label_uncapped(const LossInputs& in, SameLabel& pos) {
  if (gather_same_label(in, pos, /*capped=*/true)) return;
  find_candidates(in, pos, /*capped=*/false);
  for_each_label_block(in, pos, [&](const at::Tensor& anchors, const at::Tensor& cols, const auto& k_slot,
                                    const int64_t* order, int64_t g0, int64_t g1) {
    const at::Tensor sg = at::mm(in.x32.index_select(0, anchors), in.ref.index_select(0, cols).to(at::kFloat).t());
    const float* sp = sg.data_ptr<float>();
    const int64_t w = cols.size(0);
    for (int64_t a = g0; a < g1; ++a)
      for (int64_t k = pos.start[order[a]]; k < pos.start[order[a] + 1]; ++k) {
        const int64_t j = k_slot(a, k);
        if (j >= 0) pos.s[k] = sp[(a - g0) * w + j];
      }
  });
}

// out (B x D, fp32) += sum over each anchor's candidates k of coef[k] r_{col k}: row adds where
// the candidates are few, else per label one product of the coefficients (its anchors x its
// columns, a block at a time) and the rows.
inline void add_candidate_rows(const LossInputs& in, const SameLabel& pos, const std::vector<float>& coef,
                               at::Tensor out) {
  const int64_t D = in.D;
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.scalar_type() == at::kFloat);
  if (few_candidates(in, pos)) {
    float* o = out.data_ptr<float>();
    at::parallel_for(0, in.B, 16, [&](int64_t i0, int64_t i1) {
      std::vector<float> buf(D);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t k = pos.start[i]; k < pos.start[i + 1]; ++k) {
          if (coef[k] == 0.f) continue;
          const float* rk = ref_row(in.ref, pos.col[k], D, buf.data());
          for (int64_t d = 0; d < D; ++d) o[i * D + d] += coef[k] * rk[d];
        }
    });
    return;
  }
  for_each_label_block(in, pos, [&](const at::Tensor& anchors, const at::Tensor& cols, const auto& k_slot,
                                    const int64_t* order, int64_t g0, int64_t g1) {
    const int64_t w = cols.size(0);
    at::Tensor cg = at::zeros({g1 - g0, w}, out.options());
    float* cp = cg.data_ptr<float>();
    for (int64_t a = g0; a < g1; ++a)
      for (int64_t k = pos.start[order[a]]; k < pos.start[order[a] + 1]; ++k) {
        const int64_t j = k_slot(a, k);
        if (j >= 0) cp[(a - g0) * w + j] = coef[k];
      }
    // the label's anchors are distinct rows: added in place, in order (index_add_ would open an
    // OpenMP region per label block, which costs milliseconds on a busy machine)
    const at::Tensor prod = at::mm(cg, in.ref.index_select(0, cols).to(at::kFloat));
    const float* pp = prod.data_ptr<float>();
    float* o = out.data_ptr<float>();
    for (int64_t a = g0; a < g1; ++a)
      for (int64_t d = 0; d < D; ++d) o[order[a] * D + d] += pp[(a - g0) * D + d];
  });
}

}  // namespace cpu
}  // namespace xbm_kernels
