#!/usr/bin/env bash
# One-shot GPU check (see benchmarks/gpu_check.py): make the Python packages the GPU image lacks
# importable from local wheels (the GPU machine has no network), then run gpu_check.py under a
# hard timeout so the whole thing stays under 8 minutes on one H200.
#
# Usage:
#   benchmarks/gpu_check.sh --fetch-wheels        # where there IS network: download the wheels
#   benchmarks/gpu_check.sh [OUT_DIR] [ARGS...]   # on the GPU machine; ARGS go to gpu_check.py
#
# Env: PYTHON (default python3, the image's torch 2.11 + triton 3.6), FLEXSP_WHEELS (wheel dir,
# default benchmarks/wheels), FLEXSP_DEPS_DIR (install target, default /tmp/flexsp_gpu_deps),
# GPU_CHECK_TIMEOUT_S (hard limit, default 470).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${FLEXSP_WHEELS:-benchmarks/wheels}
DEPS=${FLEXSP_DEPS_DIR:-/tmp/flexsp_gpu_deps}
# Pure-Python wheels (py3-none-any), pinned to the versions tested on CPU. Installed with
# --no-deps: liger-kernel must use the image's torch and triton, never pull its own.
LIGER=(liger-kernel==0.8.0)
PYTEST=(pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 packaging==26.4 pygments==2.21.0)

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  exec "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" "${LIGER[@]}" "${PYTEST[@]}"
fi

need=()
"$PY" -c "import liger_kernel.ops" 2>/dev/null || need+=("${LIGER[@]}")
"$PY" -c "import pytest" 2>/dev/null || need+=("${PYTEST[@]}")
if [ ${#need[@]} -gt 0 ]; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "[gpu_check.sh] installing from $WHEELS into $DEPS: ${need[*]}"
    "$PY" -m pip install -q --no-deps --no-index --find-links "$WHEELS" --target "$DEPS" "${need[@]}" \
      || echo "[gpu_check.sh] WARNING: wheel install failed; sections needing ${need[*]} will report it"
    export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu_check.sh] WARNING: missing ${need[*]} and no wheels in $WHEELS (run '$0 --fetch-wheels' with network)"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

OUT=${1:-benchmarks/results}
[ $# -gt 0 ] && shift
timeout -k 10 "${GPU_CHECK_TIMEOUT_S:-470}" "$PY" benchmarks/gpu_check.py "$OUT" "$@"
rc=$?
[ $rc -eq 124 ] && echo "[gpu_check.sh] hit the hard timeout; $OUT/report.md holds the sections that finished"
exit $rc
