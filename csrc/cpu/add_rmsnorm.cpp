// new_residual = x + residual (rounded to the I/O dtype, as the eager composition does);
// y = rmsnorm(new_residual) * weight with fp32 math (fp64 for fp64 I/O), rounded once at the end.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "../ops.h"

namespace ringattn {
namespace {

// y, new_res, x, res: rows x hidden (contiguous) ; w: hidden
template <typename T, typename W>
void add_rmsnorm_impl(T* py, T* pn, const T* px, const T* pr, const W* pw, int64_t rows, int64_t hidden, double eps) {
  using ACC = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(hidden, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = r * hidden;
      ACC ss = 0;
      for (int64_t i = 0; i < hidden; ++i) {
        const T v = T(ACC(px[o + i]) + ACC(pr[o + i]));
        pn[o + i] = v;
        ss += ACC(v) * ACC(v);
      }
      const ACC inv = ACC(1) / std::sqrt(ss / ACC(hidden) + ACC(eps));
      for (int64_t i = 0; i < hidden; ++i) py[o + i] = T(ACC(pn[o + i]) * inv * ACC(pw[i]));
    }
  });
}

void launch(const at::Tensor& y, const at::Tensor& new_res, const at::Tensor& x, const at::Tensor& residual,
            const at::Tensor& weight, double eps) {
  const int64_t hidden = x.size(-1);
  const int64_t rows = hidden == 0 ? 0 : x.numel() / hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_rmsnorm_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "add_rmsnorm_cpu_w", [&] {
      add_rmsnorm_impl<T, scalar_t>(y.data_ptr<T>(), new_res.data_ptr<T>(), x.const_data_ptr<T>(),
                                    residual.const_data_ptr<T>(), weight.const_data_ptr<scalar_t>(), rows, hidden,
                                    eps);
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> add_rmsnorm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                   const at::Tensor& weight, double eps) {
  check_add_rmsnorm_args(x, residual, weight, eps, /*weight_any_float=*/true);
  RINGATTN_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel, got ", x.device());
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto new_res = at::empty_like(x, at::MemoryFormat::Contiguous);
  launch(y, new_res, x, residual, weight, eps);
  return {y, new_res};
}

void add_rmsnorm_out_cpu(at::Tensor& y, at::Tensor& residual_out, const at::Tensor& x, const at::Tensor& residual,
                         const at::Tensor& weight, double eps) {
  check_add_rmsnorm_args(x, residual, weight, eps, /*weight_any_float=*/true);
  check_add_rmsnorm_out_args(y, residual_out, x, residual, weight);
  RINGATTN_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel, got ", x.device());
  launch(y, residual_out, x, residual, weight, eps);
}

TORCH_LIBRARY_IMPL(ringattn, CPU, m) {
  m.impl("add_rmsnorm", &add_rmsnorm_cpu);
  m.impl("add_rmsnorm_out", &add_rmsnorm_out_cpu);
}

}  // namespace ringattn
