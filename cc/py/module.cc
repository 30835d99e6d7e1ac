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
template <typename Fn>
void parallel_rows(const fx::Layout& layout, const Fn& fn) {
  const fx::cpu::RowUnits units = fx::cpu::row_units(layout);
  const int64_t work = layout.rows() * std::max<int64_t>(layout.classes, 1);
  const int64_t max_threads = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads = std::min<int64_t>({max_threads, units.count(), std::max<int64_t>(1, work / (1 << 16))});
  if (threads <= 1) {
    fn(0, layout.rows());
    return;
  }
  const int64_t chunk = (units.count() + threads - 1) / threads;
  const int64_t shards = (units.count() + chunk - 1) / chunk;
  const std::function<void(int64_t)> shard = [&](int64_t i) { fn(units.row(i * chunk), units.row((i + 1) * chunk)); };
  if (fx::py_support::worker_pool(static_cast<int>(max_threads - 1))->try_run(shards, shard)) return;
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < shards; ++i) pool.emplace_back([&shard, i] { shard(i); });
  shard(0);
  for (auto& t : pool) t.join();
}

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

void require_buffer(const py::array& a, int64_t count, int64_t itemsize, const char* what) {
  require(a.flags() & py::array::c_style, std::string(what) + " must be C-contiguous");
  require(a.itemsize() == itemsize, std::string(what) + " has the wrong item size");
  require(a.size() == count, std::string(what) + " has " + std::to_string(a.size()) + " elements, expected " +
                                 std::to_string(count));
}

void require_writable(const py::array& a, const char* what) {
  require(a.writeable(), std::string(what) + " must be writable");
}

// a * b for a, b >= 0, or -1 when it does not fit in int64.
int64_t checked_product(int64_t a, int64_t b) {
  return (a != 0 && b > std::numeric_limits<int64_t>::max() / a) ? -1 : a * b;
}

// inner may be 0 (an empty axis after the class axis): then there are no rows.
// The element count must fit in int64, or the buffer size checks would wrap.
fx::Layout make_layout(int64_t outer, int64_t classes, int64_t inner) {
  require(outer >= 0 && inner >= 0 && classes >= 1 && checked_product(checked_product(outer, inner), classes) >= 0,
          "invalid layout: need outer >= 0, classes >= 1, inner >= 0 and outer * classes * inner to fit in int64");
  fx::Layout layout;
  layout.outer = outer;
  layout.classes = classes;
  layout.inner = inner;
  return layout;
}

fx::Options make_options(double label_smoothing, double z_loss, std::optional<int64_t> ignore_index,
                         const std::optional<py::array_t<float, py::array::c_style>>& class_weights,
                         int64_t classes) {
  require(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing must lie in [0, 1]");
  fx::Options options;
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

template <typename T, typename Label>
void run_sparse(const fx::Layout& layout, const fx::Options& options, const py::array& logits,
                const py::array& labels, py::array& loss, py::array& lse, const py::array* grad_loss,
                py::array* grad_logits) {
  const int64_t rows = layout.rows();
  require_buffer(logits, rows * layout.classes, sizeof(T), "logits");
  require_buffer(labels, rows, sizeof(Label), "labels");
  require_buffer(loss, rows, sizeof(T), "loss");
  require_buffer(lse, rows, sizeof(double), "lse");
  require_writable(loss, "loss");
  require_writable(lse, "lse");
  const Label* label_data = static_cast<const Label*>(labels.data());
  const int64_t bad = fx::cpu::find_invalid_label(label_data, rows, layout.classes, options);
  if (bad >= 0) {
    throw py::value_error(fx::invalid_label_message(static_cast<int64_t>(label_data[bad]), layout.classes, options));
  }
  fx::SparseForwardArgs<T, Label> fwd;
  fwd.layout = layout;
  fwd.options = options;
  fwd.logits = static_cast<const T*>(logits.data());
  fwd.labels = label_data;
  fwd.loss = static_cast<T*>(loss.mutable_data());
  fwd.lse = static_cast<double*>(lse.mutable_data());
  if (grad_logits) {
    require_buffer(*grad_loss, rows, sizeof(T), "grad_loss");
    require_buffer(*grad_logits, rows * layout.classes, sizeof(T), "grad_logits");
    require_writable(*grad_logits, "grad_logits");
  }
  if (rows == 0) return;
  py::gil_scoped_release release;
  parallel_rows(layout, [&](int64_t b, int64_t e) { fx::cpu::sparse_forward(fwd, b, e); });
  if (!grad_logits) return;
  fx::SparseBackwardArgs<T, Label> bwd;
  bwd.layout = layout;
  bwd.options = options;
  bwd.logits = fwd.logits;
  bwd.labels = label_data;
  bwd.lse = fwd.lse;
  bwd.grad_loss = static_cast<const T*>(grad_loss->data());
  bwd.grad_logits = static_cast<T*>(grad_logits->mutable_data());
  parallel_rows(layout, [&](int64_t b, int64_t e) { fx::cpu::sparse_backward(bwd, b, e); });
}

template <typename T>
void run_dense(const fx::Layout& layout, const fx::Options& options, const py::array& logits,
               const py::array& labels, py::array& loss, py::array& lse, const py::array* grad_loss,
               py::array* grad_logits) {
  const int64_t rows = layout.rows();
  const int64_t elements = rows * layout.classes;
  require_buffer(logits, elements, sizeof(T), "logits");
  require_buffer(labels, elements, sizeof(T), "labels");
  require_buffer(loss, rows, sizeof(T), "loss");
  require_buffer(lse, rows, sizeof(double), "lse");
  require_writable(loss, "loss");
  require_writable(lse, "lse");
  fx::DenseForwardArgs<T> fwd;
  fwd.layout = layout;
  fwd.options = options;
  fwd.logits = static_cast<const T*>(logits.data());
  fwd.labels = static_cast<const T*>(labels.data());
  fwd.loss = static_cast<T*>(loss.mutable_data());
  fwd.lse = static_cast<double*>(lse.mutable_data());
  if (grad_logits) {
    require_buffer(*grad_loss, rows, sizeof(T), "grad_loss");
    require_buffer(*grad_logits, elements, sizeof(T), "grad_logits");
    require_writable(*grad_logits, "grad_logits");
  }
  if (rows == 0) return;
  py::gil_scoped_release release;
  parallel_rows(layout, [&](int64_t b, int64_t e) { fx::cpu::dense_forward(fwd, b, e); });
  if (!grad_logits) return;
  fx::DenseBackwardArgs<T> bwd;
  bwd.layout = layout;
  bwd.options = options;
  bwd.logits = fwd.logits;
  bwd.labels = fwd.labels;
  bwd.lse = fwd.lse;
  bwd.grad_loss = static_cast<const T*>(grad_loss->data());
  bwd.grad_logits = static_cast<T*>(grad_logits->mutable_data());
  parallel_rows(layout, [&](int64_t b, int64_t e) { fx::cpu::dense_backward(bwd, b, e); });
}

// Calls fn.template operator()<CoreType>() for the logits dtype name given by Python.
template <typename Fn>
void dispatch_float(const std::string& dtype, const Fn& fn) {
  if (dtype == "float32") return fn(float{});
  if (dtype == "float64") return fn(double{});
  if (dtype == "float16") return fn(fx::float16_t{});
  if (dtype == "bfloat16") return fn(fx::bfloat16_t{});
  throw py::type_error("logits must be float16, bfloat16, float32 or float64, got " + dtype);
}

void sparse(const std::string& dtype, py::array logits, py::array labels, int64_t outer, int64_t classes,
            int64_t inner, double label_smoothing, double z_loss, std::optional<int64_t> ignore_index,
            std::optional<py::array_t<float, py::array::c_style>> class_weights, py::array loss, py::array lse,
            std::optional<py::array> grad_loss, std::optional<py::array> grad_logits) {
  const fx::Layout layout = make_layout(outer, classes, inner);
  const fx::Options options = make_options(label_smoothing, z_loss, ignore_index, class_weights, classes);
  require(grad_loss.has_value() == grad_logits.has_value(), "grad_loss and grad_logits go together");
  const py::array* g = grad_loss ? &*grad_loss : nullptr;
  py::array* d = grad_logits ? &*grad_logits : nullptr;
  const bool labels_int64 = labels.itemsize() == 8;
  require(labels.dtype().kind() == 'i' && (labels.itemsize() == 4 || labels_int64), "labels must be int32 or int64");
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (labels_int64)
      run_sparse<T, int64_t>(layout, options, logits, labels, loss, lse, g, d);
    else
      run_sparse<T, int32_t>(layout, options, logits, labels, loss, lse, g, d);
  });
}

void dense(const std::string& dtype, py::array logits, py::array labels, int64_t outer, int64_t classes,
           int64_t inner, double label_smoothing, double z_loss, py::array loss, py::array lse,
           std::optional<py::array> grad_loss, std::optional<py::array> grad_logits) {
  const fx::Layout layout = make_layout(outer, classes, inner);
  const fx::Options options = make_options(label_smoothing, z_loss, std::nullopt, std::nullopt, classes);
  require(grad_loss.has_value() == grad_logits.has_value(), "grad_loss and grad_logits go together");
  const py::array* g = grad_loss ? &*grad_loss : nullptr;
  py::array* d = grad_logits ? &*grad_logits : nullptr;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    run_dense<T>(layout, options, logits, labels, loss, lse, g, d);
  });
}

#if defined(FUSED_XENT_WITH_XLA_FFI)
py::dict capsules_of(const fx::xla_ffi::Target* targets, int count) {
  py::dict out;
  for (int i = 0; i < count; ++i) out[targets[i].name] = py::capsule(reinterpret_cast<void*>(targets[i].handler));
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
#if defined(FUSED_XENT_WITH_XLA_LOWERING) && defined(FUSED_XENT_WITH_XLA_FFI)
  info["xla"] = "custom_call";
#elif defined(FUSED_XENT_WITH_XLA_LOWERING)
  info["xla"] = "hlo";
#else
  info["xla"] = py::none();
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
  m.def("sparse", &sparse, py::arg("dtype"), py::arg("logits"), py::arg("labels"), py::arg("outer"),
        py::arg("classes"), py::arg("inner"), py::arg("label_smoothing"), py::arg("z_loss"),
        py::arg("ignore_index"), py::arg("class_weights"), py::arg("loss"), py::arg("lse"),
        py::arg("grad_loss"), py::arg("grad_logits"));
  m.def("dense", &dense, py::arg("dtype"), py::arg("logits"), py::arg("labels"), py::arg("outer"),
        py::arg("classes"), py::arg("inner"), py::arg("label_smoothing"), py::arg("z_loss"), py::arg("loss"),
        py::arg("lse"), py::arg("grad_loss"), py::arg("grad_logits"));
  m.def("build_info", &build_info);
  m.def("ffi_targets", &ffi_targets);
#ifdef FUSED_XENT_WITH_CUDA
  register_cuda_bindings(m);
#endif
}
