"""One guided step: loss gradient -> manifold step -> DDS refinement -> delta, with a non-finite guard."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .dds import dds_refine, loss_and_gradient
from .manifold import FD_REL_STEP, Denoiser, manifold_corrected, manifold_gradient
from .objective import Loss, LossContext, total


@dataclass
class GuidanceResult:
    """delta is None when guidance was skipped for this step (`skipped` says why)."""

    delta: torch.Tensor | None
    terms: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None


def is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def guided_delta(
    loss: Loss,
    x: torch.Tensor,
    denoised: torch.Tensor,
    ctx: LossContext,
    manifold: str = "finite_difference",
    denoise: Denoiser | None = None,
    dds_steps: int = 1,
    dds_lr: float = 0.05,
    dds_optimizer: str = "adam",
    fd_rel_step: float = FD_REL_STEP,
) -> GuidanceResult:
    """delta = x_tilde - D for one step (DESIGN §1.2 steps 1-3).

    `denoise` is the full guided denoiser at this step's sigma (needed by autograd and
    finite_difference). A NaN or inf anywhere skips the step's guidance and says so.
    """

    def objective(x0: torch.Tensor) -> dict[str, torch.Tensor]:
        return loss(x0, ctx)

    work = denoised.detach().float()
    values, grad_d = loss_and_gradient(objective, work)
    terms = {k: float(v.float().mean()) for k, v in values.items()}
    if not (is_finite(total(values)) and is_finite(grad_d)):
        return GuidanceResult(None, terms, "non-finite loss or gradient")
    grad_x = manifold_gradient(manifold, grad_d, x.float(), work, ctx.sigma, denoise, fd_rel_step)
    if not is_finite(grad_x):
        return GuidanceResult(None, terms, f"non-finite {manifold} gradient")
    x0 = manifold_corrected(work, grad_x.float(), ctx.sigma, ctx.family)
    x0 = dds_refine(objective, x0, dds_steps, dds_lr, dds_optimizer)
    delta = x0 - work
    if not is_finite(delta):
        return GuidanceResult(None, terms, "non-finite delta")
    return GuidanceResult(delta.to(denoised.dtype), terms)
