// The extension module of xbm_kernels. The op schemas are declared once, in Python, from the
// loss registry (xbm_kernels/registry.py; defined with their fakes by xbm_kernels/_ops.py
// before this library loads); each device registers its kernels with TORCH_LIBRARY_IMPL in
// its own file (csrc/cpu/*.cpp, csrc/cuda/*.cu). Python reaches them only through
// torch.ops.xbm_kernels.<op>.
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
// Importing xbm_kernels._C loads this library and runs the kernel registrations of csrc/.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
