"""Regenerate the example workflows: workflows/*.json (UI format), workflows/api/*.json (API twins),
workflows/*.jpg (designed thumbnails) and the images the workflows load, web/assets/agg_style.png and
web/assets/agg_edit_mask.png (generated here, deterministic, licence-clean).

The graphs are written below as API prompts. A real ComfyUI server with the pack is started with a models
folder holding (empty) files under the real model names, the frontend is opened in headless Chromium, each
prompt is loaded with ``app.loadApiJson``, the loaders get ``properties.models`` (name, URL, folder: what the
frontend's missing-models dialog offers to download), a Markdown note with the download links is added, and
the page's own serialisation gives the UI file (``app.graph.serialize()``) and the API twin
(``app.graphToPrompt().output``). Inputs a prompt below leaves out keep the node's default.

The layout (``layout``): the "Read me" note, then titled groups as ComfyUI's own templates have them ("Load
models", "Source image", "Prompts", "AGG guidance", "Sample and save", ...), flowed into columns at the sizes
the frontend gives the nodes; the UI file's ``extra.ds`` frames the whole graph in a 1600 x 1000 browser window
(``VIEW``), at scale 0.5 or more, and so does the frontend's fit-to-view that Templates applies (tests/browser
checks both). The thumbnails are drawn with PIL: the source picture, an arrow, the target text or style
image, and the title (never a model's output).

Usage: ~/.cache/agg-comfyui/venv/bin/python scripts/build_workflows.py [--images-only]
(the graphs need scripts/setup_browser.sh; --images-only writes the assets and thumbnails only)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
import tempfile
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

PACK = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK))
from agg_dev import workflow_models as M  # noqa: E402
from agg_dev.comfy_env import COMFYUI_DIR as COMFYUI  # noqa: E402
from agg_dev.graphs import Graph  # noqa: E402
from agg_kernels.settings import AGGSettings  # noqa: E402
from agg_kernels.strength import DEFAULT_CLIP_WEIGHT as CLIP_WEIGHT  # noqa: E402
from agg_kernels.strength import DEFAULT_COLOR_WEIGHT as COLOR_WEIGHT  # noqa: E402
from agg_kernels.strength import DEFAULT_STRUCTURE_WEIGHT as STRUCTURE_WEIGHT  # noqa: E402
from agg_kernels.strength import DEFAULT_STYLE_WEIGHT as STYLE_WEIGHT  # noqa: E402

WORKFLOWS = PACK / "workflows"
ASSETS = PACK / "web" / "assets"
STYLE_IMAGE = "agg_style.png"
EDIT_MASK = "agg_edit_mask.png"
SOURCE_VIDEO = M.SOURCE_VIDEO  # the video workflow's example clip (web/assets/, made by source_video)
PREVIEW_WIDGET = "video-preview"  # the frontend's preview on Load Video, serialised with the node's inputs
DECODER = "taesd"

SOURCE = "a child's drawing of a girl in a pink dress on a green hill"
TARGET = "a watercolor painting of a girl in a pink dress on a green hill"
EDIT_TARGET = "a child's drawing of a girl in a blue dress on a green hill"
NEGATIVE = "blurry, low quality, watermark"
# The video workflow: what the clip shows and should become, and Wan 2.1's own negative prompt (ComfyUI's Wan 2.1
# text-to-video template; the model was trained with it)
VIDEO_SOURCE = "a video of waves rolling onto a sandy beach"
VIDEO_TARGET = "a watercolor painting of waves rolling onto a sandy beach"
WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
                "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，"
                "背景人很多，倒着走")


# ---------------------------------------------------------------------------------------------------
# Model files: name, download address, ComfyUI models folder


@dataclass(frozen=True)
class Model:
    name: str
    url: str
    directory: str
    what: str

    def entry(self) -> dict:
        return {"name": self.name, "url": self.url, "directory": self.directory}


HF = "https://huggingface.co"
SD15 = Model(M.SD15, f"{HF}/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/{M.SD15}", "checkpoints",
             "Stable Diffusion 1.5")
SDXL = Model(M.SDXL, f"{HF}/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/{M.SDXL}", "checkpoints",
             "SDXL base 1.0")
OPEN_CLIP = Model(M.OPEN_CLIP, f"{HF}/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/{M.OPEN_CLIP}", "open_clip",
                  "open_clip ViT-B-32 (laion2B), the CLIP that judges CLIP Direction Loss")
CANNY = Model(M.CANNY, f"{HF}/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/{M.CANNY}", "controlnet",
              "ControlNet 1.1 canny for SD1.5 (fp16)")
SD3 = Model(M.SD3, f"{HF}/stabilityai/stable-diffusion-3-medium/resolve/main/{M.SD3}", "checkpoints",
            "Stable Diffusion 3 medium with its CLIP-L, CLIP-G and T5-XXL (fp8) text encoders in one file "
            "(accept the licence on the model page first)")
FLUX = Model(M.FLUX, f"{HF}/Comfy-Org/flux1-dev/resolve/main/{M.FLUX}", "diffusion_models", "FLUX.1 dev")
FLUX_CLIP_L = Model(M.FLUX_CLIP_L, f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/{M.FLUX_CLIP_L}",
                    "text_encoders", "CLIP-L text encoder")
FLUX_T5 = Model(M.FLUX_T5, f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/{M.FLUX_T5}", "text_encoders",
                "T5-XXL text encoder (fp8)")
FLUX_VAE = Model(M.FLUX_VAE, f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/{M.FLUX_VAE}",
                 "vae", "the Flux VAE")
FLUX2_REPO = f"{HF}/Comfy-Org/flux2-dev/resolve/main/split_files"
FLUX2 = Model(M.FLUX2, f"{FLUX2_REPO}/diffusion_models/{M.FLUX2}", "diffusion_models", "FLUX.2 dev (fp8 mixed)")
FLUX2_TE = Model(M.FLUX2_TE, f"{FLUX2_REPO}/text_encoders/{M.FLUX2_TE}", "text_encoders",
                 "Mistral 3 Small text encoder for FLUX.2 (fp8)")
FLUX2_VAE = Model(M.FLUX2_VAE, f"{FLUX2_REPO}/vae/{M.FLUX2_VAE}", "vae", "the FLUX.2 VAE")
QWEN_REPO = f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files"
QWEN = Model(M.QWEN, f"{QWEN_REPO}/diffusion_models/{M.QWEN}", "diffusion_models", "Qwen-Image (fp8)")
QWEN_TE = Model(M.QWEN_TE, f"{QWEN_REPO}/text_encoders/{M.QWEN_TE}", "text_encoders",
                "Qwen2.5-VL 7B text encoder (fp8)")
QWEN_VAE = Model(M.QWEN_VAE, f"{QWEN_REPO}/vae/{M.QWEN_VAE}", "vae", "the Qwen-Image VAE (Wan 2.1's)")
WAN_REPO = f"{HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
WAN = Model(M.WAN, f"{WAN_REPO}/diffusion_models/{M.WAN}", "diffusion_models", "Wan 2.1 text-to-video 1.3B (fp16)")
WAN_TE = Model(M.WAN_TE, f"{WAN_REPO}/text_encoders/{M.WAN_TE}", "text_encoders", "umt5-xxl text encoder (fp8)")
WAN_VAE = Model(M.WAN_VAE, f"{WAN_REPO}/vae/{M.WAN_VAE}", "vae", "the Wan 2.1 VAE")
CLIP_VISION = Model(M.CLIP_VISION, f"{HF}/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors",
                    "clip_vision", "the CLIP-ViT-H image encoder IPAdapter uses (saved under this name)")

TAESD_URL = "https://github.com/madebyollin/taesd/raw/main/{}"
TAESD = {"sd15": "taesd_decoder.pth", "sdxl": "taesdxl_decoder.pth", "sd3": "taesd3_decoder.pth",
         "flux": "taef1_decoder.pth", "flux2": "taef2_decoder.pth", "qwen_image": "lighttaew2_1.safetensors",
         "wan": "lighttaew2_1.safetensors"}
# Tiny decoders published outside madebyollin/taesd: lighttaew2_1 (Wan 2.1 latents, which Qwen-Image uses)
TAESD_LINKS = {"lighttaew2_1.safetensors": f"{HF}/lightx2v/Autoencoders/resolve/main/lighttaew2_1.safetensors"}


# ---------------------------------------------------------------------------------------------------
# API prompts


class Api(Graph):
    """An API prompt under construction, on the pack's graph builder (agg_dev.graphs.Graph), with node
    titles and the model files each loader needs: add() returns the node id; outputs are [id, slot]."""

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, list[Model]] = {}

    def add(self, class_type: str, title: str | None = None, *, models: list[Model] | None = None, **inputs) -> str:
        nid = self.node(class_type, **inputs).id
        if title:
            self.prompt[nid]["_meta"] = {"title": title}
        if models:
            self.models[nid] = list(models)
        return nid


@dataclass
class Card:
    """What a thumbnail shows: the source, an arrow, the target (text or an image), the title."""

    title: str
    subtitle: str
    target_text: str | None = None
    target_image: str | None = None  # a shipped asset's file name
    mask: bool = False
    video: bool = False  # the source: a drawn beach scene (beach_frame) as a film strip
    label: str | None = None  # under the target; default: "style", "edit (in the mask)" or "target text"


@dataclass
class Workflow:
    name: str
    api: Api
    note: str
    card: Card
    extra: dict = field(default_factory=dict)


def text_workflow(name: str, api: Api, card: str, models: list, taesd, title: str, text: str) -> Workflow:
    """A text-guided translation workflow: its note (with the shared use text) and its card's subtitle."""
    return Workflow(name, api, note(title, text, models, taesd, SHARED_TEXT_USE + STRENGTH_USE),
                    Card("Text-guided translation", card, target_text=TARGET))


def text(api: Api, title: str, value: str) -> str:
    """The core multiline String primitive: one text that feeds both a prompt and a loss."""
    return api.add("PrimitiveStringMultiline", title, value=value)


def sd_loaders(api: Api, ckpt: Model) -> tuple[list, list, list]:
    c = api.add("CheckpointLoaderSimple", models=[ckpt], ckpt_name=ckpt.name)
    return [c, 0], [c, 1], [c, 2]


def source_latent(api: Api, vae: list, size: int) -> tuple[list, list]:
    load = api.add("LoadImage", "Source image", image="example.png")
    scale = api.add("ImageScale", "Resize source", image=[load, 0], upscale_method="lanczos", width=size, height=size,
                    crop="center")
    enc = api.add("VAEEncode", pixels=[scale, 0], vae=vae)
    return [scale, 0], [enc, 0]


def prompts(api: Api, clip: list, target: list | str) -> tuple[str, str]:
    """The "Target prompt" and the shared "Negative prompt" encoders, in that order."""
    pos = api.add("CLIPTextEncode", "Target prompt", text=target, clip=clip)
    return pos, api.add("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=clip)


def open_clip(api: Api) -> list:
    return [api.add("AGGCLIPLoader", models=[OPEN_CLIP], clip_name=OPEN_CLIP.name, architecture="auto"), 0]


def agg_settings() -> dict:
    """Apply AGG's and AGG Guider's guidance inputs at the nodes' defaults (written out, so the graphs show them)."""
    return asdict(AGGSettings())


def clip_direction(api: Api, clip: list, vae: list, source: list, target: list, image: list, upstream: list,
                   **extra) -> list:
    return [api.add("AGGCLIPDirectionLoss", clip=clip, vae=vae, source_text=source, target_text=target,
                    weight=CLIP_WEIGHT, source_image=image, loss=upstream, decoder=DECODER, **extra), 0]


def ksampler_tail(api: Api, model: list, positive: list, negative: list, latent: list, vae: list, prefix: str, *,
                  steps: int = 30, cfg: float = 7.5, sampler: str = "euler", scheduler: str = "normal",
                  denoise: float = 0.6) -> None:
    ks = api.add("KSampler", model=model, seed=42, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler,
                 positive=positive, negative=negative, latent_image=latent, denoise=denoise)
    dec = api.add("VAEDecode", samples=[ks, 0], vae=vae)
    api.add("SaveImage", filename_prefix=prefix, images=[dec, 0])


# -- the notes ----------------------------------------------------------------------------------------


def model_lines(models: list[Model], taesd: str | None) -> str:
    lines = ["**Models** (download each into the folder shown):", ""]
    for m in models:
        lines.append(f"- [{m.name}]({m.url}) → `ComfyUI/models/{m.directory}/`: {m.what}")
    if taesd:
        url = TAESD_LINKS.get(taesd, TAESD_URL.format(taesd))
        lines += ["", f"**Fast decoder** (recommended): [{taesd}]({url}) → "
                      "`ComfyUI/models/vae_approx/`. The loss nodes' `decoder` is `taesd`; without this file "
                      "they use the full VAE (slower) and say so in the log."]
    return "\n".join(lines)


def note(title: str, what: str, models: list[Model], taesd: str | None, use: str) -> str:
    return f"## {title}\n\n{what}\n\n{model_lines(models, taesd)}\n\n**Use:** {use}\n"


SHARED_TEXT_USE = ("type what your picture shows in **Source text** and what it should become in **Target "
                   "text**: each feeds both the prompt and the CLIP Direction Loss. ")
STRENGTH_USE = ("Stronger edit: raise the CLIP weight (0.02 – 0.5) or lower the Structure weight; "
                "keep more of the photo: raise the Structure weight.")


# -- the workflows ------------------------------------------------------------------------------------


def inverted_and_guided(api: Api, model, vae, latent, pos_src: str, pos: str, neg: str, prefix: str,
                        target_loss) -> None:
    """The paper's graph after the loaders: AGG Invert (denoise 0.6) -> Structure Loss on its trajectory ->
    `target_loss(structure)` -> AGG Guider + AGG Sampler in SamplerCustomAdvanced with noise disabled -> save."""
    sigmas = api.add("BasicScheduler", model=model, scheduler="normal", steps=50, denoise=0.6)
    inv = api.add("AGGInvert", model=model, latent=latent, positive=[pos_src, 0], sigmas=[sigmas, 0])
    structure = api.add("AGGStructureLoss", weight=STRUCTURE_WEIGHT, trajectory=[inv, 1])
    guider = api.add("AGGGuider", model=model, positive=[pos, 0], negative=[neg, 0], cfg=7.5,
                     loss=target_loss(structure), **agg_settings())
    noise = api.add("DisableNoise")
    sampler = api.add("AGGSampler", eta_edit=0.0, eta=0.0, eta_boost=1.0)
    out = api.add("SamplerCustomAdvanced", noise=[noise, 0], guider=[guider, 0], sampler=[sampler, 0],
                  sigmas=[sigmas, 0], latent_image=[inv, 0])
    dec = api.add("VAEDecode", samples=[out, 0], vae=vae)
    api.add("SaveImage", filename_prefix=prefix, images=[dec, 0])


def text_guided() -> Workflow:
    api = Api()
    model, clip, vae = sd_loaders(api, SD15)
    src, tgt = text(api, "Source text", SOURCE), text(api, "Target text", TARGET)
    image, latent = source_latent(api, vae, 512)
    pos_src = api.add("CLIPTextEncode", "Source prompt", text=[src, 0], clip=clip)
    pos, neg = prompts(api, clip, [tgt, 0])
    inverted_and_guided(api, model, vae, latent, pos_src, pos, neg, "agg/text_guided",
                        lambda structure: clip_direction(api, open_clip(api), vae, [src, 0], [tgt, 0], image,
                                                         [structure, 0]))
    return text_workflow(
        "agg_text_guided", api, "SD1.5 · AGG Invert + AGG Guider", [SD15, OPEN_CLIP], TAESD["sd15"],
        "AGG: text-guided translation (SD1.5, the paper's method)",
        "DDIM inversion of the source (AGG Invert, denoise 0.6), then AGG Guider + AGG Sampler with noise disabled. "
        "Structure Loss follows the inversion's trajectory; CLIP Direction Loss moves the picture from the source "
        "text toward the target text. The AGG Sampler's edit zone follows the guider's window (start / end percent).")


def img2img(name: str, ckpt: Model, size: int, prefix: str, family: str, title: str) -> Workflow:
    api = Api()
    model, clip, vae = sd_loaders(api, ckpt)
    src, tgt = text(api, "Source text", SOURCE), text(api, "Target text", TARGET)
    image, latent = source_latent(api, vae, size)
    pos, neg = prompts(api, clip, [tgt, 0])
    structure = api.add("AGGStructureLoss", weight=STRUCTURE_WEIGHT, source=latent)
    loss = clip_direction(api, open_clip(api), vae, [src, 0], [tgt, 0], image, [structure, 0])
    agg = api.add("AGGApply", model=model, loss=loss, **agg_settings())
    ksampler_tail(api, [agg, 0], [pos, 0], [neg, 0], latent, vae, prefix)
    taesd = TAESD["sdxl" if ckpt is SDXL else "sd15"]
    return Workflow(name, api, note(
        title,
        f"Drop-in AGG: an ordinary img2img KSampler (denoise 0.6, {size} px) with Apply AGG on the model. Structure "
        "Loss keeps the source latent's layout; CLIP Direction Loss edits toward the target text. Any KSampler "
        "setting works; euler, ddim, euler_ancestral and lcm realise AGG's step exactly.",
        [ckpt, OPEN_CLIP], taesd, SHARED_TEXT_USE + STRENGTH_USE),
        Card("img2img + Apply AGG", f"{family} · KSampler, {size} px", target_text=TARGET))


def img2img_ksampler() -> Workflow:
    return img2img("agg_img2img_ksampler", SD15, 512, "agg/img2img", "SD1.5", "AGG: drop-in img2img (SD1.5)")


def sdxl_img2img() -> Workflow:
    return img2img("agg_sdxl_img2img", SDXL, 1024, "agg/sdxl_img2img", "SDXL", "AGG: drop-in img2img (SDXL, 1024 px)")


def image_style() -> Workflow:
    api = Api()
    model, clip, vae = sd_loaders(api, SD15)
    image, latent = source_latent(api, vae, 512)
    pos = api.add("CLIPTextEncode", "Prompt", text="a painting of a girl in a dress on a hill, bold brush strokes",
                  clip=clip)
    neg = api.add("CLIPTextEncode", "Negative prompt", text=NEGATIVE, clip=clip)
    style = api.add("LoadImage", "Style image", image=STYLE_IMAGE)
    structure = api.add("AGGStructureLoss", weight=STRUCTURE_WEIGHT, source=latent)
    vision = api.add("CLIPVisionLoader", models=[CLIP_VISION], clip_name=CLIP_VISION.name)
    loss = api.add("AGGImageStyleLoss", clip=[vision, 0], vae=vae, style_image=[style, 0], weight=STYLE_WEIGHT,
                   loss=[structure, 0], decoder=DECODER)
    agg = api.add("AGGApply", model=model, loss=[loss, 0], **agg_settings())
    ksampler_tail(api, [agg, 0], [pos, 0], [neg, 0], latent, vae, "agg/image_style")
    return Workflow("agg_image_style", api, note(
        "AGG: image-guided translation (SD1.5)",
        "Image Style Loss pulls the result's CLIP image embedding toward the picture in **Style image**, judged by "
        "the CLIP vision encoder IPAdapter users already have in models/clip_vision (any CLIP vision file works, "
        "or AGG CLIP Loader's open_clip); Structure "
        f"Loss keeps the source's layout. The style picture `{STYLE_IMAGE}` ships with the pack (web/assets/, made "
        "by the pack's build script, free to use): the pack's frontend extension copies it into ComfyUI's input "
        "folder when it is missing.",
        [SD15, CLIP_VISION], TAESD["sd15"],
        "pick your own style picture in **Style image** and your photo in **Source image**; describe the result "
        "in **Prompt**. " + STRENGTH_USE.replace("CLIP weight", "Style weight")),
        Card("Image-guided style", "SD1.5 · Image Style Loss", target_image=STYLE_IMAGE))


def controlnet() -> Workflow:
    api = Api()
    model, clip, vae = sd_loaders(api, SD15)
    src, tgt = text(api, "Source text", SOURCE), text(api, "Target text", TARGET)
    image, latent = source_latent(api, vae, 512)
    pos, neg = prompts(api, clip, [tgt, 0])
    edges = api.add("Canny", image=image, low_threshold=0.4, high_threshold=0.8)
    cn = api.add("ControlNetLoader", models=[CANNY], control_net_name=CANNY.name)
    cond = api.add("ControlNetApplyAdvanced", positive=[pos, 0], negative=[neg, 0], control_net=[cn, 0],
                   image=[edges, 0], strength=0.8, start_percent=0.0, end_percent=1.0, vae=vae)
    structure = api.add("AGGStructureLoss", weight=STRUCTURE_WEIGHT, source=latent)
    loss = clip_direction(api, open_clip(api), vae, [src, 0], [tgt, 0], image, [structure, 0])
    agg = api.add("AGGApply", model=model, loss=loss, **agg_settings())
    ksampler_tail(api, [agg, 0], [cond, 0], [cond, 1], latent, vae, "agg/controlnet", denoise=0.75)
    return Workflow("agg_controlnet", api, note(
        "AGG with ControlNet (SD1.5, canny)",
        "The core Canny node makes the edge map; ControlNet holds the outlines while AGG edits toward the target "
        "text (denoise 0.75). AGG's extra model passes go through ControlNet as the sampler's do.",
        [SD15, OPEN_CLIP, CANNY], TAESD["sd15"], SHARED_TEXT_USE + STRENGTH_USE),
        Card("AGG + ControlNet", "SD1.5 · canny ControlNet + Apply AGG", target_text=TARGET))


def text_guided_img2img(api: Api, model: list, clip: list, vae: list, negative: str, prefix: str, *,
                        positive=None, size: int = 1024, **sampling) -> None:
    """A `size` px (default 1024) img2img with Apply AGG (Structure Loss on the source latent + CLIP Direction Loss) under a
    KSampler, after the loaders: the shared texts, the prompts (`positive` may wrap the target prompt's
    conditioning, e.g. in FluxGuidance), the losses and the sampler."""
    src, tgt = text(api, "Source text", SOURCE), text(api, "Target text", TARGET)
    image, latent = source_latent(api, vae, size)
    pos = api.add("CLIPTextEncode", "Target prompt", text=[tgt, 0], clip=clip)
    conditioning = [pos, 0] if positive is None else positive(pos)
    neg = api.add("CLIPTextEncode", "Negative prompt", text=negative, clip=clip)
    structure = api.add("AGGStructureLoss", weight=STRUCTURE_WEIGHT, source=latent)
    loss = clip_direction(api, open_clip(api), vae, [src, 0], [tgt, 0], image, [structure, 0])
    agg = api.add("AGGApply", model=model, loss=loss, **agg_settings())
    ksampler_tail(api, [agg, 0], conditioning, [neg, 0], latent, vae, prefix, **sampling)


def sd3_text_guided() -> Workflow:
    api = Api()
    model, clip, vae = sd_loaders(api, SD3)
    shifted = api.add("ModelSamplingSD3", model=model, shift=3.0)
    text_guided_img2img(api, [shifted, 0], clip, vae, NEGATIVE, "agg/sd3_text_guided", steps=28, cfg=4.5,
                        scheduler="sgm_uniform")
    return text_workflow(
        "agg_sd3_text_guided", api, "SD3 medium · KSampler + Apply AGG", [SD3, OPEN_CLIP], TAESD["sd3"],
        "AGG: text-guided translation (SD3 medium)",
        "SD3's img2img as ComfyUI's own SD3 examples set it up (ModelSamplingSD3 shift 3, cfg 4.5, 28 steps, "
        "sgm_uniform, 1024 px, denoise 0.6) with Apply AGG on the model: Structure Loss on the source latent, "
        "CLIP Direction Loss toward the target text. The sampler is euler, which realises AGG's step exactly on "
        "flow models (dpmpp_2m, the examples' choice, only approximately).")


def flux_text_guided() -> Workflow:
    api = Api()
    unet = api.add("UNETLoader", models=[FLUX], unet_name=FLUX.name, weight_dtype="default")
    clips = api.add("DualCLIPLoader", models=[FLUX_CLIP_L, FLUX_T5], clip_name1=FLUX_CLIP_L.name,
                    clip_name2=FLUX_T5.name, type="flux")
    vae_node = api.add("VAELoader", models=[FLUX_VAE], vae_name=FLUX_VAE.name)
    clip, vae = [clips, 0], [vae_node, 0]
    text_guided_img2img(api, [unet, 0], clip, vae, "", "agg/flux_text_guided", steps=20, cfg=1.0, scheduler="simple",
                        positive=lambda pos: [api.add("FluxGuidance", conditioning=[pos, 0], guidance=3.5), 0])
    return text_workflow(
        "agg_flux_text_guided", api, "FLUX.1 dev · FluxGuidance, cfg 1",
        [FLUX, FLUX_CLIP_L, FLUX_T5, FLUX_VAE, OPEN_CLIP], TAESD["flux"],
        "AGG: text-guided translation (FLUX.1 dev)",
        "Flux dev is guidance-distilled: FluxGuidance 3.5 on the prompt and cfg 1 (the negative prompt is then "
        "ignored, as in ComfyUI's own Flux examples). Apply AGG on the model under an ordinary KSampler (euler, "
        "simple, 20 steps, denoise 0.6, 1024 px): at cfg 1 each guided step costs one extra model pass "
        "(finite_difference). Keep manifold = finite_difference on Flux (autograd cannot go back through its "
        "in-place blocks).")


def flux2_text_guided() -> Workflow:
    api = Api()
    unet = api.add("UNETLoader", models=[FLUX2], unet_name=FLUX2.name, weight_dtype="default")
    te = api.add("CLIPLoader", models=[FLUX2_TE], clip_name=FLUX2_TE.name, type="flux2")
    vae_node = api.add("VAELoader", models=[FLUX2_VAE], vae_name=FLUX2_VAE.name)
    clip, vae = [te, 0], [vae_node, 0]
    text_guided_img2img(api, [unet, 0], clip, vae, "", "agg/flux2_text_guided", steps=20, cfg=1.0,
                        scheduler="simple",
                        positive=lambda pos: [api.add("FluxGuidance", conditioning=[pos, 0], guidance=4.0), 0])
    return text_workflow(
        "agg_flux2_text_guided", api, "FLUX.2 dev · FluxGuidance, cfg 1",
        [FLUX2, FLUX2_TE, FLUX2_VAE, OPEN_CLIP], TAESD["flux2"],
        "AGG: text-guided translation (FLUX.2 dev)",
        "FLUX.2 dev's loaders as in ComfyUI's own FLUX.2 templates (UNETLoader, CLIPLoader type flux2 with the "
        "Mistral text encoder, the FLUX.2 VAE) and its guidance: FluxGuidance 4 on the prompt and cfg 1 (the "
        "negative prompt is then ignored). Apply AGG on the model under an ordinary KSampler (euler, simple, 20 "
        "steps, denoise 0.6, 1024 px): Structure Loss on the source latent, CLIP Direction Loss toward the target "
        "text; at cfg 1 each guided step costs one extra model pass (finite_difference). Keep manifold = "
        "finite_difference on FLUX.2 (autograd cannot go back through its in-place blocks).")


def qwen_image_text_guided() -> Workflow:
    api = Api()
    unet = api.add("UNETLoader", models=[QWEN], unet_name=QWEN.name, weight_dtype="default")
    te = api.add("CLIPLoader", models=[QWEN_TE], clip_name=QWEN_TE.name, type="qwen_image")
    vae_node = api.add("VAELoader", models=[QWEN_VAE], vae_name=QWEN_VAE.name)
    shifted = api.add("ModelSamplingAuraFlow", model=[unet, 0], shift=3.1)
    text_guided_img2img(api, [shifted, 0], [te, 0], [vae_node, 0], NEGATIVE, "agg/qwen_image_text_guided",
                        size=1328, steps=20, cfg=4.0, scheduler="simple")
    return text_workflow(
        "agg_qwen_image_text_guided", api, "Qwen-Image · KSampler + Apply AGG, cfg 4",
        [QWEN, QWEN_TE, QWEN_VAE, OPEN_CLIP], TAESD["qwen_image"],
        "AGG: text-guided translation (Qwen-Image)",
        "Qwen-Image as ComfyUI's own Qwen-Image template sets it up (UNETLoader, CLIPLoader type qwen_image with "
        "Qwen2.5-VL 7B, the Qwen-Image VAE, ModelSamplingAuraFlow shift 3.1, euler, simple, 20 steps, cfg 4, "
        "1328 px), as img2img at denoise 0.6 with Apply AGG on the model: Structure Loss on the source latent, CLIP "
        "Direction Loss toward the target text.")


def wan_video_edit() -> Workflow:
    """Wan 2.1 T2V 1.3B editing a source video: ComfyUI's video nodes in and out, Wan's loaders and settings as
    ComfyUI's Wan 2.1 text-to-video template has them, and the paper's chain (AGG Invert on the source prompt,
    AGG Guider with Structure Loss on the trajectory + CLIP Direction Loss, noise disabled)."""
    api = Api()
    unet = api.add("UNETLoader", models=[WAN], unet_name=WAN.name, weight_dtype="default")
    te = api.add("CLIPLoader", models=[WAN_TE], clip_name=WAN_TE.name, type="wan")
    vae = [api.add("VAELoader", models=[WAN_VAE], vae_name=WAN_VAE.name), 0]
    model = [api.add("ModelSamplingSD3", model=[unet, 0], shift=8.0), 0]
    src, tgt = text(api, "Source text", VIDEO_SOURCE), text(api, "Target text", VIDEO_TARGET)
    load = api.add("LoadVideo", "Source video", file=M.SOURCE_VIDEO)
    # the first 2 s (Wan 2.1's template makes 33 frames at 16 fps): longer clips cost memory and time in step
    trim = api.add("Video Slice", "Trim video", video=[load, 0], start_time=0.0, duration=2.0, strict_duration=False)
    parts = api.add("GetVideoComponents", "Video frames", video=[trim, 0])
    frames = api.add("ImageScale", "Resize frames", image=[parts, 0], upscale_method="lanczos", width=832, height=480,
                     crop="center")
    first = api.add("ImageFromBatch", "First frame", image=[frames, 0], batch_index=0, length=1)
    latent = [api.add("VAEEncode", "Encode frames", pixels=[frames, 0], vae=vae), 0]
    pos_src = api.add("CLIPTextEncode", "Source prompt", text=[src, 0], clip=[te, 0])
    pos = api.add("CLIPTextEncode", "Target prompt", text=[tgt, 0], clip=[te, 0])
    neg = api.add("CLIPTextEncode", "Negative prompt", text=WAN_NEGATIVE, clip=[te, 0])
    sigmas = api.add("BasicScheduler", model=model, scheduler="simple", steps=30, denoise=0.6)
    inv = api.add("AGGInvert", model=model, latent=latent, positive=[pos_src, 0], sigmas=[sigmas, 0])
    structure = api.add("AGGStructureLoss", weight=STRUCTURE_WEIGHT, trajectory=[inv, 1])
    # the CLIP judges `frames` latent frames per guided step (each decoded alone), chosen afresh each step
    loss = clip_direction(api, open_clip(api), vae, [src, 0], [tgt, 0], [first, 0], [structure, 0], frames=2)
    guider = api.add("AGGGuider", model=model, positive=[pos, 0], negative=[neg, 0], cfg=6.0, loss=loss,
                     **agg_settings())
    noise = api.add("DisableNoise")
    sampler = api.add("AGGSampler", eta_edit=0.0, eta=0.0, eta_boost=1.0)
    out = api.add("SamplerCustomAdvanced", noise=[noise, 0], guider=[guider, 0], sampler=[sampler, 0],
                  sigmas=[sigmas, 0], latent_image=[inv, 0])
    dec = api.add("VAEDecode", samples=[out, 0], vae=vae)
    video = api.add("CreateVideo", images=[dec, 0], fps=[parts, 2])  # the source's frame rate
    api.add("SaveVideo", video=[video, 0], filename_prefix="agg/wan_video_edit", format="auto", codec="auto")
    return Workflow("agg_wan_video_edit", api, note(
        "AGG: text-guided video editing (Wan 2.1 text-to-video 1.3B)",
        "Load Video reads your clip; Trim Video keeps its first 2 seconds (0 = all of it), the frames are scaled to "
        "832 x 480 and encoded by the Wan VAE (4 frames per latent frame after the first: a clip of 4k + 1 frames "
        "comes back whole, up to 3 frames at the end are dropped otherwise). Wan's loaders and settings as in "
        "ComfyUI's own Wan 2.1 text-to-video template (ModelSamplingSD3 shift 8, cfg 6, simple scheduler, 30 "
        "steps); AGG Invert takes the clip back to denoise 0.6 under the source prompt, then AGG Guider + AGG "
        "Sampler (noise disabled) edit it: Structure Loss follows the inversion's trajectory in every frame, CLIP "
        "Direction Loss judges `frames` latent frames per step (2 here, chosen afresh each step; more = steadier "
        "and slower). Create Video keeps the source's frame rate; Save Video writes an MP4 to ComfyUI's output "
        f"folder. The example clip `{SOURCE_VIDEO}` (waves on a beach, drawn by the pack's build script, free to use) "
        "ships with the pack (web/assets/); the pack's frontend extension copies it into ComfyUI's input folder "
        "when it is missing.",
        [WAN, WAN_TE, WAN_VAE, OPEN_CLIP], TAESD["wan"],
        "pick your video in **Source video** (upload). " + SHARED_TEXT_USE + STRENGTH_USE),
        Card("Video editing", "Wan 2.1 T2V 1.3B · AGG Invert + AGG Guider", target_text=VIDEO_TARGET, video=True))


def local_edit() -> Workflow:
    api = Api()
    model, clip, vae = sd_loaders(api, SD15)
    src, tgt = text(api, "Source text", SOURCE), text(api, "Target text", EDIT_TARGET)
    image, latent = source_latent(api, vae, 512)
    mask_load = api.add("LoadImage", "Edit mask", image=EDIT_MASK)
    mask_scale = api.add("ImageScale", "Resize mask", image=[mask_load, 0], upscale_method="bilinear", width=512,
                         height=512, crop="center")
    mask = [api.add("ImageToMask", "Mask (white = edit)", image=[mask_scale, 0], channel="red"), 0]
    noised = api.add("SetLatentNoiseMask", samples=latent, mask=mask)
    pos, neg = prompts(api, clip, [tgt, 0])
    structure = api.add("AGGStructureLoss", weight=STRUCTURE_WEIGHT, source=latent, mask=mask)
    loss = clip_direction(api, open_clip(api), vae, [src, 0], [tgt, 0], image, [structure, 0], mask=mask)
    agg = api.add("AGGApply", model=model, loss=loss, **agg_settings())
    ksampler_tail(api, [agg, 0], [pos, 0], [neg, 0], [noised, 0], vae, "agg/local_edit", denoise=0.75)
    return Workflow("agg_local_edit", api, note(
        "AGG: local edit inside a mask (SD1.5)",
        "Only the white part of the mask changes. Set Latent Noise Mask keeps everything outside it; CLIP Direction "
        "Loss judges only the masked region and Structure Loss holds only the rest. The example mask "
        f"`{EDIT_MASK}` (the dress of ComfyUI's example picture) ships with the pack (web/assets/, made by the "
        "pack's build script); the pack's frontend extension copies it into ComfyUI's input folder when missing.",
        [SD15, OPEN_CLIP], TAESD["sd15"],
        SHARED_TEXT_USE + "For your own photo, load a mask picture of the same size in **Edit mask** (white = "
        "change, black = keep), e.g. painted in any editor or in ComfyUI's mask editor and saved. " + STRENGTH_USE),
        Card("Local edit in a mask", "SD1.5 · masked losses + Set Latent Noise Mask", target_text=EDIT_TARGET,
             mask=True))


def color_transfer() -> Workflow:
    api = Api()
    model, clip, vae = sd_loaders(api, SD15)
    image, latent = source_latent(api, vae, 512)
    pos_src = api.add("CLIPTextEncode", "Source prompt", text=SOURCE, clip=clip)
    pos, neg = prompts(api, clip, SOURCE)
    palette = api.add("LoadImage", "Style image", image=STYLE_IMAGE)
    inverted_and_guided(api, model, vae, latent, pos_src, pos, neg, "agg/color_transfer",
                        lambda structure: [api.add("AGGColorLoss", image=[palette, 0], vae=vae, weight=COLOR_WEIGHT,
                                                   loss=[structure, 0], decoder=DECODER), 0])
    return Workflow("agg_color_transfer", api, note(
        "AGG: colour transfer from a palette picture (SD1.5)",
        "Color Loss pulls the decoded picture's colour statistics toward those of the picture in **Style image** "
        "while Structure Loss follows AGG Invert's trajectory of the source, so the drawing stays and its colours "
        f"change. The palette picture `{STYLE_IMAGE}` ships with the pack (web/assets/, made by the pack's build "
        "script); the pack's frontend extension copies it into ComfyUI's input folder when missing.",
        [SD15], TAESD["sd15"],
        "pick your photo in **Source image** and a picture with the colours you want in **Style image**; describe "
        "the photo in both prompts. Stronger colour change: raise the Color Loss weight or lower the Structure "
        "weight."),
        Card("Colour transfer", "SD1.5 · Color Loss + AGG Invert", target_image=STYLE_IMAGE,
             label="palette"))


BUILDERS = [text_guided, img2img_ksampler, image_style, controlnet, sdxl_img2img, sd3_text_guided, flux_text_guided,
            flux2_text_guided, qwen_image_text_guided, wan_video_edit, local_edit, color_transfer]


def workflows(available: set[str] | None = None) -> list[Workflow]:
    """The workflows whose node types are all in `available` (all of them when None)."""
    out = []
    for build in BUILDERS:
        wf = build()
        if available is None or {n["class_type"] for n in wf.api.prompt.values()} <= available:
            out.append(wf)
        else:
            print(f"skipped {wf.name}: node types missing from the server:",
                  sorted({n["class_type"] for n in wf.api.prompt.values()} - available))
    return out


def api_prompts() -> dict[str, dict]:
    """The API prompts as written here, for tests that want the source graphs."""
    return {wf.name: copy.deepcopy(wf.api.prompt) for wf in workflows()}


# ---------------------------------------------------------------------------------------------------
# Images: the style picture, the edit mask, the thumbnails


def style_image(size: int = 512, seed: int = 1406):
    """Bold, brush-stroke-like colour bands in a warm-and-deep palette (PIL + numpy, deterministic)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    palette = [(14, 30, 68), (33, 76, 140), (46, 134, 171), (242, 165, 65), (228, 87, 46), (243, 202, 64),
               (122, 34, 72), (250, 240, 214)]
    img = Image.new("RGB", (size, size), palette[0])
    draw = ImageDraw.Draw(img)

    def stroke(x0: float, y0: float, length: float, angle: float, width: float, colour: tuple, bend: float) -> None:
        pts = []
        for t in np.linspace(0.0, 1.0, 24):
            a = angle + bend * (t - 0.5)
            pts.append((x0 + math.cos(a) * length * t, y0 + math.sin(a) * length * t + bend * 30 * math.sin(math.pi * t)))
        draw.line(pts, fill=colour, width=int(width), joint="curve")
        # bristles: thin darker and lighter lines along the stroke
        for k in range(-2, 3):
            shade = tuple(int(min(255, max(0, c * (1.0 + 0.12 * k)))) for c in colour)
            off = k * width / 6
            bristle = [(x - math.sin(angle) * off, y + math.cos(angle) * off) for x, y in pts[2:-2]]
            draw.line(bristle, fill=shade, width=max(1, int(width / 10)), joint="curve")

    # broad sweeping bands, then shorter strokes on top
    for i in range(16):
        y = -40 + i * (size + 80) / 15 + rng.uniform(-12, 12)
        colour = palette[int(rng.integers(0, len(palette)))]
        stroke(-60, y, size * 1.4, rng.uniform(-0.35, -0.1), rng.uniform(26, 54), colour, rng.uniform(-0.6, 0.6))
    for _ in range(90):
        colour = palette[int(rng.integers(1, len(palette)))]
        stroke(rng.uniform(-40, size), rng.uniform(-40, size), rng.uniform(60, 180), rng.uniform(-0.9, 0.2),
               rng.uniform(12, 28), colour, rng.uniform(-0.8, 0.8))
    return img.filter(ImageFilter.SMOOTH)


def edit_mask(size: int = 768):
    """White over the dress of ComfyUI's example picture (input/example.png, 768 px), black elsewhere."""
    from PIL import Image, ImageDraw, ImageFilter

    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    dress = [(318, 330), (440, 328), (448, 420), (480, 520), (505, 640), (470, 668), (300, 668), (266, 640),
             (284, 520), (300, 420)]
    draw.polygon([(x * size / 768, y * size / 768) for x, y in dress], fill=255)
    return img.filter(ImageFilter.GaussianBlur(4)).point(lambda v: 255 if v >= 128 else 0).convert("RGB")


def write_assets() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    style_image().save(ASSETS / STYLE_IMAGE, optimize=True)
    edit_mask().save(ASSETS / EDIT_MASK, optimize=True)
    write_clip(ASSETS / SOURCE_VIDEO)


def _font(size: int, bold: bool = False):
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for folder in ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu"):
        if Path(folder, name).exists():
            return ImageFont.truetype(str(Path(folder, name)), size)
    return ImageFont.load_default(size)


def source_picture() -> Path:
    return COMFYUI / "input" / "example.png"


def beach_frame(width: int, height: int, t: float = 0.0):
    """A flat drawing of waves rolling onto a beach (the video workflow's source text) at time `t` of a loop
    (0..1): the crests travel left to right and the surf runs up the sand and back. The card's source picture and
    the frames of the shipped example clip."""
    from PIL import Image, ImageDraw

    u = height / 196  # the card's picture is 196 px: sizes below are in its pixels
    img = Image.new("RGB", (width, height), (135, 196, 235))
    draw = ImageDraw.Draw(img)
    draw.ellipse([width - 58 * u, 20 * u, width - 23 * u, 55 * u], fill=(255, 224, 120))
    sea = int(height * 0.42)
    sand = height * 0.72 - 8 * u * math.sin(2 * math.pi * t)  # the surf's edge
    draw.rectangle([0, sea, width, height], fill=(38, 110, 170))
    shore = [(x, sand - 10 * u * math.sin(x / width * 3 * math.pi + 2 * math.pi * t)) for x in range(0, width + 1, 4)]
    draw.polygon([(0, height), *shore, (width, height)], fill=(232, 205, 150))
    draw.line(shore, fill=(245, 250, 255), width=max(2, round(3 * u)))  # foam along the surf's edge
    step, span = 40 * u, 30 * u
    for k, y in enumerate(range(sea + round(14 * u), round(height * 0.72 - 14 * u), round(16 * u))):
        shift = (17 * k * u + t * step) % step  # each row of white crests offset, all moving on
        x0 = shift - step
        while x0 < width:
            draw.arc([x0, y - 6 * u, x0 + span, y + 6 * u], 200, 340, fill=(240, 248, 255), width=max(2, round(3 * u)))
            x0 += step
    return img


def source_video(path: Path, width: int = 832, height: int = 480, frames: int = 33, fps: int = 16) -> None:
    """The video workflow's example clip: `frames` frames of beach_frame (one loop of its waves) as H.264 MP4 at
    Wan 2.1's template size, length and frame rate (one encoder thread, fixed settings and timestamps)."""
    from fractions import Fraction

    import av
    import numpy as np

    with av.open(str(path), mode="w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1
        stream.options = {"crf": "20", "preset": "slow", "threads": "1", "x264-params": "threads=1:lookahead-threads=1"}
        stream.time_base = Fraction(1, fps)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.asarray(beach_frame(width, height, i / frames)), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)  # explicit timestamps: the encoder's input is all given
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def clip_frames(path: Path):
    """A video file's frames as one uint8 array [T, H, W, 3]."""
    import av
    import numpy as np

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def same_clip(a: Path, b: Path, tolerance: float = 1.0) -> bool:
    """Whether two video files hold the same frames, to `tolerance` (mean absolute difference of 8-bit values)."""
    import numpy as np

    fa, fb = clip_frames(a), clip_frames(b)
    return fa.shape == fb.shape and float(np.abs(fa.astype(np.float32) - fb).mean()) <= tolerance


def write_clip(path: Path) -> None:
    """source_video() into `path`, unless the file there already holds the same clip: x264's bytes differ with the
    FFmpeg build PyAV loads, and a rebuild should leave the shipped file as it is."""
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / path.name
        source_video(fresh)
        if not (path.exists() and same_clip(path, fresh)):
            shutil.copyfile(fresh, path)


def thumbnail(card: Card, out: Path, size: tuple[int, int] = (512, 384)) -> None:
    """A designed card: title, source picture -> target (text or picture), subtitle."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, (27, 30, 41))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, w, 58], fill=(44, 49, 68))
    draw.text((18, 29), card.title, font=_font(28, bold=True), fill=(245, 245, 250), anchor="lm")
    draw.text((w - 16, 29), "AGG", font=_font(18, bold=True), fill=(242, 165, 65), anchor="rm")
    side, top = 196, 84
    if card.video:
        pic = beach_frame(side, side)
    else:
        with Image.open(source_picture()) as src:
            pic = src.convert("RGB").resize((side, side), Image.LANCZOS)
    if card.mask:
        with Image.open(ASSETS / EDIT_MASK) as m:
            mask = m.convert("L").resize((side, side), Image.LANCZOS)
        from PIL import ImageFilter

        pic = Image.composite(pic, Image.blend(pic, Image.new("RGB", (side, side), (0, 0, 0)), 0.6), mask)
        edge = mask.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(3))
        pic.paste((242, 165, 65), (0, 0), edge)
    if card.video:  # film-strip bands with sprocket holes along the top and bottom
        strip = ImageDraw.Draw(pic)
        for y0 in (0, side - 18):
            strip.rectangle([0, y0, side, y0 + 18], fill=(18, 18, 22))
            for x in range(6, side, 22):
                strip.rounded_rectangle([x, y0 + 5, x + 11, y0 + 13], radius=2, fill=(235, 235, 240))
    img.paste(pic, (20, top))
    draw.rectangle([20, top, 20 + side, top + side], outline=(90, 96, 120), width=2)
    # arrow
    ax0, ax1, ay = 20 + side + 12, w - 20 - side - 12, top + side // 2
    draw.line([(ax0, ay), (ax1 - 14, ay)], fill=(242, 165, 65), width=8)
    draw.polygon([(ax1, ay), (ax1 - 22, ay - 16), (ax1 - 22, ay + 16)], fill=(242, 165, 65))
    x1 = w - 20 - side
    if card.target_image:
        with Image.open(ASSETS / card.target_image) as t:
            img.paste(t.convert("RGB").resize((side, side), Image.LANCZOS), (x1, top))
        draw.rectangle([x1, top, x1 + side, top + side], outline=(90, 96, 120), width=2)
    else:
        draw.rounded_rectangle([x1, top, x1 + side, top + side], radius=14, fill=(250, 246, 235))
        font = _font(21)
        lines = textwrap.wrap(f"“{card.target_text}”", width=15)[:7]
        line_h = 26
        y = top + side // 2 - line_h * len(lines) // 2 + line_h // 2
        for line in lines:
            draw.text((x1 + side // 2, y), line, font=font, fill=(40, 40, 52), anchor="mm")
            y += line_h
    draw.text((20, top + side + 18), "source", font=_font(16), fill=(170, 175, 195), anchor="lm")
    what = card.label or ("style" if card.target_image else ("edit (in the mask)" if card.mask else "target text"))
    draw.text((x1, top + side + 18), what, font=_font(16), fill=(170, 175, 195), anchor="lm")
    font = _font(19, bold=True)
    for points in range(19, 11, -1):  # the largest size that fits the card's width
        font = _font(points, bold=True)
        if draw.textlength(card.subtitle, font=font) <= w - 32:
            break
    draw.text((w // 2, h - 26), card.subtitle, font=font, fill=(205, 210, 228), anchor="mm")
    img.save(out, "JPEG", quality=88, optimize=True)


# ---------------------------------------------------------------------------------------------------
# Layout: titled groups in columns, framed by the saved view

# ComfyUI's frontend (1.48) in a 1600 x 1000 browser window: the canvas fills the page (1600 x 857 in headless
# Chromium at that window size); the side toolbar (left, 59 px), the workflow tabs (top, 38 px) and the row of
# floating controls under them (to 94 px) cover its edges. The saved view frames the graph in what is left.
VIEW = (72.0, 104.0, 1588.0, 845.0)  # left, top, right, bottom in page pixels
CANVAS = (1600.0, 857.0)
FIT_ZOOM = 0.75  # the frontend's fitView (Templates opens a workflow fitted): 75 % of the canvas
MIN_SCALE = 0.5  # both views must show the graph at least this large (tests/browser checks it)

NODE_TITLE = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar is drawn above its pos
GROUP_FONT = 24
GROUP_HEADER = 34  # a group's title bar at GROUP_FONT (font size * 1.4)
PAD = 14  # inside a group, around its nodes
NODE_GAP = 18  # between one node's bottom and the next one's title bar
COLUMN_GAP = 44
GROUP_GAP = 36
SPLIT_COST = 0.01  # the scale a group's second sub-column must gain to be chosen
CHART_ROOM = 124  # below Apply AGG / AGG Guider: the guidance chart the pack's extension adds during a run

# The smallest sizes the nodes get (the frontend's computeSize wins where larger).
NOTE_SIZE = (470, 500)
PREFERRED = {"PrimitiveStringMultiline": (400, 150), "LoadImage": (300, 340), "SaveImage": (360, 360),
             "LoadVideo": (300, 340), "SaveVideo": (360, 360)}
TEXT_BOX = (400, 150)  # a CLIPTextEncode whose text is typed in it (not linked from a String node)

AGG_COLOR = "#b58b2a"  # LiteGraph's "yellow" group colour: the pack's part of the graph
GROUP_COLOR = "#3f789e"  # the colour ComfyUI's own templates give their groups

# The groups, in the order they are laid out (columns left to right, each column top to bottom).
GROUPS = ["Load models", "Source image", "Source video", "Edit mask", "Style image", "ControlNet", "Prompts", "Inversion",
          "AGG guidance", "Sample and save"]
GROUP_BY_TITLE = {"Source image": "Source image", "Resize source": "Source image", "Edit mask": "Edit mask",
                  "Resize mask": "Edit mask", "Mask (white = edit)": "Edit mask", "Style image": "Style image",
                  "Source video": "Source video", "Trim video": "Source video", "Video frames": "Source video",
                  "Resize frames": "Source video", "First frame": "Source video", "Encode frames": "Source video"}
GROUP_BY_TYPE = {
    "CheckpointLoaderSimple": "Load models", "UNETLoader": "Load models", "DualCLIPLoader": "Load models",
    "VAELoader": "Load models", "AGGCLIPLoader": "Load models", "CLIPVisionLoader": "Load models",
    "ControlNetLoader": "Load models", "ModelSamplingSD3": "Load models", "CLIPLoader": "Load models",
    "ModelSamplingAuraFlow": "Load models",
    "VAEEncode": "Source image", "SetLatentNoiseMask": "Edit mask",
    "Canny": "ControlNet", "ControlNetApplyAdvanced": "ControlNet",
    "PrimitiveStringMultiline": "Prompts", "CLIPTextEncode": "Prompts", "FluxGuidance": "Prompts",
    "BasicScheduler": "Inversion", "AGGInvert": "Inversion",
    "AGGStructureLoss": "AGG guidance", "AGGCLIPDirectionLoss": "AGG guidance", "AGGImageStyleLoss": "AGG guidance",
    "AGGColorLoss": "AGG guidance", "AGGApply": "AGG guidance", "AGGGuider": "AGG guidance",
    "KSampler": "Sample and save", "DisableNoise": "Sample and save", "AGGSampler": "Sample and save",
    "SamplerCustomAdvanced": "Sample and save", "VAEDecode": "Sample and save", "SaveImage": "Sample and save",
    "CreateVideo": "Sample and save", "SaveVideo": "Sample and save",
}
GROUP_COLORS = {"Inversion": AGG_COLOR, "AGG guidance": AGG_COLOR}
GUIDING = {"AGGApply", "AGGGuider"}


@dataclass
class Block:
    """A column's unit: the Read me note, or a group's nodes in one or two sub-columns."""

    title: str | None  # the group's title; None for the note
    columns: list[list[str]]  # node ids, top to bottom, per sub-column

    def size(self, sizes: dict[str, tuple[float, float]], extra: dict[str, float]) -> tuple[float, float]:
        widths = [max(sizes[n][0] for n in col) for col in self.columns]
        heights = [sum(NODE_TITLE + sizes[n][1] + extra.get(n, 0) for n in col) + NODE_GAP * (len(col) - 1)
                   for col in self.columns]
        if self.title is None:
            return widths[0], heights[0]
        return sum(widths) + COLUMN_GAP // 2 * (len(widths) - 1) + 2 * PAD, max(heights) + GROUP_HEADER + 2 * PAD


@dataclass
class Layout:
    places: dict[str, list[float]]  # node id -> [x, y, width, height] (y: below the title bar)
    groups: list[tuple[str, list[float], str]]  # title, [x, y, width, height], colour
    ds: dict  # the saved view: {"scale", "offset"}
    fit_scale: float  # the scale the frontend's fitView gives (Templates opens workflows fitted)


def node_group(node: dict) -> str | None:
    if node["type"] == "MarkdownNote":
        return None
    return GROUP_BY_TITLE.get(node["title"]) or GROUP_BY_TYPE[node["type"]]


def node_size(node: dict, linked_text: bool) -> tuple[float, float]:
    w, h = node["min"]
    pw, ph = NOTE_SIZE if node["type"] == "MarkdownNote" else PREFERRED.get(node["type"], (0, 0))
    if node["type"] == "CLIPTextEncode" and not linked_text:
        pw, ph = TEXT_BOX
    return math.ceil(max(w, pw)), math.ceil(max(h, ph))


def _splits(ids: list[str]) -> list[list[list[str]]]:
    """A group's nodes in one sub-column, or cut in two sub-columns after any of them."""
    return [[ids], *([ids[:k], ids[k:]] for k in range(1, len(ids)))]


def _place(blocks: list[Block], cut: list[int], sizes: dict, extra: dict):
    """Columns of blocks (a new column at each index in `cut`); each column's blocks as wide as the widest."""
    columns, start = [], 0
    for end in [*cut, len(blocks)]:
        columns.append(blocks[start:end])
        start = end
    places: dict[str, list[float]] = {}
    groups: list[tuple[str, list[float], str]] = []
    x = 0.0
    bottom = 0.0
    for column in columns:
        width = max(b.size(sizes, extra)[0] for b in column)
        y = 0.0
        for b in column:
            bw, bh = b.size(sizes, extra)
            inner = [max(sizes[n][0] for n in col) for col in b.columns]
            if b.title is None:
                inner = [width]
            else:  # the group's sub-columns share the column's width
                spare = (width - bw) / len(inner)
                inner = [w + spare for w in inner]
                groups.append((b.title, [x, y, width, bh], GROUP_COLORS.get(b.title, GROUP_COLOR)))
            cx = x if b.title is None else x + PAD
            for col, cw in zip(b.columns, inner, strict=True):
                cy = y if b.title is None else y + GROUP_HEADER + PAD
                for n in col:
                    places[n] = [cx, cy + NODE_TITLE, cw, sizes[n][1]]
                    cy += NODE_TITLE + sizes[n][1] + extra.get(n, 0) + NODE_GAP
                cx += cw + COLUMN_GAP // 2
            y += bh + GROUP_GAP
        bottom = max(bottom, y - GROUP_GAP)
        x += width + COLUMN_GAP
    return places, groups, x - COLUMN_GAP, bottom


def frame(width: float, height: float, x0: float = 0.0, y0: float = 0.0) -> dict:
    """The saved view (LiteGraph's DragAndScale: page = (canvas + offset) * scale) that centres the box
    [x0, y0, width, height] in VIEW, at scale 1 at most."""
    left, top, right, bottom = VIEW
    # half a canvas unit to spare: the offset below is rounded to 0.1, which must not push the box out of view
    scale = math.floor(min(1.0, (right - left) / (width + 0.5), (bottom - top) / (height + 0.5)) * 1000) / 1000
    offset = [round((left + right) / 2 / scale - (x0 + width / 2), 1), round((top + bottom) / 2 / scale - (y0 + height / 2), 1)]
    return {"scale": scale, "offset": offset}


def fit_scale(places: dict[str, list[float]]) -> float:
    """The scale the frontend's fitView picks for these nodes (LGraphCanvas.ds.fitToBounds, zoom 0.75, the
    nodes' bounding rectangles with their title bars, 10 px around)."""
    x0 = min(p[0] for p in places.values())
    y0 = min(p[1] - NODE_TITLE for p in places.values())
    x1 = max(p[0] + p[2] for p in places.values())
    y1 = max(p[1] + p[3] for p in places.values())
    return FIT_ZOOM * min(CANVAS[0] / max(x1 - x0 + 20, 300), CANVAS[1] / max(y1 - y0 + 20, 300))


def layout(nodes: dict[str, dict], prompt: dict) -> Layout:
    """Lay the built graph out: the Read me note, then the groups of GROUPS in that order, flowed into columns;
    of all the ways to cut the sequence into columns and groups into two sub-columns, the one whose view (saved,
    and as fitView frames it) is largest."""
    linked = {nid for nid, n in prompt.items() if isinstance(n["inputs"].get("text"), list)}
    sizes = {nid: node_size(n, nid in linked) for nid, n in nodes.items()}
    extra = {nid: CHART_ROOM for nid, n in nodes.items() if n["type"] in GUIDING}
    members: dict[str, list[str]] = {}
    for nid in sorted(nodes, key=int):
        g = node_group(nodes[nid])
        if g is not None:
            members.setdefault(g, []).append(nid)
    unknown = set(members) - set(GROUPS)
    if unknown:
        raise ValueError(f"no place for the groups {unknown}")
    note = [nid for nid, n in nodes.items() if n["type"] == "MarkdownNote"]
    titles = [g for g in GROUPS if g in members]
    best = None
    for split in itertools.product(*(_splits(members[g]) for g in titles)):
        blocks = [Block(None, [note]), *(Block(t, cols) for t, cols in zip(titles, split, strict=True))]
        for mask in range(1 << (len(blocks) - 1)):
            cut = [i for i in range(1, len(blocks)) if mask >> (i - 1) & 1]
            places, groups, width, height = _place(blocks, cut, sizes, extra)
            ds = frame(width, height)
            fitted = fit_scale(places)
            # the smaller of the two views; a group cut in two sub-columns must gain more than SPLIT_COST
            score = (min(ds["scale"], fitted) - SPLIT_COST * sum(len(b.columns) - 1 for b in blocks), ds["scale"])
            if best is None or score > best[0]:
                best = (score, Layout(places, groups, ds, fitted))
    return best[1]


# ---------------------------------------------------------------------------------------------------
# Building the graphs in the real frontend


# JS: load an API prompt, fix seeds, set the loaders' models, add the Read me note; returns each node's type,
# title and the smallest size the frontend gives it (computeSize).
JS_LOAD = """
const [api, models, note, name] = __args;
app.clean();  // the graph, and the previews and outputs the frontend keeps per node id
await app.loadApiJson(JSON.parse(JSON.stringify(api)), name + '.json');
// The frontend keeps widget values per node id across graphs (the root graph's id does not change): an input
// the prompt leaves out or links would keep the value a node of the same id had in the workflow built before.
// Such inputs get the node definition's default.
for (const n of app.graph._nodes) {
  const def = n.constructor.nodeData?.input ?? {};
  const given = api[String(n.id)]?.inputs ?? {};
  for (const w of (n.widgets || [])) {
    if (w.name === 'control_after_generate') { w.value = 'fixed'; continue; }
    const spec = def.required?.[w.name] ?? def.optional?.[w.name];
    if (!spec || (w.name in given && !Array.isArray(given[w.name]))) continue;
    const [kind, opts] = [spec[0], spec[1] ?? {}];
    const options = Array.isArray(kind) ? kind : (kind === 'COMBO' ? opts.options : null);
    if ('default' in opts) w.value = opts.default;
    else if (options && options.length) w.value = options[0];
    else if (kind === 'STRING') w.value = '';
  }
}
for (const [id, list] of Object.entries(models)) {
  const n = app.graph.getNodeById(+id);
  n.properties = n.properties || {};
  n.properties.models = list;
}
const LG = window.LiteGraph;
const nn = LG.createNode('MarkdownNote');
nn.title = 'Read me: models and use';
app.graph.add(nn);
nn.widgets[0].value = note;  // once added: adding gives the node an id, and with it a kept value
app.graph.setDirtyCanvas(true, true);
await new Promise(r => setTimeout(r, 600));
const out = {};
for (const n of app.graph._nodes) out[String(n.id)] = {type: n.type, title: n.title, min: Array.from(n.computeSize())};
return out;
"""

# JS: place the nodes, add the groups; returns the page's own serialisation {ui, api}.
JS_PLACE = """
const [places, groups, font] = __args;
const LG = window.LiteGraph;
for (const [id, [x, y, w, h]] of Object.entries(places)) {
  const n = app.graph.getNodeById(+id);
  n.pos = [x, y];
  n.setSize([w, h]);
}
for (const g of [...(app.graph._groups || app.graph.groups || [])]) app.graph.remove(g);
for (const [title, [x, y, w, h], color] of groups) {
  const g = new LG.LGraphGroup(title);
  g.color = color;
  g.font_size = font;
  app.graph.add(g);
  g.pos = [x, y];
  g.size = [w, h];
}
app.graph.setDirtyCanvas(true, true);
await new Promise(r => setTimeout(r, 400));
const ui = JSON.parse(JSON.stringify(app.graph.serialize()));
const p = await app.graphToPrompt();
return {ui, api: p.output};
"""


def fake_models_tree(root: Path) -> Path:
    """A models folder with an empty file under each real model name (the server only lists them), and its
    extra_model_paths.yaml."""
    folders = set()
    for wf_build in BUILDERS:
        wf = wf_build()
        for models in wf.api.models.values():
            for m in models:
                (root / m.directory).mkdir(parents=True, exist_ok=True)
                (root / m.directory / m.name).write_bytes(b"")
                folders.add(m.directory)
    for name in TAESD.values():  # the taesd decoders, so VAELoader's list looks as a user's does
        (root / "vae_approx").mkdir(parents=True, exist_ok=True)
        (root / "vae_approx" / name).write_bytes(b"")
    folders.add("vae_approx")
    yaml = root / "extra_model_paths.yaml"
    yaml.write_text("agg_build:\n" + f"    base_path: {json.dumps(str(root))}\n"
                    + "".join(f"    {d}: {d}/\n" for d in sorted(folders)))
    return yaml


def build_graphs(selected: set[str] | None) -> int:
    from agg_cli.comfy import LocalServer
    from agg_dev.browser import Browser, open_comfy

    work = Path(tempfile.mkdtemp(prefix="agg-build-"))
    yaml = fake_models_tree(work / "models")
    (WORKFLOWS / "api").mkdir(parents=True, exist_ok=True)
    server = LocalServer(COMFYUI, work / "server", extra_model_paths=yaml)
    inputs = server.dirs["input"]
    inputs.mkdir(parents=True, exist_ok=True)
    # the images the graphs load, in the server's input folder: the loaders' lists show them as a user's would
    for image in (source_picture(), *(ASSETS / asset for asset in (STYLE_IMAGE, EDIT_MASK, SOURCE_VIDEO))):
        (inputs / image.name).write_bytes(image.read_bytes())
    with server:
        available = set(json.loads(_get(server.url + "/object_info")))
        with Browser() as browser:
            open_comfy(browser, server)
            browser.set_window_size(1600, 1000)
            for wf in workflows(available):
                if selected and wf.name not in selected:
                    continue
                models = {nid: [m.entry() for m in ms] for nid, ms in wf.api.models.items()}
                nodes = browser.execute_async(JS_LOAD, wf.api.prompt, models, wf.note, wf.name)
                plan = layout(nodes, wf.api.prompt)
                res = browser.execute_async(JS_PLACE, plan.places, plan.groups, GROUP_FONT)
                res["ui"].setdefault("extra", {})["ds"] = plan.ds
                notes = [n["widgets_values"] for n in res["ui"]["nodes"] if n["type"] == "MarkdownNote"]
                if notes != [[wf.note]]:
                    raise RuntimeError(f"{wf.name}: the Read me note is not this workflow's: {notes}")
                api_out = res["api"]
                for node in api_out.values():  # Load Video's preview widget: the page's, not an input of the node
                    node["inputs"].pop(PREVIEW_WIDGET, None)
                for nid, node in wf.api.prompt.items():  # keep the titles written above
                    if "_meta" in node and nid in api_out:
                        api_out[nid]["_meta"] = node["_meta"]
                (WORKFLOWS / f"{wf.name}.json").write_text(json.dumps(res["ui"], indent=2) + "\n")
                (WORKFLOWS / "api" / f"{wf.name}.json").write_text(json.dumps(api_out, indent=2) + "\n")
                thumbnail(wf.card, WORKFLOWS / f"{wf.name}.jpg")
                print(f"wrote {wf.name}: {len(api_out)} nodes, {len(plan.groups)} groups, view scale "
                      f"{plan.ds['scale']}, fitted {plan.fit_scale:.3f}")
    return 0


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images-only", action="store_true", help="write the assets and thumbnails, not the graphs")
    ap.add_argument("names", nargs="*", help="workflows to rebuild (default: all)")
    args = ap.parse_args(argv)
    write_assets()
    if args.images_only:
        for wf in workflows():
            if (WORKFLOWS / f"{wf.name}.json").exists() and (not args.names or wf.name in args.names):
                thumbnail(wf.card, WORKFLOWS / f"{wf.name}.jpg")
        return 0
    return build_graphs(set(args.names) or None)


if __name__ == "__main__":
    raise SystemExit(main())
