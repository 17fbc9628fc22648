// Operator schemas for xbm_kernels. One schema per op; each device registers its kernels
// with TORCH_LIBRARY_IMPL in its own file (csrc/cpu/*.cpp, csrc/cuda/*.cu). Python reaches
// these only through torch.ops.xbm_kernels.<op>; fakes live in xbm_kernels/_ops.py.
//
// Conventions shared by every loss op:
//   x (B, D) anchors, labels (B,) int32, ref (N, D) reference rows, ref_labels (N,) int32,
//   self_index (B,) int64 or None (column of anchor i's own copy, -1 for none),
//   ref_valid: only columns j < ref_valid exist.
//   *_fwd returns (loss_rows (B,) f32, grad (B, D) f32 = d(sum_i loss_i)/dx or an empty
//   (0,) tensor when need_grad is false, counts (B, 2) int32 = active positive / negative
//   pairs per anchor).
//   *_bwd takes grad_rows (B,) f32 = dL/dloss_i and returns (grad_x (B, D) f32,
//   grad_ref (N, D) f32) by recomputing the similarity tiles.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing xbm_kernels._C loads this library and runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(xbm_kernels, m) {
  m.def("enqueue_(Tensor(a!) memory, Tensor(b!) memory_labels, Tensor embeddings, Tensor labels, int ptr) -> Tensor");
  m.def("contrastive_fwd(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
        "int ref_valid, float margin, float pos_eps, bool need_grad, bool allow_tf32) -> (Tensor, Tensor, Tensor)");
  m.def("contrastive_bwd(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
        "int ref_valid, float margin, float pos_eps, Tensor grad_rows, bool allow_tf32) -> (Tensor, Tensor)");
  m.def("contrastive_l2_fwd(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
        "int ref_valid, float pos_margin, float neg_margin, float pos_eps, bool need_grad, bool allow_tf32) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("contrastive_l2_bwd(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
        "int ref_valid, float pos_margin, float neg_margin, float pos_eps, Tensor grad_rows, bool allow_tf32) "
        "-> (Tensor, Tensor)");
  m.def("multi_similarity_fwd(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
        "int ref_valid, float alpha, float beta, float base, float mining_margin, float pos_eps, bool mine, "
        "bool skip_incomplete, bool need_grad, bool allow_tf32) -> (Tensor, Tensor, Tensor)");
  m.def("multi_similarity_bwd(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
        "int ref_valid, float alpha, float beta, float base, float mining_margin, float pos_eps, bool mine, "
        "bool skip_incomplete, Tensor grad_rows, bool allow_tf32) -> (Tensor, Tensor)");
  m.def("triplet_fwd(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
        "int ref_valid, float margin, float pos_eps, bool need_grad, bool allow_tf32) -> (Tensor, Tensor, Tensor)");
  m.def("triplet_bwd(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
        "int ref_valid, float margin, float pos_eps, Tensor grad_rows, bool allow_tf32) -> (Tensor, Tensor)");
  m.def("supcon_fwd(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
        "int ref_valid, float temperature, float pos_eps, bool need_grad, bool allow_tf32) -> (Tensor, Tensor, Tensor)");
  m.def("supcon_bwd(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
        "int ref_valid, float temperature, float pos_eps, Tensor grad_rows, bool allow_tf32) -> (Tensor, Tensor)");
  m.def("ntxent_fwd(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
        "int ref_valid, float temperature, float pos_eps, bool need_grad, bool allow_tf32) -> (Tensor, Tensor, Tensor)");
  m.def("ntxent_bwd(Tensor x, Tensor labels, Tensor ref, Tensor ref_labels, Tensor? self_index, "
        "int ref_valid, float temperature, float pos_eps, Tensor grad_rows, bool allow_tf32) -> (Tensor, Tensor)");
}
