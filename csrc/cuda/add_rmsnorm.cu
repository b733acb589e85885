// new_residual = x + residual (rounded to the I/O dtype, as the eager composition does);
// y = rmsnorm(new_residual) * weight with fp32 math (fp64 for fp64 I/O), rounded once at the end.
// Same numerics as cpu/add_rmsnorm.cpp.
//
// Fast path (bf16/fp16/fp32, hidden % (16 / itemsize) == 0, 16-byte aligned): a row is split over
// a group of threads, each holding VPT 16-byte vectors of the row in registers, so x and residual
// are read once and y / new_residual written once (the DRAM minimum). The sum of squares is a
// warp-shuffle reduction (plus one shared-memory step when a row spans several warps). Small rows
// pack several rows per 256-thread block so the SMs stay full. Vectors per thread (1, 2 or 4) are
// chosen from the occupancy the device reports for each instantiation (see choose_vpt): the
// default is the fewest vectors that keep a row within 256 threads, and another choice is taken
// only when it fills the last wave of resident blocks clearly better (1024 x 8192 bf16 on an H100:
// 3 blocks of 256 threads per SM at 80 registers -> 2.6 waves, the measured 76% of copy
// bandwidth; 512 threads at 2 vectors -> 3.9 waves). RINGATTN_ADD_RMSNORM_VPT=1|2|4 forces a choice
// where it is valid (benchmarks compare them). Anything else (odd hidden, fp64,
// misaligned pointers, hidden > 16k at 16 bits) takes the general kernel: scalar loads, and the second pass
// re-reads new_residual (its own writes, from L2) instead of holding the row in registers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <type_traits>

#include "../ops.h"
#include "vec_utils.cuh"

namespace ringattn {
namespace {

using cuda_utils::VecIO;

// Sum of v over the threadIdx.x group of one row. blockDim.x is a power of two <= 32 (several
// rows per block, each row's lanes inside one warp) or a multiple of 32 (one row per block).
// Every thread of the block must call it (no early return before).
template <typename ACC>
__device__ __forceinline__ ACC row_sum(ACC v) {
  const int width = blockDim.x < 32 ? blockDim.x : 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    if (o < width) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  if (blockDim.x <= 32) return v;
  __shared__ ACC warp_sums[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : ACC(0);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// y, new_res, x, res: rows x hidden (contiguous) ; w: hidden. VEC = 16 / sizeof(T); VPT vectors
// per thread; blockDim = (threads per row, rows per block).
template <typename T, typename W, int VEC, int VPT>
__global__ void __launch_bounds__(512)  // <= 128 registers: the row (VPT * VEC floats) stays in registers
    add_rmsnorm_vec_kernel(T* __restrict__ y, T* __restrict__ new_res, const T* __restrict__ x,
                           const T* __restrict__ res, const W* __restrict__ w, uint32_t rows, int hidden, float eps) {
  const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const int nvec = hidden / VEC;
  const int64_t off = static_cast<int64_t>(valid ? row : 0) * hidden;
  float fx[VPT][VEC], fr[VPT][VEC];
#pragma unroll
  for (int k = 0; k < VPT; ++k) {  // all loads first: 2 * VPT 16-byte loads in flight per thread
    const int v = threadIdx.x + k * blockDim.x;
    if (valid && v < nvec) {
      VecIO<T, VEC>::load(x + off + v * VEC, fx[k]);
      VecIO<T, VEC>::load(res + off + v * VEC, fr[k]);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int v = threadIdx.x + k * blockDim.x;
    if (valid && v < nvec) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        fx[k][i] = static_cast<float>(static_cast<T>(fx[k][i] + fr[k][i]));  // rounded like eager x + residual
        ss += fx[k][i] * fx[k][i];
      }
      VecIO<T, VEC>::store(new_res + off + v * VEC, fx[k]);
    }
  }
  ss = row_sum(ss);
  const float inv = rsqrtf(ss / static_cast<float>(hidden) + eps);
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int v = threadIdx.x + k * blockDim.x;
    if (valid && v < nvec) {
      float fw[VEC];
      VecIO<W, VEC>::load(w + v * VEC, fw);
#pragma unroll
      for (int i = 0; i < VEC; ++i) fx[k][i] = fx[k][i] * inv * fw[i];
      VecIO<T, VEC>::store(y + off + v * VEC, fx[k]);
    }
  }
}

// General kernel: any hidden, any alignment, fp64 too. Same launch shape rules as above.
template <typename T, typename W, typename ACC>
__global__ void __launch_bounds__(1024)
    add_rmsnorm_kernel(T* __restrict__ y, T* __restrict__ new_res, const T* __restrict__ x,
                       const T* __restrict__ res, const W* __restrict__ w, uint32_t rows, int hidden, ACC eps) {
  const uint32_t row = blockIdx.x * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const int64_t off = static_cast<int64_t>(valid ? row : 0) * hidden;
  ACC ss = 0;
  if (valid) {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
      const T t = static_cast<T>(static_cast<ACC>(x[off + i]) + static_cast<ACC>(res[off + i]));
      new_res[off + i] = t;
      ss += static_cast<ACC>(t) * static_cast<ACC>(t);
    }
  }
  ss = row_sum(ss);
  const ACC inv = cuda_utils::acc_rsqrt(ss / static_cast<ACC>(hidden) + eps);
  if (valid) {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {  // new_res: this thread's own writes
      y[off + i] = static_cast<T>(static_cast<ACC>(new_res[off + i]) * inv * static_cast<ACC>(w[i]));
    }
  }
}

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Block shape for `lanes` threads' worth of work per row: a power-of-two group <= 32 packed 256
// threads to a block, or one row per block of whole warps.
dim3 row_block(int64_t lanes) {
  if (lanes <= 32) {
    const int tx = next_pow2(std::max<int64_t>(lanes, 1));
    return dim3(tx, 256 / tx);
  }
  return dim3(static_cast<unsigned>((lanes + 31) / 32 * 32), 1);
}

template <typename T, typename W, int VPT>
void launch_vec(dim3 grid, dim3 block, cudaStream_t stream, T* py, T* pn, const T* px, const T* pr, const W* pw,
                uint32_t rows, int hidden, float eps) {
  add_rmsnorm_vec_kernel<T, W, 16 / sizeof(T), VPT><<<grid, block, 0, stream>>>(py, pn, px, pr, pw, rows, hidden, eps);
}

// Resident blocks per SM of add_rmsnorm_vec_kernel<T, W, VEC, VPT> at `threads` threads, as the
// driver reports it (registers decide); cached per (device, threads / 32).
template <typename T, typename W, int VPT>
int blocks_per_sm(int device, int threads) {
  static std::atomic<int> cache[64][17] = {};
  const int slot = threads / 32;
  if (device < 0 || device >= 64 || slot > 16) return 1;
  int n = cache[device][slot].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, add_rmsnorm_vec_kernel<T, W, 16 / sizeof(T), VPT>, threads, 0));
    n = std::max(n, 1);
    cache[device][slot].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Fraction of the resident-block slots that do work, summed over the waves `rows` rows take.
double wave_efficiency(int64_t rows, int64_t rows_per_wave) {
  const int64_t waves = (rows + rows_per_wave - 1) / rows_per_wave;
  return static_cast<double>(rows) / static_cast<double>(waves * rows_per_wave);
}

// Vectors per thread for a row of `nvec` 16-byte vectors (0: the row is too long for the vector
// kernel). Candidates keep a block within 512 threads (the kernel's launch bound).
template <typename T, typename W>
int choose_vpt(int64_t nvec, int64_t rows, int device) {
  const auto lanes = [&](int v) { return (nvec + v - 1) / v; };
  int dflt = 0;
  for (int cand : {1, 2, 4}) {
    if (lanes(cand) <= 256) {
      dflt = cand;
      break;
    }
  }
  if (dflt == 0 && lanes(4) <= 512) dflt = 4;
  if (dflt == 0) return 0;
  const auto valid = [&](int v) { return (v == 1 || v == 2 || v == 4) && lanes(v) <= 512; };
  if (const char* env = std::getenv("RINGATTN_ADD_RMSNORM_VPT")) {
    const int forced = std::atoi(env);
    if (valid(forced)) return forced;
  }
  const int sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  const auto efficiency = [&](int v) {
    const dim3 b = row_block(lanes(v));
    const int threads = static_cast<int>(b.x * b.y);
    const int per_sm = v == 1 ? blocks_per_sm<T, W, 1>(device, threads)
                              : v == 2 ? blocks_per_sm<T, W, 2>(device, threads) : blocks_per_sm<T, W, 4>(device, threads);
    return wave_efficiency(rows, int64_t(per_sm) * sms * b.y);
  };
  int best = dflt;
  double best_eff = efficiency(dflt);
  const double dflt_eff = best_eff;
  for (int cand : {1, 2, 4}) {
    if (cand == dflt || !valid(cand)) continue;
    const double e = efficiency(cand);
    if (e > best_eff) {
      best = cand;
      best_eff = e;
    }
  }
  return best_eff > dflt_eff + 0.05 ? best : dflt;  // only a clear gain moves off the default
}

template <typename T, typename W>
void launch_add_rmsnorm(const at::Tensor& y, const at::Tensor& new_res, const at::Tensor& x,
                        const at::Tensor& residual, const at::Tensor& weight, double eps) {
  const int64_t hidden = x.size(-1);
  const int64_t rows = hidden == 0 ? 0 : x.numel() / hidden;
  if (rows == 0) return;
  RINGATTN_CHECK(rows < (int64_t(1) << 31) && hidden < (int64_t(1) << 31), "add_rmsnorm: tokens (", rows,
              ") and hidden (", hidden, ") must each be < 2^31");
  const at::cuda::OptionalCUDAGuard device_guard(device_of(x));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  T* py = reinterpret_cast<T*>(y.data_ptr());
  T* pn = reinterpret_cast<T*>(new_res.data_ptr());
  const T* px = reinterpret_cast<const T*>(x.data_ptr());
  const T* pr = reinterpret_cast<const T*>(residual.data_ptr());
  const W* pw = reinterpret_cast<const W*>(weight.data_ptr());
  const auto aligned = [](const void* ptr, int64_t a) { return reinterpret_cast<uintptr_t>(ptr) % a == 0; };

  if constexpr (!std::is_same_v<T, double>) {
    constexpr int VEC = 16 / sizeof(T);
    const int64_t nvec = hidden / VEC;
    const bool vec_ok = hidden % VEC == 0 && aligned(py, 16) && aligned(pn, 16) && aligned(px, 16) &&
                        aligned(pr, 16) && aligned(pw, std::min<int64_t>(16, VEC * sizeof(W)));
    const int vpt = vec_ok ? choose_vpt<T, W>(nvec, rows, x.get_device()) : 0;
    if (vpt != 0) {
      const dim3 block = row_block((nvec + vpt - 1) / vpt);
      const dim3 grid(static_cast<unsigned>((rows + block.y - 1) / block.y));
      const uint32_t nrows = static_cast<uint32_t>(rows);
      const int h = static_cast<int>(hidden);
      const float e = static_cast<float>(eps);
      if (vpt == 1) {
        launch_vec<T, W, 1>(grid, block, stream, py, pn, px, pr, pw, nrows, h, e);
      } else if (vpt == 2) {
        launch_vec<T, W, 2>(grid, block, stream, py, pn, px, pr, pw, nrows, h, e);
      } else {
        launch_vec<T, W, 4>(grid, block, stream, py, pn, px, pr, pw, nrows, h, e);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  using ACC = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const dim3 block = row_block(std::min<int64_t>(1024, (hidden + 7) / 8));  // ~8 elements per thread
  const dim3 grid(static_cast<unsigned>((rows + block.y - 1) / block.y));
  add_rmsnorm_kernel<T, W, ACC><<<grid, block, 0, stream>>>(py, pn, px, pr, pw, static_cast<uint32_t>(rows),
                                                           static_cast<int>(hidden), static_cast<ACC>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dispatch(const at::Tensor& y, const at::Tensor& new_res, const at::Tensor& x, const at::Tensor& residual,
              const at::Tensor& weight, double eps) {
  const bool w32 = weight.scalar_type() == at::kFloat;
  switch (x.scalar_type()) {
    case at::kFloat: launch_add_rmsnorm<float, float>(y, new_res, x, residual, weight, eps); break;
    case at::kHalf:
      w32 ? launch_add_rmsnorm<at::Half, float>(y, new_res, x, residual, weight, eps)
          : launch_add_rmsnorm<at::Half, at::Half>(y, new_res, x, residual, weight, eps);
      break;
    case at::kBFloat16:
      w32 ? launch_add_rmsnorm<at::BFloat16, float>(y, new_res, x, residual, weight, eps)
          : launch_add_rmsnorm<at::BFloat16, at::BFloat16>(y, new_res, x, residual, weight, eps);
      break;
    case at::kDouble:
      w32 ? launch_add_rmsnorm<double, float>(y, new_res, x, residual, weight, eps)
          : launch_add_rmsnorm<double, double>(y, new_res, x, residual, weight, eps);
      break;
    default: RINGATTN_CHECK(false, "x must be float16/bfloat16/float32/float64, got ", x.scalar_type());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> add_rmsnorm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps) {
  // x, residual: tokens... x hidden ; weight: hidden
  check_add_rmsnorm_args(x, residual, weight, eps, /*weight_any_float=*/false);
  RINGATTN_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto new_res = at::empty_like(x, at::MemoryFormat::Contiguous);
  dispatch(y, new_res, x, residual, weight, eps);
  return {y, new_res};
}

void add_rmsnorm_out_cuda(at::Tensor& y, at::Tensor& residual_out, const at::Tensor& x, const at::Tensor& residual,
                          const at::Tensor& weight, double eps) {
  // y, residual_out, x, residual: tokens... x hidden ; weight: hidden
  check_add_rmsnorm_args(x, residual, weight, eps, /*weight_any_float=*/false);
  check_add_rmsnorm_out_args(y, residual_out, x, residual, weight);
  RINGATTN_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  dispatch(y, residual_out, x, residual, weight, eps);
}

TORCH_LIBRARY_IMPL(ringattn, CUDA, m) {
  m.impl("add_rmsnorm", &add_rmsnorm_cuda);
  m.impl("add_rmsnorm_out", &add_rmsnorm_out_cuda);
}

}  // namespace ringattn
