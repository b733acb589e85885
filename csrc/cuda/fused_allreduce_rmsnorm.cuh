// Fused AllReduce + residual + RMSNorm (TokenWeave): constants and index math shared by the
// CUDA kernel (cuda/fused_allreduce_rmsnorm.cu) and the host-simulation CPU kernel
// (fused_allreduce_rmsnorm.cpp), so the protocol (token shards, buffer regions, signal-pad
// slots, call signatures, status words) is written once and tested on CPU.
//
// Protocol, per call (all ranks agree on T, H, dtype, mode and num_blocks):
//   in-region  (T x H, dtype)   each rank's partial sum (the row-parallel GEMM output)
//   out-region (T x H, dtype)   y rows, written by their owner into every rank's buffer
//   res-region (T x H, dtype)   new residual rows, gathered the same way (only when asked)
//   two-shot: rank r owns rows [shard_begin(r), shard_end(r)); it sums them over all peers'
//             in-regions (fp32), adds its residual rows, normalises, writes y (and the new
//             residual) to every peer: reduce-scatter + norm + all-gather in one kernel.
//   one-shot: every rank sums all T rows over all peers and normalises them locally.
//   Block b of every rank meets block b of every peer at a start and an end barrier through
//   the symmetric signal pads; the pads are self-resetting (each signal is consumed back to 0).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TW_HD __host__ __device__ __forceinline__
#else
#define TW_HD inline
#endif

namespace ringattn::tokenweave {

constexpr int kMaxWorldSize = 8;         // one NVLink/NVSwitch node
constexpr int kMaxBlocks = 32;           // CTAs per call (signal-pad layout bound)
constexpr int kMaxThreads = 512;         // per CTA (128 registers per thread)
constexpr int64_t kMaxHidden = 16384;
constexpr int kNumSlots = 2;             // two calls may be in flight (token-split halves)
constexpr int kNumPhases = 2;            // start and end barrier

// Signal pad words needed: slots x phases x blocks x world_size (uint32 each).
TW_HD int64_t signal_pad_words(int world_size) {
  return int64_t(kNumSlots) * kNumPhases * kMaxBlocks * world_size;
}

// Word in a signal pad where `peer` signals block `block` of the pad's owner.
TW_HD int64_t signal_index(int slot, int phase, int block, int peer, int world_size) {
  return ((int64_t(slot) * kNumPhases + phase) * kMaxBlocks + block) * world_size + peer;
}

// Mode bits (the `mode` argument of the op).
enum ModeBits : int64_t {
  kOneShot = 1,        // every rank reduces all rows (else two-shot: own shard only)
  kMultimem = 2,       // two-shot through multimem.ld_reduce / multimem.st on the multicast ptr
  kResInFull = 4,      // residual is T x H (replicated); else shard_rows x H
  kResOutGather = 8,   // new residual for all T rows on every rank; else own shard rows only
};

// Status words (int32, host-mapped pinned memory the kernel writes on failure; host reads).
enum StatusWord : int { kStCode = 0, kStRank, kStBlock, kStPeer, kStSeen, kStExpected, kStPhase, kStWords };
enum StatusCode : int32_t {
  kOk = 0,
  kTimeout = 1,             // a peer never arrived at a barrier within timeout_ns
  kSignatureMismatch = 2,   // a peer arrived with a different (T, H, dtype, mode, blocks)
  kMultimemUnsupported = 3, // multimem requested but not compiled for this GPU arch
};

// Token shards: ceil(T / W) rows per rank, the last ranks may get fewer (or none), so the
// layout is the same on every path (the NCCL reduce-scatter pads T up to W * chunk).
TW_HD int64_t shard_chunk(int64_t tokens, int world_size) { return (tokens + world_size - 1) / world_size; }
TW_HD int64_t shard_begin(int64_t tokens, int world_size, int rank) {
  const int64_t b = shard_chunk(tokens, world_size) * rank;
  return b < tokens ? b : tokens;
}
TW_HD int64_t shard_end(int64_t tokens, int world_size, int rank) {
  const int64_t e = shard_chunk(tokens, world_size) * (rank + 1);
  return e < tokens ? e : tokens;
}

// Launch shape, a function of (hidden, element size) only, so every rank derives the same one.
// A row is handled by a group of `group` threads, each holding `per_thread` accesses of `vec`
// elements (16 bytes when hidden * esize allows, else 1 element); a CTA works on
// `rows_per_block` rows at once (memory-level parallelism with few CTAs).
struct LaunchShape {
  int vec, per_thread, group, rows_per_block, threads;
};
TW_HD LaunchShape launch_shape(int64_t hidden, int64_t esize) {
  LaunchShape s;
  const bool vec = (hidden * esize) % 16 == 0;
  s.vec = vec ? int(16 / esize) : 1;
  const int64_t lanes = hidden / s.vec;
  if (!vec) s.per_thread = 32;
  else if (lanes > int64_t(kMaxThreads) * 4) s.per_thread = 8;
  else if (lanes >= 128) s.per_thread = 4;
  else if (lanes >= 64) s.per_thread = 2;
  else s.per_thread = 1;
  const int64_t g = (lanes + s.per_thread - 1) / s.per_thread;
  s.group = int((g + 31) / 32 * 32);
  s.rows_per_block = s.group >= kMaxThreads ? 1 : kMaxThreads / s.group;
  s.threads = s.group * s.rows_per_block;
  return s;
}

// CTAs actually launched: the requested count, capped so no CTA is idle (agreed values only).
TW_HD int64_t effective_blocks(int64_t requested, int64_t tokens, int world_size, bool one_shot, int rows_per_block) {
  const int64_t rows = one_shot ? tokens : shard_chunk(tokens, world_size);
  const int64_t need = (rows + rows_per_block - 1) / rows_per_block;
  const int64_t b = requested < need ? requested : need;
  return b < 1 ? 1 : b;
}

// Non-zero 32-bit value a rank writes into its peers' signal pads: peers compare it with their
// own, so ranks that disagree on the call (a bad input) report it instead of mixing rows.
TW_HD uint32_t call_signature(int64_t tokens, int64_t hidden, int64_t dtype_code, int64_t mode, int64_t num_blocks) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the five fields
  const int64_t f[5] = {tokens, hidden, dtype_code, mode, num_blocks};
  for (int i = 0; i < 5; ++i) {
    uint64_t v = static_cast<uint64_t>(f[i]);
    for (int k = 0; k < 8; ++k) {
      h ^= (v >> (8 * k)) & 0xffu;
      h *= 1099511628211ull;
    }
  }
  const uint32_t s = static_cast<uint32_t>(h ^ (h >> 32));
  return s == 0 ? 1u : s;
}

}  // namespace ringattn::tokenweave
