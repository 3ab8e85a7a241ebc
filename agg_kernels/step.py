"""The asymmetric reverse step and its realisation inside first-order samplers.

Guidance edits only the clean estimate: D -> D + delta, while the noise estimate eps_hat stays the
model's own. A stock sampler computes x_next from (x, R) where R is the denoised value it is given;
`compensated_denoised` picks R so that an Euler step lands exactly on `asymmetric_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .coordinates import alpha, eps_from_denoised, expand_sigma
from .schedule import following_sigma, next_sigma


def ddim_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    family: str,
    clean: torch.Tensor | None = None,
) -> torch.Tensor:
    """The deterministic DDIM update in the family's coordinates: keep the model's noise estimate, rescale the
    clean estimate. x_next = alpha(sigma_next) * C + sigma_next * eps_hat, eps_hat = (x - alpha(sigma) * D) / sigma,
    with C = `clean` (default D)."""
    eps = eps_from_denoised(x, denoised, sigma, family)
    sn = expand_sigma(sigma_next, x)
    return alpha(sn, family) * (denoised if clean is None else clean) + sn * eps


def asymmetric_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    delta: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    family: str,
) -> torch.Tensor:
    """x_next = alpha(sigma_next) * (D + delta) + sigma_next * eps_hat: the DDIM step whose clean estimate
    alone is guided (eps_hat is the model's own)."""
    return ddim_step(x, denoised, sigma, sigma_next, family, clean=denoised + delta)


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

    For ancestral samplers pass sigma_down as `sigma_next`. Needs sigma_next < sigma (realise only calls it so).
    """
    s, sn = expand_sigma(sigma, denoised), expand_sigma(sigma_next, denoised)
    return denoised + compensation_factor(s, sn, family) * delta


def symmetric_denoised(denoised: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The denoised value of the symmetric (ablation) update: D + delta."""
    return denoised + delta


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float, family: str) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: the sampler steps deterministically to sigma_down, then
    adds fresh noise of scale sigma_up so the state is at sigma_next again.

    eps / v: k-diffusion's `get_ancestral_step`; const: the `_RF` form, whose renoise also restores
    alpha(sigma_next): sigma_up = sqrt(sigma_next^2 - sigma_down^2 * alpha(sigma_next)^2 / alpha(sigma_down)^2).
    """
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    if family == "const":
        down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        ratio = (1 - sigma_next) / (1 - down)
        return down, max(sigma_next**2 - (down * ratio) ** 2, 0.0) ** 0.5
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def ancestral_sigma_down(sigma: float, sigma_next: float, eta: float, family: str) -> float:
    """The sigma a stock ancestral sampler steps down to before adding fresh noise (see ancestral_sigmas)."""
    return ancestral_sigmas(sigma, sigma_next, eta, family)[0]


# The classification of every sampler ComfyUI lists (comfy.samplers.KSampler.SAMPLERS, 0.3.52 to 0.33), by the
# name nodes.sampler.sampler_spec gives it (ComfyUI's own name), plus the pack's "agg". docs/DESIGN.md §1.3.
#
# Exact in every family: one model evaluation per schedule step and an x_next that is a fixed linear
# function of the returned R, whose guided part the compensation makes alpha(sigma_next) * delta.
EXACT_SAMPLERS = frozenset({"euler", "ddim", "euler_ancestral", "lcm", "euler_cfg_pp", "agg", "euler_ancestral_cfg_pp"})
# Samplers that step to sigma_down(eta) and add fresh noise; "agg" is the pack's three-zone DDIM
# (agg_kernels.sampler), whose per-step eta comes from its zones (SamplerSpec.eta_at).
ANCESTRAL_SAMPLERS = frozenset({"euler_ancestral", "agg"})
# Samplers whose next state is alpha(sigma_next) * R plus a noise term built from the (uncond) model
# estimate: R = D + delta is exact.
JUMP_SAMPLERS = frozenset({"lcm", "euler_cfg_pp", "euler_ancestral_cfg_pp"})
# ComfyUI's ddpm runs the DDPM posterior step in variance-exploding coordinates in every family. For eps / v
# that is exactly euler_ancestral at eta 1 (same mean, same sigma_up), so aiming at its sigma_down is exact.
# On a flow (const) state it is an Euler step to sigma_next^2 / sigma without the flow form's alpha rescale.
DDPM_SAMPLERS = frozenset({"ddpm"})
DDPM_CONST_REASON = ("runs the variance-exploding DDPM step on a flow state, an Euler step to sigma_next^2 / sigma "
                     "without the alpha rescale of the flow ancestral form")

_SECOND_ORDER = "is second order: its step averages in an estimate at the next schedule point"
_MIDPOINT = "steps from an estimate made at a midpoint between schedule points"
_MULTISTEP = "is multistep: its step mixes earlier steps' estimates into the current one"
# Why the compensation is approximate for each of the other stock samplers (a sentence completing
# "sampler 'NAME' ...").
APPROXIMATE_SAMPLERS: dict[str, str] = {
    "heun": _SECOND_ORDER,
    "heunpp2": _SECOND_ORDER,
    "exp_heun_2_x0": "is second order in x0 and logSNR: its step mixes in the estimate at the next schedule point "
                     "(phi_2 weights)",
    "exp_heun_2_x0_sde": "is second order in x0 and logSNR with SDE noise: its step mixes in the estimate at the "
                         "next schedule point (phi_2 weights)",
    "dpm_2": _MIDPOINT,
    "dpm_2_ancestral": _MIDPOINT,
    "lms": _MULTISTEP,
    "dpm_fast": "is DPM-Solver on its own steps, not the run's schedule",
    "dpm_adaptive": "is DPM-Solver with adaptive steps, not the run's schedule",
    "dpmpp_2s_ancestral": _MIDPOINT,
    "dpmpp_2s_ancestral_cfg_pp": _MIDPOINT,
    "dpmpp_sde": _MIDPOINT,
    "dpmpp_sde_gpu": _MIDPOINT,
    "dpmpp_2m": _MULTISTEP,
    "dpmpp_2m_cfg_pp": _MULTISTEP,
    "dpmpp_2m_sde": _MULTISTEP,
    "dpmpp_2m_sde_gpu": _MULTISTEP,
    "dpmpp_2m_sde_heun": _MULTISTEP,
    "dpmpp_2m_sde_heun_gpu": _MULTISTEP,
    "dpmpp_3m_sde": _MULTISTEP,
    "dpmpp_3m_sde_gpu": _MULTISTEP,
    "ipndm": _MULTISTEP,
    "ipndm_v": _MULTISTEP,
    "deis": _MULTISTEP,
    "res_multistep": _MULTISTEP,
    "res_multistep_cfg_pp": _MULTISTEP,
    "res_multistep_ancestral": _MULTISTEP,
    "res_multistep_ancestral_cfg_pp": _MULTISTEP,
    "gradient_estimation": "extrapolates with the previous step's estimate",
    "gradient_estimation_cfg_pp": "extrapolates with the previous step's estimate",
    "er_sde": _MULTISTEP,
    "seeds_2": "steps from estimates made between schedule points",
    "seeds_3": "steps from estimates made between schedule points",
    "sa_solver": "is a multistep predictor-corrector (stochastic Adams)",
    "sa_solver_pece": "is a multistep predictor-corrector (stochastic Adams)",
    "uni_pc": "is a multistep predictor-corrector (UniPC)",
    "uni_pc_bh2": "is a multistep predictor-corrector (UniPC)",
}
UNKNOWN_REASON = "is not one the pack classifies; it is assumed to take an Euler step"

# The eta a stock sampler runs with when its options set none: k-diffusion's default (1 for these, 0 for the
# rest), the same on ComfyUI 0.3.52 to 0.33.
DEFAULT_ETAS: dict[str, float] = dict.fromkeys((
    "euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "exp_heun_2_x0_sde", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "seeds_2", "seeds_3"), 1.0)


def is_classified(sampler: str | None) -> bool:
    """Whether the pack knows how `sampler` steps from the returned value (exact or approximate, with its reason)."""
    return sampler in EXACT_SAMPLERS or sampler in DDPM_SAMPLERS or sampler in APPROXIMATE_SAMPLERS


def approximation_reason(sampler: str | None, family: str) -> str | None:
    """Why the compensation does not make `sampler`'s step the asymmetric step in `family` (None: it does), as
    the end of a sentence starting "sampler 'NAME' "."""
    if sampler in EXACT_SAMPLERS or (sampler in DDPM_SAMPLERS and family != "const"):
        return None
    if sampler in DDPM_SAMPLERS:
        return DDPM_CONST_REASON
    return APPROXIMATE_SAMPLERS.get(sampler or "", UNKNOWN_REASON)


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
    exact = approximation_reason(sampler, family) is None
    if sampler in JUMP_SAMPLERS:
        # lcm jumps to R and draws fresh noise; euler_cfg_pp re-noises R with the uncond estimate.
        return 0.0, exact
    if sampler in ANCESTRAL_SAMPLERS:
        return ancestral_sigma_down(sigma, sigma_next, eta, family), exact
    if sampler in DDPM_SAMPLERS:
        # the variance-exploding ancestral step at eta 1 in every family (sigma_next^2 / sigma)
        return ancestral_sigma_down(sigma, sigma_next, 1.0, "eps"), exact
    return sigma_next, exact


@dataclass(frozen=True)
class SamplerSpec:
    """What the guided step needs to know of the sampler that will step from the returned value.

    name: the stepping rule ("euler", "euler_ancestral", "agg", ...; None when unknown); eta: its noise
    fraction; eta_at: for samplers whose eta varies per step (the AGG sampler's zones), the eta of the step
    starting at a sigma of the run's schedule.
    """

    name: str | None
    eta: float = 0.0
    eta_at: Callable[[float], float | None] | None = field(default=None, compare=False)

    def eta_for(self, sigma: float) -> float:
        value = self.eta_at(sigma) if self.eta_at is not None else None
        return self.eta if value is None else float(value)


@dataclass(frozen=True)
class Realised:
    """The guided step as handed to the sampler: `returned` is what the sampler steps with, `shown` what
    previews and the run's denoised output show (D + delta); `reason` says why the step is not exact, in words
    that do not depend on sigma (one warning per reason and run)."""

    returned: torch.Tensor
    shown: torch.Tensor
    exact: bool
    reason: str | None = None


def realise(
    denoised: torch.Tensor,
    delta: torch.Tensor,
    sigma: float,
    schedule: torch.Tensor | list[float] | None,
    sampler: SamplerSpec,
    family: str,
    asymmetric: bool = True,
) -> Realised:
    """The value a stock sampler must receive at sigma so that its step realises the guided step.

    Symmetric: D + delta. Asymmetric: compensated_denoised toward the sampler's target sigma (the next
    schedule entry, its ancestral sigma_down, or 0 for the samplers that jump to R); exact at schedule points for
    the samplers approximation_reason finds none for, approximate elsewhere (the reason tells which case).
    """
    shown = denoised + delta
    if not asymmetric:
        return Realised(shown, shown, True)
    sn = next_sigma(schedule, sigma)
    if sn is None:
        # Between schedule points (heun's corrector, dpm_2, sde midpoints): aim at the next entry below.
        target, exact = following_sigma(schedule, sigma), False
        reason = "evaluations between schedule points are realised approximately"
    else:
        target, exact = compensation_target(sampler.name, sigma, sn, family, sampler.eta_for(sigma))
        reason = None if exact else (
            f"sampler '{sampler.name}' {approximation_reason(sampler.name, family)}, so the asymmetric step is "
            "realised approximately (exact for euler, ddim, euler_ancestral, lcm, the cfg_pp Euler forms, ddpm "
            "outside flow models and the AGG sampler)")
    if target is None or target >= sigma:
        return Realised(shown, shown, False, "where no schedule point follows, the symmetric update is used")
    returned = compensated_denoised(denoised.float(), delta.float(), sigma, target, family).to(denoised.dtype)
    return Realised(returned, shown, exact, reason)
