// ringattn op declarations. Schemas live in ops.cpp (TORCH_LIBRARY, always compiled);
// CPU impls in cpu/*.cpp, CUDA impls in cuda/*.cu, each registering with TORCH_LIBRARY_IMPL.
// The argument checks shared by both backends are defined once in ops.cpp (host code), so the
// CPU and CUDA kernels reject the same inputs with the same messages.
#pragma once
#include <torch/all.h>

#include <cstdio>
#include <string>
#include <tuple>
#include <type_traits>

namespace ringattn {

// ---- error messages ------------------------------------------------------------------------
// RINGATTN_CHECK(cond, pieces...) is TORCH_CHECK with the message concatenated from strings
// here, never through iostream number formatting: on the lent H100 image (extension host code
// compiled by /opt/gcc's g++, torch 2.11 runtime) every TORCH_CHECK message that streamed an
// int64/double (shapes, strides, eps) segfaulted the process, while messages made of strings and
// dtypes raised normally. Pieces: string literals/std::string, integers, doubles, IntArrayRef,
// Device, ScalarType.
namespace detail {
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline std::string piece(T v) {
  return std::to_string(v);
}
inline std::string piece(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
inline std::string piece(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  ((s += piece(args)), ...);
  return s;
}
}  // namespace detail

#define RINGATTN_CHECK(cond, ...) TORCH_CHECK(cond, ::ringattn::detail::cat(__VA_ARGS__))

// ---- merge_attn_states -------------------------------------------------------------------
// Merge two partial attention results over disjoint key sets (exact softmax merge).
//   out_a, out_b: batch x seqlen x num_heads x head_dim (any float dtype, head_dim stride 1,
//                 other strides arbitrary)
//   lse_a, lse_b: batch x num_heads x seqlen, fp32 (seqlen stride 1). fp64 lse is accepted only
//                 when every out tensor of the call is fp64 (the reference / gradcheck mode).
// Returns (out: contiguous, dtype of out_a; lse: contiguous, dtype of lse_a).
// A side whose lse is -inf contributes nothing (even if its out holds NaN); both -inf -> out 0,
// lse -inf.
std::tuple<at::Tensor, at::Tensor> merge_attn_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                         const at::Tensor& out_b, const at::Tensor& lse_b);

// In place: fold a partial (part_out, part_lse) into a running accumulator.
//   acc_out:  batch x seqlen x num_heads x head_dim, fp32 (fp64 in the all-fp64 mode); may be a
//             strided view, e.g. acc[:, s0:s1] (the zigzag half block)
//   acc_lse:  batch x num_heads x seqlen, dtype of acc_out's mode; may be a strided view
//   part_out: batch x seqlen x num_heads x head_dim, any float dtype
//   part_lse: batch x num_heads x seqlen, dtype of acc_lse
void merge_attn_states_cpu_(at::Tensor& acc_out, at::Tensor& acc_lse, const at::Tensor& part_out,
                            const at::Tensor& part_lse);

// ---- add_rmsnorm -------------------------------------------------------------------------
// new_residual = x + residual (rounded to x's dtype, as the eager composition does);
// y = rmsnorm(new_residual) * weight with fp32 math (fp64 for fp64), rounded once at the end.
//   x, residual: tokens... x hidden (same dtype bf16/fp16/fp32/fp64, contiguous)
//   weight:      hidden (dtype of x or fp32 on CUDA; any float dtype on CPU)
std::tuple<at::Tensor, at::Tensor> add_rmsnorm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                   const at::Tensor& weight, double eps);

// The same, written into caller buffers (e.g. symmetric-memory buffers for the fused all-reduce):
//   y, residual_out: shape/dtype/device of x, contiguous, overlapping no input and each other.
void add_rmsnorm_out_cpu(at::Tensor& y, at::Tensor& residual_out, const at::Tensor& x, const at::Tensor& residual,
                         const at::Tensor& weight, double eps);

#ifdef RINGATTN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> merge_attn_states_cuda(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                          const at::Tensor& out_b, const at::Tensor& lse_b);
void merge_attn_states_cuda_(at::Tensor& acc_out, at::Tensor& acc_lse, const at::Tensor& part_out,
                             const at::Tensor& part_lse);
std::tuple<at::Tensor, at::Tensor> add_rmsnorm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps);
void add_rmsnorm_out_cuda(at::Tensor& y, at::Tensor& residual_out, const at::Tensor& x, const at::Tensor& residual,
                          const at::Tensor& weight, double eps);
#endif

// ---- shared argument checks (ops.cpp) ----------------------------------------------------
// Each raises c10::Error (RuntimeError in Python) with a message naming the offending tensor.
void check_merge_args(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                      const at::Tensor& lse_b);
void check_merge_inplace_args(const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& part_out,
                              const at::Tensor& part_lse);
// weight_any_float: CPU accepts any float weight dtype; CUDA accepts x's dtype or fp32.
void check_add_rmsnorm_args(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
                            bool weight_any_float);
void check_add_rmsnorm_out_args(const at::Tensor& y, const at::Tensor& residual_out, const at::Tensor& x,
                                const at::Tensor& residual, const at::Tensor& weight);


// ---- tokenweave fused all-reduce + RMSNorm (fused_allreduce_rmsnorm.cpp) -------------------
namespace tokenweave {
// The argument checks both backends of tw_fused_allreduce_rmsnorm_ share (bounds, dtypes, the
// residual/y shapes each mode implies, weight, eps). Backend-specific checks stay with each backend.
void check_fused_allreduce_rmsnorm_args(const at::Tensor& local_in, const at::Tensor& y_out,
                                        const at::Tensor& residual, const at::Tensor& residual_out,
                                        const at::Tensor& weight, int64_t buffer_ptrs, int64_t signal_pad_ptrs,
                                        int64_t rank, int64_t world_size, int64_t slot, int64_t num_blocks,
                                        int64_t mode, double eps);
}  // namespace tokenweave

}  // namespace ringattn
