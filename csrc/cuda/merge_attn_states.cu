// Exact merge of partial attention results (CUDA). Same numerics and rules as
// cpu/merge_attn_states.cpp: weights exp(lse_x - max), lse = max + log1p(exp(min - max)); a side
// whose lse is -inf contributes nothing; both -inf -> out 0, lse -inf.
//
// Memory-bound: each (b, s, h) row of head_dim values is handled by a group of D / VEC threads,
// each moving VEC elements per tensor with 16-byte transactions (VEC = 8 -> one 16 B load per
// bf16/fp16 tensor, two for fp32). Rows are ordered (b, s, h) with h fastest, so a block's stores
// to a contiguous out are one contiguous range; the lse reads of a row are a broadcast.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "../ops.h"
#include "vec_utils.cuh"

namespace ringattn {
namespace {

using cuda_utils::VecIO;

constexpr int kThreads = 256;

template <typename OA, typename OB, typename OO, typename L>
struct MergeParams {
  const OA* out_a;  // batch x seqlen x heads x head_dim (head_dim stride 1); == out when in place
  const OB* out_b;  // batch x seqlen x heads x head_dim (head_dim stride 1)
  OO* out;          // batch x seqlen x heads x head_dim (head_dim stride 1)
  const L* lse_a;   // batch x heads x seqlen (seqlen stride 1); == lse when in place
  const L* lse_b;   // batch x heads x seqlen (seqlen stride 1)
  L* lse;           // batch x heads x seqlen (seqlen stride 1)
  int64_t sa[3], sb[3], so[3];  // element strides of out_a / out_b / out over (b, s, h)
  int64_t ta[2], tb[2], to[2];  // element strides of lse_a / lse_b / lse over (b, h)
  uint32_t S, H, D, rows;       // rows = batch * seqlen * heads
};

// blockDim = (threads per row, rows per block). ACC: fp32, or fp64 when any tensor is fp64.
template <typename ACC, int VEC, bool INPLACE, typename OA, typename OB, typename OO, typename L>
__global__ void __launch_bounds__(kThreads) merge_attn_states_kernel(const MergeParams<OA, OB, OO, L> p) {
  const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
  const bool valid = row < p.rows;
  const uint32_t r = valid ? row : 0;
  const uint32_t h = r % p.H, bs = r / p.H;
  const int64_t s = bs % p.S, b = bs / p.S;
  const ACC la = static_cast<ACC>(p.lse_a[b * p.ta[0] + h * p.ta[1] + s]);
  const ACC lb = static_cast<ACC>(p.lse_b[b * p.tb[0] + h * p.tb[1] + s]);
  if constexpr (INPLACE) {
    // lse_a is lse: every thread of the row must read it before thread 0 of the row overwrites it.
    __syncthreads();
  }
  if (!valid) return;

  constexpr ACC kNegInf = -std::numeric_limits<ACC>::infinity();
  const ACC m = la >= lb ? la : lb;  // NaN in either lse -> NaN weights -> NaN out (not hidden)
  ACC ca = 0, cb = 0, lse_out = kNegInf;
  if (m != kNegInf) {
    const ACC wa = cuda_utils::acc_exp(la - m), wb = cuda_utils::acc_exp(lb - m);  // one is 1
    const ACC inv = ACC(1) / (wa + wb);
    ca = wa * inv;
    cb = wb * inv;
    lse_out = m + cuda_utils::acc_log1p(la >= lb ? wb : wa);  // m + log(wa + wb); exactly m for a -inf side
  }
  const bool use_a = ca != ACC(0), use_b = cb != ACC(0);  // a -inf side contributes nothing

  const OA* pa = p.out_a + b * p.sa[0] + s * p.sa[1] + h * p.sa[2];
  const OB* pb = p.out_b + b * p.sb[0] + s * p.sb[1] + h * p.sb[2];
  OO* po = p.out + b * p.so[0] + s * p.so[1] + h * p.so[2];
  const uint32_t nvec = p.D / VEC;
  for (uint32_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    ACC fa[VEC], fb[VEC], fo[VEC];
    if constexpr (INPLACE) {
      VecIO<OA, VEC>::load_rw(pa + v * VEC, fa);
    } else {
      VecIO<OA, VEC>::load(pa + v * VEC, fa);
    }
    VecIO<OB, VEC>::load(pb + v * VEC, fb);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      ACC o = 0;
      if (use_a) o = ca * fa[i];
      if (use_b) o += cb * fb[i];
      fo[i] = o;
    }
    VecIO<OO, VEC>::store(po + v * VEC, fo);
  }
  if (threadIdx.x == 0) p.lse[b * p.to[0] + h * p.to[1] + s] = static_cast<L>(lse_out);
}

// True when `t` (head_dim stride 1) can be read/written VEC elements at a time with transactions
// of min(16, VEC * itemsize) bytes: the base pointer and every (b, s, h) stride are aligned.
bool vec_aligned(const at::Tensor& t, int vec) {
  if (t.size(-1) % vec != 0) return false;
  const int64_t itemsize = t.element_size();
  const int64_t align = std::min<int64_t>(16, vec * itemsize);
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % align != 0) return false;
  for (int d = 0; d < t.dim() - 1; ++d) {
    if (t.size(d) > 1 && (t.stride(d) * itemsize) % align != 0) return false;
  }
  return true;
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <bool INPLACE, typename OA, typename OB, typename OO, typename L>
void launch_merge(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b, const at::Tensor& lse_b,
                  const at::Tensor& out, const at::Tensor& lse) {
  using ACC = std::conditional_t<std::is_same_v<OA, double> || std::is_same_v<OB, double> ||
                                     std::is_same_v<OO, double> || std::is_same_v<L, double>,
                                 double, float>;
  const int64_t B = out_a.size(0), S = out_a.size(1), H = out_a.size(2), D = out_a.size(3);
  const int64_t rows = B * S * H;
  if (rows == 0) return;
  RINGATTN_CHECK(rows < (int64_t(1) << 31) && D < (int64_t(1) << 31), "merge_attn_states: batch * seqlen * heads (",
              rows, ") and head_dim (", D, ") must each be < 2^31");
  MergeParams<OA, OB, OO, L> p;
  p.out_a = cptr<OA>(out_a);
  p.out_b = cptr<OB>(out_b);
  p.out = mptr<OO>(out);
  p.lse_a = cptr<L>(lse_a);
  p.lse_b = cptr<L>(lse_b);
  p.lse = mptr<L>(lse);
  for (int d = 0; d < 3; ++d) {
    p.sa[d] = out_a.stride(d);
    p.sb[d] = out_b.stride(d);
    p.so[d] = out.stride(d);
  }
  for (int d = 0; d < 2; ++d) {
    p.ta[d] = lse_a.stride(d);
    p.tb[d] = lse_b.stride(d);
    p.to[d] = lse.stride(d);
  }
  p.S = static_cast<uint32_t>(S);
  p.H = static_cast<uint32_t>(H);
  p.D = static_cast<uint32_t>(D);
  p.rows = static_cast<uint32_t>(rows);

  int vec = 1;
  for (int cand : {8, 4}) {
    if (vec_aligned(out_a, cand) && vec_aligned(out_b, cand) && vec_aligned(out, cand)) {
      vec = cand;
      break;
    }
  }
  const int64_t nvec = D / vec;
  const int tx = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nvec, kThreads)));
  const int ty = std::max(1, kThreads / tx);
  const dim3 block(tx, ty);
  const dim3 grid(static_cast<unsigned>((rows + ty - 1) / ty));
  const at::cuda::OptionalCUDAGuard device_guard(device_of(out_a));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (vec) {
    case 8: merge_attn_states_kernel<ACC, 8, INPLACE><<<grid, block, 0, stream>>>(p); break;
    case 4: merge_attn_states_kernel<ACC, 4, INPLACE><<<grid, block, 0, stream>>>(p); break;
    default: merge_attn_states_kernel<ACC, 1, INPLACE><<<grid, block, 0, stream>>>(p); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void dispatch_out_dtype(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kDouble: f(double{}); break;
    default: RINGATTN_CHECK(false, name, " must be float16/bfloat16/float32/float64, got ", t);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> merge_attn_states_cuda(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                          const at::Tensor& out_b, const at::Tensor& lse_b) {
  // out_a, out_b: batch x seqlen x heads x head_dim ; lse_a, lse_b: batch x heads x seqlen
  check_merge_args(out_a, lse_a, out_b, lse_b);
  RINGATTN_CHECK(out_a.is_cuda(), "out_a must be a CUDA tensor for the CUDA kernel, got ", out_a.device());
  auto out = at::empty(out_a.sizes(), out_a.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty(lse_a.sizes(), lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  dispatch_out_dtype(out_a.scalar_type(), "out_a", [&](auto tag) {
    using T = decltype(tag);
    if (lse_a.scalar_type() == at::kDouble) {  // the all-fp64 mode (check_merge_args allows no other)
      if constexpr (std::is_same_v<T, double>) {
        launch_merge<false, T, T, T, double>(out_a, lse_a, out_b, lse_b, out, lse);
      } else {
        RINGATTN_CHECK(false, "lse_a may be float64 only when out_a and out_b are float64, got ", out_a.scalar_type());
      }
    } else {
      launch_merge<false, T, T, T, float>(out_a, lse_a, out_b, lse_b, out, lse);
    }
  });
  return {out, lse};
}

void merge_attn_states_cuda_(at::Tensor& acc_out, at::Tensor& acc_lse, const at::Tensor& part_out,
                             const at::Tensor& part_lse) {
  // acc_out, part_out: batch x seqlen x heads x head_dim ; acc_lse, part_lse: batch x heads x seqlen
  check_merge_inplace_args(acc_out, acc_lse, part_out, part_lse);
  RINGATTN_CHECK(acc_out.is_cuda(), "acc_out must be a CUDA tensor for the CUDA kernel, got ", acc_out.device());
  if (acc_out.scalar_type() == at::kDouble) {  // the all-fp64 reference mode
    launch_merge<true, double, double, double, double>(acc_out, acc_lse, part_out, part_lse, acc_out, acc_lse);
    return;
  }
  dispatch_out_dtype(part_out.scalar_type(), "part_out", [&](auto tag) {
    using T = decltype(tag);
    launch_merge<true, float, T, float, float>(acc_out, acc_lse, part_out, part_lse, acc_out, acc_lse);
  });
}

TORCH_LIBRARY_IMPL(ringattn, CUDA, m) {
  m.impl("merge_attn_states", &merge_attn_states_cuda);
  m.impl("merge_attn_states_", &merge_attn_states_cuda_);
}

}  // namespace ringattn
