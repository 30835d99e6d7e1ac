// pybind11 bindings of the CUDA kernels for arrays exposing
// __cuda_array_interface__ (CuPy, PyTorch, Numba), so the kernels can be used
// and tested without TensorFlow. fused_xent/cuda.py allocates the outputs and
// passes the stream; this file re-checks every size and the memory kind of
// every pointer, since a kernel given a wrong buffer would corrupt the device.
// Kernels are enqueued on `stream` and the calls return without synchronising.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "cuda/launchers.h"

namespace py = pybind11;
namespace fx = fused_xent;

namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

void check_cuda(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    cudaGetLastError();  // clear it: the next call should not see it
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
  }
}

void check_launch(const char* error) {
  if (error) throw std::runtime_error(std::string("fused_xent CUDA launch failed: ") + error);
}

// A C-contiguous device array described by __cuda_array_interface__.
struct DeviceArray {
  void* data = nullptr;
  int64_t count = 1;
  int itemsize = 0;
  char kind = 0;
  bool readonly = false;
};

DeviceArray device_array(const py::handle& obj, const char* what) {
  py::dict cai;
  try {
    cai = obj.attr("__cuda_array_interface__").cast<py::dict>();
  } catch (py::error_already_set&) {
    throw py::type_error(std::string(what) +
                         " must be a CUDA array with __cuda_array_interface__ (CuPy, PyTorch)");
  }
  DeviceArray a;
  const auto data = cai["data"].cast<py::tuple>();
  a.data = reinterpret_cast<void*>(data[0].cast<uintptr_t>());
  a.readonly = data[1].cast<bool>();
  const std::string typestr = cai["typestr"].cast<std::string>();
  require(typestr.size() >= 3 && typestr[0] != '>', std::string(what) + ": unsupported typestr " + typestr);
  a.kind = typestr[1];
  a.itemsize = std::stoi(typestr.substr(2));
  const auto shape = cai["shape"].cast<py::tuple>();
  for (const auto& d : shape) a.count *= d.cast<int64_t>();
  if (cai.contains("mask")) require(cai["mask"].is_none(), std::string(what) + " must not be masked");
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    const auto strides = cai["strides"].cast<py::tuple>();
    int64_t expected = a.itemsize;
    for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
      const int64_t extent = shape[i].cast<int64_t>();
      require(extent <= 1 || strides[i].cast<int64_t>() == expected,
              std::string(what) + " must be C-contiguous");
      expected *= extent;
    }
  }
  return a;
}

// Checks a buffer's element type and size, and that it lives on `device`.
void check_array(const DeviceArray& a, int64_t count, int itemsize, const char* kinds, const char* what,
                 int device, bool writable = false) {
  require(a.itemsize == itemsize && std::string(kinds).find(a.kind) != std::string::npos,
          std::string(what) + " has the wrong element type");
  require(a.count == count, std::string(what) + " has " + std::to_string(a.count) + " elements, expected " +
                                std::to_string(count));
  require(!writable || !a.readonly, std::string(what) + " must be writable");
  if (count == 0) return;
  cudaPointerAttributes attributes;
  check_cuda(cudaPointerGetAttributes(&attributes, a.data), what);
  require(attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged,
          std::string(what) + " is not CUDA device memory");
  require(attributes.device == device, std::string(what) + " is on another device than logits");
}

// Makes logits' device current for this module's (static) CUDA runtime, which
// does not share the current device with PyTorch's or CuPy's runtime.
int use_device_of(const DeviceArray& logits) {
  if (logits.count == 0) return 0;
  cudaPointerAttributes attributes;
  check_cuda(cudaPointerGetAttributes(&attributes, logits.data), "logits");
  require(attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged,
          "logits is not CUDA device memory");
  check_cuda(cudaSetDevice(attributes.device), "cudaSetDevice");
  return attributes.device;
}

// The launchers' workspace: the caller's buffer when it passes one (fused_xent.cuda
// allocates it with the array library's caching allocator, so a call allocates
// no device memory itself), else stream-ordered memory freed after the kernels
// that use it, with no host wait.
class Workspace {
 public:
  Workspace(size_t bytes, cudaStream_t stream, const std::optional<py::object>& given, int device)
      : stream_(stream) {
    if (bytes == 0) return;
    if (given && !given->is_none()) {
      const DeviceArray a = device_array(*given, "workspace");
      require(a.count * a.itemsize >= static_cast<int64_t>(bytes),
              "workspace has " + std::to_string(a.count * a.itemsize) + " bytes, this call needs " +
                  std::to_string(bytes));
      require(!a.readonly, "workspace must be writable");
      require(reinterpret_cast<uintptr_t>(a.data) % 16 == 0, "workspace must be aligned to 16 bytes");
      check_array(a, a.count, a.itemsize, "fiuVb", "workspace", device);
      data_ = a.data;
      owned_ = false;
      return;
    }
    const cudaError_t error = cudaMallocAsync(&data_, bytes, stream);
    if (error == cudaErrorNotSupported) {  // no memory pools (some virtualised GPUs)
      cudaGetLastError();
      synchronous_ = true;
      check_cuda(cudaMalloc(&data_, bytes), "workspace");
    } else {
      check_cuda(error, "workspace");
    }
  }
  ~Workspace() {
    if (!data_ || !owned_) return;
    if (synchronous_) {
      cudaStreamSynchronize(stream_);
      cudaFree(data_);
    } else {
      cudaFreeAsync(data_, stream_);
    }
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
  cudaStream_t stream_;
  bool owned_ = true;
  bool synchronous_ = false;
};

fx::Layout make_layout(int64_t outer, int64_t classes, int64_t inner) {
  require(outer >= 0 && inner >= 1 && classes >= 1,
          "invalid layout: need outer >= 0, classes >= 1, inner >= 1");
  fx::Layout layout;
  layout.outer = outer;
  layout.classes = classes;
  layout.inner = inner;
  return layout;
}

fx::Options make_options(double label_smoothing, double z_loss, std::optional<int64_t> ignore_index,
                         double softcap) {
  require(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing must lie in [0, 1]");
  require(std::isfinite(z_loss) && z_loss >= 0.0, "z_loss must be finite and >= 0");
  require(std::isfinite(softcap) && softcap >= 0.0, "softcap must be finite and >= 0 (0: no cap)");
  fx::Options options;
  options.softcap = static_cast<float>(softcap);
  options.label_smoothing = static_cast<float>(label_smoothing);
  options.z_loss = static_cast<float>(z_loss);
  options.has_ignore_index = ignore_index.has_value();
  options.ignore_index = ignore_index.value_or(0);
  return options;
}

// Calls fn(tag) with a value of the core type named by `dtype`; bfloat16 buffers
// may come as 16-bit integer views (PyTorch exports no bfloat16 typestr).
template <typename Fn> void dispatch_float(const std::string& dtype, const Fn& fn) {
  if (dtype == "float32") return fn(float{}, "f");
  if (dtype == "float64") return fn(double{}, "f");
  if (dtype == "float16") return fn(fx::float16_t{}, "f");
  if (dtype == "bfloat16") return fn(fx::bfloat16_t{}, "fiuV");
  throw py::type_error("logits must be float16, bfloat16, float32 or float64, got " + dtype);
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// The parts every sparse call shares.
struct SparseCall {
  fx::Layout layout;
  fx::Options options;
  DeviceArray logits, labels;
  int device = 0;
};

SparseCall sparse_call(const py::object& logits, const py::object& labels, int64_t outer, int64_t classes,
                       int64_t inner, double label_smoothing, double z_loss,
                       std::optional<int64_t> ignore_index, const std::optional<py::object>& class_weights,
                       double softcap) {
  SparseCall call;
  call.layout = make_layout(outer, classes, inner);
  call.options = make_options(label_smoothing, z_loss, ignore_index, softcap);
  call.logits = device_array(logits, "logits");
  call.labels = device_array(labels, "labels");
  call.device = use_device_of(call.logits);
  require(call.labels.kind == 'i' && (call.labels.itemsize == 4 || call.labels.itemsize == 8),
          "labels must be int32 or int64");
  check_array(call.labels, call.layout.rows(), call.labels.itemsize, "i", "labels", call.device);
  if (class_weights && !class_weights->is_none()) {
    const DeviceArray weights = device_array(*class_weights, "class_weights");
    check_array(weights, classes, 4, "f", "class_weights", call.device);
    call.options.class_weights = static_cast<const float*>(weights.data);
  }
  return call;
}

void sparse_forward(const std::string& dtype, py::object logits, py::object labels, int64_t outer,
                    int64_t classes, int64_t inner, double label_smoothing, double z_loss,
                    std::optional<int64_t> ignore_index, std::optional<py::object> class_weights,
                    py::object loss, py::object lse, uintptr_t stream,
                    std::optional<py::object> workspace_array, double softcap) {
  const SparseCall call = sparse_call(logits, labels, outer, classes, inner, label_smoothing, z_loss,
                                      ignore_index, class_weights, softcap);
  const int64_t rows = call.layout.rows();
  const DeviceArray loss_array = device_array(loss, "loss"), lse_array = device_array(lse, "lse");
  dispatch_float(dtype, [&](auto tag, const char* kinds) {
    using T = decltype(tag);
    check_array(call.logits, rows * classes, sizeof(T), kinds, "logits", call.device);
    check_array(loss_array, rows, sizeof(T), kinds, "loss", call.device, true);
    check_array(lse_array, rows, 8, "f", "lse", call.device, true);
    Workspace workspace(fx::cuda::forward_workspace_bytes(call.layout, sizeof(T)), as_stream(stream),
                        workspace_array, call.device);
    auto run = [&](auto label_tag) {
      using Label = decltype(label_tag);
      fx::SparseForwardArgs<T, Label> args;
      args.layout = call.layout;
      args.options = call.options;
      args.logits = static_cast<const T*>(call.logits.data);
      args.labels = static_cast<const Label*>(call.labels.data);
      args.loss = static_cast<T*>(loss_array.data);
      args.lse = static_cast<double*>(lse_array.data);
      check_launch(fx::cuda::sparse_forward(args, workspace.data(), as_stream(stream)));
    };
    call.labels.itemsize == 8 ? run(int64_t{}) : run(int32_t{});
  });
}

void sparse_backward(const std::string& dtype, py::object logits, py::object labels, int64_t outer,
                     int64_t classes, int64_t inner, double label_smoothing, double z_loss,
                     std::optional<int64_t> ignore_index, std::optional<py::object> class_weights,
                     py::object lse, py::object grad_loss, py::object grad_logits, uintptr_t stream,
                     double softcap) {
  const SparseCall call = sparse_call(logits, labels, outer, classes, inner, label_smoothing, z_loss,
                                      ignore_index, class_weights, softcap);
  const int64_t rows = call.layout.rows();
  const DeviceArray lse_array = device_array(lse, "lse"),
                    grad_loss_array = device_array(grad_loss, "grad_loss");
  const DeviceArray grad_array = device_array(grad_logits, "grad_logits");
  dispatch_float(dtype, [&](auto tag, const char* kinds) {
    using T = decltype(tag);
    check_array(call.logits, rows * classes, sizeof(T), kinds, "logits", call.device);
    check_array(lse_array, rows, 8, "f", "lse", call.device);
    check_array(grad_loss_array, rows, sizeof(T), kinds, "grad_loss", call.device);
    check_array(grad_array, rows * classes, sizeof(T), kinds, "grad_logits", call.device, true);
    auto run = [&](auto label_tag) {
      using Label = decltype(label_tag);
      fx::SparseBackwardArgs<T, Label> args;
      args.layout = call.layout;
      args.options = call.options;
      args.logits = static_cast<const T*>(call.logits.data);
      args.labels = static_cast<const Label*>(call.labels.data);
      args.lse = static_cast<const double*>(lse_array.data);
      args.grad_loss = static_cast<const T*>(grad_loss_array.data);
      args.grad_logits = static_cast<T*>(grad_array.data);
      check_launch(fx::cuda::sparse_backward(args, as_stream(stream)));
    };
    call.labels.itemsize == 8 ? run(int64_t{}) : run(int32_t{});
  });
}

void dense_forward(const std::string& dtype, py::object logits, py::object labels, int64_t outer,
                   int64_t classes, int64_t inner, double label_smoothing, double z_loss, py::object loss,
                   py::object lse, uintptr_t stream, std::optional<py::object> workspace_array,
                   double softcap) {
  const fx::Layout layout = make_layout(outer, classes, inner);
  const fx::Options options = make_options(label_smoothing, z_loss, std::nullopt, softcap);
  const DeviceArray z = device_array(logits, "logits"), t = device_array(labels, "labels");
  const DeviceArray loss_array = device_array(loss, "loss"), lse_array = device_array(lse, "lse");
  const int device = use_device_of(z);
  const int64_t rows = layout.rows();
  dispatch_float(dtype, [&](auto tag, const char* kinds) {
    using T = decltype(tag);
    check_array(z, rows * classes, sizeof(T), kinds, "logits", device);
    check_array(t, rows * classes, sizeof(T), kinds, "labels", device);
    check_array(loss_array, rows, sizeof(T), kinds, "loss", device, true);
    check_array(lse_array, rows, 8, "f", "lse", device, true);
    Workspace workspace(fx::cuda::forward_workspace_bytes(layout, sizeof(T)), as_stream(stream),
                        workspace_array, device);
    fx::DenseForwardArgs<T> args;
    args.layout = layout;
    args.options = options;
    args.logits = static_cast<const T*>(z.data);
    args.labels = static_cast<const T*>(t.data);
    args.loss = static_cast<T*>(loss_array.data);
    args.lse = static_cast<double*>(lse_array.data);
    check_launch(fx::cuda::dense_forward(args, workspace.data(), as_stream(stream)));
  });
}

void dense_backward(const std::string& dtype, py::object logits, py::object labels, int64_t outer,
                    int64_t classes, int64_t inner, double label_smoothing, double z_loss, py::object lse,
                    py::object grad_loss, py::object grad_logits, uintptr_t stream,
                    std::optional<py::object> workspace_array, double softcap) {
  const fx::Layout layout = make_layout(outer, classes, inner);
  const fx::Options options = make_options(label_smoothing, z_loss, std::nullopt, softcap);
  const DeviceArray z = device_array(logits, "logits"), t = device_array(labels, "labels");
  const DeviceArray lse_array = device_array(lse, "lse"),
                    grad_loss_array = device_array(grad_loss, "grad_loss");
  const DeviceArray grad_array = device_array(grad_logits, "grad_logits");
  const int device = use_device_of(z);
  const int64_t rows = layout.rows();
  dispatch_float(dtype, [&](auto tag, const char* kinds) {
    using T = decltype(tag);
    check_array(z, rows * classes, sizeof(T), kinds, "logits", device);
    check_array(t, rows * classes, sizeof(T), kinds, "labels", device);
    check_array(lse_array, rows, 8, "f", "lse", device);
    check_array(grad_loss_array, rows, sizeof(T), kinds, "grad_loss", device);
    check_array(grad_array, rows * classes, sizeof(T), kinds, "grad_logits", device, true);
    Workspace workspace(fx::cuda::dense_backward_workspace_bytes(layout, sizeof(T)), as_stream(stream),
                        workspace_array, device);
    fx::DenseBackwardArgs<T> args;
    args.layout = layout;
    args.options = options;
    args.logits = static_cast<const T*>(z.data);
    args.labels = static_cast<const T*>(t.data);
    args.lse = static_cast<const double*>(lse_array.data);
    args.grad_loss = static_cast<const T*>(grad_loss_array.data);
    args.grad_logits = static_cast<T*>(grad_array.data);
    check_launch(fx::cuda::dense_backward(args, workspace.data(), as_stream(stream)));
  });
}

// Number of usable CUDA devices; 0 (never an error) without a driver or GPU.
int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace

void register_cuda_bindings(py::module_& m) {
  m.def("cuda_device_count", &device_count);
  m.def("cuda_sparse_forward", &sparse_forward, py::arg("dtype"), py::arg("logits"), py::arg("labels"),
        py::arg("outer"), py::arg("classes"), py::arg("inner"), py::arg("label_smoothing"), py::arg("z_loss"),
        py::arg("ignore_index"), py::arg("class_weights"), py::arg("loss"), py::arg("lse"), py::arg("stream"),
        py::arg("workspace") = py::none(), py::arg("softcap") = 0.0);
  m.def("cuda_sparse_backward", &sparse_backward, py::arg("dtype"), py::arg("logits"), py::arg("labels"),
        py::arg("outer"), py::arg("classes"), py::arg("inner"), py::arg("label_smoothing"), py::arg("z_loss"),
        py::arg("ignore_index"), py::arg("class_weights"), py::arg("lse"), py::arg("grad_loss"),
        py::arg("grad_logits"), py::arg("stream"), py::arg("softcap") = 0.0);
  m.def("cuda_dense_forward", &dense_forward, py::arg("dtype"), py::arg("logits"), py::arg("labels"),
        py::arg("outer"), py::arg("classes"), py::arg("inner"), py::arg("label_smoothing"), py::arg("z_loss"),
        py::arg("loss"), py::arg("lse"), py::arg("stream"), py::arg("workspace") = py::none(),
        py::arg("softcap") = 0.0);
  m.def("cuda_dense_backward", &dense_backward, py::arg("dtype"), py::arg("logits"), py::arg("labels"),
        py::arg("outer"), py::arg("classes"), py::arg("inner"), py::arg("label_smoothing"), py::arg("z_loss"),
        py::arg("lse"), py::arg("grad_loss"), py::arg("grad_logits"), py::arg("stream"),
        py::arg("workspace") = py::none(), py::arg("softcap") = 0.0);
}
