"""Differentiable latent -> pixel decoders for the pixel-space losses.

ComfyUI's VAE.decode is not differentiable (inference tensors, clamping, preallocated output), so the
losses decode through a per-run copy made outside inference mode, through TAESD from
models/vae_approx, or through the latent format's linear RGB factors.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import folder_paths
import torch
import torch.nn.functional as F

from .runtime import AGGError, RunInfo

DECODERS = ("taesd", "vae", "linear")
DEFAULT_DECODER = "taesd"
log = logging.getLogger("AGG")
Decoder = Callable[[torch.Tensor], torch.Tensor]


def latent_channels(model) -> int:
    return int(model.latent_format.latent_channels)


def check_vae(vae, model, node: str) -> None:
    """The VAE must make latents of the model's channel count."""
    want = latent_channels(model)
    got = getattr(vae, "latent_channels", None)
    if got is not None and int(got) != want:
        raise AGGError(f"{node}: input 'vae' makes {got}-channel latents but the model samples {want}-channel latents; "
                       "connect the VAE that belongs to the checkpoint.")


def gradient_copy(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `module` whose weights are ordinary tensors, frozen, on `device`."""
    with torch.inference_mode(False):
        m = copy.deepcopy(module)
        for p in m.parameters():
            p.requires_grad_(False)
        return m.to(device=device, dtype=dtype).eval()


def vae_decoder(vae, run: RunInfo) -> Decoder:
    dtype = torch.float32 if run.device.type == "cpu" else getattr(vae, "vae_dtype", torch.float32)
    net = run.cached(("vae", id(vae)), lambda: gradient_copy(vae.first_stage_model, run.device, dtype))
    model = run.model

    def decode(x0: torch.Tensor) -> torch.Tensor:
        z = model.process_latent_out(x0)
        return net.decode(z.to(device=run.device, dtype=dtype)).float()

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
    from comfy.taesd.taesd import TAESD

    try:
        path = taesd_file(run.model)
    except FileNotFoundError as e:
        raise AGGError(f"{node}: input 'decoder' is 'taesd' but {e}. Put the TAESD decoder there, or choose 'vae' or 'linear'.") from e

    def make() -> torch.nn.Module:
        with torch.inference_mode(False):
            net = TAESD(decoder_path=path, latent_channels=latent_channels(run.model))
        return gradient_copy(net, run.device, torch.float32)

    net = run.cached(("taesd", path), make)

    def decode(x0: torch.Tensor) -> torch.Tensor:
        # TAESD decoders take the model's own latents, as ComfyUI's previews feed them (unit scale, no shift).
        return net.decode(x0.float())

    return decode


def linear_decoder(run: RunInfo, node: str) -> Decoder:
    fmt = run.model.latent_format
    factors = getattr(fmt, "latent_rgb_factors", None)
    if factors is None:
        raise AGGError(f"{node}: input 'decoder' is 'linear' but this model's latent format has no RGB factors; choose 'vae'.")
    with torch.inference_mode(False):
        w = torch.tensor(factors, dtype=torch.float32, device=run.device)  # [C, 3]
        bias = getattr(fmt, "latent_rgb_factors_bias", None)
        b = torch.tensor(bias if bias is not None else [0.0, 0.0, 0.0], dtype=torch.float32, device=run.device)
    scale = 8  # the VAE's spatial factor, so crops and sizes match the pixel image

    def decode(x0: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("bchw,cr->brhw", x0.float(), w) + b[None, :, None, None]
        return F.interpolate(rgb, scale_factor=scale, mode="bilinear", align_corners=False)

    return decode


def make_decoder(kind: str, vae, run: RunInfo, node: str) -> Decoder:
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
