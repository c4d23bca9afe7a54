#!/usr/bin/env bash
# GPU variant of flexsp-profile on ONE CUDA device, hard-limited to < 8 minutes (see
# benchmarks/gpu_profile.py; not run yet: written without a GPU): 1+2 layers of a LLaMA-3-8B shape
# (bf16, activation checkpointing) on documents up to 128K, scaled to 32 layers. Outputs land in
# benchmarks/results/profile_gpu_<date>_<device>.* by default. The GPU check's bounded profile
# (~90 s, compute only) is benchmarks/gpu_costfit.py instead.
#   benchmarks/gpu_profile.sh [OUT_DIR]
# Env: PYTHON (default python3), GPU_PROFILE_TIMEOUT_S (hard limit, default 450).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${1:-benchmarks/results}
timeout -k 10 "${GPU_PROFILE_TIMEOUT_S:-450}" "${PYTHON:-python3}" benchmarks/gpu_profile.py --out "$OUT" --budget-s 330
rc=$?
[ $rc -eq 124 ] && echo "[gpu_profile.sh] hit the hard timeout; no cost model was written"
exit $rc
