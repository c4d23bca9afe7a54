#!/usr/bin/env bash
# The project's test command (README and CI run exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
exec .venv/bin/python -m pytest -q -ra "$@"
