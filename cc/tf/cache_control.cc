// C functions that let Python read and empty the gradient buffer pool
// (core/buffer_pool.h) of this library. Each copy of the core has its own pool
// and only this library's kernels use theirs, so Python must reach this copy:
// python/fused_xent/_tf/buffer_cache.py calls these through ctypes on the library
// TensorFlow already loaded. Plain functions need no op, graph or session and
// cannot be placed on another device or pruned from a graph.
#include <cstdint>

#include "core/buffer_pool.h"

#define FX_EXPORT __attribute__((visibility("default")))

extern "C" {

// Unmaps the idle blocks; returns their bytes.
FX_EXPORT uint64_t fused_xent_release_cached_memory() { return fused_xent::buffer_pool::release_idle(); }

// Writes idle bytes, idle blocks, bytes in use, blocks in use and the idle
// byte limit into values[0..4], as many as `count` allows; returns how many
// values there are (5), so that a caller can tell a library with other fields.
FX_EXPORT int fused_xent_cached_memory_info(uint64_t* values, int count) {
  const fused_xent::buffer_pool::Stats s = fused_xent::buffer_pool::stats();
  const uint64_t all[] = {s.idle_bytes, s.idle_blocks, s.in_use_bytes, s.in_use_blocks, s.limit_bytes};
  constexpr int kCount = sizeof(all) / sizeof(all[0]);
  for (int i = 0; i < count && i < kCount; ++i) values[i] = all[i];
  return kCount;
}

}  // extern "C"
