"""Helpers the tests share (not tests themselves): import them as `from tests._support import reference`."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: examples/, benchmarks/, tests/
SUPPORT = Path(__file__).resolve().parent
