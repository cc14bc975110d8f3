#!/usr/bin/env bash
# Lint, format check, type check and the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/medfed ] || bash scripts/setup.sh
export PATH="$(pwd)/.venv/bin:$PATH"
ruff check medfed tests benchmarks
ruff format --check medfed tests benchmarks
mypy medfed
pytest "$@"
