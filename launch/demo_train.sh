#!/usr/bin/env bash
# The demos' training and closing lines: CONFIG.yaml on 2 CPU processes (or every GPU) under torchrun into a fresh
# OUT_DIR (the config's train.output_dir), then the CounterFact scores before and after.
#   launch/demo_train.sh CONFIG.yaml OUT_DIR [key=value ...]
set -euo pipefail
config=$1 out=$2
shift 2
ranks=2
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  ranks=$(nvidia-smi -L | wc -l)
fi
rm -rf "$out"
torchrun --standalone --nproc_per_node "$ranks" -m molf_ds.commands.train "$config" "$@"
python "$(dirname "$0")/demo_report.py" "$out"
