"""Keras internals shared by the public Keras modules (``fused_xent.losses``, ``.metrics``,
``.layers``, ``.tf_keras``): kept arguments, the one reduction rule of every backend, and the
guard against tf_keras calling a Keras 3 object. Only Keras (never TensorFlow) is imported here;
the TensorFlow per-element functions live in ``fused_xent._tf.keras_elementwise``."""
