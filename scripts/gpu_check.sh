#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU, PyTorch, CuPy, JAX,
# nvcc, CMake and pybind11 (no TensorFlow, no network needed): builds the core,
# the CUDA kernels and the XLA FFI handlers (FFI header from JAX) without
# TensorFlow, then runs tests/cuda/test_cuda.py, the CUDA FFI handlers under JAX
# (tests/jax/test_xla_ffi_jax.py with FUSED_XENT_JAX_PLATFORM=cuda), fused_xent.jax
# and fused_xent.torch on the GPU against their CPU results, and
# benchmarks/bench_cuda.py. Writes its logs and results under $OUT when set.
# Meant to finish in under 8 minutes.
#
#   OUT=/tmp/gpu-results scripts/gpu_check.sh
# Environment: PYTHON (default python3), CUDA_ARCHS (default native),
# BUILD_DIR (default /tmp/fused-xent-gpu-build), BENCH_ARGS (default --quick).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-$(mktemp -d /tmp/fused-xent-gpu-check.XXXXXX)}
BUILD=${BUILD_DIR:-/tmp/fused-xent-gpu-build}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
started=$SECONDS
status=0

log() { echo "== gpu_check [$((SECONDS - started)) s]: $*"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -2
  cmake --version | head -1
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, torch.version.cuda)' || true
  "$PYTHON" -c 'import cupy; print("cupy", cupy.__version__)' || true
  "$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())' || true
} > "$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

log "configure and build (no TensorFlow, CUDA on)"
pybind11_dir=$("$PYTHON" -c 'import pybind11; print(pybind11.get_cmake_dir())')
generator=()
if command -v ninja > /dev/null; then generator=(-G Ninja); fi
if ! { cmake -S . -B "$BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DFUSED_XENT_TENSORFLOW=OFF -DFUSED_XENT_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-native}" \
        -DPython_EXECUTABLE="$(command -v "$PYTHON")" -Dpybind11_DIR="$pybind11_dir" &&
      cmake --build "$BUILD" -j "$(nproc)"; } > "$OUT_DIR/build.log" 2>&1; then
  tail -40 "$OUT_DIR/build.log"
  log "build FAILED (full log in $OUT_DIR/build.log)"
  exit 1
fi
grep -E "CUDA kernels|warning" "$OUT_DIR/build.log" | head -20

# The package as it would be installed: the Python files next to the built module.
stage="$BUILD/stage"
rm -rf "$stage" && mkdir -p "$stage/fused_xent"
cp python/fused_xent/*.py "$stage/fused_xent/"
cp "$BUILD"/_core*.so "$stage/fused_xent/"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import fused_xent; print(fused_xent.build_info()); from fused_xent import cuda; print("CUDA usable:", cuda.is_available())'

log "tests/cuda/test_cuda.py"
timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/cuda/test_cuda.py \
  --junitxml="$OUT_DIR/test_cuda.xml" 2>&1 | tee "$OUT_DIR/test_cuda.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log "tests/jax/test_xla_ffi_jax.py on CUDA (the FFI handlers under jax.jit)"
FUSED_XENT_JAX_PLATFORM=cuda timeout 200 "$PYTHON" -m pytest -q -p no:cacheprovider tests/jax/test_xla_ffi_jax.py \
  --junitxml="$OUT_DIR/test_xla_ffi_jax.xml" 2>&1 | tee "$OUT_DIR/test_xla_ffi_jax.log" | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log "fused_xent.jax and fused_xent.torch on the GPU against their CPU results"
timeout 200 "$PYTHON" - <<'PY' 2>&1 | tee "$OUT_DIR/frameworks_cuda.log" | tail -20
import numpy as np
rng = np.random.default_rng(0)
z = (rng.normal(size=(512, 3000)) * 3).astype(np.float32)
y = rng.integers(0, 3000, size=512)
results = {}
try:
    import jax, jax.numpy as jnp
    import fused_xent.jax as fj
    loss_grad = jax.jit(jax.value_and_grad(lambda z, y: fj.sparse_softmax_cross_entropy_with_logits(y, z, label_smoothing=0.1).mean()))
    for name in ("cpu", "gpu"):
        dev = jax.devices(name)[0]
        results[f"jax {name}"] = [np.asarray(v) for v in loss_grad(jax.device_put(z, dev), jax.device_put(y, dev))]
except Exception as error:  # noqa: BLE001
    print("jax:", type(error).__name__, error)
try:
    import torch
    import fused_xent.torch as ft
    for name in ("cpu", "cuda"):
        t = torch.tensor(z, device=name, requires_grad=True)
        loss = ft.sparse_softmax_cross_entropy_with_logits(torch.tensor(y, device=name), t, label_smoothing=0.1).mean()
        loss.backward()
        results[f"torch {name}"] = [loss.detach().cpu().numpy(), t.grad.cpu().numpy()]
except Exception as error:  # noqa: BLE001
    print("torch:", type(error).__name__, error)
failed = False
for fw, gpu in (("jax", "gpu"), ("torch", "cuda")):
    if f"{fw} cpu" in results and f"{fw} {gpu}" in results:
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(results[f"{fw} cpu"], results[f"{fw} {gpu}"]))
        print(f"{fw}: GPU vs CPU max |difference| {diff:.3g}")
        failed |= not diff < 1e-5
    else:
        print(f"{fw}: not run on the GPU")
        failed = True
raise SystemExit(1 if failed else 0)
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log "benchmarks/bench_cuda.py"
# shellcheck disable=SC2086
timeout 240 "$PYTHON" benchmarks/bench_cuda.py ${BENCH_ARGS:---quick} --json "$OUT_DIR/bench_cuda.json" 2>&1 |
  tee "$OUT_DIR/bench_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log "done, status $status; results in $OUT_DIR"
exit $status
