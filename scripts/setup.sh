#!/usr/bin/env bash
# Create .venv (if missing) and install FlexSP with every extra the tests and the demo need.
# torch is installed first, pinned, so nothing pulls a CUDA build (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[all]"
echo "setup: $(.venv/bin/python -c 'import torch, scipy; print("torch", torch.__version__, "scipy", scipy.__version__)')"
