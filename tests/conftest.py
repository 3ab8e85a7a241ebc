"""Test session set-up: find the ComfyUI tree the set-up script built and make it importable."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
AGG_HOME = Path(os.environ.get("AGG_HOME", Path.home() / ".cache" / "agg-comfyui"))
COMFYUI_DIR = Path(os.environ.get("AGG_COMFYUI", AGG_HOME / "ComfyUI"))

if not (COMFYUI_DIR / "main.py").exists():
    raise RuntimeError(f"no ComfyUI at {COMFYUI_DIR}: run scripts/setup.sh (or scripts/test.sh) first")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# ComfyUI first: its top-level `nodes` module must win over the pack's `nodes/` package. The pack root
# comes last so tests can import `agg_kernels` alone; `tests/` holds the shared `agg_testing` helpers.
if str(COMFYUI_DIR) not in sys.path:
    sys.path.insert(0, str(COMFYUI_DIR))
for p in (str(PACK_ROOT), str(PACK_ROOT / "tests")):
    if p not in sys.path:
        sys.path.append(p)

# ComfyUI reads its command-line options at import time: make it a CPU run that ignores pytest's argv.
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
