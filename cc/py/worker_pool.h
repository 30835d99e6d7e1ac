// Worker threads kept for the module's calls: starting and joining a thread per
// pass cost about as much as a whole pass over 65536x10 logits on a 2-core VM,
// and the NumPy and PyTorch paths make two passes per call.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

#include <unistd.h>

namespace fused_xent {
namespace py_support {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class WorkerPool {
 public:
  explicit WorkerPool(int workers) : workers_(workers) {
    // Detached: the pool lives as long as the process (threads blocked in a
    // wait at exit are not joined; joining them in a static destructor can hang).
    for (int i = 1; i <= workers; ++i) std::thread([this, i] { serve(i); }).detach();
  }

  // Runs task(i) for every i in [0, count), count <= workers + 1: task(0) on
  // the calling thread, task(i) on worker i. Returns when all have finished;
  // false (nothing run) when another call is using the pool.
  bool try_run(int64_t count, const std::function<void(int64_t)>& task) {
    if (count > workers_ + 1) return false;
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    task_ = &task;
    count_ = count;
    running_.store(workers_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    task(0);
    // The workers' shards take about as long as this one: wait briefly awake.
    for (int i = 0; i < kSpins && running_.load() != 0; ++i) cpu_relax();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return running_.load() == 0; });
    return true;
  }

 private:
  // About 20-60 us of waiting awake before sleeping: a call's backward pass
  // follows its forward pass by much less, and waking a sleeping thread on a
  // VM can cost as much as starting one.
  static constexpr int kSpins = 2000;

  uint64_t wait_for_work(uint64_t seen) {
    for (int i = 0; i < kSpins; ++i) {
      if (generation_.load() != seen) return generation_.load();
      cpu_relax();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    wake_.wait(lock, [&] { return generation_.load() != seen; });
    return generation_.load();
  }

  void serve(int index) {
    uint64_t seen = 0;
    for (;;) {
      seen = wait_for_work(seen);
      if (index < count_) (*task_)(index);  // task_ and count_ stay set until every worker has reported
      if (running_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_one();
      }
    }
  }

  const int workers_;
  std::mutex busy_;  // held by the call using the pool
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t count_ = 0;
  std::atomic<int> running_{0};
  std::atomic<uint64_t> generation_{0};
};

// This process's pool of `workers` threads (made at the first call; a forked
// child, which has none of its parent's threads, makes its own).
inline WorkerPool* worker_pool(int workers) {
  static std::mutex guard;
  static WorkerPool* pool = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(guard);
  if (pool == nullptr || owner != getpid()) {
    pool = new WorkerPool(workers);  // never freed: see the constructor
    owner = getpid();
  }
  return pool;
}

}  // namespace py_support
}  // namespace fused_xent
