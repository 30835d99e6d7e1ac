"""Which Keras the Keras 3 classes run on, and the error when it cannot be one of theirs."""

try:
    import keras
except ImportError as error:  # e.g. KERAS_BACKEND names a backend that is not installed
    keras = None
    import_error = error

SUPPORTED = ("tensorflow", "jax", "torch")
# The backend the public modules were imported for (Keras fixes it at its own import).
BACKEND = None if keras is None else keras.backend.backend()


def require_supported_backend(class_name, module):
    if keras is None:
        raise RuntimeError(
            f"fused_xent.{module}.{class_name} needs Keras, but importing keras failed "
            f"({type(import_error).__name__}: {import_error})."
        )
    backend = keras.backend.backend()
    if backend not in SUPPORTED:
        raise RuntimeError(
            f"fused_xent.{module}.{class_name} runs on Keras's TensorFlow, JAX or PyTorch backend, but Keras "
            f"runs on the {backend!r} backend. Set KERAS_BACKEND before importing keras."
        )
    if backend != BACKEND:
        raise RuntimeError(
            f"fused_xent.{module} was imported for Keras's {BACKEND!r} backend, but Keras now runs on {backend!r}."
        )


def require_backend(class_name, module, backends):
    """For the classes that run on some of Keras's backends only."""
    require_supported_backend(class_name, module)
    if BACKEND not in backends:
        names = " or ".join(f"{b!r}" for b in backends)
        raise RuntimeError(
            f"fused_xent.{module}.{class_name} needs Keras's {names} backend (KERAS_BACKEND), "
            f"but Keras runs on the {BACKEND!r} backend."
        )
