// Sparse-label softmax cross-entropy on CUDA: forward (loss, lse) and backward.
#include "cuda/row_kernels.cuh"

namespace fused_xent {
namespace cuda {
namespace {

// The row's label and, when valid, its logit: read before the row's sums are
// complete so the loads overlap the reduction.
template <typename A> struct LabelLogit {
  LabelKind kind;
  int64_t label;
  A z_label;
};

template <typename T, typename Label>
__device__ LabelLogit<Acc<T>> label_logit(const SparseForwardArgs<T, Label>& args, int64_t r, Label label) {
  LabelLogit<Acc<T>> l{classify_label(label, args.layout.classes, args.options), static_cast<int64_t>(label),
                       0};
  if (l.kind == LabelKind::kValid)
    l.z_label = capped_logit(to_acc(args.logits[args.layout.row_offset(r) + l.label * args.layout.inner]),
                             args.options);
  return l;
}

// Loss and lse of row r from its sums, as the CPU's finish_sparse_row.
template <typename T, typename Label> __device__ void finish_row(const SparseForwardArgs<T, Label>& args,
                                                                 int64_t r, const RowSums<Acc<T>>& sums,
                                                                 const LabelLogit<Acc<T>>& l) {
  using A = Acc<T>;
  const A log_sum_exp = log_sum(sums);
  const double lse = lse_of(sums.max, log_sum_exp);
  args.lse[r] = lse;
  A loss = 0;
  const A share = uniform_share<A>(args.layout.classes, args.options);
  if (l.kind == LabelKind::kValid)
    loss = sparse_row_loss<A>(sums, log_sum_exp, lse, true, l.z_label, A(label_weight(l.label, args.options)),
                              args.options, share);
  else if (l.kind == LabelKind::kAbsent)
    loss = sparse_row_loss<A>(sums, log_sum_exp, lse, false, A(0), A(1), args.options, share);
  else if (l.kind == LabelKind::kOutOfRange)
    loss = quiet_nan<A>();
  args.loss[r] = from_acc<T>(loss);
}

// One block row-group per (rows, chunk); with one chunk per row the group's
// first thread finishes the row, else it leaves the chunk's sums in `partial`.
template <typename T, typename Label> __global__ void __launch_bounds__(kThreads, kMinBlocksOf<T>)
    forward_kernel(const SparseForwardArgs<T, Label> args, const Plan plan, RowSums<Acc<T>>* partial) {
  using A = Acc<T>;
  const Slot s = slot_of(plan, args.layout);
  const bool mean = args.options.label_smoothing > 0;
  const bool finishes = s.active && s.lane == 0 && plan.splits == 1;
  const Label label = finishes ? args.labels[s.row] : Label(0);  // in flight during the walk
  SumsVisitor<A, false> visit{RowSums<A>(), mean, A(1) / static_cast<A>(args.layout.classes),
                              A(args.options.softcap)};
  if (s.active) {
    const RowPointers<T> row{args.logits + args.layout.row_offset(s.row), nullptr, nullptr,
                             args.layout.inner};
    walk_slice<false, false>(row, s.begin, s.end, s.lane, plan.group, plan.vectorized, visit);
  }
  LabelLogit<A> l{};
  if (finishes) l = label_logit(args, s.row, label);  // in flight during the reduction
  const RowSums<A> sums = reduce_row_sums(visit.sums, plan.group, mean, false);
  if (!s.active || s.lane != 0) return;
  if (plan.splits == 1)
    finish_row(args, s.row, sums, l);
  else
    partial[s.row * plan.splits + blockIdx.y] = sums;
}

// Merges each row's chunk sums (a warp per row, a fixed order), then finishes the row.
template <typename T, typename Label> __global__ void __launch_bounds__(kThreads)
    merge_kernel(const SparseForwardArgs<T, Label> args, const Plan plan, const RowSums<Acc<T>>* partial) {
  const int64_t r = merge_row();
  if (r >= args.layout.rows()) return;  // the whole warp: it shares r
  const int lane = threadIdx.x % kWarp;
  const Label label = lane == 0 ? args.labels[r] : Label(0);  // in flight during the merge
  const RowSums<Acc<T>> sums =
      merge_chunks(partial, r, plan.splits, lane, args.options.label_smoothing > 0, false);
  if (lane == 0) finish_row(args, r, sums, label_logit(args, r, label));
}

template <typename T, typename Label> __global__ void __launch_bounds__(kThreads, kMinBlocksOf<T>)
    backward_kernel(const SparseBackwardArgs<T, Label> args, const Plan plan) {
  using A = Acc<T>;
  const Slot s = slot_of(plan, args.layout);
  if (!s.active) return;
  const int64_t offset = args.layout.row_offset(s.row);
  const RowPointers<T> row{args.logits + offset, nullptr, args.grad_logits + offset, args.layout.inner};
  const int64_t classes = args.layout.classes;
  const LabelKind kind = classify_label(args.labels[s.row], classes, args.options);
  const bool absent = kind == LabelKind::kAbsent;  // a shard's row without its target: p_j - eps / C only
  if (kind != LabelKind::kValid && !absent) {      // out of range: NaN; ignored: weight 0
    FillVisitor<A> fill{kind == LabelKind::kOutOfRange ? quiet_nan<A>() : A(0)};
    walk_slice<false, true>(row, s.begin, s.end, s.lane, plan.group, plan.vectorized, fill);
    return;
  }
  const int64_t y = absent ? -1 : static_cast<int64_t>(args.labels[s.row]);
  const double lse = args.lse[s.row];
  GradientVisitor<A, false> visit{
      backward_coefficients<A>(to_acc(args.grad_loss[s.row]),
                               absent ? A(1) : A(label_weight(y, args.options)), lse, A(1),
                               row_classes(classes, args.options), args.options),
      split_lse<A>(lse), y, A(args.options.softcap)};
  walk_slice<false, true>(row, s.begin, s.end, s.lane, plan.group, plan.vectorized, visit);
}

}  // namespace

template <typename T, typename Label>
const char* sparse_forward(const SparseForwardArgs<T, Label>& args, void* workspace, cudaStream_t stream) {
  const int64_t rows = args.layout.rows();
  if (rows == 0) return nullptr;
  const void* buffers[] = {args.logits};
  const Plan plan = make_plan(args.layout, sizeof(T), buffers, 1);
  if (const char* error = check_grid(plan)) return error;
  auto* partial = static_cast<RowSums<Acc<T>>*>(workspace);
  if (plan.splits > 1 && !partial) return "fused_xent CUDA: the forward needs a workspace for this shape";
  forward_kernel<<<grid_of(plan), kThreads, 0, stream>>>(args, plan, partial);
  if (plan.splits > 1) merge_kernel<<<merge_blocks(rows), kThreads, 0, stream>>>(args, plan, partial);
  return launch_status();
}

template <typename T, typename Label>
const char* sparse_backward(const SparseBackwardArgs<T, Label>& args, cudaStream_t stream) {
  if (args.layout.rows() == 0) return nullptr;
  const void* buffers[] = {args.logits, args.grad_logits};
  const Plan plan = make_plan(args.layout, sizeof(T), buffers, 2);
  if (const char* error = check_grid(plan)) return error;
  backward_kernel<<<grid_of(plan), kThreads, 0, stream>>>(args, plan);
  return launch_status();
}

#define FX_INSTANTIATE(T, Label)                                                                          \
  template const char* sparse_forward<T, Label>(const SparseForwardArgs<T, Label>&, void*, cudaStream_t); \
  template const char* sparse_backward<T, Label>(const SparseBackwardArgs<T, Label>&, cudaStream_t);
#define FX_INSTANTIATE_LABELS(T) FX_INSTANTIATE(T, int32_t) FX_INSTANTIATE(T, int64_t)

FX_INSTANTIATE_LABELS(float)
FX_INSTANTIATE_LABELS(double)
FX_INSTANTIATE_LABELS(float16_t)
FX_INSTANTIATE_LABELS(bfloat16_t)

}  // namespace cuda
}  // namespace fused_xent
