"""Small builders of API-format prompts ({id: {"class_type", "inputs"}}) for stock graphs.

Plain data, no ComfyUI import: the same prompt runs in-process (runner.ComfySession.run) and on a
server (server.ComfyServer.post_prompt).

    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="agg-tiny-sd15.safetensors")
    pos = g.node("CLIPTextEncode", clip=ckpt[1], text="a cat")
    ...
    prompt = g.prompt
"""

from __future__ import annotations

from typing import Any

from agg_dev.graphs import Graph, NodeRef
from agg_testing.fixtures import CHECKPOINT_TINY, CONTROLNET_TINY

__all__ = ["Graph", "NodeRef"]  # built here for the stock graphs; their home is agg_dev.graphs


def sample_decode_save(
    g: Graph, ckpt: NodeRef, pos: NodeRef, neg: NodeRef, latent: NodeRef, *, seed: int, steps: int, cfg: float,
    sampler_name: str, scheduler: str, denoise: float, filename_prefix: str,
) -> Graph:
    """KSampler (role "sampler") -> VAEDecode ("decode") -> SaveImage ("save"), the tail of the stock graphs."""
    ks = g.node(
        "KSampler", name="sampler", model=ckpt[0], seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
        scheduler=scheduler, positive=pos[0], negative=neg[0], latent_image=latent[0], denoise=denoise,
    )
    dec = g.node("VAEDecode", name="decode", samples=ks[0], vae=ckpt[2])
    g.node("SaveImage", name="save", images=dec[0], filename_prefix=filename_prefix)
    return g

def img2img(
    *,
    ckpt_name: str = CHECKPOINT_TINY,
    positive: str = "a watercolor painting of a landscape",
    negative: str = "blurry",
    image: str = "example.png",
    size: int = 64,
    seed: int = 0,
    steps: int = 4,
    cfg: float = 5.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    denoise: float = 0.6,
    filename_prefix: str = "agg_test",
) -> Graph:
    """The stock img2img graph: CheckpointLoaderSimple -> CLIPTextEncode x2, LoadImage -> ImageScale
    -> VAEEncode -> KSampler -> VAEDecode -> SaveImage. Node roles: ckpt, positive, negative, load,
    scale, encode, sampler, decode, save."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", name="ckpt", ckpt_name=ckpt_name)
    pos = g.node("CLIPTextEncode", name="positive", clip=ckpt[1], text=positive)
    neg = g.node("CLIPTextEncode", name="negative", clip=ckpt[1], text=negative)
    load = g.node("LoadImage", name="load", image=image)
    scale = g.node(
        "ImageScale", name="scale", image=load[0], upscale_method="bilinear", width=size, height=size, crop="center"
    )
    enc = g.node("VAEEncode", name="encode", pixels=scale[0], vae=ckpt[2])
    return sample_decode_save(g, ckpt, pos, neg, enc, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                              scheduler=scheduler, denoise=denoise, filename_prefix=filename_prefix)


def txt2img(
    *,
    ckpt_name: str = CHECKPOINT_TINY,
    positive: str = "a watercolor painting of a landscape",
    negative: str = "blurry",
    size: int = 64,
    seed: int = 0,
    steps: int = 4,
    cfg: float = 5.0,
    sampler_name: str = "euler",
    scheduler: str = "normal",
    filename_prefix: str = "agg_test",
) -> Graph:
    """CheckpointLoaderSimple -> CLIPTextEncode x2, EmptyLatentImage -> KSampler -> VAEDecode ->
    SaveImage. Node roles: ckpt, positive, negative, latent, sampler, decode, save."""
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", name="ckpt", ckpt_name=ckpt_name)
    pos = g.node("CLIPTextEncode", name="positive", clip=ckpt[1], text=positive)
    neg = g.node("CLIPTextEncode", name="negative", clip=ckpt[1], text=negative)
    lat = g.node("EmptyLatentImage", name="latent", width=size, height=size, batch_size=1)
    return sample_decode_save(g, ckpt, pos, neg, lat, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                              scheduler=scheduler, denoise=1.0, filename_prefix=filename_prefix)


def insert_model_patch(g: Graph, class_type: str, *, name: str | None = None, **inputs: Any) -> NodeRef:
    """Insert a MODEL -> MODEL node right after the checkpoint loader: every consumer of the
    loader's MODEL output now reads the patched model."""
    ckpt = g["ckpt"]
    patch = g.node(class_type, name=name, model=ckpt[0], **inputs)
    g.rewire(ckpt[0], patch[0], skip=patch.id)
    return patch


def with_flow(g: Graph, *, shift: float = 3.0) -> NodeRef:
    """Make the graph's model a flow (CONST) model: ComfyUI's ModelSamplingSD3 after the loader
    (x = (1-σ)·x0 + σ·ε, the SD3/Flux parameterisation) on the tiny SD1.5 UNet. Node role: flow."""
    return insert_model_patch(g, "ModelSamplingSD3", name="flow", shift=shift)


def with_controlnet(
    g: Graph,
    *,
    control_net_name: str = CONTROLNET_TINY,
    strength: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    hint: list | None = None,
) -> NodeRef:
    """Route the sampler's conditionings through ControlNetLoader + ControlNetApplyAdvanced. The hint
    image defaults to the graph's scaled source image (img2img) or ComfyUI's example.png. Node roles:
    controlnet_loader, controlnet."""
    if hint is None:
        if "scale" in g.names:
            hint = g["scale"][0]
        else:
            load = g.node("LoadImage", name="hint_load", image="example.png")
            hint = g.node(
                "ImageScale", name="hint", image=load[0], upscale_method="bilinear", width=64, height=64, crop="center"
            )[0]
    loader = g.node("ControlNetLoader", name="controlnet_loader", control_net_name=control_net_name)
    sampler = g["sampler"]
    inputs = g.prompt[sampler.id]["inputs"]
    apply = g.node(
        "ControlNetApplyAdvanced",
        name="controlnet",
        positive=inputs["positive"],
        negative=inputs["negative"],
        control_net=loader[0],
        image=hint,
        strength=strength,
        start_percent=start_percent,
        end_percent=end_percent,
    )
    g.set_input(sampler, positive=apply[0], negative=apply[1])
    return apply


def save_latent(g: Graph, samples: list, filename_prefix: str = "agg_latent") -> NodeRef:
    """A SaveLatent node (writes a .latent file into the output folder). Node role: save_latent."""
    return g.node("SaveLatent", name="save_latent", samples=samples, filename_prefix=filename_prefix)


# -- flow models (SD3, Flux): separate loaders, 16-channel latents --------------------------------------


def flow_loaders(
    g: Graph, *, unet_name: str | None = None, clip_name: str | None = None, vae_name: str = "taesd3"
) -> tuple[NodeRef, NodeRef, NodeRef]:
    """UNETLoader (role "unet"), CLIPLoader type sd3 ("clip") and VAELoader ("vae") as SD3 / Flux graphs load
    their models; defaults: the SD3-shaped fixture, the CLIP-L fixture and the 16-channel taesd3 VAE."""
    from agg_testing import sd3

    unet = g.node("UNETLoader", name="unet", unet_name=unet_name or sd3.SD3_DIFFUSION_MODEL, weight_dtype="default")
    clip = g.node("CLIPLoader", name="clip", clip_name=clip_name or sd3.CLIP_L, type="sd3")
    vae = g.node("VAELoader", name="vae", vae_name=vae_name)
    return unet, clip, vae


def flow_img2img(
    *,
    flux: bool = False,
    positive: str = "a watercolor painting of a landscape",
    negative: str = "blurry",
    image: str = "example.png",
    size: int = 64,
    seed: int = 0,
    steps: int = 3,
    cfg: float | None = None,
    guidance: float = 3.5,
    sampler_name: str = "euler",
    scheduler: str = "simple",
    denoise: float = 0.6,
    decode: bool = False,
    filename_prefix: str = "agg_flow",
) -> Graph:
    """img2img on a 16-channel flow model: flow_loaders -> CLIPTextEncode x2, LoadImage -> ImageScale -> VAEEncode
    -> KSampler -> SaveLatent (and VAEDecode -> SaveImage when `decode`).

    SD3 (default): the SD3-shaped fixture with taesd3, cfg 5 unless given. Flux (`flux`): the Flux-shaped fixture
    with taef1, FluxGuidance(`guidance`) on the positive prompt and cfg 1 unless given (a guidance-distilled
    model samples without CFG). Node roles: unet, clip, vae, positive, negative, guidance (Flux), load, scale,
    encode, sampler, save_latent (decode, save)."""
    from agg_testing import sd3

    g = Graph()
    unet, clip, vae = flow_loaders(
        g, unet_name=sd3.FLUX_DIFFUSION_MODEL if flux else sd3.SD3_DIFFUSION_MODEL, vae_name="taef1" if flux else "taesd3"
    )
    pos = g.node("CLIPTextEncode", name="positive", clip=clip[0], text=positive)
    neg = g.node("CLIPTextEncode", name="negative", clip=clip[0], text=negative)
    if flux:
        pos = g.node("FluxGuidance", name="guidance", conditioning=pos[0], guidance=guidance)
    load = g.node("LoadImage", name="load", image=image)
    scale = g.node(
        "ImageScale", name="scale", image=load[0], upscale_method="bilinear", width=size, height=size, crop="center"
    )
    enc = g.node("VAEEncode", name="encode", pixels=scale[0], vae=vae[0])
    ks = g.node(
        "KSampler", name="sampler", model=unet[0], seed=seed, steps=steps, cfg=(1.0 if flux else 5.0) if cfg is None
        else cfg, sampler_name=sampler_name, scheduler=scheduler, positive=pos[0], negative=neg[0],
        latent_image=enc[0], denoise=denoise,
    )
    save_latent(g, ks[0], filename_prefix=filename_prefix)
    if decode:
        dec = g.node("VAEDecode", name="decode", samples=ks[0], vae=vae[0])
        g.node("SaveImage", name="save", images=dec[0], filename_prefix=filename_prefix)
    return g


def flow_inverted(g: Graph, *, steps: int = 3, denoise: float = 0.6, source_text: str = "a photo of a landscape",
                  sampler_name: str = "euler", scheduler: str = "simple") -> Graph:
    """Turn a flow_img2img graph into the paper's chain (inversion_chain) with a CLIPTextEncode source prompt."""
    source = g.node("CLIPTextEncode", name="source", clip=g["clip"][0], text=source_text)
    return inversion_chain(g, source[0], steps=steps, denoise=denoise, sampler_name=sampler_name, scheduler=scheduler)


def inversion_chain(g: Graph, source: list, *, steps: int, denoise: float | None = None, sampler_name: str = "euler",
                    scheduler: str = "simple") -> Graph:
    """Turn an img2img graph ("sampler" a KSampler, "encode", "save_latent") into the paper's chain:
    BasicScheduler ("sigmas") -> AGG Invert ("invert", the `source` conditioning, cfg 1) ->
    SamplerCustomAdvanced ("custom", DisableNoise "noise", KSamplerSelect "select", CFGGuider "guider" with the
    KSampler's model, prompts and cfg) on the inverted latent, with the same sigmas (the KSampler's denoise
    unless given). The KSampler is removed; SaveLatent (and a "decode" node) read the custom sampler."""
    ks = g.prompt.pop(g["sampler"].id)["inputs"]
    model = ks["model"]
    sigmas = g.node("BasicScheduler", name="sigmas", model=model, scheduler=scheduler, steps=steps,
                    denoise=ks["denoise"] if denoise is None else denoise)
    inv = g.node("AGGInvert", name="invert", model=model, latent=g["encode"][0], positive=source, sigmas=sigmas[0])
    guider = g.node("CFGGuider", name="guider", model=model, positive=ks["positive"], negative=ks["negative"],
                    cfg=ks["cfg"])
    select = g.node("KSamplerSelect", name="select", sampler_name=sampler_name)
    noise = g.node("DisableNoise", name="noise")
    custom = g.node("SamplerCustomAdvanced", name="custom", noise=noise[0], guider=guider[0], sampler=select[0],
                    sigmas=sigmas[0], latent_image=inv[0])
    g.set_input(g["save_latent"], samples=custom[0])
    if "decode" in g.names:
        g.set_input(g["decode"], samples=custom[0])
    return g
