#!/usr/bin/env bash
# GPU check: the guided example workflows' API twins (workflows/api/*.json) on the generated test models through
# a real ComfyUI 0.33 server, with Dynamic VRAM (ComfyUI's default on NVIDIA GPUs) and with --disable-dynamic-vram;
# one line per workflow and mode with PASS/FAIL and seconds (tests/gpu/run_gpu_checks.py says what passes).
# About 5 minutes on an H100 once the environment and the fixtures exist.
#
# Usage: bash tests/gpu/run_gpu_checks.sh [--cpu] [--only NAME[,NAME]] [--modes dynamic-vram,no-dynamic-vram]
#                                         [--out DIR] [--keep] [--timeout SECONDS]
#   --cpu   the dry run on the CPU (64 px, 2 steps; ComfyUI has no Dynamic VRAM there, so both modes load alike)
# Environment:
#   AGG_PYTHON   a Python with CUDA torch and ComfyUI 0.33's requirements (default: $AGG_HOME/venv/bin/python)
#   AGG_COMFYUI  a ComfyUI 0.33.0 tree (default: $AGG_HOME/ComfyUI-0.33.0)
#   AGG_HOME     where scripts/setup.sh built them (default: ~/.cache/agg-comfyui); read only here
#   OUT          when set, the summary (gpu_checks.txt) and the two server logs are written there
# When the Python or the ComfyUI tree is missing, scripts/setup.sh builds them in a temporary folder (it needs
# the network, or a ComfyUI 0.33.0 source archive named by AGG_COMFYUI_ARCHIVE, and pip's index for torch).
# Everything else is written under a temporary folder, removed at the end (--keep keeps it).
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
AGG_HOME="${AGG_HOME:-$HOME/.cache/agg-comfyui}"
PY="${AGG_PYTHON:-$AGG_HOME/venv/bin/python}"
COMFY="${AGG_COMFYUI:-$AGG_HOME/ComfyUI-0.33.0}"

if [ ! -x "$PY" ] || [ ! -f "$COMFY/main.py" ]; then
  SETUP_HOME="$(mktemp -d "${TMPDIR:-/tmp}/agg-gpu-env-XXXXXX")"
  echo "[gpu-checks] no environment at $PY / $COMFY: building one in $SETUP_HOME (scripts/setup.sh)" >&2
  env -u AGG_COMFYUI -u AGG_PYTHON AGG_HOME="$SETUP_HOME" bash "$PACK_DIR/scripts/setup.sh" >&2
  PY="$SETUP_HOME/venv/bin/python"
  COMFY="$SETUP_HOME/ComfyUI-0.33.0"
fi

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "[gpu-checks] $PY is older than Python 3.10" >&2; exit 2; }
version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null || true)"
[ "$version" = "0.33.0" ] || echo "[gpu-checks] warning: $COMFY is ComfyUI ${version:-of unknown version}, not 0.33.0" >&2

cd "$PACK_DIR"
export AGG_HOME AGG_COMFYUI="$COMFY" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$PY" "$PACK_DIR/tests/gpu/run_gpu_checks.py" "$@"
