"""Wan 2.1 text-to-video fixture: a tiny random-weight WanModel, generated at test time, and a source clip.

Generated like agg_testing.families (ComfyUI's own class on the meta device for the keys and shapes, every tensor
seeded by (component seed, key), one metadata entry, cached under ``$AGG_HOME/fixtures``) and laid out as a user
would, for ComfyUI's own loaders:

- ``agg-tiny-wan21.safetensors`` (models/diffusion_models, UNETLoader): ComfyUI's WanModel (comfy.ldm.wan.model)
  with one block. model_detection's Wan 2.1 branch (``head.modulation``) reads the width from it and the head
  count as width / 128, the FFN width from ``blocks.0.ffn.0``, the input channels from ``patch_embedding`` and the
  depth from the block count; no ``img_emb`` makes it text-to-video. Width 128 (one head), FFN 256, one block is a
  ~0.9M-parameter Wan 2.1 T2V, most of it the text embedding's 4096 -> 128 projection. ComfyUI loads it as WAN21:
  ModelSamplingDiscreteFlow (CONST) with the WAN21_T2V default shift 8, the Wan21 latent format (16 channels,
  per-channel mean and std, 4x temporal and 8x spatial compression: 4k + 1 frames -> [B, 16, k + 1, H/8, W/8]);
  the model patchifies at (1, 2, 2).
- ``agg-wan21-vae.safetensors`` (models/vae, VAELoader): families.wan_vae(), the Wan 2.1 VAE at base width 16.
- ``lighttaew2_1.safetensors`` (models/vae_approx): families.lighttaew(), ComfyUI's tiny Wan 2.1 decoder.

ComfyUI 0.3.75 loads all three (the VAE's width read from the file); 0.3.52 builds the Wan VAE at its full base
width 96 whatever the file holds and has no TAEHV, so these fixtures need ComfyUI 0.3.75 or later.

Wan's text encoder is umt5-xxl, which ComfyUI builds at its fixed size (~5.7B parameters): out of reach of a CPU
test. Prompts come from families.AGGTestTextEmbedding at width 4096 (WAN_CONTEXT_DIM, the WanModel's fixed
``text_dim``).

The source clip: ``AGGTestMovingClip`` makes an IMAGE batch [frames, H, W, 3] of a pattern that moves from frame
to frame (a bright disc travelling across colour bands); VAEEncode with the Wan VAE turns 17 such frames into a
[1, 16, 5, H/8, W/8] latent, a five-frame video latent whose frames differ.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from agg_testing import families
from agg_testing import fixtures as F

_SEED_WAN = 37

WAN_DIFFUSION_MODEL = "agg-tiny-wan21.safetensors"
WAN_VAE = "agg-wan21-vae.safetensors"
WAN_CONTEXT_DIM = 4096

# model_detection's Wan 2.1 branch at width 128 (one head); the rest are the branch's fixed values.
WAN_CONFIG: dict = {
    "image_model": "wan2.1",
    "model_type": "t2v",
    "dim": 128,
    "num_heads": 1,
    "ffn_dim": 256,
    "num_layers": 1,
    "in_dim": 16,
    "out_dim": 16,
    "patch_size": (1, 2, 2),
    "freq_dim": 256,
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}

# std 0.02 as the other DiT fixtures, but the output head reads a LayerNorm'd width-128 feature: at 0.02 the
# velocity would be ~0.2 and D ~ x (the denoiser nearly the identity); at 1/sqrt(128) it is O(1), so the
# prediction depends on x, the timestep and the prompt.
WAN_STD = 0.02
WAN_HEAD_STD = 1.0 / math.sqrt(128)


def wan_shapes() -> dict[str, tuple[int, ...]]:
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    config = {k: v for k, v in WAN_CONFIG.items() if k != "image_model"}
    return F.meta_shapes(lambda: WanModel(**config, operations=comfy.ops.disable_weight_init))


def _wan_std(key: str, shape: tuple[int, ...]) -> float:
    return WAN_HEAD_STD if key.startswith("head.head.") else WAN_STD


def wan_state_dict() -> dict[str, torch.Tensor]:
    return F.random_state_dict(wan_shapes(), _SEED_WAN, _wan_std, torch.bfloat16)


def wan_tiny(cache_dir: Path | None = None) -> Path:
    params = {"wan": WAN_CONFIG, "std": WAN_STD, "head_std": WAN_HEAD_STD}
    return F._cached_files("wan21-tiny", params, lambda: {"": wan_state_dict()}, cache_dir)[""]


def link_wan(root: Path) -> None:
    """diffusion_models/ (Wan 2.1 T2V), vae/ (Wan 2.1 VAE), vae_approx/ (lighttaew2_1)."""
    root = Path(root)
    F._link(wan_tiny(), root / "diffusion_models" / WAN_DIFFUSION_MODEL)
    F._link(families.wan_vae(), root / "vae" / WAN_VAE)
    F._link(families.lighttaew(), root / "vae_approx" / families.LIGHTTAEW)


# ---------------------------------------------------------------------------------------------------
# A source clip


def moving_pattern(frames: int = 17, height: int = 32, width: int = 32) -> torch.Tensor:
    """IMAGE [frames, height, width, 3] in 0..1: diagonal colour bands drifting one way and a bright disc
    crossing the frame the other way, so every frame differs from the last."""
    t = torch.arange(frames, dtype=torch.float32).reshape(-1, 1, 1)
    y = torch.linspace(0, 1, height).reshape(1, -1, 1)
    x = torch.linspace(0, 1, width).reshape(1, 1, -1)
    phase = 2 * math.pi * (x + 0.5 * y - t / max(frames, 1))
    bands = torch.stack([0.5 + 0.35 * torch.sin(phase + k * 2 * math.pi / 3) for k in range(3)], dim=-1)
    cx = 0.8 - 0.6 * t / max(frames - 1, 1)
    disc = (((x - cx) ** 2 + (y - 0.5) ** 2) < 0.04).float().unsqueeze(-1)
    return (bands * (1 - disc) + 0.95 * disc).clamp(0, 1)


class AGGTestMovingClip:
    """-> IMAGE batch of moving_pattern frames (a clip for VAEEncode with a video VAE)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"frames": ("INT", {"default": 17, "min": 1, "max": 257}),
                             "width": ("INT", {"default": 32, "min": 8, "max": 1024, "step": 8}),
                             "height": ("INT", {"default": 32, "min": 8, "max": 1024, "step": 8})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "AGG/testing"

    def make(self, frames, width, height):
        return (moving_pattern(frames, height, width),)


def register_nodes() -> None:
    """AGGTestMovingClip and families' AGGTestTextEmbedding."""
    import nodes

    families.register_nodes()
    nodes.NODE_CLASS_MAPPINGS.setdefault("AGGTestMovingClip", AGGTestMovingClip)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault("AGGTestMovingClip", "AGGTestMovingClip")
