"""Color loss (agg_kernels.losses.color): per-channel mean and std of the decoded clean estimate pulled
toward a reference image's; zero at the reference, descent toward it, masks judge only their region."""

from __future__ import annotations

import torch
from agg_testing import analytic

from agg_kernels.losses.color import color_distance, color_loss, color_stats, image_stats, mask_weights
from agg_kernels.objective import LossContext, evaluate


def ctx_for(x0: torch.Tensor) -> LossContext:
    return LossContext(sigma=torch.ones(x0.shape[0]), x=x0.detach().clone(), family="eps")


def toy_decoder():
    return analytic.toy_decoder(scale=0.3)

def test_stats_match_numpy_style_definitions_and_masks_weigh_pixels():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 3, 8, 8, generator=g)
    mean, std = color_stats(p)
    assert torch.allclose(mean, p.mean((2, 3)), atol=1e-6)
    assert torch.allclose(std, p.std((2, 3), unbiased=False), atol=1e-4)
    # a binary mask: the statistics of the pixels inside only
    m = torch.zeros(8, 8)
    m[:, :3] = 1
    mean_m, std_m = color_stats(p, m)
    assert torch.allclose(mean_m, p[..., :3].mean((2, 3)), atol=1e-6)
    assert torch.allclose(std_m, p[..., :3].std((2, 3), unbiased=False), atol=1e-4)
    # a mask at another resolution is resized (area average when shrinking)
    big = m.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.allclose(color_stats(p, big)[0], mean_m, atol=1e-6)


def test_reference_stats_pool_every_pixel_of_the_batch():
    a = torch.zeros(1, 3, 4, 4)
    b = torch.ones(1, 3, 4, 4)
    mean, std = image_stats(torch.cat([a, b]))
    assert mean.shape == (1, 3) and torch.allclose(mean, torch.full((1, 3), 0.5))
    assert torch.allclose(std, torch.full((1, 3), 0.5), atol=1e-4)


def test_distance_is_zero_at_the_reference_with_zero_gradient():
    decode = toy_decoder()
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_mean, ref_std = color_stats((decode(z) + 1) / 2)
    loss = color_loss(0.1, decode, ref_mean, ref_std)
    x0 = z.clone().requires_grad_(True)
    value = evaluate(loss, x0, ctx_for(x0))["color"]
    assert value.shape == (2,) and float(value.detach().abs().max()) < 1e-10
    (grad,) = torch.autograd.grad(value.sum(), x0)
    assert float(grad.abs().max()) < 1e-6
    assert [(t.name, t.weight, t.floor) for t in loss] == [("color", 0.1, 0.0)]


def test_a_step_along_minus_the_gradient_moves_both_statistics_toward_the_reference():
    decode = toy_decoder()
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 4, 6, 6, generator=g)
    ref_mean = torch.tensor([[0.8, 0.3, 0.1]])  # a warm palette
    ref_std = torch.tensor([[0.05, 0.1, 0.2]])
    loss = color_loss(1.0, decode, ref_mean, ref_std)
    x0 = z.clone().requires_grad_(True)
    value = evaluate(loss, x0, ctx_for(x0))["color"]
    (grad,) = torch.autograd.grad(value.sum(), x0)
    mean0, std0 = color_stats((decode(z) + 1) / 2)
    d_mean0, d_std0 = (mean0 - ref_mean).abs(), (std0 - ref_std).abs()
    z_t = z
    for k in range(60):  # normalised steps of shrinking size: the statistics converge toward the reference
        x = z_t.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(evaluate(loss, x, ctx_for(x))["color"].sum(), x)
        rms = gr.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1)
        z_t = (z_t - 0.2 * 0.95**k * gr / rms).detach()
    one = (z - 1e-2 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).detach()
    assert (color_distance((decode(one) + 1) / 2, ref_mean, ref_std) < value.detach()).all()  # first step: descent
    mean1, std1 = color_stats((decode(z_t) + 1) / 2)
    d_mean1, d_std1 = (mean1 - ref_mean).abs(), (std1 - ref_std).abs()
    final = color_distance((decode(z_t) + 1) / 2, ref_mean, ref_std)
    print(f"\ncolour distance {value.detach().tolist()} -> {final.tolist()}; |mean - ref| {d_mean0.mean():.3f} -> "
          f"{d_mean1.mean():.3f}, |std - ref| {d_std0.mean():.3f} -> {d_std1.mean():.3f}")
    assert (final < 0.1 * value.detach()).all()
    assert float(d_mean1.mean()) < 0.2 * float(d_mean0.mean())
    assert float(d_std1.mean()) < 0.5 * float(d_std0.mean())


def test_a_mask_judges_only_its_region():
    decode = toy_decoder()
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1  # the left half of the pixels
    ref_mean, ref_std = torch.tensor([[0.9, 0.1, 0.1]]), torch.tensor([[0.1, 0.1, 0.1]])
    loss = color_loss(1.0, decode, ref_mean, ref_std, mask=mask)
    x0 = z.clone().requires_grad_(True)
    value = evaluate(loss, x0, ctx_for(x0))["color"]
    # changing pixels outside the mask changes nothing: compare with a decoder whose right half differs
    def decode_right_changed(t: torch.Tensor) -> torch.Tensor:
        p = decode(t)
        return torch.cat([p[..., :8], p[..., 8:] * 0 + 0.7], dim=-1)

    other = evaluate(color_loss(1.0, decode_right_changed, ref_mean, ref_std, mask=mask), x0, ctx_for(x0))["color"]
    assert torch.allclose(value, other)
    (grad,) = torch.autograd.grad(value.sum(), x0)
    # the toy decoder's x4 bilinear upsampling couples neighbouring latent columns: the rightmost latent column
    # (pixels 12..15) gets no gradient
    assert float(grad[..., 3].abs().max()) == 0.0
    assert float(grad[..., :2].abs().max()) > 0.0


def test_mask_weights_resize_and_pass_no_mask_through():
    p = torch.rand(2, 3, 4, 4)
    assert mask_weights(None, (4, 4), p) is None
    w = mask_weights(torch.ones(1, 8, 8), (4, 4), p)
    assert w.shape == (1, 1, 4, 4) and w.dtype == p.dtype and torch.equal(w, torch.ones(1, 1, 4, 4))
