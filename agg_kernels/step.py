"""The asymmetric reverse step and its realisation inside first-order samplers.

Guidance edits only the clean estimate: D -> D + delta, while the noise estimate eps_hat stays the
model's own. A stock sampler computes x_next from (x, R) where R is the denoised value it is given;
`compensated_denoised` picks R so that an Euler step lands exactly on `asymmetric_step`.
"""

from __future__ import annotations

import math

import torch

from .coordinates import alpha, check_family, eps_from_denoised, expand_sigma


def asymmetric_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    delta: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    family: str,
) -> torch.Tensor:
    """x_next = alpha(sigma_next) * (D + delta) + sigma_next * eps_hat, eps_hat = (x - alpha(sigma) * D) / sigma."""
    eps = eps_from_denoised(x, denoised, sigma, family)
    sn = expand_sigma(sigma_next, x)
    return alpha(sn, family) * (denoised + delta) + sn * eps


def symmetric_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    delta: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    family: str,
) -> torch.Tensor:
    """Ordinary x0-guidance: an Euler step from x given D + delta (eps_hat recomputed from it).

    x moves by (1 - sigma_next / sigma) * delta relative to the unguided step.
    """
    check_family(family)
    s, sn = expand_sigma(sigma, x), expand_sigma(sigma_next, x)
    ratio = sn / s
    return ratio * x + (1 - ratio) * (denoised + delta)


def compensation_factor(sigma: torch.Tensor | float, sigma_next: torch.Tensor | float, family: str) -> torch.Tensor | float:
    """c such that an Euler step given R = D + c * delta lands on the asymmetric step.

    eps / v: sigma / (sigma - sigma_next); const: (1 - sigma_next) * sigma / (sigma - sigma_next).
    sigma_next = 0 gives 1 (the step lands on the clean estimate itself).
    """
    base = sigma / (sigma - sigma_next)
    return alpha(sigma_next, family) * base


def compensated_denoised(
    denoised: torch.Tensor,
    delta: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    family: str,
) -> torch.Tensor:
    """The denoised value R that makes a first-order step sigma -> sigma_next land on `asymmetric_step`.

    For ancestral samplers pass sigma_down as `sigma_next`.
    """
    s, sn = expand_sigma(sigma, denoised), expand_sigma(sigma_next, denoised)
    if bool(torch.any(torch.as_tensor(s <= sn))):
        raise ValueError("compensated_denoised needs sigma_next < sigma")
    return denoised + compensation_factor(s, sn, family) * delta


def symmetric_denoised(denoised: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The denoised value of the symmetric (ablation) update: D + delta."""
    return denoised + delta


def next_sigma(schedule: torch.Tensor | list[float] | None, sigma: float, rel_tol: float = 1e-4) -> float | None:
    """The schedule entry after `sigma`, or None when `sigma` is not in the schedule.

    Evaluations between schedule points (heun's corrector, dpm_2 and sde midpoints, s_churn) return None
    rather than a guess.
    """
    if schedule is None:
        return None
    values = [float(v) for v in (schedule.flatten().tolist() if torch.is_tensor(schedule) else schedule)]
    for i, v in enumerate(values[:-1]):
        if math.isclose(v, sigma, rel_tol=rel_tol, abs_tol=1e-7):
            return values[i + 1]
    return None


def ancestral_sigma_down(sigma: float, sigma_next: float, eta: float, family: str) -> float:
    """The sigma a stock ancestral sampler steps down to before adding fresh noise.

    Variance-exploding families use k-diffusion's `get_ancestral_step`; const uses the `_RF` form.
    """
    check_family(family)
    if not eta or sigma_next == 0:
        return sigma_next
    if family == "const":
        return sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5


# Samplers whose step from a returned denoised is first order, so the compensation is exact.
EXACT_SAMPLERS = frozenset({"euler", "ddim", "euler_ancestral", "lcm", "euler_cfg_pp", "agg", "euler_ancestral_cfg_pp"})
# Samplers that step to sigma_down(eta) and add fresh noise; "agg" is the pack's three-zone DDIM
# (agg_kernels.sampler), whose per-step eta comes from sampler.sampler_eta_at.
ANCESTRAL_SAMPLERS = frozenset({"euler_ancestral", "agg"})
# Samplers whose next state is alpha(sigma_next) * R plus a noise term built from the (uncond) model
# estimate: R = D + delta is exact.
JUMP_SAMPLERS = frozenset({"lcm", "euler_cfg_pp", "euler_ancestral_cfg_pp"})


def compensation_target(
    sampler: str | None,
    sigma: float,
    sigma_next: float | None,
    family: str,
    eta: float = 1.0,
) -> tuple[float | None, bool]:
    """(sigma the compensation should aim at, whether the result is exact) for a named sampler.

    Returns (None, False) when the step's target is unknown (an evaluation off the schedule).
    """
    if sigma_next is None:
        return None, False
    if sampler in JUMP_SAMPLERS:
        # lcm jumps to R and draws fresh noise; euler_cfg_pp re-noises R with the uncond estimate.
        return 0.0, True
    if sampler in ANCESTRAL_SAMPLERS:
        return ancestral_sigma_down(sigma, sigma_next, eta, family), True
    return sigma_next, sampler in EXACT_SAMPLERS


def following_sigma(schedule: torch.Tensor | list[float] | None, sigma: float) -> float | None:
    """The first schedule entry strictly below `sigma` (where an off-schedule evaluation's step lands)."""
    if schedule is None:
        return None
    values = [float(v) for v in (schedule.flatten().tolist() if torch.is_tensor(schedule) else schedule)]
    below = [v for v in values if v < sigma * (1 - 1e-6)]
    return max(below) if below else None
