"""The AGG sampler: DDIM with a separate eta in each of three zones (docs/DESIGN.md §1.4).

A k-diffusion sampler function (the calling convention of ComfyUI's sample_euler_ancestral): the model
maps (x, sigma[B]) to the denoised estimate. Each step is the ancestral Euler / DDIM step with the
zone's eta:
  eps / v_prediction  sigma_down, sigma_up as k-diffusion's get_ancestral_step;
                      x_next = D + sigma_down * (x - D) / sigma + sigma_up * s_noise * z
  const (flow)        the `_RF` form: step to sigma_down, rescale by alpha(sigma_next) / alpha(sigma_down),
                      add noise so the marginal variance at sigma_next is right.
eta = 0 everywhere is plain DDIM (Euler); eta = 1 everywhere is euler_ancestral.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from .schedule import DEFAULT_ZONES, Zones, step_index, window_edit_end, zone_eta
from .step import ancestral_sigmas, ddim_step

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ancestral_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: float,
    sigma_next: float,
    eta: float,
    family: str,
    noise: Callable[[], torch.Tensor],
    s_noise: float = 1.0,
) -> torch.Tensor:
    """One DDIM step with the given eta; `noise()` is only called when fresh noise is added."""
    if sigma_next == 0:
        return denoised
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta, family)
    x = ddim_step(x, denoised, sigma, sigma_down, family)
    if family == "const" and eta:
        # Stepping down in flow coordinates also shrank the signal: restore alpha(sigma_next).
        x = x * ((1 - sigma_next) / (1 - sigma_down))
    if sigma_up > 0 and s_noise:
        x = x + noise() * (s_noise * sigma_up)
    return x


def default_noise(x: torch.Tensor, seed: int | None) -> NoiseSampler:
    """Standard normal noise like x, from a generator seeded with `seed` (unseeded when None)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(int(seed))

    def sampler(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return sampler


def _progress(n: int, disable: bool | None):
    try:
        from tqdm.auto import trange
    except ImportError:  # tqdm is optional: the progress bar is cosmetic
        return range(n)
    return trange(n, disable=disable)


@torch.no_grad()
def sample_agg(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    zones: Zones = DEFAULT_ZONES,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    family: str = "eps",
) -> torch.Tensor:
    """Three-zone DDIM: zones.eta_edit on steps [0, edit_end), zones.eta on [edit_end, boost_start),
    zones.eta_boost after.

    family is one of coordinates.FAMILIES and the zones satisfy schedule.check_zones: the caller checks both
    once (the AGG Sampler node does, before sampling starts).
    """
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise(x, extra_args.get("seed", None))
    s_in = x.new_ones([x.shape[0]])
    n_steps = len(sigmas) - 1
    for i in _progress(n_steps, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        step_eta = zone_eta(i, n_steps, zones)
        x = ancestral_step(
            x,
            denoised,
            float(sigma),
            float(sigma_next),
            step_eta,
            family,
            lambda s=sigma, sn=sigma_next: noise_sampler(s, sn),
            s_noise,
        )
    return x


def resolved_zones(zones: Zones, follow_guidance: bool, sigmas: torch.Tensor | Sequence[float],
                   window_low: float | None, family: str) -> Zones:
    """The zones a run of `sigmas` steps with: with `follow_guidance` and a guidance window ending at sigma
    `window_low`, the edit zone is the window's steps (window_edit_end, at most boost_start). The AGG
    sampler and the guided step both resolve through here, from the same window."""
    if not follow_guidance or window_low is None:
        return zones
    return replace(zones, edit_end=min(window_edit_end(sigmas, window_low, family), zones.boost_start))


def sampler_eta_at(sigmas: torch.Tensor | Sequence[float], sigma: torch.Tensor | float, zones: Zones = DEFAULT_ZONES) -> float | None:
    """The eta `sample_agg` uses for the step starting at `sigma` of the run `sigmas`; None off the schedule.

    Pass the run's own schedule (transformer_options["sample_sigmas"]) so zones match the sampler's.
    Feed the answer to step.compensation_target("agg", sigma, sigma_next, family, eta).
    """
    i = step_index(sigmas, sigma)
    if i is None:
        return None
    return zone_eta(i, len(sigmas) - 1, zones)
