// Fused margin loss over every triplet of the anchor on the CPU (CONTRACT.md section 1;
// pytorch-metric-learning's MarginLoss with all triplets), on contrastive_l2's distance d:
//   l_i = sum_{p in P_i, n in N_i} max(0, d_ip - beta + margin) + max(0, beta - d_in + margin)
//       = |N_i| sum_{P_i} max(0, d_ip - pm) + |P_i| sum_{N_i} max(0, nm - d_in),
// pm = beta - margin, nm = beta + margin: contrastive_l2's pair terms (cpu/l2_pairs.h), each
// set's weighted by the other set's size, so no triplet is enumerated.
// Positives first: each anchor's same-label columns by label (cpu::gather_same_label), S by one
// dot product each; the positives (S < 1 - pos_eps) give |P_i|, their terms and coefficients,
// and |N_i| = the valid columns but self less the same-label ones. Then ONE pass over the memory
// with contrastive_l2's epilogue, positives switched off (pos_eps 3), takes the negatives: their
// unweighted terms, counts and sum_{active N} r_j / d (the tile's coefficients times R). The
// weights |N_i| and |P_i| are applied afterwards, per anchor. A positive's S comes from the
// gather only and a negative's from the pass only (a same-label column is never a negative).
// The reference-side gradient (in-batch loss): the pass's C scaled by |P_i| dL/dl_i per row, and
// the positives' coefficients by |N_i| dL/dl_i, one row add each.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/l2_pairs.h"
#include "cpu/same_label.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// Each anchor's positives and set sizes, from the same-label candidates.
struct Positives {
  cpu::SameLabel cand;       // same-label valid columns but self, with S
  std::vector<float> coef;   // per candidate: dl/dS of its positive term unweighted (-1/d where active, else 0)
  std::vector<int64_t> n_pos, n_neg, active;
  std::vector<double> loss;  // per anchor: the sum of its positive terms, unweighted
};

Positives find_positives(const cpu::LossInputs& in, const cpu::PairRule& rule) {
  Positives P;
  cpu::gather_same_label(in, P.cand, /*capped=*/false);
  const int64_t B = in.B;
  P.coef.assign(P.cand.col.size(), 0.f);
  P.n_pos.assign(B, 0);
  P.n_neg.assign(B, 0);
  P.active.assign(B, 0);
  P.loss.assign(B, 0.0);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t self_col = in.self_col(i);
    const int64_t valid = in.n - (self_col >= 0 && self_col < in.n ? 1 : 0);
    P.n_neg[i] = valid - (P.cand.start[i + 1] - P.cand.start[i]);
    for (int64_t k = P.cand.start[i]; k < P.cand.start[i + 1]; ++k) {
      if (!(P.cand.s[k] < rule.pos_thr)) continue;  // a duplicate of the anchor: in neither set
      ++P.n_pos[i];
      float c, p, n;
      P.loss[i] += cpu::l2_pair(P.cand.s[k], /*same=*/true, rule, c, p, n);
      P.active[i] += static_cast<int64_t>(p);
      P.coef[k] = c;
    }
  }
  return P;
}

// Both rules: the positives' (pos_eps as given; neg_margin unused there) and the pass's
// (pos_eps 3: no positives, the same-label columns contribute nothing).
std::pair<cpu::PairRule, cpu::PairRule> rules(double margin, double beta, double pos_eps) {
  return {cpu::make_rule(beta - margin, beta + margin, pos_eps), cpu::make_rule(beta - margin, beta + margin, 3.0)};
}

auto negatives_epilogue(const cpu::LossInputs& in, const cpu::PairRule& rule) {
  return [&in, rule](float* s, int64_t c0, int64_t w, const float* row_scale, double* loss, int64_t* counts) {
    return cpu::contrastive_l2_epilogue(s, in.B, w, c0, in.y_ptr(), in.z_ptr() + c0, in.self_ptr(), rule, row_scale,
                                        loss, counts);
  };
}

int32_t saturated(int64_t v) {
  return static_cast<int32_t>(std::min<int64_t>(v, std::numeric_limits<int32_t>::max()));
}

std::tuple<Tensor, Tensor, Tensor> margin_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                  const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                                  int64_t ref_valid, double margin, double beta, double pos_eps,
                                                  bool need_grad, bool /*allow_tf32: no TF32 on the CPU*/) {
  BelowAutograd guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  const auto [pos_rule, neg_rule] = rules(margin, beta, pos_eps);
  const Positives P = find_positives(in, pos_rule);
  auto [neg_rows, neg_grad, neg_counts] = cpu::pairwise_forward(in, need_grad, negatives_epilogue(in, neg_rule));
  const int64_t B = in.B, D = in.D;
  Tensor rows = at::empty({B}, in.x32.options());
  Tensor counts = at::empty({B, 2}, in.x32.options().dtype(at::kInt));
  const float* nr = neg_rows.data_ptr<float>();
  const int32_t* nc = neg_counts.data_ptr<int32_t>();
  float* out_rows = rows.data_ptr<float>();
  int32_t* out_counts = counts.data_ptr<int32_t>();
  for (int64_t i = 0; i < B; ++i) {
    out_rows[i] = static_cast<float>(static_cast<double>(P.n_neg[i]) * P.loss[i] +
                                     static_cast<double>(P.n_pos[i]) * static_cast<double>(nr[i]));
    out_counts[2 * i] = saturated(P.n_neg[i] * P.active[i]);
    out_counts[2 * i + 1] = saturated(P.n_pos[i] * static_cast<int64_t>(nc[2 * i + 1]));
  }
  if (!need_grad) return {rows, at::empty({0}, in.x32.options()), counts};
  // dl_i/dx_i = |N_i| sum_{active P} -r_j / d + |P_i| (the pass's sum_{active N} r_j / d): each
  // sum in fp32 (as the pass's), the weighted parts added in double (opposite signs, large weights)
  Tensor grad = at::empty({B, D}, in.x32.options());
  const float* gn = neg_grad.data_ptr<float>();
  float* g = grad.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> buf(D), acc(D);
    for (int64_t i = i0; i < i1; ++i) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k = P.cand.start[i]; k < P.cand.start[i + 1]; ++k) {
        const float c = P.coef[k];
        if (c == 0.f) continue;
        const float* r = cpu::ref_row(in.ref, P.cand.col[k], D, buf.data());
        for (int64_t d = 0; d < D; ++d) acc[d] += c * r[d];
      }
      const double wp = static_cast<double>(P.n_neg[i]), wn = static_cast<double>(P.n_pos[i]);
      for (int64_t d = 0; d < D; ++d) g[i * D + d] = static_cast<float>(wp * acc[d] + wn * gn[i * D + d]);
    }
  });
  return {rows, grad, counts};
}

std::tuple<Tensor, Tensor> margin_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                          const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                          int64_t ref_valid, double margin, double beta, double pos_eps,
                                          const Tensor& grad_rows, bool /*allow_tf32*/) {
  BelowAutograd guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == in.B, "grad_rows: expected shape (", in.B, ",)");
  const auto [pos_rule, neg_rule] = rules(margin, beta, pos_eps);
  const Positives P = find_positives(in, pos_rule);
  const int64_t B = in.B, D = in.D;
  const Tensor g = grad_rows.to(at::kDouble).contiguous();
  const double* gp = g.data_ptr<double>();
  Tensor neg_scale = at::empty({B}, in.x32.options());  // dL/dl_i |P_i|: the negatives' weight
  for (int64_t i = 0; i < B; ++i) neg_scale.data_ptr<float>()[i] = static_cast<float>(gp[i] * P.n_pos[i]);
  auto [gx, gr] = cpu::pairwise_backward(in, ref.size(0), neg_scale, negatives_epilogue(in, neg_rule));
  // the positives: dL/dS_ij = dL/dl_i |N_i| coef, one row add each into dX and dR (in anchor
  // order: several anchors share a positive row)
  float* gxp = gx.data_ptr<float>();
  float* grp = gr.data_ptr<float>();
  const float* xp = in.x32.data_ptr<float>();
  std::vector<float> buf(D);
  for (int64_t i = 0; i < B; ++i) {
    for (int64_t k = P.cand.start[i]; k < P.cand.start[i + 1]; ++k) {
      if (P.coef[k] == 0.f) continue;
      const float c = static_cast<float>(gp[i] * static_cast<double>(P.n_neg[i]) * P.coef[k]);
      const int64_t j = P.cand.col[k];
      const float* r = cpu::ref_row(in.ref, j, D, buf.data());
      for (int64_t d = 0; d < D; ++d) {
        gxp[i * D + d] += c * r[d];
        grp[j * D + d] += c * xp[i * D + d];
      }
    }
  }
  return {gx, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("margin_fwd", &margin_fwd_cpu);
  m.impl("margin_bwd", &margin_bwd_cpu);
}

}  // namespace xbm_kernels
