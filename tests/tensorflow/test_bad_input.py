"""Bad input gets a clear Python exception, never a crash."""

import numpy as np
import pytest

from tests._support.runners import tf_or_skip

tf = tf_or_skip()
import fused_xent  # noqa: E402

sparse = fused_xent.sparse_softmax_cross_entropy_with_logits
dense = fused_xent.softmax_cross_entropy_with_logits
LOGITS = tf.random.stateless_normal([4, 5], seed=[0, 1])


@pytest.mark.parametrize("bad", [5, 7, -1, 2**40])
def test_out_of_range_label_eager(bad):
    labels = tf.constant([0, 1, bad, 2], tf.int64)
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"label value of {bad} .*valid range of \[0, 5\)"):
        sparse(labels, LOGITS)


def test_out_of_range_label_in_tf_function_and_gradient_only():
    @tf.function
    def gradient_only(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = sparse(y, x)
        return tape.gradient(loss, x)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"label value of 9"):
        gradient_only(LOGITS, tf.constant([0, 9, 1, 1]))

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 5])
        y = tf.compat.v1.placeholder(tf.int32, [None])
        grad = tf.gradients(sparse(y, x), x)[0]
        with tf.compat.v1.Session(graph=graph) as session:
            with pytest.raises(tf.errors.InvalidArgumentError, match=r"label value of -3"):
                session.run(grad, {x: np.zeros((2, 5)), y: [1, -3]})


@pytest.mark.parametrize("rows, classes", [(65536, 10), (4096, 700)])
def test_first_invalid_label_is_named_when_rows_are_split_across_threads(rows, classes):
    # Each shard of rows checks its own labels; the message must still name the first bad one.
    from fused_xent._tf.loader import load_op_library

    labels = np.zeros(rows, np.int64)
    labels[[rows // 3, rows // 2, rows - 1]] = [classes + 4, -2, classes]
    logits = tf.zeros([rows, classes])
    first = rf"label value of {classes + 4} "
    with pytest.raises(tf.errors.InvalidArgumentError, match=first):
        sparse(labels, logits)
    attrs = dict(axis=-1, label_smoothing=0.0, z_loss=0.0, ignore_index=0, has_ignore_index=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match=first):
        load_op_library().fused_xent_sparse_softmax_cross_entropy_grad(
            logits,
            labels,
            tf.zeros([0]),
            tf.zeros([rows], tf.float64),
            tf.ones([rows]),
            tf.zeros([0], tf.float64),
            **attrs,
        )


def test_ignore_index_outside_range_is_accepted_but_other_values_are_not():
    loss = sparse([0, -100, 4, -100], LOGITS, ignore_index=-100)
    assert loss.numpy()[1] == 0 and loss.numpy()[3] == 0
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"-99.*not ignore_index \(-100\)"):
        sparse([0, -99, 4, 1], LOGITS, ignore_index=-100)


def test_rank_and_batch_mismatch_at_trace_time():
    with pytest.raises(ValueError, match=r"labels.shape.rank"):
        sparse(tf.zeros([4, 1], tf.int32), LOGITS)
    with pytest.raises(ValueError, match=r"labels.shape"):
        sparse(tf.zeros([3], tf.int32), LOGITS)
    with pytest.raises(ValueError, match=r"broadcastable"):
        dense(tf.zeros([4, 4]), LOGITS)


def test_batch_mismatch_at_run_time_with_unknown_shapes():
    @tf.function(input_signature=[tf.TensorSpec([None, None]), tf.TensorSpec([None], tf.int32)])
    def f(x, y):
        return sparse(y, x)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels must have the shape"):
        f(LOGITS, tf.zeros([3], tf.int32))

    @tf.function(input_signature=[tf.TensorSpec(None), tf.TensorSpec(None)])
    def g(x, t):
        return dense(t, x)

    with pytest.raises(tf.errors.InvalidArgumentError):
        g(LOGITS, tf.zeros([4, 4]))


def test_zero_classes():
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=r"at least one class"):
        sparse([0, 0], tf.zeros([2, 0]))
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=r"at least one class"):
        dense(tf.zeros([2, 0]), tf.zeros([2, 0]))

    @tf.function(input_signature=[tf.TensorSpec([None, None])])
    def f(x):
        return sparse(tf.zeros([2], tf.int32), x)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"at least one class"):
        f(tf.zeros([2, 0]))


def test_scalar_and_integer_logits_and_float_labels():
    with pytest.raises(ValueError, match=r"scalar"):
        sparse(0, tf.constant(1.0))
    with pytest.raises(ValueError, match=r"scalar"):
        dense(1.0, tf.constant(1.0))
    with pytest.raises(TypeError, match=r"logits must be float16, bfloat16, float32 or float64, got int32"):
        sparse([0], tf.zeros([1, 3], tf.int32))
    with pytest.raises(TypeError, match=r"got int32"):
        dense(tf.zeros([1, 3], tf.int32), tf.zeros([1, 3], tf.int32))
    with pytest.raises(TypeError, match=r"labels must be int32 or int64 class indices, got float32"):
        sparse(tf.constant([0.0, 1.0, 1.0, 2.0]), LOGITS)


def test_class_weights_of_wrong_length_or_dtype():
    with pytest.raises(ValueError, match=r"class_weights has 3 entries but logits have 5 classes"):
        sparse([0, 1, 2, 3], LOGITS, class_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"vector"):
        sparse([0, 1, 2, 3], LOGITS, class_weights=[[1.0] * 5])
    with pytest.raises(TypeError, match=r"class_weights must be floating point, got int32"):
        sparse([0, 1, 2, 3], LOGITS, class_weights=tf.ones([5], tf.int32))
    with pytest.raises(TypeError, match=r"class_weights"):
        sparse([0, 1, 2, 3], LOGITS, class_weights=["a"] * 5)

    @tf.function(input_signature=[tf.TensorSpec([None])])
    def f(weights):
        return sparse([0, 1, 2, 3], LOGITS, class_weights=weights)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"class_weights must be a vector of 5 weights"):
        f(tf.ones([4]))


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.1", None])
def test_label_smoothing_outside_unit_interval(value):
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\]"):
        sparse([0, 1, 2, 3], LOGITS, label_smoothing=value)
    with pytest.raises(ValueError, match=r"label_smoothing"):
        dense(tf.ones([4, 5]) / 5, LOGITS, label_smoothing=value)


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_bad_z_loss(value):
    with pytest.raises(ValueError, match=r"z_loss must be a finite number >= 0"):
        sparse([0, 1, 2, 3], LOGITS, z_loss=value)


def test_bad_axis_and_ignore_index():
    with pytest.raises(ValueError, match=r"axis 2 is out of range"):
        sparse([0, 1, 2, 3], LOGITS, axis=2)
    with pytest.raises(ValueError, match=r"axis -3 is out of range"):
        dense(tf.ones([4, 5]), LOGITS, axis=-3)
    with pytest.raises(TypeError, match=r"ignore_index must be an integer"):
        sparse([0, 1, 2, 3], LOGITS, ignore_index=1.5)


def test_raw_op_attrs_are_checked_by_the_kernel():
    ops = fused_xent._tf.loader.load_op_library()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"label_smoothing must lie in \[0, 1\]"):
        ops.fused_xent_sparse_softmax_cross_entropy(LOGITS, [0, 1, 2, 3], tf.zeros([0]), label_smoothing=2.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"lse must have the shape"):
        ops.fused_xent_sparse_softmax_cross_entropy_grad(
            LOGITS, [0, 1, 2, 3], tf.zeros([0]), tf.zeros([3], tf.float64), tf.ones([4]), tf.zeros([0], tf.float64)
        )
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"grad_lse must be empty, got 2 elements: .*earlier fused-xent version.*re-export it",
    ):
        ops.fused_xent_sparse_softmax_cross_entropy_grad(
            LOGITS, [0, 1, 2, 3], tf.zeros([0]), tf.zeros([4], tf.float64), tf.ones([4]), tf.zeros([2], tf.float64)
        )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_class_weight_values_raise_eagerly(bad):
    weights = [1.0, 2.0, bad, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"class_weights must be finite and >= 0, got .* for class 2"):
        sparse([0, 1, 2, 3], LOGITS, class_weights=weights)
    with pytest.raises(ValueError, match=r"class_weights must be finite and >= 0"):
        sparse([0, 1, 2, 3], LOGITS, class_weights=np.array(weights, np.float32))
    with pytest.raises(ValueError, match=r"class_weights must be finite and >= 0"):
        tf.function(lambda z: sparse([0, 1, 2, 3], z, class_weights=tf.constant(weights)))(LOGITS)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_class_weight_values_raise_in_the_kernels(bad):
    weights = tf.constant([1.0, 2.0, bad, 1.0, 1.0])
    message = r"class_weights must be finite and >= 0, got .* for class 2"

    @tf.function(input_signature=[tf.TensorSpec([None])])
    def gradient_only(w):
        with tf.GradientTape() as tape:
            tape.watch(LOGITS)
            loss = sparse([0, 1, 2, 3], LOGITS, class_weights=w)
        return tape.gradient(loss, LOGITS)

    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        gradient_only(weights)
    ops = fused_xent._tf.loader.load_op_library()
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        ops.fused_xent_sparse_softmax_cross_entropy(LOGITS, [0, 1, 2, 3], weights)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        ops.fused_xent_sparse_softmax_cross_entropy_grad(
            LOGITS, [0, 1, 2, 3], weights, tf.zeros([4], tf.float64), tf.ones([4]), tf.zeros([0], tf.float64)
        )


def _ragged_and_sparse():
    ragged = tf.ragged.constant([[0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    return [(ragged, r"\.to_tensor\(\)"), (tf.sparse.from_dense(tf.ones([2, 5])), r"tf\.sparse\.to_dense")]


@pytest.mark.parametrize("case", [0, 1], ids=["ragged", "sparse"])
def test_ragged_and_sparse_tensors_are_refused_with_a_hint(case):
    value, hint = _ragged_and_sparse()[case]
    labels = tf.ragged.constant([[0, 1], [2]]) if case == 0 else tf.sparse.from_dense(tf.constant([[0, 1]]))
    logits = tf.ones([2, 5])
    with pytest.raises(TypeError, match=rf"logits .*{hint}"):
        sparse([0, 1], value)
    with pytest.raises(TypeError, match=rf"logits .*{hint}"):
        dense(tf.ones([2, 5]) / 5, value)
    with pytest.raises(TypeError, match=rf"labels .*{hint}"):
        dense(value, logits)
    with pytest.raises(TypeError, match=r"labels .*(to_tensor|to_dense)"):
        sparse(labels, tf.ones([2, 2, 5]))
