"""guided_delta: the pipeline gradient -> manifold step -> DDS -> delta, and its non-finite guard."""

from __future__ import annotations

import pytest
import torch
from agg_testing.analytic import mixture

from agg_kernels.guidance import guided_delta
from agg_kernels.objective import LossContext

FAMILIES = ("eps", "v_prediction", "const")
SHAPE = (3, 2, 4, 4)


def data():
    g = torch.Generator().manual_seed(0)
    return mixture(torch.randn(2, *SHAPE[1:], generator=g), 0.5)


def setup(family, sigma=None):
    sigma = sigma if sigma is not None else (0.5 if family == "const" else 2.0)
    mix = data()
    g = torch.Generator().manual_seed(1)
    x = mix.noised(mix.sample(SHAPE[0], g)[0], sigma, family, g)
    s = torch.full((SHAPE[0],), sigma)
    d = mix.denoise(x, s, family)
    return mix, x, s, d, LossContext(sigma=s, x=x, family=family)


def pull(goal, weight=0.05):
    def loss(x0, ctx):
        return {"pull": weight * (x0 - goal).pow(2).flatten(1).mean(1)}

    return loss


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("manifold", ["finite_difference", "autograd", "none"])
def test_finite_case_gives_finite_delta_that_lowers_the_loss(family, manifold):
    mix, x, s, d, ctx = setup(family)
    goal = mix.means[1]
    loss = pull(goal, 0.002)
    res = guided_delta(loss, x, d, ctx, manifold, lambda z: mix.denoise(z, s, family), dds_steps=2, dds_lr=0.05)
    assert res.skipped is None and res.delta is not None
    assert torch.isfinite(res.delta).all() and res.delta.shape == d.shape
    before = loss(d, ctx)["pull"]
    after = loss(d + res.delta, ctx)["pull"]
    assert (after < before).all(), (before, after)
    assert set(res.terms) == {"pull"} and res.terms["pull"] == pytest.approx(before.mean().item(), rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_delta_is_the_manifold_step_when_no_dds(family):
    # K = 0: delta = -(sigma^2 / alpha) J^T grad_D L, with the exact J from autograd.
    mix, x, s, d, ctx = setup(family)
    goal = torch.zeros(SHAPE[1:])
    res = guided_delta(pull(goal, 1.0), x, d, ctx, "autograd", lambda z: mix.denoise(z, s, family), dds_steps=0)
    n = d[0].numel()
    grad_d = 2 * (d - goal)  # per-element gradient of mean((D - goal)^2), scaled by n / n
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        (jtv,) = torch.autograd.grad(mix.denoise(xg, s, family), xg, grad_outputs=grad_d)
    sigma = s[0].item()
    scale = sigma**2 / (1 - sigma if family == "const" else 1.0)
    assert torch.allclose(res.delta, -scale * jtv, atol=1e-5 * max(1.0, scale)), n


def test_nan_loss_skips_with_a_reason():
    mix, x, s, d, ctx = setup("eps")

    def bad(x0, ctx):
        return {"bad": (x0 * float("nan")).flatten(1).mean(1)}

    res = guided_delta(bad, x, d, ctx, "finite_difference", lambda z: mix.denoise(z, s, "eps"))
    assert res.delta is None and res.skipped and "non-finite" in res.skipped


def test_nan_denoiser_in_finite_difference_skips():
    mix, x, s, d, ctx = setup("eps")
    res = guided_delta(pull(mix.means[1]), x, d, ctx, "finite_difference", lambda z: torch.full_like(z, float("nan")))
    assert res.delta is None and "finite_difference" in res.skipped


def test_inf_gradient_skips():
    mix, x, s, d, ctx = setup("const")

    def explode(x0, ctx):
        return {"e": torch.exp(1e4 * x0).flatten(1).mean(1)}

    res = guided_delta(explode, x, d, ctx, "none")
    assert res.delta is None and res.skipped


def test_dtype_is_kept():
    mix, x, s, d, ctx = setup("eps")
    res = guided_delta(pull(mix.means[1], 0.002), x, d.half(), ctx, "none", dds_steps=1)
    assert res.delta.dtype == torch.float16 and torch.isfinite(res.delta).all()
