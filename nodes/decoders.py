"""Differentiable latent -> pixel decoders for the pixel-space losses.

ComfyUI's VAE.decode is not differentiable (inference tensors, clamping, preallocated output), so the
losses decode through a per-run copy of the VAE's decoding half made outside inference mode, through
TAESD from models/vae_approx, or through the latent format's linear RGB factors.

Latent formats are read from the model, never assumed: the decoders take the model-space clean estimate in
the model's own layout, [B, C, H, W] or, for the models ComfyUI gives video-shaped latents (Qwen-Image's
Wan 2.1 latents, Wan's video clips), [B, C, F, H, W], and always return one image per latent frame,
[B * F, 3, H, W] in -1..1 (a clip's frames each decoded alone: `frame_by_frame`).

Memory: the `vae` copy holds what `first_stage_model.decode` uses and nothing of the encoder (for
AutoencoderKL: decoder + post_quant_conv; for SDXL / SD3 / Flux's AutoencodingEngine: decoder; for
TAESD-as-VAE: taesd_decoder + its scale and shift). Weights already on the run's device in its dtype are
shared with the VAE (`weights.ordinary` views, which autograd accepts), others are copied
straight there; once per run (RunInfo.cached), dropped when the run ends (RunInfo.release), even if a
closure outlives the run. Its blocks are recomputed in the backward pass rather than keeping their
activations. On a GPU, room for the copy and its backward pass is first made through ComfyUI's model
management, keeping the models the sampler is using loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import folder_paths
import torch
import torch.nn.functional as F

from ..agg_kernels.frames import fold_frames
from .settings import AGGError, RunInfo
from .weights import checkpoint_blocks, grad_enabled, gradient_copy, ordinary_tensors

DECODERS = ("taesd", "vae", "linear")
DEFAULT_DECODER = "taesd"
log = logging.getLogger("AGG")
Decoder = Callable[[torch.Tensor], torch.Tensor]


def latent_channels(model) -> int:
    return int(model.latent_format.latent_channels)


def check_decodable(shape: tuple[int, ...], node: str) -> None:
    """Image losses judge images [B, C, H, W] or the frames of video latents [B, C, T, H, W]."""
    if len(shape) not in (4, 5):
        raise AGGError(f"{node}: input 'decoder' cannot decode a latent of shape {tuple(shape)}; image losses "
                       "need image latents [B, C, H, W] or video latents [B, C, T, H, W].")


def as_images(pixels: torch.Tensor) -> torch.Tensor:
    """A decoder's output as [B, 3, H, W]: the frame axis of a one-frame video decode dropped."""
    return pixels[:, :, -1] if pixels.ndim == 5 else pixels


def frame_by_frame(decode: Decoder) -> Decoder:
    """A decoder that takes a clip's frames [B, C, F, h, w] and gives one image per frame, [B * F, 3, H, W]
    (agg_kernels.frames.fold_frames): each latent frame decoded as a one-frame clip, as an image is. A causal
    video decoder (Wan 2.1's) would also read the frames before it; decoding each alone keeps a guided step's
    decode at `frames` frames whatever the clip's length. Image latents pass through."""
    return lambda x0: decode(fold_frames(x0))


def to_signed(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """Maps a VAE's raw decoder output to -1..1. ComfyUI's VAE.process_output turns the raw output into 0..1
    pixels (and clamps, in place): most decoders output -1..1, some (the video TAEs) 0..1 already. Its affine
    part is read from two probe values inside the range, so the map stays differentiable and unclamped."""
    process = getattr(vae, "process_output", None)
    if process is None:
        return lambda x: x
    with ordinary_tensors(), torch.no_grad():
        lo, hi = (float(process(torch.tensor([v]))[0]) for v in (-0.5, 0.5))
    a, b = hi - lo, (hi + lo) / 2  # pixels = a * raw + b
    if abs(a - 0.5) < 1e-6 and abs(b - 0.5) < 1e-6:
        return lambda x: x
    return lambda x: 2 * (a * x + b) - 1


def check_vae(vae, model, node: str) -> None:
    """The VAE must make latents of the model's channel count."""
    want = latent_channels(model)
    got = getattr(vae, "latent_channels", None)
    if got is not None and int(got) != want:
        raise AGGError(f"{node}: input 'vae' makes {got}-channel latents but the model samples {want}-channel latents; "
                       "connect the VAE that belongs to the checkpoint.")


# Children of a first_stage_model that only encoding uses: left out of the gradient copy. Every VAE kind
# ComfyUI builds for image models names them so (AutoencoderKL / AutoencodingEngine: encoder, quant_conv;
# TAESD: taesd_encoder); a kind without them is copied whole.
ENCODER_PARTS = ("encoder", "quant_conv", "taesd_encoder")
# Backward through a decoder keeps its activations: a multiple of what ComfyUI budgets for an inference decode.
GRAD_DECODE_MEMORY_FACTOR = 3


def decoder_copy(first_stage_model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The gradient copy of a VAE's first_stage_model without its encoder: what `.decode` uses, its blocks
    recomputed in the backward pass instead of keeping their activations (weights.checkpoint_blocks)."""
    return checkpoint_blocks(gradient_copy(first_stage_model, device, dtype, ENCODER_PARTS))


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def make_room(nbytes: int, device: torch.device) -> None:
    """Ask ComfyUI to free `nbytes` on a GPU for memory it does not manage (a gradient copy and its backward
    pass), unloading idle models first and keeping those the running sampler uses."""
    if device.type == "cpu":
        return
    import comfy.model_management as mm

    in_use = [m for m in mm.current_loaded_models if getattr(m, "currently_used", False)]
    mm.free_memory(nbytes + mm.minimum_inference_memory(), device, keep_loaded=in_use)


def latent_out(run: RunInfo) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's process_latent_out (model latents -> the VAE's) in a form autograd accepts.

    Latent formats keep their constants as tensors made when the model loaded, under inference mode (Wan 2.1's
    per-channel mean and std, for Qwen-Image): autograd cannot save those for backward. For those the map is
    read from the model once per run, as its per-element scale and shift (image latent formats are affine), and
    checked on a random latent; every other format is called as it is (exactly ComfyUI's arithmetic)."""

    def make() -> Callable[[torch.Tensor], torch.Tensor]:
        out = run.model.process_latent_out
        # per element of one frame, shared by the batch (the decoders see a clip's frames one at a time)
        shape = (1, *run.latent_shape[1:])
        if len(shape) == 5:
            shape = (1, shape[1], 1, *shape[3:])
        try:
            with grad_enabled():
                out(torch.zeros(shape, device=run.device, requires_grad=True))
            return out
        except RuntimeError:  # "Inference tensors cannot be saved for backward"
            pass
        with ordinary_tensors(), torch.no_grad():
            zeros = torch.zeros(shape, device=run.device)
            shift = out(zeros.clone()).float().clone()
            scale = out(zeros + 1).float().clone() - shift
            probe = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(run.device)
            affine = torch.allclose(out(probe.clone()).float(), scale * probe + shift, atol=1e-4, rtol=1e-4)
        if not affine:
            return out
        # per channel where it is (every latent format ComfyUI has): it then fits any crop of the latent
        dims = tuple(d for d in range(scale.ndim) if d != 1)
        if all(torch.allclose(t, t.mean(dims, keepdim=True), atol=1e-6, rtol=1e-5) for t in (scale, shift)):
            scale, shift = scale.mean(dims, keepdim=True), shift.mean(dims, keepdim=True)
        return lambda x: x * scale.to(x.dtype) + shift.to(x.dtype)

    return run.cached(("latent_out",), make)


def vae_decoder(vae, run: RunInfo) -> Decoder:
    dtype = torch.float32 if run.device.type == "cpu" else getattr(vae, "vae_dtype", torch.float32)
    source = vae.first_stage_model

    def make() -> list[torch.nn.Module]:
        if run.device.type != "cpu":
            decoding = sum(module_bytes(c) for n, c in source.named_children() if n not in ENCODER_PARTS)
            activations = GRAD_DECODE_MEMORY_FACTOR * vae.memory_used_decode(run.latent_shape, dtype) \
                if hasattr(vae, "memory_used_decode") else 0
            make_room(decoding + int(activations), run.device)
        holder = [decoder_copy(source, run.device, dtype)]
        run.release.append(holder.clear)  # the copy goes with the run, whoever still holds `decode`
        return holder

    holder = run.cached(("vae", id(vae)), make)
    to_vae = latent_out(run)
    signed = to_signed(vae)

    def decode(x0: torch.Tensor) -> torch.Tensor:
        if not holder:
            raise RuntimeError("the VAE decoder copy was released with its sampling run")
        z = to_vae(x0)
        out = holder[0].decode(z.to(device=run.device, dtype=dtype))
        return signed(as_images(out).to(run.device).float())

    return decode


def taesd_file(model) -> str:
    name = getattr(model.latent_format, "taesd_decoder_name", None)
    if name is None:
        raise FileNotFoundError("this model's latent format has no TAESD decoder")
    for f in folder_paths.get_filename_list("vae_approx"):
        if f.rsplit(".", 1)[0] == name:
            return folder_paths.get_full_path_or_raise("vae_approx", f)
    raise FileNotFoundError(f"{name}.safetensors (or .pth) is not in models/vae_approx")


def taesd_decoder(run: RunInfo, node: str) -> Decoder:
    import comfy.utils
    from comfy.taesd.taesd import TAESD

    try:
        path = taesd_file(run.model)
    except FileNotFoundError as e:
        raise AGGError(f"{node}: input 'decoder' is 'taesd' but {e}. Put the TAESD decoder there, or choose 'vae' or 'linear'.") from e
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    if any(k.startswith("decoder.") for k in sd):
        # A whole tiny VAE in one file (the video TAEs, e.g. lighttaew2_1 for Wan 2.1 / Qwen-Image latents):
        # ComfyUI's own VAE detection builds it, as its previewer does.
        return tiny_vae_decoder(sd, path, run)

    def make() -> torch.nn.Module:
        with ordinary_tensors():  # ordinary tensors from the start: no second copy needed
            net = TAESD(latent_channels=latent_channels(run.model))
            net.taesd_decoder.load_state_dict(sd)
            net.taesd_encoder = None  # built (randomly initialised) by TAESD, never used for decoding
            for p in net.parameters():
                p.requires_grad_(False)
            return net.to(device=run.device, dtype=torch.float32).eval()

    net = run.cached(("taesd", path), make)

    def decode(x0: torch.Tensor) -> torch.Tensor:
        # TAESD decoders take the model's own latents, as ComfyUI's previews feed them (unit scale, no shift).
        return net.decode(x0.float())

    return decode


def tiny_vae_decoder(sd: dict, path: str, run: RunInfo) -> Decoder:
    """A tiny decoder stored as a whole VAE file: built by comfy.sd.VAE and fed as that VAE is (VAELoader lists
    these files): the VAE's latents, process_latent_out of the model's; its own latent format, if any, maps
    them further. Decoded through a gradient copy."""
    import comfy.sd

    def make() -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
        vae = comfy.sd.VAE(sd=sd)
        net = gradient_copy(vae.first_stage_model, run.device, torch.float32, ENCODER_PARTS)
        if hasattr(net, "show_progress_bar"):
            net.show_progress_bar = False
        return net, to_signed(vae)

    net, signed = run.cached(("taesd", path), make)
    to_vae = latent_out(run)

    def decode(x0: torch.Tensor) -> torch.Tensor:
        z = to_vae(x0.float())
        return signed(as_images(net.decode(z)).to(run.device).float())

    return decode


def linear_decoder(run: RunInfo, node: str) -> Decoder:
    fmt = run.model.latent_format
    factors = getattr(fmt, "latent_rgb_factors", None)
    if factors is None:
        raise AGGError(f"{node}: input 'decoder' is 'linear' but this model's latent format has no RGB factors; choose 'vae'.")
    with ordinary_tensors():
        w = torch.tensor(factors, dtype=torch.float32, device=run.device)  # [C, 3]
        bias = getattr(fmt, "latent_rgb_factors_bias", None)
        b = torch.tensor(bias if bias is not None else [0.0, 0.0, 0.0], dtype=torch.float32, device=run.device)
    # The factors may act on an unpatchified latent (Flux.2: 128 channels -> 32 at twice the size), as the
    # format's own reshape gives it to ComfyUI's previewer.
    reshape = getattr(fmt, "latent_rgb_factors_reshape", None)
    ratio = int(getattr(fmt, "spacial_downscale_ratio", 8))  # the VAE's spatial factor: sizes match the pixels

    def decode(x0: torch.Tensor) -> torch.Tensor:
        x = x0.float()
        x = x[:, :, -1] if x.ndim == 5 else x  # one frame (frame_by_frame)
        size = (x.shape[-2] * ratio, x.shape[-1] * ratio)
        if reshape is not None:
            x = reshape(x)
        if x.shape[1] != w.shape[0]:
            raise AGGError(f"{node}: input 'decoder' is 'linear' but the latent format's RGB factors are for "
                           f"{w.shape[0]} channels and the latent has {x.shape[1]}; choose 'vae'.")
        rgb = torch.einsum("bchw,cr->brhw", x, w) + b[None, :, None, None]
        return F.interpolate(rgb, size=size, mode="bilinear", align_corners=False)

    return decode


def make_decoder(kind: str, vae, run: RunInfo, node: str) -> Decoder:
    """The `kind` decoder for a run: model-space latents (images, or a clip's frames) to one image each."""
    check_decodable(tuple(run.latent_shape), node)
    return frame_by_frame(latent_decoder(kind, vae, run, node))


def latent_decoder(kind: str, vae, run: RunInfo, node: str) -> Decoder:
    if kind == "taesd":
        try:
            taesd_file(run.model)
        except FileNotFoundError as e:
            # The default: a workflow must still run where TAESD was never downloaded, only slower.
            log.warning("%s: decoder 'taesd' is not available (%s); using the checkpoint's VAE instead, which is "
                        "slower. Put the TAESD decoder in models/vae_approx to speed guidance up.", node, e)
            kind = "vae"
        else:
            return taesd_decoder(run, node)
    if kind == "vae":
        check_vae(vae, run.model, node)
        return vae_decoder(vae, run)
    if kind == "linear":
        return linear_decoder(run, node)
    raise AGGError(f"{node}: input 'decoder' must be one of {', '.join(DECODERS)}, got {kind!r}.")
