#!/usr/bin/env bash
# Translate images with an AGG example workflow in a headless ComfyUI (see scripts/translate.py --help).
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$PACK_DIR/scripts/setup.sh"
AGG_HOME="${AGG_HOME:-$HOME/.cache/agg-comfyui}"
PY="${AGG_PYTHON:-$AGG_HOME/venv/bin/python}"
exec "$PY" "$PACK_DIR/scripts/translate.py" "$@"
