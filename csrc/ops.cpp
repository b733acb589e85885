// The one place ringattn's op schemas are declared. Always compiled, so a CPU-only build
// exposes the same ops (without CUDA impls). Implementations register per dispatch key next
// to their kernels (cpu/*.cpp, cuda/*.cu). Fake (meta) impls and autograd are registered
// from Python in ringattn/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Dummy module so `import ringattn._C` loads the .so (and runs the registrations below)
// without pybind11; see pytorch/extension-cpp.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ringattn, m) {
  m.def("merge_attn_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)");
  m.def("merge_attn_states_(Tensor(a!) acc_out, Tensor(b!) acc_lse, Tensor part_out, Tensor part_lse) -> ()");
  m.def("add_rmsnorm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
}
