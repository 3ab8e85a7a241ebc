"""DDS refinement: K optimiser steps on the loss lower it; K = 0 is the identity."""

from __future__ import annotations

import pytest
import torch

from agg_kernels.dds import adam_update, dds_refine, loss_and_gradient


def objective_to(goal: torch.Tensor, weight: float = 1.0):
    def objective(x0: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "mse": weight * (x0 - goal).pow(2).flatten(1).mean(1),
            "l1": 0.1 * weight * (x0 - goal).abs().flatten(1).mean(1),
        }

    return objective


def loss_of(objective, x):
    return sum(v for v in objective(x).values())


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.05), ("sgd", 0.2)])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_loss_decreases(optimizer, lr, steps):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    goal = torch.randn(4, 8, 8, generator=g)
    obj = objective_to(goal)
    out = dds_refine(obj, x0, steps, lr, optimizer)
    before, after = loss_of(obj, x0), loss_of(obj, out)
    print(f"\n{optimizer} K={steps}: loss {before.mean():.4f} -> {after.mean():.4f}")
    assert (after < before).all(), (optimizer, steps, before, after)


def test_more_steps_lower_further():
    g = torch.Generator().manual_seed(1)
    x0, goal = torch.randn(2, 16, generator=g), torch.randn(16, generator=g)
    obj = objective_to(goal)
    losses = [loss_of(obj, dds_refine(obj, x0, k, 0.05, "adam")).mean().item() for k in (0, 1, 5, 20)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_zero_steps_returns_the_input_exactly(optimizer):
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    out = dds_refine(objective_to(torch.zeros(4, 3, 3)), x0, 0, 0.5, optimizer)
    assert torch.equal(out, x0)
    assert out is not x0  # a copy: later in-place edits cannot reach the caller's tensor


def test_returns_the_value_after_the_last_step():
    # One SGD step on 0.5 * mean((x - goal)^2) with the per-element gradient scale: x - lr * (x - goal).
    x0 = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    goal = torch.zeros(4)

    def obj(x):
        return {"mse": 0.5 * (x - goal).pow(2).mean(1)}

    out = dds_refine(obj, x0, 1, 0.25, "sgd")
    assert torch.allclose(out, x0 - 0.25 * (x0 - goal))
    # Adam's first step moves every element by lr against the gradient's sign.
    out = dds_refine(obj, x0, 1, 0.1, "adam")
    assert torch.allclose(out, x0 - 0.1 * torch.sign(x0), atol=1e-6)


def test_gradient_is_per_element_and_terms_are_detached():
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))

    def obj(x):
        return {"mse": x.pow(2).flatten(1).mean(1)}

    terms, g = loss_and_gradient(obj, x0)
    # d/dx of mean(x^2) is 2x / n; scaled by n per sample it is 2x, independent of resolution.
    assert torch.allclose(g, 2 * x0, atol=1e-6)
    assert not terms["mse"].requires_grad


def test_adam_update_bias_correction():
    g = torch.tensor([2.0, -0.5])
    upd, m, v = adam_update(g, torch.zeros(2), torch.zeros(2), 1, 0.1)
    assert torch.allclose(upd, 0.1 * torch.sign(g), atol=1e-6)
    assert torch.allclose(m, 0.1 * g) and torch.allclose(v, 0.001 * g * g)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown DDS optimizer"):
        dds_refine(objective_to(torch.zeros(2)), torch.zeros(1, 2), 1, 0.1, "lbfgs")


def test_works_under_inference_mode():
    x0 = torch.randn(2, 8, generator=torch.Generator().manual_seed(4))
    obj = objective_to(torch.zeros(8))
    with torch.inference_mode():
        out = dds_refine(obj, x0, 3, 0.05, "adam")
    assert (loss_of(obj, out) < loss_of(obj, x0)).all()
