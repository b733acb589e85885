// Exact merge of partial attention results (CPU). Numerics: the standard log-sum-exp merge
// (see ring-flash-attention's discussion, zhuzilin/ring-flash-attention#34): weights
// exp(lse_x - max) so nothing overflows, lse = max + log1p(exp(min - max)). A side whose lse is
// -inf contributes nothing (its out may hold NaN, e.g. a fully masked flash/cuDNN row); rows where
// both lse are -inf merge to out 0, lse -inf. The CUDA kernel (cuda/merge_attn_states.cu) follows
// the same rules.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "../ops.h"

namespace ringattn {
namespace {

// One row (b, s, h): D contiguous values. `oo` may alias `oa` (the in-place fold).
template <typename ACC, typename OA, typename OB, typename OO, typename L>
inline void merge_row(const OA* oa, ACC la, const OB* ob, ACC lb, OO* oo, L* lo, int64_t D) {
  constexpr ACC kNegInf = -std::numeric_limits<ACC>::infinity();
  const ACC m = la >= lb ? la : lb;  // NaN in either lse -> NaN weights below -> NaN out
  if (m == kNegInf) {
    for (int64_t d = 0; d < D; ++d) oo[d] = OO(0);
    *lo = L(kNegInf);
    return;
  }
  const ACC wa = std::exp(la - m), wb = std::exp(lb - m);  // one of them is exactly 1
  const ACC inv = ACC(1) / (wa + wb);
  const ACC ca = wa * inv, cb = wb * inv;
  const bool use_a = ca != ACC(0), use_b = cb != ACC(0);  // a -inf side contributes nothing
  for (int64_t d = 0; d < D; ++d) {
    ACC v = 0;
    if (use_a) v = ca * ACC(oa[d]);
    if (use_b) v += cb * ACC(ob[d]);
    oo[d] = OO(v);
  }
  *lo = L(m + std::log1p(std::exp((la >= lb ? lb : la) - m)));
}

template <typename OA, typename OB, typename OO, typename L>
void merge_impl(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b, const at::Tensor& lse_b,
                const at::Tensor& out, const at::Tensor& lse) {
  using ACC = std::conditional_t<std::is_same_v<OA, double> || std::is_same_v<OB, double> ||
                                     std::is_same_v<OO, double> || std::is_same_v<L, double>,
                                 double, float>;
  const int64_t B = out_a.size(0), S = out_a.size(1), H = out_a.size(2), D = out_a.size(3);
  const OA* pa = out_a.const_data_ptr<OA>();
  const OB* pb = out_b.const_data_ptr<OB>();
  OO* po = out.data_ptr<OO>();
  const L* la = lse_a.const_data_ptr<L>();
  const L* lb = lse_b.const_data_ptr<L>();
  L* lo = lse.data_ptr<L>();
  const auto sa = out_a.strides(), sb = out_b.strides(), so = out.strides();
  const auto ta = lse_a.strides(), tb = lse_b.strides(), to = lse.strides();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * S * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % H, s = (row / H) % S, b = row / (H * S);
      merge_row<ACC>(pa + b * sa[0] + s * sa[1] + h * sa[2], ACC(la[b * ta[0] + h * ta[1] + s * ta[2]]),
                     pb + b * sb[0] + s * sb[1] + h * sb[2], ACC(lb[b * tb[0] + h * tb[1] + s * tb[2]]),
                     po + b * so[0] + s * so[1] + h * so[2], lo + b * to[0] + h * to[1] + s * to[2], D);
    }
  });
}

#define RINGATTN_DISPATCH_FLOAT(TYPE, NAME, ...)                               \
  [&] {                                                                        \
    switch (TYPE) {                                                            \
      case at::kFloat: { using NAME = float; return __VA_ARGS__(); }           \
      case at::kHalf: { using NAME = at::Half; return __VA_ARGS__(); }         \
      case at::kBFloat16: { using NAME = at::BFloat16; return __VA_ARGS__(); } \
      case at::kDouble: { using NAME = double; return __VA_ARGS__(); }         \
      default: RINGATTN_CHECK(false, "unsupported dtype ", TYPE);                 \
    }                                                                          \
  }()

}  // namespace

std::tuple<at::Tensor, at::Tensor> merge_attn_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                         const at::Tensor& out_b, const at::Tensor& lse_b) {
  check_merge_args(out_a, lse_a, out_b, lse_b);
  RINGATTN_CHECK(out_a.device().is_cpu(), "out_a must be a CPU tensor for the CPU kernel, got ", out_a.device());
  auto out = at::empty(out_a.sizes(), out_a.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty(lse_a.sizes(), lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  RINGATTN_DISPATCH_FLOAT(out_a.scalar_type(), T, [&] {
    if (lse_a.scalar_type() == at::kDouble) {
      merge_impl<T, T, T, double>(out_a, lse_a, out_b, lse_b, out, lse);
    } else {
      merge_impl<T, T, T, float>(out_a, lse_a, out_b, lse_b, out, lse);
    }
  });
  return {out, lse};
}

void merge_attn_states_cpu_(at::Tensor& acc_out, at::Tensor& acc_lse, const at::Tensor& part_out,
                            const at::Tensor& part_lse) {
  check_merge_inplace_args(acc_out, acc_lse, part_out, part_lse);
  RINGATTN_CHECK(acc_out.device().is_cpu(), "acc_out must be a CPU tensor for the CPU kernel, got ", acc_out.device());
  if (acc_out.scalar_type() == at::kDouble) {  // the all-fp64 reference mode
    merge_impl<double, double, double, double>(acc_out, acc_lse, part_out, part_lse, acc_out, acc_lse);
    return;
  }
  RINGATTN_DISPATCH_FLOAT(part_out.scalar_type(), T, [&] {
    merge_impl<float, T, float, float>(acc_out, acc_lse, part_out, part_lse, acc_out, acc_lse);
  });
}

TORCH_LIBRARY_IMPL(ringattn, CPU, m) {
  m.impl("merge_attn_states", &merge_attn_states_cpu);
  m.impl("merge_attn_states_", &merge_attn_states_cpu_);
}

}  // namespace ringattn
