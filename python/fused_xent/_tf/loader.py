"""Loads the TensorFlow op library, refusing a TensorFlow it was not built for.

A custom-op library uses TensorFlow's C++ ABI, which changes between minor
versions: loading it into another TensorFlow fails with undefined symbols or,
worse, crashes later. So the version is checked before the library is loaded.
"""

import importlib.metadata
import json
import os
import shlex
import sys
import threading
import urllib.parse
import urllib.request

from fused_xent import _core

_LIBRARY_NAME = "_fused_xent_ops.so"
_lock = threading.Lock()
_library = None


def installed_from():
    """What pip installed fused-xent from (its PEP 610 direct_url.json): a checkout's or an
    sdist's path, a VCS URL; None when unknown (e.g. a development build)."""
    try:
        text = importlib.metadata.distribution("fused-xent").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    origin = json.loads(text)
    url = origin.get("url")
    if not url:
        return None
    if "vcs_info" in origin:
        return f"{origin['vcs_info']['vcs']}+{url}"
    if url.startswith("file:"):
        return urllib.request.url2pathname(urllib.parse.urlparse(url).path)
    return url


def rebuild_command(source=None):
    """The command that rebuilds fused-xent against the TensorFlow of this environment: the
    build compiles against the installed TensorFlow; --no-deps keeps that TensorFlow, and
    --no-cache-dir keeps pip from reusing a wheel built against another one."""
    where = shlex.quote(source) if source else "<a clone or sdist of fused-xent>"
    return f"{shlex.quote(sys.executable)} -m pip install --force-reinstall --no-deps --no-cache-dir {where}"


REBUILD_HINT = "Reinstall fused-xent to rebuild it against the TensorFlow you run: " + rebuild_command(installed_from())


def built_tensorflow_version():
    """The TensorFlow version the op library was compiled against, or None."""
    return _core.build_info()["tensorflow_version"]


def _minor(version):
    return tuple(version.split(".")[:2])


def check_tensorflow_version(built, running):
    """Raises ImportError unless `running` has the major.minor of `built`."""
    if built is None:
        raise ImportError(
            "This build of fused_xent has no TensorFlow op library (TensorFlow was not found when it "
            "was compiled); only fused_xent.numpy is available. " + REBUILD_HINT
        )
    if _minor(built) != _minor(running):
        raise ImportError(
            f"fused_xent's op library was built against TensorFlow {built}, but TensorFlow {running} "
            f"is installed, and the library works only with TensorFlow {'.'.join(_minor(built))}.x. " + REBUILD_HINT
        )


def library_path():
    """Where the op library is (whether or not it exists)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # installed beside _core
    return os.path.join(package, _LIBRARY_NAME)


def load_op_library():
    """Returns the loaded op library module (its op wrappers), loading it once."""
    global _library
    # Imported before taking the lock: fused_xent's import hook loads the library
    # as tensorflow finishes importing, which would otherwise wait for this lock.
    import tensorflow as tf

    with _lock:
        if _library is None:
            check_tensorflow_version(built_tensorflow_version(), tf.__version__)
            path = library_path()
            if not os.path.exists(path):
                raise ImportError(f"fused_xent's op library is missing: {path} does not exist. " + REBUILD_HINT)
            _library = tf.load_op_library(path)
        return _library
