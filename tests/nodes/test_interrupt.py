"""ComfyUI's interrupt during a guided run stops it within one step, and the next prompt runs."""

from __future__ import annotations

import uuid

import pytest
import torch
from agg_testing.graphs import img2img
from agg_testing.probes_errors import COUNTERS, register
from comfy import model_management as mm

STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def probes(comfy):
    register()


@pytest.fixture(autouse=True)
def clear_flag():
    yield
    mm.interrupt_current_processing(False)


def guided(seed: int, *, probe: str | None = None, interrupt_after: int = 0, tag: str = "") -> tuple:
    """img2img guided by Structure Loss (finite_difference: two model passes per guided step). `probe`:
    where the counting model sits, "outer" (before Apply AGG: it counts sampler steps) or "inner" (after
    Apply AGG, at calc_cond_batch: it counts every model pass, the guidance's conditional probe included)."""
    g = img2img(seed=seed, steps=STEPS, denoise=1.0)
    model = g["ckpt"][0]
    if probe == "outer":
        model = g.node("AGGTestCountModel", model=model, tag=tag, interrupt_after=interrupt_after)[0]
    loss = g.node("AGGStructureLoss", weight=0.5, source=g["encode"][0])
    agg = g.node("AGGApply", model=model, loss=loss[0], start_percent=0.0, end_percent=1.0,
                 manifold="finite_difference", dds_steps=1, dds_lr=0.05, asymmetric=True)[0]
    if probe == "inner":
        agg = g.node("AGGTestCountModel", model=agg, tag=tag, interrupt_after=interrupt_after,
                     level="calc_cond_batch")[0]
    g.set_input(g["sampler"], model=agg)
    return g


@pytest.mark.parametrize("probe,interrupt_after", [("outer", 2), ("inner", 2), ("inner", 3)])
def test_interrupt_stops_within_one_step_and_the_next_prompt_runs(comfy, probe, interrupt_after):
    tag = f"interrupt-{probe}-{interrupt_after}-{uuid.uuid4().hex[:8]}"
    g = guided(40 + interrupt_after, probe=probe, interrupt_after=interrupt_after, tag=tag)
    r = comfy.run(g.prompt)
    counter = COUNTERS[tag]
    assert counter.interrupted_at == interrupt_after
    kinds = [e["type"] for e in r.errors]
    assert kinds == ["execution_interrupted"], r.error_text()[:3000]
    assert not mm.processing_interrupted(), "the interrupt flag was left raised"
    # One sampler step is one outer call, or two inner ones (the model pass and the finite-difference pass).
    per_step = 1 if probe == "outer" else 2
    print(f"{probe}: interrupted after call {counter.interrupted_at}, {counter.after_interrupt} call(s) after it")
    # No model pass after the interrupt: the sampler's step callback stops an outer run, and AGG checks the
    # flag before its extra finite-difference pass (inner, interrupt_after=3).
    assert counter.after_interrupt == 0, f"{counter.after_interrupt} model calls after the interrupt"
    assert counter.calls < STEPS * per_step
    assert len(r.events("agg.terms")) <= (interrupt_after + per_step - 1) // per_step

    nxt = guided(50 + interrupt_after)
    r2 = comfy.run(nxt.prompt)
    assert r2.ok, r2.error_text()[:3000]
    assert torch.isfinite(r2.output(nxt["sampler"].id)["samples"]).all()
    assert len(r2.events("agg.terms")) == STEPS


def test_uninterrupted_counts(comfy):
    """The counts the interrupt test compares against: a full run makes STEPS outer and 2*STEPS inner calls."""
    for probe, per_step in (("outer", 1), ("inner", 2)):
        tag = f"total-{probe}-{uuid.uuid4().hex[:8]}"
        g = guided(60, probe=probe, tag=tag)
        r = comfy.run(g.prompt)
        assert r.ok, r.error_text()[:3000]
        assert COUNTERS[tag].calls == STEPS * per_step
