#!/usr/bin/env bash
# MPI: ranks come from mpirun and DeepSpeed finds them through mpi4py (pip install 'molf-ds[mpi]').
#   NP=2 ./launch/mpirun.sh CONFIG.yaml [key=value ...]       extra mpirun flags in MPIRUN_ARGS
set -euo pipefail
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}
# shellcheck disable=SC2086
exec mpirun -np "${NP:-2}" ${MPIRUN_ARGS:-} python -m molf_ds.commands.train "$@"
