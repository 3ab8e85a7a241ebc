#!/usr/bin/env bash
# The pack's test command (CI runs it as is): sets up the environment if needed (scripts/setup.sh
# --oldest, scripts/setup_browser.sh), runs ruff and the whole test suite on ComfyUI 0.3.75, then the
# in-process node and integration tests again on ComfyUI 0.3.52, the lowest version the pack supports.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh tests/agg_cli -x   # only these pytest arguments, on 0.3.75 only
#
# Needs bash, Python 3.10+ and, for the browser test, root or sudo (Debian's chromium via apt-get).
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AGG_HOME="${AGG_HOME:-$HOME/.cache/agg-comfyui}"
PY="${AGG_PYTHON:-$AGG_HOME/venv/bin/python}"
OLDEST="0.3.52"
OLDEST_DIR="$AGG_HOME/ComfyUI-$OLDEST"

bash "$PACK_DIR/scripts/setup.sh" --oldest
bash "$PACK_DIR/scripts/setup_browser.sh"
cd "$PACK_DIR"
"$PY" -m ruff check .

if [ "$#" -gt 0 ]; then
  exec "$PY" -m pytest "$@"
fi

status=0
t0=$SECONDS
"$PY" -m pytest || status=$?
t1=$SECONDS
echo "[agg-test] ComfyUI $(cat "${AGG_COMFYUI:-$AGG_HOME/ComfyUI}/.agg-unpacked" 2>/dev/null || echo '(AGG_COMFYUI)'): whole suite in $((t1 - t0)) s (exit $status)"

# The in-process node tests on the oldest supported ComfyUI: its own frontend packages come first on
# PYTHONPATH (the rest of the venv serves both versions).
old_status=0
# (The trained test model is cached per ComfyUI version: its guidance and Color Loss tests run on 0.3.75
# only, so the model is trained once.)
AGG_COMFYUI="$OLDEST_DIR" PYTHONPATH="$OLDEST_DIR/.agg-site${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" -m pytest tests/nodes tests/integration --ignore=tests/nodes/test_trained_guidance.py \
  --ignore=tests/nodes/test_color_loss.py -p no:cacheprovider \
  || old_status=$?
echo "[agg-test] ComfyUI $OLDEST: tests/nodes tests/integration in $((SECONDS - t1)) s (exit $old_status)"

[ "$status" = 0 ] && [ "$old_status" = 0 ]
