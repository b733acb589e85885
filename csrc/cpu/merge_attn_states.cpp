// Exact merge of partial attention results (CPU). Numerics: the standard log-sum-exp merge
// (see ring-flash-attention's discussion, zhuzilin/ring-flash-attention#34): weights
// exp(lse_x - max) so nothing overflows; rows where both lse are -inf merge to out 0, lse -inf.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../ops.h"

namespace ringattn {
namespace {

void check_pair(const at::Tensor& out, const at::Tensor& lse, const char* out_name, const char* lse_name) {
  TORCH_CHECK(out.dim() == 4, out_name, " must be (batch, seqlen, heads, head_dim), got ", out.dim(), " dims");
  TORCH_CHECK(lse.dim() == 3, lse_name, " must be (batch, heads, seqlen), got ", lse.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(out.scalar_type()), out_name, " must be a float tensor, got ", out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, lse_name, " must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.size(0) == out.size(0) && lse.size(1) == out.size(2) && lse.size(2) == out.size(1), lse_name,
              " must have shape (batch, heads, seqlen) = (", out.size(0), ", ", out.size(2), ", ", out.size(1),
              ") to match ", out_name, ", got ", lse.sizes());
  TORCH_CHECK(out.size(3) == 0 || out.stride(3) == 1, out_name, " must be contiguous in head_dim (stride 1), got strides ",
              out.strides());
  TORCH_CHECK(lse.size(2) <= 1 || lse.stride(2) == 1, lse_name, " must be contiguous in seqlen (stride 1), got strides ",
              lse.strides());
}

void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.sizes() == b.sizes(), bn, " must have the shape of ", an, " ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(a.device() == b.device(), bn, " must be on ", a.device(), " like ", an, ", got ", b.device());
}

// One row (b, s, h): D contiguous values. acc/out may alias (in-place).
template <typename OA, typename OB, typename OO>
inline void merge_row(const OA* oa, float la, const OB* ob, float lb, OO* oo, float* lo, int64_t D) {
  const float m = std::max(la, lb);
  if (m == -std::numeric_limits<float>::infinity()) {
    for (int64_t d = 0; d < D; ++d) oo[d] = OO(0.f);
    *lo = m;
    return;
  }
  const float wa = std::exp(la - m), wb = std::exp(lb - m);
  const float sum = wa + wb;
  const float ca = wa / sum, cb = wb / sum;
  for (int64_t d = 0; d < D; ++d) oo[d] = OO(ca * float(oa[d]) + cb * float(ob[d]));
  *lo = m + std::log(sum);
}

template <typename OA, typename OB, typename OO>
void merge_impl(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b, const at::Tensor& lse_b,
                at::Tensor& out, at::Tensor& lse) {
  const int64_t B = out_a.size(0), S = out_a.size(1), H = out_a.size(2), D = out_a.size(3);
  const OA* pa = out_a.data_ptr<OA>();
  const OB* pb = out_b.data_ptr<OB>();
  OO* po = out.data_ptr<OO>();
  const float* la = lse_a.data_ptr<float>();
  const float* lb = lse_b.data_ptr<float>();
  float* lo = lse.data_ptr<float>();
  at::parallel_for(0, B * S * H, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % H, s = (row / H) % S, b = row / (H * S);
      merge_row(pa + b * out_a.stride(0) + s * out_a.stride(1) + h * out_a.stride(2),
                la[b * lse_a.stride(0) + h * lse_a.stride(1) + s * lse_a.stride(2)],
                pb + b * out_b.stride(0) + s * out_b.stride(1) + h * out_b.stride(2),
                lb[b * lse_b.stride(0) + h * lse_b.stride(1) + s * lse_b.stride(2)],
                po + b * out.stride(0) + s * out.stride(1) + h * out.stride(2),
                lo + b * lse.stride(0) + h * lse.stride(1) + s * lse.stride(2), D);
    }
  });
}

#define RINGATTN_DISPATCH_FLOAT(TYPE, NAME, ...)                                  \
  [&] {                                                                           \
    switch (TYPE) {                                                               \
      case at::kFloat: { using NAME = float; return __VA_ARGS__(); }              \
      case at::kHalf: { using NAME = at::Half; return __VA_ARGS__(); }            \
      case at::kBFloat16: { using NAME = at::BFloat16; return __VA_ARGS__(); }    \
      case at::kDouble: { using NAME = double; return __VA_ARGS__(); }            \
      default: TORCH_CHECK(false, "unsupported dtype ", TYPE);                    \
    }                                                                             \
  }()

}  // namespace

std::tuple<at::Tensor, at::Tensor> merge_attn_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                         const at::Tensor& out_b, const at::Tensor& lse_b) {
  check_pair(out_a, lse_a, "out_a", "lse_a");
  check_pair(out_b, lse_b, "out_b", "lse_b");
  check_same_shape(out_a, out_b, "out_a", "out_b");
  check_same_shape(lse_a, lse_b, "lse_a", "lse_b");
  TORCH_CHECK(out_a.scalar_type() == out_b.scalar_type(), "out_b must have the dtype of out_a (", out_a.scalar_type(),
              "), got ", out_b.scalar_type());
  auto out = at::empty(out_a.sizes(), out_a.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty(lse_a.sizes(), lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  RINGATTN_DISPATCH_FLOAT(out_a.scalar_type(), T, [&] { merge_impl<T, T, T>(out_a, lse_a, out_b, lse_b, out, lse); });
  return {out, lse};
}

void merge_attn_states_cpu_(at::Tensor& acc_out, at::Tensor& acc_lse, const at::Tensor& part_out,
                            const at::Tensor& part_lse) {
  check_pair(acc_out, acc_lse, "acc_out", "acc_lse");
  check_pair(part_out, part_lse, "part_out", "part_lse");
  check_same_shape(acc_out, part_out, "acc_out", "part_out");
  check_same_shape(acc_lse, part_lse, "acc_lse", "part_lse");
  TORCH_CHECK(acc_out.scalar_type() == at::kFloat, "acc_out must be the float32 accumulator, got ",
              acc_out.scalar_type());
  RINGATTN_DISPATCH_FLOAT(part_out.scalar_type(), T, [&] {
    merge_impl<float, T, float>(acc_out, acc_lse, part_out, part_lse, acc_out, acc_lse);
  });
}

TORCH_LIBRARY_IMPL(ringattn, CPU, m) {
  m.impl("merge_attn_states", &merge_attn_states_cpu);
  m.impl("merge_attn_states_", &merge_attn_states_cpu_);
}

}  // namespace ringattn
