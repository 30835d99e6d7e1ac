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
import sys
import warnings
from typing import TYPE_CHECKING

from fused_xent import _core
from fused_xent import numpy

if TYPE_CHECKING:  # what editors and type checkers see of the lazy attributes below
    from fused_xent import layers, losses, metrics
    from fused_xent._cache import cached_memory_info, release_cached_memory
    from fused_xent._ops import softmax_cross_entropy_with_logits, sparse_softmax_cross_entropy_with_logits
    from fused_xent.linear import linear_cross_entropy, linear_logits

__version__ = _core.build_info()["version"]


def build_info() -> dict:
    """What this build contains: TensorFlow version built against, SIMD level, CUDA."""
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
    "sparse_softmax_cross_entropy_with_logits": "fused_xent._ops",
    "softmax_cross_entropy_with_logits": "fused_xent._ops",
    "cached_memory_info": "fused_xent._cache",
    "release_cached_memory": "fused_xent._cache",
    "losses": "fused_xent.losses",
    "linear_cross_entropy": "fused_xent.linear",
    "linear_logits": "fused_xent.linear",
    "layers": "fused_xent.layers",
    "metrics": "fused_xent.metrics",
    "tf_keras": "fused_xent.tf_keras",  # imports tf_keras (Keras 2)
}
_MODULES = ("losses", "layers", "metrics", "tf_keras")  # attributes that are modules, not functions
_KERAS_MODULES = ("losses", "metrics")  # also on Keras's JAX and PyTorch backends, without TensorFlow
_HAS_OP_LIBRARY = _core.build_info()["tensorflow_version"] is not None


# Other frameworks' functions: imported on first access, never by `import fused_xent`.
_FRAMEWORK_MODULES = ("jax", "torch")


def __getattr__(name):
    if name in _FRAMEWORK_MODULES:
        return importlib.import_module(f"fused_xent.{name}")
    module = _TENSORFLOW_ATTRIBUTES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _KERAS_MODULES and _keras_backend() in _OTHER_KERAS_BACKENDS:
        return importlib.import_module(module)  # no TensorFlow needed
    try:
        import tensorflow  # noqa: F401  (the hook below registers the ops as it finishes)
    except ImportError as error:
        if name in _MODULES:
            raise ImportError(_missing_tensorflow_message(name)) from error
        return _unavailable(name, tensorflow_missing=True)
    if not _HAS_OP_LIBRARY:
        if name in _MODULES:
            _register_ops()  # raises the loader's explanation
        return _unavailable(name, tensorflow_missing=False)
    _register_ops()  # raises the loader's ImportError (naming both versions on a mismatch) again
    value = importlib.import_module(module)
    if name not in _MODULES:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_TENSORFLOW_ATTRIBUTES) | set(_FRAMEWORK_MODULES))


def _missing_tensorflow_message(name):
    return (
        f"fused_xent.{name} needs TensorFlow, which is not installed; "
        "only fused_xent.numpy is available without it."
    )


def _unavailable(name, tensorflow_missing):
    """A stand-in that explains, when called, why the TensorFlow function is missing."""

    def unavailable(*args, **kwargs):
        if tensorflow_missing:
            raise ImportError(_missing_tensorflow_message(name))
        _register_ops()  # raises the loader's explanation (a build without the op library)

    unavailable.__name__ = name
    return unavailable


# ---------------------------------------------------------------- registration


def _register_ops():
    """What tf.saved_model.load of a model using the ops needs: the op library and the gradients."""
    from fused_xent import _loader

    _loader.load_op_library()  # raises ImportError naming both versions on a mismatch
    importlib.import_module("fused_xent._ops")  # registers the gradients


_OTHER_KERAS_BACKENDS = ("jax", "torch")


def _keras_backend():
    """Keras's backend (importing Keras), or None where it does not import."""
    try:
        import keras
    except ImportError:
        return None
    return keras.backend.backend()


def _register_losses():
    """What keras.models.load_model of a model compiled with our losses and metrics needs."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        _register_ops()
        importlib.import_module("fused_xent.losses")  # keras.saving.register_keras_serializable
        importlib.import_module("fused_xent.metrics")  # likewise
        importlib.import_module("fused_xent.layers")  # the fused head's layers (TensorFlow only), likewise
    elif backend in _OTHER_KERAS_BACKENDS:
        importlib.import_module("fused_xent.losses")
        importlib.import_module("fused_xent.metrics")


def _register_tf_keras():
    """What tf_keras's load_model of a model compiled with our tf_keras losses and metrics needs."""
    if _HAS_OP_LIBRARY and _imported("tf_keras") and _imported("tensorflow"):
        _register_ops()
        importlib.import_module("fused_xent.tf_keras")  # tf_keras.saving.register_keras_serializable


def _imported(name):
    """Whether module `name` has finished executing (not merely started)."""
    return sys.modules.get(name) is not None and (_hook is None or name not in _hook.pending)


def _register():
    # On the JAX and PyTorch backends the losses need Keras only (TensorFlow may never come).
    if _imported("keras") and sys.modules["keras"].backend.backend() in _OTHER_KERAS_BACKENDS:
        _register_losses()
        _register_tf_keras()
        return
    if not _HAS_OP_LIBRARY:
        return
    # TensorFlow imports Keras (tensorflow/__init__.py loads keras.src.optimizers) and
    # Keras's TensorFlow backend imports TensorFlow, so whichever finishes first waits
    # for the other: the losses module needs both complete.
    if _imported("tensorflow"):
        _register_ops()
        if _imported("keras"):
            _register_losses()
        _register_tf_keras()


class _RegisterAfterImport:
    """A sys.meta_path finder that runs _register() right after `tensorflow`,
    `keras` or `tf_keras` finishes executing, so that the order of the imports
    does not matter.

    It finds these modules' specs with the other finders and wraps their
    loaders; it leaves sys.meta_path once all of them have been imported (until
    then it costs a set lookup per import).
    """

    def __init__(self, names):
        self.pending = set(names)

    def find_spec(self, name, path=None, target=None):
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderThenRegister(spec.loader, self)
        return spec

    def finished(self, name):
        self.pending.discard(name)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            _register()
        except Exception as error:  # noqa: BLE001
            # Raising here would fail `import tensorflow` itself, half-initialised;
            # the attributes that need the ops raise this error again when used.
            warnings.warn(f"fused_xent's TensorFlow ops and losses are not registered: {error}", stacklevel=2)


class _LoaderThenRegister:
    def __init__(self, loader, hook):
        self.loader, self.hook = loader, hook

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # The module keeps its real loader (importlib.resources and inspect read it).
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.hook.finished(module.__spec__.name)


_hook = None
_register()  # at once for what is imported already; raises the loader's ImportError on a mismatch
_waiting = [name for name in ("tensorflow", "keras", "tf_keras") if sys.modules.get(name) is None]
if _waiting:
    _hook = _RegisterAfterImport(_waiting)
    sys.meta_path.insert(0, _hook)
del _waiting
