"""AGG losses: each is a tuple of named terms (objective.Term) of x0_hat [B, C, H, W] in model latent space.

structure (latent L1 to the source / inversion trajectory, optional pixel and ViT self-similarity
variants), range (decoded pixels outside [-1, 1]), CLIP direction (text-guided) and image style.
"""

from .clip import (
    center_square,
    clip_direction_loss,
    cut_embeddings,
    image_embedding,
    noisy_mix,
    prompt_templates,
    style_loss,
    target_direction,
    template_text_embedding,
)
from .pixel import range_loss, range_penalty
from .structure import (
    check_reference,
    pixel_structure_loss,
    reference_at,
    self_similarity,
    self_similarity_loss,
    structure_loss,
)
from .trajectory import Trajectory, TrajectoryRecorder, trajectory_at

__all__ = [
    "Trajectory",
    "TrajectoryRecorder",
    "center_square",
    "check_reference",
    "clip_direction_loss",
    "cut_embeddings",
    "image_embedding",
    "noisy_mix",
    "pixel_structure_loss",
    "prompt_templates",
    "range_loss",
    "range_penalty",
    "reference_at",
    "self_similarity",
    "self_similarity_loss",
    "structure_loss",
    "style_loss",
    "target_direction",
    "template_text_embedding",
    "trajectory_at",
]
