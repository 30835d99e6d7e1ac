// XLA FFI handlers for the "Host" platform: the SIMD CPU kernels, their rows
// split over XLA's intra-op thread pool. Rows are independent and each is
// computed by one call in a fixed order, so the results are bitwise those of
// the TensorFlow kernels and the NumPy module, whatever the split.
#include <algorithm>
#include <condition_variable>
#include <memory>
#include <mutex>

#include "core/class_weights_check.h"
#include "core/cpu_kernels.h"
#include "core/label_check.h"
#include "core/memory_hints.h"
#include "ffi/xent_handlers.h"

namespace fused_xent {
namespace xla_ffi {
namespace {

// Fewer elements than this per shard cost more to schedule than to compute.
constexpr int64_t kMinShardElements = 1 << 15;

// Shards of [0, items) handed out to whichever thread asks first. The calling
// thread works too, so the call finishes even if the pool never runs the
// tasks it was given (all its threads busy, or the caller is one of them); a
// task that starts late finds nothing left and only drops its reference.
template <typename Fn> class RowShards {
 public:
  RowShards(int64_t items, int64_t shards, const Fn& fn) : items_(items), shards_(shards), fn_(fn) {}

  // Runs shards until none is left; returns when it has finished its last one.
  void Work() {
    for (int64_t s = next_.fetch_add(1); s < shards_; s = next_.fetch_add(1)) {
      fn_(items_ * s / shards_, items_ * (s + 1) / shards_);
      std::lock_guard<std::mutex> lock(mutex_);
      if (++done_ == shards_) all_done_.notify_all();
    }
  }

  void WaitAll() {
    std::unique_lock<std::mutex> lock(mutex_);
    all_done_.wait(lock, [this] { return done_ == shards_; });
  }

 private:
  const int64_t items_;
  const int64_t shards_;
  const Fn& fn_;  // lives in the caller's frame, which outlives every shard
  std::atomic<int64_t> next_{0};
  std::mutex mutex_;
  std::condition_variable all_done_;
  int64_t done_ = 0;
};

// Up to kShardsPerThread shards a thread, claimed in turn, so that a thread
// that starts late or is slowed down leaves its share to the others.
constexpr int64_t kShardsPerThread = 4;

// Shards are whole cpu::row_units, so results do not depend on the pool's size.
template <typename Fn> void ParallelRows(ffi::ThreadPool& pool, const Layout& layout, const Fn& fn) {
  const cpu::RowUnits units = cpu::row_units(layout);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t by_work = std::max<int64_t>(1, layout.rows() * layout.classes / kMinShardElements);
  const int64_t shards = std::min<int64_t>({kShardsPerThread * threads, units.count(), by_work});
  const auto shard = [&](int64_t begin, int64_t end) { fn(units.row(begin), units.row(end)); };
  if (shards <= 1) {
    shard(0, units.count());
    return;
  }
  auto state = std::make_shared<RowShards<decltype(shard)>>(units.count(), shards, shard);
  for (int64_t i = 1; i < std::min(threads, shards); ++i) pool.Schedule([state] { state->Work(); });
  state->Work();
  state->WaitAll();
}

// A gradient written to a buffer of its own (fused_xent.jax does not alias it
// to the logits, docs/xla.md) is usually fresh memory: XLA's CPU runtime
// allocates each call's results anew, and a buffer of 100+ MB faults in 4 KiB
// at a time on first touch, which took longer than the kernel. Asking for
// transparent huge pages before the first write cuts those faults 512-fold.
template <typename Args> void AdviseGradient(const Args& args) {
  if (static_cast<const void*>(args.grad_logits) == static_cast<const void*>(args.logits)) return;
  advise_huge_pages(args.grad_logits, static_cast<size_t>(args.layout.rows() * args.layout.classes) *
                                          sizeof(*args.grad_logits));
}

// Runs the core's CPU kernels over XLA's intra-op pool. Sparse rows check
// their labels in the same shards and the call fails afterwards, as the
// TensorFlow kernel does, naming the first invalid label. The workspace
// (ffi/xent_handlers.h) is for the CUDA kernels: unused here.
class CpuRunner {
 public:
  explicit CpuRunner(ffi::ThreadPool pool) : pool_(std::move(pool)) {}

  template <typename T, typename Label>
  ffi::Error Run(const SparseForwardArgs<T, Label>& args, const Workspace&) {
    return RunSparse(args, [](const auto& a, int64_t b, int64_t e) { cpu::sparse_forward(a, b, e); });
  }
  template <typename T, typename Label>
  ffi::Error Run(const SparseBackwardArgs<T, Label>& args, const Workspace&) {
    AdviseGradient(args);
    return RunSparse(args, [](const auto& a, int64_t b, int64_t e) { cpu::sparse_backward(a, b, e); });
  }
  template <typename T> ffi::Error Run(const DenseForwardArgs<T>& args, const Workspace&) {
    ParallelRows(pool_, args.layout, [&](int64_t b, int64_t e) { cpu::dense_forward(args, b, e); });
    return ffi::Error::Success();
  }
  template <typename T> ffi::Error Run(const DenseBackwardArgs<T>& args, const Workspace&) {
    AdviseGradient(args);
    ParallelRows(pool_, args.layout, [&](int64_t b, int64_t e) { cpu::dense_backward(args, b, e); });
    return ffi::Error::Success();
  }

 private:
  template <typename Args, typename Kernel> ffi::Error RunSparse(const Args& args, const Kernel& kernel) {
    if (const float* weights = args.options.class_weights) {  // host memory here, so their values are checked
      const int64_t bad = find_bad_class_weight(weights, args.layout.classes);
      if (bad >= 0) return InvalidArgument(bad_class_weight_message(weights, bad));
    }
    FirstInvalidLabel first_invalid;
    ParallelRows(pool_, args.layout, [&](int64_t b, int64_t e) {
      first_invalid.check(args.labels, b, e, args.layout.classes, args.options);
      kernel(args, b, e);
    });
    if (!first_invalid.found()) return ffi::Error::Success();
    const int64_t value = static_cast<int64_t>(args.labels[first_invalid.row()]);
    return InvalidArgument(invalid_label_message(value, args.layout.classes, args.options));
  }

  ffi::ThreadPool pool_;
};

}  // namespace

FX_FFI_DEFINE_TARGETS(cpu_targets, CpuRunner, .Ctx<ffi::ThreadPool>(), {}, ffi::ThreadPool)

}  // namespace xla_ffi
}  // namespace fused_xent
