"""k-diffusion coordinates for the three model families.

A sampler state is x at noise level sigma:
  eps / v_prediction:  x = x0 + sigma * eps            alpha(sigma) = 1
  const (flow):        x = (1 - sigma) * x0 + sigma * eps   alpha(sigma) = 1 - sigma
The denoiser output D is the Tweedie estimate of x0.

Every function here takes `family` as one of FAMILIES; callers check it once per run (check_family, or
the nodes' model-family check) and the per-step maths does not check it again.
"""

from __future__ import annotations

import torch

FAMILIES = ("eps", "v_prediction", "const")


def check_family(family: str) -> str:
    """The family itself, or a ValueError naming the families this module knows."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


def expand_sigma(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Sigma as a tensor broadcastable against `like` ([B] or scalar -> [B, 1, 1, ...])."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.ndim == 0:
        return s
    return s.reshape(s.shape[0], *([1] * (like.ndim - 1)))


def alpha(sigma: torch.Tensor | float, family: str) -> torch.Tensor | float:
    """Signal scale alpha(sigma) of the family."""
    return 1 - sigma if family == "const" else sigma * 0 + 1


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor | float, family: str) -> torch.Tensor:
    """The model's own noise estimate eps_hat = (x - alpha(sigma) * D) / sigma."""
    s = expand_sigma(sigma, x)
    return (x - alpha(s, family) * denoised) / s


def noisy_from_clean(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float, family: str) -> torch.Tensor:
    """x = alpha(sigma) * x0 + sigma * eps."""
    s = expand_sigma(sigma, x0)
    return alpha(s, family) * x0 + s * eps


def manifold_scale(sigma: torch.Tensor | float, family: str) -> torch.Tensor | float:
    """sigma^2 / alpha(sigma): the factor that turns a gradient w.r.t. x into a step on x0_hat."""
    return sigma**2 / alpha(sigma, family)


def vp_noise_fraction(sigma: torch.Tensor | float, family: str) -> torch.Tensor | float:
    """sqrt(1 - alpha_bar) of the equivalent variance-preserving state (the reference `noisy_aug` weight).

    eps / v: sigma / sqrt(1 + sigma^2); const: sigma itself.
    """
    if family == "const":
        return sigma
    return sigma / (1 + sigma**2) ** 0.5


def vp_state(x: torch.Tensor, sigma: torch.Tensor | float, family: str) -> torch.Tensor:
    """The variance-preserving x_t of a sampler state (x / sqrt(1 + sigma^2); const states already are)."""
    if family == "const":
        return x
    return x / (1 + expand_sigma(sigma, x) ** 2) ** 0.5
