#!/usr/bin/env bash
# One node, the deepspeed launcher: every GPU here (2 processes on a machine without GPUs).
#   ./launch/deepspeed.sh CONFIG.yaml [key=value ...]        NUM_PROCS=4 to choose the count
set -euo pipefail
procs=${NUM_PROCS:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
[ "${procs:-0}" -gt 0 ] || procs=2
exec deepspeed --num_gpus "$procs" --master_port "${MASTER_PORT:-29500}" --module molf_ds.commands.train "$@"
