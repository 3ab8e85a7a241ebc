"""Color loss: pull the decoded clean estimate's colour statistics toward a reference image's.

The statistics are, per RGB channel, the mean and the standard deviation of the pixels (in 0..1 units),
optionally weighted by a mask (1 = the region judged). The raw term per sample is

    color = mean over the 3 channels of (mean_c - ref_mean_c)^2 + (std_c - ref_std_c)^2

which is zero exactly when both statistics match the reference's and, as a function of the statistics,
decreases along its negative gradient toward them. Like every AGG loss its size does not matter (the
pack normalises each term's gradient before weighting it): the weight alone sets the pull.

decode: model-space latent [B, C, H, W] -> pixels [B, 3, h, w] in [-1, 1], differentiable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..frames import per_clip
from ..mask import resize_mask
from ..objective import Loss, LossContext, Term

Decoder = Callable[[torch.Tensor], torch.Tensor]

# Added to the variance before the square root: keeps the gradient finite on a flat (one-colour) image.
STD_EPS = 1e-6


def mask_weights(mask: torch.Tensor | None, size: tuple[int, int], like: torch.Tensor) -> torch.Tensor | None:
    """A mask ([H, W], [B, H, W] or [B, 1, H, W], values 0..1, passing mask.check_mask for the run's batch) as
    [B or 1, 1, h, w] weights on a (h, w) grid, on like's device and dtype (None stays None)."""
    if mask is None:
        return None
    return resize_mask(mask, size).to(device=like.device, dtype=like.dtype)


def color_stats(pixels: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each [B, 3]: per-channel statistics of pixels [B, 3, H, W], weighted by `mask` if given
    (any shape mask_weights takes; resized to the pixels). Differentiable."""
    w = mask_weights(mask, tuple(pixels.shape[-2:]), pixels)
    if w is None:
        mean = pixels.mean(dim=(2, 3))
        var = (pixels - mean[..., None, None]).square().mean(dim=(2, 3))
    else:
        if w.shape[0] not in (1, pixels.shape[0]):  # one mask per clip, its frames folded into the batch
            w = w.repeat_interleave(pixels.shape[0] // w.shape[0], dim=0)
        w = w.expand(pixels.shape[0], 1, *pixels.shape[-2:])
        total = w.sum(dim=(2, 3))
        mean = (pixels * w).sum(dim=(2, 3)) / total
        var = ((pixels - mean[..., None, None]).square() * w).sum(dim=(2, 3)) / total
    return mean, (var + STD_EPS).sqrt()


def image_stats(image: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each [1, 3]: the colour statistics of a reference image batch [B, 3, H, W] in 0..1 (all its
    pixels together, or those inside `mask`), as constants."""
    with torch.no_grad():
        pixels = image.detach().float()
        if mask is not None:
            w = mask_weights(mask, tuple(pixels.shape[-2:]), pixels)
            w = w.expand(pixels.shape[0], 1, *pixels.shape[-2:])
            flat_w = w.movedim(0, 1).reshape(1, 1, 1, -1)
        else:
            flat_w = None
        flat = pixels.movedim(0, 1).reshape(1, 3, 1, -1)  # every image's pixels as one row
        return color_stats(flat, flat_w)


def color_distance(pixels: torch.Tensor, ref_mean: torch.Tensor, ref_std: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B]: mean over channels of (mean_c - ref_mean_c)^2 + (std_c - ref_std_c)^2 (pixels in 0..1 units;
    reference statistics [3], [1, 3] or [B, 3])."""
    mean, std = color_stats(pixels, mask)
    rm = ref_mean.detach().to(device=mean.device, dtype=mean.dtype).reshape(-1, 3)
    rs = ref_std.detach().to(device=std.device, dtype=std.dtype).reshape(-1, 3)
    return ((mean - rm).square() + (std - rs).square()).mean(1)


def color_loss(weight: float, decode: Decoder, ref_mean: torch.Tensor, ref_std: torch.Tensor,
               mask: torch.Tensor | None = None) -> Loss:
    """Term "color": color_distance of the decoded clean estimate (mapped from [-1, 1] to 0..1) to the
    reference statistics (see image_stats), judged inside `mask` if given; strength `weight`."""
    rm = ref_mean.detach().float().clone()
    rs = ref_std.detach().float().clone()
    m = None if mask is None else mask.detach().float().clone()

    def value(x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        pixels = decode(x0)  # a clip's frames decode to one image each: each clip's term is its frames' mean
        return per_clip(color_distance((pixels.float() + 1) / 2, rm, rs, m), x0.shape[0])

    return (Term("color", value, weight, floor=0.0),)  # 0: the statistics match
