"""DDIM inversion / reconstruction against an analytic Gaussian denoiser."""

from __future__ import annotations

import math

import pytest
import torch

from agg_kernels.inversion import check_sigmas, ddim_invert, ddim_reconstruct, latent_for_sampler
from agg_kernels.losses.trajectory import trajectory_at, trajectory_state_at
from agg_kernels.step import ddim_step

MU, S = 0.3, 0.5


def gaussian_denoiser(family: str):
    """Exact posterior mean E[x0 | x] for data N(MU, S^2 I).

    eps / v: x = x0 + sigma eps           -> MU + S^2 / (S^2 + sigma^2) (x - MU)
    const:   x = (1 - sigma) x0 + sigma eps -> MU + a S^2 / (a^2 S^2 + sigma^2) (x - a MU), a = 1 - sigma
    """

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        a = 1 - s if family == "const" else torch.ones_like(s)
        return MU + a * S**2 / (a * a * S**2 + s * s) * (x - a * MU)

    return denoise


def flow_map(x0: torch.Tensor, sigma: float, family: str) -> torch.Tensor:
    """The probability-flow ODE's exact image of x0 at sigma for Gaussian data (linear in x0)."""
    a = 1 - sigma if family == "const" else 1.0
    return a * MU + math.sqrt(a * a * S**2 + sigma**2) / S * (x0 - MU)


def source(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (MU + S * torch.randn(2, 4, 6, 6, generator=g)).double()


TOPS = {"eps": 3.0, "v_prediction": 3.0, "const": 0.7}


def round_trip_error(family: str, n: int) -> tuple[float, float]:
    x0 = source()
    sig = torch.linspace(0, TOPS[family], n + 1, dtype=torch.float64)
    den = gaussian_denoiser(family)
    x_top, _ = ddim_invert(den, x0, sig, family)
    rec = ddim_reconstruct(den, x_top, sig.flip(0), family)
    top_err = float((x_top - flow_map(x0, TOPS[family], family)).abs().max())
    return float((rec - x0).abs().mean()), top_err


@pytest.mark.parametrize("family", ["eps", "const"])
def test_invert_then_reconstruct_converges_first_order(family):
    errs = {n: round_trip_error(family, n) for n in (25, 50, 100, 400)}
    rec = [errs[n][0] for n in (25, 50, 100)]
    # DDIM inversion is first order: doubling the steps halves the round-trip error
    for coarse, fine in zip(rec[:-1], rec[1:], strict=True):
        assert 1.7 < coarse / fine < 2.3, errs
    assert errs[400][0] < 0.01, errs
    # and the inverted state approaches the exact probability-flow image of x0 (relative to its spread)
    top = TOPS[family]
    spread = math.sqrt((1 - top if family == "const" else 1.0) ** 2 * S**2 + top**2)
    assert errs[400][1] < 0.02 * spread and errs[400][1] < errs[25][1] / 8, errs


def test_v_prediction_uses_the_same_coordinates_as_eps():
    x0 = source()
    sig = torch.linspace(0, 2.0, 11, dtype=torch.float64)
    a = ddim_invert(gaussian_denoiser("eps"), x0, sig, "eps")[0]
    b = ddim_invert(gaussian_denoiser("v_prediction"), x0, sig, "v_prediction")[0]
    assert torch.equal(a, b)


def test_trajectory_aligned_with_sigmas_and_holds_the_evaluated_estimates():
    x0 = source()
    sig = [0.0, 0.2, 0.5, 1.0, 2.0]
    calls: list[tuple[float, torch.Tensor, torch.Tensor]] = []
    base = gaussian_denoiser("eps")

    def denoise(x, s):
        d = base(x, s)
        calls.append((float(s[0]), x.clone(), d.clone()))
        return d

    progress: list[tuple[int, int]] = []
    x_top, traj = ddim_invert(denoise, x0, sig, "eps", callback=lambda i, n: progress.append((i, n)))
    assert traj.sigmas.tolist() == pytest.approx(sig)
    assert bool((traj.sigmas[1:] > traj.sigmas[:-1]).all())
    assert traj.denoised.shape == (5, 2, 4, 6, 6)
    assert torch.equal(traj.denoised[0], x0)  # the clean estimate of the clean source
    # the step from sigma 0 needs no model call (a clean latent's noise estimate is zero): one call per
    # later sigma, each entry the D of that step's state
    assert [c[0] for c in calls] == pytest.approx([0.2, 0.5, 1.0, 2.0])
    assert torch.equal(calls[0][1], x0)
    for k in range(1, 5):
        assert torch.equal(traj.denoised[k], calls[k - 1][2])
    assert torch.equal(calls[-1][1], x_top)
    # the states the estimates were taken at: the clean source at sigma 0, then each call's state
    assert torch.equal(traj.states[0], x0)
    for k in range(1, 5):
        assert torch.equal(traj.states[k], calls[k - 1][1])
    assert torch.equal(trajectory_state_at(traj, 2.0), x_top)
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert torch.equal(trajectory_at(traj, 2.0), traj.denoised[4])


def test_trajectory_without_top_and_with_positive_start():
    x0 = source()
    den = gaussian_denoiser("const")
    _, traj = ddim_invert(den, x0, [0.0, 0.1, 0.3], "const", record_top=False)
    assert traj.sigmas.tolist() == pytest.approx([0.0, 0.1])
    calls: list[torch.Tensor] = []

    def recording(x, s):
        calls.append(x.clone())
        return den(x, s)

    _, traj = ddim_invert(recording, x0, [0.05, 0.1, 0.3], "const")
    assert traj.sigmas.tolist() == pytest.approx([0.05, 0.1, 0.3])
    assert torch.allclose(calls[0], 0.95 * x0)  # the start state alpha(s_0) * x0, no noise


def test_ddim_step_from_zero_noise_estimate_is_consistent():
    x0 = source()
    s, sn = 0.4, 0.1
    eps = torch.randn_like(x0)
    x = (1 - s) * x0 + s * eps
    # given the true clean value, a step lands exactly on the state with the same noise
    assert torch.allclose(ddim_step(x, x0, s, sn, "const"), (1 - sn) * x0 + sn * eps)
    assert torch.allclose(ddim_step(x0 + 2.0 * eps, x0, 2.0, 0.0, "eps"), x0)


@pytest.mark.parametrize("family", ["eps", "v_prediction", "const"])
def test_latent_for_sampler_undoes_noise_scaling_with_zero_noise(family):
    x = torch.randn(2, 4, 3, 3)
    sigma = 0.6 if family == "const" else 5.0
    latent = latent_for_sampler(x, sigma, family)
    # ComfyUI: eps / v noise_scaling = latent + sigma * noise; const = sigma * noise + (1 - sigma) * latent
    noise = torch.zeros_like(x)
    scaled = sigma * noise + (1 - sigma) * latent if family == "const" else latent + sigma * noise
    assert torch.allclose(scaled, x)
    per_sample = latent_for_sampler(x, torch.tensor([0.2, 0.5]), "const")
    assert torch.allclose(per_sample[1], x[1] / 0.5)


def test_latent_for_sampler_refuses_flow_sigma_one():
    with pytest.raises(ValueError, match="noise"):
        latent_for_sampler(torch.randn(1, 4, 2, 2), 1.0, "const")


def test_sigma_validation():
    with pytest.raises(ValueError, match="strictly ascending"):
        check_sigmas([0.0, 1.0, 0.5], ascending=True, family="eps")
    with pytest.raises(ValueError, match="strictly ascending"):
        check_sigmas([0.0, 1.0, 1.0], ascending=True, family="eps")
    with pytest.raises(ValueError, match="at least two"):
        check_sigmas([1.0], ascending=True, family="eps")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_sigmas([0.0, 1.5], ascending=True, family="const")
    with pytest.raises(ValueError, match="strictly descending"):
        check_sigmas([0.0, 1.0], ascending=False, family="eps")
    with pytest.raises(ValueError, match=">= 0"):
        check_sigmas([1.0, -0.5], ascending=False, family="eps")
    with pytest.raises(ValueError, match="unknown model family"):
        check_sigmas([0.0, 1.0], ascending=True, family="flow")
    assert check_sigmas(torch.tensor([0.0, 0.5, 1.0]), ascending=True, family="const") == [0.0, 0.5, 1.0]
