#!/usr/bin/env bash
# Many nodes from one shell: the deepspeed launcher reaches the others over ssh (pdsh) from a hostfile
# ("node1 slots=8" per line). Run on the first host:
#   HOSTFILE=hostfile MASTER_ADDR=node1 ./launch/deepspeed_multinode.sh CONFIG.yaml [key=value ...]
set -euo pipefail
exec deepspeed --hostfile "${HOSTFILE:?set HOSTFILE}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" \
  --master_port "${MASTER_PORT:-29500}" --module molf_ds.commands.train "$@"
