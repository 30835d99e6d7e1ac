#pragma once

#include <cstddef>

// A process-wide cache of large page-aligned blocks, for gradient outputs that
// cannot overwrite their input. A fresh block of 100+ MB costs page faults and
// kernel zeroing of every page on first touch, and munmap when freed; a
// recycled one costs neither. Thread-safe.
//
// Only requests of at least kMinPooledBytes are served. An idle block is reused
// for a request when its capacity exceeds the request by at most 1/8 or by at
// most one 2 MiB huge page (capacities are rounded up to whole huge pages);
// released blocks stay idle, at most 2 of them and at most
// FUSED_XENT_BUFFER_CACHE_MB MiB together (read once; default 1024), the least
// recently released being unmapped first. A request whose block could never
// stay idle (larger than that limit; any request when it is 0, and off Linux)
// is refused, so that the caller uses its own allocator instead of mapping and
// unmapping a block per call.
namespace fused_xent::buffer_pool {

constexpr size_t kMinPooledBytes = size_t{1} << 20;

// A block of at least `bytes` bytes (its size in *capacity), or nullptr when
// the pool does not serve `bytes` (see above) or no memory could be mapped.
void* acquire(size_t bytes, size_t* capacity);

// Gives back a block from acquire() with the capacity it reported.
void release(void* block, size_t capacity);

// What the pool holds now: idle blocks (cached for reuse) and blocks handed
// out by acquire() and not yet released, in bytes of capacity.
struct Stats {
  size_t idle_bytes = 0;
  size_t idle_blocks = 0;
  size_t in_use_bytes = 0;
  size_t in_use_blocks = 0;
  size_t limit_bytes = 0;  // FUSED_XENT_BUFFER_CACHE_MB in bytes
};
Stats stats();

// Unmaps every idle block and returns their bytes. Blocks in use are kept;
// they become idle (and cached) again when released.
size_t release_idle();

}  // namespace fused_xent::buffer_pool
