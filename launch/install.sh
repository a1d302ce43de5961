#!/usr/bin/env bash
# Install molf_ds with its test dependencies on this machine (editable, from this checkout).
# Without a GPU, CPU torch is installed first (a bare `torch` requirement pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install torch
  else
    python -m pip install torch==2.13.0
  fi
fi
python -m pip install -q -e ".[test,mpi]"
