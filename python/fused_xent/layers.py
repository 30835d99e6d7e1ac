"""Keras layers around ``fused_xent.linear_cross_entropy``: an output head that
owns the projection and returns the per-token loss, never the N x V logits.

``LinearCrossEntropy(vocab_size)`` owns an H x V kernel (and optional bias):

    loss = head(hidden, labels)   # per-token loss; adds its mean to the model's losses
    logits = head(hidden)         # inference: the logits (or head.top_k(hidden, k))

``TiedEmbedding(vocab_size, dim)`` is a ``keras.layers.Embedding`` whose matrix
doubles as the output projection (tied input and output embeddings):

    x = embed(tokens)                              # the embedding lookup
    loss = embed(hidden, labels, reverse=True)     # fused head on the same V x H matrix

With ``add_loss=True`` (the default) the head adds the mean loss over the
tokens that count (not ``ignore_index``) to the model's losses, so a model
built as ``keras.Model([tokens, labels], loss)`` trains with
``model.compile(optimizer)`` and ``model.fit([tokens, labels])``: no Keras loss,
no ``y``. docs/linear_head.md shows both layers in a model.

They run on Keras's TensorFlow backend (``fused_xent.linear_cross_entropy``) and its JAX
backend (``fused_xent.jax.linear_cross_entropy``, which also runs sharded: a ``LayoutMap``
may split the kernel over the vocabulary, docs/distributed.md#the-linear-head).
"""

try:
    import keras
except ImportError as error:  # pragma: no cover
    raise ImportError(f"fused_xent.layers needs Keras: {error}") from None

from fused_xent import _checks, _registration
from fused_xent._keras.backend_check import BACKEND, require_backend

__all__ = ["LinearCrossEntropy", "TiedEmbedding"]

_BACKENDS = ("tensorflow", "jax")


def _head():
    """linear_cross_entropy of Keras's backend."""
    if BACKEND == "jax":
        from fused_xent.jax import linear_cross_entropy
    else:
        from fused_xent._tf.linear import linear_cross_entropy
    return linear_cross_entropy


def _loss_options(ignore_index, label_smoothing, class_weights, z_loss, chunk_size, softcap):
    return {
        "softcap": _checks.keras_softcap(softcap, from_logits=True),
        "ignore_index": _checks.keras_ignore_class(ignore_index, name="ignore_index"),
        "label_smoothing": _checks.keras_fraction("label_smoothing", label_smoothing),
        "class_weights": _checks.keras_class_weights(class_weights),
        "z_loss": _checks.keras_z_loss(z_loss),
        "chunk_size": _checks.chunk_size(chunk_size),
    }


def _mean_loss(loss, labels, ignore_index):
    """Mean over the tokens that count, 0 where none does. (Keras's trainer divides added
    losses by the number of replicas itself, and multiplies the reported loss back.)"""
    ops = keras.ops
    if ignore_index is None:
        return ops.mean(loss)
    counted = ops.cast(ops.not_equal(labels, ignore_index), loss.dtype)
    return ops.sum(loss) / ops.maximum(ops.sum(counted), 1.0)


class _FusedHead:
    """What both layers share: options, the loss call and inference helpers."""

    def _init_head(self, ignore_index, label_smoothing, class_weights, z_loss, chunk_size, add_loss, softcap):
        self._options = _loss_options(ignore_index, label_smoothing, class_weights, z_loss, chunk_size, softcap)
        self.add_loss_to_model = bool(add_loss)

    def _head_config(self):
        return dict(self._options, add_loss=self.add_loss_to_model)

    def _token_loss(self, hidden, weight, labels, bias, transpose_weight):
        labels = keras.ops.convert_to_tensor(labels)
        if keras.backend.standardize_dtype(labels.dtype) not in ("int32", "int64"):
            labels = keras.ops.cast(labels, "int32")
        loss = _head()(hidden, weight, labels, bias=bias, transpose_weight=transpose_weight, **self._options)
        if self.add_loss_to_model:
            self.add_loss(_mean_loss(loss, labels, self._options["ignore_index"]))
        return loss

    def _capped(self, logits):
        """The logits as the loss reads them: softcap * tanh(logits / softcap) with a softcap."""
        cap = self._options["softcap"]
        return logits if cap is None else keras.ops.multiply(cap, keras.ops.tanh(logits / cap))

    def top_k(self, hidden, k=1):
        """(values, indices) of the k largest logits per token: for generation and accuracy."""
        return keras.ops.top_k(self.logits(hidden), k=k)


@keras.saving.register_keras_serializable(package="fused_xent")
class LinearCrossEntropy(_FusedHead, keras.layers.Layer):
    """Output projection (H x V kernel, optional bias) fused with softmax cross-entropy.

    ``call(hidden, labels)`` returns the per-token loss, shaped like ``labels``,
    and (``add_loss=True``) adds its mean over counted tokens to the model's
    losses; ``call(hidden)`` returns the logits. Options as in
    ``fused_xent.linear_cross_entropy``. Under a mixed-precision policy the
    kernel is kept in float32 and used in the compute dtype; the loss is float32.
    """

    def __init__(
        self,
        vocab_size,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        ignore_index=None,
        label_smoothing=0.0,
        class_weights=None,
        z_loss=0.0,
        chunk_size=None,
        add_loss=True,
        softcap=None,
        **kwargs,
    ):
        require_backend(type(self).__name__, "layers", _BACKENDS)
        super().__init__(**kwargs)
        self.vocab_size = _checks.keras_positive_integer("vocab_size", vocab_size)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self._init_head(ignore_index, label_smoothing, class_weights, z_loss, chunk_size, add_loss, softcap)

    def build(self, hidden_shape, labels_shape=None):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(hidden_shape[-1], self.vocab_size),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.vocab_size,), initializer=self.bias_initializer)

    def call(self, hidden, labels=None):
        if labels is None:
            return self.logits(hidden)
        hidden = keras.ops.convert_to_tensor(hidden, self.compute_dtype)
        bias = None if self.bias is None else keras.ops.cast(self.bias, hidden.dtype)
        return self._token_loss(hidden, keras.ops.cast(self.kernel, hidden.dtype), labels, bias, False)

    def logits(self, hidden):
        """hidden @ kernel (+ bias): the full logits, for inference."""
        hidden = keras.ops.convert_to_tensor(hidden, self.compute_dtype)
        logits = keras.ops.matmul(hidden, keras.ops.cast(self.kernel, hidden.dtype))
        return self._capped(logits if self.bias is None else logits + keras.ops.cast(self.bias, hidden.dtype))

    def compute_output_spec(self, hidden, labels=None):
        if labels is None:
            return keras.KerasTensor(tuple(hidden.shape[:-1]) + (self.vocab_size,), dtype=self.compute_dtype)
        return keras.KerasTensor(tuple(labels.shape), dtype=_loss_dtype(self.compute_dtype))

    def get_config(self):
        return dict(
            super().get_config(),
            vocab_size=self.vocab_size,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            **self._head_config(),
        )


@keras.saving.register_keras_serializable(package="fused_xent")
class TiedEmbedding(_FusedHead, keras.layers.Embedding):
    """A ``keras.layers.Embedding`` whose V x H matrix is also the fused output head.

    ``call(tokens)`` looks up embeddings; ``call(hidden, labels, reverse=True)``
    returns the per-token loss of ``hidden @ embeddings^T`` (and adds its mean
    with ``add_loss=True``); ``call(hidden, reverse=True)`` returns the logits.
    One layer, one variable: tying survives saving and loading.
    """

    def __init__(
        self,
        input_dim,
        output_dim,
        ignore_index=None,
        label_smoothing=0.0,
        class_weights=None,
        z_loss=0.0,
        chunk_size=None,
        add_loss=True,
        softcap=None,
        **kwargs,
    ):
        require_backend(type(self).__name__, "layers", _BACKENDS)
        super().__init__(input_dim, output_dim, **kwargs)
        self._init_head(ignore_index, label_smoothing, class_weights, z_loss, chunk_size, add_loss, softcap)

    def call(self, inputs, labels=None, reverse=False):
        if not reverse:
            if labels is not None:
                raise ValueError("TiedEmbedding: labels are only used with reverse=True (the output head)")
            return super().call(inputs)
        if labels is None:
            return self.logits(inputs)
        hidden = keras.ops.convert_to_tensor(inputs, self.compute_dtype)
        return self._token_loss(hidden, keras.ops.cast(self.embeddings, hidden.dtype), labels, None, True)

    def logits(self, hidden):
        hidden = keras.ops.convert_to_tensor(hidden, self.compute_dtype)
        return self._capped(
            keras.ops.matmul(hidden, keras.ops.transpose(keras.ops.cast(self.embeddings, hidden.dtype)))
        )

    def compute_output_spec(self, inputs, labels=None, reverse=False):
        if not reverse:
            return super().compute_output_spec(inputs)
        if labels is None:
            return keras.KerasTensor(tuple(inputs.shape[:-1]) + (self.input_dim,), dtype=self.compute_dtype)
        return keras.KerasTensor(tuple(labels.shape), dtype=_loss_dtype(self.compute_dtype))

    def get_config(self):
        return dict(super().get_config(), **self._head_config())


def _loss_dtype(compute_dtype):
    return "float32" if compute_dtype in ("float16", "bfloat16") else compute_dtype


_registration.register(finishing=__name__)  # this module may have been the first import of a framework
