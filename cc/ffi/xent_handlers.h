// The four handlers written once over a platform "runner" (cpu_handlers.cc,
// cuda_handlers.cc): decode and check XLA's buffers and attributes, fill the
// core's argument structs, and hand them to the runner, which runs the core
// kernels on its thread pool or stream. Only xla/ffi/api/ffi.h is used, so the
// same handlers register in TensorFlow's XLA and in JAX.
//
// XLA hands over buffers whose shapes it already checked against the HLO, but
// a JAX user may call the targets directly with any operands: every shape,
// dtype and attribute the kernels rely on is checked here, and a mismatch is
// an InvalidArgument error naming it, never a read outside a buffer.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/xent_params.h"
#include "cuda/workspace.h"
#include "ffi/handlers.h"
#include "ffi/target_names.h"
#include "xla/ffi/api/ffi.h"

namespace fused_xent {
namespace xla_ffi {

namespace ffi = ::xla::ffi;
using ffi::AnyBuffer;
using ffi::Result;

#define FX_FFI_RETURN_IF_ERROR(expr)           \
  do {                                         \
    ffi::Error fx_error_ = (expr);             \
    if (fx_error_.failure()) return fx_error_; \
  } while (0)

inline ffi::Error InvalidArgument(const std::string& message) { return ffi::Error::InvalidArgument(message); }

inline std::string DimsText(AnyBuffer::Dimensions dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

inline bool SameDims(AnyBuffer::Dimensions a, const std::vector<int64_t>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < b.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

inline bool IsFloatType(ffi::DataType t) {
  return t == ffi::DataType::F16 || t == ffi::DataType::BF16 || t == ffi::DataType::F32 ||
         t == ffi::DataType::F64;
}

// What every handler reads first: the logits' layout around `axis`, the shape
// without that axis (of labels, loss, lse) and the options.
struct Call {
  Layout layout;
  std::vector<int64_t> row_dims;
  Options options;
};

inline ffi::Error ReadCall(const AnyBuffer& logits, int64_t axis, float label_smoothing, float z_loss,
                           float softcap, Call* call) {
  if (!IsFloatType(logits.element_type()))
    return InvalidArgument("logits must be float16, bfloat16, float32 or float64");
  const auto dims = logits.dimensions();
  const int64_t rank = static_cast<int64_t>(dims.size());
  if (rank < 1) return InvalidArgument("logits must have rank >= 1, got a scalar");
  if (axis < -rank || axis >= rank)
    return InvalidArgument("axis " + std::to_string(axis) + " is out of range for logits of shape " +
                           DimsText(dims));
  if (axis < 0) axis += rank;
  call->layout = Layout{1, dims[axis], 1};
  call->row_dims.clear();
  for (int64_t d = 0; d < rank; ++d) {
    if (d == axis) continue;
    (d < axis ? call->layout.outer : call->layout.inner) *= dims[d];
    call->row_dims.push_back(dims[d]);
  }
  if (call->layout.classes == 0)
    return InvalidArgument("Must have at least one class, but got logits shape " + DimsText(dims));
  if (!(label_smoothing >= 0.0f && label_smoothing <= 1.0f))
    return InvalidArgument("label_smoothing must lie in [0, 1], got " + std::to_string(label_smoothing));
  if (!std::isfinite(z_loss) || z_loss < 0.0f)
    return InvalidArgument("z_loss must be finite and >= 0, got " + std::to_string(z_loss));
  if (!std::isfinite(softcap) || softcap < 0.0f)
    return InvalidArgument("softcap must be finite and >= 0 (0: no cap), got " + std::to_string(softcap));
  call->options.label_smoothing = label_smoothing;
  call->options.z_loss = z_loss;
  call->options.softcap = softcap;
  return ffi::Error::Success();
}

// A per-row buffer (labels, loss, lse, grad_loss): the logits' shape without the class axis.
inline ffi::Error CheckRows(const AnyBuffer& buffer, const Call& call, const char* name) {
  if (SameDims(buffer.dimensions(), call.row_dims)) return ffi::Error::Success();
  return InvalidArgument(std::string(name) + " must have the shape of logits without the class axis " +
                         DimsText(AnyBuffer::Dimensions(call.row_dims.data(), call.row_dims.size())) +
                         ", got " + DimsText(buffer.dimensions()));
}

inline ffi::Error CheckType(const AnyBuffer& buffer, ffi::DataType type, const char* name,
                            const char* type_name) {
  if (buffer.element_type() == type) return ffi::Error::Success();
  return InvalidArgument(std::string(name) + " must be " + type_name);
}

// A buffer with the logits' dtype and shape (dense labels, grad_logits).
inline ffi::Error CheckLikeLogits(const AnyBuffer& buffer, const AnyBuffer& logits, const char* name) {
  const auto a = buffer.dimensions(), b = logits.dimensions();
  if (buffer.element_type() == logits.element_type() &&
      std::vector<int64_t>(a.begin(), a.end()) == std::vector<int64_t>(b.begin(), b.end()))
    return ffi::Error::Success();
  return InvalidArgument(std::string(name) + " must have the dtype and shape of logits " + DimsText(b) +
                         ", got " + DimsText(a));
}

// A per-row buffer in the logits' dtype (loss, grad_loss).
inline ffi::Error CheckRowsOfLogitsType(const AnyBuffer& buffer, const AnyBuffer& logits, const Call& call,
                                        const char* name) {
  if (buffer.element_type() != logits.element_type())
    return InvalidArgument(std::string(name) + " must have the dtype of logits");
  return CheckRows(buffer, call, name);
}

inline ffi::Error CheckLse(const AnyBuffer& lse, const Call& call, const char* name = "lse") {
  FX_FFI_RETURN_IF_ERROR(CheckType(lse, ffi::DataType::F64, name, "float64"));
  return CheckRows(lse, call, name);
}

// The backward's lse: float64 rows, or the same bytes as uint32 pairs (rows x 2, as JAX's
// bitcast_convert_type gives them): a JAX residual that is no float64 array (jax/_ffi.py).
inline ffi::Error CheckLseInput(const AnyBuffer& lse, const Call& call) {
  if (lse.element_type() != ffi::DataType::U32) return CheckLse(lse, call);
  std::vector<int64_t> pairs = call.row_dims;
  pairs.push_back(2);
  if (SameDims(lse.dimensions(), pairs)) return ffi::Error::Success();
  return InvalidArgument("lse as uint32 must have the shape of logits without the class axis, then 2, got " +
                         DimsText(lse.dimensions()));
}

// Labels (int32/int64, one per row), class weights (float32, none or one per
// class) and ignore_index. Only shapes and dtypes: the buffers may be device
// memory (CUDA), so the CPU runner checks the weights' values itself.
inline ffi::Error ReadSparseInputs(const AnyBuffer& labels, const AnyBuffer& class_weights,
                                   int64_t ignore_index, bool has_ignore_index, Call* call) {
  if (labels.element_type() != ffi::DataType::S32 && labels.element_type() != ffi::DataType::S64)
    return InvalidArgument("labels must be int32 or int64");
  FX_FFI_RETURN_IF_ERROR(CheckRows(labels, *call, "labels"));
  const int64_t weights = static_cast<int64_t>(class_weights.element_count());
  if (class_weights.element_type() != ffi::DataType::F32 || class_weights.dimensions().size() != 1 ||
      (weights != 0 && weights != call->layout.classes)) {
    return InvalidArgument(
        "class_weights must be a float32 vector of " + std::to_string(call->layout.classes) +
        " weights (one per class) or of none, got shape " + DimsText(class_weights.dimensions()));
  }
  call->options.class_weights = weights ? static_cast<const float*>(class_weights.untyped_data()) : nullptr;
  call->options.has_ignore_index = has_ignore_index;
  call->options.ignore_index = ignore_index;
  return ffi::Error::Success();
}

// Calls fn(T{}) with the core element type of `type` (a checked float type).
template <typename Fn> ffi::Error WithFloatType(ffi::DataType type, const Fn& fn) {
  switch (type) {
    case ffi::DataType::F16:
      return fn(float16_t{});
    case ffi::DataType::BF16:
      return fn(bfloat16_t{});
    case ffi::DataType::F32:
      return fn(float{});
    default:
      return fn(double{});
  }
}

// Calls fn(T{}, Label{}) for checked logits and labels types.
template <typename Fn> ffi::Error WithSparseTypes(ffi::DataType logits, ffi::DataType labels, const Fn& fn) {
  return WithFloatType(
      logits, [&](auto t) { return labels == ffi::DataType::S32 ? fn(t, int32_t{}) : fn(t, int64_t{}); });
}

template <typename T> const T* In(const AnyBuffer& b) { return static_cast<const T*>(b.untyped_data()); }
template <typename T> T* Out(const AnyBuffer& b) { return static_cast<T*>(b.untyped_data()); }

// --- The workspace: the last result of every target ---------------------------------
// Device memory for the CUDA launchers, declared by the caller as a result of
// the call (so XLA allocates it with the other buffers: no allocation while the
// call runs, nothing that can fail then) and sized by cuda::workspace_bytes,
// fused_xent._core.workspace_bytes in Python. The size depends on the shape
// alone, not on the platform, and is checked everywhere: the CPU runner does
// not use it, but a call valid on one platform is valid on the other.
struct Workspace {
  void* data = nullptr;
  size_t bytes = 0;   // of the buffer
  size_t needed = 0;  // by the kernel, for this shape
};

inline ffi::Error ReadWorkspace(const AnyBuffer& buffer, cuda::Kernel kernel, const Call& call,
                                const AnyBuffer& logits, Workspace* workspace) {
  const size_t needed =
      cuda::workspace_bytes(kernel, call.layout, static_cast<int>(ffi::ByteWidth(logits.element_type())));
  workspace->data = buffer.untyped_data();
  workspace->bytes = buffer.size_bytes();
  workspace->needed = needed;
  if (workspace->bytes < needed) {
    return InvalidArgument("workspace must have at least " + std::to_string(needed) +
                           " bytes for this shape (fused_xent._core.workspace_bytes), got " +
                           std::to_string(workspace->bytes));
  }
  return ffi::Error::Success();
}

// --- What forward and backward handlers share -------------------------------------

inline ffi::Error CheckForwardOutputs(const Call& call, const AnyBuffer& logits, const AnyBuffer& loss,
                                      const AnyBuffer& lse) {
  FX_FFI_RETURN_IF_ERROR(CheckRowsOfLogitsType(loss, logits, call, "loss"));
  return CheckLse(lse, call);
}

// lse, grad_loss and the grad_logits result.
inline ffi::Error CheckBackwardBuffers(const Call& call, const AnyBuffer& logits, const AnyBuffer& lse,
                                       const AnyBuffer& grad_loss, const AnyBuffer& grad_logits) {
  FX_FFI_RETURN_IF_ERROR(CheckLseInput(lse, call));
  FX_FFI_RETURN_IF_ERROR(CheckRowsOfLogitsType(grad_loss, logits, call, "grad_loss"));
  return CheckLikeLogits(grad_logits, logits, "grad_logits");
}

// The fields of every forward argument struct but the labels.
template <typename T, typename Args> void FillForward(const Call& call, const AnyBuffer& logits,
                                                      const AnyBuffer& loss, const AnyBuffer& lse,
                                                      Args* args) {
  args->layout = call.layout;
  args->options = call.options;
  args->logits = In<T>(logits);
  args->loss = Out<T>(loss);
  args->lse = Out<double>(lse);
}

// The fields of every backward argument struct but the labels.
template <typename T, typename Args> void FillBackward(const Call& call, const AnyBuffer& logits,
                                                       const AnyBuffer& lse, const AnyBuffer& grad_loss,
                                                       const AnyBuffer& grad_logits, Args* args) {
  args->layout = call.layout;
  args->options = call.options;
  args->logits = In<T>(logits);
  args->lse = In<double>(lse);
  args->grad_loss = In<T>(grad_loss);
  args->grad_logits = Out<T>(grad_logits);
}

// --- The handlers, over Runner(ctx...).Run(args) ------------------------------------

// A vocabulary-parallel call (the *_shard targets): its logits hold `classes`
// of total_classes; labels are local, absent_label where the class is elsewhere.
struct Shard {
  int64_t total_classes = 0;  // 0: not a shard
  int64_t absent_label = 0;
};

inline ffi::Error ReadShard(const Shard& shard, Call* call) {
  if (shard.total_classes == 0) return ffi::Error::Success();
  if (shard.total_classes < call->layout.classes)
    return InvalidArgument("total_classes (" + std::to_string(shard.total_classes) +
                           ") must be at least the shard's classes (" + std::to_string(call->layout.classes) +
                           ")");
  if (call->options.class_weights)
    return InvalidArgument(
        "a vocabulary-parallel call takes no class_weights: the caller applies them per row");
  if (shard.absent_label >= 0 && shard.absent_label < call->layout.classes)
    return InvalidArgument("absent_label must not be a class of the shard, got " +
                           std::to_string(shard.absent_label));
  call->options.total_classes = shard.total_classes;
  call->options.absent_label = shard.absent_label;
  return ffi::Error::Success();
}

template <typename Runner, typename... Ctx>
ffi::Error SparseForwardOfShard(AnyBuffer logits, AnyBuffer labels, AnyBuffer class_weights,
                                Result<AnyBuffer> loss, Result<AnyBuffer> lse,
                                Result<AnyBuffer> workspace_buffer, int64_t axis, float label_smoothing,
                                float z_loss, int64_t ignore_index, bool has_ignore_index,
                                int64_t total_classes, int64_t absent_label, float softcap, Ctx... ctx) {
  Call call;
  Workspace workspace;
  FX_FFI_RETURN_IF_ERROR(ReadCall(logits, axis, label_smoothing, z_loss, softcap, &call));
  FX_FFI_RETURN_IF_ERROR(ReadSparseInputs(labels, class_weights, ignore_index, has_ignore_index, &call));
  FX_FFI_RETURN_IF_ERROR(ReadShard(Shard{total_classes, absent_label}, &call));
  FX_FFI_RETURN_IF_ERROR(CheckForwardOutputs(call, logits, *loss, *lse));
  FX_FFI_RETURN_IF_ERROR(
      ReadWorkspace(*workspace_buffer, cuda::Kernel::kSparseForward, call, logits, &workspace));
  if (call.layout.rows() == 0) return ffi::Error::Success();
  Runner runner(std::move(ctx)...);
  return WithSparseTypes(logits.element_type(), labels.element_type(), [&](auto t, auto l) {
    SparseForwardArgs<decltype(t), decltype(l)> args;
    FillForward<decltype(t)>(call, logits, *loss, *lse, &args);
    args.labels = In<decltype(l)>(labels);
    return runner.Run(args, workspace);
  });
}

template <typename Runner, typename... Ctx>
ffi::Error SparseBackwardOfShard(AnyBuffer logits, AnyBuffer labels, AnyBuffer class_weights, AnyBuffer lse,
                                 AnyBuffer grad_loss, Result<AnyBuffer> grad_logits,
                                 Result<AnyBuffer> workspace_buffer, int64_t axis, float label_smoothing,
                                 float z_loss, int64_t ignore_index, bool has_ignore_index,
                                 int64_t total_classes, int64_t absent_label, float softcap, Ctx... ctx) {
  Call call;
  Workspace workspace;
  FX_FFI_RETURN_IF_ERROR(ReadCall(logits, axis, label_smoothing, z_loss, softcap, &call));
  FX_FFI_RETURN_IF_ERROR(ReadSparseInputs(labels, class_weights, ignore_index, has_ignore_index, &call));
  FX_FFI_RETURN_IF_ERROR(ReadShard(Shard{total_classes, absent_label}, &call));
  FX_FFI_RETURN_IF_ERROR(CheckBackwardBuffers(call, logits, lse, grad_loss, *grad_logits));
  FX_FFI_RETURN_IF_ERROR(
      ReadWorkspace(*workspace_buffer, cuda::Kernel::kSparseBackward, call, logits, &workspace));
  if (call.layout.rows() == 0) return ffi::Error::Success();
  Runner runner(std::move(ctx)...);
  return WithSparseTypes(logits.element_type(), labels.element_type(), [&](auto t, auto l) {
    SparseBackwardArgs<decltype(t), decltype(l)> args;
    FillBackward<decltype(t)>(call, logits, lse, grad_loss, *grad_logits, &args);
    args.labels = In<decltype(l)>(labels);
    return runner.Run(args, workspace);
  });
}

template <typename Runner, typename... Ctx>
ffi::Error SparseForward(AnyBuffer logits, AnyBuffer labels, AnyBuffer class_weights, Result<AnyBuffer> loss,
                         Result<AnyBuffer> lse, Result<AnyBuffer> workspace_buffer, int64_t axis,
                         float label_smoothing, float z_loss, int64_t ignore_index, bool has_ignore_index,
                         float softcap, Ctx... ctx) {
  return SparseForwardOfShard<Runner, Ctx...>(logits, labels, class_weights, loss, lse, workspace_buffer,
                                              axis, label_smoothing, z_loss, ignore_index, has_ignore_index,
                                              0, 0, softcap, std::move(ctx)...);
}

template <typename Runner, typename... Ctx>
ffi::Error SparseBackward(AnyBuffer logits, AnyBuffer labels, AnyBuffer class_weights, AnyBuffer lse,
                          AnyBuffer grad_loss, Result<AnyBuffer> grad_logits,
                          Result<AnyBuffer> workspace_buffer, int64_t axis, float label_smoothing,
                          float z_loss, int64_t ignore_index, bool has_ignore_index, float softcap,
                          Ctx... ctx) {
  return SparseBackwardOfShard<Runner, Ctx...>(logits, labels, class_weights, lse, grad_loss, grad_logits,
                                               workspace_buffer, axis, label_smoothing, z_loss, ignore_index,
                                               has_ignore_index, 0, 0, softcap, std::move(ctx)...);
}

// Dense shards (the *_shard targets): the forward also returns each row's label
// sum over its classes; the backward takes the whole rows' label sums.
inline ffi::Error ReadDenseShard(int64_t total_classes, Call* call) {
  if (total_classes == 0) return ffi::Error::Success();
  if (total_classes < call->layout.classes)
    return InvalidArgument("total_classes (" + std::to_string(total_classes) +
                           ") must be at least the shard's classes (" + std::to_string(call->layout.classes) +
                           ")");
  call->options.total_classes = total_classes;
  return ffi::Error::Success();
}

inline ffi::Error CheckLabelSums(const AnyBuffer& sums, const Call& call) {
  FX_FFI_RETURN_IF_ERROR(CheckType(sums, ffi::DataType::F64, "label_sums", "float64"));
  return CheckRows(sums, call, "label_sums");
}

template <typename Runner, typename... Ctx>
ffi::Error DenseForwardImpl(AnyBuffer logits, AnyBuffer labels, Result<AnyBuffer> loss, Result<AnyBuffer> lse,
                            AnyBuffer* label_sums, Result<AnyBuffer> workspace_buffer, int64_t axis,
                            float label_smoothing, float z_loss, int64_t total_classes, float softcap,
                            Ctx... ctx) {
  Call call;
  Workspace workspace;
  FX_FFI_RETURN_IF_ERROR(ReadCall(logits, axis, label_smoothing, z_loss, softcap, &call));
  FX_FFI_RETURN_IF_ERROR(ReadDenseShard(total_classes, &call));
  FX_FFI_RETURN_IF_ERROR(CheckLikeLogits(labels, logits, "labels"));
  FX_FFI_RETURN_IF_ERROR(CheckForwardOutputs(call, logits, *loss, *lse));
  if (label_sums) FX_FFI_RETURN_IF_ERROR(CheckLabelSums(*label_sums, call));
  FX_FFI_RETURN_IF_ERROR(
      ReadWorkspace(*workspace_buffer, cuda::Kernel::kDenseForward, call, logits, &workspace));
  if (call.layout.rows() == 0) return ffi::Error::Success();
  Runner runner(std::move(ctx)...);
  return WithFloatType(logits.element_type(), [&](auto t) {
    DenseForwardArgs<decltype(t)> args;
    FillForward<decltype(t)>(call, logits, *loss, *lse, &args);
    args.labels = In<decltype(t)>(labels);
    if (label_sums) args.label_sums = Out<double>(*label_sums);
    return runner.Run(args, workspace);
  });
}

template <typename Runner, typename... Ctx>
ffi::Error DenseForward(AnyBuffer logits, AnyBuffer labels, Result<AnyBuffer> loss, Result<AnyBuffer> lse,
                        Result<AnyBuffer> workspace_buffer, int64_t axis, float label_smoothing, float z_loss,
                        float softcap, Ctx... ctx) {
  return DenseForwardImpl<Runner, Ctx...>(logits, labels, loss, lse, nullptr, workspace_buffer, axis,
                                          label_smoothing, z_loss, 0, softcap, std::move(ctx)...);
}

template <typename Runner, typename... Ctx>
ffi::Error DenseForwardOfShard(AnyBuffer logits, AnyBuffer labels, Result<AnyBuffer> loss,
                               Result<AnyBuffer> lse, Result<AnyBuffer> label_sums,
                               Result<AnyBuffer> workspace_buffer, int64_t axis, float label_smoothing,
                               float z_loss, int64_t total_classes, float softcap, Ctx... ctx) {
  return DenseForwardImpl<Runner, Ctx...>(logits, labels, loss, lse, &*label_sums, workspace_buffer, axis,
                                          label_smoothing, z_loss, total_classes, softcap, std::move(ctx)...);
}

template <typename Runner, typename... Ctx>
ffi::Error DenseBackwardImpl(AnyBuffer logits, AnyBuffer labels, AnyBuffer lse, AnyBuffer grad_loss,
                             const AnyBuffer* label_sums, Result<AnyBuffer> grad_logits,
                             Result<AnyBuffer> workspace_buffer, int64_t axis, float label_smoothing,
                             float z_loss, int64_t total_classes, float softcap, Ctx... ctx) {
  Call call;
  Workspace workspace;
  FX_FFI_RETURN_IF_ERROR(ReadCall(logits, axis, label_smoothing, z_loss, softcap, &call));
  FX_FFI_RETURN_IF_ERROR(ReadDenseShard(total_classes, &call));
  FX_FFI_RETURN_IF_ERROR(CheckLikeLogits(labels, logits, "labels"));
  FX_FFI_RETURN_IF_ERROR(CheckBackwardBuffers(call, logits, lse, grad_loss, *grad_logits));
  if (label_sums) FX_FFI_RETURN_IF_ERROR(CheckLabelSums(*label_sums, call));
  FX_FFI_RETURN_IF_ERROR(
      ReadWorkspace(*workspace_buffer, cuda::Kernel::kDenseBackward, call, logits, &workspace));
  if (call.layout.rows() == 0) return ffi::Error::Success();
  Runner runner(std::move(ctx)...);
  return WithFloatType(logits.element_type(), [&](auto t) {
    DenseBackwardArgs<decltype(t)> args;
    FillBackward<decltype(t)>(call, logits, lse, grad_loss, *grad_logits, &args);
    args.labels = In<decltype(t)>(labels);
    if (label_sums) args.label_sums = In<double>(*label_sums);
    return runner.Run(args, workspace);
  });
}

template <typename Runner, typename... Ctx>
ffi::Error DenseBackward(AnyBuffer logits, AnyBuffer labels, AnyBuffer lse, AnyBuffer grad_loss,
                         Result<AnyBuffer> grad_logits, Result<AnyBuffer> workspace_buffer, int64_t axis,
                         float label_smoothing, float z_loss, float softcap, Ctx... ctx) {
  return DenseBackwardImpl<Runner, Ctx...>(logits, labels, lse, grad_loss, nullptr, grad_logits,
                                           workspace_buffer, axis, label_smoothing, z_loss, 0, softcap,
                                           std::move(ctx)...);
}

template <typename Runner, typename... Ctx>
ffi::Error DenseBackwardOfShard(AnyBuffer logits, AnyBuffer labels, AnyBuffer lse, AnyBuffer grad_loss,
                                AnyBuffer label_sums, Result<AnyBuffer> grad_logits,
                                Result<AnyBuffer> workspace_buffer, int64_t axis, float label_smoothing,
                                float z_loss, int64_t total_classes, float softcap, Ctx... ctx) {
  return DenseBackwardImpl<Runner, Ctx...>(logits, labels, lse, grad_loss, &label_sums, grad_logits,
                                           workspace_buffer, axis, label_smoothing, z_loss, total_classes,
                                           softcap, std::move(ctx)...);
}

// --- Bindings: the operands and attributes above; the variadic part appends
// the platform's contexts, e.g. .Ctx<ffi::ThreadPool>(). (Macros, since an XLA
// binding is built in a single expression: it cannot be passed around.)

#define FX_FFI_COMMON_ATTRS .Attr<int64_t>("axis").Attr<float>("label_smoothing").Attr<float>("z_loss")
#define FX_FFI_SPARSE_ATTRS FX_FFI_COMMON_ATTRS.Attr<int64_t>("ignore_index").Attr<bool>("has_ignore_index")
#define FX_FFI_ARGS2 .Arg<::xla::ffi::AnyBuffer>().Arg<::xla::ffi::AnyBuffer>()
#define FX_FFI_ARGS3 FX_FFI_ARGS2.Arg<::xla::ffi::AnyBuffer>()
#define FX_FFI_RET .Ret<::xla::ffi::AnyBuffer>()
#define FX_FFI_CAP .Attr<float>("softcap")

// The last result of each is the workspace.
#define FX_FFI_BIND_SPARSE_FORWARD(...) \
  ::xla::ffi::Ffi::Bind()               \
      FX_FFI_ARGS3 FX_FFI_RET FX_FFI_RET FX_FFI_RET FX_FFI_SPARSE_ATTRS FX_FFI_CAP __VA_ARGS__
#define FX_FFI_BIND_SPARSE_BACKWARD(...) \
  ::xla::ffi::Ffi::Bind()                \
      FX_FFI_ARGS3 FX_FFI_ARGS2 FX_FFI_RET FX_FFI_RET FX_FFI_SPARSE_ATTRS FX_FFI_CAP __VA_ARGS__
#define FX_FFI_SHARD_ATTRS FX_FFI_SPARSE_ATTRS.Attr<int64_t>("total_classes").Attr<int64_t>("absent_label")
#define FX_FFI_BIND_SPARSE_FORWARD_SHARD(...) \
  ::xla::ffi::Ffi::Bind()                     \
      FX_FFI_ARGS3 FX_FFI_RET FX_FFI_RET FX_FFI_RET FX_FFI_SHARD_ATTRS FX_FFI_CAP __VA_ARGS__
#define FX_FFI_BIND_SPARSE_BACKWARD_SHARD(...) \
  ::xla::ffi::Ffi::Bind()                      \
      FX_FFI_ARGS3 FX_FFI_ARGS2 FX_FFI_RET FX_FFI_RET FX_FFI_SHARD_ATTRS FX_FFI_CAP __VA_ARGS__
#define FX_FFI_DENSE_SHARD_ATTRS FX_FFI_COMMON_ATTRS.Attr<int64_t>("total_classes")
#define FX_FFI_BIND_DENSE_FORWARD_SHARD(...)                                                                \
  ::xla::ffi::Ffi::Bind() FX_FFI_ARGS2 FX_FFI_RET FX_FFI_RET FX_FFI_RET FX_FFI_RET FX_FFI_DENSE_SHARD_ATTRS \
      FX_FFI_CAP __VA_ARGS__
#define FX_FFI_BIND_DENSE_BACKWARD_SHARD(...) \
  ::xla::ffi::Ffi::Bind()                     \
      FX_FFI_ARGS3 FX_FFI_ARGS2 FX_FFI_RET FX_FFI_RET FX_FFI_DENSE_SHARD_ATTRS FX_FFI_CAP __VA_ARGS__
#define FX_FFI_BIND_DENSE_FORWARD(...) \
  ::xla::ffi::Ffi::Bind()              \
      FX_FFI_ARGS2 FX_FFI_RET FX_FFI_RET FX_FFI_RET FX_FFI_COMMON_ATTRS FX_FFI_CAP __VA_ARGS__
#define FX_FFI_BIND_DENSE_BACKWARD(...) \
  ::xla::ffi::Ffi::Bind()               \
      FX_FFI_ARGS2 FX_FFI_ARGS2 FX_FFI_RET FX_FFI_RET FX_FFI_COMMON_ATTRS FX_FFI_CAP __VA_ARGS__

// Defines the four handlers over Runner, whose contexts are bound by
// CONTEXTS (e.g. .Ctx<ffi::ThreadPool>()) and arrive as the types listed after
// it, with the handler traits TRAITS (ffi::Traits), and `targets_fn`
// (ffi/handlers.h) returning them with their names.
#define FX_FFI_DEFINE_TARGETS(targets_fn, Runner, CONTEXTS, TRAITS, ...)                               \
  XLA_FFI_DEFINE_HANDLER(kSparseForwardHandler, (&SparseForward<Runner, __VA_ARGS__>),                 \
                         FX_FFI_BIND_SPARSE_FORWARD(CONTEXTS), TRAITS);                                \
  XLA_FFI_DEFINE_HANDLER(kSparseBackwardHandler, (&SparseBackward<Runner, __VA_ARGS__>),               \
                         FX_FFI_BIND_SPARSE_BACKWARD(CONTEXTS), TRAITS);                               \
  XLA_FFI_DEFINE_HANDLER(kSparseForwardShardHandler, (&SparseForwardOfShard<Runner, __VA_ARGS__>),     \
                         FX_FFI_BIND_SPARSE_FORWARD_SHARD(CONTEXTS), TRAITS);                          \
  XLA_FFI_DEFINE_HANDLER(kSparseBackwardShardHandler, (&SparseBackwardOfShard<Runner, __VA_ARGS__>),   \
                         FX_FFI_BIND_SPARSE_BACKWARD_SHARD(CONTEXTS), TRAITS);                         \
  XLA_FFI_DEFINE_HANDLER(kDenseForwardHandler, (&DenseForward<Runner, __VA_ARGS__>),                   \
                         FX_FFI_BIND_DENSE_FORWARD(CONTEXTS), TRAITS);                                 \
  XLA_FFI_DEFINE_HANDLER(kDenseBackwardHandler, (&DenseBackward<Runner, __VA_ARGS__>),                 \
                         FX_FFI_BIND_DENSE_BACKWARD(CONTEXTS), TRAITS);                                \
  XLA_FFI_DEFINE_HANDLER(kDenseForwardShardHandler, (&DenseForwardOfShard<Runner, __VA_ARGS__>),       \
                         FX_FFI_BIND_DENSE_FORWARD_SHARD(CONTEXTS), TRAITS);                           \
  XLA_FFI_DEFINE_HANDLER(kDenseBackwardShardHandler, (&DenseBackwardOfShard<Runner, __VA_ARGS__>),     \
                         FX_FFI_BIND_DENSE_BACKWARD_SHARD(CONTEXTS), TRAITS);                          \
  const Target* targets_fn(int* count) {                                                               \
    static const Target targets[] = {{ffi_targets::kSparseForward, kSparseForwardHandler},             \
                                     {ffi_targets::kSparseBackward, kSparseBackwardHandler},           \
                                     {ffi_targets::kSparseForwardShard, kSparseForwardShardHandler},   \
                                     {ffi_targets::kSparseBackwardShard, kSparseBackwardShardHandler}, \
                                     {ffi_targets::kDenseForward, kDenseForwardHandler},               \
                                     {ffi_targets::kDenseBackward, kDenseBackwardHandler},             \
                                     {ffi_targets::kDenseForwardShard, kDenseForwardShardHandler},     \
                                     {ffi_targets::kDenseBackwardShard, kDenseBackwardShardHandler}};  \
    *count = static_cast<int>(sizeof(targets) / sizeof(targets[0]));                                   \
    return targets;                                                                                    \
  }

}  // namespace xla_ffi
}  // namespace fused_xent
