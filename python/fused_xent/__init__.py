"""fused-xent: softmax cross-entropy and its gradient in one fused C++ kernel.

TensorFlow functions mirroring ``tf.nn`` (``sparse_softmax_cross_entropy_with_logits``,
``softmax_cross_entropy_with_logits``), Keras losses in ``fused_xent.losses``, and
the same kernels on NumPy arrays in ``fused_xent.numpy`` (which works without
TensorFlow). Importing the package registers the ops and their gradients, so
``import fused_xent`` is all that is needed before loading saved models.
"""

from fused_xent import _core
from fused_xent import numpy

__version__ = _core.build_info()["version"]


def build_info():
    """What this build contains: TensorFlow version built against, SIMD level, CUDA."""
    return dict(_core.build_info())


try:
    import tensorflow as _tf  # noqa: F401
except ImportError:
    _tf = None

if _tf is not None and _core.build_info()["tensorflow_version"] is not None:
    from fused_xent import _loader

    _loader.load_op_library()  # raises ImportError naming both versions on a mismatch
    from fused_xent._ops import softmax_cross_entropy_with_logits, sparse_softmax_cross_entropy_with_logits
    from fused_xent._cache import cached_memory_info, release_cached_memory
    from fused_xent import losses  # registers the Keras losses for model loading
else:
    def _tensorflow_missing(name):
        def unavailable(*args, **kwargs):
            if _tf is None:
                raise ImportError(
                    f"fused_xent.{name} needs TensorFlow, which is not installed; "
                    "only fused_xent.numpy is available without it."
                )
            from fused_xent import _loader

            _loader.load_op_library()  # raises the loader's explanation

        unavailable.__name__ = name
        return unavailable

    sparse_softmax_cross_entropy_with_logits = _tensorflow_missing("sparse_softmax_cross_entropy_with_logits")
    softmax_cross_entropy_with_logits = _tensorflow_missing("softmax_cross_entropy_with_logits")
    cached_memory_info = _tensorflow_missing("cached_memory_info")
    release_cached_memory = _tensorflow_missing("release_cached_memory")

__all__ = [
    "build_info",
    "cached_memory_info",
    "numpy",
    "release_cached_memory",
    "softmax_cross_entropy_with_logits",
    "sparse_softmax_cross_entropy_with_logits",
]
