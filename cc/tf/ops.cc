// Op interfaces (kept apart from the kernels, as in tensorflow/custom-op).
// Shape functions are strict: they reject at graph-construction time every
// mismatch that the static shapes already reveal.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace fused_xent {
namespace {

using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Resolves the `axis` attr against `logits` and returns logits' shape without it.
absl::Status ReducedShape(InferenceContext* c, ShapeHandle logits, ShapeHandle* reduced,
                          DimensionHandle* classes) {
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(logits, 1, &logits));
  int64_t axis;
  TF_RETURN_IF_ERROR(c->GetAttr("axis", &axis));
  if (!c->RankKnown(logits)) {
    *reduced = c->UnknownShape();
    *classes = c->UnknownDim();
    return absl::OkStatus();
  }
  const int64_t rank = c->Rank(logits);
  if (axis < -rank || axis >= rank) {
    return absl::InvalidArgumentError(
        absl::StrCat("axis ", axis, " is out of range for logits of rank ", rank));
  }
  if (axis < 0) axis += rank;
  *classes = c->Dim(logits, axis);
  if (c->ValueKnown(*classes) && c->Value(*classes) == 0) {
    return absl::InvalidArgumentError(
        "Must have at least one class, but the class axis of logits has size 0");
  }
  ShapeHandle before, after;
  TF_RETURN_IF_ERROR(c->Subshape(logits, 0, axis, &before));
  TF_RETURN_IF_ERROR(c->Subshape(logits, axis + 1, &after));
  return c->Concatenate(before, after, reduced);
}

absl::Status CheckClassWeights(InferenceContext* c, int index, DimensionHandle classes) {
  ShapeHandle weights;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(index), 1, &weights));
  const DimensionHandle count = c->Dim(weights, 0);
  if (c->ValueKnown(count) && c->Value(count) != 0 && c->ValueKnown(classes) &&
      c->Value(count) != c->Value(classes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "class_weights has ", c->Value(count), " entries but logits have ", c->Value(classes), " classes"));
  }
  return absl::OkStatus();
}

absl::Status SparseForwardShape(InferenceContext* c) {
  ShapeHandle reduced, labels;
  DimensionHandle classes;
  TF_RETURN_IF_ERROR(ReducedShape(c, c->input(0), &reduced, &classes));
  TF_RETURN_IF_ERROR(c->Merge(reduced, c->input(1), &labels));
  TF_RETURN_IF_ERROR(CheckClassWeights(c, 2, classes));
  c->set_output(0, labels);
  c->set_output(1, labels);
  return absl::OkStatus();
}

absl::Status DenseForwardShape(InferenceContext* c) {
  ShapeHandle logits, reduced;
  DimensionHandle classes;
  TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &logits));
  TF_RETURN_IF_ERROR(ReducedShape(c, logits, &reduced, &classes));
  c->set_output(0, reduced);
  c->set_output(1, reduced);
  return absl::OkStatus();
}

// Backward ops: inputs are logits, labels, [class_weights,] lse, grad_loss, grad_lse.
// grad_lse is kept for graphs saved by earlier versions; must be empty. It is
// checked by the kernels, not here: an old SavedModel must still load (and serve
// its forward); only running such a second-order gradient fails, asking for a
// re-export. Earlier versions added grad_lse * softmax(logits) to the gradient.
absl::Status BackwardShape(InferenceContext* c, bool sparse) {
  ShapeHandle logits = c->input(0), reduced, per_row;
  DimensionHandle classes;
  if (!sparse) TF_RETURN_IF_ERROR(c->Merge(logits, c->input(1), &logits));
  TF_RETURN_IF_ERROR(ReducedShape(c, logits, &reduced, &classes));
  const int first_row_input = sparse ? 3 : 2;
  if (sparse) {
    TF_RETURN_IF_ERROR(c->Merge(reduced, c->input(1), &reduced));
    TF_RETURN_IF_ERROR(CheckClassWeights(c, 2, classes));
  }
  TF_RETURN_IF_ERROR(c->Merge(reduced, c->input(first_row_input), &per_row));
  TF_RETURN_IF_ERROR(c->Merge(per_row, c->input(first_row_input + 1), &per_row));
  c->set_output(0, logits);
  return absl::OkStatus();
}

}  // namespace

#define FX_COMMON_ATTRS                      \
  Attr("T: {half, bfloat16, float, double}") \
      .Attr("axis: int = -1")                \
      .Attr("label_smoothing: float = 0.0")  \
      .Attr("z_loss: float = 0.0")           \
      .Attr("softcap: float = 0.0")

#define FX_SPARSE_ATTRS                                      \
  FX_COMMON_ATTRS.Attr("Tlabels: {int32, int64} = DT_INT64") \
      .Attr("ignore_index: int = 0")                         \
      .Attr("has_ignore_index: bool = false")

REGISTER_OP("FusedXent>SparseSoftmaxCrossEntropy")
    .Input("logits: T")
    .Input("labels: Tlabels")
    .Input("class_weights: float")
    .Output("loss: T")
    .Output("lse: double")
    .FX_SPARSE_ATTRS.SetShapeFn(SparseForwardShape)
    .Doc("Per-row sparse softmax cross-entropy and log-sum-exp of the logits.");

REGISTER_OP("FusedXent>SparseSoftmaxCrossEntropyGrad")
    .Input("logits: T")
    .Input("labels: Tlabels")
    .Input("class_weights: float")
    .Input("lse: double")
    .Input("grad_loss: T")
    .Input("grad_lse: double")  // kept for graphs saved by earlier versions; must be empty
    .Output("grad_logits: T")
    .FX_SPARSE_ATTRS.SetShapeFn([](InferenceContext* c) { return BackwardShape(c, /*sparse=*/true); })
    .Doc(
        "grad_logits = grad_loss * w * ((1 + 2 z_loss lse) softmax(logits) - target). grad_lse is kept for "
        "graphs "
        "saved by earlier versions; must be empty.");

REGISTER_OP("FusedXent>SoftmaxCrossEntropy")
    .Input("logits: T")
    .Input("labels: T")
    .Output("loss: T")
    .Output("lse: double")
    .FX_COMMON_ATTRS.SetShapeFn(DenseForwardShape)
    .Doc("Per-row softmax cross-entropy against dense labels, and log-sum-exp of the logits.");

REGISTER_OP("FusedXent>SoftmaxCrossEntropyGrad")
    .Input("logits: T")
    .Input("labels: T")
    .Input("lse: double")
    .Input("grad_loss: T")
    .Input("grad_lse: double")  // kept for graphs saved by earlier versions; must be empty
    .Output("grad_logits: T")
    .FX_COMMON_ATTRS.SetShapeFn([](InferenceContext* c) { return BackwardShape(c, /*sparse=*/false); })
    .Doc(
        "grad_logits = grad_loss * ((sum(q) + 2 z_loss lse) softmax(logits) - q). grad_lse is kept for "
        "graphs "
        "saved by earlier versions; must be empty.");

REGISTER_OP("FusedXent>AddToRows")
    .Input("x: T")
    .Input("start: int32")
    .Input("values: T")
    .Output("y: T")
    .Attr("T: {half, bfloat16, float, double}")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle values;
      TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(2), 1, &values));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &values));
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    })
    .Doc(
        "y = x with rows [start, start + len(values)) increased by values, written into x's buffer: "
        "only for a tensor that nothing else reads (the fused linear head's own accumulators).");

}  // namespace fused_xent
