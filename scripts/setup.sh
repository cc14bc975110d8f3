#!/usr/bin/env bash
# Create .venv and install what running medfed needs: a site node, the aggregator and its
# MLflow tracking (`medfed demo` runs all three). scripts/test.sh adds the test tool chain.
# torch 2.13.0 goes first: it resolves to the CPU build held on these machines, and the
# other packages then accept it instead of pulling the CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[site,aggregator,tracking]"
echo "medfed installed in $(pwd)/.venv"
