"""Per-term gradients and pulls of a loss, and the refinement of the clean estimate (no denoiser call)."""

from __future__ import annotations

import torch

from .autograd import grad_enabled
from .mask import region_scale
from .objective import Loss, LossContext, Term, Terms, value_of
from .strength import Weight, sample_weights, term_pull


def term_weight(term: Term) -> Weight:
    """The weight a step gives the term: its own, times sqrt(mean r) of each sample's region when it has one
    (mask.region_scale), so a masked term still pulls by its weight per element of its region."""
    if term.region is None:
        return term.weight
    return torch.as_tensor(term.weight, dtype=torch.float32).reshape(-1).cpu() * region_scale(term.region)


def term_gradients(loss: Loss, x0: torch.Tensor, ctx: LossContext) -> tuple[Terms, Terms]:
    """(each term's per-sample value, detached; each term's gradient w.r.t. x0), one backward pass a term; each
    term judged through its region (objective.value_of)."""
    if not loss:
        raise ValueError("a loss has no terms")
    values: Terms = {}
    grads: Terms = {}
    with grad_enabled():
        xg = x0.detach().clone().requires_grad_(True)
        for term in loss:
            value = value_of(term, xg, ctx)
            values[term.name] = value.detach()
            if not value.requires_grad:
                grads[term.name] = torch.zeros_like(xg)
                continue
            (g,) = torch.autograd.grad(value.sum(), xg, allow_unused=True)
            grads[term.name] = torch.zeros_like(xg) if g is None else g.detach()
    return values, grads


def anchors_at(loss: Loss, x0: torch.Tensor, ctx: LossContext) -> Terms:
    """{name: reference} of the loss's anchored terms at x0."""
    return {term.name: term.anchor(x0, ctx) for term in loss if term.anchor is not None}


def term_pulls(loss: Loss, x0: torch.Tensor, ctx: LossContext, grads: Terms, values: Terms | None = None,
               scale: Weight = 1.0) -> Terms:
    """Each term's pull on x0 (weight-sized, anchored terms clipped at their reference, terms with a floor
    scaled so their predicted decrease stays within value - floor, given the per-sample `values`); see strength.

    `scale` (a number or [B]) multiplies every weight: the step's share of schedule time and, at the trust
    region, the factor that makes the step fit it.
    """
    anchors = anchors_at(loss, x0, ctx)
    pulls: Terms = {}
    for term in loss:
        g = grads[term.name]
        pulls[term.name] = term_pull(g, sample_weights(term_weight(term), g) * sample_weights(scale, g), x0,
                                     anchors.get(term.name), None if values is None else values.get(term.name),
                                     None if values is None else term.floor)
    return pulls


def summed(pulls: Terms, like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    for p in pulls.values():
        out = out + p
    return out


def dds_refine(loss: Loss, x0: torch.Tensor, ctx: LossContext, steps: int, lr: float, scale: Weight = 1.0) -> torch.Tensor:
    """K refinement steps x0 <- x0 - lr * (sum of the term pulls at x0, weights times `scale`); returns x0 after
    the K-th step.

    The pulls are weight-sized, so lr is the fraction of the weight each step moves; anchored terms stay
    clipped at their reference for lr <= 1. K = 0 returns a copy of the input.
    """
    x = x0.detach().clone()
    for _ in range(steps):
        values, grads = term_gradients(loss, x, ctx)
        x = x - lr * summed(term_pulls(loss, x, ctx, grads, values, scale), x)
    return x
