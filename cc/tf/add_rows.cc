// AddToRows: rows [start, start + rows(values)) of x increased by values, in x's
// own buffer. The fused linear head (python/fused_xent/_tf/linear.py) adds its
// weight gradient chunk by chunk into an accumulator it allocated itself and
// nobody else reads; TensorFlow's InplaceAdd does the same but adds bfloat16
// element by element (7x slower, benchmarks/bench_add_rows.py).
#include "core/cpu_kernels.h"
#include "tf/kernel_support.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/util/work_sharder.h"

namespace fused_xent {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;

// Elements per shard: whole cache lines, enough work to pay for a task.
constexpr int64_t kShardElements = 1 << 14;

absl::Status CheckRows(const Tensor& x, const Tensor& start, const Tensor& values, int64_t* first) {
  if (start.dims() != 0) return absl::InvalidArgumentError("start must be a scalar");
  if (x.dims() < 1 || values.dims() != x.dims()) {
    return absl::InvalidArgumentError(absl::StrCat("values must have the rank of x (", x.dims(),
                                                   ", at least 1), got ", values.shape().DebugString()));
  }
  for (int d = 1; d < x.dims(); ++d) {
    if (values.dim_size(d) != x.dim_size(d)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "values ", values.shape().DebugString(), " do not match the rows of x ", x.shape().DebugString()));
    }
  }
  *first = start.scalar<int32_t>()();
  if (*first < 0 || *first + values.dim_size(0) > x.dim_size(0)) {
    return absl::InvalidArgumentError(absl::StrCat("rows [", *first, ", ", *first + values.dim_size(0),
                                                   ") are outside x's ", x.dim_size(0), " rows"));
  }
  return absl::OkStatus();
}

template <typename T> class AddToRowsOp : public OpKernel {
 public:
  explicit AddToRowsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& values = ctx->input(2);
    int64_t first;
    OP_REQUIRES_OK(ctx, CheckRows(x, ctx->input(1), values, &first));
    Tensor y = x;  // shares x's buffer
    const int64_t row = x.dim_size(0) ? x.NumElements() / x.dim_size(0) : 0;
    CoreType<T>* dst = core_mutable_ptr<T>(&y) + first * row;
    const CoreType<T>* src = core_ptr<T>(values);
    const int64_t count = values.NumElements();
    const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(threads->num_threads, threads->workers, (count + kShardElements - 1) / kShardElements,
                      kShardElements, [&](int64_t begin, int64_t end) {
                        const int64_t from = begin * kShardElements;
                        cpu::add_in_place(dst + from, src + from,
                                          std::min(count, end * kShardElements) - from);
                      });
    ctx->set_output(0, y);
  }
};

#define FX_REGISTER_ADD_TO_ROWS(T) \
  REGISTER_KERNEL_BUILDER(         \
      Name("FusedXent>AddToRows").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), AddToRowsOp<T>);
FX_REGISTER_ADD_TO_ROWS(float)
FX_REGISTER_ADD_TO_ROWS(double)
FX_REGISTER_ADD_TO_ROWS(Eigen::half)
FX_REGISTER_ADD_TO_ROWS(Eigen::bfloat16)
#undef FX_REGISTER_ADD_TO_ROWS

}  // namespace
}  // namespace fused_xent
