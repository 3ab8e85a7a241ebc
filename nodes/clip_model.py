"""AGG CLIP Loader: open_clip models from local safetensors files, never the network."""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.v0_0_2 import io

from .settings import AGGError
from .types import AGGClipType
from .weights import (
    cast_text_tower,
    gradient_capable,
    gradient_copy,
    load_ordinary,
    ordinary_tensors,
    vision_embedding,
)

FOLDER = "open_clip"
LISTED_EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}  # listed so a wrong format gets a clear error
CONFIG_METADATA_KEY = "open_clip_config"
TEXT_CACHE_SIZE = 64
ARCHITECTURES = ["auto", "ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14", "ViT-L-14-quickgelu", "ViT-H-14"]


def register_folder() -> None:
    """models/open_clip, plus any paths extra_model_paths.yaml gives under `open_clip:`."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=False)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | LISTED_EXTENSIONS)


def count_blocks(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def infer_config(sd: dict) -> dict:
    """An open_clip CLIP config read off a ViT state dict's tensor shapes (64-wide attention heads)."""
    try:
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vocab, text_width = sd["token_embedding.weight"].shape
        embed_dim = sd["text_projection"].shape[1]
        mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width
    except KeyError as e:
        raise ValueError(f"not an open_clip ViT state dict (missing {e}); choose the architecture explicitly") from None
    return {
        "embed_dim": int(embed_dim),
        "vision_cfg": {
            "image_size": int(grid * patch), "patch_size": int(patch), "width": int(width),
            "layers": count_blocks(sd, "visual.transformer.resblocks."),
            "head_width": 64 if width % 64 == 0 else int(width), "mlp_ratio": float(mlp),
        },
        "text_cfg": {
            "context_length": int(sd["positional_embedding"].shape[0]), "vocab_size": int(vocab),
            "width": int(text_width), "heads": max(1, int(text_width) // 64),
            "layers": count_blocks(sd, "transformer.resblocks."),
        },
    }


class WholeModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ModelPatcher for a plain torch module (open_clip's layers are not comfy.ops, which is what ComfyUI's
    partial loading relies on): ComfyUI loads, counts and offloads it whole, never in part."""

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        return super().load(device_to, lowvram_model_memory=lowvram_model_memory,
                            force_patch_weights=force_patch_weights, full_load=True)

    def partially_load(self, *args, **kwargs) -> int:
        return 0

    def partially_unload(self, *args, **kwargs) -> int:
        return 0  # nothing freed in part: ComfyUI then offloads the whole model


def models_in_use() -> list:
    """The models ComfyUI loaded for the work under way (the sampler's UNet, ControlNets): kept loaded when
    another model is loaded mid-run (ComfyUI's ControlNet does the same)."""
    return list(comfy.model_management.loaded_models(only_currently_used=True))


def text_dtype_for(device: torch.device) -> torch.dtype:
    """The text tower's dtype: ComfyUI's text-encoder dtype on a GPU (fp16 unless told otherwise; the text
    embeddings are inference only), float32 on the CPU."""
    if comfy.model_management.is_device_cpu(device):
        return torch.float32
    dtype = comfy.model_management.text_encoder_dtype(device)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16


class AGGClip:
    """An open_clip model with text-embedding cache; the encoders the CLIP losses call.

    The model is under ComfyUI's model management (`patcher`: load device = ComfyUI's torch device, offload
    device = its text-encoder offload device): loading it counts its memory, keeps the sampler's models loaded
    and lets ComfyUI offload it under pressure. The text tower runs in ComfyUI's text-encoder dtype on a GPU;
    the image tower, which the losses differentiate through, stays float32.
    """

    def __init__(self, model: torch.nn.Module, name: str, load_device: torch.device | None = None,
                 offload_device: torch.device | None = None, text_dtype: torch.dtype | None = None):
        mm = comfy.model_management
        self.model = model.eval()
        self.name = name
        self.image_size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list)) else model.visual.image_size)
        self.context_length = int(getattr(model, "context_length", 77))
        self._text_cache: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        load_device = load_device or mm.get_torch_device()
        offload_device = offload_device or mm.text_encoder_offload_device()
        with ordinary_tensors():
            self.model.to(offload_device)
            self.text_dtype = text_dtype or text_dtype_for(load_device)
            cast_text_tower(self.model, self.text_dtype)
        self.patcher = WholeModelPatcher(self.model, load_device=load_device, offload_device=offload_device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load(self) -> AGGClip:
        """On ComfyUI's torch device, through its model management, beside the models in use."""
        load_ordinary([*models_in_use(), self.patcher])
        gradient_capable(self.model.visual)
        return self

    def unload(self) -> AGGClip:
        """Back to the offload device, through ComfyUI's model management (which forgets it as loaded)."""
        mm = comfy.model_management
        with ordinary_tensors():  # weights moved back stay usable by autograd on the next load
            for i, loaded in enumerate(mm.current_loaded_models):
                if loaded.model is self.patcher:
                    mm.current_loaded_models.pop(i).model_unload()
                    break
            else:
                if self.device != self.patcher.offload_device:
                    self.patcher.detach()
        return self

    def to(self, device: torch.device) -> AGGClip:
        """The losses' API: `to(run device)` loads, `to(another device)` hands it back for offloading."""
        device = torch.device(device)
        if device.type == self.patcher.load_device.type:
            return self.load()
        if device.type == self.patcher.offload_device.type:
            return self.unload()
        raise ValueError(f"AGG CLIP: device {device} is neither ComfyUI's torch device {self.patcher.load_device} "
                         f"nor its offload device {self.patcher.offload_device}")

    def loaded(self) -> bool:
        """On the load device and registered with ComfyUI's model management."""
        return self.device == self.patcher.load_device and any(
            m.model is self.patcher for m in comfy.model_management.current_loaded_models)

    def on_load_device(self) -> AGGClip:
        return self if self.loaded() else self.load()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """[T, D] float32 text embeddings (cached per prompt list; no gradient)."""
        import open_clip

        key = tuple(texts)
        if key in self._text_cache:
            self._text_cache.move_to_end(key)
            return self._text_cache[key].to(self.device)
        self.on_load_device()
        with ordinary_tensors(), torch.no_grad():  # cached embeddings: constants the losses' autograd may save
            tokens = open_clip.tokenize(list(texts), context_length=self.context_length).to(self.device)
            emb = self.model.encode_text(tokens).float()
        self._text_cache[key] = emb.cpu()
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return emb

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-normalized [N, 3, s, s] -> [N, D], differentiable w.r.t. the images."""
        self.on_load_device()
        p = next(self.model.visual.parameters())
        return self.model.encode_image(images.to(device=p.device, dtype=p.dtype)).float()

    def clear_cache(self) -> None:
        self._text_cache.clear()


# OpenAI CLIP's input statistics: what the losses' cut-outs are normalised with (agg_kernels.augment).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionClip:
    """ComfyUI's CLIP_VISION (CLIPVisionLoader: the image encoders IPAdapter users keep in models/clip_vision)
    as the image encoder the style loss calls; its projected image embedding (what IPAdapter reads as
    image_embeds) is the embedding.

    The weights stay ComfyUI's: its model management loads the CLIP vision model (beside the models in use),
    and the loss differentiates through ordinary tensors on the same memory (weights.gradient_copy), made when
    the loss needs them and dropped when it hands the model back. The network runs on ComfyUI's load device;
    weights ComfyUI left elsewhere (a partial load, or Dynamic VRAM, which streams them from the offload device
    per layer) are copied there once. On the CPU the network runs in float32 (a copy only where ComfyUI keeps
    half precision)."""

    def __init__(self, clip_vision) -> None:
        self.source = clip_vision
        self.name = type(clip_vision).__name__
        self.image_size = int(getattr(clip_vision, "image_size", 224))
        self.mean = tuple(getattr(clip_vision, "image_mean", OPENAI_MEAN))
        self.std = tuple(getattr(clip_vision, "image_std", OPENAI_STD))
        self._net: torch.nn.Module | None = None

    def _network(self) -> torch.nn.Module:
        if self._net is None:
            patcher = getattr(self.source, "patcher", None)
            if patcher is not None:
                load_ordinary([*models_in_use(), patcher])
            p = next(self.source.model.parameters())
            # ComfyUI's load device, not where the first weight happens to lie: a partial (lowvram) load, or
            # Dynamic VRAM's streaming, leaves weights on the offload device, which the copy must not run on.
            device = torch.device(getattr(patcher, "load_device", None) or p.device)
            dtype = torch.float32 if device.type == "cpu" else getattr(self.source, "dtype", p.dtype)
            self._net = gradient_copy(self.source.model, device, dtype)
        return self._net

    @property
    def device(self) -> torch.device:
        return next(self._network().parameters()).device

    def to(self, device: torch.device) -> VisionClip:
        """The losses' API: to the run's device makes the network ready; to the CPU after a GPU run lets go of
        it (ComfyUI offloads the model itself)."""
        if torch.device(device).type == "cpu" and self._net is not None and self.device.type != "cpu":
            self._net = None
        else:
            self._network()
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP-normalized (OpenAI statistics) [N, 3, s, s] -> [N, D], differentiable w.r.t. the images."""
        net = self._network()
        p = next(net.parameters())
        x = images.to(device=p.device, dtype=p.dtype)
        if self.mean != OPENAI_MEAN or self.std != OPENAI_STD:  # e.g. SigLIP's 0.5 / 0.5
            def stat(v):
                return torch.tensor(v, device=x.device, dtype=x.dtype).reshape(1, 3, 1, 1)

            x = (x * stat(OPENAI_STD) + stat(OPENAI_MEAN) - stat(self.mean)) / stat(self.std)
        return vision_embedding(net, x).float()


def is_clip_vit(clip_vision) -> bool:
    """ComfyUI's CLIP_VISION holds a CLIP ViT (clip_vision_model: the ViT-L / H / bigG encoders IPAdapter uses)."""
    vm = getattr(getattr(clip_vision, "model", None), "vision_model", None)
    emb = getattr(vm, "embeddings", None)
    return emb is not None and getattr(emb, "class_embedding", None) is not None and hasattr(vm, "encoder")


def image_encoder(clip, node: str) -> AGGClip | VisionClip:
    """The `clip` input of an image loss: AGG CLIP Loader's model, or ComfyUI's CLIP_VISION."""
    if isinstance(clip, (AGGClip, VisionClip)):
        return clip
    if hasattr(clip, "encode_image") and isinstance(getattr(clip, "model", None), torch.nn.Module):
        if not is_clip_vit(clip):
            raise AGGError(f"{node}: input 'clip': this CLIP vision model is not a CLIP ViT (SigLIP and DINOv2 "
                           "encoders are not supported); load a CLIP ViT such as CLIP-ViT-H-14-laion2B-s32B-b79K.")
        return VisionClip(clip)
    raise AGGError(f"{node}: input 'clip' must come from AGG CLIP Loader or Load CLIP Vision; got {type(clip).__name__}.")


def load_open_clip(path: str, architecture: str = "auto") -> AGGClip:
    import open_clip
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    sd = load_file(path)
    with ordinary_tensors():
        if architecture == "auto":
            cfg = json.loads(meta[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in meta else infer_config(sd)
            model = open_clip.model.CLIP(**cfg)
        else:
            model = open_clip.create_model(architecture, pretrained=None)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("attn_mask")]
        if missing or unexpected:
            raise ValueError(f"weights do not fit {architecture}: missing {missing[:4]}, unexpected {unexpected[:4]}")
        for p in model.parameters():
            p.requires_grad_(False)
    return AGGClip(model, os.path.basename(path))


class AGGCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AGGCLIPLoader",
            display_name="AGG CLIP Loader",
            category="AGG/loaders",
            description="Loads an open_clip model (e.g. ViT-B-32) from models/open_clip for the CLIP losses. "
            "Reads .safetensors only and never downloads anything.",
            inputs=[
                io.Combo.Input("clip_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="An open_clip weights file in models/open_clip (e.g. open_clip_model.safetensors "
                               "from laion/CLIP-ViT-B-32-laion2B-s34B-b79K)."),
                io.Combo.Input("architecture", options=ARCHITECTURES, default="auto", optional=True,
                               tooltip="auto reads the architecture from the tensors (GELU ViTs such as the LAION ones); "
                               "pick a -quickgelu variant for OpenAI's original weights."),
            ],
            outputs=[AGGClipType.Output(tooltip="The CLIP model for CLIP Direction Loss and Image Style Loss.")],
        )

    @classmethod
    def execute(cls, clip_name, architecture="auto") -> io.NodeOutput:
        node = "AGG CLIP Loader"
        path = folder_paths.get_full_path(FOLDER, clip_name)
        if path is None or not os.path.isfile(path):
            raise AGGError(f"{node}: input 'clip_name': {clip_name!r} is not in models/{FOLDER}.")
        if not clip_name.lower().endswith(".safetensors"):
            raise AGGError(f"{node}: input 'clip_name': {clip_name!r} is not a .safetensors file. AGG loads open_clip "
                           "weights from safetensors only (pickled .bin/.pt files can run code when loaded); use the "
                           "model's open_clip_model.safetensors.")
        try:
            clip = load_open_clip(path, architecture)
        except Exception as e:
            raise AGGError(f"{node}: input 'clip_name': could not load {clip_name!r} as open_clip {architecture}: {e}") from e
        return io.NodeOutput(clip)  # on the offload device, loaded by ComfyUI's model management when used
