"""Asymmetric Gradient Guidance as pure torch functions (no ComfyUI import).

See DESIGN: coordinates, the asymmetric step and its sampler compensation, manifold gradients,
DDS refinement, schedules, losses and inversion.
"""

from .coordinates import FAMILIES, alpha, eps_from_denoised, noisy_from_clean
from .dds import dds_refine
from .guidance import GuidanceResult, guided_delta
from .manifold import MANIFOLD_MODES, manifold_corrected, manifold_gradient
from .objective import LossContext, compose, total
from .step import (
    asymmetric_step,
    compensated_denoised,
    compensation_target,
    next_sigma,
    symmetric_denoised,
    symmetric_step,
)

__all__ = [
    "FAMILIES",
    "MANIFOLD_MODES",
    "GuidanceResult",
    "LossContext",
    "alpha",
    "asymmetric_step",
    "compensated_denoised",
    "compensation_target",
    "compose",
    "dds_refine",
    "eps_from_denoised",
    "guided_delta",
    "manifold_corrected",
    "manifold_gradient",
    "next_sigma",
    "noisy_from_clean",
    "symmetric_denoised",
    "symmetric_step",
    "total",
]
