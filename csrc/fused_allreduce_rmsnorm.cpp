// Fused AllReduce + residual + RMSNorm (TokenWeave): the op schema (a TORCH_LIBRARY_FRAGMENT, so
// it sits beside the main TORCH_LIBRARY block in ops.cpp) and the CPU "host-simulation" kernel.
//
// The CUDA kernel (cuda/fused_allreduce_rmsnorm.cu) reads and writes peers' symmetric-memory
// buffers through raw device pointers. The CPU kernel below runs the same protocol (token
// shards, regions, slots, signatures, self-resetting signal pads, timeouts, status words) on
// host memory shared between processes (file-backed mappings, see
// ringattn/tokenweave/fused_allreduce_rmsnorm.py: HostSimSymmetricMemory), so the protocol and
// the index math are tested by the CPU suite with real processes. It is a test vehicle, not a
// fast path: the production CPU path is gloo all_reduce + add_rmsnorm.
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <thread>
#include <vector>

#include "cuda/fused_allreduce_rmsnorm.cuh"
#include "ops.h"

TORCH_LIBRARY_FRAGMENT(ringattn, m) {
  // In place through pointers: buffer_ptrs_dev / signal_pad_ptrs_dev are the addresses of
  // world_size-long arrays of peer buffer bases / signal-pad bases (device arrays on CUDA, from
  // torch symmetric memory; host arrays on CPU). in/out/res_offset: byte offsets of the regions in
  // every rank's buffer. local_in (tokens x hidden) is this rank's in-region view; y_out (tokens x
  // hidden) the out-region view (two-shot) or any tensor (one-shot); residual and residual_out are
  // tokens x hidden or shard_rows x hidden per mode_bits (fused_allreduce_rmsnorm.cuh; an argument
  // named "mode" would clash with torch.compile's mode redirection).
  // status_ptr: pinned host int32[7] the kernel writes on a timeout or a mismatch (0 = none).
  m.def(
      "tw_fused_allreduce_rmsnorm_(Tensor local_in, Tensor(a!) y_out, Tensor residual, Tensor(b!) residual_out, "
      "Tensor weight, int buffer_ptrs_dev, int signal_pad_ptrs_dev, int multicast_ptr, int rank, int world_size, "
      "int in_offset, int out_offset, int res_offset, int slot, int num_blocks, int mode_bits, float eps, int timeout_ns, "
      "int status_ptr) -> ()");
}

namespace ringattn::tokenweave {
namespace {

using Clock = std::chrono::steady_clock;

struct HostStatus {
  int32_t* words;
  void report(int32_t code, int rank, int block, int peer, uint32_t seen, uint32_t expected, int phase) const {
    if (words == nullptr) return;
    words[kStRank] = rank;
    words[kStBlock] = block;
    words[kStPeer] = peer;
    words[kStSeen] = static_cast<int32_t>(seen);
    words[kStExpected] = static_cast<int32_t>(expected);
    words[kStPhase] = phase;
    __atomic_store_n(&words[kStCode], code, __ATOMIC_RELEASE);
  }
};

// Block `block` of this rank meets block `block` of every peer (same protocol as the CUDA
// block_barrier: CAS 0 -> signature with release into the peer's pad, CAS signature -> 0 with
// acquire on our own pad). GCC/Clang __atomic builtins, not C++20's std::atomic_ref: older torch
// (the GPU machine's 2.11 may be one) builds extensions as C++17. Lock-free 32-bit atomics work
// across processes on shared mappings.
int32_t host_barrier(uint32_t* const* pads, int rank, int world, int slot, int phase, int block, uint32_t sig,
                     int64_t timeout_ns, const HostStatus& status) {
  const auto t0 = Clock::now();
  auto expired = [&] {
    return timeout_ns > 0 &&
           std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count() > timeout_ns;
  };
  for (int peer = 0; peer < world; ++peer) {
    uint32_t* dst = &pads[peer][signal_index(slot, phase, block, rank, world)];
    for (;;) {
      uint32_t expected = 0;
      if (__atomic_compare_exchange_n(dst, &expected, sig, false, __ATOMIC_RELEASE, __ATOMIC_RELAXED)) break;
      if (expired()) {
        status.report(kTimeout, rank, block, peer, expected, sig, 2 * phase);
        return kTimeout;
      }
      std::this_thread::yield();
    }
  }
  int32_t code = kOk;
  for (int peer = 0; peer < world; ++peer) {
    uint32_t* src = &pads[rank][signal_index(slot, phase, block, peer, world)];
    for (;;) {
      const uint32_t seen = __atomic_load_n(src, __ATOMIC_RELAXED);
      if (seen == sig) {
        uint32_t expected = sig;
        if (__atomic_compare_exchange_n(src, &expected, 0u, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) break;
      } else if (seen != 0u) {
        __atomic_exchange_n(src, 0u, __ATOMIC_ACQUIRE);
        status.report(kSignatureMismatch, rank, block, peer, seen, sig, 2 * phase + 1);
        code = kSignatureMismatch;
        break;
      } else if (expired()) {
        status.report(kTimeout, rank, block, peer, 0u, sig, 2 * phase + 1);
        return kTimeout;
      }
      std::this_thread::yield();
    }
  }
  return code;
}

template <typename T, typename Wt>
void host_rows(char* const* bufs, int rank, int world, int64_t in_off, int64_t out_off, int64_t res_off,
               const T* residual, T* residual_out, T* y_out, const Wt* weight, int64_t tokens, int64_t hidden,
               int64_t mode, float eps) {
  const bool one_shot = mode & kOneShot, res_in_full = mode & kResInFull, gather = mode & kResOutGather;
  const int64_t my_begin = shard_begin(tokens, world, rank), my_end = shard_end(tokens, world, rank);
  const int64_t begin = one_shot ? 0 : my_begin, end = one_shot ? tokens : my_end;
  std::vector<float> vals(hidden);
  std::vector<T> nr(hidden), y(hidden);
  for (int64_t row = begin; row < end; ++row) {
    const T* res_row = residual + (res_in_full ? row : row - my_begin) * hidden;
    float ss = 0.f;
    for (int64_t c = 0; c < hidden; ++c) {
      float sum = 0.f;
      for (int p = 0; p < world; ++p) sum += float(reinterpret_cast<const T*>(bufs[p] + in_off)[row * hidden + c]);
      nr[c] = T(sum + float(res_row[c]));
      vals[c] = float(nr[c]);
      ss += vals[c] * vals[c];
    }
    const float inv = 1.f / std::sqrt(ss / float(hidden) + eps);
    for (int64_t c = 0; c < hidden; ++c) y[c] = T(vals[c] * inv * float(weight[c]));
    const bool own = row >= my_begin && row < my_end;
    auto put = [&](T* dst, const std::vector<T>& src) { std::copy(src.begin(), src.end(), dst); };
    if (one_shot) {
      if (gather) put(residual_out + row * hidden, nr);
      else if (own) put(residual_out + (row - my_begin) * hidden, nr);
      put(y_out + row * hidden, y);
    } else {
      for (int p = 0; p < world; ++p) {
        if (gather) put(reinterpret_cast<T*>(bufs[p] + res_off) + row * hidden, nr);
        put(reinterpret_cast<T*>(bufs[p] + out_off) + row * hidden, y);
      }
      if (!gather) put(residual_out + (row - my_begin) * hidden, nr);
    }
  }
}


}  // namespace

// Shared by the CPU (below) and CUDA (cuda/fused_allreduce_rmsnorm.cu) backends. RINGATTN_CHECK,
// not TORCH_CHECK: on the lent H100 TORCH_CHECK messages that stream numbers segfaulted (ops.h).
void check_fused_allreduce_rmsnorm_args(const at::Tensor& local_in, const at::Tensor& y_out,
                                        const at::Tensor& residual, const at::Tensor& residual_out,
                                        const at::Tensor& weight, int64_t buffer_ptrs, int64_t signal_pad_ptrs,
                                        int64_t rank, int64_t world_size, int64_t slot, int64_t num_blocks,
                                        int64_t mode, double eps) {
  RINGATTN_CHECK(local_in.dim() == 2 && local_in.is_contiguous(),
                 "local_in must be a contiguous tokens x hidden tensor, got ", local_in.sizes());
  const int64_t T = local_in.size(0), H = local_in.size(1);
  RINGATTN_CHECK(world_size >= 1 && world_size <= kMaxWorldSize, "world_size must be in [1, ", int64_t(kMaxWorldSize),
                 "], got ", world_size);
  RINGATTN_CHECK(rank >= 0 && rank < world_size, "rank must be in [0, ", world_size, "), got ", rank);
  RINGATTN_CHECK(slot >= 0 && slot < kNumSlots, "slot must be in [0, ", int64_t(kNumSlots), "), got ", slot);
  RINGATTN_CHECK(num_blocks >= 1 && num_blocks <= kMaxBlocks, "num_blocks must be in [1, ", int64_t(kMaxBlocks),
                 "], got ", num_blocks);
  RINGATTN_CHECK(H >= 1 && H <= kMaxHidden, "hidden must be in [1, ", int64_t(kMaxHidden), "], got ", H);
  RINGATTN_CHECK(buffer_ptrs != 0 && signal_pad_ptrs != 0, "buffer_ptrs_dev and signal_pad_ptrs_dev must be set");
  const bool one_shot = mode & kOneShot, res_in_full = mode & kResInFull, gather = mode & kResOutGather;
  RINGATTN_CHECK(!one_shot || res_in_full, "the one-shot mode needs the full (tokens x hidden) residual");
  const auto dt = local_in.scalar_type();
  RINGATTN_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, "dtype must be bf16, fp16 or fp32, got ",
                 dt);
  const int64_t shard = shard_end(T, int(world_size), int(rank)) - shard_begin(T, int(world_size), int(rank));
  auto check_rows = [&](const at::Tensor& t, const char* name, int64_t rows) {
    RINGATTN_CHECK(t.device() == local_in.device(), name, " must be on ", local_in.device(), ", got ", t.device());
    RINGATTN_CHECK(t.scalar_type() == dt, name, " must have dtype ", dt, ", got ", t.scalar_type());
    RINGATTN_CHECK(t.is_contiguous(), name, " must be contiguous");
    RINGATTN_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == H, name, " must be (", rows, ", ", H, "), got ",
                   t.sizes());
  };
  check_rows(residual, "residual", res_in_full ? T : shard);
  check_rows(residual_out, "residual_out", gather ? T : shard);
  check_rows(y_out, "y_out", T);
  RINGATTN_CHECK(weight.dim() == 1 && weight.size(0) == H, "weight must have shape (", H, "), got ", weight.sizes());
  RINGATTN_CHECK(weight.scalar_type() == dt || weight.scalar_type() == at::kFloat, "weight must have dtype ", dt,
                 " or float32, got ", weight.scalar_type());
  RINGATTN_CHECK(weight.is_contiguous() && weight.device() == local_in.device(), "weight must be contiguous on ",
                 local_in.device());
  RINGATTN_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
}

namespace {

// Same contract and checks as fused_allreduce_rmsnorm_cuda_ (cuda/fused_allreduce_rmsnorm.cu).
void fused_allreduce_rmsnorm_cpu_(const at::Tensor& local_in, at::Tensor& y_out, const at::Tensor& residual,
                                  at::Tensor& residual_out, const at::Tensor& weight, int64_t buffer_ptrs,
                                  int64_t signal_pad_ptrs, int64_t multicast_ptr, int64_t rank, int64_t world_size,
                                  int64_t in_offset, int64_t out_offset, int64_t res_offset, int64_t slot,
                                  int64_t num_blocks, int64_t mode, double eps, int64_t timeout_ns, int64_t status_ptr) {
  TORCH_CHECK(!(mode & kMultimem), "the multimem mode has no CPU (host-simulation) kernel");
  (void)multicast_ptr;
  check_fused_allreduce_rmsnorm_args(local_in, y_out, residual, residual_out, weight, buffer_ptrs, signal_pad_ptrs,
                                     rank, world_size, slot, num_blocks, mode, eps);
  const int64_t T = local_in.size(0), H = local_in.size(1);
  const bool one_shot = mode & kOneShot;
  const auto dt = local_in.scalar_type();
  if (T == 0) return;

  auto* const* bufs = reinterpret_cast<char* const*>(buffer_ptrs);
  auto* const* pads = reinterpret_cast<uint32_t* const*>(signal_pad_ptrs);
  const HostStatus status{reinterpret_cast<int32_t*>(status_ptr)};
  // Fail-stop, as the CUDA kernel: after a recorded failure, touch neither pads nor buffers.
  if (status.words != nullptr && __atomic_load_n(&status.words[kStCode], __ATOMIC_ACQUIRE) != kOk) return;
  const LaunchShape shape = launch_shape(H, local_in.element_size());
  const int64_t blocks = effective_blocks(num_blocks, T, int(world_size), one_shot, shape.rows_per_block);
  const uint32_t sig = call_signature(T, H, int64_t(dt), mode, blocks);
  const int r = int(rank), w = int(world_size), s = int(slot);
  // A legal schedule of the CUDA kernel: every block passes the start barrier, the rows are
  // processed, every block passes the end barrier.
  int32_t code = kOk;
  for (int b = 0; b < blocks; ++b) {
    const int32_t c = host_barrier(pads, r, w, s, 0, b, sig, timeout_ns, status);
    if (c == kTimeout) return;
    code = std::max(code, c);
  }
  if (code == kOk) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "fused_allreduce_rmsnorm_cpu", [&] {
      using T_ = scalar_t;
      auto run = [&](const auto* wptr) {
        host_rows<T_>(bufs, r, w, in_offset, out_offset, res_offset, residual.const_data_ptr<T_>(),
                      residual_out.data_ptr<T_>(), y_out.data_ptr<T_>(), wptr, T, H, mode, float(eps));
      };
      if (weight.scalar_type() == at::kFloat) run(weight.const_data_ptr<float>());
      else run(weight.const_data_ptr<T_>());
    });
  }
  for (int b = 0; b < blocks; ++b) {
    if (host_barrier(pads, r, w, s, 1, b, sig, timeout_ns, status) == kTimeout) return;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(ringattn, CPU, m) { m.impl("tw_fused_allreduce_rmsnorm_", &fused_allreduce_rmsnorm_cpu_); }

}  // namespace ringattn::tokenweave
