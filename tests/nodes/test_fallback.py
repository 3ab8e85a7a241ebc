"""The Jacobian fallback says so: where the probed denoiser's step points uphill, the guided step uses the
unit-variance prior's covariance instead, and both the log line of that step and its 'agg.terms' event name it
(README, "Guidance strength"; docs/DESIGN.md §1.2 step 2)."""

from __future__ import annotations

import logging

import pytest
import torch
from agg_testing import graphs, probes

STEPS = 3


@pytest.fixture(scope="module")
def session(comfy):
    probes.register()
    return comfy


def uphill_run(session, manifold: str):
    """img2img on the denoiser D(x) = -x / 2 (probes.AGGTestUphillModel), Structure Loss weight 0.05, no
    refinement: (run result, the hook's records)."""
    g = probes.agg_img2img(seed=341, steps=STEPS, weight=None)
    graphs.insert_model_patch(g, "AGGTestUphillModel", name="uphill", slope=0.5)
    apply = probes.add_agg(g, weight=0.05, manifold=manifold)
    g.set_input(apply, dds_steps=0)
    with probes.guided_steps() as calls:
        r = session.run(g.prompt)
    assert r.ok, r.error_text()
    return r, calls


def test_fallback_is_reported_in_the_log_line_and_the_event(session, caplog):
    with caplog.at_level(logging.INFO, logger="AGG"):
        r, calls = uphill_run(session, "finite_difference")
    agg = [rec for rec in caplog.records if rec.name == "AGG"]
    lines = [rec.getMessage() for rec in agg if rec.levelno == logging.INFO and " step " in rec.getMessage()]
    warnings = [rec.getMessage() for rec in agg if rec.levelno >= logging.WARNING]
    events = r.events("agg.terms")
    assert len(events) == STEPS and len(lines) == STEPS, (events, lines)
    for e, line in zip(events, lines, strict=True):
        assert e["fallback"] and "not a descent direction" in e["fallback"], e
        assert "fallback: finite_difference step not a descent direction" in line, line
    # one warning per run, naming the node and pointing at the per-step report
    fallback_warnings = [w for w in warnings if "not a descent direction" in w]
    assert len(fallback_warnings) == 1 and "Apply AGG" in fallback_warnings[0], warnings

    # what it fell back to: the prior covariance's step, the same as manifold none's, of RMS
    # rate * weight * sigma^2 / (1 + sigma^2) at most (rate: the step's share of schedule time)
    _, prior_calls = uphill_run(session, "none")
    first, prior = calls[0], prior_calls[0]
    assert first["guided"] and prior["guided"] and first["sigma"] == prior["sigma"]
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    bound = first["terms"]["rate"] * 0.05 * first["sigma"] ** 2 / (1 + first["sigma"] ** 2)
    print(f"sigma {first['sigma']:.4g}: fallback step rms {rms(first['delta']):.5f}, "
          f"prior step rms {rms(prior['delta']):.5f}, bound {bound:.5f}")
    assert torch.allclose(first["delta"], prior["delta"], atol=1e-6, rtol=1e-4)
    # measured: 0.856 of the bound (Structure Loss stops the elements that reach the source there)
    assert 0.8 * bound < rms(first["delta"]) <= bound * 1.001


def test_a_covariance_step_reports_no_fallback(session, caplog):
    """The tiny model's own conditional Jacobian on the same graph: no fallback in the event or the log."""
    g = probes.agg_img2img(seed=342, steps=STEPS, weight=0.05)
    with caplog.at_level(logging.INFO, logger="AGG"):
        r = session.run(g.prompt)
    assert r.ok, r.error_text()
    events = r.events("agg.terms")
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "AGG" and " step " in rec.getMessage()]
    assert len(events) == STEPS and all(e["fallback"] is None for e in events), events
    assert not any("fallback" in line for line in lines), lines
