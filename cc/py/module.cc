// pybind11 module over the TF-free core: NumPy buffers in, NumPy buffers out.
// Python (fused_xent/numpy.py) checks arguments and allocates the outputs; this
// file re-checks every size it relies on, so a bad call raises instead of
// reading or writing outside a buffer.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "core/class_weights_check.h"
#include "core/cpu_kernels.h"
#include "core/label_check.h"
#include "core/simd_level.h"
#include "cuda/workspace.h"
#include "py/worker_pool.h"
#if defined(FUSED_XENT_WITH_XLA_FFI)
#include "ffi/handlers.h"
#endif

namespace py = pybind11;
namespace fx = fused_xent;

#ifdef FUSED_XENT_WITH_CUDA
// cc/py/cuda_bindings.cc: the same kernels on CUDA arrays.
void register_cuda_bindings(py::module_& m);
#endif

namespace {

// Runs fn(begin, end) over the layout's rows on up to hardware_concurrency
// threads (the module's worker pool, or threads of its own while another call
// holds the pool), in shards of whole cpu::row_units: each row belongs to
// exactly one call and short rows keep their groups, so the split does not
// change the results.
template <typename Fn> void parallel_rows(const fx::Layout& layout, const Fn& fn) {
  const fx::cpu::RowUnits units = fx::cpu::row_units(layout);
  const int64_t work = layout.rows() * std::max<int64_t>(layout.classes, 1);
  const int64_t max_threads = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads =
      std::min<int64_t>({max_threads, units.count(), std::max<int64_t>(1, work / (1 << 16))});
  if (threads <= 1) {
    fn(0, layout.rows());
    return;
  }
  const int64_t chunk = (units.count() + threads - 1) / threads;
  const int64_t shards = (units.count() + chunk - 1) / chunk;
  const std::function<void(int64_t)> shard = [&](int64_t i) {
    fn(units.row(i * chunk), units.row((i + 1) * chunk));
  };
  if (fx::py_support::worker_pool(static_cast<int>(max_threads - 1))->try_run(shards, shard)) return;
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < shards; ++i) pool.emplace_back([&shard, i] { shard(i); });
  shard(0);
  for (auto& t : pool) t.join();
}

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

// Checks a buffer's element type (NumPy kind among `kinds`, and item size), element count,
// C-contiguity and, for outputs, writability.
void require_buffer(const py::array& a, int64_t count, int64_t itemsize, const char* kinds, const char* what,
                    bool writable = false) {
  require(a.flags() & py::array::c_style, std::string(what) + " must be C-contiguous");
  require(a.itemsize() == itemsize && std::string(kinds).find(a.dtype().kind()) != std::string::npos,
          std::string(what) + " has the wrong element type");
  require(a.size() == count, std::string(what) + " has " + std::to_string(a.size()) + " elements, expected " +
                                 std::to_string(count));
  require(!writable || a.writeable(), std::string(what) + " must be writable");
}

// The float64 row logsumexp: written by a forward, read by a backward.
void require_lse(const py::array& a, int64_t rows, const char* what, bool writable = false) {
  require_buffer(a, rows, sizeof(double), "f", what, writable);
}

// a * b for a, b >= 0, or -1 when it does not fit in int64.
int64_t checked_product(int64_t a, int64_t b) {
  return (a != 0 && b > std::numeric_limits<int64_t>::max() / a) ? -1 : a * b;
}

// inner may be 0 (an empty axis after the class axis): then there are no rows.
// The element count must fit in int64, or the buffer size checks would wrap.
fx::Layout make_layout(int64_t outer, int64_t classes, int64_t inner) {
  require(outer >= 0 && inner >= 0 && classes >= 1 &&
              checked_product(checked_product(outer, inner), classes) >= 0,
          "invalid layout: need outer >= 0, classes >= 1, inner >= 0 and outer * classes * inner to fit in "
          "int64");
  fx::Layout layout;
  layout.outer = outer;
  layout.classes = classes;
  layout.inner = inner;
  return layout;
}

using ClassWeights = std::optional<py::array_t<float, py::array::c_style>>;

fx::Options make_options(double label_smoothing, double z_loss, std::optional<int64_t> ignore_index,
                         const ClassWeights& class_weights, int64_t classes, double softcap) {
  require(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing must lie in [0, 1]");
  require(std::isfinite(softcap) && softcap >= 0.0, "softcap must be finite and >= 0 (0: no cap)");
  fx::Options options;
  options.softcap = static_cast<float>(softcap);
  options.label_smoothing = static_cast<float>(label_smoothing);
  options.z_loss = static_cast<float>(z_loss);
  options.has_ignore_index = ignore_index.has_value();
  options.ignore_index = ignore_index.value_or(0);
  if (class_weights) {
    require(class_weights->ndim() == 1 && class_weights->size() == classes,
            "class_weights must be a vector with one weight per class");
    const int64_t bad = fx::find_bad_class_weight(class_weights->data(), classes);
    if (bad >= 0) throw py::value_error(fx::bad_class_weight_message(class_weights->data(), bad));
    options.class_weights = class_weights->data();
  }
  return options;
}

// Calls fn(tag, kinds) with a value of the core type named by `dtype` and the NumPy kinds its
// buffers may have: bfloat16 comes as ml_dtypes.bfloat16 (kind 'V') or as its 16-bit pattern
// (PyTorch's CPU tensors, viewed as int16).
template <typename Fn> void dispatch_float(const std::string& dtype, const Fn& fn) {
  if (dtype == "float32") return fn(float{}, "f");
  if (dtype == "float64") return fn(double{}, "f");
  if (dtype == "float16") return fn(fx::float16_t{}, "f");
  if (dtype == "bfloat16") return fn(fx::bfloat16_t{}, "iuV");
  throw py::type_error("logits must be float16, bfloat16, float32 or float64, got " + dtype);
}

// What every call of a kind shares: its layout and options, checked.
struct Call {
  fx::Layout layout;
  fx::Options options;
  int64_t rows() const { return layout.rows(); }
  int64_t elements() const { return layout.rows() * layout.classes; }
};

// A vocabulary-parallel shard (total_classes > 0): `classes` of each row's total_classes, labels
// local or absent_label (core/xent_params.h); class weights are the caller's, applied per row.
struct ShardOptions {
  int64_t total_classes = 0;
  int64_t absent_label = 0;
};

Call sparse_call(const py::array& labels, int64_t outer, int64_t classes, int64_t inner,
                 double label_smoothing, double z_loss, std::optional<int64_t> ignore_index,
                 const ClassWeights& class_weights, double softcap, const ShardOptions& shard = {}) {
  Call call{make_layout(outer, classes, inner),
            make_options(label_smoothing, z_loss, ignore_index, class_weights, classes, softcap)};
  require(labels.dtype().kind() == 'i' && (labels.itemsize() == 4 || labels.itemsize() == 8),
          "labels must be int32 or int64");
  if (shard.total_classes > 0) {
    require(shard.total_classes >= classes, "total_classes must be at least the shard's classes");
    require(!class_weights, "a vocabulary-parallel call takes no class_weights: apply them per row");
    require(shard.absent_label < 0 || shard.absent_label >= classes,
            "absent_label must not be a class of the shard");
    call.options.total_classes = shard.total_classes;
    call.options.absent_label = shard.absent_label;
  }
  return call;
}

// total_classes > 0: a vocabulary-parallel shard holding `classes` of each row's total_classes.
Call dense_call(int64_t outer, int64_t classes, int64_t inner, double label_smoothing, double z_loss,
                double softcap, int64_t total_classes = 0) {
  Call call{make_layout(outer, classes, inner),
            make_options(label_smoothing, z_loss, std::nullopt, std::nullopt, classes, softcap)};
  if (total_classes > 0) {
    require(total_classes >= classes, "total_classes must be at least the shard's classes");
    call.options.total_classes = total_classes;
  }
  return call;
}

// A shard's per-row label sums (float64): written by its forward, the whole rows' read by its backward.
const double* shard_label_sums(const Call& call, const std::optional<py::array>& sums, bool writable) {
  if (!sums) {
    require(call.options.total_classes == 0 || writable,
            "a vocabulary-parallel dense backward needs label_sums: the whole rows' sums of the labels");
    return nullptr;
  }
  require(call.options.total_classes > 0, "label_sums is for a vocabulary-parallel call (total_classes > 0)");
  require_lse(*sums, call.rows(), "label_sums", writable);
  return static_cast<const double*>(sums->data());
}

// Calls fn(tag, label_tag, kinds) for the logits' and the (int32 or int64) labels' types.
template <typename Fn> void dispatch_sparse(const std::string& dtype, const py::array& labels, const Fn& fn) {
  dispatch_float(dtype, [&](auto tag, const char* kinds) {
    if (labels.itemsize() == 8)
      fn(tag, int64_t{}, kinds);
    else
      fn(tag, int32_t{}, kinds);
  });
}

// The inputs of a sparse forward and backward: logits, and labels in [0, classes) or ignore_index
// (checked here: the kernels index rows and class weights with them).
template <typename T, typename Label> void check_sparse_inputs(const Call& call, const py::array& logits,
                                                               const py::array& labels, const char* kinds) {
  require_buffer(logits, call.elements(), sizeof(T), kinds, "logits");
  require_buffer(labels, call.rows(), sizeof(Label), "i", "labels");
  const Label* data = static_cast<const Label*>(labels.data());
  const int64_t bad = fx::cpu::find_invalid_label(data, call.rows(), call.layout.classes, call.options);
  if (bad >= 0) {
    throw py::value_error(
        fx::invalid_label_message(static_cast<int64_t>(data[bad]), call.layout.classes, call.options));
  }
}

template <typename T> void check_dense_inputs(const Call& call, const py::array& logits,
                                              const py::array& labels, const char* kinds) {
  require_buffer(logits, call.elements(), sizeof(T), kinds, "logits");
  require_buffer(labels, call.elements(), sizeof(T), kinds, "labels");
}

template <typename T>
void check_forward_outputs(const Call& call, const py::array& loss, const py::array& lse, const char* kinds) {
  require_buffer(loss, call.rows(), sizeof(T), kinds, "loss", true);
  require_lse(lse, call.rows(), "lse", true);
}

template <typename T> void check_backward_buffers(const Call& call, const py::array& lse,
                                                  const py::array& grad_loss, const py::array& grad_logits,
                                                  const char* kinds) {
  require_lse(lse, call.rows(), "lse");
  require_buffer(grad_loss, call.rows(), sizeof(T), kinds, "grad_loss");
  require_buffer(grad_logits, call.elements(), sizeof(T), kinds, "grad_logits", true);
}

// The kernels, on checked buffers, without the GIL.
template <typename Args, typename Kernel> void run_rows(const Args& args, const Kernel& kernel) {
  if (args.layout.rows() == 0) return;
  py::gil_scoped_release release;
  parallel_rows(args.layout, [&](int64_t b, int64_t e) { kernel(args, b, e); });
}

template <typename T, typename Label> void run_sparse_forward(const Call& call, const py::array& logits,
                                                              const py::array& labels, py::array& loss,
                                                              py::array& lse) {
  fx::SparseForwardArgs<T, Label> args;
  args.layout = call.layout;
  args.options = call.options;
  args.logits = static_cast<const T*>(logits.data());
  args.labels = static_cast<const Label*>(labels.data());
  args.loss = static_cast<T*>(loss.mutable_data());
  args.lse = static_cast<double*>(lse.mutable_data());
  run_rows(args, [](const auto& a, int64_t b, int64_t e) { fx::cpu::sparse_forward(a, b, e); });
}

template <typename T, typename Label>
void run_sparse_backward(const Call& call, const py::array& logits, const py::array& labels,
                         const py::array& lse, const py::array& grad_loss, py::array& grad_logits) {
  fx::SparseBackwardArgs<T, Label> args;
  args.layout = call.layout;
  args.options = call.options;
  args.logits = static_cast<const T*>(logits.data());
  args.labels = static_cast<const Label*>(labels.data());
  args.lse = static_cast<const double*>(lse.data());
  args.grad_loss = static_cast<const T*>(grad_loss.data());
  args.grad_logits = static_cast<T*>(grad_logits.mutable_data());
  run_rows(args, [](const auto& a, int64_t b, int64_t e) { fx::cpu::sparse_backward(a, b, e); });
}

template <typename T> void run_dense_forward(const Call& call, const py::array& logits,
                                             const py::array& labels, py::array& loss, py::array& lse,
                                             double* label_sums = nullptr) {
  fx::DenseForwardArgs<T> args;
  args.label_sums = label_sums;
  args.layout = call.layout;
  args.options = call.options;
  args.logits = static_cast<const T*>(logits.data());
  args.labels = static_cast<const T*>(labels.data());
  args.loss = static_cast<T*>(loss.mutable_data());
  args.lse = static_cast<double*>(lse.mutable_data());
  run_rows(args, [](const auto& a, int64_t b, int64_t e) { fx::cpu::dense_forward(a, b, e); });
}

template <typename T> void run_dense_backward(const Call& call, const py::array& logits,
                                              const py::array& labels, const py::array& lse,
                                              const py::array& grad_loss, py::array& grad_logits,
                                              const double* label_sums = nullptr) {
  fx::DenseBackwardArgs<T> args;
  args.label_sums = label_sums;
  args.layout = call.layout;
  args.options = call.options;
  args.logits = static_cast<const T*>(logits.data());
  args.labels = static_cast<const T*>(labels.data());
  args.lse = static_cast<const double*>(lse.data());
  args.grad_loss = static_cast<const T*>(grad_loss.data());
  args.grad_logits = static_cast<T*>(grad_logits.mutable_data());
  run_rows(args, [](const auto& a, int64_t b, int64_t e) { fx::cpu::dense_backward(a, b, e); });
}

// ---- the bindings: the CUDA bindings' names and arguments (cc/py/cuda_bindings.cc), minus the stream.

// Writes loss and the float64 row logsumexp lse.
void sparse_forward(const std::string& dtype, py::array logits, py::array labels, int64_t outer,
                    int64_t classes, int64_t inner, double label_smoothing, double z_loss,
                    std::optional<int64_t> ignore_index, ClassWeights class_weights, py::array loss,
                    py::array lse, int64_t total_classes, int64_t absent_label, double softcap) {
  const Call call = sparse_call(labels, outer, classes, inner, label_smoothing, z_loss, ignore_index,
                                class_weights, softcap, ShardOptions{total_classes, absent_label});
  dispatch_sparse(dtype, labels, [&](auto tag, auto label_tag, const char* kinds) {
    using T = decltype(tag);
    using Label = decltype(label_tag);
    check_sparse_inputs<T, Label>(call, logits, labels, kinds);
    check_forward_outputs<T>(call, loss, lse, kinds);
    run_sparse_forward<T, Label>(call, logits, labels, loss, lse);
  });
}

// Writes grad_logits (which may be logits itself) from the forward's lse.
void sparse_backward(const std::string& dtype, py::array logits, py::array labels, int64_t outer,
                     int64_t classes, int64_t inner, double label_smoothing, double z_loss,
                     std::optional<int64_t> ignore_index, ClassWeights class_weights, py::array lse,
                     py::array grad_loss, py::array grad_logits, int64_t total_classes, int64_t absent_label,
                     double softcap) {
  const Call call = sparse_call(labels, outer, classes, inner, label_smoothing, z_loss, ignore_index,
                                class_weights, softcap, ShardOptions{total_classes, absent_label});
  dispatch_sparse(dtype, labels, [&](auto tag, auto label_tag, const char* kinds) {
    using T = decltype(tag);
    using Label = decltype(label_tag);
    check_sparse_inputs<T, Label>(call, logits, labels, kinds);
    check_backward_buffers<T>(call, lse, grad_loss, grad_logits, kinds);
    run_sparse_backward<T, Label>(call, logits, labels, lse, grad_loss, grad_logits);
  });
}

// A shard's call (total_classes > 0) also writes each row's sum of its labels into label_sums.
void dense_forward(const std::string& dtype, py::array logits, py::array labels, int64_t outer,
                   int64_t classes, int64_t inner, double label_smoothing, double z_loss, py::array loss,
                   py::array lse, int64_t total_classes, std::optional<py::array> label_sums,
                   double softcap) {
  const Call call = dense_call(outer, classes, inner, label_smoothing, z_loss, softcap, total_classes);
  double* sums = const_cast<double*>(shard_label_sums(call, label_sums, true));
  dispatch_float(dtype, [&](auto tag, const char* kinds) {
    using T = decltype(tag);
    check_dense_inputs<T>(call, logits, labels, kinds);
    check_forward_outputs<T>(call, loss, lse, kinds);
    run_dense_forward<T>(call, logits, labels, loss, lse, sums);
  });
}

// A shard's call (total_classes > 0) reads the whole rows' label sums from label_sums.
void dense_backward(const std::string& dtype, py::array logits, py::array labels, int64_t outer,
                    int64_t classes, int64_t inner, double label_smoothing, double z_loss, py::array lse,
                    py::array grad_loss, py::array grad_logits, int64_t total_classes,
                    std::optional<py::array> label_sums, double softcap) {
  const Call call = dense_call(outer, classes, inner, label_smoothing, z_loss, softcap, total_classes);
  const double* sums = shard_label_sums(call, label_sums, false);
  dispatch_float(dtype, [&](auto tag, const char* kinds) {
    using T = decltype(tag);
    check_dense_inputs<T>(call, logits, labels, kinds);
    check_backward_buffers<T>(call, lse, grad_loss, grad_logits, kinds);
    run_dense_backward<T>(call, logits, labels, lse, grad_loss, grad_logits, sums);
  });
}

// The combined calls (benchmarks/bench_cpu.py, benchmarks/compare_builds.py and tests call them):
// the forward and, given grad_loss and grad_logits, the backward on its lse; every buffer is
// checked before either runs.
void sparse(const std::string& dtype, py::array logits, py::array labels, int64_t outer, int64_t classes,
            int64_t inner, double label_smoothing, double z_loss, std::optional<int64_t> ignore_index,
            ClassWeights class_weights, py::array loss, py::array lse, std::optional<py::array> grad_loss,
            std::optional<py::array> grad_logits, double softcap) {
  const Call call = sparse_call(labels, outer, classes, inner, label_smoothing, z_loss, ignore_index,
                                class_weights, softcap);
  require(grad_loss.has_value() == grad_logits.has_value(), "grad_loss and grad_logits go together");
  dispatch_sparse(dtype, labels, [&](auto tag, auto label_tag, const char* kinds) {
    using T = decltype(tag);
    using Label = decltype(label_tag);
    check_sparse_inputs<T, Label>(call, logits, labels, kinds);
    check_forward_outputs<T>(call, loss, lse, kinds);
    if (grad_logits) check_backward_buffers<T>(call, lse, *grad_loss, *grad_logits, kinds);
    run_sparse_forward<T, Label>(call, logits, labels, loss, lse);
    if (grad_logits) run_sparse_backward<T, Label>(call, logits, labels, lse, *grad_loss, *grad_logits);
  });
}

void dense(const std::string& dtype, py::array logits, py::array labels, int64_t outer, int64_t classes,
           int64_t inner, double label_smoothing, double z_loss, py::array loss, py::array lse,
           std::optional<py::array> grad_loss, std::optional<py::array> grad_logits, double softcap) {
  const Call call = dense_call(outer, classes, inner, label_smoothing, z_loss, softcap);
  require(grad_loss.has_value() == grad_logits.has_value(), "grad_loss and grad_logits go together");
  dispatch_float(dtype, [&](auto tag, const char* kinds) {
    using T = decltype(tag);
    check_dense_inputs<T>(call, logits, labels, kinds);
    check_forward_outputs<T>(call, loss, lse, kinds);
    if (grad_logits) check_backward_buffers<T>(call, lse, *grad_loss, *grad_logits, kinds);
    run_dense_forward<T>(call, logits, labels, loss, lse);
    if (grad_logits) run_dense_backward<T>(call, logits, labels, lse, *grad_loss, *grad_logits);
  });
}

// Bytes of scratch memory the kernel `kind` ("sparse_forward", "sparse_backward",
// "dense_forward", "dense_backward") needs for logits viewed as [outer, classes,
// inner] with elements of `element_size` bytes: the size of the workspace result
// of the FFI targets (docs/xla.md), the same in every build and on every platform.
size_t workspace_bytes(const std::string& kind, int64_t outer, int64_t classes, int64_t inner,
                       int element_size) {
  static const std::pair<const char*, fx::cuda::Kernel> kinds[] = {
      {"sparse_forward", fx::cuda::Kernel::kSparseForward},
      {"sparse_backward", fx::cuda::Kernel::kSparseBackward},
      {"dense_forward", fx::cuda::Kernel::kDenseForward},
      {"dense_backward", fx::cuda::Kernel::kDenseBackward}};
  if (outer < 0 || classes < 0 || inner < 0) throw py::value_error("outer, classes and inner must be >= 0");
  if (element_size != 2 && element_size != 4 && element_size != 8)
    throw py::value_error("element_size must be 2, 4 or 8, got " + std::to_string(element_size));
  for (const auto& k : kinds) {
    if (kind == k.first) {
      fx::Layout layout;
      layout.outer = outer;
      layout.classes = classes;
      layout.inner = inner;
      return fx::cuda::workspace_bytes(k.second, layout, element_size);
    }
  }
  throw py::value_error(
      "kind must be sparse_forward, sparse_backward, dense_forward or dense_backward, got '" + kind + "'");
}

#if defined(FUSED_XENT_WITH_XLA_FFI)
py::dict capsules_of(const fx::xla_ffi::Target* targets, int count) {
  py::dict out;
  for (int i = 0; i < count; ++i)
    out[targets[i].name] = py::capsule(reinterpret_cast<void*>(targets[i].handler));
  return out;
}
#endif

// The XLA FFI handlers as PyCapsules, per platform ("cpu", "cuda"), for
// jax.ffi.register_ffi_target; empty where this build has none.
py::dict ffi_targets() {
  py::dict platforms;
#if defined(FUSED_XENT_WITH_XLA_FFI)
  int count = 0;
  const fx::xla_ffi::Target* cpu = fx::xla_ffi::cpu_targets(&count);
  platforms["cpu"] = capsules_of(cpu, count);
#if defined(FUSED_XENT_WITH_CUDA)
  const fx::xla_ffi::Target* cuda = fx::xla_ffi::cuda_targets(&count);
  platforms["cuda"] = capsules_of(cuda, count);
#endif
#endif
  return platforms;
}

py::dict build_info() {
  py::dict info;
#ifdef FUSED_XENT_TF_VERSION
  info["tensorflow_version"] = FUSED_XENT_TF_VERSION;
#else
  info["tensorflow_version"] = py::none();
#endif
#ifdef FUSED_XENT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["simd"] = fx::simd_level();
  // Under XLA: "custom_call" (our kernels, through the FFI handlers, where the
  // device has one; HLO elsewhere), "hlo" (re-expressed as XLA ops) or None.
#if defined(FUSED_XENT_WITH_XLA_LOWERING) && defined(FUSED_XENT_WITH_TF_XLA_FFI)
  info["xla"] = "custom_call";
#elif defined(FUSED_XENT_WITH_XLA_LOWERING)
  info["xla"] = "hlo";
#else
  info["xla"] = py::none();
#endif
  // Why "xla" is not "custom_call" (CMake's finding), None when it is.
#ifdef FUSED_XENT_XLA_REASON
  info["xla_reason"] = FUSED_XENT_XLA_REASON;
#else
  info["xla_reason"] = py::none();
#endif
  py::list ffi_platforms;
  for (const auto& item : ffi_targets()) ffi_platforms.append(item.first);
  info["xla_ffi_platforms"] = ffi_platforms;
  info["version"] = FUSED_XENT_VERSION;
  return info;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Fused softmax cross-entropy kernels over NumPy buffers (private; use fused_xent.numpy).";
  m.def("sparse_forward", &sparse_forward, py::arg("dtype"), py::arg("logits"), py::arg("labels"),
        py::arg("outer"), py::arg("classes"), py::arg("inner"), py::arg("label_smoothing"), py::arg("z_loss"),
        py::arg("ignore_index"), py::arg("class_weights"), py::arg("loss"), py::arg("lse"),
        py::arg("total_classes") = 0, py::arg("absent_label") = 0, py::arg("softcap") = 0.0);
  m.def("sparse_backward", &sparse_backward, py::arg("dtype"), py::arg("logits"), py::arg("labels"),
        py::arg("outer"), py::arg("classes"), py::arg("inner"), py::arg("label_smoothing"), py::arg("z_loss"),
        py::arg("ignore_index"), py::arg("class_weights"), py::arg("lse"), py::arg("grad_loss"),
        py::arg("grad_logits"), py::arg("total_classes") = 0, py::arg("absent_label") = 0,
        py::arg("softcap") = 0.0);
  m.def("dense_forward", &dense_forward, py::arg("dtype"), py::arg("logits"), py::arg("labels"),
        py::arg("outer"), py::arg("classes"), py::arg("inner"), py::arg("label_smoothing"), py::arg("z_loss"),
        py::arg("loss"), py::arg("lse"), py::arg("total_classes") = 0, py::arg("label_sums") = py::none(),
        py::arg("softcap") = 0.0);
  m.def("dense_backward", &dense_backward, py::arg("dtype"), py::arg("logits"), py::arg("labels"),
        py::arg("outer"), py::arg("classes"), py::arg("inner"), py::arg("label_smoothing"), py::arg("z_loss"),
        py::arg("lse"), py::arg("grad_loss"), py::arg("grad_logits"), py::arg("total_classes") = 0,
        py::arg("label_sums") = py::none(), py::arg("softcap") = 0.0);
  m.def("sparse", &sparse, py::arg("dtype"), py::arg("logits"), py::arg("labels"), py::arg("outer"),
        py::arg("classes"), py::arg("inner"), py::arg("label_smoothing"), py::arg("z_loss"),
        py::arg("ignore_index"), py::arg("class_weights"), py::arg("loss"), py::arg("lse"),
        py::arg("grad_loss"), py::arg("grad_logits"), py::arg("softcap") = 0.0);
  m.def("dense", &dense, py::arg("dtype"), py::arg("logits"), py::arg("labels"), py::arg("outer"),
        py::arg("classes"), py::arg("inner"), py::arg("label_smoothing"), py::arg("z_loss"), py::arg("loss"),
        py::arg("lse"), py::arg("grad_loss"), py::arg("grad_logits"), py::arg("softcap") = 0.0);
  m.def("build_info", &build_info);
  m.def("ffi_targets", &ffi_targets);
  m.def("workspace_bytes", &workspace_bytes, py::arg("kind"), py::arg("outer"), py::arg("classes"),
        py::arg("inner"), py::arg("element_size"));
#ifdef FUSED_XENT_WITH_CUDA
  register_cuda_bindings(m);
#endif
}
