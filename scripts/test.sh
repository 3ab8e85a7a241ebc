#!/usr/bin/env bash
# Sets up the environment if needed (scripts/setup.sh), then runs the pack's whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/agg_kernels -x).
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$PACK_DIR/scripts/setup.sh"
bash "$PACK_DIR/scripts/setup_browser.sh"
AGG_HOME="${AGG_HOME:-$HOME/.cache/agg-comfyui}"
PY="${AGG_PYTHON:-$AGG_HOME/venv/bin/python}"
cd "$PACK_DIR"
"$PY" -m ruff check .
exec "$PY" -m pytest "$@"
