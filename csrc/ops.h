// ringattn op declarations. Schemas live in ops.cpp (TORCH_LIBRARY, always compiled);
// CPU impls in cpu/*.cpp, CUDA impls in cuda/*.cu, each registering with TORCH_LIBRARY_IMPL.
#pragma once
#include <torch/all.h>

#include <tuple>

namespace ringattn {

// Merge two partial attention results over disjoint key sets (exact softmax merge).
//   out_a, out_b: batch x seqlen x num_heads x head_dim (any float dtype, last dim contiguous)
//   lse_a, lse_b: batch x num_heads x seqlen, fp32 (last dim contiguous)
// Returns (out: dtype of out_a, lse: fp32). Rows with lse = -inf on both sides -> out 0, lse -inf.
std::tuple<at::Tensor, at::Tensor> merge_attn_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                         const at::Tensor& out_b, const at::Tensor& lse_b);

// In place: fold a partial (part_out, part_lse) into a running fp32 accumulator.
//   acc_out:  batch x seqlen x num_heads x head_dim, fp32   (may be a strided view: sub-range of seq)
//   acc_lse:  batch x num_heads x seqlen, fp32              (may be a strided view)
//   part_out: batch x seqlen x num_heads x head_dim, any float dtype
//   part_lse: batch x num_heads x seqlen, fp32
void merge_attn_states_cpu_(at::Tensor& acc_out, at::Tensor& acc_lse, const at::Tensor& part_out,
                            const at::Tensor& part_lse);

// new_residual = x + residual ; y = rmsnorm(new_residual) * weight   (fp32 math inside)
//   x, residual: tokens... x hidden (same dtype: bf16/fp16/fp32, contiguous); weight: hidden
std::tuple<at::Tensor, at::Tensor> add_rmsnorm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                   const at::Tensor& weight, double eps);

}  // namespace ringattn
