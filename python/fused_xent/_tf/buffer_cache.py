"""The CPU backward kernels' gradient buffer cache (cc/core/buffer_pool.h).

The cache lives in the op library, which TensorFlow loaded; its C functions
(cc/tf/cache_control.cc) are reached through ctypes on that same library.
"""

import ctypes
import os
import threading

from fused_xent._tf import loader as _loader

# The order of cc/tf/cache_control.cc's fused_xent_cached_memory_info.
_FIELDS = ("idle_bytes", "idle_blocks", "in_use_bytes", "in_use_blocks", "limit_bytes")
_lock = threading.Lock()
_functions = None


def _open_loaded_library():
    # RTLD_NOLOAD finds the copy TensorFlow loaded and never loads a second
    # one, whose cache the kernels would not use.
    _loader.load_op_library()  # raises ImportError explaining a missing TensorFlow or library
    path = _loader.library_path()
    try:
        return ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | os.RTLD_NOW)
    except OSError as error:
        raise RuntimeError(f"fused_xent's op library {path} is not loaded in this process: {error}") from error


def _bind(library):
    try:
        release, info = library.fused_xent_release_cached_memory, library.fused_xent_cached_memory_info
    except AttributeError as error:
        raise RuntimeError(
            f"fused_xent's op library has no buffer cache functions ({error}); " + _loader.REBUILD_HINT
        ) from error
    release.argtypes, release.restype = [], ctypes.c_uint64
    info.argtypes, info.restype = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_int], ctypes.c_int
    return release, info


def _cache_functions():
    global _functions
    with _lock:
        if _functions is None:
            _functions = _bind(_open_loaded_library())
        return _functions


def cached_memory_info():
    """What the CPU gradient buffer cache holds, outside TensorFlow's allocator:

    ``idle_bytes``/``idle_blocks``: cached blocks waiting for the next gradient;
    ``in_use_bytes``/``in_use_blocks``: blocks that live gradient tensors hold;
    ``limit_bytes``: the most idle bytes kept (``FUSED_XENT_BUFFER_CACHE_MB``).
    """
    info = _cache_functions()[1]
    values = (ctypes.c_uint64 * len(_FIELDS))()
    count = info(values, len(_FIELDS))
    if count != len(_FIELDS):
        raise RuntimeError(
            f"fused_xent's op library reports {count} cache fields, this package expects {len(_FIELDS)}; "
            + _loader.REBUILD_HINT
        )
    return dict(zip(_FIELDS, map(int, values)))


def release_cached_memory():
    """Gives the idle blocks of the CPU gradient buffer cache back to the operating
    system and returns their bytes. Blocks held by live gradients stay; they are
    cached again when those tensors go away."""
    return int(_cache_functions()[0]())
