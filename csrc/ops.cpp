// The one place ringattn's op schemas are declared. Always compiled, so a CPU-only build
// exposes the same ops (without CUDA impls). Implementations register per dispatch key next
// to their kernels (cpu/*.cpp, cuda/*.cu). Fake (meta) impls and autograd are registered
// from Python in ringattn/ops.py. The argument checks both backends share live here too.
#include <Python.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cmath>

#include "ops.h"

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
  // Hot-path variant writing into caller buffers (vLLM style: `Tensor!` outputs, returns ()).
  m.def(
      "add_rmsnorm_out(Tensor(a!) y, Tensor(b!) residual_out, Tensor x, Tensor residual, Tensor weight, "
      "float eps) -> ()");
}

namespace ringattn {
namespace {

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// out: batch x seqlen x heads x head_dim ; lse: batch x heads x seqlen
void check_pair(const at::Tensor& out, const at::Tensor& lse, const char* out_name, const char* lse_name,
                bool fp64_lse_ok) {
  RINGATTN_CHECK(out.dim() == 4, out_name, " must be 4-D (batch, seqlen, heads, head_dim), got ", out.dim(),
              "-D with shape ", out.sizes());
  RINGATTN_CHECK(lse.dim() == 3, lse_name, " must be 3-D (batch, heads, seqlen), got ", lse.dim(), "-D with shape ",
              lse.sizes());
  RINGATTN_CHECK(is_float(out.scalar_type()), out_name, " must be float16/bfloat16/float32/float64, got ",
              out.scalar_type());
  RINGATTN_CHECK(lse.scalar_type() == at::kFloat || (fp64_lse_ok && lse.scalar_type() == at::kDouble), lse_name,
              " must be float32 (float64 only when every out tensor is float64), got ", lse.scalar_type());
  RINGATTN_CHECK(lse.size(0) == out.size(0) && lse.size(1) == out.size(2) && lse.size(2) == out.size(1), lse_name,
              " must have shape (batch, heads, seqlen) = (", out.size(0), ", ", out.size(2), ", ", out.size(1),
              ") to match ", out_name, " ", out.sizes(), ", got ", lse.sizes());
  RINGATTN_CHECK(out.size(3) <= 1 || out.stride(3) == 1, out_name,
              " must be contiguous in head_dim (stride 1), got strides ", out.strides());
  RINGATTN_CHECK(lse.size(2) <= 1 || lse.stride(2) == 1, lse_name,
              " must be contiguous in seqlen (stride 1), got strides ", lse.strides());
  RINGATTN_CHECK(lse.device() == out.device(), lse_name, " must be on ", out_name, "'s device ", out.device(), ", got ",
              lse.device());
}

void check_like(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  RINGATTN_CHECK(a.sizes() == b.sizes(), bn, " must have the shape of ", an, " ", a.sizes(), ", got ", b.sizes());
  RINGATTN_CHECK(a.device() == b.device(), bn, " must be on ", an, "'s device ", a.device(), ", got ", b.device());
}

void check_no_overlap(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  const auto st = at::get_overlap_status(a, b);
  RINGATTN_CHECK(st != at::MemOverlapStatus::Full && st != at::MemOverlapStatus::Partial, an, " and ", bn,
              " must not share memory");
}

}  // namespace

void check_merge_args(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                      const at::Tensor& lse_b) {
  const bool all64 = out_a.scalar_type() == at::kDouble && out_b.scalar_type() == at::kDouble;
  check_pair(out_a, lse_a, "out_a", "lse_a", all64);
  check_pair(out_b, lse_b, "out_b", "lse_b", all64);
  check_like(out_a, out_b, "out_a", "out_b");
  check_like(lse_a, lse_b, "lse_a", "lse_b");
  RINGATTN_CHECK(out_a.scalar_type() == out_b.scalar_type(), "out_b must have the dtype of out_a (",
              out_a.scalar_type(), "), got ", out_b.scalar_type());
  RINGATTN_CHECK(lse_a.scalar_type() == lse_b.scalar_type(), "lse_b must have the dtype of lse_a (",
              lse_a.scalar_type(), "), got ", lse_b.scalar_type());
}

void check_merge_inplace_args(const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& part_out,
                              const at::Tensor& part_lse) {
  const bool all64 = acc_out.scalar_type() == at::kDouble && part_out.scalar_type() == at::kDouble;
  check_pair(acc_out, acc_lse, "acc_out", "acc_lse", all64);
  check_pair(part_out, part_lse, "part_out", "part_lse", all64);
  check_like(acc_out, part_out, "acc_out", "part_out");
  check_like(acc_lse, part_lse, "acc_lse", "part_lse");
  RINGATTN_CHECK(acc_out.scalar_type() == at::kFloat || (all64 && acc_lse.scalar_type() == at::kDouble),
              "acc_out must be the float32 accumulator (float64 only with float64 lse and part_out), got ",
              acc_out.scalar_type());
  RINGATTN_CHECK(acc_lse.scalar_type() == part_lse.scalar_type(), "part_lse must have the dtype of acc_lse (",
              acc_lse.scalar_type(), "), got ", part_lse.scalar_type());
  RINGATTN_CHECK(at::has_internal_overlap(acc_out) != at::MemOverlap::Yes,
              "acc_out must not have internally overlapping memory (e.g. an expand()ed view)");
  RINGATTN_CHECK(at::has_internal_overlap(acc_lse) != at::MemOverlap::Yes,
              "acc_lse must not have internally overlapping memory (e.g. an expand()ed view)");
  check_no_overlap(acc_out, part_out, "acc_out", "part_out");
  check_no_overlap(acc_out, acc_lse, "acc_out", "acc_lse");
  check_no_overlap(acc_lse, part_lse, "acc_lse", "part_lse");
  check_no_overlap(acc_out, part_lse, "acc_out", "part_lse");
  check_no_overlap(acc_lse, part_out, "acc_lse", "part_out");
}

void check_add_rmsnorm_args(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
                            bool weight_any_float) {
  // x, residual: tokens... x hidden ; weight: hidden
  RINGATTN_CHECK(x.dim() >= 1, "x must have at least one dim (..., hidden), got a 0-D tensor");
  RINGATTN_CHECK(is_float(x.scalar_type()), "x must be float16/bfloat16/float32/float64, got ", x.scalar_type());
  RINGATTN_CHECK(x.sizes() == residual.sizes(), "residual must have the shape of x ", x.sizes(), ", got ",
              residual.sizes());
  RINGATTN_CHECK(x.scalar_type() == residual.scalar_type(), "residual must have the dtype of x (", x.scalar_type(),
              "), got ", residual.scalar_type());
  const int64_t hidden = x.size(-1);
  RINGATTN_CHECK(weight.dim() == 1 && weight.size(0) == hidden, "weight must have shape (", hidden,
              ") = (hidden,) of x, got ", weight.sizes());
  RINGATTN_CHECK(weight_any_float ? is_float(weight.scalar_type())
                               : (weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat),
              "weight must have the dtype of x (", x.scalar_type(), ")", weight_any_float ? " or any float" : " or float32",
              ", got ", weight.scalar_type());
  RINGATTN_CHECK(x.is_contiguous(), "x must be contiguous, got strides ", x.strides(), " for shape ", x.sizes());
  RINGATTN_CHECK(residual.is_contiguous(), "residual must be contiguous, got strides ", residual.strides(),
              " for shape ", residual.sizes());
  RINGATTN_CHECK(weight.is_contiguous(), "weight must be contiguous, got strides ", weight.strides());
  RINGATTN_CHECK(x.device() == residual.device(), "residual must be on x's device ", x.device(), ", got ",
              residual.device());
  RINGATTN_CHECK(x.device() == weight.device(), "weight must be on x's device ", x.device(), ", got ", weight.device());
  RINGATTN_CHECK(eps >= 0 && std::isfinite(eps), "eps must be finite and >= 0, got ", eps);
}

void check_add_rmsnorm_out_args(const at::Tensor& y, const at::Tensor& residual_out, const at::Tensor& x,
                                const at::Tensor& residual, const at::Tensor& weight) {
  const auto check_out = [&](const at::Tensor& t, const char* name) {
    RINGATTN_CHECK(t.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
    RINGATTN_CHECK(t.scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(), "), got ",
                t.scalar_type());
    RINGATTN_CHECK(t.device() == x.device(), name, " must be on x's device ", x.device(), ", got ", t.device());
    RINGATTN_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
    check_no_overlap(t, x, name, "x");
    check_no_overlap(t, residual, name, "residual");
    check_no_overlap(t, weight, name, "weight");
  };
  check_out(y, "y");
  check_out(residual_out, "residual_out");
  check_no_overlap(y, residual_out, "y", "residual_out");
}

}  // namespace ringattn
