"""What every AGG loss is: weighted per-sample terms of the clean estimate at one step."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LossContext:
    """What a loss may read besides the clean estimate.

    sigma: [B] noise level of the step; x: the sampler state at that level (model latent space);
    family: "eps", "v_prediction" or "const"; step: index of the guided step within the run;
    extra: free-form per-run values a caller wants to pass along.
    """

    sigma: torch.Tensor
    x: torch.Tensor
    family: str
    step: int = 0
    extra: Mapping[str, object] = field(default_factory=dict)


# A loss maps (x0_hat [B, C, H, W], context) to named, already weighted, per-sample terms ([B] each).
Loss = Callable[[torch.Tensor, LossContext], dict[str, torch.Tensor]]


def total(terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the weighted terms, per sample."""
    values = list(terms.values())
    if not values:
        raise ValueError("a loss returned no terms")
    out = values[0]
    for v in values[1:]:
        out = out + v
    return out


def compose(*losses: Loss) -> Loss:
    """A loss whose terms are the union of the given losses' terms (repeated names get a suffix)."""

    def composed(x0: torch.Tensor, ctx: LossContext) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for loss in losses:
            for name, value in loss(x0, ctx).items():
                key, n = name, 2
                while key in out:
                    key, n = f"{name}_{n}", n + 1
                out[key] = value
        return out

    return composed
