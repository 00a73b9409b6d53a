#!/usr/bin/env bash
# Lint, type check, then the whole test suite. Called by `make test` once both environments exist.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
.venv/bin/python -m pytest "$@"
echo "==> make test took $((SECONDS - started)) s"
