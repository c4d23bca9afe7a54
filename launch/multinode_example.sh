#!/usr/bin/env bash
# FlexSP on several nodes with torchrun (c10d rendezvous). Run the same command on every node:
#
#   NNODES=2 NPROC=8 RDZV_HOST=node0.example RDZV_PORT=29400 launch/multinode_example.sh \
#       model=small train.steps=1000 output_dir=/shared/runs/flexsp
#
# - output_dir must be on a filesystem every node can read (checkpoints are loaded by every rank).
# - The world size (NNODES x NPROC) must be a power of two; groups of up to NPROC ranks stay inside
#   a node (parallel.devices_per_node defaults to LOCAL_WORLD_SIZE = NPROC).
# - MAX_RESTARTS (default 3): on a failure torchrun restarts all ranks, which resume from the last
#   checkpoint; --rdzv-backend c10d also lets a replaced node join.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${RDZV_HOST:?set RDZV_HOST (host of the rendezvous, e.g. node 0)}"
TORCHRUN=${TORCHRUN:-$( [ -x .venv/bin/torchrun ] && echo .venv/bin/torchrun || echo torchrun )}
exec "$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "${NPROC:-8}" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv-id "${RDZV_ID:-flexsp}" \
    --max-restarts "${MAX_RESTARTS:-3}" \
    -m flexsp.train "$@"
