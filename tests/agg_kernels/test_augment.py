"""Random cut-outs and CLIP normalization."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from agg_kernels.augment import (
    CLIP_MEAN,
    CLIP_STD,
    clip_normalize,
    cutout_params,
    cutout_theta,
    random_cutouts,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_clip_normalize_constants():
    img = torch.stack([torch.full((2, 2), m) for m in CLIP_MEAN])[None]
    assert torch.allclose(clip_normalize(img), torch.zeros(1, 3, 2, 2), atol=1e-7)
    one = clip_normalize(torch.ones(1, 3, 1, 1)).flatten()
    assert torch.allclose(one, torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]))


def test_cutouts_shape_and_sample_major_order():
    img = torch.zeros(2, 3, 40, 56)
    img[1] = 1.0
    cuts = random_cutouts(img, 3, 24, gen(0))
    assert cuts.shape == (6, 3, 24, 24)
    assert torch.allclose(cuts[:3], torch.zeros(3, 3, 24, 24))
    assert torch.allclose(cuts[3:], torch.ones(3, 3, 24, 24), atol=1e-6)


def test_cutouts_reproducible_and_seed_dependent():
    img = torch.rand(2, 3, 32, 32, generator=gen(9))
    a = random_cutouts(img, 4, 16, gen(1))
    b = random_cutouts(img, 4, 16, gen(1))
    c = random_cutouts(img, 4, 16, gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the cut-outs differ from each other within one call
    assert not torch.allclose(a[0], a[1])


def test_cutout_parameter_ranges():
    p = cutout_params(50, 4, 60, 80, gen(3))
    side = p["side"] / 60
    assert bool(((side**2 >= 0.8 - 1e-9) & (side**2 <= 1.0 + 1e-9)).all())
    assert float(p["angle"].abs().max()) <= math.radians(10) + 1e-9
    assert set(p["flip"].tolist()) == {-1.0, 1.0}
    assert bool((p["cx"].abs() <= (80 - p["side"]) / 2 + 1e-9).all())
    assert bool((p["cy"].abs() <= (60 - p["side"]) / 2 + 1e-9).all())


def test_identity_theta_reproduces_the_image_and_flip_mirrors_it():
    img = torch.rand(1, 3, 16, 16, generator=gen(4))
    one = torch.ones(1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    params = {"side": 16 * one, "cx": zero, "cy": zero, "angle": zero, "flip": one}
    theta = cutout_theta(params, 16, 16).float()
    assert torch.allclose(theta, torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]))
    grid = F.affine_grid(theta, [1, 3, 16, 16], align_corners=False)
    assert torch.allclose(F.grid_sample(img, grid, align_corners=False), img, atol=1e-5)
    params["flip"] = -one
    grid = F.affine_grid(cutout_theta(params, 16, 16).float(), [1, 3, 16, 16], align_corners=False)
    assert torch.allclose(F.grid_sample(img, grid, align_corners=False), img.flip(-1), atol=1e-5)


def test_rotation_is_in_pixel_units_on_non_square_images():
    # a 90-degree turn of a centred square crop on a wide image must stay a square crop: the sampled
    # points keep their pixel distance from the centre.
    one = torch.ones(1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    theta = cutout_theta({"side": 20 * one, "cx": zero, "cy": zero, "angle": math.pi / 2 * one, "flip": one}, 20, 40)
    corner = theta[0] @ torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)  # cut-out's right-edge midpoint
    px = corner[0] * 40 / 2, corner[1] * 20 / 2
    assert math.isclose(math.hypot(*px), 10.0, rel_tol=1e-9)


def test_cutouts_are_differentiable():
    img = torch.rand(1, 3, 12, 12, dtype=torch.float64, generator=gen(5), requires_grad=True)

    def f(x):
        return random_cutouts(x, 2, 8, gen(6))

    assert torch.autograd.gradcheck(f, (img,), eps=1e-6, atol=1e-5)


def test_cutouts_gradient_flows_through_prescale():
    img = torch.rand(2, 3, 64, 96, generator=gen(7), requires_grad=True)
    cuts = random_cutouts(img, 3, 16, gen(8))
    cuts.square().sum().backward()
    assert img.grad is not None and bool(torch.isfinite(img.grad).all())
    assert float(img.grad[0].abs().sum()) > 0 and float(img.grad[1].abs().sum()) > 0

