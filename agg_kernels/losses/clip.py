"""CLIP losses: text-guided direction loss and image-guided style loss.

Pipeline for one clean estimate (model latent space):
  noisy mix (latent) -> decode -> pixels [0, 1] -> random cut-outs -> CLIP normalize -> encode_image.
The encoders are plain callables, so any CLIP (or a toy linear map in tests) can be plugged in:
  encode_text:  list[str] -> [T, D] text embeddings
  encode_image: CLIP-normalized images [N, 3, size, size] -> [N, D] image embeddings (differentiable)
  decode:       model-space latent [B, C, H, W] -> pixels [B, 3, h, w] in [-1, 1] (differentiable)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..augment import clip_normalize, random_cutouts
from ..coordinates import expand_sigma, vp_noise_fraction, vp_state
from ..objective import AdaptiveRule, Loss, LossContext, Term

TextEncoder = Callable[[list[str]], torch.Tensor]
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
Decoder = Callable[[torch.Tensor], torch.Tensor]

# Weights of the source text and the source image in the target direction (reference values).
SOURCE_TEXT_WEIGHT = 0.4
SOURCE_IMAGE_WEIGHT = 0.2


def prompt_templates() -> list[str]:
    """Phrasings a prompt is embedded in; averaging over them steadies the text embedding."""
    return [
        "{}",
        "a photo of {}.",
        "a picture of {}.",
        "an image showing {}.",
        "a detailed photo of {}.",
        "a close-up picture of {}.",
        "a cropped photo of {}.",
        "a well-lit photograph of {}.",
        "a high quality image of {}.",
        "a snapshot of {}.",
    ]


def template_text_embedding(
    encode_text: TextEncoder, text: str, templates: Sequence[str] | None = None
) -> torch.Tensor:
    """normalize(mean over templates of normalize(E_T(template.format(text)))) -> [D], no gradient."""
    prompts = [t.format(text) for t in (templates if templates is not None else prompt_templates())]
    with torch.no_grad():
        e = F.normalize(encode_text(prompts).float(), dim=-1).mean(0)
    return F.normalize(e, dim=-1).detach()


def center_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop to a square and antialiased resize to size x size (CLIP's usual preprocessing)."""
    h, w = images.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = images[..., top : top + s, left : left + s]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def image_embedding(
    encode_image: ImageEncoder, images: torch.Tensor, size: int = 224, n_cuts: int = 0, seed: int = 0
) -> torch.Tensor:
    """Mean CLIP image embedding per image ([B, 3, H, W] in [0, 1] -> [B, D]), not normalized, no gradient.

    n_cuts = 0: the centre square; n_cuts > 0: the mean over that many seeded random cut-outs
    (the same augmentation the losses see).
    """
    with torch.no_grad():
        if n_cuts <= 0:
            return encode_image(clip_normalize(center_square(images, size))).float()
        gen = torch.Generator().manual_seed(seed)
        cuts = random_cutouts(images, n_cuts, size, gen)
        emb = encode_image(clip_normalize(cuts)).float()
    return emb.reshape(images.shape[0], n_cuts, -1).mean(1)


def target_direction(
    e_target: torch.Tensor, e_source: torch.Tensor, e_source_image: torch.Tensor | None = None
) -> torch.Tensor:
    """v = normalize(e_target - 0.4 * e_source + 0.2 * e_source_image) (image term omitted when None).

    Each input is normalized first, so text and image embeddings enter on the same scale
    (template_text_embedding's outputs already are). Shapes broadcast ([D], [1, D] or [B, D]).
    """
    v = F.normalize(e_target.float(), dim=-1) - SOURCE_TEXT_WEIGHT * F.normalize(e_source.float(), dim=-1)
    if e_source_image is not None:
        v = v + SOURCE_IMAGE_WEIGHT * F.normalize(e_source_image.float(), dim=-1)
    return F.normalize(v, dim=-1)


def noisy_mix(x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float, family: str) -> torch.Tensor:
    """The reference `noisy_aug`: w * x0_hat + (1 - w) * x_t, w = sqrt(1 - alpha_bar) = vp_noise_fraction.

    x_t is the variance-preserving form of the sampler state (vp_state). Done in latent space, before
    decoding: one decode per evaluation instead of two, and x_t is a constant of the step, so the
    gradient reaching x0_hat is w * (decoder Jacobian)^T, the same scaling as mixing decoded pixels.
    The cost is that x_t's noise reaches CLIP through the decoder (VAE-shaped noise rather than white
    pixel noise); its role, a noise-level dependent augmentation that keeps CLIP off adversarial
    detail, is unchanged.
    """
    x = x.detach().to(device=x0.device, dtype=x0.dtype).clone()  # clone: inference tensors stay out of autograd
    s = expand_sigma(torch.as_tensor(sigma, device=x0.device), x0)
    w = vp_noise_fraction(s, family)
    return w * x0 + (1 - w) * vp_state(x, s, family)


def cut_embeddings(
    x0: torch.Tensor,
    ctx: LossContext,
    decode: Decoder,
    encode_image: ImageEncoder,
    n_cuts: int,
    cut_size: int,
    seed: int,
    noisy_aug: bool,
) -> torch.Tensor:
    """CLIP embeddings [B, n_cuts, D] of cut-outs of the decoded clean estimate (noisy-mixed if asked).

    The cut-outs are drawn from a generator seeded with seed + ctx.step: every evaluation within a
    step (gradient, refinement iterations) sees the same crops, and a rerun reproduces them. A clip's frames
    (x0 [B, C, F, h, w], see agg_kernels.frames) decode to F images each: its row holds every frame's
    cut-outs, [B, F * n_cuts, D].
    """
    latent = noisy_mix(x0, ctx.x, ctx.sigma, ctx.family) if noisy_aug else x0
    pixels = decode(latent)
    gen = torch.Generator().manual_seed(int(seed) + int(ctx.step))
    cuts = random_cutouts((pixels + 1) / 2, n_cuts, cut_size, gen)
    emb = encode_image(clip_normalize(cuts))
    return emb.reshape(x0.shape[0], -1, emb.shape[-1])


def as_rows(e: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A constant [D], [1, D] or [B, D] embedding as [1 or B, D] on like's device and dtype.

    Its batch is 1 or the run's; cloned so that a tensor made under inference_mode (every ComfyUI prompt)
    becomes an ordinary tensor autograd may save.
    """
    e = e.reshape(-1, e.shape[-1])
    return e.detach().to(device=like.device, dtype=like.dtype).clone()


def clip_direction_loss(
    weight: float,
    decode: Decoder,
    encode_image: ImageEncoder,
    direction: torch.Tensor,
    n_cuts: int = 16,
    cut_size: int = 224,
    seed: int = 0,
    adaptive: bool = True,
    noisy_aug: bool = True,
) -> Loss:
    """Term "clip_direction" = -mean over cut-outs of cos(E_I(cut), v), per sample, with strength `weight`.

    adaptive: its weight is multiplied each guided step by AdaptiveRule's multiplier, set per sample from the
    term's raw value at the previous step's first evaluation (at the model's own clean estimate): x2 while the
    cosine stays below 0.5, x1/2 above it, never compounding (guidance.guided_delta's `previous` carries it).
    Floor -1 (cosine 1): the pull fades only where the first-order model says the image would reach the
    direction exactly.
    """
    v_dir = F.normalize(direction.detach().float(), dim=-1)

    def value(x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        emb = cut_embeddings(x0, ctx, decode, encode_image, n_cuts, cut_size, seed, noisy_aug)
        v = as_rows(v_dir, emb)
        return -(F.normalize(emb, dim=-1) * v[:, None, :]).sum(-1).mean(1)

    return (Term("clip_direction", value, weight, floor=-1.0, adaptive=AdaptiveRule() if adaptive else None),)


STYLE_METRICS = ("cosine", "mse")


def match_latent(reference: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """A [B or 1, C, h, w] latent (x0's channels) on x0's device and dtype, resized to x0's spatial size."""
    ref = reference.detach().to(device=x0.device, dtype=x0.dtype).clone()
    if ref.shape[2:] != x0.shape[2:]:
        ref = F.interpolate(ref, size=x0.shape[2:], mode="bilinear", align_corners=False, antialias=True)
    return ref


def style_loss(
    weight: float,
    decode: Decoder,
    encode_image: ImageEncoder,
    style_embedding: torch.Tensor,
    n_cuts: int = 8,
    cut_size: int = 224,
    seed: int = 0,
    metric: str = "cosine",
    noisy_aug: bool = False,
    style_latent: torch.Tensor | None = None,
    latent_mse_weight: float = 0.0,
) -> Loss:
    """Image-guided loss: match the CLIP image embedding of the decoded clean estimate to a style image's.

    Terms per sample (mean over cut-outs), with weights `weight` and `latent_mse_weight`:
      "style":        cosine: 1 - cos(E_I(cut), e_style) on normalized embeddings (the default: CLIP
                      embeddings carry content and style in their direction);
                      mse:    mean over dims of (E_I(cut) - e_style)^2 on raw embeddings (the reference's
                      DINO [CLS] form).
      "style_latent": mean (x0_hat - style_latent)^2, when a style latent (model latent space; resized to the
                      run's latent size) is given and its weight is non-zero.
    style_embedding: [D], [1, D] or [B, D], e.g. image_embedding(encode_image, style_image).
    noisy_aug defaults to off: added noise reads as texture to CLIP and would bias a style match.
    """
    if metric not in STYLE_METRICS:
        raise ValueError(f"unknown style metric {metric!r}; expected one of {', '.join(STYLE_METRICS)}")
    target = style_embedding.detach().float()

    def value(x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        emb = cut_embeddings(x0, ctx, decode, encode_image, n_cuts, cut_size, seed, noisy_aug)
        e = as_rows(target, emb)[:, None, :]
        if metric == "cosine":
            return 1 - (F.normalize(emb, dim=-1) * F.normalize(e, dim=-1)).sum(-1).mean(1)
        return (emb - e).square().mean(-1).mean(1)

    # every term is >= 0 (1 - cos, a squared distance): its pull fades as it reaches 0
    terms = [Term("style", value, weight, floor=0.0)]
    if style_latent is not None and latent_mse_weight:

        def latent_value(x0: torch.Tensor, ctx: LossContext) -> torch.Tensor:
            return (x0 - match_latent(style_latent, x0)).square().flatten(1).mean(1)

        terms.append(Term("style_latent", latent_value, latent_mse_weight, floor=0.0))
    return tuple(terms)
