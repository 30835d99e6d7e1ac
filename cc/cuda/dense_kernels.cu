// Dense-label softmax cross-entropy on CUDA: forward (loss, lse) and backward.
#include "cuda/row_kernels.cuh"

namespace fused_xent {
namespace cuda {
namespace {

template <typename T>
__device__ void finish_row(const DenseForwardArgs<T>& args, int64_t r, const RowSums<Acc<T>>& sums) {
  const Acc<T> log_sum_exp = log_sum(sums);
  const double lse = lse_of(sums.max, log_sum_exp);
  args.lse[r] = lse;
  args.loss[r] = from_acc<T>(dense_row_loss<Acc<T>>(
      sums, log_sum_exp, lse, args.options, uniform_share<Acc<T>>(args.layout.classes, args.options)));
  if (args.label_sums) args.label_sums[r] = sums.label_sum;
}

// Dense kernels hold logits and labels in registers: no occupancy bound, or they spill.
template <typename T> __global__ void __launch_bounds__(kThreads)
    forward_kernel(const DenseForwardArgs<T> args, const Plan plan, RowSums<Acc<T>>* partial) {
  using A = Acc<T>;
  const Slot s = slot_of(plan, args.layout);
  const bool mean = args.options.label_smoothing > 0;
  SumsVisitor<A, true> visit{RowSums<A>(), mean, A(1) / static_cast<A>(args.layout.classes),
                             A(args.options.softcap)};
  if (s.active) {
    const int64_t offset = args.layout.row_offset(s.row);
    const RowPointers<T> row{args.logits + offset, args.labels + offset, nullptr, args.layout.inner};
    walk_slice<true, false>(row, s.begin, s.end, s.lane, plan.group, plan.vectorized, visit);
  }
  const RowSums<A> sums = reduce_row_sums(visit.sums, plan.group, mean, true);
  if (!s.active || s.lane != 0) return;
  if (plan.splits == 1)
    finish_row(args, s.row, sums);
  else
    partial[s.row * plan.splits + blockIdx.y] = sums;
}

// Merges each row's chunk sums (a warp per row, a fixed order), then finishes the row.
template <typename T> __global__ void __launch_bounds__(kThreads)
    merge_kernel(const DenseForwardArgs<T> args, const Plan plan, const RowSums<Acc<T>>* partial) {
  const int64_t r = merge_row();
  if (r >= args.layout.rows()) return;  // the whole warp: it shares r
  const int lane = threadIdx.x % kWarp;
  const RowSums<Acc<T>> sums =
      merge_chunks(partial, r, plan.splits, lane, args.options.label_smoothing > 0, true);
  if (lane == 0) finish_row(args, r, sums);
}

// The backward needs sum_j t_j before its first element: a first pass leaves
// each chunk's label sum in `label_sums`.
template <typename T> __global__ void __launch_bounds__(kThreads)
    label_sum_kernel(const DenseBackwardArgs<T> args, const Plan plan, Acc<T>* label_sums) {
  const Slot s = slot_of(plan, args.layout);
  AddVisitor<Acc<T>> visit;
  if (s.active) {
    const RowPointers<T> row{args.labels + args.layout.row_offset(s.row), nullptr, nullptr,
                             args.layout.inner};
    walk_slice<false, false>(row, s.begin, s.end, s.lane, plan.group, plan.vectorized, visit);
  }
  const Acc<T> sum = reduce_sum(visit.sum, plan.group);
  if (s.active && s.lane == 0) label_sums[s.row * plan.splits + blockIdx.y] = sum;
}

template <typename T> __global__ void __launch_bounds__(kThreads)
    backward_kernel(const DenseBackwardArgs<T> args, const Plan plan, const Acc<T>* label_sums) {
  using A = Acc<T>;
  const Slot s = slot_of(plan, args.layout);
  // Every thread of the block takes part (the sum synchronises), so no early return before it.
  // A shard's label sums are given, of whole rows (the same for the whole launch).
  A label_sum = 0;
  if (args.label_sums) {
    if (s.active) label_sum = static_cast<A>(args.label_sums[s.row]);
  } else {
    label_sum = group_total(label_sums + (s.active ? s.row * plan.splits : 0), plan.splits, s.lane,
                            plan.group, s.active);
  }
  if (!s.active) return;
  const double lse = args.lse[s.row];
  GradientVisitor<A, true> visit{
      backward_coefficients<A>(to_acc(args.grad_loss[s.row]), A(1), lse,
                               dense_target_sum(label_sum, args.options),
                               row_classes(args.layout.classes, args.options), args.options),
      split_lse<A>(lse), -1, A(args.options.softcap)};
  const int64_t offset = args.layout.row_offset(s.row);
  const RowPointers<T> row{args.logits + offset, args.labels + offset, args.grad_logits + offset,
                           args.layout.inner};
  walk_slice<true, true>(row, s.begin, s.end, s.lane, plan.group, plan.vectorized, visit);
}

}  // namespace

template <typename T>
const char* dense_forward(const DenseForwardArgs<T>& args, void* workspace, cudaStream_t stream) {
  const int64_t rows = args.layout.rows();
  if (rows == 0) return nullptr;
  const void* buffers[] = {args.logits, args.labels};
  const Plan plan = make_plan(args.layout, sizeof(T), buffers, 2);
  if (const char* error = check_grid(plan)) return error;
  auto* partial = static_cast<RowSums<Acc<T>>*>(workspace);
  if (plan.splits > 1 && !partial) return "fused_xent CUDA: the forward needs a workspace for this shape";
  forward_kernel<<<grid_of(plan), kThreads, 0, stream>>>(args, plan, partial);
  if (plan.splits > 1) merge_kernel<<<merge_blocks(rows), kThreads, 0, stream>>>(args, plan, partial);
  return launch_status();
}

template <typename T>
const char* dense_backward(const DenseBackwardArgs<T>& args, void* workspace, cudaStream_t stream) {
  if (args.layout.rows() == 0) return nullptr;
  const void* buffers[] = {args.logits, args.labels, args.grad_logits};
  const Plan plan = make_plan(args.layout, sizeof(T), buffers, 3);
  if (const char* error = check_grid(plan)) return error;
  if (!workspace) return "fused_xent CUDA: the dense backward needs a workspace";
  auto* label_sums = static_cast<Acc<T>*>(workspace);
  if (!args.label_sums) label_sum_kernel<<<grid_of(plan), kThreads, 0, stream>>>(args, plan, label_sums);
  backward_kernel<<<grid_of(plan), kThreads, 0, stream>>>(args, plan, label_sums);
  return launch_status();
}

#define FX_INSTANTIATE(T)                                                                 \
  template const char* dense_forward<T>(const DenseForwardArgs<T>&, void*, cudaStream_t); \
  template const char* dense_backward<T>(const DenseBackwardArgs<T>&, void*, cudaStream_t);

FX_INSTANTIATE(float)
FX_INSTANTIATE(double)
FX_INSTANTIATE(float16_t)
FX_INSTANTIATE(bfloat16_t)

}  // namespace cuda
}  // namespace fused_xent
