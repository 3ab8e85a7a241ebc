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
from .manifold import MANIFOLD_MODES, covariance_product, manifold_gradient
from .objective import LossContext, WeightedLoss, anchors_of, compose, total, weights_of
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
    "LossContext",
    "WeightedLoss",
    "alpha",
    "anchors_of",
    "asymmetric_step",
    "compensated_denoised",
    "compensation_target",
    "compose",
    "ddim_step",
    "dds_refine",
    "eps_from_denoised",
    "guided_delta",
    "covariance_product",
    "manifold_gradient",
    "next_sigma",
    "noisy_from_clean",
    "posterior_variance",
    "realise",
    "symmetric_denoised",
    "symmetric_step",
    "term_pull",
    "total",
    "trust_radius",
    "weights_of",
]
