"""Refinement of the clean estimate by K optimiser steps on the loss, with no denoiser call."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .manifold import grad_enabled, per_element_scale
from .objective import total

DDS_OPTIMIZERS = ("adam", "sgd")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def adam_update(
    grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float, betas: tuple[float, float] = ADAM_BETAS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam step: (update to subtract, new first moment, new second moment)."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    m_hat = m / (1 - b1**step)
    v_hat = v / (1 - b2**step)
    return lr * m_hat / (v_hat.sqrt() + ADAM_EPS), m, v


Terms = dict[str, torch.Tensor]


def loss_and_gradient(objective: Callable[[torch.Tensor], Terms], x0: torch.Tensor) -> tuple[Terms, torch.Tensor]:
    """(the objective's per-sample terms, detached; gradient of their sum w.r.t. x0, per element).

    Losses are means over elements; the gradient is scaled by the element count of a sample so that
    a loss weight means the same step size at every resolution.
    """
    with grad_enabled():
        xg = x0.detach().clone().requires_grad_(True)
        terms = objective(xg)
        (g,) = torch.autograd.grad(total(terms).sum(), xg)
    return {k: v.detach() for k, v in terms.items()}, g * per_element_scale(x0)


def dds_refine(
    objective: Callable[[torch.Tensor], Terms],
    x0: torch.Tensor,
    steps: int,
    lr: float,
    optimizer: str = "adam",
) -> torch.Tensor:
    """K steps of Adam (or plain gradient descent) on objective(x0); returns x0 after the K-th step."""
    if optimizer not in DDS_OPTIMIZERS:
        raise ValueError(f"unknown DDS optimizer {optimizer!r}; expected one of {', '.join(DDS_OPTIMIZERS)}")
    x = x0.detach().clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for k in range(1, steps + 1):
        _, g = loss_and_gradient(objective, x)
        if optimizer == "adam":
            update, m, v = adam_update(g, m, v, k, lr)
        else:
            update = lr * g
        x = x - update
    return x
