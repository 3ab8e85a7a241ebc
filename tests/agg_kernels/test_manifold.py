"""Manifold gradients on an exact mixture denoiser: autograd is the true J^T v, finite differences match it."""

from __future__ import annotations

import pytest
import torch
from agg_testing.analytic import gaussian, gaussian_posterior_gain, mixture

from agg_kernels.manifold import (
    covariance_product,
    fd_step_size,
    grad_enabled,
    manifold_gradient,
)
from agg_kernels.strength import posterior_variance

FAMILIES = ("eps", "v_prediction", "const")
SIGMAS = {"eps": [14.6, 4.0, 1.0, 0.3, 0.08], "const": [0.95, 0.7, 0.4, 0.15, 0.05]}
SIGMAS["v_prediction"] = SIGMAS["eps"]
SHAPE = (4, 2, 4, 4)
MIN_COS: dict[str, float] = {}
RATIO: dict[str, tuple[float, float]] = {f: (1.0, 1.0) for f in FAMILIES}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nmin cosine(finite_difference, autograd) per family:")
    for k, v in sorted(MIN_COS.items()):
        print(f"  {k}: {v:.6f}  |fd| / |autograd| in [{RATIO[k][0]:.3f}, {RATIO[k][1]:.3f}]")


def data():
    g = torch.Generator().manual_seed(0)
    return mixture(torch.randn(3, *SHAPE[1:], generator=g), [0.3, 0.6, 1.0], [0.4, 0.4, 0.2])


def noisy(mix, sigma, family, seed=1):
    g = torch.Generator().manual_seed(seed)
    return mix.noised(mix.sample(SHAPE[0], g)[0], sigma, family, g)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_finite_difference_matches_autograd(family):
    mix = data()
    goal = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(5))
    for sigma in SIGMAS[family]:
        x = noisy(mix, sigma, family)
        s = torch.full((SHAPE[0],), sigma)

        def denoise(z, s=s):
            return mix.denoise(z, s, family)

        d = denoise(x)
        for v in (d - goal, torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))):
            ag = manifold_gradient("autograd", v, x, d, s, denoise)
            fd = manifold_gradient("finite_difference", v, x, d, s, denoise)
            cos = cosine(fd, ag).min().item()
            MIN_COS[family] = min(MIN_COS.get(family, 1.0), cos)
            assert cos >= 0.999, (family, sigma, cos)
            # Magnitude: a forward difference has O(h) truncation error; where the posterior is split between
            # modes (responsibilities far from 0 / 1) J varies over the probe and the norm is off by a few %.
            ratio = fd.flatten(1).norm(dim=1) / ag.flatten(1).norm(dim=1)
            RATIO[family] = (min(RATIO[family][0], ratio.min().item()), max(RATIO[family][1], ratio.max().item()))
            assert ((ratio > 0.9) & (ratio < 1.1)).all(), (family, sigma, ratio)


@pytest.mark.parametrize("family", FAMILIES)
def test_autograd_is_the_exact_vjp_and_jacobian_is_symmetric(family):
    mix = data()
    sigma = SIGMAS[family][2]
    x = noisy(mix, sigma, family)[:1]
    s = torch.full((1,), sigma)

    def flat(z):
        return mix.denoise(z.reshape(x.shape), s, family).flatten()

    with grad_enabled():
        jac = torch.autograd.functional.jacobian(flat, x.flatten().double().float())
    # The Tweedie Jacobian alpha Cov[x0|x] / sigma^2 is symmetric: J^T v = J v, the finite-difference premise.
    assert (jac - jac.T).abs().max().item() < 1e-5
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ag = manifold_gradient("autograd", v, x, mix.denoise(x, s, family), s, lambda z: mix.denoise(z, s, family))
    assert (ag.flatten() - jac.T @ v.flatten()).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_gaussian_jacobian_closed_form(family):
    # Gaussian data: D = mu + gain (x - alpha mu) with gain = alpha s^2 / (alpha^2 s^2 + sigma^2).
    mean = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(4))
    data_g = gaussian(mean, 0.7)
    for sigma in SIGMAS[family]:
        x = noisy(data_g, sigma, family)
        s = torch.full((SHAPE[0],), sigma)
        v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
        for mode in ("autograd", "finite_difference"):
            g = manifold_gradient(mode, v, x, data_g.denoise(x, s, family), s, lambda z, s=s: data_g.denoise(z, s, family))
            expected = gaussian_posterior_gain(sigma, 0.7, family) * v
            assert (g - expected).abs().max().item() < 1e-4 * max(1.0, v.abs().max().item()), (mode, sigma)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["autograd", "finite_difference"])
def test_covariance_product_is_the_posterior_covariance(family, mode):
    # sigma^2 / alpha * J v = Cov[x0 | x] v; for Gaussian data Cov = s^2 sigma^2 / (alpha^2 s^2 + sigma^2).
    data_g = gaussian(torch.zeros(SHAPE[1:]), 0.5)
    sigma = SIGMAS[family][1]
    x = noisy(data_g, sigma, family)
    s = torch.full((SHAPE[0],), sigma)
    d = data_g.denoise(x, s, family)
    v = torch.ones(SHAPE)
    out = covariance_product(mode, v, x, d, s, family, lambda z: data_g.denoise(z, s, family))
    a = 1 - sigma if family == "const" else 1.0
    cov = 0.25 * sigma**2 / (a**2 * 0.25 + sigma**2)
    assert (out - cov * v).abs().max().item() < 1e-3 * cov


@pytest.mark.parametrize("family", FAMILIES)
def test_none_is_the_unit_variance_covariance(family):
    # Unit-variance Gaussian data: the model's own covariance equals the prior's sigma^2 / (alpha^2 + sigma^2),
    # the scale `none` uses; the old sigma^2 / alpha overshoots it by (alpha^2 + sigma^2) / alpha.
    data_g = gaussian(torch.zeros(SHAPE[1:]), 1.0)
    v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for sigma in SIGMAS[family]:
        x = noisy(data_g, sigma, family)
        s = torch.full((SHAPE[0],), sigma)
        exact = covariance_product("autograd", v, x, data_g.denoise(x, s, family), s, family,
                                   lambda z, s=s: data_g.denoise(z, s, family))
        none = covariance_product("none", v, x, None, s, family)
        assert torch.allclose(none, exact, rtol=1e-4, atol=1e-6), (family, sigma)
        assert float(none.abs().max()) <= float(v.abs().max()) * float(posterior_variance(sigma, family)) + 1e-6


def test_none_mode_and_errors():
    v = torch.randn(2, 3)
    assert manifold_gradient("none", v, v, v, 1.0) is v
    with pytest.raises(ValueError, match="needs a denoiser"):
        manifold_gradient("autograd", v, v, v, 1.0)
    with pytest.raises(ValueError, match="unknown manifold mode"):
        manifold_gradient("exact", v, v, v, 1.0, denoise=lambda z: z)


def test_fd_probe_size_is_relative_to_sigma():
    x = torch.zeros(2, 8)
    v = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1.0], [100.0]])
    sigma = torch.tensor([2.0, 0.1])
    h = fd_step_size(x, v, sigma, 0.02)
    rms = (h * v).pow(2).mean(1).sqrt()
    assert torch.allclose(rms, 0.02 * sigma, rtol=1e-5)


def test_works_under_inference_mode():
    # ComfyUI samples under inference_mode: the gradient path must open its own grad context.
    mix = data()
    x = noisy(mix, 1.0, "eps")
    s = torch.ones(SHAPE[0])
    with torch.inference_mode():
        d = mix.denoise(x, s, "eps")
        g = manifold_gradient("autograd", d, x, d, s, lambda z: mix.denoise(z, s, "eps"))
    assert torch.isfinite(g).all() and g.abs().sum() > 0
