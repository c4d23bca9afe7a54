#!/usr/bin/env bash
# One-shot GPU check (benchmarks/gpu_check.py): make the packages the GPU image lacks importable
# from carried wheels (the GPU machine has no network), then run the sections -- each in its own
# process, killed at its budget -- under a hard total limit, writing everything to OUT_DIR:
# report.md, results.json, costmodel_h200_llama8b.json and console.log (this script's output).
#
# Usage:
#   benchmarks/gpu_check.sh --fetch-wheels        # where there IS network: wheels -> benchmarks/wheels
#   benchmarks/gpu_check.sh OUT_DIR [ARGS...]     # on the GPU machine; ARGS go to gpu_check.py
#                                                 # (e.g. --smoke, --only attention, --skip tests)
#
# Env: PYTHON (default python3: the image's torch + triton), FLEXSP_WHEELS (wheel dir, default
# benchmarks/wheels, git-ignored, carried to the machine), FLEXSP_DEPS_DIR (install target, default
# /tmp/flexsp_gpu_deps), GPU_CHECK_TIMEOUT_S (hard limit for everything, default 440; the sections
# get at most 420 s of it).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
PY=${PYTHON:-python3}
WHEELS=${FLEXSP_WHEELS:-benchmarks/wheels}
DEPS=${FLEXSP_DEPS_DIR:-/tmp/flexsp_gpu_deps}
HARD=${GPU_CHECK_TIMEOUT_S:-440}
# Pure-Python wheels (py3-none-any), pinned to the versions tested on CPU. Installed with --no-deps:
# liger-kernel must use the image's torch and triton, never pull its own.
LIGER=(liger-kernel==0.8.0)
PYTEST=(pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 packaging==26.4 pygments==2.21.0)

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  exec "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" "${LIGER[@]}" "${PYTEST[@]}"
fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 OUT_DIR [gpu_check.py args...]  |  $0 --fetch-wheels" >&2
  exit 2
fi
OUT=$1
shift
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT_DIR $OUT" >&2; exit 2; }

main() {
  echo "[gpu_check.sh] $(date -Is) in $PWD, python $("$PY" -c 'import sys; print(sys.version.split()[0])')," \
       "hard limit ${HARD} s"
  local need=()
  "$PY" -c "import liger_kernel.ops" 2>/dev/null || need+=("${LIGER[@]}")
  "$PY" -c "import pytest" 2>/dev/null || need+=("${PYTEST[@]}")
  if [ ${#need[@]} -eq 0 ]; then
    echo "[gpu_check.sh] the image has liger-kernel and pytest: no wheel installed"
  elif compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "[gpu_check.sh] missing from the image: ${need[*]}; installing from $WHEELS into $DEPS (--no-deps)"
    if "$PY" -m pip install -q --no-deps --no-index --find-links "$WHEELS" --target "$DEPS" "${need[@]}"; then
      for spec in "${need[@]}"; do
        name=${spec%%==*}
        ls "$WHEELS" | grep -i "^${name//-/_}-" | sed "s/^/[gpu_check.sh]   from carried wheel: /"
      done
    else
      echo "[gpu_check.sh] WARNING: wheel install failed; sections needing ${need[*]} will report it"
    fi
    export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
    export FLEXSP_GPU_DEPS_DIR="$DEPS"
  else
    echo "[gpu_check.sh] WARNING: missing ${need[*]} and no wheels in $WHEELS" \
         "(run '$0 --fetch-wheels' where there is network)"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export FLEXSP_WHEELS="$WHEELS"
  local left=$((HARD - (SECONDS - START)))
  local budget=$((left - 15 < 420 ? left - 15 : 420))
  if [ $budget -lt 30 ]; then
    echo "[gpu_check.sh] only ${left} s left of ${HARD} s: not starting"
    return 124
  fi
  timeout -k 5 "$left" "$PY" benchmarks/gpu_check.py "$OUT" --budget-s "$budget" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "[gpu_check.sh] hit the hard limit (${HARD} s); $OUT/report.md holds what finished"
  return $rc
}

main "$@" 2>&1 | tee "$OUT/console.log"
exit "${PIPESTATUS[0]}"
