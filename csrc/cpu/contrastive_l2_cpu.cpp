// Fused contrastive loss on the L2 distance of unit rows over a reference set on the CPU
// (CONTRACT.md section 1; pytorch-metric-learning's default ContrastiveLoss):
//   d_ij = sqrt(max(2 - 2 S_ij, 0))
//   l_i  = sum_{j in P_i} max(0, d_ij - pos_margin) + sum_{j in N_i} max(0, neg_margin - d_ij)
//   dl_i/dS_ij = -1/d_ij (active positive), +1/d_ij (active negative), 0 elsewhere and where
//   d_ij == 0 (torch.cdist's backward gives 0 at distance 0).
// As for the contrastive loss, the coefficient depends on its own pair only: one pass over
// the reference rows gives the loss, the active-pair counts and the gradient. Per tile
// S = X R^T (GEMM), the epilogue turns S into C in place, then dX += C R reuses the tile of
// R just read. The parameters may lie outside their public ranges: neg_margin <= 0 makes no
// negative active and pos_eps >= 2 leaves no positive (the PML drop-in switches a term off
// that way), so nothing here assumes otherwise.
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "cpu/l2_pairs.h"
#include "cpu/tiles.h"

namespace xbm_kernels {
namespace {

using at::Tensor;

// The kernels call ATen ops on their own buffers: keep them below autograd.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// contrastive_l2_epilogue bound to one call's inputs and parameters, in the form
// cpu::pairwise_forward / pairwise_backward take.
auto epilogue_for(const cpu::LossInputs& in, double pos_margin, double neg_margin, double pos_eps) {
  const cpu::PairRule rule = cpu::make_rule(pos_margin, neg_margin, pos_eps);
  return [&in, rule](float* s, int64_t c0, int64_t w, const float* row_scale, double* loss, int64_t* counts) {
    return cpu::contrastive_l2_epilogue(s, in.B, w, c0, in.y_ptr(), in.z_ptr() + c0, in.self_ptr(), rule, row_scale,
                                        loss, counts);
  };
}

std::tuple<Tensor, Tensor, Tensor> contrastive_l2_fwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                          const Tensor& ref_labels,
                                                          const c10::optional<Tensor>& self_index,
                                                          int64_t ref_valid, double pos_margin, double neg_margin,
                                                          double pos_eps, bool need_grad,
                                                          bool /*allow_tf32: no TF32 on the CPU*/) {
  BelowAutograd guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  return cpu::pairwise_forward(in, need_grad, epilogue_for(in, pos_margin, neg_margin, pos_eps));
}

std::tuple<Tensor, Tensor> contrastive_l2_bwd_cpu(const Tensor& x, const Tensor& labels, const Tensor& ref,
                                                  const Tensor& ref_labels, const c10::optional<Tensor>& self_index,
                                                  int64_t ref_valid, double pos_margin, double neg_margin,
                                                  double pos_eps, const Tensor& grad_rows, bool /*allow_tf32*/) {
  BelowAutograd guard;
  const auto in = cpu::prepare_inputs(x, labels, ref, ref_labels, self_index, ref_valid);
  return cpu::pairwise_backward(in, ref.size(0), grad_rows, epilogue_for(in, pos_margin, neg_margin, pos_eps));
}

}  // namespace

TORCH_LIBRARY_IMPL(xbm_kernels, CPU, m) {
  m.impl("contrastive_l2_fwd", &contrastive_l2_fwd_cpu);
  m.impl("contrastive_l2_bwd", &contrastive_l2_bwd_cpu);
}

}  // namespace xbm_kernels
