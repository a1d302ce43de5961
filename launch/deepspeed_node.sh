#!/usr/bin/env bash
# Many nodes without ssh: run this once on every node, each with its NODE_RANK (0 on the master's host).
#   HOSTFILE=hostfile NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./launch/deepspeed_node.sh CONFIG.yaml [key=value ...]
set -euo pipefail
exec deepspeed --hostfile "${HOSTFILE:?set HOSTFILE}" --no_ssh --node_rank "${NODE_RANK:?set NODE_RANK}" \
  --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
  --module molf_ds.commands.train "$@"
