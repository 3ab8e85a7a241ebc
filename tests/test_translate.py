"""README's first command: scripts/translate.py runs the text-guided workflow in a real headless
ComfyUI and writes the result, the side-by-side comparison and the loss-term plot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

PACK_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.server
@pytest.mark.slow
def test_translate_default_workflow_end_to_end():
    proc = subprocess.run(
        [sys.executable, str(PACK_ROOT / "scripts" / "translate.py"), "--steps", "3", "--size", "64", "--seed", "7"],
        capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "RANDOM-WEIGHT TEST MODELS" in out  # says plainly that no real weights were given
    done = re.search(r"^done: (.+)$", out, re.M)
    assert done, out[-2000:]
    folder = Path(done.group(1).strip())
    side = sorted(folder.glob("*_side_by_side.png"))
    plot = sorted(folder.glob("*_terms.png"))
    assert side and plot, sorted(p.name for p in folder.iterdir())
    with Image.open(side[0]) as im:
        assert im.width > 2 * im.height  # source | unguided | AGG
    results = [p for p in folder.iterdir() if p.suffix == ".png" and p not in side + plot]
    assert results, sorted(p.name for p in folder.iterdir())
