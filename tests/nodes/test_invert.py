"""AGG Invert in real graphs: DDIM inversion followed by noise-free sampling gives the source back with an
exact denoiser; its trajectory feeds Structure Loss (the paper's chain) on the tiny fixture."""

from __future__ import annotations

import math

import pytest
import torch
from agg_testing import probes
from agg_testing.fixtures import CHECKPOINT_TINY
from agg_testing.graphs import Graph

STEPS = 6
DENOISE = 0.6


@pytest.fixture(scope="module")
def session(comfy):
    probes.register()
    return comfy


def invert_graph(*, analytic_std: float | None = 0.5, flow: bool = False, size: int = 32, steps: int = STEPS) -> Graph:
    """source -> AGG Invert -> SamplerCustomAdvanced (DisableNoise, euler, cfg 1, same sigmas). Roles: encode,
    model, sigmas, invert, guider, custom."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", name="ckpt", ckpt_name=CHECKPOINT_TINY)
    pos = g.node("CLIPTextEncode", name="positive", clip=ckpt[1], text="a photo of a landscape")
    load = g.node("LoadImage", name="load", image="example.png")
    scale = g.node("ImageScale", name="scale", image=load[0], upscale_method="bilinear", width=size, height=size,
                   crop="center")
    enc = g.node("VAEEncode", name="encode", pixels=scale[0], vae=ckpt[2])
    model = ckpt[0]
    if flow:
        model = g.node("ModelSamplingSD3", name="flow", model=model, shift=3.0)[0]
    if analytic_std is not None:
        model = g.node("AGGTestAnalyticModel", name="model", model=model, latent=enc[0], std=analytic_std,
                       mean_scale=0.5)[0]
    sigmas = g.node("BasicScheduler", name="sigmas", model=model, scheduler="normal", steps=steps, denoise=DENOISE)
    inv = g.node("AGGInvert", name="invert", model=model, latent=enc[0], positive=pos[0], sigmas=sigmas[0])
    guider = g.node("CFGGuider", name="guider", model=model, positive=pos[0], negative=pos[0], cfg=1.0)
    select = g.node("KSamplerSelect", name="select", sampler_name="euler")
    noise = g.node("DisableNoise", name="noise")
    custom = g.node("SamplerCustomAdvanced", name="custom", noise=noise[0], guider=guider[0], sampler=select[0],
                    sigmas=sigmas[0], latent_image=inv[0])
    g.node("SaveLatent", name="save_latent", samples=custom[0], filename_prefix="agg_invert")
    return g


def run(session, g: Graph):
    r = session.run(g.prompt)
    assert r.ok, r.error_text()
    return r


def kernel_reconstruction(r, g, flow: bool) -> torch.Tensor:
    """The same inversion and reconstruction by a DDIM loop written out in the test (analytic.ddim_round_trip)
    with the analytic denoiser."""
    from agg_testing.analytic import ddim_round_trip, gaussian

    family = "const" if flow else "eps"
    model = r.output(g["model"].id)
    source = model.model.process_latent_in(r.output(g["encode"].id)["samples"].float())
    data = gaussian(0.5 * source[0], 0.5)
    sigmas = r.output(g["sigmas"].id).flatten().double().float().tolist()
    denoise = lambda x, s: data.denoise(x, s, family)  # noqa: E731
    return model.model.process_latent_out(ddim_round_trip(denoise, source, sigmas, family))


@pytest.mark.parametrize("flow", [False, True], ids=["eps", "flow"])
def test_inversion_then_noise_free_sampling_reconstructs_the_source(session, flow):
    errors = []
    for steps in (STEPS, 4 * STEPS):
        g = invert_graph(flow=flow, steps=steps)
        r = run(session, g)
        source = r.output(g["encode"].id)["samples"]
        inverted = r.output(g["invert"].id)["samples"]
        out = r.output(g["custom"].id)["samples"]
        # the graph (inversion node, latent hand-over, stock sampler) does exactly the kernel's DDIM maths
        assert torch.allclose(out, kernel_reconstruction(r, g, flow), atol=1e-4)
        scale = float(source.abs().mean())
        moved = float((inverted - source).abs().mean())
        errors.append(float((out - source).abs().mean()))
        print(f"{'flow' if flow else 'eps'} {steps} steps: reconstruction L1 {errors[-1]:.3e}, inverted latent "
              f"moved {moved:.3f}, |source| {scale:.3f}")
        assert moved > 0.5 * scale  # the inversion really noised the latent
        assert errors[-1] < 0.5 * moved
    # the remaining error is DDIM inversion's discretisation error: it shrinks with the step count
    assert errors[1] < 0.5 * errors[0]
    assert errors[1] < 0.1 * scale


def test_trajectory_is_ascending_and_aligned_with_the_sigmas(session):
    g = invert_graph()
    r = run(session, g)
    sigmas = r.output(g["sigmas"].id).flatten().double()
    traj = r.output(g["invert"].id, index=1)
    source = r.output(g["encode"].id)["samples"]
    assert traj.sigmas.ndim == 1 and bool((traj.sigmas[1:] > traj.sigmas[:-1]).all())
    assert torch.allclose(traj.sigmas.double(), torch.sort(sigmas).values, rtol=1e-5, atol=1e-6)
    assert traj.denoised.shape == (len(sigmas), *source.shape)
    # at sigma 0 the clean estimate of the clean source is the source itself (model latent space)
    model = r.output(g["model"].id)
    assert torch.allclose(traj.denoised[0], model.model.process_latent_in(source), atol=1e-5)


def test_inversion_reports_progress(session):
    g = invert_graph(analytic_std=0.6)
    r = run(session, g)
    progress = [m for m in r.events("progress") if m["node"] == g["invert"].id]
    assert progress, [e for e, _ in r.messages]
    # one unit per inversion step, from the first to the last (ComfyUI 0.33 throttles the updates in between)
    values = [m["value"] for m in progress]
    assert values[0] == 1 and values == sorted(values), values
    assert progress[-1]["value"] == progress[-1]["max"] >= STEPS * DENOISE


def paper_chain(weight: float) -> Graph:
    """AGG Invert -> Structure Loss(trajectory, weight) -> AGG Guider -> SamplerCustomAdvanced (AGG Sampler, noise
    disabled) on the tiny UNet; with 3 steps the window covers all of them (end_percent 0.6 would guide one)."""
    g = invert_graph(analytic_std=None, steps=3)
    ckpt = g["ckpt"]
    neg = g.node("CLIPTextEncode", name="negative", clip=ckpt[1], text="blurry")
    target = g.node("CLIPTextEncode", name="target", clip=ckpt[1], text="a watercolor painting")
    loss = g.node("AGGStructureLoss", name="loss", weight=weight, trajectory=g["invert"][1])
    g.prompt[g["guider"].id] = {"class_type": "AGGGuider", "inputs": {
        "model": ckpt[0], "positive": target[0], "negative": neg[0], "cfg": 5.0, "loss": loss[0],
        "start_percent": 0.0, "end_percent": 1.0, "manifold": "finite_difference", "dds_steps": 1, "dds_lr": 0.05,
        "asymmetric": True}}
    g.prompt[g["select"].id] = {"class_type": "AGGSampler", "inputs": {
        "eta_edit": 0.0, "eta": 0.0, "eta_boost": 1.0, "edit_end": 0.34, "boost_start": 0.67}}
    g.prompt[g["noise"].id] = {"class_type": "DisableNoise", "inputs": {}}
    return g


def test_paper_chain_invert_structure_trajectory_agg_guider(session):
    """The paper's chain on the tiny UNet: the result is closer to the source than the same chain at weight 0, and
    each guided step reports as its structure term the L1 distance between the guider's clean estimate and the
    trajectory's at that sigma plus half the state's gap to the inversion's state there (eps: alpha 1)."""
    g = paper_chain(0.5)
    with probes.guided_steps() as calls:
        r = run(session, g)
    out = r.output(g["custom"].id)["samples"]
    assert torch.isfinite(out).all()
    terms = r.events("agg.terms")
    assert terms and all("structure" in e["terms"] for e in terms)
    assert all(not e["skipped"] for e in terms)
    assert all(e["node"] == "AGG Guider" for e in terms)

    # the reported term is mean |D - (trajectory(sigma) + (state(sigma) - x) / 2)| at a recorded sigma of the
    # inversion while the state is within sigma (RMS) of the inversion's, else mean |D - trajectory(sigma)|; the run
    # starts from the inversion's top (noise disabled), so its first steps are
    traj = r.output(g["invert"].id, index=1)
    assert traj.states is not None and traj.states.shape == traj.denoised.shape
    near = []
    guided = [c for c in calls if c["terms"] is not None]
    assert len(guided) == len(terms)
    for c, e in zip(guided, terms, strict=True):
        assert e["sigma"] == pytest.approx(c["sigma"])
        hits = [j for j, s in enumerate(traj.sigmas.tolist()) if math.isclose(s, c["sigma"], rel_tol=1e-5)]
        assert len(hits) == 1, (c["sigma"], traj.sigmas.tolist())
        gap = traj.states[hits[0]].float() - c["x"]
        near.append(float(gap.pow(2).mean().sqrt()) <= c["sigma"])
        l1 = float((c["D"] - (traj.denoised[hits[0]].float() + 0.5 * gap * near[-1])).abs().mean())
        assert e["terms"]["structure"] == pytest.approx(l1, rel=1e-4), (c["sigma"], e["terms"], l1)
    assert near[0]

    # and the guidance keeps the source: closer to it than the unguided (weight 0) chain
    g0 = paper_chain(0.0)
    r0 = run(session, g0)
    source = r.output(g["encode"].id)["samples"]
    base = r0.output(g0["custom"].id)["samples"]
    guided_l1, unguided_l1 = float((out - source).abs().mean()), float((base - source).abs().mean())
    print(f"paper chain: L1 to the source {guided_l1:.4f} at weight 0.5, {unguided_l1:.4f} at weight 0")
    assert (out - base).abs().max() > 1e-3
    assert guided_l1 < unguided_l1
