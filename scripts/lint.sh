#!/usr/bin/env bash
# Lint and format checks over the whole tree: ruff (lint + format) for Python, clang-format for
# the C++/CUDA sources under cc/. `scripts/lint.sh --fix` rewrites the files instead of checking.
# Needs ruff and clang-format on PATH or in .venv/bin (pip install ruff clang-format).
set -euo pipefail
cd "$(dirname "$0")/.."
PATH="$PWD/.venv/bin:$PATH"
cpp_files=$(git ls-files 'cc/*.h' 'cc/*.cc' 'cc/*.cu' 'cc/*.cuh' 'cc/*.inc')
if [ "${1:-}" = "--fix" ]; then
  ruff check --fix .
  ruff format .
  clang-format -i $cpp_files
else
  ruff check .
  ruff format --check .
  clang-format --dry-run --Werror $cpp_files
fi
echo "lint: ruff and clang-format clean"
