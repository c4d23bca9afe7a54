#!/usr/bin/env bash
# FlexSP on one node with torchrun.
#   launch/torchrun.sh [NPROC] [hydra overrides...]
#   launch/torchrun.sh 4 train.steps=50 output_dir=outputs/run1
# NPROC defaults to 4. Elastic restarts: MAX_RESTARTS=2 launch/torchrun.sh 4 ...
# (a failed rank restarts every rank, which resume from the last checkpoint in output_dir).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:-4}
[ $# -gt 0 ] && shift
TORCHRUN=${TORCHRUN:-$( [ -x .venv/bin/torchrun ] && echo .venv/bin/torchrun || echo torchrun )}
exec "$TORCHRUN" --standalone --nproc_per_node "$NPROC" --max-restarts "${MAX_RESTARTS:-0}" \
    -m flexsp.train "$@"
