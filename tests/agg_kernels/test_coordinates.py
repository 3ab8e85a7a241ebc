"""Coordinates of the three families: alpha, eps_hat, noising, manifold scale, VP view."""

from __future__ import annotations

import pytest
import torch

from agg_kernels import coordinates as co

FAMILIES = ("eps", "v_prediction", "const")


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown model family"):
        co.check_family("x0")
    assert [co.check_family(f) for f in FAMILIES] == list(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha(family):
    s = torch.tensor([0.1, 0.5, 0.9])
    expected = 1 - s if family == "const" else torch.ones_like(s)
    assert torch.equal(co.alpha(s, family), expected)
    assert float(co.alpha(0.25, family)) == (0.75 if family == "const" else 1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_noising_and_eps_estimate_invert_each_other(family):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigma = torch.tensor([0.2, 0.5, 0.8])
    x = co.noisy_from_clean(x0, eps, sigma, family)
    a = co.alpha(sigma, family).reshape(3, 1, 1, 1)
    assert torch.allclose(x, a * x0 + sigma.reshape(3, 1, 1, 1) * eps, atol=1e-6)
    # Given the true x0 as the denoised value, the eps estimate is the noise that was added.
    err = (co.eps_from_denoised(x, x0, sigma, family) - eps).abs().max().item()
    assert err < 1e-5, err


def test_expand_sigma_shapes():
    like = torch.zeros(2, 3, 4, 4)
    assert co.expand_sigma(torch.tensor([1.0, 2.0]), like).shape == (2, 1, 1, 1)
    assert co.expand_sigma(0.5, like).ndim == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_manifold_scale(family):
    s = 0.4
    expected = s**2 / (1 - s) if family == "const" else s**2
    assert co.manifold_scale(s, family) == pytest.approx(expected)


def test_vp_view():
    s = torch.tensor([0.5, 2.0, 14.6])
    # eps / v: x / sqrt(1 + sigma^2) is the variance-preserving state with sqrt(1 - abar) = sigma / sqrt(1 + sigma^2).
    frac = co.vp_noise_fraction(s, "eps")
    assert torch.allclose(frac, s / (1 + s**2).sqrt())
    x = torch.ones(3, 2)
    assert torch.allclose(co.vp_state(x, s, "eps"), x / (1 + s[:, None] ** 2).sqrt())
    # const: sigma and x as they are (docs/DESIGN.md §1.5).
    assert co.vp_noise_fraction(0.3, "const") == 0.3
    assert torch.equal(co.vp_state(x, s, "const"), x)
