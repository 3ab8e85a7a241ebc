"""Image augmentations for CLIP losses: random cut-outs and CLIP input normalization.

Cut-outs are one affine warp per crop (random resized crop, small rotation, horizontal flip) done
with affine_grid / grid_sample, so they are differentiable w.r.t. the images and fully determined
by the given torch.Generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# OpenAI CLIP's input normalization (per RGB channel, images in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CUT_SCALE = (0.8, 1.0)  # crop area as a fraction of the largest centred square
CUT_MAX_ROTATION_DEG = 10.0
CUT_FLIP_P = 0.5


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> CLIP's normalized input."""
    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=images.dtype, device=images.device).reshape(1, 3, 1, 1)
    return (images - mean) / std


def cutout_params(
    b: int, n: int, height: int, width: int, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Random crop parameters for n cut-outs of each of b images, sample-major ([b * n] each).

    Every image gets the same n crops: an image's augmentation (and so its guidance) does not depend on its
    place in the batch or on the batch's size.
    side: crop side in pixels, sqrt(U(0.8, 1)) of the image's shorter side (a square crop whose area is
    80-100% of the largest square); cx, cy: crop centre in pixels from the image centre, uniform over
    positions where the unrotated crop fits; angle: radians in +-10 degrees; flip: +-1 (mirror x).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(5, n, generator=generator, device=device, dtype=torch.float64).repeat(1, b)
    lo, hi = CUT_SCALE
    side = (lo + (hi - lo) * u[0]).sqrt() * min(height, width)
    cx = (u[1] * 2 - 1) * (width - side) / 2
    cy = (u[2] * 2 - 1) * (height - side) / 2
    angle = (u[3] * 2 - 1) * math.radians(CUT_MAX_ROTATION_DEG)
    flip = torch.where(u[4] < CUT_FLIP_P, -1.0, 1.0).to(torch.float64)
    return {"side": side, "cx": cx, "cy": cy, "angle": angle, "flip": flip}


def cutout_theta(params: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """affine_grid matrices [N, 2, 3] mapping a cut-out's normalized coords to the image's.

    In pixel units (origin at the image centre) a cut-out point u in [-1, 1]^2 samples
    c + R(angle) diag(flip, 1) (side / 2) u; dividing by (W / 2, H / 2) gives grid_sample's coordinates.
    """
    half = params["side"] / 2
    cos, sin = params["angle"].cos(), params["angle"].sin()
    fx = params["flip"]
    sx, sy = 2.0 / width, 2.0 / height
    row0 = torch.stack([sx * half * cos * fx, -sx * half * sin, sx * params["cx"]], dim=1)
    row1 = torch.stack([sy * half * sin * fx, sy * half * cos, sy * params["cy"]], dim=1)
    return torch.stack([row0, row1], dim=1)


def prescale(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased downscale so the shorter side is about `size` (bilinear sampling then does not alias)."""
    h, w = images.shape[-2:]
    short = min(h, w)
    if short <= size:
        return images
    k = size / short
    out = (max(size, round(h * k)), max(size, round(w * k)))
    return F.interpolate(images, size=out, mode="bilinear", align_corners=False, antialias=True)


def random_cutouts(
    images: torch.Tensor, n: int, size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """n augmented square cut-outs of each image: [B, 3, H, W] -> [B * n, 3, size, size].

    Sample-major: rows b*n .. b*n + n - 1 are image b's cut-outs. Each is a random resized crop
    (area 80-100% of the largest square), rotated by up to +-10 degrees, mirrored with p = 0.5,
    resampled bilinearly (reflection at the borders, so rotated corners show no black wedges).
    Parameters come from `generator` only: the same seed gives the same cut-outs. Differentiable
    w.r.t. `images`. n >= 1 and size >= 1 (the nodes' inputs are bounded so).
    """
    b, c = images.shape[:2]
    src = prescale(images, size)
    h, w = src.shape[-2:]
    params = cutout_params(b, n, h, w, generator)
    theta = cutout_theta(params, h, w).to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [b * n, c, size, size], align_corners=False)
    src = src.repeat_interleave(n, dim=0)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
