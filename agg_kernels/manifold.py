"""Gradients of a loss on the clean estimate, carried back to the sampler state x.

x0_hat' = D - (sigma^2 / alpha(sigma)) * grad_x L(D(x)),  grad_x L = J^T grad_D L,  J = dD/dx.

Modes:
  autograd           exact vector-Jacobian product through a differentiable denoiser.
  finite_difference  J^T v = J v for the (symmetric) Tweedie Jacobian, so one extra forward pass
                     (D(x + h v) - D(x)) / h gives it; no backward pass through the model.
  none               J ~ I: the gradient w.r.t. the clean estimate itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .coordinates import expand_sigma, manifold_scale

MANIFOLD_MODES = ("finite_difference", "autograd", "none")
Denoiser = Callable[[torch.Tensor], torch.Tensor]

# The finite-difference probe moves x by this fraction of sigma (RMS per sample). The Tweedie
# Jacobian varies on the scale of sigma, so the truncation error is O(FD_REL_STEP) while the
# rounding error of a float32 / float16 model output stays well below the difference.
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


def per_element_scale(t: torch.Tensor) -> int:
    """Element count of one sample: losses are means, their gradients are applied per element."""
    return t[0].numel()


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
    """J v ~ (D(x + h v) - D(x)) / h with one extra denoiser call; equals J^T v for a Tweedie denoiser."""
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
    """grad_x L from grad_D L, by the chosen mode."""
    if mode == "none":
        return grad_denoised
    if denoise is None:
        raise ValueError(f"manifold mode {mode!r} needs a denoiser")
    if mode == "finite_difference":
        return jvp_finite_difference(denoise, x, denoised, grad_denoised, sigma, rel_step)
    if mode == "autograd":
        return vjp_autograd(denoise, x, grad_denoised)
    raise ValueError(f"unknown manifold mode {mode!r}; expected one of {', '.join(MANIFOLD_MODES)}")


def manifold_corrected(denoised: torch.Tensor, grad_x: torch.Tensor, sigma: torch.Tensor | float, family: str) -> torch.Tensor:
    """x0_hat' = D - (sigma^2 / alpha(sigma)) * grad_x L."""
    return denoised - manifold_scale(expand_sigma(sigma, denoised), family) * grad_x
