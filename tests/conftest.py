"""Fixtures and hooks only; the helpers the tests share are in tests/_support (tests._support)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before any test module imports TensorFlow

# tests/jax, tests/torch, tests/keras and tests/tensorflow are packages of this one, never to be
# found as jax, torch, keras or tensorflow: pytest puts the repository root on sys.path, not
# tests/ (tests/__init__.py). `python -m pytest` started inside tests/ would put tests/ there
# anyway, for this process and for children given PYTHONPATH=sys.path: take it off.
_TESTS = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or os.curdir).resolve() != _TESTS]
