// Fused batch-hard triplet loss over a reference set on the CPU (CONTRACT.md section 1):
//   l_i = max(0, max_{N_i} S_ij - min_{P_i} S_ij + margin), 0 if P_i or N_i is empty.
// One pass streams the reference for the hardest positive and negative per row (value and
// column; the lowest column wins ties, within a tile by scanning in order and across
// splits by merging in column order). The gradient is then two gathered rows:
// dl_i/dx_i = r_an - r_ap for active rows.
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/simd.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Hardest {
  Tensor pos_val, neg_val;  // (B,) f32
  Tensor pos_idx, neg_idx;  // (B,) int64, -1 when the set is empty
};

#if XBM_CPU_VECTOR
// The least (kMax: greatest) lane of v, v holding floats (no NaN) or int32: lane-wise over
// halves down to 4 lanes (vector instructions), then the last 4. The order of a min/max does
// not change its value, except that of -0 and +0: callers read the winner back by its column.
template <bool kMax, int L, class T>
XBM_INLINE auto lane_extreme(T v) {
  if constexpr (L > 4) {
    constexpr bool is_float = std::is_same_v<std::remove_cv_t<std::remove_reference_t<decltype(v[0])>>, float>;
    typedef std::conditional_t<is_float, typename cpu::Lanes<L / 2>::F, typename cpu::Lanes<L / 2>::I> H;
    H lo, hi;
    std::memcpy(&lo, &v, sizeof(H));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return lane_extreme<kMax, L / 2>(kMax ? (hi > lo ? hi : lo) : (hi < lo ? hi : lo));
  } else {
    auto pick = [](auto a, auto b) { return kMax ? std::max(a, b) : std::min(a, b); };
    return pick(pick(v[0], v[1]), pick(v[2], v[3]));
  }
}

// One row of hardest_tile with every column valid, L lanes at a time (simd.h, the CPU's
// widest). Each lane keeps its first extreme (strict comparisons, columns visited in order);
// the lanes then merge by value and, among equal values, by the lowest column; the tile's
// result replaces the running one only when strictly better, so the lowest column wins ties
// overall.
template <int L>
XBM_INLINE void hardest_row_vec(const float* row, int64_t w, int64_t c0, const int32_t* z, int32_t yi, float pos_thr,
                                float& pv, int64_t& pi, float& nv, int64_t& ni) {
  using V = cpu::Vec<L>;
  using F = typename V::F;
  using I = typename V::I;
  alignas(64) static constexpr int32_t kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  F pl = V::splat(kInf), nl = V::splat(-kInf);
  I pj = I{} - 1, nj = pj, col = V::load(kIota);
  int64_t j = 0;
  for (; j + L <= w; j += L, col += L) {
    const F v = V::load(row + j);
    const I same = V::eq(V::load(z + j), yi);
    const I better_p = same & V::lt(v, pos_thr) & V::lt(v, pl);
    const I better_n = ~same & V::gt(v, nl);
    pl = V::select(better_p, v, pl);
    pj = (better_p & col) | (~better_p & pj);
    nl = V::select(better_n, v, nl);
    nj = (better_n & col) | (~better_n & nj);
  }
  // A lane that found a positive holds a value below +inf (strict v < +inf), a negative one
  // above -inf: the lanes' extreme is that of the found ones; the winner is the lowest column
  // among the lanes holding it (a lane's column is -1 only where it holds the initial
  // infinity), its value read back from the row.
  const int32_t none = std::numeric_limits<int32_t>::max();
  const float pmin = lane_extreme<false, L>(pl), nmax = lane_extreme<true, L>(nl);
  const I pc = V::eq(pl, pmin) & V::gt(pj, -1), nc = V::eq(nl, nmax) & V::gt(nj, -1);
  const int32_t bpj = lane_extreme<false, L>((pc & pj) | (~pc & none));
  const int32_t bnj = lane_extreme<false, L>((nc & nj) | (~nc & none));
  float bp = kInf, bn = -kInf;
  int64_t bpc = -1, bnc = -1;
  if (bpj != none) bp = row[bpj], bpc = bpj;
  if (bnj != none) bn = row[bnj], bnc = bnj;
  for (; j < w; ++j) {  // the last columns come after every lane's columns
    const float v = row[j];
    if (z[j] == yi) {
      if (v < pos_thr && v < bp) bp = v, bpc = j;
    } else if (v > bn) {
      bn = v, bnc = j;
    }
  }
  if (bpc >= 0 && bp < pv) pv = bp, pi = c0 + bpc;
  if (bnc >= 0 && bn > nv) nv = bn, ni = c0 + bnc;
}
#endif

// The hardest positive and negative of each row of the tile s (B x w), merged into the running
// (pv, pi, nv, ni) of the split.
template <int L>
XBM_INLINE void hardest_tile_lanes(const float* s, int64_t B, int64_t w, int64_t c0, const int32_t* y,
                                   const int32_t* z, const int64_t* self_idx, float pos_thr, float* pv, int64_t* pi,
                                   float* nv, int64_t* ni) {
  for (int64_t i = 0; i < B; ++i) {
    const float* row = s + i * w;
    const int64_t self_col = self_idx ? self_idx[i] - c0 : -1;
#if XBM_CPU_VECTOR
    if (self_col < 0 || self_col >= w) {  // every column valid
      hardest_row_vec<L>(row, w, c0, z, y[i], pos_thr, pv[i], pi[i], nv[i], ni[i]);
      continue;
    }
#endif
    for (int64_t j = 0; j < w; ++j) {
      if (j == self_col) continue;
      const float v = row[j];
      if (z[j] == y[i]) {
        if (v < pos_thr && v < pv[i]) pv[i] = v, pi[i] = c0 + j;  // strict: first column wins ties
      } else if (v > nv[i]) {
        nv[i] = v, ni[i] = c0 + j;
      }
    }
  }
}
XBM_CPU_DISPATCH(void, hardest_tile,
                 (const float* s, int64_t B, int64_t w, int64_t c0, const int32_t* y, const int32_t* z,
                  const int64_t* self_idx, float pos_thr, float* pv, int64_t* pi, float* nv, int64_t* ni),
                 (s, B, w, c0, y, z, self_idx, pos_thr, pv, pi, nv, ni))

Hardest find_hardest(const cpu::LossInputs& in, float pos_thr) {
  const int64_t B = in.B;
  const auto plan = cpu::plan_tiles(B, in.n);
  const auto f32 = in.x32.options();
  cpu::ScratchPool scratch(in, plan);
  Tensor pv = at::full({plan.splits, B}, kInf, f32), nv = at::full({plan.splits, B}, -kInf, f32);
  Tensor pi = at::full({plan.splits, B}, -1, f32.dtype(at::kLong)), ni = at::full({plan.splits, B}, -1, pi.options());
  cpu::for_each_tile(plan, in.n, [&](int64_t p, int64_t c0, int64_t w) {
    Tensor st = scratch[p].similarity(in, c0, w);
    hardest_tile(st.data_ptr<float>(), B, w, c0, in.y_ptr(), in.z_ptr() + c0, in.self_ptr(), pos_thr,
                 pv[p].data_ptr<float>(), pi[p].data_ptr<int64_t>(), nv[p].data_ptr<float>(),
                 ni[p].data_ptr<int64_t>());
  });
  // Splits hold increasing column ranges: merging in order with strict comparisons
  // keeps the lowest column among equal values.
  Hardest h{pv[0].clone(), nv[0].clone(), pi[0].clone(), ni[0].clone()};
  float* hpv = h.pos_val.data_ptr<float>();
  float* hnv = h.neg_val.data_ptr<float>();
  int64_t* hpi = h.pos_idx.data_ptr<int64_t>();
  int64_t* hni = h.neg_idx.data_ptr<int64_t>();
  for (int64_t p = 1; p < plan.splits; ++p) {
    const float* ppv = pv[p].data_ptr<float>();
    const float* pnv = nv[p].data_ptr<float>();
    const int64_t* ppi = pi[p].data_ptr<int64_t>();
    const int64_t* pni = ni[p].data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      if (ppv[i] < hpv[i]) hpv[i] = ppv[i], hpi[i] = ppi[i];
      if (pnv[i] > hnv[i]) hnv[i] = pnv[i], hni[i] = pni[i];
    }
  }
  return h;
}

// r_an - r_ap per row, scaled by `weight` (B,): 0 where it is 0. Inactive rows gather row 0,
// so an empty reference set (no row to gather, and no active row) gives zeros directly.
Tensor hinge_direction(const cpu::LossInputs& in, const Hardest& h, const Tensor& weight) {
  if (in.ref.size(0) == 0) return at::zeros({in.B, in.D}, weight.options().dtype(at::kFloat));
  Tensor ap = h.pos_idx.clamp_min(0), an = h.neg_idx.clamp_min(0);
  return (in.ref.index_select(0, an).to(at::kFloat) - in.ref.index_select(0, ap).to(at::kFloat))
      .mul_(weight.unsqueeze(1));
}

// Per-row loss and activity (1.0 where the hinge is open).
Tensor hinge(const Hardest& h, double margin, Tensor& active) {
  Tensor has = h.pos_idx.ge(0).logical_and(h.neg_idx.ge(0));
  Tensor l = (h.neg_val - h.pos_val + static_cast<float>(margin)).clamp_min(0);
  l = at::where(has, l, at::zeros_like(l));
  active = l.gt(0);
  return l;
}

std::tuple<Tensor, Tensor, Tensor> triplet_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                   const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                                   int64_t ref_valid, double margin, double pos_eps, bool need_grad,
                                                   bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  const Hardest h = find_hardest(in, static_cast<float>(1.0 - pos_eps));
  Tensor active;
  Tensor loss = hinge(h, margin, active);
  Tensor grad = at::empty({0}, loss.options());
  if (need_grad) {
    grad = hinge_direction(in, h, active.to(at::kFloat));
  }
  Tensor counts = active.to(at::kInt).unsqueeze(1).repeat({1, 2});
  return {loss, grad, counts};
}

std::tuple<Tensor, Tensor> triplet_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                           const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                           int64_t ref_valid, double margin, double pos_eps, const Tensor& grad_rows,
                                           bool /*allow_tf32*/) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  const Hardest h = find_hardest(in, static_cast<float>(1.0 - pos_eps));
  Tensor active;
  hinge(h, margin, active);
  Tensor g = grad_rows.to(at::kFloat).mul(active);  // (B,)
  Tensor grad_x = hinge_direction(in, h, g);
  Tensor grad_ref = at::zeros({ref.size(0), in.D}, g.options());
  if (ref.size(0) > 0) {
    Tensor ap = h.pos_idx.clamp_min(0), an = h.neg_idx.clamp_min(0);
    Tensor gx = in.x32 * g.unsqueeze(1);
    grad_ref.index_add_(0, an, gx);  // sequential on the CPU: deterministic
    grad_ref.index_add_(0, ap, gx.neg());
  }
  return {grad_x, grad_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("triplet_fwd", &triplet_fwd_cpu);
  m.impl("triplet_bwd", &triplet_bwd_cpu);
}

}  // namespace xbm_kernels
