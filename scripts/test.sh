#!/usr/bin/env bash
# The project's test command (README and CI run exactly this): lint + format check, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .                 # [tool.ruff] in pyproject.toml: default rules + isort + line length 110
.venv/bin/ruff format --check .
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
exec .venv/bin/python -m pytest -q -ra "$@"
