// new_residual = x + residual (rounded to the I/O dtype, as the eager composition does);
// y = rmsnorm(new_residual) * weight with fp32 math, rounded once at the end.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../ops.h"

namespace ringattn {

std::tuple<at::Tensor, at::Tensor> add_rmsnorm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                   const at::Tensor& weight, double eps) {
  // x, residual: tokens... x hidden ; weight: hidden
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dim (..., hidden)");
  TORCH_CHECK(x.sizes() == residual.sizes(), "residual must have the shape of x ", x.sizes(), ", got ",
              residual.sizes());
  TORCH_CHECK(x.scalar_type() == residual.scalar_type(), "residual must have the dtype of x (", x.scalar_type(),
              "), got ", residual.scalar_type());
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, "weight must have shape (", hidden, "), got ",
              weight.sizes());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(residual.is_contiguous(), "residual must be contiguous");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK(x.device() == residual.device() && x.device() == weight.device(),
              "x, residual and weight must be on one device, got ", x.device(), ", ", residual.device(), ", ",
              weight.device());
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  auto y = at::empty_like(x);
  auto new_res = at::empty_like(residual);
  const int64_t rows = hidden == 0 ? 0 : x.numel() / hidden;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_rmsnorm_cpu", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "add_rmsnorm_cpu_w", [&] {
      using W = scalar_t;
      const T* px = x.data_ptr<T>();
      const T* pr = residual.data_ptr<T>();
      const W* pw = weight.data_ptr<W>();
      T* py = y.data_ptr<T>();
      T* pn = new_res.data_ptr<T>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t o = r * hidden;
          float ss = 0.f;
          for (int64_t i = 0; i < hidden; ++i) {
            const T v = T(float(px[o + i]) + float(pr[o + i]));
            pn[o + i] = v;
            ss += float(v) * float(v);
          }
          const float inv = 1.f / std::sqrt(ss / float(hidden) + float(eps));
          for (int64_t i = 0; i < hidden; ++i) py[o + i] = T(float(pn[o + i]) * inv * float(pw[i]));
        }
      });
    });
  });
  return {y, new_res};
}

TORCH_LIBRARY_IMPL(ringattn, CPU, m) { m.impl("add_rmsnorm", &add_rmsnorm_cpu); }

}  // namespace ringattn
