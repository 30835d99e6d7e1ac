"""fused-xent: softmax cross-entropy and its gradient in one fused C++ kernel.

TensorFlow functions mirroring ``tf.nn`` (``sparse_softmax_cross_entropy_with_logits``,
``softmax_cross_entropy_with_logits``), Keras losses in ``fused_xent.losses`` and
metrics in ``fused_xent.metrics``, the same for Keras 2 in ``fused_xent.tf_keras``, and
the same kernels on NumPy arrays in ``fused_xent.numpy`` (which works without
TensorFlow and never imports it), in JAX in ``fused_xent.jax`` and in PyTorch in
``fused_xent.torch`` (neither imported by ``import fused_xent``).

``import fused_xent`` does not import TensorFlow either (nor Keras, JAX, PyTorch
or tf_keras): the TensorFlow functions, ``fused_xent.losses`` and the others are
imported on first use. The ops and their gradients are registered as soon as
TensorFlow is imported (at once if it already is), the Keras losses and metrics
as soon as Keras with its TensorFlow backend is (on Keras's JAX or PyTorch
backend: as soon as Keras is, without TensorFlow), and the tf_keras ones as soon
as tf_keras is, so ``import fused_xent``, before or after the frameworks, is all
that is needed before loading saved models.
"""

import importlib
from typing import TYPE_CHECKING

from fused_xent import _core, _registration, numpy

if TYPE_CHECKING:  # what editors and type checkers see of the lazy attributes below
    from fused_xent import layers, losses, metrics
    from fused_xent._tf.buffer_cache import cached_memory_info, release_cached_memory
    from fused_xent._tf.ops import softmax_cross_entropy_with_logits, sparse_softmax_cross_entropy_with_logits
    from fused_xent.linear import linear_cross_entropy, linear_logits

__version__ = _core.build_info()["version"]


def build_info() -> dict:
    """What this build contains: TensorFlow version built against, SIMD level, CUDA, the XLA
    lowering and, when it is not the custom call, why (docs/install.md)."""
    return dict(_core.build_info())


__all__ = [
    "build_info",
    "cached_memory_info",
    "layers",
    "linear_cross_entropy",
    "linear_logits",
    "losses",
    "metrics",
    "numpy",
    "release_cached_memory",
    "softmax_cross_entropy_with_logits",
    "sparse_softmax_cross_entropy_with_logits",
]

# Attributes that need TensorFlow (PEP 562: imported on first access), and their modules.
_TENSORFLOW_ATTRIBUTES = {
    "sparse_softmax_cross_entropy_with_logits": "fused_xent._tf.ops",
    "softmax_cross_entropy_with_logits": "fused_xent._tf.ops",
    "cached_memory_info": "fused_xent._tf.buffer_cache",
    "release_cached_memory": "fused_xent._tf.buffer_cache",
    "losses": "fused_xent.losses",
    "linear_cross_entropy": "fused_xent.linear",
    "linear_logits": "fused_xent.linear",
    "layers": "fused_xent.layers",
    "metrics": "fused_xent.metrics",
    "tf_keras": "fused_xent.tf_keras",  # imports tf_keras (Keras 2)
}
_MODULES = ("losses", "layers", "metrics", "tf_keras")  # attributes that are modules, not functions
_KERAS_MODULES = ("losses", "metrics")  # also on Keras's JAX and PyTorch backends, without TensorFlow


# Other frameworks' functions: imported on first access, never by `import fused_xent`.
_FRAMEWORK_MODULES = ("jax", "torch", "cuda")


def __getattr__(name):
    if name in _FRAMEWORK_MODULES:
        return importlib.import_module(f"fused_xent.{name}")
    module = _TENSORFLOW_ATTRIBUTES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _KERAS_MODULES and _registration.keras_backend() in _registration.OTHER_KERAS_BACKENDS:
        return importlib.import_module(module)  # no TensorFlow needed
    try:
        import tensorflow  # noqa: F401  (the hook below registers the ops as it finishes)
    except ImportError as error:
        if name in _MODULES:
            raise ImportError(_missing_tensorflow_message(name)) from error
        return _unavailable(name, tensorflow_missing=True)
    if not _registration.HAS_OP_LIBRARY:
        if name in _MODULES:
            _registration.register_ops()  # raises the loader's explanation
        return _unavailable(name, tensorflow_missing=False)
    _registration.register_ops()  # raises the loader's ImportError (naming both versions on a mismatch) again
    value = importlib.import_module(module)
    if name not in _MODULES:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_TENSORFLOW_ATTRIBUTES) | set(_FRAMEWORK_MODULES))


def _missing_tensorflow_message(name):
    return f"fused_xent.{name} needs TensorFlow, which is not installed; only fused_xent.numpy is available without it."


def _unavailable(name, tensorflow_missing):
    """A stand-in that explains, when called, why the TensorFlow function is missing."""

    def unavailable(*args, **kwargs):
        if tensorflow_missing:
            raise ImportError(_missing_tensorflow_message(name))
        _registration.register_ops()  # raises the loader's explanation (a build without the op library)

    unavailable.__name__ = name
    return unavailable


_registration.install()
