#include "tf/pooled_output.h"

#include <cstdint>

#include "core/buffer_pool.h"
#include "core/memory_hints.h"
#include "tensorflow/core/framework/allocation_description.pb.h"

namespace fused_xent {
namespace {

// A tensor buffer over a pooled block, given back to the pool when the last
// tensor using it goes away.
class PooledBuffer : public tensorflow::TensorBuffer {
 public:
  PooledBuffer(void* block, size_t bytes, size_t capacity)
      : TensorBuffer(block), bytes_(bytes), capacity_(capacity) {}
  ~PooledBuffer() override { buffer_pool::release(data(), capacity_); }

  size_t size() const override { return bytes_; }
  TensorBuffer* root_buffer() override { return this; }
  bool OwnsMemory() const override { return true; }
  tensorflow::AllocatorMemoryType GetMemoryType() const override {
    return tensorflow::AllocatorMemoryType::kHostPageable;
  }
  void FillAllocationDescription(tensorflow::AllocationDescription* proto) const override {
    proto->set_requested_bytes(bytes_);
    proto->set_allocated_bytes(capacity_);
    proto->set_allocator_name("fused_xent_buffer_pool");
    proto->set_ptr(reinterpret_cast<uintptr_t>(data()));
    proto->set_has_single_reference(RefCountIsOne());
  }

 private:
  const size_t bytes_;
  const size_t capacity_;
};

// Pooled blocks are plain pageable host memory. Output attributes beyond
// on_host (pinned for GPU copies, registered for network transfers, a scoped
// allocator) ask for memory only TensorFlow's allocators provide.
bool PoolMemoryFits(const tensorflow::AllocatorAttributes& attr) {
  tensorflow::AllocatorAttributes host;
  host.set_on_host(true);
  return attr.scope_id == 0 && attr.IsEqualOrLessRestrictiveThan(host);
}

}  // namespace

absl::Status ForwardOrPoolGradient(tensorflow::OpKernelContext* ctx, tensorflow::Tensor** grad) {
  const tensorflow::Tensor& logits = ctx->input(0);
  if (ctx->forward_input_to_output_with_shape(0, 0, logits.shape(), grad)) return absl::OkStatus();
  const size_t bytes = logits.TotalBytes();
  size_t capacity;
  void* block = PoolMemoryFits(ctx->output_alloc_attr(0)) ? buffer_pool::acquire(bytes, &capacity) : nullptr;
  if (block != nullptr) {
    tensorflow::core::RefCountPtr<tensorflow::TensorBuffer> buffer(new PooledBuffer(block, bytes, capacity));
    ctx->set_output(0, tensorflow::Tensor(logits.dtype(), logits.shape(), std::move(buffer)));
    *grad = ctx->mutable_output(0);
    return absl::OkStatus();
  }
  TF_RETURN_IF_ERROR(ctx->allocate_output(0, logits.shape(), grad));
  advise_huge_pages((*grad)->data(), (*grad)->TotalBytes());  // a fresh buffer, faulted in on first touch
  return absl::OkStatus();
}

}  // namespace fused_xent
