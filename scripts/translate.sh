#!/usr/bin/env bash
# The pack's main job: translate photos with an AGG workflow in a headless ComfyUI.
#
#   bash scripts/translate.sh                     # a demo run on the generated toy model (colour transfer)
#   bash scripts/translate.sh --image photo.jpg --source "a photo of a cat" \
#       --target "a watercolor painting of a cat" \
#       --checkpoint /models/v1-5-pruned-emaonly.safetensors --clip /models/open_clip_model.safetensors
#   bash scripts/translate.sh --help              # every option (python -m agg_cli --help)
#
# Builds the environment first if needed (scripts/setup.sh). Without --checkpoint, --clip and
# --server it uses small generated test models (tests/make_fixtures.py, cached under
# $AGG_HOME/fixtures) and says so: a toy SD1.5 trained on this machine on a few photos (about 5
# minutes the first time), which can follow a colour reference (Structure + Color Loss, the default
# demo workflow) but knows nothing of text; CLIP-guided workflows run on it only to show the job runs.
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AGG_HOME="${AGG_HOME:-$HOME/.cache/agg-comfyui}"
PY="${AGG_PYTHON:-$AGG_HOME/venv/bin/python}"

# The test models of the demo run, in the tree tests/make_fixtures.py lays out. Change these
# lines (and only these) to demo other test models.
DEMO_MODELS="$AGG_HOME/fixtures/demo-models"
DEMO_CHECKPOINT="checkpoints/agg-trained-sd15.safetensors"
DEMO_CLIP="open_clip/agg-tiny-open-clip.safetensors"
DEMO_CONTROLNET="controlnet/agg-tiny-controlnet.safetensors"
DEMO_VAE_APPROX="vae_approx_trained"
DEMO_SOURCE="demo/color_source.png"
DEMO_REFERENCE="demo/color_reference.png"
DEMO_WORKFLOW="color_transfer"
DEMO_COLOR_WEIGHT="0.3"

given() {  # given FLAG ARGS...: whether FLAG (or FLAG=...) is among ARGS
  local flag="$1" a
  shift
  for a in "$@"; do
    if [ "$a" = "$flag" ] || [ "${a#"$flag"=}" != "$a" ]; then return 0; fi
  done
  return 1
}

cli() { PYTHONPATH="$PACK_DIR${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m agg_cli "$@"; }

if given --help "$@" || given -h "$@"; then
  if [ -x "$PY" ]; then cli --help; else sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; fi
  exit 0
fi

bash "$PACK_DIR/scripts/setup.sh"

demo=()
if ! given --server "$@" && ! given --checkpoint "$@" && ! given --clip "$@"; then
  echo "=============================================================================="
  echo "NOTE: no --checkpoint / --clip / --server given: using GENERATED TEST MODELS"
  echo "(made on this machine by tests/make_fixtures.py): a TOY SD1.5 trained in"
  echo "minutes on a few photos, blurry and 128 px. The demo moves the colours of a"
  echo "photo of a coffee cup toward those of a rocket at dusk while keeping its layout"
  echo "(Structure + Color Loss, workflow color_transfer): a toy's translation, not what"
  echo "a real model does. For real results pass --checkpoint and --clip with real"
  echo "weights (see README)."
  echo "=============================================================================="
  mkdir -p "$AGG_HOME/fixtures"
  if [ ! -e "$DEMO_MODELS/$DEMO_CHECKPOINT" ]; then
    echo "making the test models (the toy model is trained once, about 5 minutes on 2 cores; log: $AGG_HOME/fixtures/demo-models.txt)"
  fi
  "$PY" "$PACK_DIR/tests/make_fixtures.py" "$DEMO_MODELS" --no-kl --trained --no-evidence \
    > "$AGG_HOME/fixtures/demo-models.txt" 2>&1 || { cat "$AGG_HOME/fixtures/demo-models.txt" >&2; exit 1; }
  for f in "$DEMO_CHECKPOINT" "$DEMO_CLIP" "$DEMO_CONTROLNET" "$DEMO_VAE_APPROX" "$DEMO_SOURCE" "$DEMO_REFERENCE"; do
    [ -e "$DEMO_MODELS/$f" ] || { echo "error: the test model $DEMO_MODELS/$f was not generated (see $AGG_HOME/fixtures/demo-models.txt)" >&2; exit 1; }
  done
  demo=(--test-models --checkpoint "$DEMO_MODELS/$DEMO_CHECKPOINT" --clip "$DEMO_MODELS/$DEMO_CLIP"
        --vae-approx "$DEMO_MODELS/$DEMO_VAE_APPROX")
  if ! given --workflow "$@"; then  # the demo proper: a colour transfer the toy model can follow
    demo+=(--workflow "$DEMO_WORKFLOW")
    if ! given --image "$@" && ! given --images-dir "$@"; then
      demo+=(--image "$DEMO_MODELS/$DEMO_SOURCE" --source "a photo" --target "a photo")
    fi
    given --style-image "$@" || demo+=(--style-image "$DEMO_MODELS/$DEMO_REFERENCE")
    given --color-weight "$@" || demo+=(--color-weight "$DEMO_COLOR_WEIGHT")
  fi
  if given --workflow "$@" && [[ " $* " == *" controlnet "* || "$*" == *"--workflow=controlnet"* ]]; then
    demo+=(--controlnet "$DEMO_MODELS/$DEMO_CONTROLNET")
  fi
fi
cli ${demo[@]+"${demo[@]}"} "$@"
