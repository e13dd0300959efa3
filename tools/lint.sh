#!/usr/bin/env bash
# Lint and format checks, as `.ci/run` runs them: ruff (pyproject.toml's [tool.ruff]) over the Python tree and
# clang-format (.clang-format) over csrc/. `tools/lint.sh --fix` rewrites the files instead of checking them.
# The pins live here and in pyproject.toml's `dev` extra; a new formatter version is a deliberate, separate commit.
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF=ruff==0.17.6
CLANG_FORMAT=clang-format==21.1.8
if ! ruff --version 2>/dev/null | grep -q "${RUFF#ruff==}" ||
   ! clang-format --version 2>/dev/null | grep -q "${CLANG_FORMAT#clang-format==}"; then
  python -m pip install -q "$RUFF" "$CLANG_FORMAT"
fi
cxx=(csrc/*.cpp csrc/*.h)
# one command a line: under `set -e` a failure inside an `a && b` chain would not stop the script
if [ "${1:-}" = "--fix" ]; then
  ruff check --fix .
  ruff format .
  clang-format -i "${cxx[@]}"
else
  ruff check .
  ruff format --check .
  clang-format --dry-run -Werror "${cxx[@]}"
  echo "lint: ruff check, ruff format --check, clang-format: clean"
fi
