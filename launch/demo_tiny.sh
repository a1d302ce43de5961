#!/usr/bin/env bash
# The tiny demo: install molf_ds, generate a small counterfactual-knowledge task (CounterFact schema), a word-level
# tokenizer and a tiny random-init Qwen2 under runs/demo-tiny/, train it with MoLF on DeepSpeed ZeRO-2 (2 CPU
# processes, or every GPU), and compare the CounterFact scores before and after training.
# Arguments are `molf-ds train` overrides, e.g. ./launch/demo_tiny.sh train.max_steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
./launch/install.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore::FutureWarning
python -m molf_ds.commands.datagen.demo runs/demo-tiny
./launch/demo_train.sh examples/demo_tiny.yaml runs/demo-tiny/out "$@"
echo "demo: generated inputs in runs/demo-tiny/data, runs/demo-tiny/tokenizer, runs/demo-tiny/model"
