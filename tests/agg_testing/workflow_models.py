"""The model files the example workflows (workflows/*.json) name, and the test fixtures that stand in for them.

One mapping, from the real names (agg_dev.workflow_models, re-exported here), for every test that loads or runs
the shipped workflows (tests/workflows, tests/browser):

- ``fixture_names(models)``: real file name -> the name of the fixture file that stands in for it in a models
  tree laid out by ``agg_testing.fixtures.models_dir`` and ``link_workflow_models``.
- ``link_workflow_models(models)``: links the fixtures only the workflows need into that tree: an SD3 checkpoint
  in the single-file form of ``sd3_medium_incl_clips_t5xxlfp8.safetensors`` (the SD3-shaped MMDiT, CLIP-L as its
  only text encoder and the 16-channel TAESD as its VAE, all from the cached agg_testing.sd3 files) and the
  Flux-shaped DiT, a CLIP vision encoder (ViT-L/14, random) in models/clip_vision and, in models/vae, the 16-channel taef1 pair as one VAE file standing in for Flux's VAE;
  the Flux.2 and Qwen-Image fixtures of agg_testing.families (DiTs, VAEs, taef2 and lighttaew2_1) and the Wan 2.1
  T2V fixture of agg_testing.wan.
- ``runnable(prompt, names)``: an API prompt with the real names replaced, and the text encoders the fixtures
  cannot serve as the workflows have them replaced (their encoders are built by ComfyUI at full size, out of reach
  of a CPU test): Flux's DualCLIPLoader (CLIP-L + T5-XXL) and Flux.2's CLIPLoader type ``flux2`` (Mistral 3 Small)
  become CLIPLoader type ``sd3`` with CLIP-L, the 4096-wide text path the Flux and Flux.2 fixtures are built for
  (agg_testing.sd3, agg_testing.families); Qwen-Image's prompts (CLIPTextEncode on CLIPLoader type
  ``qwen_image``, Qwen2.5-VL 7B) become ``AGGTestTextEmbedding`` nodes of Qwen-Image's context width on the same
  texts, and that CLIPLoader goes; Wan's (CLIPLoader type ``wan``, umt5-xxl) the same at Wan's context width 4096.
  Nothing else in the graph changes. ``AGGTestTextEmbedding`` is a test node
  (``agg_testing.families.register_nodes``): such prompts run in-process, not on a server.
- ``copy_shipped_images(input_dir)``: the images the workflows load from ComfyUI's input folder and the pack
  ships in web/assets/ (the style image, the edit mask, the video workflow's example clip).
- ``write_source_video(path)`` / ``video_frames(path)``: a small MP4 of agg_testing.wan's moving pattern (a clip
  the tests' tiny Wan model runs in seconds), and a video file's frames and frame rate (PyAV).

Without the CLIP-vision fixture in the models tree, ``runnable`` replaces CLIPVisionLoader by AGG CLIP Loader
(open_clip): Image Style Loss's ``clip`` takes either.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import torch

from agg_dev.workflow_models import (
    CANNY,
    CLIP_VISION,
    FLUX,
    FLUX2,
    FLUX2_TE,
    FLUX2_VAE,
    FLUX_CLIP_L,
    FLUX_T5,
    FLUX_VAE,
    OPEN_CLIP,
    QWEN,
    QWEN_TE,
    QWEN_VAE,
    SD3,
    SD15,
    SDXL,
    SOURCE_VIDEO,
    WAN,
    WAN_TE,
    WAN_VAE,
)
from agg_testing import fixtures as F

__all__ = ["CANNY", "CLIP_VISION", "FLUX", "FLUX2", "FLUX2_TE", "FLUX2_VAE", "FLUX_CLIP_L", "FLUX_T5", "FLUX_VAE",
           "OPEN_CLIP", "QWEN", "QWEN_TE", "QWEN_VAE", "SD3", "SD15", "SDXL", "SOURCE_VIDEO", "WAN", "WAN_TE",
           "WAN_VAE"]  # the real names (agg_dev.workflow_models), re-exported next to their fixtures

PACK = Path(__file__).resolve().parents[2]
ASSETS = PACK / "web" / "assets"

SD3_CHECKPOINT = "agg-tiny-sd3-all-in-one.safetensors"  # the fixture in SD3's single-file checkpoint form
FLUX_VAE_FILE = "agg-tiny-flux-vae.safetensors"  # the taef1 pair as one VAELoader file in models/vae
CLIP_VISION_FILE = "agg-clip-vision-vitl.safetensors"  # random CLIP ViT-L/14 vision tower (models/clip_vision)
_SEED_CLIP_VISION = 31


def sd3_checkpoint(*, cache_dir: Path | None = None) -> Path:
    """The SD3 fixture as one checkpoint (CheckpointLoaderSimple): ``model.diffusion_model.*`` (the tiny MMDiT),
    ``text_encoders.clip_l.transformer.*`` (CLIP-L; SD3 loads with any subset of its three text encoders) and
    ``first_stage_model.*`` (the 16-channel taesd3 pair with SD3's latent scale and shift)."""
    from safetensors.torch import load_file

    from agg_testing import sd3

    parts = {"mmdit": sd3.sd3_tiny().name, "clip_l": sd3.clip_l().name,
             **{k: v.name for k, v in sd3.taesd16("taesd3").items()}}

    def build() -> dict[str, dict[str, torch.Tensor]]:
        sd: dict[str, torch.Tensor] = {}
        for k, v in load_file(str(sd3.sd3_tiny())).items():
            sd["model.diffusion_model." + k] = v
        for k, v in load_file(str(sd3.clip_l())).items():
            sd["text_encoders.clip_l.transformer." + k] = v
        for part, path in sd3.taesd16("taesd3").items():
            for k, v in load_file(str(path)).items():
                sd[f"first_stage_model.taesd_{part}.{k}"] = v
        sd["first_stage_model.vae_scale"] = torch.tensor(1.5305)
        sd["first_stage_model.vae_shift"] = torch.tensor(0.0609)
        return {"": sd}

    return F._cached_files("sd3-all-in-one", parts, build, cache_dir)[""]


def flux_vae(*, cache_dir: Path | None = None) -> Path:
    """The 16-channel taef1 pair as one file for VAELoader (models/vae), with Flux's latent scale and shift, as
    VAELoader builds it from the two vae_approx files: the stand-in for Flux's ae.safetensors."""
    from safetensors.torch import load_file

    from agg_testing import sd3

    pair = sd3.taesd16("taef1")

    def build() -> dict[str, dict[str, torch.Tensor]]:
        sd = {f"taesd_{part}.{k}": v for part, path in pair.items() for k, v in load_file(str(path)).items()}
        sd["vae_scale"] = torch.tensor(0.3611)
        sd["vae_shift"] = torch.tensor(0.1159)
        return {"": sd}

    return F._cached_files("flux-vae", {k: v.name for k, v in pair.items()}, build, cache_dir)[""]


def clip_vision(*, cache_dir: Path | None = None) -> Path:
    """A CLIP vision encoder for CLIPVisionLoader: ComfyUI's ViT-L/14 (224 px) in its own key layout, random weights
    in fp16 (304M parameters, ~600 MB). ComfyUI recognises CLIP vision files by their depth (ViT-L: 24 layers,
    ViT-H: 32, ViT-bigG: 48), so ViT-L is the smallest it loads; it stands in for IPAdapter's ViT-H encoder."""

    def build() -> dict[str, dict[str, torch.Tensor]]:
        import comfy.clip_vision

        config = Path(comfy.clip_vision.__file__).parent / "clip_vision_config_vitl.json"
        shapes = F.meta_shapes(lambda: comfy.clip_vision.ClipVisionModel(str(config)).model)
        return {"": F.random_state_dict(shapes, _SEED_CLIP_VISION, F.std_constant(0.02), torch.float16)}

    return F._cached_files("clip-vision-vitl", {"config": "clip_vision_config_vitl"}, build, cache_dir)[""]


def link_workflow_models(models: F.ModelsTree, *, flux: bool = True) -> None:
    """Link the SD3 single-file checkpoint (and, with `flux`, the Flux DiT), the Flux.2 and Qwen-Image fixtures
    into the models tree."""
    from agg_testing import families, sd3, wan

    families.link_flux2(models.root)
    families.link_qwen(models.root)
    wan.link_wan(models.root)

    F._link(sd3_checkpoint(), models.root / "checkpoints" / SD3_CHECKPOINT)
    F._link(flux_vae(), models.root / "vae" / FLUX_VAE_FILE)
    F._link(clip_vision(), models.root / "clip_vision" / CLIP_VISION_FILE)
    sd3.link_flow_models(models.root, flux=flux)


def fixture_names(models: F.ModelsTree) -> dict[str, str]:
    """Real model file name -> the fixture name that stands in for it (after link_workflow_models)."""
    from agg_testing import families, sd3, wan

    names = {
        SD15: models.checkpoint,
        SDXL: models.checkpoint,  # the SD1.5 test checkpoint: no SDXL-architecture fixture
        OPEN_CLIP: models.open_clip,
        CANNY: models.controlnet,
        SD3: SD3_CHECKPOINT,
        FLUX: sd3.FLUX_DIFFUSION_MODEL,
        FLUX_CLIP_L: sd3.CLIP_L,
        FLUX_T5: sd3.CLIP_L,  # replaced by runnable(): see the module docstring
        FLUX_VAE: FLUX_VAE_FILE,
        FLUX2: families.FLUX2_DIFFUSION_MODEL,
        FLUX2_TE: sd3.CLIP_L,  # replaced by runnable()
        FLUX2_VAE: families.FLUX2_VAE,
        QWEN: families.QWEN_DIFFUSION_MODEL,
        QWEN_TE: sd3.CLIP_L,  # its loader is removed by runnable()
        QWEN_VAE: families.QWEN_VAE,
        WAN: wan.WAN_DIFFUSION_MODEL,
        WAN_TE: sd3.CLIP_L,  # its loader is removed by runnable()
        WAN_VAE: wan.WAN_VAE,
    }
    if (models.root / "clip_vision" / CLIP_VISION_FILE).exists():
        names[CLIP_VISION] = CLIP_VISION_FILE
    return names


def substitute(obj, names: dict[str, str]):
    """Deep copy of a JSON value with every string equal to a key of `names` replaced."""
    if isinstance(obj, dict):
        return {k: substitute(v, names) for k, v in obj.items()}
    if isinstance(obj, list):
        return [substitute(v, names) for v in obj]
    if isinstance(obj, str):
        return names.get(obj, obj)
    return obj


def runnable(prompt: dict, names: dict[str, str]) -> dict:
    """An API prompt that runs on the fixtures: names substituted, the text encoders replaced (module docstring)."""
    from agg_testing import sd3, wan

    p = substitute(copy.deepcopy(prompt), names)
    # text encoders built at full size whatever the file holds -> the context width their prompts have
    widths = {"qwen_image": None, "wan": wan.WAN_CONTEXT_DIM}  # None: AGGTestTextEmbedding's default (Qwen's)
    replaced = {nid: n["inputs"]["type"] for nid, n in p.items()
                if n["class_type"] == "CLIPLoader" and n["inputs"].get("type") in widths}
    for nid in replaced:
        del p[nid]
    for node in p.values():
        if node["class_type"] == "CLIPTextEncode" and node["inputs"]["clip"][0] in replaced:
            width = widths[replaced[node["inputs"]["clip"][0]]]
            node["class_type"] = "AGGTestTextEmbedding"
            node["inputs"] = {"text": node["inputs"]["text"], "tokens": 8, **({"width": width} if width else {})}
        if (node["class_type"] == "DualCLIPLoader" and node["inputs"].get("type") == "flux") or (
                node["class_type"] == "CLIPLoader" and node["inputs"].get("type") == "flux2"):
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": sd3.CLIP_L, "type": "sd3"}
        if node["class_type"] == "CLIPVisionLoader" and node["inputs"].get("clip_name") not in names.values():
            # no CLIP-vision fixture in this models tree: Image Style Loss's `clip` also takes AGG CLIP Loader's
            node["class_type"] = "AGGCLIPLoader"
            node["inputs"] = {"clip_name": names[OPEN_CLIP], "architecture": "auto"}
    return p


def unserved(names: dict[str, str]) -> set[str]:
    """Real model names the workflows use that have no fixture in this tree (runnable() replaces their loader)."""
    return {CLIP_VISION} - set(names)


SHIPPED_IMAGES = ("agg_style.png", "agg_edit_mask.png", SOURCE_VIDEO)  # generated by scripts/build_workflows.py


def shipped_images() -> list[Path]:
    return [ASSETS / name for name in SHIPPED_IMAGES]


def copy_shipped_images(input_dir: Path) -> list[Path]:
    """Copy the pack's shipped example images into a ComfyUI input folder (a test's own); returns the copies."""
    out = []
    for src in shipped_images():
        dst = Path(input_dir) / src.name
        if not dst.exists():
            shutil.copyfile(src, dst)
        out.append(dst)
    return out


def write_source_video(path: Path, frames: int = 17, size: int = 32, fps: int = 16) -> Path:
    """An H.264 MP4 of agg_testing.wan's moving pattern (`frames` frames of `size` px at `fps`), for Load Video:
    17 frames at 16 fps (about 1 s) stay whole through the video workflow's 2 s trim and the Wan VAE (4k + 1)."""
    import av
    import numpy as np

    from agg_testing import wan

    clip = (wan.moving_pattern(frames, size, size).numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.options = {"crf": "10"}  # near-lossless: the frames the workflow reads are the pattern's
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def video_frames(path: Path) -> tuple[np.ndarray, float]:
    """A video file's frames ([T, H, W, 3] uint8) and frame rate, read with PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate or stream.guessed_rate or 0)
