"""The linear head pairs each hidden row with its own label whatever is known when a graph is
built: shapes known only at run time are checked at run time (flattening them would silently pair
rows with the wrong labels, or drop some), and calls with varying row counts share a bounded set
of traced functions."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import fused_xent  # noqa: E402
from fused_xent._tf import linear as linear_impl  # noqa: E402

H, V = 4, 6
WEIGHT = tf.constant(np.random.default_rng(0).normal(size=(H, V)).astype(np.float32))
MESSAGE = "labels must have the shape of hidden without its last axis"


def _traced(hidden_shape, label_shape, jit_compile=False):
    @tf.function(
        input_signature=[tf.TensorSpec(hidden_shape, tf.float32), tf.TensorSpec(label_shape, tf.int32)],
        jit_compile=jit_compile,
    )
    def loss(hidden, labels):
        return fused_xent.linear_cross_entropy(hidden, WEIGHT, labels)

    return loss


@pytest.mark.parametrize(
    "hidden, labels",
    [((5, H), (9,)), ((5, H), (3,)), ((5, 2, H), (2, 5)), ((5, 2, H), (10,)), ((6, H), (2, 3))],
    ids=["more-labels", "fewer-labels", "transposed", "flat-labels", "reshaped-labels"],
)
def test_rows_and_labels_that_do_not_match_raise_at_run_time(hidden, labels):
    """Same ranks: only the run time can tell; other ranks: the trace already does (ValueError)."""
    unknown_hidden = [None] * (len(hidden) - 1) + [H]
    function = _traced(unknown_hidden, [None] * len(labels))
    error = tf.errors.InvalidArgumentError if len(labels) == len(hidden) - 1 else ValueError
    with pytest.raises(error, match=MESSAGE):
        function(tf.zeros(hidden), tf.zeros(labels, tf.int32))


def test_matching_shapes_known_at_run_time_give_the_eager_values():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(5, 2, H)).astype(np.float32)
    labels = rng.integers(0, V, size=(5, 2)).astype(np.int32)
    traced = _traced([None, None, H], [None, None])(hidden, labels)
    eager = fused_xent.linear_cross_entropy(hidden, WEIGHT, labels)
    np.testing.assert_array_equal(traced.numpy(), eager.numpy())
    logits = np.einsum("nth,hv->ntv", hidden.astype(np.float64), WEIGHT.numpy().astype(np.float64))
    lse = np.log(np.exp(logits).sum(-1))
    expected = lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(eager.numpy(), expected, rtol=1e-5)


def test_varying_row_counts_share_few_traced_functions():
    linear_impl._FUNCTIONS.clear()
    weight = tf.constant(np.random.default_rng(2).normal(size=(8, 4096)).astype(np.float32))
    for rows in range(40, 2040, 40):  # 50 row counts
        fused_xent.linear_cross_entropy(tf.zeros([rows, 8]), weight, tf.zeros([rows], tf.int32))
    chunks = {key[1][2] for key in linear_impl._FUNCTIONS}
    assert len(chunks) <= 4, sorted(chunks)  # powers of two from 16 to 128
    assert len(linear_impl._FUNCTIONS) <= linear_impl._MAX_FUNCTIONS


def test_the_function_cache_is_bounded():
    linear_impl._FUNCTIONS.clear()
    weight = tf.zeros([8, 64])
    for chunk in range(16, 16 + 2 * linear_impl._MAX_FUNCTIONS):
        fused_xent.linear_cross_entropy(tf.zeros([32, 8]), weight, tf.zeros([32], tf.int32), chunk_size=chunk)
    assert len(linear_impl._FUNCTIONS) == linear_impl._MAX_FUNCTIONS
