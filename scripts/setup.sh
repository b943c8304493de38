#!/usr/bin/env bash
# Create .venv and install omnivae with its report and test extras. Idempotent.
# PyTorch: TORCH_SPEC picks the build (default torch==2.13.0; on a CUDA machine see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# TORCH_SPEC may hold pip options too, e.g. "torch==2.13.0 --index-url URL", hence no quotes.
.venv/bin/python -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install --quiet -e ".[report,test]"
