"""Where the pack's tools and tests find the ComfyUI that scripts/setup.sh builds."""

from __future__ import annotations

import os
from pathlib import Path

from agg_cli.main import SETUP_COMFYUI

AGG_HOME = Path(os.environ.get("AGG_HOME", Path.home() / ".cache" / "agg-comfyui"))
# The ComfyUI scripts/setup.sh builds; AGG_COMFYUI selects another (the older ones).
COMFYUI_DIR = Path(os.environ.get("AGG_COMFYUI", AGG_HOME / SETUP_COMFYUI))
