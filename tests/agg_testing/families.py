"""Flux.2 and Qwen-Image fixtures: tiny random-weight models in the real architectures, generated at test time.

Generated like agg_testing.fixtures / agg_testing.sd3 (ComfyUI's own classes on the meta device for the keys and
shapes, every tensor seeded by (component seed, key), one metadata entry, cached under ``$AGG_HOME/fixtures``) and
laid out as a user would, for ComfyUI's own loaders:

- ``agg-tiny-flux2.safetensors`` (models/diffusion_models, UNETLoader): ComfyUI's Flux DiT in its Flux.2 layout
  (global modulation: ``double_stream_modulation_img`` marks it as flux2 in model_detection; SiLU-gated MLP, no
  biases, four 32-wide rotary axes, 128 latent channels at patch 1, guidance embedding as Flux.2 dev). Detection
  reads the width from ``img_in`` and the head count as width / 128, so width 128 (one head), one double and one
  single block is a ~1M-parameter Flux.2. ComfyUI loads it as Flux2: ModelSamplingFlux (CONST), the Flux2 latent
  format (128 channels at 1/16 of the image, the VAE's 32 channels patchified 2 x 2). Its text input reads the
  context width from ``txt_in`` (4096 here: the SD3 text-encoder path with CLIP-L, as the Flux.1 fixture):
  Flux.2's own text encoders (Mistral-3 24B, Qwen3 4B / 8B) are built by ComfyUI at their fixed sizes.
- ``agg-flux2-vae.safetensors`` (models/vae, VAELoader): the Flux.2 VAE, an AutoencoderKL with the batch-norm
  latent (``bn.running_mean``: 32 channels patchified to 128 at 1/16); ComfyUI fixes the encoder width (128) and
  reads the decoder's from ``decoder.conv_in`` (32 here), ~36M parameters.
- ``taef2_{encoder,decoder}`` (models/vae_approx): the Flux.2 TAESD (``DecoderFlux2``: 32-channel TAESD with
  group norm, unpatchifying the 128 channels itself). The ``taesd`` decoder option reads ``taef2_decoder``.
- ``agg-tiny-qwen-image.safetensors`` (models/diffusion_models, UNETLoader): ComfyUI's QwenImageTransformer2DModel
  with one block. Detection reads only the input channels and the depth, so the block has Qwen-Image's full width
  (24 heads x 128 = 3072; ~330M parameters, ~0.7 GB in bf16): generated when a test asks for it. ComfyUI loads it
  as QwenImage: ModelSamplingFlux (CONST, shift 1.15) and the Wan21 latent format (16 channels, per-channel mean
  and std, 5-D latents [B, 16, 1, H/8, W/8]).
- ``agg-qwen-image-vae.safetensors`` (models/vae, VAELoader): the Wan 2.1 VAE (causal 3-D convolutions;
  ``decoder.middle.0.residual.0.gamma`` selects it) at base width 16 instead of 96.
- ``lighttaew2_1.safetensors`` (models/vae_approx): ComfyUI's tiny decoder for Wan 2.1 latents (TAEHV with 16
  latent channels, stored in fp32 as ComfyUI's detection expects of lighttaew2_1), the ``taesd`` decoder option's
  file for Qwen-Image.

Qwen-Image's text encoder is Qwen2.5-VL 7B, which ComfyUI builds at its fixed size from code (nothing in the file
sets its width), 15 GB: out of reach of a CPU test. Its prompts come from ``AGGTestTextEmbedding`` below: a
CONDITIONING of Qwen-Image's context width (3584) drawn from a generator seeded by the text, so different texts
give different, reproducible conditionings, in the shape the model reads (``c_crossattn`` [B, tokens, 3584]). Its
optional ``width`` gives other models' widths (agg_testing.wan: Wan's 4096).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from agg_testing import fixtures as F

_SEED_FLUX2 = 31
_SEED_FLUX2_VAE = 32
_SEED_TAEF2 = 33
_SEED_QWEN = 34
_SEED_WAN_VAE = 35
_SEED_LIGHTTAEW = 36

FLUX2_DIFFUSION_MODEL = "agg-tiny-flux2.safetensors"
FLUX2_VAE = "agg-flux2-vae.safetensors"
QWEN_DIFFUSION_MODEL = "agg-tiny-qwen-image.safetensors"
QWEN_VAE = "agg-qwen-image-vae.safetensors"
LIGHTTAEW = "lighttaew2_1.safetensors"
QWEN_CONTEXT_DIM = 3584

# model_detection's flux2 branch, at width 128 (one head of 4 x 32 rotary axes).
FLUX2_CONFIG: dict = {
    "image_model": "flux2",
    "axes_dim": [32, 32, 32, 32],
    "num_heads": 1,
    "mlp_ratio": 3.0,
    "theta": 2000,
    "out_channels": 128,
    "global_modulation": True,
    "mlp_silu_act": True,
    "qkv_bias": False,
    "ops_bias": False,
    "default_ref_method": "index",
    "ref_index_scale": 10.0,
    "txt_ids_dims": [3],
    "patch_size": 1,
    "in_channels": 128,
    "hidden_size": 128,
    "context_in_dim": 4096,
    "vec_in_dim": None,
    "depth": 1,
    "depth_single_blocks": 1,
    "guidance_embed": True,
    "yak_mlp": False,
    "txt_norm": False,
}

# comfy.sd.VAE's branch for a KL VAE with "bn.running_mean": encoder at ComfyUI's fixed width, 32 latent
# channels; the decoder width (read from decoder.conv_in) reduced.
FLUX2_VAE_DDCONFIG: dict = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3,
                            "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                            "dropout": 0.0, "batch_norm_latent": True}
FLUX2_VAE_DECODER_CH = 32

QWEN_CONFIG: dict = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1}

WAN_VAE_CONFIG: dict = {"dim": 16, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                        "temperal_downsample": [False, True, True], "image_channels": 3, "conv_out_channels": 3,
                        "dropout": 0.0}


# ---------------------------------------------------------------------------------------------------
# Shapes from ComfyUI's own classes


def flux2_shapes() -> dict[str, tuple[int, ...]]:
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    config = {k: v for k, v in FLUX2_CONFIG.items() if k != "image_model"}
    return F.meta_shapes(lambda: Flux(**config, operations=comfy.ops.disable_weight_init))


def flux2_vae_shapes() -> dict[str, tuple[int, ...]]:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dec = {**FLUX2_VAE_DDCONFIG, "ch": FLUX2_VAE_DECODER_CH}
    return F.meta_shapes(lambda: AutoencoderKL(ddconfig=dict(FLUX2_VAE_DDCONFIG), embed_dim=32, decoder_ddconfig=dec))


def taef2_shapes() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    from comfy.taesd.taesd import DecoderFlux2, EncoderFlux2

    return F.meta_shapes(lambda: EncoderFlux2(128)), F.meta_shapes(lambda: DecoderFlux2(128))


def qwen_shapes() -> dict[str, tuple[int, ...]]:
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    return F.meta_shapes(lambda: QwenImageTransformer2DModel(**QWEN_CONFIG, operations=comfy.ops.disable_weight_init))


def wan_vae_shapes() -> dict[str, tuple[int, ...]]:
    import inspect

    from comfy.ldm.wan.vae import WanVAE

    # ComfyUI before 0.33 has no image_channels / conv_out_channels arguments (its VAE is always RGB, as here)
    accepted = inspect.signature(WanVAE.__init__).parameters
    return F.meta_shapes(lambda: WanVAE(**{k: v for k, v in WAN_VAE_CONFIG.items() if k in accepted}))


def lighttaew_shapes() -> dict[str, tuple[int, ...]]:
    from comfy.taesd.taehv import TAEHV

    return F.meta_shapes(lambda: TAEHV(latent_channels=16))


# ---------------------------------------------------------------------------------------------------
# State dicts


def flux2_state_dict() -> dict[str, torch.Tensor]:
    return F.random_state_dict(flux2_shapes(), _SEED_FLUX2, F.std_constant(0.02), torch.bfloat16)


def flux2_vae_state_dict() -> dict[str, torch.Tensor]:
    shapes = flux2_vae_shapes()
    constants = {"bn.running_mean": torch.zeros(shapes["bn.running_mean"]),
                 "bn.running_var": torch.ones(shapes["bn.running_var"]),
                 "bn.num_batches_tracked": torch.tensor(0)}
    sd = F.random_state_dict(shapes, _SEED_FLUX2_VAE, F.std_constant(0.02), torch.float32, constants=constants)
    sd["bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
    return sd


def taef2_state_dicts() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    enc, dec = taef2_shapes()
    std = F.std_fan_in(1.0)
    return F.random_state_dict(enc, _SEED_TAEF2, std), F.random_state_dict(dec, _SEED_TAEF2 + 100, std)


def qwen_state_dict() -> dict[str, torch.Tensor]:
    return F.random_state_dict(qwen_shapes(), _SEED_QWEN, F.std_constant(0.02), torch.bfloat16)


def wan_vae_state_dict() -> dict[str, torch.Tensor]:
    shapes = wan_vae_shapes()
    sd = {}
    for key in sorted(shapes):
        if key.endswith("gamma"):  # RMS_norm's scale: a norm weight
            sd[key] = torch.ones(shapes[key])
        else:
            # variance-preserving, as TAESD: std 0.02 through the causal convolutions gives a constant image
            sd[key] = F.random_tensor(key, shapes[key], _SEED_WAN_VAE, F.std_fan_in(1.0))
    return sd


def lighttaew_state_dict() -> dict[str, torch.Tensor]:
    # fp32: ComfyUI takes an fp16 file with these keys for taehv (HunyuanVideo latents), not lighttaew2_1
    return F.random_state_dict(lighttaew_shapes(), _SEED_LIGHTTAEW, F.std_fan_in(1.0), torch.float32)


# ---------------------------------------------------------------------------------------------------
# Cached files


def flux2_tiny(*, cache_dir: Path | None = None) -> Path:
    return F._cached_files("flux2-tiny", {"flux2": FLUX2_CONFIG}, lambda: {"": flux2_state_dict()}, cache_dir)[""]


def flux2_vae(*, cache_dir: Path | None = None) -> Path:
    params = {"ddconfig": FLUX2_VAE_DDCONFIG, "decoder_ch": FLUX2_VAE_DECODER_CH}
    return F._cached_files("flux2-vae", params, lambda: {"": flux2_vae_state_dict()}, cache_dir)[""]


def taef2(*, cache_dir: Path | None = None) -> dict[str, Path]:
    def build() -> dict[str, dict[str, torch.Tensor]]:
        enc, dec = taef2_state_dicts()
        return {"-encoder": enc, "-decoder": dec}

    paths = F._cached_files("taef2", {}, build, cache_dir)
    return {"encoder": paths["-encoder"], "decoder": paths["-decoder"]}


def qwen_tiny(*, cache_dir: Path | None = None) -> Path:
    """The one-block Qwen-Image DiT at Qwen-Image's fixed width 3072, ~330M parameters, ~0.7 GB."""
    return F._cached_files("qwen-image-1", {"qwen": QWEN_CONFIG}, lambda: {"": qwen_state_dict()}, cache_dir)[""]


def wan_vae(*, cache_dir: Path | None = None) -> Path:
    return F._cached_files("wan21-vae", {"wan": WAN_VAE_CONFIG}, lambda: {"": wan_vae_state_dict()}, cache_dir)[""]


def lighttaew(*, cache_dir: Path | None = None) -> Path:
    return F._cached_files("lighttaew2_1", {}, lambda: {"": lighttaew_state_dict()}, cache_dir)[""]


def link_flux2(root: Path) -> None:
    """diffusion_models/ (Flux.2 DiT), vae/ (Flux.2 VAE), vae_approx/ (taef2_*); CLIP-L comes with the tree."""
    root = Path(root)
    F._link(flux2_tiny(), root / "diffusion_models" / FLUX2_DIFFUSION_MODEL)
    F._link(flux2_vae(), root / "vae" / FLUX2_VAE)
    pair = taef2()
    for part in ("encoder", "decoder"):
        F._link(pair[part], root / "vae_approx" / f"taef2_{part}.safetensors")


def link_qwen(root: Path, *, tiny_decoder: bool = True) -> None:
    """diffusion_models/ (Qwen-Image DiT), vae/ (Wan 2.1 VAE), vae_approx/ (lighttaew2_1 when `tiny_decoder`)."""
    root = Path(root)
    F._link(qwen_tiny(), root / "diffusion_models" / QWEN_DIFFUSION_MODEL)
    F._link(wan_vae(), root / "vae" / QWEN_VAE)
    if tiny_decoder:
        F._link(lighttaew(), root / "vae_approx" / LIGHTTAEW)


# ---------------------------------------------------------------------------------------------------
# Qwen-Image prompts without Qwen2.5-VL 7B (see the module docstring)


def text_embedding(text: str, tokens: int = 8, width: int = QWEN_CONTEXT_DIM) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    return torch.randn((1, tokens, width), generator=g)


class AGGTestTextEmbedding:
    """STRING -> CONDITIONING of a model's context width (default Qwen-Image's; Wan reads 4096), seeded by the
    text."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "a photo"}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512})},
                "optional": {"width": ("INT", {"default": QWEN_CONTEXT_DIM, "min": 1, "max": 16384})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "AGG/testing"

    def encode(self, text, tokens, width=QWEN_CONTEXT_DIM):
        return ([[text_embedding(text, tokens, width), {}]],)


def register_nodes() -> None:
    import nodes

    nodes.NODE_CLASS_MAPPINGS.setdefault("AGGTestTextEmbedding", AGGTestTextEmbedding)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault("AGGTestTextEmbedding", "AGGTestTextEmbedding")
