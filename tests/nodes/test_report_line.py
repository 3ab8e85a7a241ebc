"""The per-step log line: which bound shortened the step, and which term asked for no pull, in a few words."""

from __future__ import annotations

import logging

import torch
from agg_testing.probes import pack_module


def line(caplog, **fields) -> str:
    runtime = pack_module("nodes.runtime")
    guidance = pack_module("agg_kernels.guidance")
    result = guidance.GuidanceResult(torch.zeros(1), {"range": 1e-6}, None, {"range": 1e-3}, {"range": 0.1}, 0.2,
                                     **fields)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="AGG"):
        runtime.report("Apply AGG", 3, 1.5, result)
    return caplog.records[-1].getMessage()


def test_the_line_says_which_bound_acted_and_stays_short(comfy, caplog):
    plain = line(caplog)
    assert "capped" not in plain and "no pull" not in plain
    assert line(caplog, trust_region=True).endswith("; step rms 0.2, capped: trust region")
    assert line(caplog, element_bound=True).endswith("; step rms 0.2, capped: element bound")
    both = line(caplog, trust_region=True, element_bound=True)
    assert both.endswith("capped: trust region + element bound") and len(both) - len(plain) < 40
    idle = line(caplog, idle={"range": "zero gradient above its floor"})
    assert idle.endswith(", no pull from range (zero gradient)")
