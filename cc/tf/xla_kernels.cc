// XLA lowerings of the four ops, so graphs that use them compile under
// tf.function(jit_compile=True) and Keras' jit_compile (on by default with a GPU).
// Two lowerings (docs/xla.md):
// - a typed-FFI custom call to the fused kernels' XLA handlers (cc/ffi), on
//   devices for which this build has one (CPU; GPU in CUDA builds). Results
//   are bitwise those of the TensorFlow kernels, and a bad label raises.
// - HLO: the math of cc/core/row_math.h written with XLA builder ops, which XLA
//   fuses itself; for other devices, or forced by FUSED_XENT_XLA_LOWERING=hlo.
//   A compiled program cannot raise there, so an out-of-range sparse label
//   gives NaN loss and gradient for its row.
//
// The kernels are registered with REGISTER_KERNEL_BUILDER on the XLA JIT
// device types, not REGISTER_XLA_OP: the XLA registry creates its kernels
// once, when TensorFlow starts, and ignores a library loaded after that.
//
// Built without FUSED_XENT_WITH_XLA (CMake option FUSED_XENT_XLA=OFF), this
// file only registers a stub that says so when XLA tries to compile an op.

#if defined(FUSED_XENT_WITH_XLA)

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "cuda/workspace.h"
#include "ffi/target_names.h"
#include "tf/kernel_support.h"
#include "tensorflow/compiler/tf2xla/shape_util.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
// XLA's builder is under xla/client/ up to TensorFlow 2.18, xla/hlo/builder/ from 2.19.
#if __has_include("xla/hlo/builder/xla_builder.h")
#include "xla/hlo/builder/lib/arithmetic.h"
#include "xla/hlo/builder/lib/constants.h"
#include "xla/hlo/builder/lib/slicing.h"
#include "xla/hlo/builder/xla_builder.h"
#else
#include "xla/client/lib/arithmetic.h"
#include "xla/client/lib/constants.h"
#include "xla/client/lib/slicing.h"
#include "xla/client/xla_builder.h"
#endif
#include "xla/shape_util.h"

namespace fused_xent {
namespace {

using ::tensorflow::OpKernelConstruction;
using ::tensorflow::TensorShape;
using ::tensorflow::XlaOpKernel;
using ::tensorflow::XlaOpKernelContext;
using ::xla::PrimitiveType;
using ::xla::XlaOp;

// The logits' shape around the class axis: moves values between rows (the
// shape without the axis) and elements, and reduces along the axis in the
// accumulation type (float32 for half types and float, float64 for double).
class Rows {
 public:
  Rows(xla::XlaBuilder* b, const TensorShape& logits, int64_t axis, PrimitiveType acc) : b_(b), acc_(acc) {
    axis_ = axis < 0 ? axis + logits.dims() : axis;
    for (int64_t d = 0; d < logits.dims(); ++d) {
      dims_.push_back(logits.dim_size(d));
      if (d == axis_) continue;
      row_dims_.push_back(d);
      row_sizes_.push_back(logits.dim_size(d));
    }
    add_ = xla::CreateScalarAddComputation(acc, b);
    max_ = xla::CreateScalarMaxComputation(acc, b);
  }

  xla::XlaBuilder* builder() const { return b_; }
  PrimitiveType acc() const { return acc_; }
  int64_t classes() const { return dims_[axis_]; }
  const std::vector<int64_t>& dims() const { return dims_; }

  XlaOp Expand(XlaOp row) const { return xla::BroadcastInDim(row, dims_, row_dims_); }
  XlaOp Sum(XlaOp x) const { return xla::Reduce(x, Const(0), add_, {axis_}); }
  XlaOp Max(XlaOp x) const { return xla::Reduce(x, xla::MinValue(b_, acc_), max_, {axis_}); }
  XlaOp Const(double value) const { return xla::ConstantR0WithType(b_, acc_, value); }
  XlaOp ToAcc(XlaOp x) const { return xla::ConvertElementType(x, acc_); }
  // Class index of every element, in the labels' integer type.
  XlaOp ClassIndex(PrimitiveType type) const {
    return xla::Iota(b_, xla::ShapeUtil::MakeShape(type, dims_), axis_);
  }
  XlaOp AtClass(XlaOp values, XlaOp class_index) const;

 private:
  xla::XlaBuilder* b_;
  PrimitiveType acc_;
  std::vector<int64_t> dims_;
  std::vector<int64_t> row_dims_;   // the dims of dims_ that rows keep
  std::vector<int64_t> row_sizes_;  // their sizes: the shape of a per-row value
  int64_t axis_;
  xla::XlaComputation add_;
  xla::XlaComputation max_;
};

// values[row, class_index[row]] for every row: a gather of one element per
// row (cheaper than a masked reduction on XLA:CPU, which materializes the mask).
// class_index is S64, per row, within [0, C).
XlaOp Rows::AtClass(XlaOp values, XlaOp class_index) const {
  if (xla::ShapeUtil::ElementsIn(xla::ShapeUtil::MakeShape(xla::S64, row_sizes_)) == 0) {
    return xla::ConvertElementType(class_index, b_->GetShape(values)->element_type());  // no rows: no gather
  }
  const int64_t row_rank = static_cast<int64_t>(row_sizes_.size());
  std::vector<int64_t> column_shape = row_sizes_;
  column_shape.push_back(1);
  const xla::Shape column = xla::ShapeUtil::MakeShape(xla::S64, column_shape);
  std::vector<XlaOp> coordinates;  // one column per dim of values: [rows..., rank]
  xla::GatherDimensionNumbers numbers;
  for (int64_t d = 0, row_dim = 0; d < static_cast<int64_t>(dims_.size()); ++d) {
    coordinates.push_back(d == axis_ ? xla::Reshape(class_index, column_shape)
                                     : xla::Iota(b_, column, row_dim++));
    numbers.add_collapsed_slice_dims(d);
    numbers.add_start_index_map(d);
  }
  numbers.set_index_vector_dim(row_rank);
  const std::vector<int64_t> slice_sizes(dims_.size(), 1);
  return xla::Gather(values, xla::ConcatInDim(b_, coordinates, row_rank), numbers, slice_sizes);
}

PrimitiveType AccumulationType(PrimitiveType t) { return t == xla::F64 ? xla::F64 : xla::F32; }

// Per-row log-sum-exp, kept relative to a shift (the row max) as on the CPU.
struct LogSumExp {
  XlaOp z;        // logits in the accumulation type
  XlaOp shift;    // row max; 0 for an all -inf row, so z - shift stays -inf, not NaN
  XlaOp log_sum;  // log sum_j exp(z_j - shift), as row_math's log_sum_of
  XlaOp lse;      // shift + log_sum, in float64
};

// row_math's softcap_at: z = cap tanh(x / cap) and dz/dx, from e = exp(-2|x| / cap).
struct Capped {
  XlaOp value;
  XlaOp slope;
};

Capped Softcap(const Rows& rows, XlaOp x, const Options& o) {
  const XlaOp u = xla::Mul(xla::Neg(xla::Abs(x)), rows.Const(2.0 / static_cast<double>(o.softcap)));
  const XlaOp e = xla::Exp(u);
  const XlaOp one_plus_e = xla::Add(rows.Const(1), e);
  const XlaOp value = xla::Mul(rows.Const(o.softcap), xla::Div(xla::Neg(xla::Expm1(u)), one_plus_e));
  Capped c;
  c.value = xla::Select(xla::Lt(x, xla::ZerosLike(x)), xla::Neg(value), value);
  c.slope = xla::Div(xla::Mul(rows.Const(4), e), xla::Mul(one_plus_e, one_plus_e));
  return c;
}

// The logits in the accumulation type as the formulas read them: capped when a cap is set.
XlaOp ReadLogits(const Rows& rows, XlaOp logits, const Options& o) {
  const XlaOp x = rows.ToAcc(logits);
  return o.softcap > 0 ? Softcap(rows, x, o).value : x;
}

// A gradient for the capped logits carried back to the logits (times the cap's slope).
XlaOp ToLogitsGradient(const Rows& rows, XlaOp dz, XlaOp logits, const Options& o) {
  return o.softcap > 0 ? xla::Mul(dz, Softcap(rows, rows.ToAcc(logits), o).slope) : dz;
}

LogSumExp ComputeLogSumExp(const Rows& rows, XlaOp logits, const Options& o) {
  LogSumExp s;
  s.z = ReadLogits(rows, logits, o);
  const XlaOp max = rows.Max(s.z);
  s.shift = xla::Select(xla::Eq(max, xla::MinValue(rows.builder(), rows.acc())), xla::ZerosLike(max), max);
  // The max's own terms (exactly 1) are counted apart, so log1p keeps a small log_sum accurate.
  const XlaOp d = xla::Sub(s.z, rows.Expand(s.shift));
  const XlaOp tie = xla::Eq(d, xla::ZerosLike(d));
  const XlaOp ties =
      rows.Sum(xla::Select(tie, xla::Broadcast(rows.Const(1), rows.dims()), xla::ZerosLike(d)));
  const XlaOp rest = rows.Sum(xla::Select(tie, xla::ZerosLike(d), xla::Exp(d)));
  const XlaOp one = rows.Const(1);
  s.log_sum =
      xla::Select(xla::Ge(ties, one), xla::Log1p(xla::Add(xla::Sub(ties, one), rest)), xla::Log(rest));
  s.lse = xla::Add(xla::ConvertElementType(s.shift, xla::F64), xla::ConvertElementType(s.log_sum, xla::F64));
  return s;
}

// sum_j q_j (lse - z_j) from nonnegative parts:
// log_sum * sum(q) + (1 - eps) * label_gap + eps * mean_j (shift - z_j).
XlaOp CrossEntropy(const Rows& rows, const LogSumExp& s, XlaOp target_sum, XlaOp label_gap,
                   const Options& o) {
  const double eps = o.label_smoothing;
  XlaOp ce = xla::Mul(s.log_sum, target_sum);
  // Each gap is +inf when a logit it covers is -inf: read it only when it counts (no 0 * inf).
  if (eps < 1) ce = xla::Add(ce, xla::Mul(rows.Const(1.0 - eps), label_gap));
  if (eps > 0) {
    const XlaOp gap = rows.Sum(xla::Sub(rows.Expand(s.shift), s.z));
    ce = xla::Add(ce, xla::Mul(rows.Const(eps / static_cast<double>(rows.classes())), gap));
  }
  return ce;
}

// lambda * lse^2, computed in float64 like lse itself.
XlaOp ZLossTerm(const Rows& rows, XlaOp lse, const Options& o) {
  if (o.z_loss <= 0) return rows.Const(0);
  const XlaOp lambda = xla::ConstantR0<double>(rows.builder(), o.z_loss);
  return rows.ToAcc(xla::Mul(lambda, xla::Mul(lse, lse)));
}

// log p_j = (z_j - hi) - lo with hi + lo = lse: z_j - hi is exact near the
// max, so p keeps full precision when |lse| is large (float32 accumulation).
XlaOp LogSoftmax(const Rows& rows, XlaOp z, XlaOp lse) {
  const XlaOp hi = rows.ToAcc(lse);
  if (rows.acc() == xla::F64) return xla::Sub(z, rows.Expand(hi));
  XlaOp lo = rows.ToAcc(xla::Sub(lse, xla::ConvertElementType(hi, xla::F64)));
  lo = xla::Select(xla::Ne(lo, lo), xla::ZerosLike(lo), lo);  // inf - inf: no low part
  return xla::Sub(xla::Sub(z, rows.Expand(hi)), rows.Expand(lo));
}

// row_math's gradient_from: a p - target, or a expm1(log p) + (a - target) where p > 1/2.
XlaOp Gradient(const Rows& rows, XlaOp softmax_scale, XlaOp target, XlaOp log_p) {
  const XlaOp a = rows.Expand(softmax_scale);
  const XlaOp p = xla::Exp(log_p);
  const XlaOp dominant = xla::Gt(p, rows.Const(0.5));
  return xla::Select(dominant, xla::Add(xla::Mul(a, xla::Expm1(log_p)), xla::Sub(a, target)),
                     xla::Sub(xla::Mul(a, p), target));
}

// dz_j = softmax_scale * p_j - target_scale * t_j - uniform, per row.
struct Coefficients {
  XlaOp softmax_scale;  // g w (sum(q) + 2 lambda lse)
  XlaOp target_scale;   // g w (1 - eps)
  XlaOp uniform;        // g w eps / C
};

Coefficients BackwardCoefficients(const Rows& rows, XlaOp scale, XlaOp lse, XlaOp target_sum,
                                  const Options& o) {
  XlaOp factor = target_sum;
  if (o.z_loss > 0) {
    const XlaOp two_lambda = xla::ConstantR0<double>(rows.builder(), 2.0 * o.z_loss);
    factor = xla::Add(factor, rows.ToAcc(xla::Mul(two_lambda, lse)));
  }
  Coefficients c;
  c.softmax_scale = xla::Mul(scale, factor);
  const double eps = o.label_smoothing;
  c.target_scale = xla::Mul(scale, rows.Const(1.0 - eps));
  c.uniform = xla::Div(xla::Mul(scale, rows.Const(eps)), rows.Const(static_cast<double>(rows.classes())));
  return c;
}

// Sets every element of the rows where `row_pred` holds to `value`.
XlaOp FillRows(const Rows& rows, XlaOp x, XlaOp row_pred, XlaOp value) {
  return xla::Select(rows.Expand(row_pred), xla::Broadcast(value, rows.dims()), x);
}

// --- Sparse labels ---------------------------------------------------------

struct SparseLabels {
  XlaOp onehot;   // per element: its class is the row's label (for the backward)
  XlaOp ignored;  // per row: label == ignore_index
  XlaOp invalid;  // per row: outside [0, C) and not ignored
  XlaOp index;    // per row: the label as S64, clamped into [0, C) (bad rows are NaN later)
  XlaOp weight;   // per row: class weight of the label (or 1); 0 when ignored
};

// The class weight of each row's label, or 1 without class weights.
XlaOp LabelWeights(const Rows& rows, XlaOp index, XlaOp class_weights, bool has_weights,
                   const TensorShape& row_shape) {
  if (!has_weights) return xla::Broadcast(rows.Const(1), row_shape.dim_sizes());
  const XlaOp flat = xla::Reshape(index, {row_shape.num_elements()});
  const XlaOp picked = xla::TorchIndexSelect(class_weights, flat, 0);
  return rows.ToAcc(xla::Reshape(picked, row_shape.dim_sizes()));
}

SparseLabels ClassifyLabels(const Rows& rows, XlaOp labels, PrimitiveType label_type, XlaOp class_weights,
                            bool has_weights, const TensorShape& row_shape, const Options& o) {
  xla::XlaBuilder* b = rows.builder();
  const XlaOp labels64 = xla::ConvertElementType(labels, xla::S64);
  SparseLabels s;
  s.onehot = xla::Eq(rows.ClassIndex(label_type), rows.Expand(labels));
  s.ignored = o.has_ignore_index ? xla::Eq(labels64, xla::ConstantR0<int64_t>(b, o.ignore_index))
                                 : xla::Broadcast(xla::ConstantR0<bool>(b, false), row_shape.dim_sizes());
  const XlaOp out_of_range = xla::Or(xla::Lt(labels64, xla::ConstantR0<int64_t>(b, 0)),
                                     xla::Ge(labels64, xla::ConstantR0<int64_t>(b, rows.classes())));
  s.invalid = xla::And(out_of_range, xla::Not(s.ignored));
  s.index = xla::Max(labels64, xla::ConstantR0<int64_t>(b, 0));
  s.index = xla::Min(s.index, xla::ConstantR0<int64_t>(b, rows.classes() - 1));
  const XlaOp weight = LabelWeights(rows, s.index, class_weights, has_weights, row_shape);
  s.weight = xla::Select(s.ignored, xla::ZerosLike(weight), weight);
  return s;
}

// --- Validation (the CPU kernels' messages, checked on static shapes) -------

absl::Status CheckShape(const TensorShape& actual, const TensorShape& expected, const char* name,
                        const char* expected_name) {
  if (actual == expected) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(name, " must have the shape of ", expected_name, " ",
                                                 expected.DebugString(), ", got ", actual.DebugString()));
}

absl::Status CheckClassWeights(const TensorShape& weights, int64_t classes) {
  if (weights.dims() == 1 && (weights.num_elements() == 0 || weights.num_elements() == classes)) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat("class_weights must be a vector of ", classes,
                                                 " weights (one per class), got shape ",
                                                 weights.DebugString()));
}

// Shapes, the accumulation type and the row geometry shared by every kernel.
absl::Status Prepare(XlaOpKernelContext* ctx, int64_t axis, TensorShape* logits_shape, TensorShape* row_shape,
                     PrimitiveType* acc) {
  TF_ASSIGN_OR_RETURN(const xla::Shape shape, ctx->InputXlaShape(0));
  TF_RETURN_IF_ERROR(tensorflow::XLAShapeToTensorShape(shape, logits_shape));
  Layout layout;
  TF_RETURN_IF_ERROR(LayoutOf(*logits_shape, axis, &layout, row_shape));
  *acc = AccumulationType(shape.element_type());
  return absl::OkStatus();
}

TensorShape InputShape(XlaOpKernelContext* ctx, int index) {
  TensorShape shape;
  auto xla_shape = ctx->InputXlaShape(index);
  if (xla_shape.ok()) tensorflow::XLAShapeToTensorShape(*xla_shape, &shape).IgnoreError();
  return shape;
}

// --- The custom-call lowering ---------------------------------------------------

// Which lowering Compile emits. FUSED_XENT_XLA_LOWERING (read at each
// compilation): "auto" or unset, a custom call to this build's FFI handler for
// the device where there is one, else HLO; "hlo", always HLO; "custom_call",
// always the custom call (an error where the device has no handler).
absl::Status ChooseLowering(bool gpu, bool* custom_call) {
#if defined(FUSED_XENT_WITH_XLA_FFI) && defined(FUSED_XENT_WITH_CUDA)
  const bool has_handler = true;
#elif defined(FUSED_XENT_WITH_XLA_FFI)
  const bool has_handler = !gpu;
#else
  const bool has_handler = false;
#endif
  const char* env = std::getenv("FUSED_XENT_XLA_LOWERING");
  const std::string mode = env && *env ? env : "auto";
  if (mode == "hlo") {
    *custom_call = false;
  } else if (mode == "auto") {
    *custom_call = has_handler;
  } else if (mode == "custom_call") {
    if (!has_handler) {
      return absl::UnimplementedError(absl::StrCat(
          "FUSED_XENT_XLA_LOWERING=custom_call, but this build of fused_xent has no XLA FFI handler for ",
          gpu ? "GPUs (built without CUDA)" : "the CPU", "; unset it or set it to hlo"));
    }
    *custom_call = true;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("FUSED_XENT_XLA_LOWERING must be auto, custom_call or hlo, got '", mode, "'"));
  }
  return absl::OkStatus();
}

// An f32 attribute written as its bit pattern, so it reaches the handler exactly.
std::string F32Attribute(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return absl::StrFormat("0x%08X : f32", bits);
}

// The handlers' attributes (cc/ffi/handlers.h), in MLIR dictionary syntax.
std::string HandlerAttributes(int64_t axis, const Options& o, bool sparse) {
  std::string text =
      absl::StrCat("{axis = ", axis, " : i64, label_smoothing = ", F32Attribute(o.label_smoothing),
                   ", z_loss = ", F32Attribute(o.z_loss), ", softcap = ", F32Attribute(o.softcap));
  if (sparse) {
    absl::StrAppend(&text, ", ignore_index = ", o.ignore_index,
                    " : i64, has_ignore_index = ", o.has_ignore_index ? "true" : "false");
  }
  return text + "}";
}

xla::Shape RowMajor(PrimitiveType type, absl::Span<const int64_t> dims) {
  return xla::ShapeUtil::MakeShapeWithDescendingLayout(type, dims);
}

// The handlers' last result, scratch memory for the CUDA kernels (cc/ffi/handlers.h):
// u8[cuda::workspace_bytes(...)], the same size whichever device runs the call.
xla::Shape WorkspaceShape(const char* target, const TensorShape& logits_shape, int64_t axis,
                          PrimitiveType type) {
  Layout layout;
  TensorShape rows;
  LayoutOf(logits_shape, axis, &layout, &rows).IgnoreError();  // Prepare checked it
  cuda::Kernel kernel = cuda::Kernel::kSparseForward;
  if (std::strcmp(target, ffi_targets::kSparseBackward) == 0) kernel = cuda::Kernel::kSparseBackward;
  if (std::strcmp(target, ffi_targets::kDenseForward) == 0) kernel = cuda::Kernel::kDenseForward;
  if (std::strcmp(target, ffi_targets::kDenseBackward) == 0) kernel = cuda::Kernel::kDenseBackward;
  const size_t bytes = cuda::workspace_bytes(kernel, layout, xla::ShapeUtil::ByteSizeOfPrimitiveType(type));
  return RowMajor(xla::U8, {static_cast<int64_t>(bytes)});
}

// A typed-FFI custom call on the op's inputs, every buffer row-major (the
// handlers' layout); a backward op's last input, the legacy grad_lse (checked
// empty), is not passed. Forward ops return (loss, lse), backward ops
// grad_logits; the call's last result, the workspace, is dropped.
void EmitCustomCall(XlaOpKernelContext* ctx, const char* target, const std::string& attributes,
                    const TensorShape& logits_shape, const TensorShape& row_shape, int64_t axis,
                    bool forward) {
  std::vector<XlaOp> operands;
  std::vector<xla::Shape> operand_shapes;
  const int count = forward ? ctx->num_inputs() : ctx->num_inputs() - 1;
  for (int i = 0; i < count; ++i) {
    auto shape = ctx->InputXlaShape(i);
    OP_REQUIRES_OK(ctx, shape.status());
    operands.push_back(ctx->Input(i));
    operand_shapes.push_back(RowMajor(shape->element_type(), shape->dimensions()));
  }
  const PrimitiveType type = ctx->input_xla_type(0);
  const xla::Shape workspace = WorkspaceShape(target, logits_shape, axis, type);
  const xla::Shape result =
      forward ? xla::ShapeUtil::MakeTupleShape({RowMajor(type, row_shape.dim_sizes()),
                                                RowMajor(xla::F64, row_shape.dim_sizes()), workspace})
              : xla::ShapeUtil::MakeTupleShape({RowMajor(type, logits_shape.dim_sizes()), workspace});
  const XlaOp call =
      xla::CustomCallWithLayout(ctx->builder(), target, operands, result, operand_shapes, attributes,
                                /*has_side_effect=*/false, /*output_operand_aliasing=*/{},
                                /*literal=*/nullptr, xla::CustomCallSchedule::SCHEDULE_NONE,
                                xla::CustomCallApiVersion::API_VERSION_TYPED_FFI);
  ctx->SetOutput(0, xla::GetTupleElement(call, 0));
  if (forward) ctx->SetOutput(1, xla::GetTupleElement(call, 1));
}

// --- Kernels ------------------------------------------------------------------

// Every op: attrs read once; Compile checks the static shapes (with the CPU
// kernels' messages), then emits the custom call or the HLO lowering.
class XlaKernelBase : public XlaOpKernel {
 public:
  XlaKernelBase(OpKernelConstruction* ctx, bool sparse, bool forward, const char* target)
      : XlaOpKernel(ctx), sparse_(sparse), forward_(forward), target_(target) {
    OP_REQUIRES_OK(ctx, ReadOptions(ctx, sparse, &options_, &axis_));
    gpu_ = ctx->device_type() == tensorflow::DeviceType(tensorflow::DEVICE_GPU_XLA_JIT);
  }

  void Compile(XlaOpKernelContext* ctx) final {
    bool custom_call = false;
    OP_REQUIRES_OK(ctx, ChooseLowering(gpu_, &custom_call));
    TensorShape logits_shape, row_shape;
    PrimitiveType acc;
    OP_REQUIRES_OK(ctx, Prepare(ctx, axis_, &logits_shape, &row_shape, &acc));
    OP_REQUIRES_OK(ctx, CheckInputs(ctx, logits_shape, row_shape));
    if (custom_call) {
      EmitCustomCall(ctx, target_, HandlerAttributes(axis_, options_, sparse_), logits_shape, row_shape,
                     axis_, forward_);
    } else {
      CompileHlo(ctx, Rows(ctx->builder(), logits_shape, axis_, acc), row_shape);
    }
  }

 protected:
  virtual absl::Status CheckInputs(XlaOpKernelContext* ctx, const TensorShape& logits_shape,
                                   const TensorShape& row_shape) = 0;
  virtual void CompileHlo(XlaOpKernelContext* ctx, const Rows& rows, const TensorShape& row_shape) = 0;

  Options options_;
  int64_t axis_ = -1;

 private:
  bool sparse_;
  bool forward_;
  const char* target_;
  bool gpu_ = false;
};

// Backward ops' per-row inputs from `first` on: lse, grad_loss and the legacy grad_lse,
// which must be empty (tf/kernel_support.h).
absl::Status CheckBackwardRows(XlaOpKernelContext* ctx, int first, const TensorShape& row_shape) {
  TF_RETURN_IF_ERROR(CheckShape(InputShape(ctx, first), row_shape, "lse", "logits without the class axis"));
  TF_RETURN_IF_ERROR(
      CheckShape(InputShape(ctx, first + 1), row_shape, "grad_loss", "logits without the class axis"));
  return CheckGradLseEmpty(InputShape(ctx, first + 2).num_elements());
}

// The sparse ops: labels (input 1) and class weights (input 2) checked, and
// classified per row for the HLO lowering.
class SparseXlaKernel : public XlaKernelBase {
 public:
  SparseXlaKernel(OpKernelConstruction* ctx, bool forward, const char* target)
      : XlaKernelBase(ctx, /*sparse=*/true, forward, target) {}

 protected:
  absl::Status CheckInputs(XlaOpKernelContext* ctx, const TensorShape& logits_shape,
                           const TensorShape& row_shape) override {
    TF_RETURN_IF_ERROR(CheckShape(InputShape(ctx, 1), row_shape, "labels", "logits without the class axis"));
    return CheckClassWeights(InputShape(ctx, 2),
                             logits_shape.dim_size(axis_ < 0 ? axis_ + logits_shape.dims() : axis_));
  }

  void CompileHlo(XlaOpKernelContext* ctx, const Rows& rows, const TensorShape& row_shape) override {
    const SparseLabels labels = ClassifyLabels(rows, ctx->Input(1), ctx->input_xla_type(1), ctx->Input(2),
                                               InputShape(ctx, 2).num_elements() != 0, row_shape, options_);
    CompileSparse(ctx, rows, row_shape, labels);
  }

  virtual void CompileSparse(XlaOpKernelContext* ctx, const Rows& rows, const TensorShape& row_shape,
                             const SparseLabels& labels) = 0;
};

// Inputs: logits, labels, class_weights. Outputs: loss, lse.
class SparseForwardXla : public SparseXlaKernel {
 public:
  explicit SparseForwardXla(OpKernelConstruction* ctx)
      : SparseXlaKernel(ctx, /*forward=*/true, ffi_targets::kSparseForward) {}

 protected:
  void CompileSparse(XlaOpKernelContext* ctx, const Rows& rows, const TensorShape& row_shape,
                     const SparseLabels& labels) override {
    const PrimitiveType acc = rows.acc();
    const LogSumExp s = ComputeLogSumExp(rows, ctx->Input(0), options_);
    const XlaOp z_label = rows.AtClass(s.z, labels.index);
    const XlaOp ce = CrossEntropy(rows, s, rows.Const(1), xla::Sub(s.shift, z_label), options_);
    XlaOp loss = xla::Mul(labels.weight, xla::Add(ce, ZLossTerm(rows, s.lse, options_)));
    loss = xla::Select(labels.ignored, xla::ZerosLike(loss), loss);
    loss = xla::Select(labels.invalid,
                       xla::Broadcast(xla::NanValue(ctx->builder(), acc), row_shape.dim_sizes()), loss);
    ctx->SetOutput(0, xla::ConvertElementType(loss, ctx->input_xla_type(0)));
    ctx->SetOutput(1, s.lse);
  }
};

// Inputs: logits, labels, class_weights, lse, grad_loss, grad_lse (empty). Output: grad_logits.
class SparseBackwardXla : public SparseXlaKernel {
 public:
  explicit SparseBackwardXla(OpKernelConstruction* ctx)
      : SparseXlaKernel(ctx, /*forward=*/false, ffi_targets::kSparseBackward) {}

 protected:
  absl::Status CheckInputs(XlaOpKernelContext* ctx, const TensorShape& logits_shape,
                           const TensorShape& row_shape) override {
    TF_RETURN_IF_ERROR(SparseXlaKernel::CheckInputs(ctx, logits_shape, row_shape));
    return CheckBackwardRows(ctx, 3, row_shape);
  }

  void CompileSparse(XlaOpKernelContext* ctx, const Rows& rows, const TensorShape& row_shape,
                     const SparseLabels& labels) override {
    const PrimitiveType acc = rows.acc();
    const XlaOp lse = ctx->Input(3);
    XlaOp scale = xla::Mul(rows.ToAcc(ctx->Input(4)), labels.weight);
    scale = xla::Select(labels.ignored, xla::ZerosLike(scale), scale);  // as the CPU: grad and weight 0
    const Coefficients c = BackwardCoefficients(rows, scale, lse, rows.Const(1), options_);
    const XlaOp uniform = rows.Expand(c.uniform);
    const XlaOp target = xla::Select(labels.onehot, xla::Add(uniform, rows.Expand(c.target_scale)), uniform);
    XlaOp dz = Gradient(rows, c.softmax_scale, target,
                        LogSoftmax(rows, ReadLogits(rows, ctx->Input(0), options_), lse));
    dz = ToLogitsGradient(rows, dz, ctx->Input(0), options_);
    dz = FillRows(rows, dz, labels.ignored, rows.Const(0));  // exactly 0, whatever the logits
    dz = FillRows(rows, dz, labels.invalid, xla::NanValue(ctx->builder(), acc));
    ctx->SetOutput(0, xla::ConvertElementType(dz, ctx->input_xla_type(0)));
  }
};

// Per row of dense labels t: sum(t) and sum_j t_j (shift - z_j) over t_j != 0,
// so a 0 label against a -inf logit adds 0, not NaN.
struct DenseLabelSums {
  XlaOp t;
  XlaOp label_sum;
  XlaOp label_gap;
};

DenseLabelSums SumDenseLabels(const Rows& rows, XlaOp labels, const LogSumExp* s) {
  DenseLabelSums d;
  d.t = rows.ToAcc(labels);
  d.label_sum = rows.Sum(d.t);
  if (s) {
    const XlaOp gap = xla::Mul(d.t, xla::Sub(rows.Expand(s->shift), s->z));
    d.label_gap = rows.Sum(xla::Select(xla::Ne(d.t, xla::ZerosLike(d.t)), gap, xla::ZerosLike(gap)));
  }
  return d;
}

// (1 - eps) sum(t) + eps
XlaOp DenseTargetSum(const Rows& rows, XlaOp label_sum, const Options& o) {
  const double eps = o.label_smoothing;
  return xla::Add(xla::Mul(rows.Const(1.0 - eps), label_sum), rows.Const(eps));
}

// The dense ops: labels (input 1) have the logits' shape.
class DenseXlaKernel : public XlaKernelBase {
 public:
  DenseXlaKernel(OpKernelConstruction* ctx, bool forward, const char* target)
      : XlaKernelBase(ctx, /*sparse=*/false, forward, target) {}

 protected:
  absl::Status CheckInputs(XlaOpKernelContext* ctx, const TensorShape& logits_shape,
                           const TensorShape&) override {
    return CheckShape(InputShape(ctx, 1), logits_shape, "labels", "logits");
  }
};

// Inputs: logits, labels. Outputs: loss, lse.
class DenseForwardXla : public DenseXlaKernel {
 public:
  explicit DenseForwardXla(OpKernelConstruction* ctx)
      : DenseXlaKernel(ctx, /*forward=*/true, ffi_targets::kDenseForward) {}

 protected:
  void CompileHlo(XlaOpKernelContext* ctx, const Rows& rows, const TensorShape&) override {
    const LogSumExp s = ComputeLogSumExp(rows, ctx->Input(0), options_);
    const DenseLabelSums d = SumDenseLabels(rows, ctx->Input(1), &s);
    const XlaOp target_sum = DenseTargetSum(rows, d.label_sum, options_);
    const XlaOp ce = CrossEntropy(rows, s, target_sum, d.label_gap, options_);
    const XlaOp loss = xla::Add(ce, ZLossTerm(rows, s.lse, options_));
    ctx->SetOutput(0, xla::ConvertElementType(loss, ctx->input_xla_type(0)));
    ctx->SetOutput(1, s.lse);
  }
};

// Inputs: logits, labels, lse, grad_loss, grad_lse (empty). Output: grad_logits.
class DenseBackwardXla : public DenseXlaKernel {
 public:
  explicit DenseBackwardXla(OpKernelConstruction* ctx)
      : DenseXlaKernel(ctx, /*forward=*/false, ffi_targets::kDenseBackward) {}

 protected:
  absl::Status CheckInputs(XlaOpKernelContext* ctx, const TensorShape& logits_shape,
                           const TensorShape& row_shape) override {
    TF_RETURN_IF_ERROR(DenseXlaKernel::CheckInputs(ctx, logits_shape, row_shape));
    return CheckBackwardRows(ctx, 2, row_shape);
  }

  void CompileHlo(XlaOpKernelContext* ctx, const Rows& rows, const TensorShape&) override {
    const DenseLabelSums d = SumDenseLabels(rows, ctx->Input(1), nullptr);
    const XlaOp lse = ctx->Input(2);
    const Coefficients c = BackwardCoefficients(rows, rows.ToAcc(ctx->Input(3)), lse,
                                                DenseTargetSum(rows, d.label_sum, options_), options_);
    const XlaOp target = xla::Add(xla::Mul(rows.Expand(c.target_scale), d.t), rows.Expand(c.uniform));
    const XlaOp dz = Gradient(rows, c.softmax_scale, target,
                              LogSoftmax(rows, ReadLogits(rows, ctx->Input(0), options_), lse));
    ctx->SetOutput(0, xla::ConvertElementType(ToLogitsGradient(rows, dz, ctx->Input(0), options_),
                                              ctx->input_xla_type(0)));
  }
};

#define FX_XLA_TYPES \
  .TypeConstraint(   \
      "T", {tensorflow::DT_HALF, tensorflow::DT_BFLOAT16, tensorflow::DT_FLOAT, tensorflow::DT_DOUBLE})
#define FX_XLA_LABELS .TypeConstraint("Tlabels", {tensorflow::DT_INT32, tensorflow::DT_INT64})

#define FX_REGISTER_XLA(device)                                                                  \
  REGISTER_KERNEL_BUILDER(                                                                       \
      Name("FusedXent>SparseSoftmaxCrossEntropy").Device(device) FX_XLA_TYPES FX_XLA_LABELS,     \
      SparseForwardXla);                                                                         \
  REGISTER_KERNEL_BUILDER(                                                                       \
      Name("FusedXent>SparseSoftmaxCrossEntropyGrad").Device(device) FX_XLA_TYPES FX_XLA_LABELS, \
      SparseBackwardXla);                                                                        \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SoftmaxCrossEntropy").Device(device) FX_XLA_TYPES,     \
                          DenseForwardXla);                                                      \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SoftmaxCrossEntropyGrad").Device(device) FX_XLA_TYPES, \
                          DenseBackwardXla);

FX_REGISTER_XLA(tensorflow::DEVICE_CPU_XLA_JIT)
FX_REGISTER_XLA(tensorflow::DEVICE_GPU_XLA_JIT)

}  // namespace
}  // namespace fused_xent

#else  // !FUSED_XENT_WITH_XLA

#include <string>

#include "tensorflow/core/framework/op_kernel.h"

namespace fused_xent {
namespace {

// Stands in for the lowering so that XLA fails with a message naming the
// cause, instead of TensorFlow's "No registered OpKernel for XLA_CPU_JIT".
// The XLA compilation device runs it while building the program.
class NoXlaKernel : public tensorflow::OpKernel {
 public:
  explicit NoXlaKernel(tensorflow::OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(tensorflow::OpKernelContext* ctx) override {
    ctx->CtxFailure(absl::UnimplementedError(absl::StrCat(
        "fused_xent was built without XLA support (CMake option FUSED_XENT_XLA=OFF), so ", type_string(),
        " cannot be compiled by XLA (tf.function(jit_compile=True), Keras jit_compile). Run it without "
        "jit_compile, or rebuild fused_xent with -DFUSED_XENT_XLA=ON; see docs/xla.md.")));
  }
};

// The XLA JIT device names (tensorflow::DEVICE_*_XLA_JIT, whose header needs XLA's).
#define FX_REGISTER_NO_XLA(device)                                                                      \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SparseSoftmaxCrossEntropy").Device(device), NoXlaKernel);     \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SparseSoftmaxCrossEntropyGrad").Device(device), NoXlaKernel); \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SoftmaxCrossEntropy").Device(device), NoXlaKernel);           \
  REGISTER_KERNEL_BUILDER(Name("FusedXent>SoftmaxCrossEntropyGrad").Device(device), NoXlaKernel);

FX_REGISTER_NO_XLA("XLA_CPU_JIT")
FX_REGISTER_NO_XLA("XLA_GPU_JIT")

}  // namespace
}  // namespace fused_xent

#endif  // FUSED_XENT_WITH_XLA
