"""Deterministic DDIM inversion and reconstruction in k-diffusion coordinates.

A state at sigma is x = alpha(sigma) * x0 + sigma * eps. One DDIM step from sigma to sigma' keeps the
model's noise estimate and moves the clean estimate's scale:
  D = denoise(x, sigma),  eps = (x - alpha(sigma) D) / sigma,  x' = alpha(sigma') D + sigma' eps.
Inversion runs it on ascending sigmas (evaluating at the lower end, the usual DDIM-inversion
approximation); reconstruction runs it on descending sigmas (Euler / "ddim" sampling at eta 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .coordinates import alpha, check_family, expand_sigma
from .losses.trajectory import Trajectory, TrajectoryRecorder
from .schedule import sigma_values
from .step import ddim_step

# denoise(x [B, C, H, W], sigma [B]) -> D [B, C, H, W]
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]


def check_sigmas(sigmas: torch.Tensor | list[float], ascending: bool, family: str) -> list[float]:
    """The schedule as floats, or a ValueError unless it has two or more strictly ascending (or descending)
    sigmas, all >= 0 (and <= 1 for a flow model): the rule ddim_invert and ddim_reconstruct assume."""
    check_family(family)
    values = sigma_values(sigmas)
    if len(values) < 2:
        raise ValueError(f"need at least two sigmas; got {values}")
    pairs = list(zip(values[:-1], values[1:], strict=True))
    ok = all(a < b for a, b in pairs) if ascending else all(a > b for a, b in pairs)
    if not ok:
        order = "ascending" if ascending else "descending"
        raise ValueError(f"sigmas must be strictly {order}; got {values}")
    if min(values) < 0:
        raise ValueError(f"sigmas must be >= 0; got {values}")
    if family == "const" and max(values) > 1:
        raise ValueError(f"flow (const) sigmas must lie in [0, 1]; got {values}")
    return values


def _sigma_batch(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)


def ddim_invert(
    denoise: Denoise,
    x0: torch.Tensor,
    sigmas_ascending: torch.Tensor | list[float],
    family: str,
    callback: Progress | None = None,
    record_top: bool = True,
    trajectory_device: torch.device | str | None = None,
) -> tuple[torch.Tensor, Trajectory]:
    """Invert a clean latent x0 to the top sigma; returns (state at the top, trajectory of D).

    sigmas_ascending: s_0 < s_1 < ... < s_n (s_0 may be 0), as check_sigmas(..., ascending=True) accepts. The state starts at alpha(s_0) * x0 (no noise)
    and each step s_i -> s_{i+1} evaluates D at s_i; from s_0 = 0 the step is alpha(s_1) * x0 with no model
    call (the noise estimate of a clean latent is zero).

    The trajectory holds one clean estimate per given sigma, and the state it was taken at (the state the
    inversion reached there): at s_0 = 0 that is x0 itself (the clean estimate of a clean latent), at s_0 > 0 and every
    later s_i it is the D the step used, and at the top (record_top) one extra denoiser call on the
    final state, so a Structure Loss read at the sampler's first sigma has an exact entry. Its sigmas
    therefore equal the given sigmas (without the top when record_top is False).

    callback(done, total) is called after each denoiser call (total = the number of calls).
    The returned state is in k-diffusion coordinates; see latent_for_sampler for what to hand a sampler.
    """
    s = sigma_values(sigmas_ascending)
    n = len(s) - 1
    total = n - int(s[0] == 0) + int(record_top)
    rec = TrajectoryRecorder(device=trajectory_device)
    x = x0 * alpha(s[0], family) if s[0] > 0 else x0.clone()
    done = 0
    for i in range(n):
        if s[i] == 0:
            # At sigma 0 the state is the clean latent, its clean estimate is x0 itself and the flow's
            # noise estimate vanishes (eps_hat = (x - D) / sigma -> 0): the Euler step needs no model call.
            rec.append(0.0, x0, x0)
            x = alpha(s[i + 1], family) * x0
            continue
        d = denoise(x, _sigma_batch(s[i], x))
        rec.append(s[i], d, x)
        x = ddim_step(x, d, s[i], s[i + 1], family)
        done += 1
        if callback is not None:
            callback(done, total)
    if record_top:
        rec.append(s[-1], denoise(x, _sigma_batch(s[-1], x)), x)
        if callback is not None:
            callback(total, total)
    return x, rec.build()


def latent_for_sampler(x: torch.Tensor, sigma: torch.Tensor | float, family: str) -> torch.Tensor:
    """The latent a sampler with zero added noise must be given to start from state x at sigma.

    ComfyUI's noise_scaling with zero noise returns latent (eps / v) or (1 - sigma) * latent (const),
    so the answer is x / alpha(sigma). (The result is in model latent space: a node hands
    process_latent_out of it to KSamplerAdvanced add_noise=disable / SamplerCustomAdvanced + DisableNoise.)
    At alpha = 0 (flow sigma = 1) no latent reaches x: pass x as the noise of a zero latent instead.
    """
    a = alpha(expand_sigma(sigma, x), family)
    if bool(torch.any(torch.as_tensor(a) <= 0)):
        raise ValueError(
            "alpha(sigma) is 0 at this sigma (flow model at sigma = 1): a sampler's latent has no effect "
            "there; pass the inverted state as the noise with a zero latent instead"
        )
    return x / a


def ddim_reconstruct(
    denoise: Denoise,
    x_top: torch.Tensor,
    sigmas_descending: torch.Tensor | list[float],
    family: str,
    callback: Progress | None = None,
) -> torch.Tensor:
    """Deterministic DDIM / Euler sampling from x_top at sigmas[0] down to sigmas[-1] (usually 0); the sigmas
    are as check_sigmas(..., ascending=False) accepts.

    Returns the final state (the clean latent when the last sigma is 0).
    """
    s = sigma_values(sigmas_descending)
    x = x_top
    n = len(s) - 1
    for i in range(n):
        d = denoise(x, _sigma_batch(s[i], x))
        x = ddim_step(x, d, s[i], s[i + 1], family)
        if callback is not None:
            callback(i + 1, n)
    return x
