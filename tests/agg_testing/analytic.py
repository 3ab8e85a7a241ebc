"""Exact denoisers for Gaussian and isotropic Gaussian-mixture data, in every model family.

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I). A sampler state at noise level sigma is
  eps / v_prediction:  x = x0 + sigma * eps              (alpha = 1)
  const (flow):        x = (1 - sigma) * x0 + sigma * eps  (alpha = 1 - sigma)
so x | k ~ N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I) and the exact posterior mean (Tweedie) is
  E[x0 | x] = sum_k r_k(x) (mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x - alpha mu_k)),
with responsibilities r_k from a logsumexp. Everything is a differentiable torch expression in x,
so autograd gives the exact Jacobian.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from agg_kernels.coordinates import alpha, check_family, expand_sigma

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class IsotropicMixture:
    """sum_k weights[k] N(means[k], stds[k]^2 I); means is [K, *sample_shape]."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    @property
    def sample_shape(self) -> torch.Size:
        return self.means.shape[1:]

    @property
    def dim(self) -> int:
        return int(self.means[0].numel())

    def _stats(self, x: torch.Tensor, sigma: torch.Tensor | float, family: str):
        check_family(family)
        b = x.shape[0]
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(b)  # [B]
        a = alpha(s, family)  # [B]
        mu = self.means.to(x).reshape(1, -1, self.dim)  # [1, K, d]
        std = self.stds.to(x).reshape(1, -1)  # [1, K]
        var = (a[:, None] * std) ** 2 + s[:, None] ** 2  # [B, K] variance of x | k
        resid = x.reshape(b, 1, -1) - a[:, None, None] * mu  # [B, K, d]
        return s, a, mu, std, var, resid

    def log_responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float, family: str = "eps") -> torch.Tensor:
        """log p(k | x at noise level sigma), [B, K]; sigma = 0 gives the clean data's membership."""
        _, _, _, _, var, resid = self._stats(x, sigma, family)
        logits = self._log_joint(var, resid, x.dtype)
        return logits - torch.logsumexp(logits, dim=1, keepdim=True)

    def _log_joint(self, var: torch.Tensor, resid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        d = self.dim
        logw = self.weights.to(dtype=dtype, device=var.device).log()[None]
        return logw - 0.5 * d * torch.log(2 * math.pi * var) - 0.5 * resid.pow(2).sum(-1) / var

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor | float = 0.0, family: str = "eps") -> torch.Tensor:
        """Exact log-density of x at noise level sigma ([B]); sigma = 0 is the data density."""
        _, _, _, _, var, resid = self._stats(x, sigma, family)
        return torch.logsumexp(self._log_joint(var, resid, x.dtype), dim=1)

    def region_log_prob(self, x0: torch.Tensor, k: int) -> torch.Tensor:
        """log p(component k | clean x0), [B]: the exact log-probability that x0 belongs to mode k."""
        return self.log_responsibilities(x0, 0.0)[:, k]

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, family: str = "eps") -> torch.Tensor:
        """The exact posterior mean E[x0 | x] at noise level sigma ([B] or scalar)."""
        _, a, mu, std, var, resid = self._stats(x, sigma, family)
        logr = self._log_joint(var, resid, x.dtype)
        r = torch.softmax(logr, dim=1)  # [B, K]
        gain = a[:, None] * std**2 / var  # [B, K]
        per_k = mu + gain[..., None] * resid  # [B, K, d]
        return (r[..., None] * per_k).sum(1).reshape(x.shape)

    def denoiser(self, family: str = "eps") -> Denoiser:
        """`denoiser(x, sigma[B]) -> D` for one family."""
        check_family(family)
        return lambda x, sigma: self.denoise(x, sigma, family)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n data samples [n, *sample_shape], their component labels [n])."""
        labels = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        z = torch.randn((n, *self.sample_shape), generator=generator, dtype=self.means.dtype)
        std = self.stds[labels].reshape(n, *([1] * len(self.sample_shape)))
        return self.means[labels] + std * z, labels

    def noised(
        self, x0: torch.Tensor, sigma: torch.Tensor | float, family: str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x = alpha(sigma) x0 + sigma eps with fresh standard noise."""
        s = expand_sigma(sigma, x0)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return alpha(s, family) * x0 + s * eps


def gaussian(mean: torch.Tensor, std: float) -> IsotropicMixture:
    """N(mean, std^2 I) as a one-component mixture."""
    return IsotropicMixture(mean[None], torch.tensor([float(std)], dtype=mean.dtype), torch.ones(1, dtype=mean.dtype))


def mixture(means: torch.Tensor, stds, weights=None) -> IsotropicMixture:
    """An isotropic mixture; weights default to uniform and are normalised."""
    k = means.shape[0]
    stds = torch.as_tensor(stds, dtype=means.dtype).reshape(-1).expand(k).clone()
    w = torch.ones(k, dtype=means.dtype) if weights is None else torch.as_tensor(weights, dtype=means.dtype)
    return IsotropicMixture(means, stds, w / w.sum())


def gaussian_posterior_gain(sigma: float, std: float, family: str) -> float:
    """dD/dx for Gaussian data: alpha s^2 / (alpha^2 s^2 + sigma^2) (times the identity)."""
    a = 1 - sigma if family == "const" else 1.0
    return a * std**2 / (a**2 * std**2 + sigma**2)


COMFY_SAMPLING = {"eps": "EPS", "v_prediction": "V_PREDICTION", "const": "CONST"}


class KModel:
    """A stand-in for ComfyUI's sampler-facing model: `model(x, sigma * s_in, **extra)` returns denoised.

    It carries `inner_model.inner_model.model_sampling` (a real comfy.model_sampling object of the family),
    which euler_ancestral (CONST dispatch to `_RF`) and lcm (noise_scaling) read, also through
    `inner_model.model_patcher` as ComfyUI 0.33 reads it. ComfyUI is imported
    lazily so the analytic data above stays usable without it.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], family: str):
        import comfy.model_sampling

        sampling = getattr(comfy.model_sampling, COMFY_SAMPLING[check_family(family)])()
        self.fn = fn
        self.family = family
        # ComfyUI 0.33's ancestral samplers read model_sampling through the patcher (its noise_scale).
        patcher = SimpleNamespace(get_model_object=lambda name: {"model_sampling": sampling}[name])
        self.inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=sampling),
                                           model_patcher=patcher)
        self.calls: list[float] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        self.calls.append(float(sigma.flatten()[0]))
        return self.fn(x, sigma)


# --- Exact expected sampler states, written out independently of agg_kernels.step (float64) ---------


def alpha64(sigma: float, family: str) -> float:
    return 1 - sigma if family == "const" else 1.0


def ddim_vp_step(x: torch.Tensor, d: torch.Tensor, delta: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The asymmetric DDIM step written in variance-preserving coordinates (the paper's), for eps / v models.

    A k-diffusion state x at noise level sigma is the VP state x_vp = sqrt(abar) x with abar = 1 / (1 + sigma^2).
    DDIM (eta 0) keeps the model's noise estimate eps_hat = (x_vp - sqrt(abar) x0_hat) / sqrt(1 - abar) and
    moves only the clean estimate: x'_vp = sqrt(abar') (x0_hat + delta) + sqrt(1 - abar') eps_hat. The result is
    returned in k-diffusion coordinates (x' = x'_vp / sqrt(abar')), in float64. Nothing here comes from
    agg_kernels: it is the DDIM update itself, so it checks the pack's k-diffusion form independently.
    """
    x, d, delta = x.double(), d.double(), delta.double()
    abar, abar_next = 1.0 / (1.0 + sigma**2), 1.0 / (1.0 + sigma_next**2)
    x_vp = math.sqrt(abar) * x
    eps_hat = (x_vp - math.sqrt(abar) * d) / math.sqrt(1.0 - abar)
    x_vp_next = math.sqrt(abar_next) * (d + delta) + math.sqrt(1.0 - abar_next) * eps_hat
    return x_vp_next / math.sqrt(abar_next)


def ddim_flow_step(x: torch.Tensor, d: torch.Tensor, delta: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The asymmetric DDIM step of a rectified-flow model, x_t = (1 - t) x0 + t eps with t = sigma, in float64:
    eps_hat = (x - (1 - t) x0_hat) / t and x' = (1 - t') (x0_hat + delta) + t' eps_hat."""
    x, d, delta = x.double(), d.double(), delta.double()
    eps_hat = (x - (1.0 - sigma) * d) / sigma
    return (1.0 - sigma_next) * (d + delta) + sigma_next * eps_hat


def asymmetric_closed_form(
    x: torch.Tensor, d: torch.Tensor, delta: torch.Tensor, sigma: float, sigma_next: float, family: str
) -> torch.Tensor:
    """The asymmetric step from (x, D, delta) at sigma to sigma_next, in float64: the DDIM update in the
    family's own coordinates (ddim_vp_step for eps / v, ddim_flow_step for const), derived independently of
    agg_kernels.step. It equals alpha(sn) (D + delta) + sn (x - alpha(s) D) / s."""
    if family == "const":
        return ddim_flow_step(x, d, delta, float(sigma), float(sigma_next))
    return ddim_vp_step(x, d, delta, float(sigma), float(sigma_next))


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float, family: str) -> tuple[float, float]:
    """(sigma_down, noise scale) of an ancestral step, derived here rather than taken from the pack.

    Both families split the step the same way: a deterministic (DDIM) step to sigma_down, a rescale of the signal
    to alpha(sigma_next), and fresh noise of std sigma_up. The state at sigma_down holds noise of std sigma_down;
    rescaled it holds alpha_n * r_down, with r = sigma / alpha the noise-to-signal ratio, so the marginal at
    sigma_next is right exactly when sigma_up^2 = alpha_n^2 (r_next^2 - r_down^2). What differs is which of the
    two a sampler chooses:

    eps / v (alpha = 1, r = sigma): DDIM at eta (Song et al., eq. 16) in variance-preserving coordinates,
    abar = 1 / (1 + sigma^2), adds noise of std s_vp = eta sqrt((1 - abar_n) / (1 - abar)) sqrt(1 - abar / abar_n);
    divided by sqrt(abar_n) that is sigma_up in k-diffusion coordinates, capped at sigma_next (eta > 1), and
    sigma_down follows from the condition.
    const (ComfyUI's `_RF` samplers, alpha = 1 - sigma): sigma_down moves from sigma_next (eta 0) toward
    sigma_next^2 / sigma (eta 1) in proportion to eta, and sigma_up follows from the condition."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    if family == "const":
        down = (1 - eta) * sigma_next + eta * sigma_next**2 / sigma
        alpha_n = 1 - sigma_next
        r_next, r_down = sigma_next / alpha_n, down / (1 - down)
        return down, alpha_n * math.sqrt(max(r_next**2 - r_down**2, 0.0))
    abar, abar_n = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    s_vp = eta * math.sqrt((1 - abar_n) / (1 - abar)) * math.sqrt(1 - abar / abar_n)
    up = min(s_vp / math.sqrt(abar_n), sigma_next)
    return math.sqrt(sigma_next**2 - up**2), up


def ancestral_expected(
    x: torch.Tensor,
    d: torch.Tensor,
    delta: torch.Tensor,
    sigma: float,
    sigma_next: float,
    eta: float,
    family: str,
    z: torch.Tensor,
) -> torch.Tensor:
    """The asymmetric step through an ancestral sampler with fresh noise z, in float64.

    eps / v: asymmetric(sigma_down) + sigma_up z.
    const (`_RF`): alpha(sn) / alpha(sigma_down) * asymmetric(sigma_down) + renoise z; the rescale keeps
    the guided part exactly alpha(sn) * delta.
    """
    if sigma_next == 0:
        return d.double() + delta.double()
    sd, up = ancestral_sigmas(sigma, sigma_next, eta, family)
    det = asymmetric_closed_form(x, d, delta, sigma, sd, family)
    if family == "const" and eta:
        det = det * ((1 - sigma_next) / (1 - sd))
    return det + up * z.double()


def toy_decoder(channels: int = 4, seed: int = 0, scale: float = 0.5) -> Callable[[torch.Tensor], torch.Tensor]:
    """A differentiable stand-in for a VAE decoder: a seeded linear latent -> RGB map (weights ~ N(0, scale^2)),
    upsampled x4."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, channels, generator=g) * scale

    def decode(z: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("oc,bchw->bohw", w.to(z.dtype), z)
        return torch.nn.functional.interpolate(rgb, scale_factor=4, mode="bilinear", align_corners=False)

    return decode


def ddim_round_trip(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                    sigmas: list[float], family: str) -> torch.Tensor:
    """Deterministic DDIM inversion of the clean latent x0 up the schedule, then noise-free DDIM sampling back
    down it, written out here (float64): a state at sigma is x = alpha x0 + sigma eps, alpha = 1 (eps / v) or
    1 - sigma (const). Each step keeps the noise estimate eps = (x - alpha(s) D) / s and moves to
    alpha(s') D + s' eps; inversion evaluates D at the lower end of each step, and from sigma 0 (a clean latent,
    zero noise estimate) it lands on alpha(s') x0. `sigmas` is the sampler's descending schedule."""

    def alpha(s: float) -> float:
        return 1.0 - s if family == "const" else 1.0

    def step(x: torch.Tensor, s: float, sn: float) -> torch.Tensor:
        d = denoise(x.float(), torch.full((x.shape[0],), s)).double()
        eps = (x - alpha(s) * d) / s
        return alpha(sn) * d + sn * eps

    down = [float(s) for s in sigmas]
    up = down[::-1]
    x = x0.double() * (alpha(up[0]) if up[0] > 0 else 1.0)
    for s, sn in zip(up[:-1], up[1:], strict=True):
        x = alpha(sn) * x0.double() if s == 0 else step(x, s, sn)
    for s, sn in zip(down[:-1], down[1:], strict=True):
        x = step(x, s, sn)
    return x.float()


# --- Whole guided runs on an exact denoiser --------------------------------------------------------


def comfy_sigmas(family: str, steps: int, denoise: float, scheduler: str = "normal") -> torch.Tensor:
    """The sigmas ComfyUI's KSampler runs for `steps` at `denoise` (the last steps + 1 of a steps / denoise
    schedule), from ComfyUI's own model sampling of the family (discrete SD1.5 for eps / v, flow for const)."""
    import comfy.model_sampling
    import comfy.samplers

    kind = getattr(comfy.model_sampling, COMFY_SAMPLING[check_family(family)])
    base = comfy.model_sampling.ModelSamplingDiscreteFlow if family == "const" else comfy.model_sampling.ModelSamplingDiscrete
    sampling = type("Sampling", (base, kind), {})(None)
    total = int(steps / denoise)
    return comfy.samplers.calculate_sigmas(sampling, scheduler, total).float()[-(steps + 1):]


def comfy_window(family: str, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma_high, sigma_low) of a guidance window in ComfyUI's percents, for the family's model sampling."""
    import comfy.model_sampling

    kind = getattr(comfy.model_sampling, COMFY_SAMPLING[check_family(family)])
    base = comfy.model_sampling.ModelSamplingDiscreteFlow if family == "const" else comfy.model_sampling.ModelSamplingDiscrete
    sampling = type("Sampling", (base, kind), {})(None)
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))


def guided_run(prior: IsotropicMixture, start: torch.Tensor, sigmas: torch.Tensor, family: str,
               step_delta: Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor | None], *,
               seed: int = 0, sampler: str = "ddim", state: torch.Tensor | None = None) -> torch.Tensor:
    """A whole img2img run on the exact denoiser, in float64 steps written out here: the state starts at
    alpha(s_0) start + s_0 z (or at `state`, e.g. an inversion's top, with no fresh noise); each step asks
    step_delta(x, D, sigma, sigma_next) for the guided change of the clean estimate (None: unguided) and takes
    the asymmetric step (asymmetric_closed_form) for "ddim", or the lcm sampler's jump
    alpha(s') (D + delta) + s' z' with fresh noise. Returns the final clean latent."""
    g = torch.Generator().manual_seed(seed)
    s = [float(v) for v in sigmas]
    if state is not None:
        x = state.double()
    else:
        x = alpha64(s[0], family) * start.double() + s[0] * torch.randn(start.shape, generator=g, dtype=torch.float64)
    for sigma, sigma_next in zip(s[:-1], s[1:], strict=True):
        d = prior.denoise(x.float(), torch.full((x.shape[0],), sigma), family).double()
        delta = step_delta(x.float(), d.float(), sigma, sigma_next)
        delta = torch.zeros_like(d) if delta is None else delta.double()
        if sigma_next == 0:
            return (d + delta).float()
        if sampler == "lcm":
            z = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x = alpha64(sigma_next, family) * (d + delta) + sigma_next * z
        else:
            x = asymmetric_closed_form(x, d, delta, sigma, sigma_next, family)
    return x.float()
