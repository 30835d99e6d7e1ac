"""The XLA FFI handlers outside TensorFlow: the PyCapsules of
fused_xent._core.ffi_targets() registered in JAX and called with jax.ffi.ffi_call
under jax.jit, against the float64 reference; on the CPU also bitwise against
fused_xent.numpy (the same kernels), and bad input raising with its name.

scripts/gpu_check.sh runs this file with FUSED_XENT_JAX_PLATFORM=cuda on a GPU.
"""

import os

import numpy as np
import pytest

from tests._support import reference
from tests._support.assertions import ToleranceError, assert_rows_close, dense_target_terms, target_terms
from tests._support.framework_cases import (
    DTYPES,
    SPARSE_OPTIONS,
    WEIGHTS,
    C,
    dense_case,
    f64,
    logits,
    rows,
    sparse_case,
)

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # lse is float64
import jax.numpy as jnp  # noqa: E402

import fused_xent  # noqa: E402
from fused_xent import _core  # noqa: E402

PLATFORM = os.environ.get("FUSED_XENT_JAX_PLATFORM", "cpu")
TARGETS = _core.ffi_targets().get(PLATFORM)
if not TARGETS:
    pytest.skip(f"this build has no XLA FFI handlers for {PLATFORM}", allow_module_level=True)
try:
    DEVICE = jax.devices("gpu" if PLATFORM == "cuda" else "cpu")[0]
except RuntimeError:
    pytest.skip(f"JAX has no {PLATFORM} device here", allow_module_level=True)
for _name, _capsule in TARGETS.items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA" if PLATFORM == "cuda" else "cpu")


def workspace(kind, shape, axis, dtype):
    """The targets' last result (cc/ffi/handlers.h): scratch bytes for the CUDA kernels."""
    axis %= len(shape)
    outer, inner = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1 :]))
    size = _core.workspace_bytes(kind, outer, shape[axis], inner, np.dtype(dtype).itemsize)
    return jax.ShapeDtypeStruct((size,), jnp.uint8)


def _attrs(axis, label_smoothing=0.0, z_loss=0.0, ignore_index=None, softcap=0.0):
    attrs = dict(
        axis=np.int64(axis),
        label_smoothing=np.float32(label_smoothing),
        z_loss=np.float32(z_loss),
        softcap=np.float32(softcap),
    )
    return attrs, ignore_index


def _sparse_attrs(axis, label_smoothing=0.0, z_loss=0.0, ignore_index=None):
    attrs, _ = _attrs(axis, label_smoothing, z_loss)
    attrs.update(
        ignore_index=np.int64(0 if ignore_index is None else ignore_index), has_ignore_index=ignore_index is not None
    )
    return attrs


def sparse_call(logits, labels, grad_loss, class_weights=None, axis=-1, **options):
    """(loss, lse, grad_logits) from the two sparse targets, in one jitted function."""
    weights = jnp.zeros([0], jnp.float32) if class_weights is None else jnp.asarray(class_weights)
    attrs = _sparse_attrs(axis, **options)
    row_shape = rows(logits.shape, axis)

    @jax.jit
    def run(z, y, w, g):
        loss, lse, _ = jax.ffi.ffi_call(
            "fused_xent_sparse_forward",
            (
                jax.ShapeDtypeStruct(row_shape, z.dtype),
                jax.ShapeDtypeStruct(row_shape, jnp.float64),
                workspace("sparse_forward", z.shape, axis, z.dtype),
            ),
        )(z, y, w, **attrs)
        grad, _ = jax.ffi.ffi_call(
            "fused_xent_sparse_backward",
            (jax.ShapeDtypeStruct(z.shape, z.dtype), workspace("sparse_backward", z.shape, axis, z.dtype)),
        )(z, y, w, lse, g, **attrs)
        return loss, lse, grad

    put = lambda a: jax.device_put(a, DEVICE)  # noqa: E731
    return [np.array(r) for r in run(put(logits), put(labels), put(weights), put(grad_loss))]


def dense_call(logits, labels, grad_loss, axis=-1, label_smoothing=0.0, z_loss=0.0):
    attrs, _ = _attrs(axis, label_smoothing, z_loss)
    row_shape = rows(logits.shape, axis)

    @jax.jit
    def run(z, t, g):
        loss, lse, _ = jax.ffi.ffi_call(
            "fused_xent_dense_forward",
            (
                jax.ShapeDtypeStruct(row_shape, z.dtype),
                jax.ShapeDtypeStruct(row_shape, jnp.float64),
                workspace("dense_forward", z.shape, axis, z.dtype),
            ),
        )(z, t, **attrs)
        grad, _ = jax.ffi.ffi_call(
            "fused_xent_dense_backward",
            (jax.ShapeDtypeStruct(z.shape, z.dtype), workspace("dense_backward", z.shape, axis, z.dtype)),
        )(z, t, lse, g, **attrs)
        return loss, lse, grad

    put = lambda a: jax.device_put(a, DEVICE)  # noqa: E731
    return [np.array(r) for r in run(put(logits), put(labels), put(grad_loss))]


@pytest.mark.parametrize("options", SPARSE_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("axis", [-1, 1])
def test_sparse_targets_match_reference(dtype, options, axis):
    shape, z, labels, g = sparse_case(dtype, options, axis)
    loss, lse, grad = sparse_call(z, labels, g, axis=axis, **options)
    ref_loss, ref_grad = reference.sparse(labels, f64(z), axis=axis, grad_loss=f64(g), **options)
    assert_rows_close(loss, ref_loss, dtype, axis=None, what="loss")
    terms = target_terms(labels, shape, axis, grad_loss=f64(g), **options)
    assert_rows_close(grad, ref_grad, dtype, axis=axis, terms=terms, what="gradient")
    # lse is float64, from float32 sums for the narrower dtypes.
    ref_lse = reference._lse(np.moveaxis(f64(z), axis, -1))
    assert_rows_close(lse, ref_lse, "float64" if dtype == "float64" else "float32", axis=None, what="lse")
    if PLATFORM == "cpu":  # the same CPU kernels as the NumPy module: the same bits
        np_options = {k: v for k, v in options.items()}
        np_loss, np_grad = fused_xent.numpy.sparse_softmax_cross_entropy_with_logits(
            labels, z, axis=axis, grad_loss=g, **np_options
        )
        np.testing.assert_array_equal(loss, np_loss)
        np.testing.assert_array_equal(grad, np_grad)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("axis", [-1, 0])
def test_dense_targets_match_reference(dtype, axis):
    shape, z, t, g = dense_case(dtype, axis)
    loss, _, grad = dense_call(z, t, g, axis=axis, label_smoothing=0.125, z_loss=0.0625)
    ref_loss, ref_grad, _ = reference.dense(
        f64(t), f64(z), axis=axis, grad_loss=f64(g), label_smoothing=0.125, z_loss=0.0625
    )
    assert_rows_close(loss, ref_loss, dtype, axis=None, what="loss")
    terms = dense_target_terms(f64(t), shape, axis, label_smoothing=0.125, grad_loss=f64(g))
    assert_rows_close(grad, ref_grad, dtype, axis=axis, terms=terms, what="gradient")


def test_planted_error_is_caught():
    """The comparison above can fail: the smallest gradient entry off by 1% is rejected
    (an absolute tolerance of a few 1e-6 would let it be 0)."""
    z = logits((4, C), "float32")
    labels = np.array([0, 1, 2, 3])
    _, _, grad = sparse_call(z, labels, np.ones(4, np.float32))
    _, ref_grad = reference.sparse(labels, f64(z))
    terms = target_terms(labels, z.shape)
    assert_rows_close(grad, ref_grad, "float32", terms=terms)
    smallest = np.unravel_index(np.argmin(np.abs(ref_grad)), ref_grad.shape)
    assert 0 < abs(ref_grad[smallest]) < 1e-4
    grad[smallest] *= np.float32(1.01)
    with pytest.raises(ToleranceError):
        assert_rows_close(grad, ref_grad, "float32", terms=terms)


@pytest.mark.skipif(PLATFORM != "cpu", reason="CUDA handlers give NaN rows for bad labels (no host check)")
def test_out_of_range_label_raises():
    z = logits((4, C), "float32")
    with pytest.raises(Exception, match=r"label value of 9 which is outside the valid range of \[0, 7\)"):
        sparse_call(z, np.array([0, 9, 2, 3]), np.ones(4, np.float32))


@pytest.mark.skipif(PLATFORM != "cpu", reason="CUDA handlers cannot read class weights in device memory")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -2.0])
def test_bad_class_weight_values_raise(bad):
    z = logits((4, C), "float32")
    weights = WEIGHTS.copy()
    weights[3] = bad
    with pytest.raises(Exception, match=r"class_weights must be finite and >= 0, got .* for class 3"):
        sparse_call(z, np.array([0, 1, 2, 3]), np.ones(4, np.float32), class_weights=weights)


def _forward(name, outputs, *operands, **attrs):
    return jax.jit(lambda *a: jax.ffi.ffi_call(name, outputs)(*a, **attrs))(*operands)


@pytest.mark.parametrize(
    "case, message",
    [
        ("labels_shape", "labels must have the shape of logits without the class axis \\[4\\], got \\[5\\]"),
        ("labels_dtype", "labels must be int32 or int64"),
        ("weights", "class_weights must be a float32 vector of 7 weights"),
        ("axis", "axis 2 is out of range for logits of shape \\[4, 7\\]"),
        ("smoothing", "label_smoothing must lie in \\[0, 1\\]"),
        ("loss_shape", "loss must have the shape of logits without the class axis"),
        (
            "workspace",
            r"workspace must have at least 10240 bytes for this shape \(fused_xent._core.workspace_bytes\), got 10239",
        ),
    ],
)
def test_bad_operands_raise_naming_them(case, message):
    """A JAX user may call the targets with anything: every mismatch is an error, not a wrong read."""
    z = jnp.asarray(logits((4, C), "float32"))
    labels = jnp.asarray([0, 1, 2, 3], jnp.int32)
    weights = jnp.zeros([0], jnp.float32)
    attrs = _sparse_attrs(-1)
    rows = 4
    space = workspace("sparse_forward", z.shape, -1, z.dtype)
    if case == "labels_shape":
        labels = jnp.asarray([0, 1, 2, 3, 4], jnp.int32)
    elif case == "labels_dtype":
        labels = labels.astype(jnp.float32)
    elif case == "weights":
        weights = jnp.ones([3], jnp.float32)
    elif case == "axis":
        attrs["axis"] = np.int64(2)
    elif case == "smoothing":
        attrs["label_smoothing"] = np.float32(1.5)
    elif case == "loss_shape":
        rows = 3
    elif case == "workspace":  # rows split across blocks keep partial sums there: one byte short
        z = jnp.zeros((4, 262144), jnp.float32)
        space = jax.ShapeDtypeStruct((workspace("sparse_forward", z.shape, -1, z.dtype).shape[0] - 1,), jnp.uint8)
    outputs = (jax.ShapeDtypeStruct((rows,), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.float64), space)
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(_forward("fused_xent_sparse_forward", outputs, z, labels, weights, **attrs))


def test_workspace_sizes():
    """The workspace depends on the shape alone: partial sums of rows split across blocks
    (few long rows), the dense backward's label sums; nothing for the sparse backward."""
    size = _core.workspace_bytes
    assert size("sparse_backward", 8, 262144, 1, 4) == 0
    assert size("sparse_forward", 4096, 32000, 1, 4) == 0  # enough rows: no row is split
    assert size("dense_backward", 4096, 32000, 1, 4) == 4096 * 4
    split = size("sparse_forward", 8, 262144, 1, 4)
    assert split > 0 and split % (8 * 40) == 0  # a RowSums<float> (40 bytes) per chunk
    assert split == size("dense_forward", 8, 262144, 1, 4)
    assert size("sparse_forward", 8, 262144, 1, 8) > 0 and size("sparse_forward", 0, 262144, 1, 4) == 0
    with pytest.raises(ValueError, match="kind must be"):
        size("forward", 1, 2, 1, 4)
