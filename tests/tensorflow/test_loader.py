"""The op library is loaded only into the TensorFlow it was built for."""

import pytest

from tests._support.runners import tf_or_skip

tf = tf_or_skip()
import fused_xent  # noqa: E402
from fused_xent._tf import loader as _loader  # noqa: E402


def test_build_info():
    info = fused_xent.build_info()
    assert info["tensorflow_version"] == tf.__version__
    assert isinstance(info["simd"], str) and info["simd"]
    assert info["cuda"] in (True, False)


@pytest.mark.parametrize("running", ["2.22.0", "3.21.0", "2.20.1"])
def test_version_mismatch_names_both_versions(running):
    with pytest.raises(ImportError, match=rf"built against TensorFlow 2\.21\.0, but TensorFlow {running}.*Reinstall"):
        _loader.check_tensorflow_version("2.21.0", running)


def test_same_minor_version_is_accepted():
    _loader.check_tensorflow_version("2.21.0", "2.21.3")
    _loader.check_tensorflow_version("2.21.0", "2.21.0rc1")


def test_build_without_tensorflow_is_explained():
    with pytest.raises(ImportError, match=r"no TensorFlow op library.*fused_xent.numpy"):
        _loader.check_tensorflow_version(None, "2.21.0")


def test_import_fails_on_a_mismatched_tensorflow(tmp_path, monkeypatch):
    import subprocess
    import sys

    script = tmp_path / "mismatch.py"
    script.write_text(
        "import tensorflow as tf\n"
        "tf.__version__ = '2.99.0'\n"
        "try:\n"
        "    import fused_xent\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120).stdout
    built = fused_xent.build_info()["tensorflow_version"]
    assert f"ImportError: fused_xent's op library was built against TensorFlow {built}" in out
    assert "TensorFlow 2.99.0 is installed" in out
