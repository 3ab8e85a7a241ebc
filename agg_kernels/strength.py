"""Strength in units that do not depend on the model or on the step count.

A term of weight w pulls the clean estimate by w, as an RMS distance over one sample's latent, per reference
step of schedule time (0.04 of v = sigma^2 / (alpha^2 + sigma^2), agg_kernels.schedule), at unit posterior
covariance: a guided step of share `rate` of that time (schedule.step_rate) pulls by rate * w. Its gradient is normalised
per sample before it is weighted, so the raw size of a loss (CLIP's, a decoder's, a user's constant factor)
never matters. The pull then goes through the posterior covariance of x0 given x (the manifold step), which
for unit-variance latents is at most the identity, and the whole step is held to a trust region of rate *
`trust` posterior standard deviations:

  pull_i   = rate * w_i * g_i / RMS(g_i)       (anchored terms: clipped so no element passes its reference;
                                               terms with a floor: scaled so <g_i, pull_i> <= L_i - floor_i)
  Delta    = -C(sigma) pull                    C = (sigma^2 / alpha) J  (the Tweedie covariance), or
                                               sigma^2 / (alpha^2 + sigma^2) (unit-variance prior, J unknown)
  |Delta|  <= rate * trust * sqrt(sigma^2 / (alpha^2 + sigma^2))   (RMS per sample: every weight is scaled
                                               down together until the covariance step fits, fit_factor)
  |Delta_j| <= min(rate, 1) * ELEMENT_BOUND * sqrt(sigma^2 / (alpha^2 + sigma^2))   (every element)

Everything is per sample: weights may be [B] tensors (a per-image mask or adaptive multiplier), and every
norm is taken over one sample's latent, so an image's step never depends on the rest of its batch. Norms
are taken after dividing by the largest element, so a gradient of any size fp32 can hold gives the same
direction (squaring 1e-22 or 1e20 in fp32 would under- or overflow).
"""

from __future__ import annotations

import math

import torch

from .coordinates import alpha

# Default trust radius, in posterior standard deviations of x0 given x (RMS per sample) per reference step
# of schedule time. It bounds how fast guidance may move the clean estimate over the run. A Structure Loss
# held at its reference for long puts the state past the source's own trajectory (at high noise the posterior
# mean of the state that ends at the source is a shrunk image, not the source), and the run then ends beyond
# the source: on the exact Gaussian denoiser (tests/agg_kernels/test_strength.py) raising its weight past the
# cap moved the result away again at 0.3 (flow, 20-60 steps: +2 % to +6 % per step up in weight); at 0.2 the final distance falls
# with the weight at 8 to 60 steps in every family, on the source latent and on an inversion trajectory.
DEFAULT_TRUST = 0.2

# Longest share of schedule time one sub-step of a guided step takes, in reference steps. A step that spans
# more (a 4- or 8-step schedule, where one step may hold the whole window) is taken as substeps(rate) equal
# sub-steps of the clean estimate at the same state, each with its own gradient and covariance product, as
# the steps of a longer schedule would: a term with a floor closes in on it over several sub-steps, where
# one step asks only for the first-order move to its floor. The steps of a 20-step run (rate 0.8-1.6 on the
# default window) are taken whole, so only few-step schedules pay for more gradients.
MAX_SUBSTEP_RATE = 2.0

# Largest move of one latent element in one step, in posterior standard deviations. The RMS trust region
# bounds the step on average only: a gradient that lives on a few elements (a range loss on one pixel)
# would move those elements by weight * sqrt(elements). 2 keeps every element inside the central ~95 % of a
# Gaussian posterior for x0, and a dense step at the default RMS cap (0.2 per reference step, 0.2-0.3 for the
# steps of a 20-step run) reaches 2 only 7 of its own standard deviations out, so the bound acts on peaked
# steps and leaves dense ones.
ELEMENT_BOUND = 2.0

# Default loss weights, in these units: a tenth of the latent's own spread per reference step, so that the
# default window (6.2 reference steps on SD1.5, 9.2 on a flow model; 6 guided steps of a 20-step run at
# denoise 0.6) can move an image by a good part of its own scale while a single step stays inside the trust
# region (0.2 posterior standard deviations per reference step, ~0.19 at the first step of that run).
# Structure and target at equal weight pull equally hard.
DEFAULT_STRUCTURE_WEIGHT = 0.1
DEFAULT_CLIP_WEIGHT = 0.1
DEFAULT_STYLE_WEIGHT = 0.1
DEFAULT_COLOR_WEIGHT = 0.1


def substeps(rate: float) -> int:
    """How many equal sub-steps a guided step of share `rate` is taken in: each at most MAX_SUBSTEP_RATE."""
    return max(1, math.ceil(float(rate) / MAX_SUBSTEP_RATE - 1e-9))


def peak(t: torch.Tensor) -> torch.Tensor:
    """Per-sample largest |element|, [B] float32 (nan where a sample holds a nan)."""
    return t.flatten(1).float().abs().amax(1)


def rms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square, [B], computed on t / max|t|: exact for any size fp32 can hold."""
    f = t.flatten(1).float()
    m = peak(t)
    ok = torch.isfinite(m) & (m > 0)
    safe = torch.where(ok, m, torch.ones_like(m))
    return torch.where(ok, (f / safe[:, None]).pow(2).mean(1).sqrt() * safe, m)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] tensor shaped to broadcast against `like` ([B, 1, 1, ...])."""
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def unit(g: torch.Tensor) -> torch.Tensor:
    """g / RMS(g) per sample (unit RMS); zero where the gradient is zero or not finite.

    Scaled by the largest element first: 1 / RMS of a subnormal gradient would overflow to inf.
    """
    m = peak(g)
    ok = torch.isfinite(m) & (m > 0)
    scaled = g.float() / per_sample(torch.where(ok, m, torch.ones_like(m)), g).float()
    r = scaled.flatten(1).pow(2).mean(1).sqrt()  # in [1 / sqrt(elements), 1]: no under- or overflow
    factor = torch.where(ok, 1 / torch.where(ok, r, torch.ones_like(r)), torch.zeros_like(r))
    return (torch.nan_to_num(scaled) * per_sample(factor, scaled)).to(g.dtype)


Weight = float | torch.Tensor


def sample_weights(weight: Weight, like: torch.Tensor) -> torch.Tensor:
    """A weight (a number, or [1] / [B] per sample) as a [B] float tensor on like's device."""
    w = torch.as_tensor(weight, dtype=torch.float32).detach().reshape(-1).to(like.device)
    return w.expand(like.shape[0]) if w.numel() == 1 else w


def floor_factor(grad: torch.Tensor, pull: torch.Tensor, value: torch.Tensor, floor: float) -> torch.Tensor:
    """[B] factor <= 1 so that the pull's first-order decrease <grad, pull> does not exceed value - floor.

    A Polyak step size: a term near its floor (a range loss with one pixel just out of range, a colour
    loss that already matches) asks only for the move a linear model says would reach the floor, instead
    of the full weight. Computed in float64: the inner product of two fp32 tensors of any size is exact
    enough there and never overflows.
    """
    decrease = (grad.flatten(1).double() * pull.flatten(1).double()).sum(1)
    gap = (value.detach().double().reshape(-1).to(decrease.device) - float(floor)).clamp_min(0).expand_as(decrease)
    limit = decrease > gap
    factor = torch.where(limit, gap / torch.where(limit, decrease, torch.ones_like(decrease)), torch.ones_like(decrease))
    return factor.float()


def term_pull(grad: torch.Tensor, weight: Weight, x0: torch.Tensor | None = None, anchor: torch.Tensor | None = None,
              value: torch.Tensor | None = None, floor: float | None = None) -> torch.Tensor:
    """The step a term asks of the clean estimate, as a gradient-like vector (x0 moves by -pull).

    weight * unit(grad), per sample. With an anchor, each element moves toward the anchor by at most its
    distance to it and never away from it (a proximal step: raising the weight can only bring x0 closer).
    Without one, a term that declares the least value it can take (`floor`, given its per-sample `value`)
    is scaled down by floor_factor, so its pull fades as it reaches that floor.
    """
    p = unit(grad) * per_sample(sample_weights(weight, grad), grad)
    if anchor is None or x0 is None:
        if floor is None or value is None:
            return p
        return p * per_sample(floor_factor(grad, p, value, floor), p)
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


def fit_factor(step: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """[B] factor <= 1 that brings a step's RMS within radius (1 where it already is)."""
    r = rms(step)
    radius = radius.to(r.device).expand_as(r)
    hit = r > radius
    return torch.where(hit, radius / torch.where(hit, r, torch.ones_like(r)), torch.ones_like(r))


def clip_to_radius(delta: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta scaled down per sample so RMS(delta) <= radius, [B] bool: whether the cap acted)."""
    factor = fit_factor(delta, radius)
    return delta * per_sample(factor, delta), factor < 1


def element_limit(sigma: torch.Tensor, family: str, bound: float = ELEMENT_BOUND) -> torch.Tensor:
    """The largest move of one element per sample: `bound` posterior standard deviations ([B])."""
    return trust_radius(sigma, family, bound)


def clamp_elements(delta: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta with every element clamped to +-limit of its sample, [B] bool: whether any element was).

    Clamping, not rescaling: the elements the bound does not reach keep their move, and every clamped
    element keeps its sign, so a step toward an anchor stays toward it and never passes it.
    """
    lim = per_sample(limit.to(delta.device).expand(delta.shape[0]), delta)
    hit = (delta.abs() > lim).flatten(1).any(1)
    return torch.maximum(torch.minimum(delta, lim), -lim), hit


def is_descent(pull: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[B] bool: moving x0 by -step lowers the weighted loss to first order (<pull, step> > 0), and is finite."""
    inner = (pull.flatten(1).double() * step.flatten(1).double()).sum(1)
    return torch.isfinite(step.flatten(1)).all(1) & (inner > 0)

