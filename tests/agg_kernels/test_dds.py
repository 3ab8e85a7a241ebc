"""Per-term gradients and pulls, and the refinement of the clean estimate (agg_kernels.dds)."""

from __future__ import annotations

import torch

from agg_kernels.dds import dds_refine, term_gradients, term_pulls
from agg_kernels.objective import Loss, LossContext, Term, chained
from agg_kernels.strength import rms

CTX = LossContext(sigma=torch.ones(3), x=torch.zeros(3, 4, 8, 8), family="eps")


def mse_to(goal: torch.Tensor, weight: float, scale: float = 1.0) -> Loss:
    return (Term("mse", lambda x0, ctx: scale * (x0 - goal).pow(2).flatten(1).mean(1), weight),)


def l1_to(goal: torch.Tensor, weight: float) -> Loss:
    return (Term("l1", lambda x0, ctx: (x0 - goal).abs().flatten(1).mean(1), weight,
                 lambda x0, ctx: goal.expand_as(x0)),)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)


def test_term_gradients_are_separate_per_term():
    x0, goal = data()
    loss = chained(mse_to(goal, 1.0), l1_to(-goal, 1.0))
    values, grads = term_gradients(loss, x0, CTX)
    n = x0[0].numel()
    assert set(values) == set(grads) == {"mse", "l1"}
    assert torch.allclose(grads["mse"], 2 * (x0 - goal) / n, atol=1e-7)
    assert torch.allclose(grads["l1"], torch.sign(x0 + goal) / n)


def test_pull_is_weight_sized_whatever_the_raw_scale():
    x0, goal = data()
    for scale in (1e-4, 1.0, 1e4):
        loss = mse_to(goal, 0.3, scale)
        _, grads = term_gradients(loss, x0, CTX)
        pull = term_pulls(loss, x0, CTX, grads)["mse"]
        assert torch.allclose(rms(pull), torch.full((3,), 0.3), rtol=1e-5), scale


def test_anchored_pull_never_passes_the_reference():
    x0, goal = data(1)
    for weight in (0.01, 0.3, 3.0, 30.0):
        loss = l1_to(goal, weight)
        _, grads = term_gradients(loss, x0, CTX)
        moved = x0 - term_pulls(loss, x0, CTX, grads)["l1"]
        before, after = (x0 - goal).abs(), (moved - goal).abs()
        assert (after <= before + 1e-6).all() and ((moved - goal) * torch.sign(x0 - goal) >= -1e-5).all()
        # each element moves by min(weight, its distance)
        assert torch.allclose(before - after, torch.minimum(before, torch.full_like(before, weight)), atol=1e-5)


def test_refinement_lowers_the_loss_by_the_weight():
    x0, goal = data(2)
    loss = mse_to(goal, 0.1)
    out = dds_refine(loss, x0, CTX, 3, 0.5)
    # three steps of 0.5 * 0.1 RMS straight toward the goal
    dist = rms(x0 - goal) - rms(out - goal)
    assert torch.allclose(dist, torch.full((3,), 0.15), rtol=1e-3), dist


def test_zero_steps_or_zero_weight_returns_the_input():
    x0, goal = data(3)
    out = dds_refine(mse_to(goal, 1.0), x0, CTX, 0, 0.5)
    assert torch.equal(out, x0) and out is not x0
    assert torch.equal(dds_refine(mse_to(goal, 0.0), x0, CTX, 3, 0.5), x0)


def test_refinement_converges_on_an_anchor_without_oscillating():
    x0, goal = data(4)
    dist = [float(rms(dds_refine(l1_to(goal, 0.2), x0, CTX, k, 1.0) - goal).mean()) for k in (0, 1, 2, 5, 20)]
    assert dist == sorted(dist, reverse=True) and dist[-1] < 1e-6, dist
