#!/usr/bin/env bash
# The pack's test command (CI runs it as is): sets up the environment if needed (scripts/setup.sh
# --older, scripts/setup_browser.sh), runs ruff and the whole test suite on ComfyUI 0.33.0, then the
# in-process node and integration tests again on each older ComfyUI the pack supports (0.3.75, 0.3.52).
#
#   bash scripts/test.sh                    # everything
#   bash scripts/test.sh tests/agg_cli -x   # only these pytest arguments, on 0.33.0 only
#
# Offline, set AGG_COMFYUI_ARCHIVE to a ComfyUI 0.33.0 source archive (see scripts/setup.sh).
# Needs bash, Python 3.10+ and, for the browser test, root or sudo (Debian's chromium via apt-get).
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AGG_HOME="${AGG_HOME:-$HOME/.cache/agg-comfyui}"
PY="${AGG_PYTHON:-$AGG_HOME/venv/bin/python}"
OLDER=(0.3.75 0.3.52)  # the versions scripts/setup.sh --older unpacks

bash "$PACK_DIR/scripts/setup.sh" --older
bash "$PACK_DIR/scripts/setup_browser.sh"
cd "$PACK_DIR"
"$PY" -m ruff check .

if [ "$#" -gt 0 ]; then
  exec "$PY" -m pytest "$@"
fi

status=0
t0=$SECONDS
"$PY" -m pytest || status=$?
echo "[agg-test] ComfyUI $(cat "${AGG_COMFYUI:-$AGG_HOME/ComfyUI-0.33.0}/.agg-unpacked" 2>/dev/null || echo '(AGG_COMFYUI)'): whole suite in $((SECONDS - t0)) s (exit $status)"

# The in-process node tests on each older ComfyUI: its own frontend packages come first on PYTHONPATH (the
# rest of the venv serves every version). The trained test model's guidance, Color Loss, mask-crop and half-precision
# tests run on 0.33.0 only, so the model is trained once; Flux.2 and Qwen-Image exist from 0.33 on, and 0.3.52
# builds the Wan 2.1 VAE at its fixed width (the video tests' small one does not load there).
for version in "${OLDER[@]}"; do
  dir="$AGG_HOME/ComfyUI-$version"
  t1=$SECONDS
  old_status=0
  AGG_COMFYUI="$dir" PYTHONPATH="$dir/.agg-site${PYTHONPATH:+:$PYTHONPATH}" \
    "$PY" -m pytest tests/nodes tests/integration --ignore=tests/nodes/test_trained_guidance.py \
    --ignore=tests/nodes/test_color_loss.py --ignore=tests/nodes/test_half_precision.py \
    --ignore=tests/nodes/test_image_families.py --ignore=tests/nodes/test_mask_crop.py \
    --ignore=tests/nodes/test_video_model.py --ignore=tests/nodes/test_video_losses.py -p no:cacheprovider \
    || old_status=$?
  echo "[agg-test] ComfyUI $version: tests/nodes tests/integration in $((SECONDS - t1)) s (exit $old_status)"
  [ "$old_status" = 0 ] || status=1
done

[ "$status" = 0 ]
