"""agg_kernels.mask: regions on the latent grid, terms restricted to a region, focused decoders."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from agg_kernels.dds import term_gradients, term_pulls, term_weight
from agg_kernels.losses import structure_loss
from agg_kernels.mask import (
    MARGIN,
    as_mask,
    box,
    check_mask,
    focus,
    focused,
    frame_masks,
    latent_box,
    per_frame,
    region_scale,
    resize_mask,
    union_mask,
    video_region,
)
from agg_kernels.objective import Loss, LossContext, Term, evaluate
from agg_kernels.strength import rms


def restricted(loss: Loss, region: torch.Tensor) -> Loss:
    """Every term of the loss acting only on `region` (how the nodes mask a loss)."""
    return tuple(replace(term, region=region) for term in loss)


def squared_to(target: torch.Tensor, weight: float) -> Loss:
    return (Term("t", lambda x0, c: (x0 - target).square().flatten(1).mean(1), weight),)


def pulls(loss, x0: torch.Tensor) -> dict[str, torch.Tensor]:
    _, grads = term_gradients(loss, x0, ctx())
    return term_pulls(loss, x0, ctx(), grads)


def ctx(b: int = 1) -> LossContext:
    return LossContext(sigma=torch.full((b,), 2.0), x=torch.zeros(b, 4, 8, 8), family="eps")


def half_mask(h: int = 64, w: int = 64) -> torch.Tensor:
    m = torch.zeros(1, h, w)
    m[..., : w // 2] = 1.0  # left half
    return m


def test_as_mask_accepts_comfy_shapes_and_clamps():
    assert as_mask(torch.ones(5, 6)).shape == (1, 1, 5, 6)
    assert as_mask(torch.ones(2, 5, 6)).shape == (2, 1, 5, 6)
    assert float(as_mask(torch.full((3, 3), 2.0)).max()) == 1.0
    with pytest.raises(ValueError, match="mask must be"):
        as_mask(torch.ones(1, 3, 4, 4))


def test_resize_mask_area_averages_onto_the_latent_grid():
    m = resize_mask(half_mask(64, 64), (8, 8))
    assert m.shape == (1, 1, 8, 8)
    assert torch.equal(m[..., :4], torch.ones(1, 1, 8, 4)) and torch.equal(m[..., 4:], torch.zeros(1, 1, 8, 4))
    edge = torch.zeros(1, 16, 16)
    edge[..., :12] = 1  # the boundary falls inside a latent cell: that cell gets the share inside
    assert resize_mask(edge, (2, 2))[0, 0, 0].tolist() == [1.0, 0.5]


def test_check_mask_refuses_an_empty_mask_and_a_wrong_batch():
    with pytest.raises(ValueError, match="empty"):
        check_mask(torch.zeros(1, 8, 8), 1)
    with pytest.raises(ValueError, match="batch 3"):
        check_mask(torch.ones(3, 8, 8), 2)
    check_mask(torch.ones(1, 8, 8), 4)


def test_restricted_gradient_is_zero_outside_and_unchanged_inside():
    target = torch.randn(1, 4, 8, 8)
    loss = squared_to(target, 0.1)
    region = resize_mask(half_mask(), (8, 8))
    x0 = torch.randn(1, 4, 8, 8, requires_grad=True)
    (g_full,) = torch.autograd.grad(evaluate(loss, x0, ctx())["t"].sum(), x0)
    r = restricted(loss, region)
    terms = evaluate(r, x0, ctx())
    assert torch.allclose(terms["t"], evaluate(loss, x0, ctx())["t"])  # the value is the loss's own
    (g,) = torch.autograd.grad(terms["t"].sum(), x0)
    assert torch.equal(g[..., 4:], torch.zeros_like(g[..., 4:]))
    assert torch.allclose(g[..., :4], g_full[..., :4])


def test_a_term_with_a_region_is_judged_at_the_mixed_estimate_and_weighted_by_its_own_coverage():
    # A soft region per image (two images, different coverage): the term's value is its own, its gradient the
    # unmasked one times r, and its weight w * sqrt(mean r) per image (each image's own coverage), exactly the
    # estimate r x0 + (1 - r) stop_grad(x0) and the scale mask.region_scale give.
    g = torch.Generator().manual_seed(2)
    target = torch.randn(2, 4, 8, 8, generator=g)
    region = torch.rand(2, 1, 8, 8, generator=g)
    region[1, ..., 4:] = 0
    loss = squared_to(target, 0.3)
    masked = restricted(loss, region)
    assert masked[0].name == "t" and masked[0].weight == 0.3 and loss[0].region is None
    x0 = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    plain_value = evaluate(loss, x0, ctx(2))["t"]
    (g_plain,) = torch.autograd.grad(plain_value.sum(), x0)
    value = evaluate(masked, x0, ctx(2))["t"]
    (g_masked,) = torch.autograd.grad(value.sum(), x0)
    # equal up to rounding: r x0 + (1 - r) x0 is x0 to within an ulp
    assert torch.allclose(value, plain_value, rtol=1e-6, atol=0)
    assert torch.allclose(g_masked, region * g_plain, rtol=1e-5, atol=1e-9)
    values, grads = term_gradients(masked, x0, ctx(2))
    assert torch.equal(values["t"], plain_value.detach()) and torch.equal(grads["t"], g_masked)
    scale = region.flatten(1).mean(1).sqrt()
    assert torch.equal(term_weight(masked[0]), torch.tensor(0.3, dtype=torch.float32) * scale)
    assert term_weight(loss[0]) == 0.3
    # the pull: the weight times the region's scale on the unit-normalised masked gradient, per image
    pull = term_pulls(masked, x0.detach(), ctx(2), grads)["t"]
    for i in range(2):
        assert float(rms(pull[i : i + 1])) == pytest.approx(0.3 * float(scale[i]), rel=1e-5)
    # a 2-D mask is kept as a [1, 1, h, w] region in [0, 1]
    assert replace(loss[0], region=2 * torch.ones(8, 8)).region.shape == (1, 1, 8, 8)
    assert float(replace(loss[0], region=2 * torch.ones(8, 8)).region.max()) == 1.0


def test_restricted_pull_keeps_the_weight_per_element_of_the_region():
    # A region of a quarter of the latent: each element inside moves by the weight (RMS), as it would
    # without a mask; outside nothing moves.
    target = torch.randn(1, 4, 8, 8)
    loss = squared_to(target, 0.2)
    region = torch.zeros(1, 1, 8, 8)
    region[..., :4, :4] = 1
    r = restricted(loss, region)
    assert float(term_weight(r[0])) == pytest.approx(0.2 * float(region_scale(region))) == pytest.approx(0.1)
    x0 = torch.randn(1, 4, 8, 8)
    pull = pulls(r, x0)["t"]
    inside, outside = pull[..., :4, :4], pull[..., 4:, :]
    assert float(rms(inside.reshape(1, -1))) == pytest.approx(0.2, rel=1e-4)
    assert float(outside.abs().max()) == 0.0
    assert float(rms(pulls(loss, x0)["t"])) == pytest.approx(0.2, rel=1e-4)


def test_restricted_structure_holds_only_outside_the_mask():
    ref = torch.zeros(1, 4, 8, 8)
    keep = 1 - resize_mask(half_mask(), (8, 8))  # structure holds the right half
    s = restricted(structure_loss(0.1, ref), keep)
    x0 = torch.full((1, 4, 8, 8), 1.0)
    pull = pulls(s, x0)["structure"]
    assert float(pull[..., :4].abs().max()) == 0.0
    assert bool((pull[..., 4:] > 0).all())  # toward the reference (x0 moves by -pull)
    assert float(pull[..., 4:].max()) <= 1.0  # anchored: never past the reference


def test_focus_greys_outside_and_crops_to_the_box():
    pixels = torch.ones(1, 3, 64, 64)
    m = torch.zeros(1, 64, 64)
    m[:, 16:32, 8:40] = 1
    assert box(m) == (16, 32, 8, 40)
    out = focus(pixels, m)
    assert out.shape == (1, 3, 16, 32) and torch.equal(out, torch.ones_like(out))
    soft = m.clone()
    soft[:, 16:32, 8:12] = 0.5
    assert torch.allclose(focus(pixels, soft)[..., :4], torch.full((1, 3, 16, 4), 0.5))


def test_focused_decoder_passes_gradient_only_through_the_region():
    def decode(x0: torch.Tensor) -> torch.Tensor:  # 8x upsampling of 3 channels, like a VAE's shape
        return torch.nn.functional.interpolate(x0[:, :3], scale_factor=8, mode="nearest")

    dec = focused(decode, half_mask())
    x0 = torch.randn(1, 4, 8, 8, requires_grad=True)
    pixels = dec(x0)
    assert pixels.shape == (1, 3, 64, 32)
    (g,) = torch.autograd.grad(pixels.sum(), x0)
    assert float(g[..., 4:].abs().max()) == 0.0 and float(g[:, :3, :, :4].abs().min()) > 0


def test_focused_decodes_only_the_mask_box_and_its_margin_and_shows_what_the_whole_decode_shows():
    m = torch.zeros(1, 128, 128)
    m[:, 40:72, 16:48] = 1  # latent cells 5..8 x 2..5 at 8 px per cell
    assert latent_box(m, (16, 16), margin=1) == (4, 10, 1, 7)
    assert latent_box(m, (16, 16)) == (max(0, 5 - MARGIN), 9 + MARGIN, max(0, 2 - MARGIN), 6 + MARGIN)
    assert latent_box(m, (16, 16), margin=10) == (0, 16, 0, 16)  # clipped to the grid
    seen = []

    def decode(x0: torch.Tensor) -> torch.Tensor:  # local: a crop decodes to the crop of the whole decode
        seen.append(tuple(x0.shape))
        return torch.nn.functional.interpolate(x0[:, :3], scale_factor=8, mode="nearest")

    x0 = torch.randn(1, 4, 16, 16)
    top, bottom, left, right = latent_box(m, (16, 16))
    out = focused(decode, m)(x0)
    assert seen == [(1, 4, bottom - top, right - left)] and (bottom - top) * (right - left) < 16 * 16
    assert torch.equal(out, focus(decode(x0), m))
    # a mask on a grid that is not a multiple of the decode's (resampled as for the whole image)
    odd = torch.zeros(1, 100, 100)
    odd[:, 31:57, 13:38] = 1
    assert torch.equal(focused(decode, odd)(x0), focus(decode(x0), odd))


# -- video masks ---------------------------------------------------------------------------------


def stripes(n: int, h: int = 8) -> torch.Tensor:
    """n masks, mask i white on row i % h only."""
    m = torch.zeros(n, h, h)
    for i in range(n):
        m[i, i % h] = 1.0
    return m


def test_frame_masks_give_each_latent_frame_the_pixel_frames_it_encodes():
    # 17 pixel frames on 5 latent frames (a causal video VAE, 4 frames per latent frame after the first)
    got = frame_masks(stripes(17), 5)
    assert got.shape == (5, 1, 8, 8)
    rows = [set(got[t, 0].amax(1).nonzero().flatten().tolist()) for t in range(5)]
    assert rows == [{0}, {1, 2, 3, 4}, {5, 6, 7, 0}, {1, 2, 3, 4}, {5, 6, 7, 0}]
    assert torch.equal(frame_masks(stripes(5), 5), as_mask(stripes(5)))  # one per latent frame: as given


def test_video_region_per_frame_or_for_every_frame():
    per = video_region(stripes(17), 1, 5, (4, 4))
    assert per.shape == (1, 1, 5, 4, 4)
    assert float(per[0, 0, 0, 0].sum()) > 0 and float(per[0, 0, 0, 2:].sum()) == 0  # frame 0: its own row only
    every = video_region(half_mask(8, 8), 2, 5, (4, 4))
    assert every.shape == (1, 1, 1, 4, 4)
    assert per_frame(stripes(17), 1, 5) and not per_frame(stripes(2), 2, 5) and not per_frame(stripes(3), 1, 1)
    check_mask(stripes(17), 1, 5)  # one video, a mask per frame
    with pytest.raises(ValueError, match="one video"):
        check_mask(stripes(3), 2, 5)
    assert torch.equal(union_mask(stripes(3)), as_mask(stripes(3)).amax(0, keepdim=True))


def test_restricted_video_loss_pulls_each_frame_inside_its_own_mask():
    x0 = torch.randn(1, 4, 5, 8, 8)
    region = video_region(stripes(5), 1, 5, (8, 8))
    loss = restricted(structure_loss(0.2, torch.zeros_like(x0)), region)
    c = LossContext(sigma=torch.full((1,), 2.0), x=torch.zeros_like(x0), family="eps")
    _, grads = term_gradients(loss, x0, c)
    g = grads["structure"][0].abs().sum(0)  # [T, h, w]
    for t in range(5):
        assert float(g[t, t].sum()) > 0 and float(g[t].sum() - g[t, t].sum()) == 0
