"""ComfyUI's interrupt during a guided run (Apply AGG, AGG Guider, AGG Invert, a long CLIP step) stops it within
one model evaluation, and the next prompt runs."""

from __future__ import annotations

import uuid

import pytest
import torch
from agg_testing.graphs import img2img
from agg_testing.probes_errors import COUNTERS, Counter, register
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
    """img2img guided by Structure Loss (finite_difference: a model pass and a probe pass per sub-step of each
    guided step; the 4 steps over the whole schedule are long, so taken in several sub-steps). `probe`:
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


@pytest.fixture(scope="module")
def substeps(comfy) -> list[int]:
    """The sub-steps of each guided step of `guided`'s schedule (the same for every seed), from a whole run."""
    r = comfy.run(guided(59).prompt)
    assert r.ok, r.error_text()[:3000]
    subs = [e["substeps"] for e in r.events("agg.terms")]
    assert len(subs) == STEPS and sum(subs) > STEPS  # long steps: more probes than steps
    return subs


def step_ends(probe: str, subs: list[int]) -> list[int]:
    """The model calls counted by the end of each step: one outer call a step, or (inner) the sampler's pass
    and one finite-difference probe per sub-step."""
    ends, total = [], 0
    for n in subs:
        total += 1 if probe == "outer" else 1 + n
        ends.append(total)
    return ends


@pytest.mark.parametrize("probe,interrupt_after", [("outer", 2), ("inner", 2), ("inner", 3)])
def test_interrupt_stops_within_one_step_and_the_next_prompt_runs(comfy, substeps, probe, interrupt_after):
    tag = f"interrupt-{probe}-{interrupt_after}-{uuid.uuid4().hex[:8]}"
    g = guided(40 + interrupt_after, probe=probe, interrupt_after=interrupt_after, tag=tag)
    r = comfy.run(g.prompt)
    counter = COUNTERS[tag]
    assert counter.interrupted_at == interrupt_after
    kinds = [e["type"] for e in r.errors]
    assert kinds == ["execution_interrupted"], r.error_text()[:3000]
    assert not mm.processing_interrupted(), "the interrupt flag was left raised"
    ends = step_ends(probe, substeps)
    print(f"{probe}: interrupted after call {counter.interrupted_at}, {counter.after_interrupt} call(s) after it")
    # No model pass after the interrupt: the sampler's step callback stops an outer run, and AGG checks the
    # flag before each finite-difference pass (inner: calls 2 and 3 are the first step's probes).
    assert counter.after_interrupt == 0, f"{counter.after_interrupt} model calls after the interrupt"
    assert counter.calls < ends[-1]
    started = sum(1 for end in [0, *ends[:-1]] if end < interrupt_after)  # steps begun by the interrupt
    assert len(r.events("agg.terms")) <= started

    nxt = guided(50 + interrupt_after)
    r2 = comfy.run(nxt.prompt)
    assert r2.ok, r2.error_text()[:3000]
    assert torch.isfinite(r2.output(nxt["sampler"].id)["samples"]).all()
    assert len(r2.events("agg.terms")) == STEPS


def test_uninterrupted_counts(comfy, substeps):
    """The counts the interrupt test compares against: a full run makes STEPS outer calls, and STEPS inner calls
    plus one per sub-step."""
    for probe in ("outer", "inner"):
        tag = f"total-{probe}-{uuid.uuid4().hex[:8]}"
        g = guided(60, probe=probe, tag=tag)
        r = comfy.run(g.prompt)
        assert r.ok, r.error_text()[:3000]
        assert COUNTERS[tag].calls == step_ends(probe, substeps)[-1]


# -- AGG Invert, AGG Guider, and a guided step that takes long ----------------------------------------


def assert_interrupted(r, counter, *, within: int = 0) -> None:
    kinds = [e["type"] for e in r.errors]
    assert kinds == ["execution_interrupted"], r.error_text()[:3000]
    assert not mm.processing_interrupted(), "the interrupt flag was left raised"
    assert counter.interrupted_at is not None
    assert counter.after_interrupt <= within, f"{counter.after_interrupt} model calls after the interrupt"


def invert_graph(tag: str, interrupt_after: int):
    """AGG Invert of the source up to the top of a 4-step schedule, its model counted per model call."""
    g = img2img(seed=0, steps=STEPS, denoise=1.0)
    model = g.node("AGGTestCountModel", model=g["ckpt"][0], tag=tag, interrupt_after=interrupt_after)[0]
    sigmas = g.node("BasicScheduler", model=model, scheduler="normal", steps=STEPS, denoise=1.0)
    inv = g.node("AGGInvert", name="invert", model=model, latent=g["encode"][0], positive=g["positive"][0],
                 sigmas=sigmas[0])
    g.set_input(g["sampler"], latent_image=inv[0])
    return g


def test_interrupt_during_agg_invert(comfy):
    tag = f"interrupt-invert-{uuid.uuid4().hex[:8]}"
    r = comfy.run(invert_graph(tag, interrupt_after=2).prompt)
    counter = COUNTERS[tag]
    assert_interrupted(r, counter)
    assert counter.calls == 2 < STEPS + 1
    assert not r.events("agg.terms")
    nxt = invert_graph(f"after-{tag}", interrupt_after=0)
    r2 = comfy.run(nxt.prompt)
    assert r2.ok, r2.error_text()[:3000]
    assert COUNTERS[f"after-{tag}"].calls >= STEPS  # the whole inversion ran, then the KSampler


def guider_graph(seed: int, tag: str, interrupt_after: int):
    """SamplerCustomAdvanced with AGG Guider (Structure Loss, finite differences); every model pass counted."""
    g = img2img(seed=seed, steps=STEPS, denoise=1.0)
    ks = g.prompt.pop(g["sampler"].id)["inputs"]
    model = g.node("AGGTestCountModel", model=ks["model"], tag=tag, interrupt_after=interrupt_after,
                   level="calc_cond_batch")[0]
    loss = g.node("AGGStructureLoss", weight=0.5, source=g["encode"][0])
    guider = g.node("AGGGuider", model=model, positive=ks["positive"], negative=ks["negative"], cfg=5.0, loss=loss[0],
                    start_percent=0.0, end_percent=1.0, manifold="finite_difference", dds_steps=1, dds_lr=0.05,
                    asymmetric=True)
    sigmas = g.node("BasicScheduler", model=ks["model"], scheduler="normal", steps=STEPS, denoise=1.0)
    select = g.node("KSamplerSelect", sampler_name="euler")
    noise = g.node("RandomNoise", noise_seed=seed)
    custom = g.node("SamplerCustomAdvanced", name="custom", noise=noise[0], guider=guider[0], sampler=select[0],
                    sigmas=sigmas[0], latent_image=g["encode"][0])
    g.set_input(g["decode"], samples=custom[0])
    return g


@pytest.mark.parametrize("interrupt_after", [2, 3])
def test_interrupt_under_agg_guider(comfy, substeps, interrupt_after):
    """After the first step's last probe pass the sampler's step callback stops the run; after the next main pass
    the guidance's own check stops it before its probe pass."""
    interrupt_after = substeps[0] + interrupt_after - 1  # 2: the end of the first step; 3: the second's main pass
    tag = f"interrupt-guider-{interrupt_after}-{uuid.uuid4().hex[:8]}"
    r = comfy.run(guider_graph(70 + interrupt_after, tag, interrupt_after).prompt)
    counter = COUNTERS[tag]
    assert counter.interrupted_at == interrupt_after
    assert_interrupted(r, counter)
    assert len(r.events("agg.terms")) == 1  # the first step's; the second never reports
    tag2 = f"after-{tag}"
    r2 = comfy.run(guider_graph(80 + interrupt_after, tag2, 0).prompt)
    assert r2.ok, r2.error_text()[:3000]
    assert COUNTERS[tag2].calls == step_ends("inner", substeps)[-1] and len(r2.events("agg.terms")) == STEPS


def test_interrupt_during_a_long_guided_step(comfy, agg_models, monkeypatch):
    """CLIP Direction Loss with the full VAE decoder: the interrupt arrives while the step decodes (not during
    a model pass); at most one model evaluation follows it."""
    from agg_testing.probes import pack_module

    tag = f"interrupt-clip-{uuid.uuid4().hex[:8]}"
    g = img2img(seed=90, steps=STEPS, denoise=1.0)
    clip = g.node("AGGCLIPLoader", clip_name=agg_models.open_clip)
    loss = g.node("AGGCLIPDirectionLoss", clip=clip[0], vae=g["ckpt"][2], source_text="a photo",
                  target_text="a watercolor painting", weight=0.1, decoder="vae", cutouts=1, seed=0)
    agg = g.node("AGGApply", model=g["ckpt"][0], loss=loss[0], start_percent=0.0, end_percent=1.0,
                 manifold="finite_difference", dds_steps=1, dds_lr=0.5, asymmetric=True)[0]
    counted = g.node("AGGTestCountModel", model=agg, tag=tag, interrupt_after=0, level="calc_cond_batch")[0]
    g.set_input(g["sampler"], model=counted)
    counter = COUNTERS.setdefault(tag, Counter())

    decoders = pack_module("nodes.decoders")
    make = decoders.vae_decoder
    decodes = []

    def vae_decoder(vae, run):
        decode = make(vae, run)

        def interrupting(x0):
            decodes.append(counter.calls)
            if len(decodes) == 1:  # the first guided step's first decode: ComfyUI's /interrupt arrives now
                mm.interrupt_current_processing(True)
                counter.interrupted_at = counter.calls
            return decode(x0)

        return interrupting

    monkeypatch.setattr(decoders, "vae_decoder", vae_decoder)
    r = comfy.run(g.prompt)
    monkeypatch.undo()
    assert decodes and counter.interrupted_at == 1  # after the first step's model pass, inside its guided step
    print(f"long step: interrupted at model call {counter.interrupted_at}, {counter.after_interrupt} after it")
    assert_interrupted(r, counter, within=1)
    assert counter.calls < STEPS
    assert_next = guided(91)
    r2 = comfy.run(assert_next.prompt)
    assert r2.ok, r2.error_text()[:3000]
    assert len(r2.events("agg.terms")) == STEPS
