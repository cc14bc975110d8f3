#!/usr/bin/env bash
# Lint, format check, type check and the whole test suite (slow tests included). Installs
# first what is missing: medfed (scripts/setup.sh), then the test tool chain (the dev extra),
# again whenever pyproject.toml changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/medfed ] || bash scripts/setup.sh
stamp=.venv/.medfed-dev-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    echo "$wanted" > "$stamp"
fi
export PATH="$(pwd)/.venv/bin:$PATH"
ruff check medfed tests benchmarks
ruff format --check medfed tests benchmarks
mypy medfed
pytest "$@"
