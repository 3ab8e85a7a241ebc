"""Structure Loss: keep the clean estimate close to the source's clean estimate at the same sigma.

The reference is the source latent itself (plain img2img) or an inversion trajectory read at the
step's sigma. Latent-space L1 is the default; pixel-space L1 and a ViT-token self-similarity variant
(DiffuseIT-style) are optional.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..augment import clip_normalize
from ..coordinates import alpha
from ..objective import Loss, LossContext, Term
from .trajectory import Trajectory, trajectory_at, trajectory_state_at

Reference = torch.Tensor | Trajectory
Decoder = Callable[[torch.Tensor], torch.Tensor]
TokenFunction = Callable[[torch.Tensor], torch.Tensor]

# On an inversion trajectory the reference is the inversion's clean estimate plus STATE_GAIN of the state's
# gap to the inversion's state, in clean-estimate units: (x_inv(sigma) - x) / alpha(sigma). The asymmetric
# step keeps the model's noise estimate, so a clean estimate held at the inversion's by a model that is not
# the inverting one (another prompt, CFG) leaves its correction in the state step after step, and the state
# drifts past the inversion's; the gap term takes back what has built up. Exact Gaussian denoiser, sampling
# prior shifted from the inverting one (tests/agg_kernels/test_strength.py): without it Structure weight x3-x30
# ends up to 50 % farther from the source than x1 in flow coordinates, and at 60 steps farther than no
# guidance; 0.5 is monotone in weight at 8 / 20 / 60 steps in eps and flow and ends closest (1.0 holds the
# state but gives up the correction for the other model, 0.25 leaves the drift at 60 steps).
STATE_GAIN = 0.5
# A state more than FOLLOW_TOLERANCE sigma (RMS) from the inversion's did not start from it (fresh noise is
# about sqrt(2) sigma away): its reference stays the inversion's clean estimate alone. A run from the
# inversion's top stays within 0.6 sigma with the gap term (the drift above: 0.53 at most).
FOLLOW_TOLERANCE = 1.0
# Where alpha(sigma) < MIN_ALPHA (a flow model near pure noise) the clean estimate barely moves the state:
# no gap term.
MIN_ALPHA = 0.1


def reference_shape(reference: Reference) -> tuple[int, ...]:
    """[B, C, H, W] of the reference's clean estimates."""
    if isinstance(reference, Trajectory):
        return reference.latent_shape
    return tuple(reference.shape)


def check_reference(reference: Reference, x0: torch.Tensor, what: str = "structure reference") -> None:
    """Raise a ValueError naming expected vs got when the reference cannot be compared with x0 (any tensor of
    the run's latent shape, e.g. on the meta device). The losses below assume a reference that passes."""
    shape = reference_shape(reference)
    # [B, C, H, W], or [B, C, T, H, W] for the image models ComfyUI gives video-shaped latents (Qwen-Image)
    if len(shape) not in (4, 5):
        raise ValueError(f"{what} must be a [B, C, H, W] latent; got shape {shape}")
    if x0.ndim != len(shape):
        raise ValueError(f"{what}: the clean estimate must be {len(shape)}-D like the reference; got shape {tuple(x0.shape)}")
    b, c = shape[:2]
    if c != x0.shape[1]:
        raise ValueError(
            f"{what} has {c} latent channels but the run's latent has {x0.shape[1]} "
            f"(expected {x0.shape[1]}, got {c}): was it encoded by another model family's VAE?"
        )
    if tuple(shape[2:]) != tuple(x0.shape[2:]):
        want, got = "x".join(map(str, x0.shape[2:])), "x".join(map(str, shape[2:]))
        raise ValueError(
            f"{what} latent size {got} does not match the run's latent size {want} (expected {want}, got {got})"
        )
    if b not in (1, x0.shape[0]):
        raise ValueError(
            f"{what} batch {b} does not match the run's batch {x0.shape[0]} (expected {x0.shape[0]} or 1, got {b})"
        )


def state_gap_term(traj: Trajectory, x: torch.Tensor, sigma: torch.Tensor, family: str) -> torch.Tensor:
    """STATE_GAIN * (x_inv(sigma) - x) / alpha(sigma) per sample, zero for a sample farther than
    FOLLOW_TOLERANCE sigma (RMS) from the inversion's state or where alpha < MIN_ALPHA (see STATE_GAIN)."""
    s = sigma.reshape(-1).expand(x.shape[0]).to(device=x.device, dtype=torch.float32)
    gap = trajectory_state_at(traj, s).to(device=x.device, dtype=torch.float32) - x.float()
    a = torch.as_tensor(alpha(s, family), dtype=torch.float32)
    near = gap.flatten(1).pow(2).mean(1).sqrt() <= FOLLOW_TOLERANCE * s
    on = (near & (a >= MIN_ALPHA)).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.where(on, STATE_GAIN * gap / a.clamp_min(MIN_ALPHA).reshape(-1, *([1] * (x.ndim - 1))),
                       torch.zeros_like(gap))


def reference_at(reference: Reference, x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """The reference clean estimate for this step, on x0's device and dtype, broadcastable to x0: the source
    latent, or the trajectory's clean estimate at the step's sigma (plus the state gap term where the
    trajectory recorded its states, STATE_GAIN)."""
    if isinstance(reference, Trajectory):
        ref = trajectory_at(reference, ctx.sigma.reshape(-1).expand(x0.shape[0])).to(device=x0.device)
        if reference.states is not None:
            ref = ref.float() + state_gap_term(reference, ctx.x.detach(), ctx.sigma, ctx.family)
    else:
        ref = reference
    # clone: a reference made under inference_mode must not enter autograd as an inference tensor
    return ref.detach().to(device=x0.device, dtype=x0.dtype).clone()


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean |a - b| ([B]), b broadcast over a's batch."""
    return (a - b).abs().flatten(1).mean(1)


def structure_loss(weight: float, reference: Reference) -> Loss:
    """Term "structure" = mean|x0_hat - x0_ref(sigma)| per sample, in the model's latent space.

    reference: a source latent [B or 1, C, H, W] (model latent space, i.e. after process_latent_in)
    or a Trajectory from the inversion; a batch of 1 is shared by every sample of the run. Check it against
    the run's latent shape once with check_reference.
    The term is anchored at the reference: each element moves toward it by at most `weight` per step
    (the L1 proximal step), so a larger weight never carries the estimate past its reference.
    """
    if not isinstance(reference, Trajectory):
        reference = reference.detach()

    def value(x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        return mean_abs(x0, reference_at(reference, x0, ctx))

    def anchor(x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        return reference_at(reference, x0, ctx).expand_as(x0)

    return (Term("structure", value, weight, anchor),)


class _ReferenceCache:
    """Remembers f(reference at sigma) for the last sigmas seen (a step evaluates its loss several times)."""

    def __init__(self, reference: Reference, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.reference, self.fn = reference, fn
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None

    def __call__(self, x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        traj = self.reference if isinstance(self.reference, Trajectory) else None
        key = (tuple(ctx.sigma.reshape(-1).tolist()) if traj is not None else None, x0.device, x0.dtype,
               # the gap term depends on the state: a checksum of it (a heun corrector revisits a sigma)
               float(ctx.x.detach().double().sum()) if traj is not None and traj.states is not None else None)
        if self.value is None or key != self.key:
            with torch.no_grad():
                self.value = self.fn(reference_at(self.reference, x0, ctx)).detach()
            self.key = key
        return self.value


def pixel_structure_loss(weight: float, reference: Reference, decode: Decoder) -> Loss:
    """Term "structure_pixel" = mean|decode(x0_hat) - decode(x0_ref(sigma))| per sample, in pixels [-1, 1].

    decode: model-space latent [B, C, H, W] -> pixels [B, 3, h, w] in [-1, 1], differentiable.
    The reference is decoded without gradient, once per distinct sigma.
    """
    if not isinstance(reference, Trajectory):
        reference = reference.detach()
    decoded_ref = _ReferenceCache(reference, decode)

    def value(x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        ref = decoded_ref(x0, ctx)
        return mean_abs(decode(x0), ref)

    return (Term("structure_pixel", value, weight, floor=0.0),)


def to_clip_input(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Pixels in [-1, 1] -> CLIP-normalized [B, 3, size, size] (whole image, no crop)."""
    img = F.interpolate((pixels + 1) / 2, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return clip_normalize(img)


def self_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """Cosine self-similarity of a token set: [B, T, D] -> [B, T, T]."""
    t = F.normalize(tokens, dim=-1)
    return t @ t.transpose(1, 2)


def self_similarity_loss(
    weight: float, reference: Reference, decode: Decoder, tokens: TokenFunction, size: int = 224
) -> Loss:
    """DiffuseIT-style structure: term "structure_vit" = mean|S(x0_hat) - S(x0_ref(sigma))| per sample.

    S = cosine self-similarity of ViT tokens. tokens: CLIP-normalized images [B, 3, size, size] ->
    [B, T, D] (e.g. the patch tokens of the CLIP vision tower's last block). The similarity pattern
    carries layout but not appearance, so it keeps structure while letting colours and texture change.
    """
    if not isinstance(reference, Trajectory):
        reference = reference.detach()

    def sim(latent: torch.Tensor) -> torch.Tensor:
        return self_similarity(tokens(to_clip_input(decode(latent), size)))

    ref_sim = _ReferenceCache(reference, sim)

    def value(x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        return mean_abs(sim(x0), ref_sim(x0, ctx))

    return (Term("structure_vit", value, weight, floor=0.0),)
