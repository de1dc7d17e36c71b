#!/usr/bin/env bash
# PartitionSel training with the deepspeed launcher.
#   single node:   NUM_GPUS=2 bash launch/run_local.sh [train.py args...]
#   multi node:    HOSTFILE=hostfile MASTER_ADDR=node0 bash launch/run_local.sh [...]
# Defaults: the demo pool and model of tools/fetch_demo_data.py, ZeRO-2.
# Runs under launch/supervise.py: SIGINT/SIGTERM to this script reach every rank, and no rank
# outlives the deepspeed runner (which itself does not pass signals on to its ranks).
set -euo pipefail
# Paths in the arguments are the caller's (relative to where this script is started from); the
# scripts and defaults are found through REPO.
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
NUM_GPUS=${NUM_GPUS:-2}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per rank: the launcher leaves it unset
ARGS=("$@")
if [ ${#ARGS[@]} -eq 0 ]; then
    ARGS=(--model "$REPO/.cache/models/smollm2-135m" --num-layers 4 --pool "$REPO/.cache/pools/demo"
          --deepspeed_config "$REPO/ds_configs/zero2.json" --steps 20 --output-dir "$REPO/runs/local-$(date +%Y%m%d-%H%M%S)")
fi
if [ -n "${HOSTFILE:-}" ]; then
    exec python "$REPO/launch/supervise.py" deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        "$REPO/launch/train.py" "${ARGS[@]}"
fi
exec python "$REPO/launch/supervise.py" deepspeed --num_gpus "$NUM_GPUS" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "$REPO/launch/train.py" "${ARGS[@]}"
