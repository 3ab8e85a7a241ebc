"""Per-term gradients and pulls of a loss, and the refinement of the clean estimate (no denoiser call)."""

from __future__ import annotations

import torch

from .manifold import grad_enabled
from .objective import Loss, LossContext, Terms, anchors_of, floors_of, weights_of
from .strength import Weight, sample_weights, term_pull


def term_gradients(loss: Loss, x0: torch.Tensor, ctx: LossContext) -> tuple[Terms, Terms]:
    """(each term's per-sample value, detached; each term's gradient w.r.t. x0), one backward pass a term."""
    with grad_enabled():
        xg = x0.detach().clone().requires_grad_(True)
        terms = loss(xg, ctx)
        if not terms:
            raise ValueError("a loss returned no terms")
        names = list(terms)
        grads: Terms = {}
        for i, name in enumerate(names):
            value = terms[name]
            if not value.requires_grad:
                grads[name] = torch.zeros_like(xg)
                continue
            (g,) = torch.autograd.grad(value.sum(), xg, retain_graph=i < len(names) - 1, allow_unused=True)
            grads[name] = torch.zeros_like(xg) if g is None else g.detach()
    return {k: v.detach() for k, v in terms.items()}, grads


def term_pulls(loss: Loss, x0: torch.Tensor, ctx: LossContext, grads: Terms, values: Terms | None = None,
               scale: Weight = 1.0) -> Terms:
    """Each term's pull on x0 (weight-sized, anchored terms clipped at their reference, terms with a floor
    scaled so their predicted decrease stays within value - floor, given the per-sample `values`); see strength.

    `scale` (a number or [B]) multiplies every weight: the step's share of schedule time and, at the trust
    region, the factor that makes the step fit it.
    """
    weights = weights_of(loss)
    anchors = anchors_of(loss, x0, ctx)
    floors = floors_of(loss) if values is not None else {}
    return {k: term_pull(g, sample_weights(weights.get(k, 1.0), g) * sample_weights(scale, g), x0, anchors.get(k),
                         None if values is None else values.get(k), floors.get(k)) for k, g in grads.items()}


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
