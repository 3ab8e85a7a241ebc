"""The manifold step: a pull on the clean estimate carried through the posterior covariance of x0 given x.

For a Tweedie denoiser D(x) = E[x0 | x], J = dD/dx = alpha Cov[x0 | x] / sigma^2, so the covariance product
is Cov v = (sigma^2 / alpha) J v. Modes:
  autograd           J^T v through a differentiable denoiser (exact; J is symmetric, so J^T v = J v).
  finite_difference  J v ~ (D(x + h v) - D(x)) / h: one extra forward pass, no backward pass.
  none               J unknown: the unit-variance prior's covariance sigma^2 / (alpha^2 + sigma^2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .coordinates import expand_sigma
from .strength import covariance_scale, posterior_variance

MANIFOLD_MODES = ("finite_difference", "autograd", "none")
Denoiser = Callable[[torch.Tensor], torch.Tensor]

# The finite-difference probe moves x by this fraction of sigma (RMS per sample). The Tweedie
# Jacobian varies on the scale of sigma, so the truncation error is O(FD_REL_STEP) while the
# rounding error of a float32 model output stays well below the difference.
FD_REL_STEP = 2e-2


def grad_enabled():
    """A context that allows autograd inside ComfyUI's inference_mode / no_grad."""
    return _GradContext()


class _GradContext:
    def __enter__(self):
        self._inf = torch.inference_mode(False)
        self._grad = torch.enable_grad()
        self._inf.__enter__()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self._inf.__exit__(*exc)
        return False


def plain(t: torch.Tensor) -> torch.Tensor:
    """A detached copy that is an ordinary tensor (not an inference tensor), so autograd may save it."""
    with torch.inference_mode(False):
        return t.detach().clone()


def vjp_autograd(denoise: Denoiser, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J^T v through a differentiable denoiser."""
    with grad_enabled():
        xg = x.detach().clone().requires_grad_(True)
        out = denoise(xg)
        (g,) = torch.autograd.grad(out, xg, grad_outputs=v.detach().clone().to(out.dtype))
    return g.to(x.dtype)


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


def manifold_gradient(
    mode: str,
    grad_denoised: torch.Tensor,
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: torch.Tensor | float,
    denoise: Denoiser | None = None,
    rel_step: float = FD_REL_STEP,
) -> torch.Tensor:
    """J^T v for v = grad_denoised, by the chosen mode (`none`: v itself, J ~ I)."""
    if mode == "none":
        return grad_denoised
    if denoise is None:
        raise ValueError(f"manifold mode {mode!r} needs a denoiser")
    if mode == "finite_difference":
        return jvp_finite_difference(denoise, x, denoised, grad_denoised, sigma, rel_step)
    if mode == "autograd":
        return vjp_autograd(denoise, x, grad_denoised)
    raise ValueError(f"unknown manifold mode {mode!r}; expected one of {', '.join(MANIFOLD_MODES)}")


def covariance_product(
    mode: str,
    v: torch.Tensor,
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: torch.Tensor | float,
    family: str,
    denoise: Denoiser | None = None,
    rel_step: float = FD_REL_STEP,
) -> torch.Tensor:
    """Cov[x0 | x] v: (sigma^2 / alpha) J v from the denoiser, or the unit-variance prior's for `none`."""
    s = expand_sigma(sigma, v)
    if mode == "none":
        return posterior_variance(s, family) * v
    return covariance_scale(s, family) * manifold_gradient(mode, v, x, denoised, sigma, denoise, rel_step)
