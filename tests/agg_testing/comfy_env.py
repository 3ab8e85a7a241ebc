"""How to make ComfyUI importable (tests, benchmarks); where it lives is agg_dev.comfy_env's.

ComfyUI goes first on sys.path (its top-level `nodes` module must win over the pack's `nodes/`
package); the pack root and tests/ come last so `agg_kernels` and `agg_testing` import alone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(PACK_ROOT))  # agg_dev, agg_cli: the pack's tools, shared with scripts/
from agg_dev.comfy_env import AGG_HOME, COMFYUI_DIR  # noqa: E402

__all__ = ["AGG_HOME", "COMFYUI_DIR", "PACK_ROOT", "configure_comfy", "make_importable"]


def make_importable() -> None:
    """Put ComfyUI, the pack root and tests/ on sys.path; offline hub. Raises when ComfyUI is missing."""
    if not (COMFYUI_DIR / "main.py").exists():
        raise RuntimeError(f"no ComfyUI at {COMFYUI_DIR}: run scripts/setup.sh (or scripts/test.sh) first")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(COMFYUI_DIR) not in sys.path:
        sys.path.insert(0, str(COMFYUI_DIR))
    for p in (str(PACK_ROOT), str(PACK_ROOT / "tests")):
        if p not in sys.path:
            sys.path.append(p)


def configure_comfy(cpu: bool = True) -> None:
    """ComfyUI reads its options at import time: no argv parsing, and CPU mode unless told otherwise."""
    make_importable()
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
