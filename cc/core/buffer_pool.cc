#include "core/buffer_pool.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#include "core/memory_hints.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_xent::buffer_pool {
namespace {

constexpr size_t kMaxIdleBlocks = 2;

#if defined(__linux__)

// Maps `capacity` bytes (a multiple of 2 MiB) at a 2 MiB boundary, so that
// huge pages can back all of it: maps 2 MiB more and trims both ends.
void* map_block(size_t capacity) {
  void* mapped =
      mmap(nullptr, capacity + kHugePageBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapped == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(mapped);
  const uintptr_t block = (start + kHugePageBytes - 1) & ~uintptr_t{kHugePageBytes - 1};
  if (block > start) munmap(mapped, block - start);
  munmap(reinterpret_cast<void*>(block + capacity), kHugePageBytes - (block - start));
  advise_huge_pages(reinterpret_cast<void*>(block), capacity);
  return reinterpret_cast<void*>(block);
}

void unmap_block(void* block, size_t capacity) { munmap(block, capacity); }

size_t idle_byte_limit() {
  static const size_t limit = [] {
    long long mb = 1024;
    if (const char* text = std::getenv("FUSED_XENT_BUFFER_CACHE_MB")) {
      char* end;
      const long long value = std::strtoll(text, &end, 10);
      if (end != text && *end == '\0' && value >= 0) mb = std::min(value, 1LL << 30);
    }
    return static_cast<size_t>(mb) << 20;
  }();
  return limit;
}

#else  // No mmap: plain aligned allocations, never cached.

void* map_block(size_t capacity) {
  return ::operator new(capacity, std::align_val_t{kHugePageBytes}, std::nothrow);
}
void unmap_block(void* block, size_t) { ::operator delete(block, std::align_val_t{kHugePageBytes}); }
size_t idle_byte_limit() { return 0; }

#endif

struct Block {
  void* data;
  size_t capacity;
};

struct Pool {
  std::mutex mu;
  std::vector<Block> idle;  // least recently released first
  size_t idle_bytes = 0;
  size_t in_use_bytes = 0;
  size_t in_use_blocks = 0;

  void hand_out(size_t capacity) {
    in_use_bytes += capacity;
    ++in_use_blocks;
  }

  // Takes out the oldest idle blocks until at most `max_blocks` and `max_bytes` remain.
  std::vector<Block> evict(size_t max_blocks, size_t max_bytes) {
    std::vector<Block> evicted;
    while (!idle.empty() && (idle.size() > max_blocks || idle_bytes > max_bytes)) {
      evicted.push_back(idle.front());
      idle_bytes -= idle.front().capacity;
      idle.erase(idle.begin());
    }
    return evicted;
  }
};

// Never destroyed: tensors holding blocks may be freed during process exit.
Pool& pool() {
  static Pool* const instance = new Pool;
  return *instance;
}

void unmap_all(const std::vector<Block>& blocks) {
  for (const Block& b : blocks) unmap_block(b.data, b.capacity);
}

size_t round_to_huge_pages(size_t bytes) { return (bytes + kHugePageBytes - 1) & ~(kHugePageBytes - 1); }

// A block that could never stay idle would be mapped and unmapped on every
// call: the caller's own allocator serves it better.
bool serves(size_t bytes) {
  const size_t limit = idle_byte_limit();
  return bytes >= kMinPooledBytes && bytes <= limit && round_to_huge_pages(bytes) <= limit;
}

}  // namespace

void* acquire(size_t bytes, size_t* capacity) {
  if (!serves(bytes)) return nullptr;
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    for (auto it = p.idle.rbegin(); it != p.idle.rend(); ++it) {  // most recently released (warmest) first
      if (it->capacity >= bytes && it->capacity - bytes <= std::max(bytes / 8, kHugePageBytes)) {
        const Block b = *it;
        p.idle.erase(std::next(it).base());
        p.idle_bytes -= b.capacity;
        p.hand_out(b.capacity);
        *capacity = b.capacity;
        return b.data;
      }
    }
  }
  *capacity = round_to_huge_pages(bytes);
  void* block = map_block(*capacity);
  if (block == nullptr) {  // out of address space or commit: give back the idle blocks and try once more
    release_idle();
    block = map_block(*capacity);
  }
  if (block != nullptr) {
    std::lock_guard<std::mutex> lock(p.mu);
    p.hand_out(*capacity);
  }
  return block;
}

void release(void* block, size_t capacity) {
  Pool& p = pool();
  std::vector<Block> evicted;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    p.in_use_bytes -= capacity;
    --p.in_use_blocks;
    p.idle.push_back({block, capacity});
    p.idle_bytes += capacity;
    evicted = p.evict(kMaxIdleBlocks, idle_byte_limit());
  }
  unmap_all(evicted);  // outside the lock: unmapping 100+ MB takes a while
}

Stats stats() {
  Pool& p = pool();
  Stats s;
  s.limit_bytes = idle_byte_limit();
  std::lock_guard<std::mutex> lock(p.mu);
  s.idle_bytes = p.idle_bytes;
  s.idle_blocks = p.idle.size();
  s.in_use_bytes = p.in_use_bytes;
  s.in_use_blocks = p.in_use_blocks;
  return s;
}

size_t release_idle() {
  Pool& p = pool();
  std::vector<Block> evicted;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    evicted = p.evict(0, 0);
  }
  size_t bytes = 0;
  for (const Block& b : evicted) bytes += b.capacity;
  unmap_all(evicted);
  return bytes;
}

}  // namespace fused_xent::buffer_pool
