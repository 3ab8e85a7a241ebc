"""Asymmetric Gradient Guidance as pure torch functions (no ComfyUI import).

See docs/DESIGN.md: coordinates, the asymmetric step and its sampler compensation, manifold gradients,
DDS refinement, schedules, losses and inversion.

Input checks are `check_*` functions beside the maths they protect (check_family, check_window, check_zones,
check_sigmas, check_reference, check_mask). Callers run them once, before sampling; the per-step functions
assume input that passed and do not check it again (docs/DESIGN.md §2).
"""

from .coordinates import FAMILIES, alpha, eps_from_denoised, noisy_from_clean
from .dds import dds_refine
from .guidance import GuidanceResult, guided_delta
from .manifold import MANIFOLD_MODES, covariance_operator
from .objective import AdaptiveRule, Loss, LossContext, Term, chained, evaluate, per_sample, total
from .schedule import next_sigma
from .step import (
    SamplerSpec,
    asymmetric_step,
    compensated_denoised,
    compensation_target,
    ddim_step,
    realise,
    symmetric_denoised,
    symmetric_step,
)
from .strength import DEFAULT_TRUST, posterior_variance, term_pull, trust_radius

__all__ = [
    "DEFAULT_TRUST",
    "FAMILIES",
    "MANIFOLD_MODES",
    "GuidanceResult",
    "SamplerSpec",
    "AdaptiveRule",
    "Loss",
    "LossContext",
    "Term",
    "alpha",
    "asymmetric_step",
    "compensated_denoised",
    "compensation_target",
    "chained",
    "ddim_step",
    "dds_refine",
    "eps_from_denoised",
    "evaluate",
    "guided_delta",
    "covariance_operator",
    "next_sigma",
    "noisy_from_clean",
    "per_sample",
    "posterior_variance",
    "realise",
    "symmetric_denoised",
    "symmetric_step",
    "term_pull",
    "total",
    "trust_radius",
]
