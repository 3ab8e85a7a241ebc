"""Strength in units that do not depend on the model.

A term of weight w pulls the clean estimate by w, as an RMS distance over one sample's latent, per guided
step, at unit posterior covariance: its gradient is normalised per sample before it is weighted, so the
raw size of a loss (CLIP's, a decoder's, a user's constant factor) never matters. The pull then goes
through the posterior covariance of x0 given x (the manifold step), which for unit-variance latents is at
most the identity, and the whole step is capped by a trust region of the size of the posterior spread.

  pull_i   = w_i * g_i / RMS(g_i)              (anchored terms: clipped so no element passes its reference)
  Delta    = -C(sigma) pull                    C = (sigma^2 / alpha) J  (the Tweedie covariance), or
                                               sigma^2 / (alpha^2 + sigma^2) (unit-variance prior, J unknown)
  |Delta|  <= trust * sqrt(sigma^2 / (alpha^2 + sigma^2))   (RMS per sample)
"""

from __future__ import annotations

import torch

from .coordinates import alpha

# Default trust radius, in posterior standard deviations of x0 given x (RMS per sample).
DEFAULT_TRUST = 0.5

# Default loss weights, in these units: a tenth of the latent's own spread per guided step, so that the
# paper's ~19 guided steps can move an image by about its own scale while a single step stays well inside
# the trust region (0.5 posterior standard deviations, ~0.47 at the first step of an img2img run at
# denoise 0.6 on SD1.5). Structure and target at equal weight pull equally hard.
DEFAULT_STRUCTURE_WEIGHT = 0.1
DEFAULT_CLIP_WEIGHT = 0.1
DEFAULT_STYLE_WEIGHT = 0.1
DEFAULT_COLOR_WEIGHT = 0.1


def rms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square, [B]."""
    return t.flatten(1).float().pow(2).mean(1).sqrt()


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] tensor shaped to broadcast against `like` ([B, 1, 1, ...])."""
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def unit(g: torch.Tensor) -> torch.Tensor:
    """g / RMS(g) per sample (unit RMS); zero where the gradient is zero or not finite."""
    r = rms(g)
    ok = torch.isfinite(r) & (r > 0)
    scale = torch.where(ok, 1 / torch.where(ok, r, torch.ones_like(r)), torch.zeros_like(r))
    return torch.nan_to_num(g) * per_sample(scale, g)


def term_pull(grad: torch.Tensor, weight: float, x0: torch.Tensor | None = None, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """The step a term asks of the clean estimate, as a gradient-like vector (x0 moves by -pull).

    weight * unit(grad); with an anchor, each element moves toward the anchor by at most its distance
    to it and never away from it (a proximal step: raising the weight can only bring x0 closer).
    """
    p = float(weight) * unit(grad)
    if anchor is None or x0 is None:
        return p
    d = x0 - anchor
    toward = p * d > 0
    return torch.where(toward, torch.sign(d) * torch.minimum(p.abs(), d.abs()), torch.zeros_like(p))


def posterior_variance(sigma: torch.Tensor | float, family: str) -> torch.Tensor | float:
    """sigma^2 / (alpha^2 + sigma^2): Var[x0 | x] per element for unit-variance data.

    The covariance step of manifold mode `none`; with the model's own Jacobian the covariance is
    (sigma^2 / alpha) J, which equals this for unit-variance Gaussian data.
    """
    a = alpha(sigma, family)
    return sigma**2 / (a**2 + sigma**2)


def covariance_scale(sigma: torch.Tensor | float, family: str) -> torch.Tensor | float:
    """sigma^2 / alpha(sigma): turns a Jacobian-vector product J v into the covariance product Cov v."""
    return sigma**2 / alpha(sigma, family)


def trust_radius(sigma: torch.Tensor, family: str, trust: float = DEFAULT_TRUST) -> torch.Tensor:
    """The largest RMS step per sample: `trust` posterior standard deviations ([B])."""
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    return float(trust) * torch.as_tensor(posterior_variance(s, family)).sqrt()


def clip_to_radius(delta: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta scaled down per sample so RMS(delta) <= radius, [B] bool: whether the cap acted)."""
    r = rms(delta)
    radius = radius.to(r.device).expand_as(r)
    hit = r > radius
    factor = torch.where(hit, radius / torch.where(hit, r, torch.ones_like(r)), torch.ones_like(r))
    return delta * per_sample(factor, delta), hit


def is_descent(pull: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[B] bool: moving x0 by -step lowers the weighted loss to first order (<pull, step> > 0), and is finite."""
    inner = (pull.flatten(1).double() * step.flatten(1).double()).sum(1)
    return torch.isfinite(step.flatten(1)).all(1) & (inner > 0)

