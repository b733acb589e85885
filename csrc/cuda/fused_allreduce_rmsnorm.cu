// Fused AllReduce + residual + RMSNorm over PyTorch symmetric memory (TokenWeave, arXiv 2505.11329).
//
// One kernel on a few CTAs replaces all_reduce(x) -> x + residual -> rmsnorm:
//   two-shot (P2P):  rank r sums its token shard over every peer's in-region (fp32), adds its
//                    residual rows, normalises, and stores y (and, if asked, the new residual)
//                    into every peer's out-region: reduce-scatter + norm + all-gather, one launch.
//   one-shot (P2P):  every rank sums all rows over all peers and normalises locally (few tokens).
//   multimem (NVLS): two-shot with multimem.ld_reduce / multimem.st on the multicast address
//                    (Hopper behind an NVSwitch). Compiled for sm_90+; UNTESTED on hardware here
//                    (the lent H100 reports no multicast); gated at run time on multicast_ptr != 0.
// Buffers, peer pointers and signal pads come from torch.distributed._symmetric_memory; the
// Python side (ringattn/tokenweave/fused_allreduce_rmsnorm.py) passes them in as integers, like
// vLLM's custom all-reduce handle. Layout and protocol: fused_allreduce_rmsnorm.cuh.
//
// Synchronisation: block b of each rank meets block b of every peer at a start barrier (all
// inputs written) and an end barrier (all peer reads and writes done). Each signal is a CAS
// 0 -> signature with system-scope release, consumed by a CAS signature -> 0 with acquire, so the
// pads are zero again after every call (CUDA-graph replay safe, no host reset). A barrier gives
// up after timeout_ns (0 = never) and reports in the host-mapped status words instead of hanging.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/all.h>
#include <torch/library.h>

#include <cstring>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "fused_allreduce_rmsnorm.cuh"
#include "../ops.h"

namespace ringattn::tokenweave {
namespace {

// ---- memory-model primitives (system scope: peers are other processes / other GPUs) --------

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint32_t cas_release_sys(uint32_t* addr, uint32_t cmp, uint32_t val) {
  uint32_t old;
  asm volatile("atom.release.sys.global.cas.b32 %0, [%1], %2, %3;" : "=r"(old) : "l"(addr), "r"(cmp), "r"(val) : "memory");
  return old;
}

__device__ __forceinline__ uint32_t cas_acquire_sys(uint32_t* addr, uint32_t cmp, uint32_t val) {
  uint32_t old;
  asm volatile("atom.acquire.sys.global.cas.b32 %0, [%1], %2, %3;" : "=r"(old) : "l"(addr), "r"(cmp), "r"(val) : "memory");
  return old;
}

__device__ __forceinline__ uint32_t exch_acquire_sys(uint32_t* addr, uint32_t val) {
  uint32_t old;
  asm volatile("atom.acquire.sys.global.exch.b32 %0, [%1], %2;" : "=r"(old) : "l"(addr), "r"(val) : "memory");
  return old;
}

__device__ __forceinline__ uint32_t ld_relaxed_sys(const uint32_t* addr) {
  uint32_t v;
  asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(addr) : "memory");
  return v;
}

struct Status {
  int32_t* words;  // host-mapped pinned int32[kStWords], or nullptr
  __device__ void report(int32_t code, int rank, int block, int peer, uint32_t seen, uint32_t expected, int phase) const {
    if (words == nullptr) return;
    volatile int32_t* w = words;
    w[kStRank] = rank;
    w[kStBlock] = block;
    w[kStPeer] = peer;
    w[kStSeen] = static_cast<int32_t>(seen);
    w[kStExpected] = static_cast<int32_t>(expected);
    w[kStPhase] = phase;
    __threadfence_system();
    w[kStCode] = code;  // written last: the host polls this word
  }
};

struct BarrierArgs {
  uint32_t** signal_pads;  // world_size device pointers (peer pads), from signal_pad_ptrs_dev
  int rank;
  int world_size;
  int slot;
  uint32_t signature;
  uint64_t timeout_ns;  // 0 = wait forever
  Status status;
};

// Block `blockIdx.x` of this rank meets block `blockIdx.x` of every peer. Returns the block-wide
// outcome: kOk, kTimeout or kSignatureMismatch. Thread t < world_size handles peer t.
__device__ int32_t block_barrier(const BarrierArgs& a, int phase, int32_t* s_code) {
  __threadfence_system();  // this block's prior writes (e.g. to peers) before the release below
  if (threadIdx.x == 0) *s_code = kOk;
  __syncthreads();
  if (threadIdx.x < a.world_size) {
    const int peer = threadIdx.x;
    const uint64_t t0 = a.timeout_ns ? globaltimer_ns() : 0;
    int32_t code = kOk;
    // put: our signature into the peer's pad at [block][our rank]; spins while the previous
    // signal there is not yet consumed.
    uint32_t* dst = a.signal_pads[peer] + signal_index(a.slot, phase, blockIdx.x, a.rank, a.world_size);
    while (cas_release_sys(dst, 0u, a.signature) != 0u) {
      if (a.timeout_ns && globaltimer_ns() - t0 > a.timeout_ns) {
        code = kTimeout;
        a.status.report(kTimeout, a.rank, blockIdx.x, peer, ld_relaxed_sys(dst), a.signature, 2 * phase);
        break;
      }
    }
    // wait: the peer's signature in our pad at [block][peer]; consume it (reset to 0).
    uint32_t* src = a.signal_pads[a.rank] + signal_index(a.slot, phase, blockIdx.x, peer, a.world_size);
    while (code == kOk) {
      const uint32_t seen = ld_relaxed_sys(src);
      if (seen == a.signature) {
        if (cas_acquire_sys(src, a.signature, 0u) == a.signature) break;
      } else if (seen != 0u) {
        exch_acquire_sys(src, 0u);  // keep the pads zero even on a mismatch
        code = kSignatureMismatch;
        a.status.report(kSignatureMismatch, a.rank, blockIdx.x, peer, seen, a.signature, 2 * phase + 1);
      } else if (a.timeout_ns && globaltimer_ns() - t0 > a.timeout_ns) {
        code = kTimeout;
        a.status.report(kTimeout, a.rank, blockIdx.x, peer, 0u, a.signature, 2 * phase + 1);
      }
    }
    if (code != kOk) atomicMax(s_code, code);
  }
  __syncthreads();
  const int32_t out = *s_code;
  __syncthreads();
  return out;
}

// ---- element conversion and 16-byte / scalar global accesses --------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Loads bypass L1 (ld.global.cg): peer rows are written by other processes during this kernel's
// lifetime, so a stale L1 line must never serve them.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_cg(const T* p) {
  Pack<T, VEC> out;
  if constexpr (sizeof(T) * VEC == 16) {
    const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(p));
    memcpy(&out, &raw, 16);
  } else if constexpr (sizeof(T) * VEC == 4) {
    const unsigned int raw = __ldcg(reinterpret_cast<const unsigned int*>(p));
    memcpy(&out, &raw, 4);
  } else {
    static_assert(sizeof(T) * VEC == 2, "pack must be 2, 4 or 16 bytes");
    const unsigned short raw = __ldcg(reinterpret_cast<const unsigned short*>(p));
    memcpy(&out, &raw, 2);
  }
  return out;
}

// Stores as one 16-byte / 4-byte / 2-byte access (st.global.cg, like the loads: L2, no L1). A
// plain struct copy (`*(Pack*)p = v`), and even a uint4 store of the memcpy'd pack, came out of
// nvcc as 2- and 4-byte stores for 2-byte types (seen in the PTX): up to 8 NVLink writes per 16
// bytes on the peer stores. __stcg is inline PTX, so the width is fixed.
template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const Pack<T, VEC>& v) {
  if constexpr (sizeof(T) * VEC == 16) {
    uint4 raw;
    memcpy(&raw, &v, 16);
    __stcg(reinterpret_cast<uint4*>(p), raw);
  } else if constexpr (sizeof(T) * VEC == 4) {
    unsigned int raw;
    memcpy(&raw, &v, 4);
    __stcg(reinterpret_cast<unsigned int*>(p), raw);
  } else {
    static_assert(sizeof(T) * VEC == 2, "pack must be 2, 4 or 16 bytes");
    unsigned short raw;
    memcpy(&raw, &v, 2);
    __stcg(reinterpret_cast<unsigned short*>(p), raw);
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define RINGATTN_TW_HAS_MULTIMEM 1
// 16 bytes reduced across every rank's copy of `p` (the multicast address), fp32 accumulation.
template <typename T>
__device__ __forceinline__ Pack<T, 16 / sizeof(T)> multimem_ld_reduce_add(const T* p) {
  uint32_t r[4];
  if constexpr (std::is_same_v<T, float>) {
    asm volatile("multimem.ld_reduce.relaxed.sys.global.add.v4.f32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p) : "memory");
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.bf16x2 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p) : "memory");
  } else {
    asm volatile("multimem.ld_reduce.relaxed.sys.global.add.acc::f32.v4.f16x2 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "l"(p) : "memory");
  }
  Pack<T, 16 / sizeof(T)> out;
  memcpy(&out, r, 16);
  return out;
}

// 16 bytes stored to every rank's copy of `p` (bitwise; the .f32 type only names the width).
template <typename T>
__device__ __forceinline__ void multimem_st(T* p, const Pack<T, 16 / sizeof(T)>& v) {
  uint32_t r[4];
  memcpy(r, &v, 16);
  asm volatile("multimem.st.relaxed.sys.global.v4.f32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(r[0]), "r"(r[1]), "r"(r[2]),
               "r"(r[3])
               : "memory");
}
#else
#define RINGATTN_TW_HAS_MULTIMEM 0
#endif

// Sum of v over the `group` threads of one row group (a multiple of 32; groups are aligned).
// s_red: rows_per_block x (kMaxThreads / 32) floats. Every thread of the block must call it.
__device__ __forceinline__ float group_sum(float v, float* s_red, int group) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warps = group >> 5;
  if (warps == 1) return v;
  const int g = threadIdx.x / group, w = (threadIdx.x % group) >> 5, lane = threadIdx.x & 31;
  float* mine = s_red + g * (kMaxThreads / 32);
  if (lane == 0) mine[w] = v;
  __syncthreads();
  v = lane < warps ? mine[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // s_red is reused by the next rows
  return v;
}

struct KernelArgs {
  char* const* buffer_ptrs;  // world_size peer buffer bases (device array)
  char* multicast_ptr;       // multicast base (multimem mode) or nullptr
  int64_t in_offset, out_offset, res_offset;  // byte offsets of the regions (same on every rank)
  const void* residual;      // tokens x hidden (kResInFull) or shard_rows x hidden
  void* residual_out;        // shard_rows x hidden, or (one-shot + gather) tokens x hidden
  bool res_out_full;         // one-shot + gather: residual_out holds all tokens (else the shard rows)
  void* y_out;               // one-shot only: tokens x hidden, local
  const void* weight;        // hidden
  int64_t tokens, hidden;
  int64_t mode;
  float eps;
  int group, rows_per_block;  // launch_shape(): threads per row, rows per CTA
  BarrierArgs barrier;
};

// T: I/O dtype; Wt: weight dtype (T or float); VEC: elements per access (16 bytes, or 1);
// PER: accesses per thread per row. Rows [begin, end) are dealt out rows_per_block at a time.
// __launch_bounds__(512, 1): up to 128 registers. With the bare (512) bound ptxas capped some sm_90a
// instances (fp32, the scalar path) at 64 registers and spilled up to 1.1 KB per thread.
template <typename T, typename Wt, int VEC, int PER>
__global__ void __launch_bounds__(kMaxThreads, 1) fused_allreduce_rmsnorm_kernel(KernelArgs a) {
  __shared__ float s_red[kMaxThreads / 32 * (kMaxThreads / 32)];
  __shared__ int32_t s_code;
  // Fail-stop: once this rank's status holds a failure (a timeout or a mismatch in an earlier
  // call, which leaves stale signals in the pads), every later kernel -- e.g. calls queued before
  // the host saw the failure -- touches neither pads nor buffers; its peers time out and report
  // too, instead of pairing with a stale signal and mixing rows. Read once per block (thread 0),
  // broadcast through shared memory so the block takes one branch.
  if (threadIdx.x == 0) {
    const volatile int32_t* st = a.barrier.status.words;
    s_code = st != nullptr ? st[kStCode] : kOk;
  }
  __syncthreads();
  if (s_code != kOk) return;
  const int rank = a.barrier.rank, world = a.barrier.world_size;
  const bool one_shot = a.mode & kOneShot;
  const bool multimem = a.mode & kMultimem;
  const bool res_in_full = a.mode & kResInFull;
  const bool res_out_gather = a.mode & kResOutGather;
  const int64_t H = a.hidden;
  const int64_t my_begin = shard_begin(a.tokens, world, rank), my_end = shard_end(a.tokens, world, rank);
  const int64_t begin = one_shot ? 0 : my_begin, end = one_shot ? a.tokens : my_end;
  const int gidx = threadIdx.x / a.group, lane = threadIdx.x % a.group;

  int32_t code = block_barrier(a.barrier, 0, &s_code);
  if (code == kTimeout) return;  // a peer is missing: the end barrier would only time out again
#if RINGATTN_TW_HAS_MULTIMEM
  if (multimem) asm volatile("fence.proxy.alias;" ::: "memory");  // unicast-written inputs -> multimem loads
#else
  if (multimem && code == kOk) {
    if (threadIdx.x == 0) a.barrier.status.report(kMultimemUnsupported, rank, blockIdx.x, -1, 0, 0, 0);
    code = kMultimemUnsupported;
  }
#endif
  const T* residual = static_cast<const T*>(a.residual);
  const Wt* weight = static_cast<const Wt*>(a.weight);
  // Every thread runs the same number of iterations (the group reduction syncs the block).
  for (int64_t base = begin + int64_t(blockIdx.x) * a.rows_per_block; code == kOk && base < end;
       base += int64_t(gridDim.x) * a.rows_per_block) {
    const int64_t row = base + gidx;
    const bool valid = row < end;
    Pack<T, VEC> nr[PER];  // the new residual of this thread's columns, as stored (I/O dtype)
    float ss = 0.f;
    // 1) loads only (peers' partials, our residual): nothing stored in between, so they can all
    //    be in flight at once. Peers in rank order on every rank: one-shot sums are identical.
#pragma unroll
    for (int it = 0; it < PER; ++it) {
      const int64_t col = (int64_t(it) * a.group + lane) * VEC;
      if (valid && col < H) {
        float sum[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum[j] = 0.f;
        if (multimem) {
#if RINGATTN_TW_HAS_MULTIMEM
          if constexpr (sizeof(T) * VEC == 16) {
            const auto p = multimem_ld_reduce_add<T>(reinterpret_cast<const T*>(a.multicast_ptr + a.in_offset) + row * H + col);
#pragma unroll
            for (int j = 0; j < VEC; ++j) sum[j] = to_float(p.v[j]);
          }
#endif
        } else {
          Pack<T, VEC> pv[kMaxWorldSize];
#pragma unroll
          for (int p = 0; p < kMaxWorldSize; ++p)
            if (p < world) pv[p] = load_cg<T, VEC>(reinterpret_cast<const T*>(a.buffer_ptrs[p] + a.in_offset) + row * H + col);
#pragma unroll
          for (int p = 0; p < kMaxWorldSize; ++p)
            if (p < world) {
#pragma unroll
              for (int j = 0; j < VEC; ++j) sum[j] += to_float(pv[p].v[j]);
            }
        }
        const T* res_row = residual + (res_in_full ? row : row - my_begin) * H;
        const auto r = load_cg<T, VEC>(res_row + col);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          nr[it].v[j] = from_float<T>(sum[j] + to_float(r.v[j]));  // rounded like add_rmsnorm
          const float f = to_float(nr[it].v[j]);
          ss += f * f;
        }
      }
    }
    // 2) the new residual rows
#pragma unroll
    for (int it = 0; it < PER; ++it) {
      const int64_t col = (int64_t(it) * a.group + lane) * VEC;
      if (!(valid && col < H)) continue;
      const bool own_row = row >= my_begin && row < my_end;
      if (one_shot) {
        if (a.res_out_full) store<T, VEC>(static_cast<T*>(a.residual_out) + row * H + col, nr[it]);
        else if (own_row) store<T, VEC>(static_cast<T*>(a.residual_out) + (row - my_begin) * H + col, nr[it]);
      } else if (res_out_gather) {
        if (multimem) {
#if RINGATTN_TW_HAS_MULTIMEM
          if constexpr (sizeof(T) * VEC == 16) multimem_st<T>(reinterpret_cast<T*>(a.multicast_ptr + a.res_offset) + row * H + col, nr[it]);
#endif
        } else {
          for (int p = 0; p < world; ++p) store<T, VEC>(reinterpret_cast<T*>(a.buffer_ptrs[p] + a.res_offset) + row * H + col, nr[it]);
        }
      } else {
        store<T, VEC>(static_cast<T*>(a.residual_out) + (row - my_begin) * H + col, nr[it]);
      }
    }
    // 3) normalise and store y (to every peer, or locally for one-shot)
    const float inv = rsqrtf(group_sum(ss, s_red, a.group) / float(H) + a.eps);  // as add_rmsnorm
#pragma unroll
    for (int it = 0; it < PER; ++it) {
      const int64_t col = (int64_t(it) * a.group + lane) * VEC;
      if (!(valid && col < H)) continue;
      Pack<T, VEC> y;
#pragma unroll
      for (int j = 0; j < VEC; ++j) y.v[j] = from_float<T>(to_float(nr[it].v[j]) * inv * to_float(weight[col + j]));
      if (one_shot) {
        store<T, VEC>(static_cast<T*>(a.y_out) + row * H + col, y);
      } else if (multimem) {
#if RINGATTN_TW_HAS_MULTIMEM
        if constexpr (sizeof(T) * VEC == 16) multimem_st<T>(reinterpret_cast<T*>(a.multicast_ptr + a.out_offset) + row * H + col, y);
#endif
      } else {
        for (int p = 0; p < world; ++p) store<T, VEC>(reinterpret_cast<T*>(a.buffer_ptrs[p] + a.out_offset) + row * H + col, y);
      }
    }
  }
#if RINGATTN_TW_HAS_MULTIMEM
  if (multimem) asm volatile("fence.proxy.alias;" ::: "memory");  // multimem stores -> peers' unicast reads
#endif
  block_barrier(a.barrier, 1, &s_code);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Pinned host status words -> device address (the same under UVA), cached: the lookup is not
// stream-ordered and is kept out of CUDA-graph capture after the first (eager) call.
int32_t* status_device_ptr(int64_t host_ptr) {
  static std::mutex mu;
  static std::unordered_map<int64_t, int32_t*> cache;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(host_ptr);
  if (it != cache.end()) return it->second;
  void* dev = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&dev, reinterpret_cast<void*>(host_ptr), 0));
  cache.emplace(host_ptr, static_cast<int32_t*>(dev));
  return static_cast<int32_t*>(dev);
}

}  // namespace

// See csrc/fused_allreduce_rmsnorm.cpp for the schema and the argument contract.
//   local_in:     tokens x hidden, this rank's in-region view (dtype, shape, device; partials)
//   y_out:        tokens x hidden (two-shot: this rank's out-region view; one-shot: any tensor)
//   residual:     tokens x hidden (mode & kResInFull) or shard_rows x hidden
//   residual_out: tokens x hidden (mode & kResOutGather; two-shot: the local res-region view) or shard_rows x hidden
//   weight:       hidden, dtype of local_in or fp32
void fused_allreduce_rmsnorm_cuda_(const at::Tensor& local_in, at::Tensor& y_out, const at::Tensor& residual,
                                   at::Tensor& residual_out, const at::Tensor& weight, int64_t buffer_ptrs_dev,
                                   int64_t signal_pad_ptrs_dev, int64_t multicast_ptr, int64_t rank, int64_t world_size,
                                   int64_t in_offset, int64_t out_offset, int64_t res_offset, int64_t slot,
                                   int64_t num_blocks, int64_t mode, double eps, int64_t timeout_ns, int64_t status_ptr) {
  RINGATTN_CHECK(local_in.is_cuda(), "local_in must be a CUDA tensor, got ", local_in.device());
  check_fused_allreduce_rmsnorm_args(local_in, y_out, residual, residual_out, weight, buffer_ptrs_dev,
                                     signal_pad_ptrs_dev, rank, world_size, slot, num_blocks, mode, eps);
  const bool one_shot = mode & kOneShot, multimem = mode & kMultimem, gather = mode & kResOutGather;
  RINGATTN_CHECK(!(one_shot && multimem), "one-shot and multimem modes are exclusive");
  RINGATTN_CHECK(!multimem || multicast_ptr != 0, "multimem mode needs multicast_ptr != 0");
  const int64_t T = local_in.size(0), H = local_in.size(1);
  const auto dt = local_in.scalar_type();
  if (T == 0) return;  // every rank agrees on T: nobody launches, nobody waits

  const c10::cuda::CUDAGuard guard(local_in.device());
  const LaunchShape shape = launch_shape(H, local_in.element_size());
  const bool vec = shape.vec > 1;
  if (vec) {
    RINGATTN_CHECK(in_offset % 16 == 0 && out_offset % 16 == 0 && res_offset % 16 == 0,
                   "region offsets must be 16-byte aligned, got in/out/res ", in_offset, "/", out_offset, "/", res_offset);
    RINGATTN_CHECK(aligned16(residual.data_ptr()) && aligned16(residual_out.data_ptr()) && aligned16(y_out.data_ptr()),
                   "residual, residual_out and y_out must be 16-byte aligned (hidden * element size is a multiple of 16)");
  }
  RINGATTN_CHECK(!multimem || vec, "multimem mode needs hidden * element size % 16 == 0, got hidden ", H);
  const int64_t blocks = effective_blocks(num_blocks, T, int(world_size), one_shot, shape.rows_per_block);

  KernelArgs args;
  args.buffer_ptrs = reinterpret_cast<char* const*>(buffer_ptrs_dev);
  args.multicast_ptr = reinterpret_cast<char*>(multicast_ptr);
  args.in_offset = in_offset;
  args.out_offset = out_offset;
  args.res_offset = res_offset;
  args.residual = residual.data_ptr();
  args.residual_out = residual_out.data_ptr();
  args.res_out_full = one_shot && gather;  // two-shot gathers through res_offset instead
  args.y_out = y_out.data_ptr();
  args.weight = weight.data_ptr();
  args.tokens = T;
  args.hidden = H;
  args.mode = mode;
  args.eps = float(eps);
  args.group = shape.group;
  args.rows_per_block = shape.rows_per_block;
  args.barrier.signal_pads = reinterpret_cast<uint32_t**>(signal_pad_ptrs_dev);
  args.barrier.rank = int(rank);
  args.barrier.world_size = int(world_size);
  args.barrier.slot = int(slot);
  args.barrier.signature = call_signature(T, H, int64_t(dt), mode, blocks);
  args.barrier.timeout_ns = uint64_t(std::max<int64_t>(0, timeout_ns));
  args.barrier.status.words = status_ptr != 0 ? status_device_ptr(status_ptr) : nullptr;

  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(shape.threads));
  auto launch = [&](auto io_tag) {
    using T_ = decltype(io_tag);
    constexpr int kVec = 16 / sizeof(T_);
    auto with_weight = [&](auto weight_tag) {
      using W_ = decltype(weight_tag);
      if (!vec) {
        fused_allreduce_rmsnorm_kernel<T_, W_, 1, 32><<<grid, block, 0, stream>>>(args);
        return;
      }
      switch (shape.per_thread) {
        case 1: fused_allreduce_rmsnorm_kernel<T_, W_, kVec, 1><<<grid, block, 0, stream>>>(args); break;
        case 2: fused_allreduce_rmsnorm_kernel<T_, W_, kVec, 2><<<grid, block, 0, stream>>>(args); break;
        case 4: fused_allreduce_rmsnorm_kernel<T_, W_, kVec, 4><<<grid, block, 0, stream>>>(args); break;
        default:
          // 8 x 16-byte accesses per thread only for 4-byte types (hidden > 8192); 2-byte types at
          // hidden <= 16384 need at most 4, so that instance is never built for them.
          if constexpr (sizeof(T_) == 4) fused_allreduce_rmsnorm_kernel<T_, W_, kVec, 8><<<grid, block, 0, stream>>>(args);
          else RINGATTN_CHECK(false, "fused_allreduce_rmsnorm: no launch shape for hidden ", H);
          break;
      }
    };
    if (weight.scalar_type() == at::kFloat) with_weight(float{});
    else with_weight(T_{});
  };
  switch (dt) {
    case at::kBFloat16: launch(__nv_bfloat16{}); break;
    case at::kHalf: launch(__half{}); break;
    default: launch(float{}); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(ringattn, CUDA, m) { m.impl("tw_fused_allreduce_rmsnorm_", &fused_allreduce_rmsnorm_cuda_); }

}  // namespace ringattn::tokenweave
