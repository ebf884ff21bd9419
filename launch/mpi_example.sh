#!/bin/bash
# ALPS training started by mpirun: one process per rank, ranks discovered through MPI.
#
#   bash launch/mpi_example.sh configs/tiny.yaml            # 2 ranks on this machine
#   HOSTFILE=launch/hostfile.example bash launch/mpi_example.sh RUN.yaml
#
# alps-ds launch --mpi builds one mpirun command. Every rank runs `python -m alps_ds.launcher.discover`,
# which reads OMPI_COMM_WORLD_* / PMI_* / PMIX_RANK, confirms them with mpi4py, finds the local rank
# (ranks sharing the node) and rank 0's address, exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
# MASTER_PORT and then runs `alps-ds train`. MPICH (pip install mpich) and Open MPI are both handled.
set -euo pipefail
CONFIG=${1:?usage: bash launch/mpi_example.sh RUN.yaml}
NPROC=${NPROC:-2}

args=(--mpi --nproc-per-node "$NPROC" --master-port "${PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
    args+=(--hostfile "$HOSTFILE")
fi
# Print the exact command first, then run it.
alps-ds launch "${args[@]}" --dry-run -- --config "$CONFIG"
exec alps-ds launch "${args[@]}" -- --config "$CONFIG"
