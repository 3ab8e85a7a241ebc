"""16-channel flow-model fixtures: an SD3-shaped MMDiT, a Flux-shaped DiT, their TAESD files and CLIP-L.

Generated like the fixtures in agg_testing.fixtures (ComfyUI's own classes on the meta device for the keys
and shapes, every tensor seeded by (component seed, key), one metadata entry, cached under
``$AGG_HOME/fixtures``), and laid out as a user would: the diffusion models in ``models/diffusion_models``
(UNETLoader), the text encoder in ``models/text_encoders`` (CLIPLoader), the 16-channel TAESD pairs
``taesd3_*`` / ``taef1_*`` in ``models/vae_approx`` (VAELoader lists them as ``taesd3`` / ``taef1``, the
``taesd`` decoder option of the loss nodes reads them).

What each file is:

- ``agg-tiny-sd3.safetensors``: ComfyUI's MMDiT (the SD3 architecture; model_detection reads the depth
  from ``x_embedder`` and gives hidden size 64 * depth) with depth 2 (hidden 128, two joint blocks, the
  last one context pre-only), 16 latent channels, patch 2, SD3's pooled (2048) and context (4096 ->
  hidden) embedders and a sin-cos position table of 16 x 16 patches (latents up to 32 x 32, i.e. 256 px).
  ComfyUI detects it as SD3: ModelSamplingDiscreteFlow (CONST, shift 3) and the SD3 latent format.
- ``agg-tiny-flux.safetensors``: ComfyUI's Flux DiT with one double and one single block. Flux fixes the
  head width by its rotary axes (16 + 56 + 56 = 128) and the head count (24), so the width is 3072 and the
  two blocks alone hold ~500M parameters (~1.1 GB in bf16): generated only when a test asks for it.
  Guidance embedding on (Flux dev: FluxGuidance, cfg 1). Its text input takes the 4096-wide context of
  the SD3 text-encoder path and its vector input that path's 2048-wide pooled output (ComfyUI reads both
  widths from the weights): T5-XXL's 4.7B parameters are out of reach of a CPU test.
- ``agg-clip-l.safetensors``: the CLIP-L text encoder (same weights as in the SD1.5 test checkpoint) as a
  standalone file. ``CLIPLoader(type="sd3")`` loads it through ComfyUI's SD3 text-encoder class with only
  CLIP-L present (a configuration SD3 supports): context [B, 77, 4096] (CLIP-L's hidden states, zero
  padded), pooled [B, 2048].
- ``taesd3_{encoder,decoder}`` / ``taef1_{encoder,decoder}``: TAESD with 16 latent channels (the
  architecture of the published taesd3 / taef1 files), different weights each.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from agg_testing import fixtures as F

# Component seeds (distinct from those in agg_testing.fixtures).
_SEED_MMDIT = 21
_SEED_TAESD3 = 22
_SEED_TAEF1 = 23
_SEED_FLUX = 24

SD3_DIFFUSION_MODEL = "agg-tiny-sd3.safetensors"
FLUX_DIFFUSION_MODEL = "agg-tiny-flux.safetensors"
CLIP_L = "agg-clip-l.safetensors"
TAE_NAMES = ("taesd3", "taef1")  # VAELoader's names of the 16-channel TAESD pairs in vae_approx

# SD3's key layout at depth 2. Detection: in_channels 16 (SD3), depth = x_embedder width / 64, patch size
# from the x_embedder kernel, adm_in_channels from y_embedder, the context embedder from its weight,
# pos_embed_max_size = sqrt(num_patches).
MMDIT_DEPTH = 2
MMDIT_POS_EMBED_MAX = 16
MMDIT_CONFIG: dict = {
    "input_size": None,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "depth": MMDIT_DEPTH,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": 4096, "out_features": 64 * MMDIT_DEPTH}},
    "num_patches": MMDIT_POS_EMBED_MAX**2,
    "pos_embed_max_size": MMDIT_POS_EMBED_MAX,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}

# Flux dev's layout (model_detection's Flux branch) with one double and one single block; context and
# vector widths as the SD3 text-encoder path delivers them (see the module docstring).
FLUX_CONFIG: dict = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "hidden_size": 3072,
    "num_heads": 24,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "context_in_dim": 4096,
    "vec_in_dim": 2048,
    "depth": 1,
    "depth_single_blocks": 1,
    "guidance_embed": True,
}


# ---------------------------------------------------------------------------------------------------
# Shapes from ComfyUI's own classes


def mmdit_shapes(config: Mapping = MMDIT_CONFIG) -> dict[str, tuple[int, ...]]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    return F.meta_shapes(lambda: MMDiT(**config, operations=comfy.ops.disable_weight_init))


def flux_shapes(config: Mapping = FLUX_CONFIG) -> dict[str, tuple[int, ...]]:
    import comfy.ops
    from comfy.ldm.flux.model import Flux, FluxParams

    # ComfyUI 0.33 added FluxParams.txt_ids_dims (no default; empty for FLUX.1, as its model detection sets it)
    if "txt_ids_dims" in FluxParams.__dataclass_fields__ and "txt_ids_dims" not in config:
        config = {**config, "txt_ids_dims": []}
    return F.meta_shapes(lambda: Flux(**config, operations=comfy.ops.disable_weight_init))


def clip_l_file_shapes() -> dict[str, tuple[int, ...]]:
    """CLIPTextModel's keys as a standalone clip_l file has them (text_model.* and text_projection)."""
    import comfy.clip_model
    import comfy.ops

    cfg_path = Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json"
    config = json.loads(cfg_path.read_text())
    return F.meta_shapes(
        lambda: comfy.clip_model.CLIPTextModel(config, torch.float32, None, comfy.ops.disable_weight_init)
    )


def taesd16_shapes() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    from comfy.taesd.taesd import Decoder, Encoder

    return F.meta_shapes(lambda: Encoder(16)), F.meta_shapes(lambda: Decoder(16))


# ---------------------------------------------------------------------------------------------------
# State dicts


def mmdit_state_dict() -> dict[str, torch.Tensor]:
    """The tiny MMDiT in fp16 (as sd3_medium is published); pos_embed is SD3's fixed sin-cos table."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    hidden = 64 * MMDIT_DEPTH
    table = get_2d_sincos_pos_embed(hidden, MMDIT_POS_EMBED_MAX)
    constants = {"pos_embed": torch.from_numpy(table).float()[None]}
    return F.random_state_dict(mmdit_shapes(), _SEED_MMDIT, F.std_constant(0.02), torch.float16, constants=constants)


def flux_state_dict() -> dict[str, torch.Tensor]:
    """The one-double, one-single-block Flux in bf16 (as flux1-dev is published)."""
    return F.random_state_dict(flux_shapes(), _SEED_FLUX, F.std_constant(0.02), torch.bfloat16)


def clip_l_state_dict() -> dict[str, torch.Tensor]:
    # The SD1.5 test checkpoint's CLIP-L seed: same weights for the same keys.
    return F.random_state_dict(clip_l_file_shapes(), F._SEED_CLIP_L, F.std_constant(0.02), torch.float16)


def taesd16_state_dicts(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    enc, dec = taesd16_shapes()
    std = F.std_fan_in(1.0)
    return F.random_state_dict(enc, seed, std), F.random_state_dict(dec, seed + 100, std)


# ---------------------------------------------------------------------------------------------------
# Cached files


def sd3_tiny(*, cache_dir: Path | None = None) -> Path:
    """The SD3-shaped MMDiT (UNETLoader format: bare keys), ~2M parameters."""
    return F._cached_files("sd3-tiny-mmdit", {"mmdit": MMDIT_CONFIG},
                           lambda: {"": mmdit_state_dict()}, cache_dir)[""]


def flux_tiny(*, cache_dir: Path | None = None) -> Path:
    """The Flux-shaped DiT (one double, one single block at width 3072), ~550M parameters, ~1.1 GB."""
    return F._cached_files("flux-1x1", {"flux": FLUX_CONFIG}, lambda: {"": flux_state_dict()}, cache_dir)[""]


def clip_l(*, cache_dir: Path | None = None) -> Path:
    """CLIP-L (random, 123M parameters) as a standalone text-encoder file."""
    return F._cached_files("clip-l", {}, lambda: {"": clip_l_state_dict()}, cache_dir)[""]


def taesd16(name: str, *, cache_dir: Path | None = None) -> dict[str, Path]:
    """{"encoder": path, "decoder": path} of the 16-channel TAESD pair `name` ("taesd3" or "taef1")."""
    seeds = {"taesd3": _SEED_TAESD3, "taef1": _SEED_TAEF1}
    if name not in seeds:
        raise ValueError(f"name must be one of {sorted(seeds)}, not {name!r}")

    def build() -> dict[str, dict[str, torch.Tensor]]:
        enc, dec = taesd16_state_dicts(seeds[name])
        return {"-encoder": enc, "-decoder": dec}

    paths = F._cached_files(f"{name}-16ch", {}, build, cache_dir)
    return {"encoder": paths["-encoder"], "decoder": paths["-decoder"]}


# ---------------------------------------------------------------------------------------------------
# The models tree


def link_flow_models(root: Path, *, flux: bool = False) -> None:
    """Link the flow fixtures into the models tree at `root`: diffusion_models/ (SD3, and Flux when
    `flux`), text_encoders/ (CLIP-L), vae_approx/ (taesd3_*, taef1_*)."""
    root = Path(root)
    F._link(sd3_tiny(), root / "diffusion_models" / SD3_DIFFUSION_MODEL)
    F._link(clip_l(), root / "text_encoders" / CLIP_L)
    for name in TAE_NAMES:
        pair = taesd16(name)
        for part in ("encoder", "decoder"):
            F._link(pair[part], root / "vae_approx" / f"{name}_{part}.safetensors")
    if flux:
        F._link(flux_tiny(), root / "diffusion_models" / FLUX_DIFFUSION_MODEL)


def parameter_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
