"""The manifold step: a pull on the clean estimate carried through the posterior covariance of x0 given x.

For a Tweedie denoiser D(x) = E[x0 | x], J = dD/dx = alpha Cov[x0 | x] / sigma^2, so the covariance product
is Cov v = (sigma^2 / alpha) J v. Modes:
  autograd           J^T v through a differentiable denoiser (exact; J is symmetric, so J^T v = J v).
  finite_difference  J v ~ (D(x + h v) - D(x)) / h: one extra forward pass, no backward pass.
  none               J unknown: the unit-variance prior's covariance sigma^2 / (alpha^2 + sigma^2).

A model that computes in half precision rounds its output, and D = x - sigma eps_hat carries that rounding
times sigma: its finite difference is probed wider and two-sided, and the two one-sided differences
estimate its error (fd_error_estimate), so a probe lost in rounding noise can be told apart and replaced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .autograd import grad_enabled as grad_enabled
from .autograd import plain as plain
from .coordinates import expand_sigma
from .strength import covariance_scale, posterior_variance

MANIFOLD_MODES = ("finite_difference", "autograd", "none")
Denoiser = Callable[[torch.Tensor], torch.Tensor]

# The finite-difference probe moves x by this fraction of sigma (RMS per sample). The Tweedie
# Jacobian varies on the scale of sigma, so the truncation error is O(FD_REL_STEP) while the
# rounding error of a float32 model output stays well below the difference.
FD_REL_STEP = 2e-2

# Half precision (fp16, bf16, fp8 weights cast to either) rounds eps_hat to ~1e-3 (fp16) or ~4e-3 (bf16)
# relative, and D = x - sigma * eps_hat multiplies that by sigma: a five times wider probe keeps the
# difference above the rounding, and a two-sided one keeps the truncation error O(h^2) at that width.
FD_REL_STEP_HALF = 1e-1

# The largest estimated relative error of a two-sided finite-difference covariance product that is still
# used. An error e orthogonal to the product leaves cos(estimate, exact) = 1 / sqrt(1 + e^2): 0.94 at 0.35,
# which leaves room for the difference between J v and J^T v (a trained network's Jacobian is not exactly
# symmetric) within cos 0.9 of the exact autograd step.
FD_MAX_ERROR = 0.35

# The mode a run takes for the rest of its steps when its own cannot go through the model (autograd through
# inference weights, in-place updates or fused kernels without a backward).
FALLBACK_MODES = {"autograd": "finite_difference"}

# The words the fallback's report uses when the probe is rounding noise (the runtime warns once per reason).
FD_NOISE_REASON = "below the model's rounding noise"


def vjp_autograd(denoise: Denoiser, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J^T v through a differentiable denoiser."""
    with grad_enabled():
        xg = x.detach().clone().requires_grad_(True)
        out = denoise(xg)
        (g,) = torch.autograd.grad(out, xg, grad_outputs=v.detach().clone().to(out.dtype))
    return g.to(x.dtype)


def reduced_precision(dtype: torch.dtype) -> bool:
    """A floating dtype with a coarser mantissa than float32's: float16, bfloat16, the float8 formats."""
    return dtype.is_floating_point and torch.finfo(dtype).eps > torch.finfo(torch.float32).eps


def fd_rel_step_for(dtype: torch.dtype) -> float:
    """The probe's size, relative to sigma, for a model that computes in `dtype`."""
    return FD_REL_STEP_HALF if reduced_precision(dtype) else FD_REL_STEP


def fd_error_estimate(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """[B] relative error of the central difference (forward + backward) / 2 against the true J v, estimated
    from the one-sided differences forward = (D(x + h v) - D(x)) / h and backward = (D(x) - D(x - h v)) / h.

    Rounding noise of RMS s in each pass, independent between passes: forward - backward =
    (n+ + n- - 2 n0) / h has RMS sqrt(6) s / h and the central difference's noise (n+ - n-) / 2h has RMS
    s / (sqrt(2) h), so n = |forward - backward| / sqrt(12) is the central difference's noise. That noise is
    independent of J v, so |central|^2 ~ |J v|^2 + n^2 and the error relative to J v is r / sqrt(1 - r^2)
    with r = n / |central| (inf from r = 1: the difference is all noise). Curvature adds h D''[v, v] to
    forward - backward but only O(h^2) to the central difference: there the estimate errs on the large side.
    """
    noise = (forward - backward).flatten(1).double().norm(dim=1) / math.sqrt(12)
    central = ((forward + backward) / 2).flatten(1).double().norm(dim=1)
    r = noise / torch.where(central > 0, central, 1.0)
    signal = (1 - r.square()).clamp_min(0).sqrt()
    error = torch.where((central > 0) & (signal > 0), r / torch.where(signal > 0, signal, 1.0), math.inf)
    return torch.where(torch.isfinite(noise) & torch.isfinite(central), error, math.nan).float()


def fd_is_noise(error: torch.Tensor, max_error: float = FD_MAX_ERROR) -> torch.Tensor:
    """[B] bool: the estimated relative error is above max_error (or not a number): the probe is noise."""
    return ~(error <= max_error)


def fd_step_size(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float, rel_step: float = FD_REL_STEP) -> torch.Tensor:
    """h per sample so that h * v has RMS rel_step * sigma."""
    rms = v.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-20)
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    return expand_sigma(rel_step * s / rms, x)


def jvp_finite_difference(
    denoise: Denoiser,
    x: torch.Tensor,
    denoised: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    rel_step: float = FD_REL_STEP,
) -> torch.Tensor:
    """J v ~ (D(x + h v) - D(x)) / h with one extra denoiser call; `denoised` is D(x) of the same denoiser."""
    h = fd_step_size(x, v, sigma, rel_step)
    probe = denoise(x + h * v)
    return (probe - denoised) / h


def jvp_central_difference(
    denoise: Denoiser,
    x: torch.Tensor,
    denoised: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    rel_step: float = FD_REL_STEP_HALF,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(J v ~ (D(x + h v) - D(x - h v)) / 2h, its [B] estimated relative error) with two extra denoiser calls;
    `denoised` is D(x) of the same denoiser (it enters only the error estimate)."""
    h = fd_step_size(x, v, sigma, rel_step)
    up, down = denoise(x + h * v), denoise(x - h * v)
    return (up - down) / (2 * h), fd_error_estimate((up - denoised) / h, (denoised - down) / h)


class CovarianceProduct(NamedTuple):
    """Cov[x0 | x] v by `mode`, with `noise` ([B] bool, two-sided probes only) marking the samples whose
    estimate is rounding noise, and `reason` saying so for the report."""

    value: torch.Tensor
    mode: str = "none"
    noise: torch.Tensor | None = None
    reason: str | None = None


# v -> Cov[x0 | x] v at one step's state: what the guided step carries its pull through.
Covariance = Callable[[torch.Tensor], CovarianceProduct]


def prior_covariance(sigma: torch.Tensor | float, family: str) -> Covariance:
    """v -> the unit-variance prior's covariance sigma^2 / (alpha^2 + sigma^2) times v (mode `none`)."""
    return lambda v: CovarianceProduct(posterior_variance(expand_sigma(sigma, v), family) * v)


def covariance_operator(
    mode: str,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    family: str,
    denoise: Denoiser | None = None,
    base: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    differentiable: Denoiser | None = None,
) -> Covariance:
    """The covariance product of one step, decided once from the mode (the one place that reads it):
    (sigma^2 / alpha) J v from the denoiser by autograd or finite differences, or the prior's (`none`).

    `denoise` is the denoiser probed by finite differences, `differentiable` the one autograd goes back
    through (default: `denoise`); `base` is the denoiser's value at x (one more pass when not given);
    `dtype` is the dtype the model computes in: in half precision the finite difference probes wider and
    two-sided and marks the samples whose estimated relative error is above FD_MAX_ERROR as noise.
    """
    if mode == "none":
        return prior_covariance(sigma, family)
    if mode not in MANIFOLD_MODES:
        raise ValueError(f"unknown manifold mode {mode!r}; expected one of {', '.join(MANIFOLD_MODES)}")
    if denoise is None:
        raise ValueError(f"manifold mode {mode!r} needs a denoiser")
    x = plain(x).float()
    scale = covariance_scale(expand_sigma(sigma, x), family)
    if mode == "autograd":
        through = differentiable or denoise
        return lambda v: CovarianceProduct(scale * vjp_autograd(through, x, v), mode)
    base = denoise(x) if base is None else plain(base).float()
    rel_step = fd_rel_step_for(dtype)
    if not reduced_precision(dtype):
        return lambda v: CovarianceProduct(scale * jvp_finite_difference(denoise, x, base, v, sigma, rel_step), mode)

    def two_sided(v: torch.Tensor) -> CovarianceProduct:
        jv, error = jvp_central_difference(denoise, x, base, v, sigma, rel_step)
        noise = fd_is_noise(error, FD_MAX_ERROR)
        reason = None
        if bool(noise.any()):
            reason = (f"{mode} probe {FD_NOISE_REASON} (estimated error {float(error[noise].max()):.0%}) on "
                      f"{int(noise.sum())} of {len(noise)} samples")
        return CovarianceProduct(scale * jv, mode, noise, reason)

    return two_sided
