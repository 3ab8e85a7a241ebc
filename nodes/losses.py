"""Loss nodes. Each outputs an AGG_LOSS: an immutable list of loss specs that build a fresh loss (a tuple of
terms, agg_kernels.objective) per sampling run (per-run caches and decoder copies never outlive the run)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from comfy_api.v0_0_2 import io

from ..agg_kernels.frames import frame_count, on_frames
from ..agg_kernels.losses import (
    Trajectory,
    check_reference,
    clip_direction_loss,
    image_embedding,
    range_loss,
    structure_loss,
    style_loss,
    target_direction,
    template_text_embedding,
)
from ..agg_kernels.losses.color import color_loss, image_stats
from ..agg_kernels.mask import (
    as_mask,
    check_mask,
    focused,
    per_frame,
    resize_mask,
    union_mask,
    video_region,
)
from ..agg_kernels.objective import Loss, chained, per_sample
from ..agg_kernels.strength import (
    DEFAULT_CLIP_WEIGHT,
    DEFAULT_COLOR_WEIGHT,
    DEFAULT_STRUCTURE_WEIGHT,
    DEFAULT_STYLE_WEIGHT,
)
from .clip_model import AGGClip, VisionClip, image_encoder
from .decoders import DECODERS, DEFAULT_DECODER, Decoder, make_decoder
from .settings import AGGError, RunInfo, checked
from .types import AGGClipType, AGGLossType, AGGTrajectoryType
from .weights import grad_constant, ordinary_tensors

DEFAULT_CUTOUTS = 8
DEFAULT_FRAMES = 2


@dataclass(frozen=True)
class LossSpec:
    node: str
    build: Callable[[RunInfo], Loss]


@dataclass(frozen=True)
class AGGLoss:
    """The AGG_LOSS socket value: loss specs chained by the loss nodes."""

    specs: tuple[LossSpec, ...] = ()

    def plus(self, spec: LossSpec) -> AGGLoss:
        return AGGLoss((*self.specs, spec))

    def build(self, run: RunInfo) -> Loss:
        """The chained loss for one run, its terms each named once (built outside inference mode so its constants
        can enter autograd)."""
        with ordinary_tensors():
            return chained(*(spec.build(run) for spec in self.specs))


def chain(upstream: AGGLoss | None, spec: LossSpec) -> AGGLoss:
    return (upstream or AGGLoss()).plus(spec)


def loss_input() -> io.Input:
    return AGGLossType.Input("loss", optional=True, tooltip="An upstream AGG loss to add this one to (chaining).")


def weight_input(default: float, what: str, more: str = "") -> io.Input:
    return io.Float.Input(
        "weight", default=default, min=0.0, max=100.0, step=0.005,
        tooltip=f"Strength of the {what}: how far guidance pulls the image's latent per reference step (about one "
        f"guided step of a 20-step run at denoise 0.6), as an RMS distance in latent units (latents have about unit "
        f"spread). The same number means the same on every model and at any step count. 0 turns it off; useful "
        f"range 0.02-0.5 (default {default}).{more}",
    )


def decoder_input() -> io.Input:
    return io.Combo.Input("decoder", options=list(DECODERS), default=DEFAULT_DECODER, optional=True,
                          tooltip="How the loss sees pixels: taesd = TAESD from models/vae_approx (fast; falls back "
                          "to the VAE, with a warning, when its file is missing), vae = the checkpoint's VAE (exact, "
                          "slow), linear = the latent format's RGB factors (fastest, rough).")


def mask_input(role: str) -> io.Input:
    return io.Mask.Input("mask", optional=True, tooltip=f"Local edit: white = the region to change. {role} Use the "
                         "same mask in Set Latent Noise Mask to keep the rest of the image exactly.")


def latent_region(mask: torch.Tensor, run: RunInfo, node: str) -> torch.Tensor:
    """The node's mask on the run's latent grid, [B or 1, 1, h, w] on the run's device; for the 5-D latents
    [B, C, T, h, w] (video, and Qwen-Image's one-frame latents) [B or 1, 1, T or 1, h, w]: one mask per clip
    holds for all its frames, one mask per video frame for its latent frame (agg_kernels.mask.video_region)."""
    shape = tuple(run.latent_shape)
    checked(node, "mask", check_mask, mask, shape[0], frame_count(shape))
    if len(shape) == 5:
        return video_region(mask, shape[0], frame_count(shape), shape[-2:]).to(run.device)
    return resize_mask(mask, shape[-2:]).to(run.device)


def region_of(mask: torch.Tensor | None, run: RunInfo, node: str) -> torch.Tensor | None:
    """latent_region, or None without a mask: made (and checked) once per loss, before anything is decoded."""
    return None if mask is None else latent_region(mask, run, node)


def judged_mask(mask: torch.Tensor | None, run: RunInfo) -> torch.Tensor | None:
    """The mask an image loss looks through: a video's per-frame masks together (the frames it judges are
    chosen each step; each frame's pull is still held to its own mask by on_region)."""
    if mask is not None and per_frame(mask, run.latent_shape[0], frame_count(run.latent_shape)):
        return union_mask(mask)
    return mask


def on_region(loss: Loss, region: torch.Tensor | None, *, outside: bool = False) -> Loss:
    """The loss acting only inside a latent region (region_of; or only outside it): each term with that region
    (agg_kernels.objective.Term.region); unchanged without one."""
    if region is None:
        return loss
    acts = 1 - region if outside else region
    return tuple(replace(term, region=acts) for term in loss)


def pixels_of(decoder: str, vae, mask: torch.Tensor | None, run: RunInfo, node: str):
    """The decoder an image loss sees through: only the mask's region when there is a mask (agg_kernels.mask)."""
    decode = make_decoder(decoder, vae, run, node)
    return decode if mask is None else focused(decode, mask)


# -- Structure Loss ------------------------------------------------------------------------------


class AGGStructureLoss(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AGGStructureLoss",
            display_name="Structure Loss",
            category="AGG/losses",
            description="Keeps the result's layout close to the source: L1 between the clean estimate and the "
            "source's clean estimate at the same noise level (from AGG Invert's trajectory), or the source latent.",
            inputs=[
                weight_input(DEFAULT_STRUCTURE_WEIGHT, "pull toward the source",
                             " Never moves an element past the source: more weight only keeps more of the layout."),
                io.Latent.Input("source", optional=True, tooltip="The source latent (VAEEncode of the photo). Used "
                                "when no trajectory is connected."),
                AGGTrajectoryType.Input("trajectory", optional=True, tooltip="AGG Invert's trajectory: the source's clean "
                                        "estimates along the inversion (the paper's regulariser). A run that starts "
                                        "from AGG Invert's latent also gives back, each step, half of its drift from "
                                        "the inversion's path, so an edited prompt does not carry it past the source."),
                loss_input(),
                mask_input("Structure is held only outside it (black), so the white region is free to change."),
            ],
            outputs=[AGGLossType.Output(tooltip="This loss, added to the upstream one.")],
        )

    @classmethod
    def execute(cls, weight, source=None, trajectory=None, loss=None, mask=None) -> io.NodeOutput:
        node = "Structure Loss"
        if source is None and trajectory is None:
            raise AGGError(f"{node}: connect input 'source' (a LATENT) or input 'trajectory' (from AGG Invert).")
        input_name = "trajectory" if trajectory is not None else "source"
        source_samples = None if source is None else source["samples"]

        def build(run: RunInfo) -> Loss:
            probe = torch.empty(run.latent_shape, device="meta")
            if trajectory is not None:
                states = None if trajectory.states is None else grad_constant(trajectory.states, run.device)
                reference = Trajectory(trajectory.sigmas.float().clone(), grad_constant(trajectory.denoised, run.device), states)
            else:
                reference = grad_constant(run.model.process_latent_in(source_samples.to(run.device)), run.device)
            checked(node, input_name, check_reference, reference, probe, f"the {input_name} latent")
            held = structure_loss(weight, reference)
            return on_region(held, region_of(mask, run, node), outside=True)

        return io.NodeOutput(chain(loss, LossSpec(node, build)))


# -- CLIP losses ---------------------------------------------------------------------------------


def pixels_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in 0..1 -> [B, 3, H, W]."""
    return image[..., :3].movedim(-1, 1).float()


def clip_on(clip: AGGClip | VisionClip, run: RunInfo) -> AGGClip | VisionClip:
    clip.to(run.device)
    run.release.append(lambda: clip.to(torch.device("cpu")) if run.device.type != "cpu" else None)
    return clip


def clip_loss_spec(node: str, clip: AGGClip | VisionClip, vae, decoder: str, mask: torch.Tensor | None,
                   frames: int, seed: int, judged: Callable[[RunInfo, Decoder, AGGClip | VisionClip], Loss]) -> LossSpec:
    """A CLIP loss for each run: `judged` built on the run's decoder (seeing only the mask's region) and the
    CLIP model on the run's device, judging `frames` frames of a video per step, acting only inside the mask.
    With one mask per image, each image is judged through its own mask's crop by its own terms (agg_kernels.objective.
    per_sample; its adaptive weight follows its own value), as it would be alone."""

    def build(run: RunInfo) -> Loss:
        region = region_of(mask, run, node)
        view = judged_mask(mask, run)
        if view is None or as_mask(view).shape[0] == 1:
            decode = pixels_of(decoder, vae, view, run, node)
            return on_region(on_frames(judged(run, decode, clip_on(clip, run)), frames, seed), region)
        decode, c = make_decoder(decoder, vae, run, node), clip_on(clip, run)
        # one mask per image: image i is judged through its own mask's crop, its pull held to its own region
        return per_sample([on_region(on_frames(judged(run, focused(decode, mask[i : i + 1]), c), frames, seed),
                                     region[i : i + 1]) for i in range(mask.shape[0])])

    return LossSpec(node, build)


def cutouts_input() -> io.Input:
    return io.Int.Input("cutouts", default=DEFAULT_CUTOUTS, min=1, max=64, optional=True,
                        tooltip="Augmented crops CLIP sees per step; more is steadier and slower.")


def seed_input(what: str = "the crops' random augmentation and of the video frames judged each step") -> io.Input:
    return io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True, tooltip=f"Seed of {what}.")


def frames_input() -> io.Input:
    return io.Int.Input("frames", default=DEFAULT_FRAMES, min=1, max=256, optional=True,
                        tooltip="Video models only: how many latent frames of the clip the loss decodes and judges "
                        "at each guided step, chosen afresh each step (from 'seed'), their pulls combined into one "
                        "step for the clip. A step's cost grows with this number, not with the clip's length. "
                        "Images ignore it.")


class AGGCLIPDirectionLoss(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AGGCLIPDirectionLoss",
            display_name="CLIP Direction Loss",
            category="AGG/losses",
            description="Text guidance: moves the image along the CLIP direction from the source text to the "
            "target text (e.g. 'a photo' -> 'a watercolor painting').",
            inputs=[
                AGGClipType.Input("clip", tooltip="From AGG CLIP Loader."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to see the clean estimate as pixels."),
                io.String.Input("source_text", default="a photo", multiline=False,
                                tooltip="What the source image is (e.g. 'a photo of a cat')."),
                io.String.Input("target_text", default="a watercolor painting", multiline=False,
                                tooltip="What the result should be (e.g. 'a watercolor painting of a cat')."),
                weight_input(DEFAULT_CLIP_WEIGHT, "text guidance"),
                io.Image.Input("source_image", optional=True,
                               tooltip="The source photo; adds its CLIP embedding to the direction (0.2 weight), as in the paper."),
                loss_input(),
                decoder_input(),
                cutouts_input(),
                io.Float.Input("range_weight", default=0.0, min=0.0, max=1000.0, step=0.01, optional=True,
                               tooltip="Penalty on decoded pixels outside the valid range (0 = off)."),
                seed_input(),
                mask_input("CLIP judges only the white region and only it is pulled toward the target text."),
                frames_input(),
            ],
            outputs=[AGGLossType.Output(tooltip="This loss, added to the upstream one.")],
        )

    @classmethod
    def validate_inputs(cls, target_text: str | None = None) -> bool | str:
        if target_text is not None and not str(target_text).strip():
            return "CLIP Direction Loss: input 'target_text' is empty; describe what the image should become."
        return True

    @classmethod
    def execute(cls, clip, vae, source_text, target_text, weight, source_image=None, loss=None, decoder=DEFAULT_DECODER,
                cutouts=DEFAULT_CUTOUTS, range_weight=0.0, seed=0, mask=None, frames=DEFAULT_FRAMES) -> io.NodeOutput:
        node = "CLIP Direction Loss"
        if not str(target_text).strip():
            raise AGGError(f"{node}: input 'target_text' is empty; describe what the image should become.")
        e_target = template_text_embedding(clip.encode_text, target_text)
        e_source = template_text_embedding(clip.encode_text, source_text) if str(source_text).strip() else torch.zeros_like(e_target)
        e_image = None
        if source_image is not None:
            e_image = image_embedding(clip.encode_image, pixels_bchw(source_image).to(clip.device), clip.image_size)
        direction = target_direction(e_target, e_source, e_image).cpu()

        def judged(run: RunInfo, decode: Decoder, c: AGGClip) -> Loss:
            parts = [clip_direction_loss(weight, decode, c.encode_image, grad_constant(direction, run.device),
                                         n_cuts=cutouts, cut_size=c.image_size, seed=seed)]
            if range_weight > 0:
                parts.append(range_loss(range_weight, decode))
            return chained(*parts)

        return io.NodeOutput(chain(loss, clip_loss_spec(node, clip, vae, decoder, mask, frames, seed, judged)))


class AGGImageStyleLoss(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AGGImageStyleLoss",
            display_name="Image Style Loss",
            category="AGG/losses",
            description="Image guidance: pulls the result's CLIP image embedding toward a style image's.",
            inputs=[
                io.MultiType.Input("clip", types=[AGGClipType, io.ClipVision],
                                   tooltip="From AGG CLIP Loader, or ComfyUI's Load CLIP Vision (the image encoders "
                                   "IPAdapter uses, in models/clip_vision): no extra download needed."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to see the clean estimate as pixels."),
                io.Image.Input("style_image", tooltip="The image whose look the result should take."),
                weight_input(DEFAULT_STYLE_WEIGHT, "style guidance"),
                loss_input(),
                decoder_input(),
                cutouts_input(),
                seed_input(),
                mask_input("CLIP judges only the white region and only it takes the style."),
                frames_input(),
            ],
            outputs=[AGGLossType.Output(tooltip="This loss, added to the upstream one.")],
        )

    @classmethod
    def execute(cls, clip, vae, style_image, weight, loss=None, decoder=DEFAULT_DECODER, cutouts=DEFAULT_CUTOUTS, seed=0,
                mask=None, frames=DEFAULT_FRAMES) -> io.NodeOutput:
        node = "Image Style Loss"
        clip = image_encoder(clip, node)
        e_style = image_embedding(clip.encode_image, pixels_bchw(style_image).to(clip.device), clip.image_size,
                                  n_cuts=cutouts, seed=seed).mean(0, keepdim=True).cpu()

        def judged(run: RunInfo, decode: Decoder, c: VisionClip | AGGClip) -> Loss:
            return style_loss(weight, decode, c.encode_image, grad_constant(e_style, run.device),
                              n_cuts=cutouts, cut_size=c.image_size, seed=seed)

        return io.NodeOutput(chain(loss, clip_loss_spec(node, clip, vae, decoder, mask, frames, seed, judged)))


# -- Color Loss ----------------------------------------------------------------------------------


class AGGColorLoss(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AGGColorLoss",
            display_name="Color Loss",
            category="AGG/losses",
            description="Colour transfer: pulls the result's colour statistics (per-channel mean and spread in RGB) "
            "toward those of a reference image. Needs no CLIP; chain it with Structure Loss to keep the layout.",
            inputs=[
                io.Image.Input("image", tooltip="The reference image whose colours (palette, brightness, contrast) the "
                               "result should take."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to see the clean estimate as pixels."),
                weight_input(DEFAULT_COLOR_WEIGHT, "pull toward the reference's colours"),
                decoder_input(),
                loss_input(),
                mask_input("Only the white region's colours are judged and only it is pulled toward the reference."),
                frames_input(),
                seed_input("the video frames judged each step"),
            ],
            outputs=[AGGLossType.Output(tooltip="This loss, added to the upstream one.")],
        )

    @classmethod
    def execute(cls, image, vae, weight, decoder=DEFAULT_DECODER, loss=None, mask=None, frames=DEFAULT_FRAMES,
                seed=0) -> io.NodeOutput:
        node = "Color Loss"
        if image.ndim != 4 or image.shape[-1] < 3:
            raise AGGError(f"{node}: input 'image' must be an RGB IMAGE [B, H, W, 3]; got shape {tuple(image.shape)}.")
        ref_mean, ref_std = image_stats(pixels_bchw(image))
        ref_mean, ref_std = ref_mean.cpu(), ref_std.cpu()

        def build(run: RunInfo) -> Loss:
            region = region_of(mask, run, node)
            decode = make_decoder(decoder, vae, run, node)
            view = judged_mask(mask, run)
            judged = color_loss(weight, decode, grad_constant(ref_mean, run.device), grad_constant(ref_std, run.device),
                                mask=None if view is None else grad_constant(view, run.device))
            return on_region(on_frames(judged, frames, seed), region)

        return io.NodeOutput(chain(loss, LossSpec(node, build)))
