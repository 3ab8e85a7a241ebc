"""Range loss: keep the decoded clean estimate inside the valid pixel range."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..frames import per_clip
from ..objective import Loss, LossContext, Term


def range_penalty(pixels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of relu(|p| - 1)^2: zero inside [-1, 1], quadratic outside ([B])."""
    return (pixels.abs() - 1).clamp_min(0).square().flatten(1).mean(1)


def range_loss(weight: float, decode: Callable[[torch.Tensor], torch.Tensor]) -> Loss:
    """Term "range" = mean(relu(|decode(x0_hat)| - 1)^2) per sample, with strength `weight`.

    decode: model-space latent [B, C, H, W] -> pixels [B, 3, h, w] in [-1, 1], differentiable.
    Quadratic so the push grows with the overshoot and is smooth at the boundary (no gradient
    inside the range); the same penalty as clamping and taking the squared clamp error.
    """

    def value(x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        return per_clip(range_penalty(decode(x0)), x0.shape[0])  # a clip: its frames' mean

    # floor 0: the pull fades as the last pixels come back into range instead of pushing them at full weight
    return (Term("range", value, weight, floor=0.0),)
