"""tests/bench/run.py --quick runs end to end and writes well-formed ratios (no timing thresholds)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent / "run.py"
MODES = ("structure_none", "structure_fd", "structure_autograd", "clip_taesd", "clip_vae")


def test_quick_benchmark_writes_positive_finite_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(RUN), "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("ratios", "peak_rss_ratio", "median_seconds", "seconds", "steps", "guided_fraction", "machine"):
        assert key in report, f"missing {key!r} in {sorted(report)}"
    assert set(report["ratios"]) == set(MODES)
    assert set(report["peak_rss_ratio"]) == set(MODES)
    for table in ("ratios", "peak_rss_ratio"):
        for mode, value in report[table].items():
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (table, mode, value)
    assert report["steps"] == 20
    # 20 normal-scheduler steps with the window end_percent 0.35: a strict, non-empty part of the run is guided
    assert 0 < report["guided_fraction"] < 1
    assert "plain" in report["median_seconds"] and report["median_seconds"]["plain"] > 0
