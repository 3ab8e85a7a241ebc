"""One guided step: per-term pulls -> covariance (manifold) step -> refinement -> trust region and per-element
bound -> delta. Every stage works on each sample of the batch on its own."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .dds import dds_refine, summed, term_gradients, term_pulls
from .manifold import FD_NOISE_REASON, FD_REL_STEP, Denoiser, checked_covariance_product, fd_is_noise, plain
from .objective import Loss, LossContext, Terms, anchors_of, floors_of, weights_of
from .strength import (
    DEFAULT_TRUST,
    ELEMENT_BOUND,
    clamp_elements,
    clip_to_radius,
    element_limit,
    fit_factor,
    is_descent,
    per_sample,
    posterior_variance,
    rms,
    substeps,
    trust_radius,
)

# Refinement defaults: one step of half the weight (the paper's one x0-space step after the manifold step).
DEFAULT_DDS_STEPS = 1
DEFAULT_DDS_LR = 0.5


@dataclass
class GuidanceResult:
    """delta is None when guidance was skipped for this step (`skipped` says why).

    terms: each term's raw value (batch mean); grad_rms: RMS of its raw gradient; step_rms: RMS of the pull
    it asked of the clean estimate (weight-sized, anchored terms clipped); delta_rms: RMS of the final step;
    trust_region: the RMS cap acted on some sample; element_bound: the per-element bound clamped some element;
    fallback: why the Jacobian step was replaced, if it was; idle: terms of non-zero weight that asked for no
    pull although they are above their floor (a gradient that is zero, e.g. underflowed), with the reason;
    rate: the step's share of schedule time, in reference steps, that scaled every weight; substeps: how many
    sub-steps it was taken in (strength.substeps), each with its own gradient and covariance product.
    """

    delta: torch.Tensor | None
    terms: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None
    grad_rms: dict[str, float] = field(default_factory=dict)
    step_rms: dict[str, float] = field(default_factory=dict)
    delta_rms: float = 0.0
    trust_region: bool = False
    fallback: str | None = None
    element_bound: bool = False
    idle: dict[str, str] = field(default_factory=dict)
    rate: float = 1.0
    substeps: int = 1

    def report(self) -> dict:
        """The step's figures as plain JSON values."""
        return {
            "terms": self.terms, "grad_rms": self.grad_rms, "step_rms": self.step_rms, "delta_rms": self.delta_rms,
            "trust_region": self.trust_region, "element_bound": self.element_bound, "fallback": self.fallback,
            "skipped": self.skipped, "idle": self.idle, "rate": self.rate,
            "substeps": self.substeps,
        }


def within_anchors(delta: torch.Tensor, x0: torch.Tensor, pulls: Terms, anchors: Terms) -> torch.Tensor:
    """When every term that pulls is anchored (a Structure Loss alone), keep each element of x0 + delta
    between x0 and its references: the step never moves an element away from, or past, where the
    terms want it, whatever the model's Jacobian did to the pull. Decided per sample: which terms pull on
    one image says nothing of another."""
    shape = (-1, *([1] * (x0.ndim - 1)))
    pulling = {k: p.flatten(1).any(1) for k, p in pulls.items()}  # [B] each
    none = torch.zeros_like(next(iter(pulling.values())))
    free = torch.stack([none, *(on for k, on in pulling.items() if k not in anchors)]).any(0)
    held = torch.stack([none, *(on for k, on in pulling.items() if k in anchors)]).any(0) & ~free
    if not bool(held.any()):
        return delta
    gaps = [torch.where(pulling[k].reshape(shape), anchors[k] - x0, torch.zeros_like(x0)) for k in pulls if k in anchors]
    low = torch.stack([torch.zeros_like(x0), *gaps]).amin(0)
    high = torch.stack([torch.zeros_like(x0), *gaps]).amax(0)
    bounded = torch.minimum(torch.maximum(delta, low.to(delta.dtype)), high.to(delta.dtype))
    return torch.where(held.reshape(shape), bounded, delta)


def idle_terms(loss: Loss, values: Terms, grads: Terms) -> dict[str, str]:
    """Terms of non-zero weight whose gradient is exactly zero on a sample where their value is above their
    floor (0 when none is declared): a pull that vanished (e.g. a gradient below fp32's range) is reported."""
    weights, floors = weights_of(loss), floors_of(loss)
    out = {}
    for k, g in grads.items():
        w = torch.as_tensor(weights.get(k, 1.0)).reshape(-1)
        above = values[k].detach().reshape(-1).double() > floors.get(k, 0.0)
        still = ~g.flatten(1).any(1)
        if bool((w != 0).any()) and bool((above.to(still.device) & still).any()):
            out[k] = "zero gradient above its floor (flat, or below float32's range)"
    return out


def is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def mean_of(t: torch.Tensor) -> float:
    return float(t.float().mean())


def covariance_step(
    manifold: str, pull: torch.Tensor, x: torch.Tensor, base: torch.Tensor, ctx: LossContext,
    denoise: Denoiser | None, fd_rel_step: float, fd_max_error: float | None,
) -> tuple[torch.Tensor, str | None]:
    """(Cov[x0 | x] pull, why the prior covariance replaced it on some samples, or None).

    A sample whose step would not lower the loss (a Jacobian that is not a covariance), or whose two-sided
    finite-difference probe is rounding noise (`fd_max_error`), takes the unit-variance prior's step.
    """
    prior = posterior_variance(ctx.sigma.reshape(-1, *([1] * (pull.ndim - 1))), ctx.family) * pull
    if manifold == "none":
        return prior, None
    step, error = checked_covariance_product(manifold, pull, plain(x).float(), base, ctx.sigma, ctx.family, denoise,
                                             fd_rel_step, two_sided=fd_max_error is not None)
    descent = is_descent(pull, step)
    error = error.to(descent.device) if error is not None else None
    noise = fd_is_noise(error, fd_max_error) if error is not None else torch.zeros_like(descent)
    ok = descent & ~noise
    if bool(ok.all()):
        return step, None
    reasons = []
    if bool(noise.any()):
        worst = float(error[noise].max())
        reasons.append(f"{manifold} probe {FD_NOISE_REASON} (estimated error {worst:.0%}) on {int(noise.sum())} of {len(ok)} samples")
    if bool((~descent & ~noise).any()):
        reasons.append(f"{manifold} step not a descent direction on {int((~descent & ~noise).sum())} of {len(ok)} samples")
    step = torch.where(ok.reshape(-1, *([1] * (pull.ndim - 1))), torch.nan_to_num(step), prior)
    return step, "; ".join(reasons) + "; used the prior covariance"


def guided_delta(
    loss: Loss,
    x: torch.Tensor,
    denoised: torch.Tensor,
    ctx: LossContext,
    manifold: str = "finite_difference",
    denoise: Denoiser | None = None,
    dds_steps: int = DEFAULT_DDS_STEPS,
    dds_lr: float = DEFAULT_DDS_LR,
    fd_rel_step: float = FD_REL_STEP,
    *,
    probe_base: torch.Tensor | None = None,
    trust: float = DEFAULT_TRUST,
    fd_max_error: float | None = None,
    rate: float = 1.0,
) -> GuidanceResult:
    """delta = x_tilde - D for one step, in model-independent units (see agg_kernels.strength).

    `rate` is the step's share of schedule time in reference steps (schedule.step_rate): every weight and
    the trust radius scale with it, so a run's whole pull and its whole allowance do not depend on the step
    count; the per-element bound scales only down (no element moves more than ELEMENT_BOUND posterior
    standard deviations in one step, however long). A step longer than MAX_SUBSTEP_RATE (few-step
    schedules) is taken as `substeps(rate)` equal sub-steps of the clean estimate at the same state, each
    with its own gradient and covariance product. At the trust region the weights are scaled
    down together until the covariance step fits, and the refinement runs at those weights: the step's
    direction and size are decided together, and a weight past the cap gives the step the cap gives.

    `denoise` is the denoiser whose Jacobian carries the pull (autograd, finite_difference), and
    `probe_base` its value at x (default: `denoised`). Where its step would not lower the loss (a Jacobian
    that is not a covariance), the sample falls back to the unit-variance prior's step, and says so.
    With `fd_max_error` (half-precision models), finite_difference probes two-sided and a sample whose
    estimated relative error exceeds it (the probe is rounding noise) falls back the same way.
    Inputs are assumed valid (the nodes check them); a NaN or inf loss skips the step and says why.
    """
    rate = float(rate)
    work = plain(denoised).float()
    ctx = replace(ctx, sigma=plain(ctx.sigma).float(), x=plain(ctx.x).float())
    base = work if probe_base is None else plain(probe_base).float()
    n = substeps(rate)
    part = rate / n
    radius = trust_radius(ctx.sigma, ctx.family, trust * part)
    x0, first = work, None
    terms: dict[str, float] = {}
    grad_rms: dict[str, float] = {}
    step_rms: dict[str, float] = {}
    idle: dict[str, str] = {}
    fallback, capped = None, False
    for _ in range(n):
        values, grads = term_gradients(loss, x0, ctx)
        if first is None:  # the step reports its loss at the model's own estimate
            terms = {k: mean_of(v) for k, v in values.items()}
            grad_rms = {k: mean_of(rms(g)) for k, g in grads.items()}
        if not all(is_finite(v) for v in values.values()) or not all(is_finite(g) for g in grads.values()):
            return GuidanceResult(None, terms, "non-finite loss or gradient", grad_rms, step_rms, fallback=fallback,
                                  idle=idle, rate=rate)
        pulls = term_pulls(loss, x0, ctx, grads, values, part)
        first = pulls if first is None else first
        for k, p in pulls.items():
            step_rms[k] = step_rms.get(k, 0.0) + mean_of(rms(p))
        idle.update(idle_terms(loss, values, grads))
        pull = summed(pulls, x0)
        if not bool(pull.any()):
            break
        step, reason = covariance_step(manifold, pull, x, base, ctx, denoise, fd_rel_step, fd_max_error)
        fallback = fallback or reason
        fit = fit_factor(step, radius)
        refined = dds_refine(loss, x0 - step * per_sample(fit, step), ctx, dds_steps, dds_lr, fit * part)
        move, hit = clip_to_radius(refined - x0, radius)
        capped = capped or bool((hit | (fit < 1)).any())
        x0 = x0 + move
    delta, clamped = clamp_elements(x0 - work, element_limit(ctx.sigma, ctx.family, ELEMENT_BOUND * min(rate, 1.0)))
    delta = within_anchors(delta, work, first, anchors_of(loss, work, ctx))
    if not is_finite(delta):
        return GuidanceResult(None, terms, "non-finite delta", grad_rms, step_rms, fallback=fallback, idle=idle, rate=rate)
    return GuidanceResult(delta.to(denoised.dtype), terms, None, grad_rms, step_rms, mean_of(rms(delta)), capped, fallback,
                          bool(clamped.any()), idle, rate, n)
