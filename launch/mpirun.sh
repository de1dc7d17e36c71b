#!/usr/bin/env bash
# PartitionSel training under mpirun (Open MPI or MPICH). launch/train.py maps the MPI rank
# variables to torch.distributed itself and keeps the master address explicit (MASTER_ADDR),
# never the address MPI discovery would pick.
#   NP=2 bash launch/mpirun.sh [train.py args...]
#   NP=16 HOSTS=node0:8,node1:8 MASTER_ADDR=node0 bash launch/mpirun.sh ...
# Runs under launch/supervise.py: SIGINT/SIGTERM to this script reach every local rank, and no
# local rank outlives mpirun.
set -euo pipefail
# Paths in the arguments are the caller's (relative to where this script is started from); the
# scripts and defaults are found through REPO.
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
NP=${NP:-2}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
ARGS=("$@")
if [ ${#ARGS[@]} -eq 0 ]; then
    ARGS=(--model "$REPO/.cache/models/smollm2-135m" --num-layers 4 --pool "$REPO/.cache/pools/demo"
          --deepspeed_config "$REPO/ds_configs/zero2.json" --steps 20 --output-dir "$REPO/runs/mpirun-$(date +%Y%m%d-%H%M%S)")
fi
MPI_ARGS=(-n "$NP")
if mpirun --version 2>&1 | grep -qi "open mpi"; then
    [ "$(id -u)" = 0 ] && MPI_ARGS+=(--allow-run-as-root)
    MPI_ARGS+=(-x OMP_NUM_THREADS=1 -x MASTER_ADDR="$MASTER_ADDR" -x MASTER_PORT="$MASTER_PORT"
               -x DS_ACCELERATOR -x PATH -x PYTHONPATH)
    if [ -n "${HOSTS:-}" ]; then
        MPI_ARGS+=(--host "$HOSTS")
    else
        MPI_ARGS+=(--mca btl self,sm)  # one node: shared memory only, no network interface chosen
    fi
else  # MPICH / hydra
    MPI_ARGS+=(-genv OMP_NUM_THREADS 1 -genv MASTER_ADDR "$MASTER_ADDR" -genv MASTER_PORT "$MASTER_PORT")
    [ -n "${HOSTS:-}" ] && MPI_ARGS+=(-hosts "$HOSTS")
fi
exec python "$REPO/launch/supervise.py" mpirun "${MPI_ARGS[@]}" python "$REPO/launch/train.py" "${ARGS[@]}"
