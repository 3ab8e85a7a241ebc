"""One guided step: per-term pulls -> covariance (manifold) step -> refinement -> trust region and per-element
bound -> delta. Every stage works on each sample of the batch on its own."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .dds import anchors_at, dds_refine, summed, term_gradients, term_pulls, term_weight
from .manifold import Covariance, plain, prior_covariance
from .objective import Loss, LossContext, Term, Terms
from .strength import (
    DEFAULT_TRUST,
    ELEMENT_BOUND,
    clamp_elements,
    clip_to_radius,
    element_limit,
    fit_factor,
    is_descent,
    per_sample,
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
    values: each term's raw per-sample value [B] (float32, CPU) at the step's first evaluation, at the model's
    own clean estimate; multipliers: the per-sample multiplier [B] each adaptive term's weight had in this step
    (objective.AdaptiveRule). The next step's adaptive weights follow from these two (guided_delta's `previous`).
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
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    multipliers: dict[str, torch.Tensor] = field(default_factory=dict)

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
    out = {}
    for term in loss:
        k, g = term.name, grads[term.name]
        w = torch.as_tensor(term_weight(term)).reshape(-1)
        above = values[k].detach().reshape(-1).double() > (0.0 if term.floor is None else term.floor)
        still = ~g.flatten(1).any(1)
        if bool((w != 0).any()) and bool((above.to(still.device) & still).any()):
            out[k] = "zero gradient above its floor (flat, or below float32's range)"
    return out


def adaptive_multipliers(loss: Loss, previous: GuidanceResult | None, batch: int) -> dict[str, torch.Tensor]:
    """{name: [B] multiplier} of each adaptive term for this step, by its rule (objective.AdaptiveRule) from the
    previous step's report: its raw value at that step's first evaluation and the multiplier it had then
    (kept where that value is not finite). 1 at a run's first step (no previous step)."""
    out = {}
    for term in loss:
        if term.adaptive is None:
            continue
        had = previous.multipliers.get(term.name) if previous is not None else None
        had = torch.ones(batch) if had is None else had
        value = previous.values.get(term.name) if previous is not None else None
        out[term.name] = had.float() if value is None else term.adaptive.multiplier(value, had)
    return out


def adapted(loss: Loss, multipliers: dict[str, torch.Tensor]) -> Loss:
    """The loss with each adaptive term's weight times its multiplier for this step (the others as they are)."""
    def scaled(term: Term) -> Term:
        m = multipliers[term.name]
        return replace(term, weight=term.weight * (m.to(term.weight.device) if isinstance(term.weight, torch.Tensor) else m))

    return tuple(scaled(term) if term.name in multipliers else term for term in loss)


def is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def mean_of(t: torch.Tensor) -> float:
    return float(t.float().mean())


def covariance_step(covariance: Covariance, pull: torch.Tensor, ctx: LossContext) -> tuple[torch.Tensor, str | None]:
    """(Cov[x0 | x] pull, why the prior covariance replaced it on some samples, or None).

    A sample whose step would not lower the loss (a Jacobian that is not a covariance), or whose
    finite-difference probe is rounding noise, takes the unit-variance prior's step.
    """
    product = covariance(pull)
    step = product.value
    descent = is_descent(pull, step)
    noise = product.noise.to(descent.device) if product.noise is not None else torch.zeros_like(descent)
    ok = descent & ~noise
    if bool(ok.all()):
        return step, None
    reasons = [product.reason] if bool(noise.any()) and product.reason else []
    if bool((~descent & ~noise).any()):
        reasons.append(f"{product.mode} step not a descent direction on {int((~descent & ~noise).sum())} of {len(ok)} samples")
    prior = prior_covariance(ctx.sigma, ctx.family)(pull).value
    step = torch.where(ok.reshape(-1, *([1] * (pull.ndim - 1))), torch.nan_to_num(step), prior)
    return step, "; ".join(reasons) + "; used the prior covariance"


def guided_delta(
    loss: Loss,
    denoised: torch.Tensor,
    ctx: LossContext,
    covariance: Covariance | None = None,
    dds_steps: int = DEFAULT_DDS_STEPS,
    dds_lr: float = DEFAULT_DDS_LR,
    *,
    trust: float = DEFAULT_TRUST,
    rate: float = 1.0,
    previous: GuidanceResult | None = None,
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

    `covariance` is the step's covariance product (manifold.covariance_operator; default the unit-variance
    prior's). Where its step would not lower the loss (a Jacobian that is not a covariance), or it marks a
    sample's estimate as rounding noise, the sample falls back to the prior's step, and says so.
    Inputs are assumed valid (the nodes check them); a NaN or inf loss skips the step and says why.

    `previous` is the result of the run's previous guided step (None at its first): an adaptive term's weight
    (objective.AdaptiveRule) is set from it, once for the whole step (sub-steps and refinement included), and
    the result carries what the next step needs (`values`, `multipliers`). A retry of the same step passes the
    same `previous`.
    """
    rate = float(rate)
    work = plain(denoised).float()
    ctx = replace(ctx, sigma=plain(ctx.sigma).float(), x=plain(ctx.x).float())
    covariance = covariance or prior_covariance(ctx.sigma, ctx.family)
    n = substeps(rate)
    part = rate / n
    radius = trust_radius(ctx.sigma, ctx.family, trust * part)
    multipliers = adaptive_multipliers(loss, previous, work.shape[0])
    loss = adapted(loss, multipliers)
    x0, first = work, None
    first_values: dict[str, torch.Tensor] = {}
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
            first_values = {k: v.detach().float().cpu() for k, v in values.items()}
        if not all(is_finite(v) for v in values.values()) or not all(is_finite(g) for g in grads.values()):
            return GuidanceResult(None, terms, "non-finite loss or gradient", grad_rms, step_rms, fallback=fallback,
                                  idle=idle, rate=rate, values=first_values, multipliers=multipliers)
        pulls = term_pulls(loss, x0, ctx, grads, values, part)
        first = pulls if first is None else first
        for k, p in pulls.items():
            step_rms[k] = step_rms.get(k, 0.0) + mean_of(rms(p))
        idle.update(idle_terms(loss, values, grads))
        pull = summed(pulls, x0)
        if not bool(pull.any()):
            break
        step, reason = covariance_step(covariance, pull, ctx)
        fallback = fallback or reason
        fit = fit_factor(step, radius)
        refined = dds_refine(loss, x0 - step * per_sample(fit, step), ctx, dds_steps, dds_lr, fit * part)
        move, hit = clip_to_radius(refined - x0, radius)
        capped = capped or bool((hit | (fit < 1)).any())
        x0 = x0 + move
    delta, clamped = clamp_elements(x0 - work, element_limit(ctx.sigma, ctx.family, ELEMENT_BOUND * min(rate, 1.0)))
    delta = within_anchors(delta, work, first, anchors_at(loss, work, ctx))
    if not is_finite(delta):
        return GuidanceResult(None, terms, "non-finite delta", grad_rms, step_rms, fallback=fallback, idle=idle, rate=rate,
                              values=first_values, multipliers=multipliers)
    return GuidanceResult(delta.to(denoised.dtype), terms, None, grad_rms, step_rms, mean_of(rms(delta)), capped, fallback,
                          bool(clamped.any()), idle, rate, n, first_values, multipliers)
