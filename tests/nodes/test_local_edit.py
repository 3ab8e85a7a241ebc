"""Local edits: the loss nodes' `mask` input in real prompts, alone and with ComfyUI's SetLatentNoiseMask.

White = the region to change. The target loss judges and pulls only there; Structure Loss holds only the rest.
Latents are 8 x 8 (64 px images); the mask is the left half of the image (latent columns 0-3).
"""

from __future__ import annotations

import pytest
import torch
from agg_testing.graphs import Graph, img2img

SEEDS = iter(range(17000, 18000))
SIZE = 64


def left_half(g: Graph) -> list:
    """A MASK that is white on the left half: SolidMask 0, with a SolidMask 1 of half the width added at x=0."""
    zero = g.node("SolidMask", value=0.0, width=SIZE, height=SIZE)
    half = g.node("SolidMask", value=1.0, width=SIZE // 2, height=SIZE)
    return g.node("MaskComposite", name="mask", destination=zero[0], source=half[0], x=0, y=0, operation="add")[0]


def graph(seed: int, *, masked: bool, guided: bool = True, noise_mask: bool = False) -> Graph:
    g = img2img(seed=seed, steps=3, size=SIZE, denoise=0.6)
    mask = left_half(g) if masked or noise_mask else None
    if noise_mask:
        nm = g.node("SetLatentNoiseMask", samples=g["encode"][0], mask=mask)
        g.set_input(g["sampler"], latent_image=nm[0])
    if not guided:
        return g
    extra = {"mask": mask} if masked else {}
    structure = g.node("AGGStructureLoss", name="structure", weight=0.1, source=g["encode"][0], **extra)
    clip = g.node("AGGCLIPLoader", clip_name="agg-tiny-open-clip.safetensors", architecture="auto")
    loss = g.node("AGGCLIPDirectionLoss", name="clip_loss", clip=clip[0], vae=g["ckpt"][2], source_text="a photo",
                  target_text="a watercolor painting", weight=0.5, decoder="linear", cutouts=2, seed=0,
                  loss=structure[0], **extra)
    agg = g.node("AGGApply", model=g["ckpt"][0], loss=loss[0], start_percent=0.0, end_percent=1.0, manifold="none",
                 dds_steps=0, dds_lr=0.5, asymmetric=True)
    g.set_input(g["sampler"], model=agg[0])
    return g


def run(comfy, g: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    r = comfy.run(g.prompt)
    assert r.ok, r.error_text()[:3000]
    return r.output(g["sampler"].id)["samples"].float(), r.output(g["encode"].id)["samples"].float()


def halves(t: torch.Tensor) -> tuple[float, float]:
    """Mean |t| over the masked (left) and unmasked (right) latent columns."""
    return float(t[..., :4].abs().mean()), float(t[..., 4:].abs().mean())


def test_mask_edits_inside_and_holds_outside(comfy, agg_models):
    seed = next(SEEDS)
    plain, source = run(comfy, graph(seed, masked=False, guided=False))
    masked, _ = run(comfy, graph(seed, masked=True))
    unmasked, _ = run(comfy, graph(seed, masked=False))
    # What the guidance changed, against the same seed unguided.
    m_in, m_out = halves(masked - plain)
    u_in, u_out = halves(unmasked - plain)
    print(f"change by guidance: masked in {m_in:.4f} out {m_out:.4f}; unmasked in {u_in:.4f} out {u_out:.4f}")
    assert m_in > 0.02  # the masked region is edited
    # The rest moves much less: only through the network's response to the edited region (the UNet sees the
    # whole latent at the next step), which SetLatentNoiseMask removes (next test).
    assert m_out / m_in < 0.5 * (u_out / u_in)
    assert u_out > 0.5 * u_in  # without a mask both halves move: the localisation is the mask's doing
    # Distance to the source: the unmasked region stays closer to it than the masked one.
    d_in, d_out = halves(masked - source)
    p_in, p_out = halves(plain - source)
    print(f"distance to source: masked run in {d_in:.4f} out {d_out:.4f}; plain in {p_in:.4f} out {p_out:.4f}")
    assert d_out / d_in < p_out / p_in
    assert d_out < p_out and d_in > p_in  # outside held closer to the source than plain img2img; inside edited



def test_mask_with_set_latent_noise_mask_keeps_the_rest_exactly(comfy, agg_models):
    seed = next(SEEDS)
    plain, source = run(comfy, graph(seed, masked=False, guided=False, noise_mask=True))
    guided, _ = run(comfy, graph(seed, masked=True, noise_mask=True))
    g_in, g_out = halves(guided - plain)
    s_in, s_out = halves(guided - source)
    print(f"with SetLatentNoiseMask: change in {g_in:.4f} out {g_out:.6f}; to source out {s_out:.6f}")
    assert g_in > 0.02
    assert s_out < 1e-5 and g_out < 1e-5  # ComfyUI's inpainting keeps the unmasked latent as the source's


def test_empty_mask_is_refused_naming_the_node_and_input(comfy, agg_models):
    g = graph(next(SEEDS), masked=True)
    empty = g.node("SolidMask", value=0.0, width=SIZE, height=SIZE)
    g.set_input(g["structure"], mask=empty[0])
    r = comfy.run(g.prompt)
    assert not r.ok
    text = r.error_text()
    assert "Structure Loss: input 'mask'" in text and "empty" in text, text[:2000]


def region_graph(seed: int, kind: str, *, masked: bool) -> Graph:
    """img2img guided by one image loss (`kind`: clip_direction, style or color; linear decoder) with the left-half
    mask, or without a mask. Roles: as img2img, plus image_loss."""
    g = img2img(seed=seed, steps=2, size=SIZE, denoise=0.6)
    extra = {"mask": left_half(g)} if masked else {}
    inverted = g.node("ImageInvert", image=g["scale"][0])
    if kind == "color":
        loss = g.node("AGGColorLoss", name="image_loss", image=inverted[0], vae=g["ckpt"][2], weight=0.2,
                      decoder="linear", **extra)
    else:
        clip = g.node("AGGCLIPLoader", clip_name="agg-tiny-open-clip.safetensors", architecture="auto")
        if kind == "style":
            loss = g.node("AGGImageStyleLoss", name="image_loss", clip=clip[0], vae=g["ckpt"][2],
                          style_image=inverted[0], weight=0.2, decoder="linear", cutouts=2, seed=0, **extra)
        else:
            loss = g.node("AGGCLIPDirectionLoss", name="image_loss", clip=clip[0], vae=g["ckpt"][2],
                          source_text="a photo", target_text="a watercolor painting", weight=0.2, decoder="linear",
                          cutouts=2, seed=0, **extra)
    agg = g.node("AGGApply", model=g["ckpt"][0], loss=loss[0], start_percent=0.0, end_percent=1.0, manifold="none",
                 dds_steps=0, dds_lr=0.5, asymmetric=True)
    g.set_input(g["sampler"], model=agg[0])
    return g


def judged_values(comfy, g: Graph, latents: list[torch.Tensor]) -> list[float]:
    """The loss the image-loss node built for a run, evaluated at each clean latent (sigma 0, step 0)."""
    from agg_testing.probes import loss_values

    r = comfy.run(g.prompt)
    assert r.ok, r.error_text()[:3000]
    return [sum(v.values()) for v in loss_values(r, g, "image_loss", latents)]


@pytest.mark.parametrize("kind", ["clip_direction", "style", "color"])
def test_masked_image_losses_judge_only_the_region(comfy, agg_models, kind):
    """With the left-half mask, CLIP Direction, Image Style and Color Loss judge the white region alone: their value
    does not change when the latent's right quarter (two latent cells away from the region) is replaced; without
    the mask the same change moves the value."""
    seed = next(SEEDS)
    latent = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))
    changed = latent.clone()
    changed[..., 6:] = torch.randn(1, 4, SIZE // 8, 2, generator=torch.Generator().manual_seed(seed + 1)) * 2
    masked = judged_values(comfy, region_graph(seed, kind, masked=True), [latent, changed])
    whole = judged_values(comfy, region_graph(seed, kind, masked=False), [latent, changed])
    moved, held = abs(whole[1] - whole[0]), abs(masked[1] - masked[0])
    print(f"{kind}: value {masked[0]:.6f}; the change moves it by {held:.3e} with the mask, {moved:.3e} without")
    # measured: exactly 0 with the mask; without it 4.0e-6 (clip_direction: the tiny random CLIP is nearly blind to
    # content), 2.1e-5 (style), 1.0e-2 (color)
    assert moved > 0 and held < 1e-2 * moved, (held, moved)
