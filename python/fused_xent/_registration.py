"""Registration that makes the import order irrelevant: the TensorFlow ops and their gradients as
soon as TensorFlow is imported, the Keras 3 losses, metrics and layers as soon as Keras is (on its
JAX or PyTorch backend without TensorFlow), the tf_keras classes as soon as tf_keras is. So
``import fused_xent``, before or after the frameworks, is all that loading a saved model needs.

An import hook (``sys.meta_path``) runs ``register()`` right after ``tensorflow``, ``keras`` or
``tf_keras`` finishes executing; it leaves ``sys.meta_path`` once all three have been imported.
"""

import importlib
import sys
import warnings

from fused_xent import _core

HAS_OP_LIBRARY = _core.build_info()["tensorflow_version"] is not None
OTHER_KERAS_BACKENDS = ("jax", "torch")


def register_ops():
    """What tf.saved_model.load of a model using the ops needs: the op library and the gradients."""
    from fused_xent._tf import loader

    loader.load_op_library()  # raises ImportError naming both versions on a mismatch
    importlib.import_module("fused_xent._tf.ops")  # registers the gradients


def keras_backend():
    """Keras's backend (importing Keras), or None where it does not import."""
    try:
        import keras
    except ImportError:
        return None
    return keras.backend.backend()


def _importing(finishing=None):
    """Our modules executing right now, further up this very stack (a user's first
    `from fused_xent.losses import ...` imported Keras, which brought us here), less `finishing`."""
    return [
        name
        for name, module in list(sys.modules.items())
        if name.startswith("fused_xent.")
        and name != finishing
        and getattr(getattr(module, "__spec__", None), "_initializing", False)
    ]


def _register_keras():
    """What keras.models.load_model of a model compiled with our losses, metrics and layers needs."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        register_ops()
        for name in ("losses", "metrics", "layers"):  # keras.saving.register_keras_serializable
            importlib.import_module(f"fused_xent.{name}")
    elif backend in OTHER_KERAS_BACKENDS:
        for name in ("losses", "metrics"):
            importlib.import_module(f"fused_xent.{name}")


def _register_tf_keras():
    """What tf_keras's load_model of a model compiled with our tf_keras losses and metrics needs."""
    if HAS_OP_LIBRARY and _imported("tf_keras") and _imported("tensorflow"):
        register_ops()
        importlib.import_module("fused_xent.tf_keras")  # tf_keras.saving.register_keras_serializable


def _imported(name):
    """Whether module `name` has finished executing (not merely started)."""
    return sys.modules.get(name) is not None and (_hook is None or name not in _hook.pending)


def register(finishing=None):
    """Registers what the imported frameworks need. While one of our modules is still executing,
    importing the others could meet it half-initialised: then the outermost one calls this again
    as its last line (`finishing` is its name)."""
    if _importing(finishing):
        return
    # On the JAX and PyTorch backends the losses need Keras only (TensorFlow may never come).
    if _imported("keras") and sys.modules["keras"].backend.backend() in OTHER_KERAS_BACKENDS:
        _register_keras()
        _register_tf_keras()
        return
    if not HAS_OP_LIBRARY:
        return
    # TensorFlow imports Keras (tensorflow/__init__.py loads keras.src.optimizers) and
    # Keras's TensorFlow backend imports TensorFlow, so whichever finishes first waits
    # for the other: the losses module needs both complete.
    if _imported("tensorflow"):
        register_ops()
        if _imported("keras"):
            _register_keras()
        _register_tf_keras()


class _RegisterAfterImport:
    """A sys.meta_path finder that runs register() right after `tensorflow`, `keras` or `tf_keras`
    finishes executing. It finds these modules' specs with the other finders and wraps their
    loaders; until all are imported it costs a set lookup per import."""

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
            register()
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


def install():
    """Registers what is imported already (raising the loader's ImportError on a mismatch), and
    hooks the imports of the rest."""
    global _hook
    register()
    waiting = [name for name in ("tensorflow", "keras", "tf_keras") if sys.modules.get(name) is None]
    if waiting and _hook is None:
        _hook = _RegisterAfterImport(waiting)
        sys.meta_path.insert(0, _hook)
