"""The ops in tf.function, TF1-style graphs with sessions, dynamic shapes; the
traced graph really holds the project's ops; results do not depend on threads."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests._support import reference
from tests._support.assertions import assert_close
from tests._support.runners import tf_or_skip

tf = tf_or_skip()
import fused_xent  # noqa: E402

TF_XENT_OPS = {"SparseSoftmaxCrossEntropyWithLogits", "SoftmaxCrossEntropyWithLogits"}


def _op_types(graph):
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():  # gradients of tf.function live in function defs
        types |= {node.op for node in function.definition.node_def}
    return types


def test_traced_training_step_uses_only_fused_ops():
    w = tf.Variable(tf.random.stateless_normal([8, 5], seed=[1, 1]))

    @tf.function
    def step(x, y, t):
        with tf.GradientTape() as tape:
            logits = x @ w
            loss = tf.reduce_mean(fused_xent.sparse_softmax_cross_entropy_with_logits(y, logits))
            loss += tf.reduce_mean(fused_xent.softmax_cross_entropy_with_logits(t, logits))
        return tape.gradient(loss, w)

    graph = step.get_concrete_function(
        tf.TensorSpec([None, 8]), tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 5])
    ).graph
    types = _op_types(graph)
    assert {
        "FusedXent>SparseSoftmaxCrossEntropy",
        "FusedXent>SparseSoftmaxCrossEntropyGrad",
        "FusedXent>SoftmaxCrossEntropy",
        "FusedXent>SoftmaxCrossEntropyGrad",
    } <= types
    assert not types & TF_XENT_OPS


def test_tf_function_with_dynamic_shapes_matches_eager():
    @tf.function(input_signature=[tf.TensorSpec(None), tf.TensorSpec(None, tf.int64)])
    def loss_and_grad(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = fused_xent.sparse_softmax_cross_entropy_with_logits(y, x, label_smoothing=0.1)
        return loss, tape.gradient(loss, x)

    for shape in [(3, 4), (2, 3, 7), (1, 2)]:
        x = tf.random.stateless_normal(shape, seed=[2, len(shape)])
        y = tf.zeros(shape[:-1], tf.int64) + 1
        with tf.GradientTape() as tape:
            tape.watch(x)
            eager = fused_xent.sparse_softmax_cross_entropy_with_logits(y, x, label_smoothing=0.1)
        eager_grad = tape.gradient(eager, x)
        traced, traced_grad = loss_and_grad(x, y)
        np.testing.assert_array_equal(traced, eager)
        np.testing.assert_array_equal(traced_grad, eager_grad)


def test_static_shapes_are_inferred():
    @tf.function
    def f(x, y, t):
        a = fused_xent.sparse_softmax_cross_entropy_with_logits(y, x, axis=1)
        b = fused_xent.softmax_cross_entropy_with_logits(t, x, axis=1)
        assert a.shape.as_list() == [None, 7], a.shape
        assert b.shape.as_list() == [None, 7], b.shape
        return a + b

    f.get_concrete_function(
        tf.TensorSpec([None, 5, 7]), tf.TensorSpec([None, 7], tf.int32), tf.TensorSpec([None, 5, 7])
    )


def test_tf1_graph_and_session():
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float64, [None, 6])
        y = tf.compat.v1.placeholder(tf.int64, [None])
        t = tf.compat.v1.placeholder(tf.float64, [None, 6])
        sparse = fused_xent.sparse_softmax_cross_entropy_with_logits(y, x, z_loss=0.01)
        dense = fused_xent.softmax_cross_entropy_with_logits(t, x)
        grads = tf.gradients(tf.reduce_sum(sparse) + tf.reduce_sum(dense), [x, t])
        hessian_vector = tf.gradients(tf.reduce_sum(grads[0] * x), x)[0]
        reference = tf.gradients(
            tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, x))
            + tf.reduce_sum(tf.nn.softmax_cross_entropy_with_logits(t, x)),
            x,
        )[0]
        feed = {
            x: np.random.default_rng(0).normal(size=(3, 6)),
            y: [0, 5, 2],
            t: np.full((3, 6), 1 / 6),
        }
        with tf.compat.v1.Session(graph=graph) as session:
            values = session.run([sparse, dense, grads, hessian_vector, reference], feed)
    sparse_value, dense_value, (grad_x, grad_t), hv, ref_grad = values
    _check_tf1_values(feed[x], feed[y], feed[t], sparse_value, dense_value, grad_t, hv)
    # With z_loss the gradient differs from tf.nn's by 2 z lse p: check the difference.
    lse = np.log(np.exp(feed[x]).sum(-1, keepdims=True))
    p = np.exp(feed[x] - lse)
    np.testing.assert_allclose(grad_x - ref_grad, 2 * float(np.float32(0.01)) * lse * p, rtol=1e-9, atol=1e-12)


def _check_tf1_values(x, y, t, sparse_value, dense_value, grad_t, hv, planted=1.0):
    """The session's values against reference.py's float64 formulas (float64 in, so 1e-12 of
    max(1, |value|): assert_close's float64 tolerance, 1e10 times below a 1% error). hv is the
    gradient of grad(x) . x with x held as the direction too: grad + H x."""
    z_loss = float(np.float32(0.01))  # the kernels' float32 attribute
    ref_sparse, ref_sparse_grad = reference.sparse(y, x, z_loss=z_loss)
    ref_dense, ref_dense_grad, ref_grad_t = reference.dense(t, x)
    _, sparse_hx = reference.sparse_hvp(y, x, x, power=1, z_loss=z_loss)
    _, dense_hx, _ = reference.dense_hvp(t, x, x, power=1)
    assert_close(sparse_value, ref_sparse, "float64")
    assert_close(dense_value, ref_dense, "float64")
    assert_close(grad_t, ref_grad_t, "float64")
    assert_close(hv * planted, ref_sparse_grad + ref_dense_grad + sparse_hx + dense_hx, "float64")


def test_tf1_reference_check_rejects_a_one_percent_error():
    rng = np.random.default_rng(0)
    x, y, t = rng.normal(size=(3, 6)), np.array([0, 5, 2]), np.full((3, 6), 1 / 6)
    z_loss = float(np.float32(0.01))
    sparse_value, sparse_grad = reference.sparse(y, x, z_loss=z_loss)
    dense_value, dense_grad, grad_t = reference.dense(t, x)
    hv = (
        sparse_grad
        + dense_grad
        + reference.sparse_hvp(y, x, x, power=1, z_loss=z_loss)[1]
        + reference.dense_hvp(t, x, x, power=1)[1]
    )
    _check_tf1_values(x, y, t, sparse_value, dense_value, grad_t, hv)
    with pytest.raises(AssertionError):
        _check_tf1_values(x, y, t, sparse_value, dense_value, grad_t, hv, planted=1.01)
    with pytest.raises(AssertionError):
        _check_tf1_values(x, y, t, sparse_value, dense_value, grad_t * 1.01, hv)


def test_keras_symbolic_style_use_inside_model():
    inputs = tf.keras.Input([4])
    logits = tf.keras.layers.Dense(3)(inputs)
    model = tf.keras.Model(inputs, logits)
    x = tf.random.stateless_normal([5, 4], seed=[3, 3])
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(fused_xent.sparse_softmax_cross_entropy_with_logits([0, 1, 2, 1, 0], model(x)))
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads)


_THREADS_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
    import fused_xent

    def run(y, x, t):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            a = fused_xent.sparse_softmax_cross_entropy_with_logits(y, x, label_smoothing=0.1, z_loss=1e-4)
            b = fused_xent.softmax_cross_entropy_with_logits(t, x)
        return [a, b, tape.gradient(a, x), tape.gradient(b, x)]

    out = {}
    for classes, rows in [(2, 4099), (10, 4099), (31, 4099), (32, 4099), (33, 4099), (1000, 515), (30011, 64)]:
        rng = np.random.default_rng(classes)
        x = tf.constant(rng.normal(size=(rows, classes)).astype(np.float32) * 4)
        y = tf.constant(rng.integers(0, classes, size=rows))
        t = tf.nn.softmax(tf.constant(rng.normal(size=(rows, classes)).astype(np.float32)))
        for mode, fn in [("eager", run), ("xla", tf.function(run, jit_compile=True))]:
            for i, v in enumerate(fn(y, x, t)):
                out[f"{classes}-{mode}-{i}"] = v.numpy()
    np.savez(sys.argv[2], **out)
    """
)


def test_results_do_not_depend_on_thread_count(tmp_path):
    """Bitwise, with and without XLA, for short rows (computed in groups of one
    vector's lanes), rows of one or a few vectors, and long rows."""
    script = tmp_path / "run.py"
    script.write_text(_THREADS_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    results = []
    for threads in (1, 2, 3):
        out = tmp_path / f"out{threads}.npz"
        subprocess.run([sys.executable, str(script), str(threads), str(out)], check=True, env=env, timeout=300)
        results.append(np.load(out))
    assert len(results[0].files) == 7 * 2 * 4
    for other in results[1:]:
        for key in results[0].files:
            np.testing.assert_array_equal(results[0][key], other[key], err_msg=key)
