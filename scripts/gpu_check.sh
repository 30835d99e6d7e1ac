#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU, PyTorch, CuPy, JAX, nvcc,
# CMake and pybind11 (no TensorFlow, no network needed): builds the core, the
# CUDA kernels and the XLA FFI handlers (FFI header from JAX) without
# TensorFlow, then
#   1. tests/cuda/test_cuda.py (the kernels through PyTorch/CuPy);
#   2. tests/jax (the CUDA FFI handlers registered in JAX, fused_xent.jax, and
#      the no-logits-copy checks on the GPU's HLO) with FUSED_XENT_JAX_PLATFORM=cuda;
#   3. fused_xent.jax and fused_xent.torch on the GPU against their CPU results;
#   4. scripts/keras_jax_train.py: Keras on the JAX backend trains with our
#      CategoricalCrossentropy and SparseCategoricalCrossentropy like with Keras's;
#   5. benchmarks/bench_jax_step.py: JAX jit(grad) with non-donated logits
#      against the copy floor (>= 85% at 8192x32000 and 4096x128256, >= 50% at
#      8x262144, float32 and bfloat16);
#   6. benchmarks/bench_keras_lm_head.py: Keras-on-JAX LM head 8192 x 1024 x
#      128256, ours against Keras's loss, float32 and mixed_bfloat16 (faster,
#      lower peak memory);
#   7. benchmarks/bench_cuda.py --quick --check: PyTorch CUDA forward + backward
#      against the floor (same shapes and targets as 5).
# Each step's log and JSON go to $OUT (at most 8 files come back from the
# device tool: logs.tar.gz holds the logs, results.json every figure); a
# summary table at the end says which targets were met. Exits 1 when a test
# fails or a target is missed. Meant to finish in under 8 minutes.
#
#   OUT=/tmp/gpu-results scripts/gpu_check.sh
# Environment: PYTHON (default python3), CUDA_ARCHS (default native),
# BUILD_DIR (default /tmp/fused-xent-gpu-build), GPU_CHECK_QUICK=1 (tiny
# benchmark shapes and no targets: to try the script on a machine without a
# GPU, where the CUDA tests skip). Keras, if the Python lacks it,
# is installed from wheels in .whl/ (keras, namex, optree: see
# docs/development.md#the-gpu-check) into a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-$(mktemp -d /tmp/fused-xent-gpu-check.XXXXXX)}
BUILD=${BUILD_DIR:-/tmp/fused-xent-gpu-build}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
# JAX allocates on demand: several processes share the GPU (pytest and its Keras
# subprocess, one process per LM-head configuration).
export XLA_PYTHON_CLIENT_PREALLOCATE=false
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

# The package as it would be installed: the Python files (subpackages included) next to the built module.
stage="$BUILD/stage"
rm -rf "$stage" && mkdir -p "$stage"
(cd python && find fused_xent \( -name '*.py' -o -name '*.pyi' -o -name py.typed \) -print0 |
  xargs -0 -I{} install -D -m 644 {} "$stage/{}")
cp "$BUILD"/_core*.so "$stage/fused_xent/"
export PYTHONPATH="$stage:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import fused_xent; print(fused_xent.build_info()); from fused_xent import cuda; print("CUDA usable:", cuda.is_available())'

# Keras (for steps 2, 4 and 6): the Python's own, else wheels carried in .whl/.
if ! "$PYTHON" -c 'import keras' > /dev/null 2>&1; then
  if ls .whl/*.whl > /dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fused-xent-site \
      .whl/*.whl > "$OUT_DIR/keras_install.log" 2>&1 || tail -5 "$OUT_DIR/keras_install.log"
    export PYTHONPATH="$PYTHONPATH:/tmp/fused-xent-site"
  fi
fi
KERAS_BACKEND=jax "$PYTHON" -c 'import keras; print("keras", keras.__version__, keras.backend.backend())' ||
  echo "keras: not importable; the Keras steps will fail"

# GPU_CHECK_STEPS=a,b runs only those steps (after the build): cuda, jax, frameworks, keras,
# jax_step, lm_head, bench_cuda. Default: all.
want() { [ -z "${GPU_CHECK_STEPS:-}" ] || [[ ",$GPU_CHECK_STEPS," == *",$1,"* ]]; }
quick=()
if [ -n "${GPU_CHECK_QUICK:-}" ]; then quick=(--quick); fi

if want cuda; then
log "tests/cuda/test_cuda.py"
timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/cuda/test_cuda.py \
  --junitxml="$OUT_DIR/test_cuda.xml" 2>&1 | tee "$OUT_DIR/test_cuda.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want jax; then
log "tests/jax on CUDA (the FFI handlers under jax.jit, fused_xent.jax, no logits copy in the GPU's HLO)"
FUSED_XENT_JAX_PLATFORM=cuda timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/jax \
  --junitxml="$OUT_DIR/test_jax.xml" 2>&1 | tee "$OUT_DIR/test_jax.log" | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want frameworks; then
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
fi

if want keras; then
log "Keras on the JAX backend: training with our CategoricalCrossentropy and SparseCategoricalCrossentropy"
KERAS_BACKEND=jax timeout 150 "$PYTHON" scripts/keras_jax_train.py 2>&1 | tee "$OUT_DIR/keras_jax_train.log" |
  grep -v '^RESULT'
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want jax_step; then
log "benchmarks/bench_jax_step.py: jit(grad), logits not donated, against the copy floor"
timeout 180 "$PYTHON" benchmarks/bench_jax_step.py "${quick[@]}" --json "$OUT_DIR/bench_jax_step.json" 2>&1 |
  tee "$OUT_DIR/bench_jax_step.log" | grep -v '^RESULT'
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want lm_head; then
log "benchmarks/bench_keras_lm_head.py: Keras-on-JAX LM head, ours against Keras's loss"
timeout 240 "$PYTHON" benchmarks/bench_keras_lm_head.py "${quick[@]}" --json "$OUT_DIR/bench_keras_lm_head.json" 2>&1 |
  tee "$OUT_DIR/bench_keras_lm_head.log" | grep -v '^RESULT'
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want bench_cuda; then
log "benchmarks/bench_cuda.py --quick --check: PyTorch CUDA forward + backward against the floor"
timeout 150 "$PYTHON" benchmarks/bench_cuda.py --quick --check --no-compile --json "$OUT_DIR/bench_cuda.json" 2>&1 |
  tee "$OUT_DIR/bench_cuda.log" | grep -v '^RESULT'
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

log "summary"
"$PYTHON" - "$OUT_DIR" <<'PY' 2>&1 | tee "$OUT_DIR/summary.txt"
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
rows = []
step = load("bench_jax_step.json")
for r in (step or {}).get("results", []):
    target = {(8192, 32000): 0.85, (4096, 128256): 0.85, (8, 262144): 0.50}.get((r["N"], r["C"]))
    rows.append((f"JAX jit(grad) {r['dtype']} {r['N']}x{r['C']}", f"{r['step_ms']:.3f} ms",
                 f"{r['fraction_of_floor']:.0%} of floor", target and f">= {target:.0%}",
                 target is None or r["fraction_of_floor"] >= target))
bench = load("bench_cuda.json")
for r in (bench or {}).get("results", []):
    target = {(8192, 32000): 0.85, (4096, 128256): 0.85, (8, 262144): 0.50}.get((r["N"], r["C"]))
    rows.append((f"PyTorch CUDA fwd+bwd {r['dtype']} {r['N']}x{r['C']}", f"{r['fused_ms']:.3f} ms",
                 f"{r['fraction_of_floor']:.0%} of floor", target and f">= {target:.0%}",
                 target is None or r["fraction_of_floor"] >= target))
lm = load("bench_keras_lm_head.json")
by = {(r["policy"], r["loss"]): r for r in (lm or {}).get("results", []) if "error" not in r}
for policy in ("float32", "mixed_bfloat16"):
    ours, theirs = by.get((policy, "ours")), by.get((policy, "keras"))
    if ours and theirs:
        rows.append((f"Keras LM head {policy} step", f"{ours['step_ms']:.1f} vs {theirs['step_ms']:.1f} ms",
                     f"{theirs['step_ms'] / ours['step_ms']:.2f}x", "ours faster", ours["step_ms"] < theirs["step_ms"]))
        po, pk = ours.get("peak_bytes"), theirs.get("peak_bytes")
        rows.append((f"Keras LM head {policy} peak", f"{(po or 0) / 2**30:.2f} vs {(pk or 0) / 2**30:.2f} GiB",
                     "", "ours lower", po is not None and pk is not None and po < pk))
    else:
        rows.append((f"Keras LM head {policy}", "did not run", "", "", False))
if step is None:
    rows.append(("JAX jit(grad)", "did not run", "", "", False))
if bench is None:
    rows.append(("PyTorch CUDA fwd+bwd", "did not run", "", "", False))
width = max(len(r[0]) for r in rows)
for name, value, ratio, target, ok in rows:
    print(f"{name:<{width}}  {value:>22}  {ratio:>14}  {target or '':>12}  {'ok' if ok else 'MISSED'}")
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(dict(bench_jax_step=step, bench_cuda=bench, bench_keras_lm_head=lm), f, indent=1)
PY

# At most 8 files come back from the device tool: the logs go into one archive.
(cd "$OUT_DIR" && tar czf logs.tar.gz --remove-files -- *.log *.xml 2> /dev/null || true)
log "done in $((SECONDS - started)) s, status $status; results in $OUT_DIR"
exit $status
