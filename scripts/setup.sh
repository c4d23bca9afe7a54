#!/usr/bin/env bash
# Create .venv (if missing) and install FlexSP with every extra the tests and the demo need.
# torch is installed first, pinned, so nothing pulls a CUDA build (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
# .[all] includes the test extra's triton + liger-kernel (CPU-runnable under TRITON_INTERPRET=1);
# neither requires a CUDA torch, so the pinned CPU torch above stays (the line below shows it).
.venv/bin/python -m pip install -q -e ".[all]"
echo "setup: $(.venv/bin/python -c '
import importlib.metadata as md, scipy, torch
def ver(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"
print("torch", torch.__version__, "(cuda", torch.version.cuda, ") scipy", scipy.__version__,
      "triton", ver("triton"), "liger-kernel", ver("liger-kernel"))')"
