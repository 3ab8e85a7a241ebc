"""README's first command: `bash scripts/translate.sh` sets up (already done here), generates the
demo's test models, says so, starts its own headless ComfyUI and writes the result, the side-by-side
comparison, the per-step report and its plot into the output folder it prints, with the server log's
path."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

PACK_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.server
@pytest.mark.slow
def test_translate_sh_demo_end_to_end(tmp_path):
    env = {**os.environ}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        ["bash", str(PACK_ROOT / "scripts" / "translate.sh"), "--steps", "3", "--size", "64", "--seed", "7"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "GENERATED TEST MODELS" in out  # says plainly that no real weights were given
    done = re.search(r"^done: 1 of 1 images in .* -> (.+)$", out, re.M)
    assert done, out[-2000:]
    folder = Path(done.group(1).strip())
    assert folder.parent == tmp_path / "agg-output"  # under the current folder, not deep in a cache
    log = re.search(r"^server log: (.+)$", out, re.M)
    assert log and Path(log.group(1)).is_file() and "Starting server" in Path(log.group(1)).read_text()
    for name in ("example_agg.png", "example_unguided.png", "example_side_by_side.png", "example_terms.json",
                 "example_terms.png", "summary.json"):
        assert (folder / name).is_file(), sorted(p.name for p in folder.iterdir())
    with Image.open(folder / "example_side_by_side.png") as im:
        assert im.width > 2 * im.height  # source | unguided | AGG
        # square panels below a 24 px label band, 8 px apart: the AGG panel is not the unguided one
        import numpy as np

        side, panel = np.asarray(im.convert("RGB"), dtype=np.float32), im.height - 24
        unguided_panel, agg_panel = (side[24:, k * (panel + 8):k * (panel + 8) + panel] for k in (1, 2))
        assert np.abs(agg_panel - unguided_panel).mean() > 1.0, "the AGG panel equals the unguided one"
    with Image.open(folder / "example_agg.png") as im, Image.open(folder / "example_unguided.png") as un:
        assert np.abs(np.asarray(im, dtype=np.float32) - np.asarray(un, dtype=np.float32)).mean() > 1.0
    with Image.open(folder / "example_agg.png") as im:
        assert im.size == (64, 64)  # ComfyUI's example.png is square
    report = json.loads((folder / "example_terms.json").read_text())
    assert report["events"], "no per-step AGG report arrived"
    assert all(isinstance(e.get("terms"), dict) and e["terms"] for e in report["events"])
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["test_models"] is True and summary["images"][0]["status"] == "done"
    assert "[AGG" in out and "step 3/3" in out  # per-image progress bars were shown
