// How the CUDA kernels cut rows between threads and blocks, from the shape
// alone. Plain C++ (no CUDA header): cuda/workspace.cc sizes the kernels'
// workspace with this same rule in builds without CUDA too.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "core/xent_params.h"

namespace fused_xent {
namespace cuda {

// Tuning knobs (defines, for experiments): the defaults measured best on an H200.
#ifndef FX_CUDA_UNROLL
#define FX_CUDA_UNROLL 4
#endif
#ifndef FX_CUDA_MIN_BLOCKS
#define FX_CUDA_MIN_BLOCKS 3
#endif
#ifndef FX_CUDA_PACKS_PER_THREAD
#define FX_CUDA_PACKS_PER_THREAD 32
#endif

constexpr int kThreads = 256;  // per block, every kernel
constexpr int kWarp = 32;
constexpr int kUnroll = FX_CUDA_UNROLL;                    // packs (or strided elements) loaded together
constexpr int kMinBlocks = FX_CUDA_MIN_BLOCKS;             // per SM: more loads in flight
constexpr int kPacksPerThread = FX_CUDA_PACKS_PER_THREAD;  // sets how many threads share a row
// Below this many blocks a launch leaves an H100/H200 (132 SMs, up to 8 blocks
// of 256 threads each) partly idle: long rows are then cut into chunks, one
// block each, and the chunks' partial sums merged.
constexpr int64_t kFillBlocks = 1024;
constexpr int kStridedMinChunk = 256;  // classes per chunk of a strided row (one row per thread)

// `group` threads (a power of two) share a row; a block holds kThreads / group
// rows. Rows too long for the grid to fill the GPU are cut into `splits`
// chunks of `chunk` classes, one block each.
struct Plan {
  int group = 1;
  int splits = 1;
  int64_t chunk = 0;
  int64_t blocks = 0;       // grid.x
  bool vectorized = false;  // contiguous rows and every buffer at the same 16-byte phase (set by the kernels)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p *= 2;
  return p;
}

// The plan of `layout` for elements of `element_size` bytes. Shape-only, so a
// call is deterministic and its workspace is known before any buffer is.
// A chunk is at least one batch of loads per thread (kUnroll 16-byte packs,
// 16 KiB for a block of 256): 8 rows of 262144 float32 become 8 x 64 blocks.
inline Plan shape_plan(const Layout& layout, int element_size) {
  Plan plan;
  const int64_t rows = layout.rows(), classes = layout.classes;
  const int pack = 16 / element_size;
  int64_t min_chunk = kStridedMinChunk;
  if (layout.inner == 1) {
    const int64_t packs = ceil_div(classes, pack);
    plan.group = pow2_at_least(ceil_div(packs, kPacksPerThread), kThreads);
    min_chunk = int64_t{plan.group} * kUnroll * pack;
  }
  plan.blocks = ceil_div(rows, kThreads / plan.group);
  int64_t splits = 1;
  if (plan.blocks < kFillBlocks && classes >= 2 * min_chunk)
    splits = std::min(ceil_div(kFillBlocks, plan.blocks), ceil_div(classes, min_chunk));
  plan.chunk = ceil_div(ceil_div(classes, splits), pack) * pack;
  plan.splits = static_cast<int>(ceil_div(classes, plan.chunk));
  return plan;
}

}  // namespace cuda
}  // namespace fused_xent
