"""Deterministic random-weight model files in real ComfyUI architectures, generated at test time.

No weights are downloaded or committed. Each generator builds the module from ComfyUI's (or
open_clip's) own classes on the ``meta`` device to learn the exact state-dict keys and shapes, fills
every tensor from a ``torch.Generator`` seeded by (component seed, key), and saves a safetensors file
with a single metadata entry (several entries are written in random order, which would break
byte-identity). The same arguments therefore give the same bytes on every run and every machine
with the same torch.

Files are cached under ``$AGG_HOME/fixtures`` (default ``~/.cache/agg-comfyui/fixtures``), keyed by
``FIXTURE_VERSION``, the generator's arguments and the ComfyUI version, so later sessions reuse them.
Bump ``FIXTURE_VERSION`` whenever a generator's output changes.

Weights are random but scaled so activations stay O(1) or smaller: normal with std 0.02 (or
1/sqrt(fan_in) for the ReLU-only TAESD), biases zero, norm weights one. Nothing produced here is a
meaningful image model; it only has the real shapes and loads through the real loaders.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

FIXTURE_VERSION = "1"
BASE_SEED = 2306_04396

# Seeds per component: a component keeps its weights wherever it is saved (the TAESD inside the
# checkpoint equals the standalone vae_approx files; both checkpoint variants share UNet and CLIP).
_SEED_UNET = 1
_SEED_CLIP_L = 2
_SEED_TAESD = 3
_SEED_KL = 4
_SEED_CONTROLNET = 5
_SEED_OPEN_CLIP = 6
_SEED_UNET_FULL = 7

SD15_LATENT_SCALE = 0.18215

# One resolution level at SD1.5 width: ComfyUI reads depth, channel multipliers and transformer
# depths from the keys, so this still detects as SD1.5 (model_channels 320, context_dim 768, conv
# proj_in, no label_emb, 4 input channels). A middle block with a transformer is kept so that
# middle-block patches (PAG, SAG) and ControlNet's middle output have something to act on.
TINY_UNET_CONFIG: dict = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [0, 0],
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "legacy": False,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

# The real SD1.5 UNet (ComfyUI's model_detection table for SD15).
FULL_UNET_CONFIG: dict = {
    **TINY_UNET_CONFIG,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
}

KL_VAE_CONFIG: dict = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}

# A tiny open_clip CLIP: same key names as any ViT/text-transformer open_clip model, so a loader
# that infers the architecture from the tensor shapes sees an ordinary model.
OPEN_CLIP_TINY_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
OPEN_CLIP_TINY_NAME = "agg-tiny-open-clip"

# File names inside a models tree (see models_dir).
CHECKPOINT_TINY = "agg-tiny-sd15.safetensors"
CHECKPOINT_TINY_KL = "agg-tiny-sd15-kl.safetensors"
CHECKPOINT_FULL = "agg-full-sd15.safetensors"
CHECKPOINT_TRAINED = "agg-trained-sd15.safetensors"  # agg_testing.trained: a tiny UNet that learned to denoise
CONTROLNET_TINY = "agg-tiny-controlnet.safetensors"
TAESD_DECODER = "taesd_decoder.safetensors"
TAESD_ENCODER = "taesd_encoder.safetensors"
OPEN_CLIP_TINY = f"{OPEN_CLIP_TINY_NAME}.safetensors"


# ---------------------------------------------------------------------------------------------------
# Locations


def agg_home() -> Path:
    return Path(os.environ.get("AGG_HOME", Path.home() / ".cache" / "agg-comfyui"))


def fixtures_home() -> Path:
    return agg_home() / "fixtures"


def comfyui_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except ImportError:  # pragma: no cover - ComfyUI not importable: the version only names files
        return "unknown"


# ---------------------------------------------------------------------------------------------------
# Filling state dicts


StdFn = Callable[[str, tuple[int, ...]], float]


def std_constant(value: float = 0.02) -> StdFn:
    return lambda key, shape: value


def std_fan_in(gain: float = 1.0) -> StdFn:
    # Variance-preserving scale for nets without normalisation layers (TAESD): without it 40 stacked
    # convolutions at std 0.02 shrink every input to a constant image.
    return lambda key, shape: gain / math.sqrt(max(1, math.prod(shape[1:])))


def _key_seed(seed: int, key: str) -> int:
    # Seeding per key (not one stream in key order) keeps every tensor stable when keys are added.
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def random_tensor(key: str, shape: tuple[int, ...], seed: int, std: StdFn) -> torch.Tensor:
    """The deterministic value of one tensor: zero biases, unit norm weights, normal elsewhere."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias" or leaf.endswith("_bias"):
        return torch.zeros(shape)
    if len(shape) == 1 and leaf == "weight":
        return torch.ones(shape)
    g = torch.Generator().manual_seed(_key_seed(seed, key))
    return torch.randn(shape, generator=g) * std(key, shape)


def random_state_dict(
    shapes: Mapping[str, tuple[int, ...]],
    seed: int,
    std: StdFn,
    dtype: torch.dtype = torch.float32,
    constants: Mapping[str, torch.Tensor] | None = None,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Fill every key of `shapes` (seeded by the key without `prefix`) and prefix the result."""
    constants = dict(constants or {})
    out = {}
    for key in sorted(shapes):
        if key in constants:
            value = constants.pop(key)
        else:
            value = random_tensor(key, tuple(shapes[key]), seed, std)
        out[prefix + key] = value.to(dtype).contiguous()
    if constants:
        raise KeyError(f"constants for keys the module does not have: {sorted(constants)}")
    return out


def meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of a module, built without allocating its weights."""
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------
# Module shapes from ComfyUI's own classes


def unet_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return meta_shapes(lambda: UNetModel(**config, operations=comfy.ops.disable_weight_init))


def clip_l_shapes() -> dict[str, tuple[int, ...]]:
    import comfy.clip_model
    import comfy.ops

    cfg_path = Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json"
    config = json.loads(cfg_path.read_text())
    shapes = meta_shapes(
        lambda: comfy.clip_model.CLIPTextModel(config, torch.float32, None, comfy.ops.disable_weight_init)
    )
    # SD1.x checkpoints carry no text projection (ComfyUI's loader would rename the key under
    # text_model.); the pooled output is unused by SD1.x UNets.
    shapes.pop("text_projection.weight", None)
    return shapes


def taesd_shapes() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    from comfy.taesd.taesd import Decoder, Encoder

    return meta_shapes(lambda: Encoder(4)), meta_shapes(lambda: Decoder(4))


def kl_vae_shapes() -> dict[str, tuple[int, ...]]:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    return meta_shapes(lambda: AutoencoderKL(ddconfig=dict(KL_VAE_CONFIG), embed_dim=4))


def controlnet_shapes(unet_config: Mapping) -> dict[str, tuple[int, ...]]:
    import comfy.ops
    from comfy.cldm.cldm import ControlNet

    config = {k: v for k, v in unet_config.items() if k not in ("out_channels", "transformer_depth_output")}
    return meta_shapes(lambda: ControlNet(**config, hint_channels=3, operations=comfy.ops.disable_weight_init))


def open_clip_model(config: Mapping = OPEN_CLIP_TINY_CONFIG) -> torch.nn.Module:
    """An open_clip CLIP of the given config (random init, pretrained=None)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(
        embed_dim=config["embed_dim"],
        vision_cfg=CLIPVisionCfg(**config["vision_cfg"]),
        text_cfg=CLIPTextCfg(**config["text_cfg"]),
    )


# ---------------------------------------------------------------------------------------------------
# Component state dicts


def taesd_state_dicts() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder, decoder) state dicts with the key names of models/vae_approx/taesd_*.safetensors."""
    enc, dec = taesd_shapes()
    std = std_fan_in(1.0)
    return (
        random_state_dict(enc, _SEED_TAESD, std, prefix=""),
        random_state_dict(dec, _SEED_TAESD + 100, std, prefix=""),
    )


def _checkpoint_state_dict(unet_config: Mapping, unet_seed: int, vae: str) -> dict[str, torch.Tensor]:
    half = torch.float16  # as published SD1.5 checkpoints; ComfyUI casts on load
    sd = random_state_dict(
        unet_shapes(unet_config), unet_seed, std_constant(0.02), half, prefix="model.diffusion_model."
    )
    sd.update(
        random_state_dict(
            clip_l_shapes(), _SEED_CLIP_L, std_constant(0.02), half, prefix="cond_stage_model.transformer."
        )
    )
    if vae == "taesd":
        enc, dec = taesd_state_dicts()
        for name, part in (("taesd_encoder.", enc), ("taesd_decoder.", dec)):
            sd.update({f"first_stage_model.{name}{k}": v.to(half) for k, v in part.items()})
        # VAE(sd) builds a TAESD that maps raw VAE latents with (x - shift) * scale: SD1.5's factor.
        sd["first_stage_model.vae_scale"] = torch.tensor(SD15_LATENT_SCALE, dtype=half)
        sd["first_stage_model.vae_shift"] = torch.tensor(0.0, dtype=half)
    elif vae == "kl":
        sd.update(
            random_state_dict(kl_vae_shapes(), _SEED_KL, std_constant(0.02), half, prefix="first_stage_model.")
        )
    else:
        raise ValueError(f"vae must be 'taesd' or 'kl', not {vae!r}")
    return sd


# ---------------------------------------------------------------------------------------------------
# Cache


def _tag(name: str, params: Mapping) -> str:
    blob = json.dumps({"v": FIXTURE_VERSION, "comfy": comfyui_version(), **params}, sort_keys=True)
    return f"{name}-v{FIXTURE_VERSION}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass
class GenerationLog:
    """Times and sizes of files this process generated (cache hits are not listed)."""

    entries: list[tuple[str, float, int]] = field(default_factory=list)

    def add(self, path: Path, seconds: float) -> None:
        self.entries.append((str(path), seconds, path.stat().st_size))


GENERATED = GenerationLog()


def _save(path: Path, tensors: dict[str, torch.Tensor], tag: str) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"agg_fixture": tag})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _cached_files(
    name: str,
    params: Mapping,
    build: Callable[[], dict[str, dict[str, torch.Tensor]]],
    cache_dir: Path | None,
) -> dict[str, Path]:
    """Generate (once) the files `build` returns, keyed by file suffix; return their paths."""
    tag = _tag(name, params)
    folder = Path(cache_dir) if cache_dir is not None else fixtures_home()
    # Suffixes are known only after building; a stamp lists them so a cache hit needs no build.
    stamp = folder / f"{tag}.files"
    with _locked(stamp):
        if stamp.exists():
            suffixes = json.loads(stamp.read_text())
            paths = {s: folder / f"{tag}{s}.safetensors" for s in suffixes}
            if all(p.exists() for p in paths.values()):
                return paths
        t0 = time.perf_counter()
        parts = build()
        paths = {}
        for suffix, tensors in parts.items():
            paths[suffix] = folder / f"{tag}{suffix}.safetensors"
            _save(paths[suffix], tensors, f"{tag}{suffix}")
        seconds = time.perf_counter() - t0
        for p in paths.values():
            GENERATED.add(p, seconds / len(paths))
        stamp.write_text(json.dumps(list(parts)) + "\n")
        return paths


# ---------------------------------------------------------------------------------------------------
# Public generators


def sd15_tiny_checkpoint(vae: str = "taesd", *, cache_dir: Path | None = None) -> Path:
    """A checkpoint CheckpointLoaderSimple loads as SD1.5: one-level UNet (~21M params), full CLIP-L
    text encoder (123M, random) and a TAESD-shaped (`vae="taesd"`, small, fast) or full KL VAE."""
    if vae not in ("taesd", "kl"):
        raise ValueError(f"vae must be 'taesd' or 'kl', not {vae!r}")
    params = {"unet": TINY_UNET_CONFIG, "vae": vae}
    return _cached_files(
        f"sd15-tiny-{vae}",
        params,
        lambda: {"": _checkpoint_state_dict(TINY_UNET_CONFIG, _SEED_UNET, vae)},
        cache_dir,
    )[""]


def sd15_full_checkpoint(*, cache_dir: Path | None = None) -> Path:
    """Full SD1.5 shapes (860M UNet + CLIP-L + KL VAE, ~2 GiB fp16): for benchmarks only."""
    params = {"unet": FULL_UNET_CONFIG, "vae": "kl"}
    return _cached_files(
        "sd15-full",
        params,
        lambda: {"": _checkpoint_state_dict(FULL_UNET_CONFIG, _SEED_UNET_FULL, "kl")},
        cache_dir,
    )[""]


def controlnet_tiny(*, cache_dir: Path | None = None) -> Path:
    """A ControlNet (original `control_model.` format) matching the tiny UNet's blocks."""

    def build() -> dict[str, dict[str, torch.Tensor]]:
        # Zero convs are random rather than zero so the ControlNet visibly changes the prediction.
        sd = random_state_dict(
            controlnet_shapes(TINY_UNET_CONFIG), _SEED_CONTROLNET, std_constant(0.02), prefix="control_model."
        )
        return {"": sd}

    return _cached_files("controlnet-tiny", {"unet": TINY_UNET_CONFIG}, build, cache_dir)[""]


def taesd_sd15(*, cache_dir: Path | None = None) -> dict[str, Path]:
    """Standalone TAESD files as models/vae_approx expects them: {"encoder": path, "decoder": path}.
    Same weights as the TAESD inside sd15_tiny_checkpoint()."""

    def build() -> dict[str, dict[str, torch.Tensor]]:
        enc, dec = taesd_state_dicts()
        return {"-encoder": enc, "-decoder": dec}

    paths = _cached_files("taesd-sd15", {}, build, cache_dir)
    return {"encoder": paths["-encoder"], "decoder": paths["-decoder"]}


def open_clip_tiny(*, cache_dir: Path | None = None) -> Path:
    """A tiny open_clip CLIP (OPEN_CLIP_TINY_CONFIG), random, saved as its own state_dict."""

    def build() -> dict[str, dict[str, torch.Tensor]]:
        shapes = meta_shapes(open_clip_model)
        constants = {"logit_scale": torch.tensor(math.log(1 / 0.07))}
        return {"": random_state_dict(shapes, _SEED_OPEN_CLIP, std_constant(0.02), constants=constants)}

    return _cached_files("open-clip-tiny", {"config": OPEN_CLIP_TINY_CONFIG}, build, cache_dir)[""]


def load_open_clip_tiny(path: Path) -> torch.nn.Module:
    """The tiny open_clip model with the weights of `path` (strict load), in eval mode."""
    from safetensors.torch import load_file

    model = open_clip_model()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# A ComfyUI models tree


@dataclass(frozen=True)
class ModelsTree:
    """A models folder laid out as ComfyUI expects it, with links to the cached fixture files.
    Attributes hold the names to put in loader nodes (e.g. CheckpointLoaderSimple's ckpt_name)."""

    root: Path
    checkpoint: str = CHECKPOINT_TINY
    checkpoint_kl: str = CHECKPOINT_TINY_KL
    checkpoint_full: str | None = None
    checkpoint_trained: str | None = None
    controlnet: str = CONTROLNET_TINY
    open_clip: str = OPEN_CLIP_TINY
    taesd: str = "taesd"  # VAELoader's name for the vae_approx pair

    # diffusion_models, text_encoders: the flow-model fixtures (agg_testing.sd3)
    FOLDERS = ("checkpoints", "controlnet", "vae_approx", "open_clip", "diffusion_models", "text_encoders", "vae",
               "clip_vision")

    def folder(self, kind: str) -> Path:
        return self.root / kind

    def path(self, kind: str, name: str) -> Path:
        return self.root / kind / name


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        link.unlink()
    try:
        link.symlink_to(target)
    except OSError:  # pragma: no cover - file systems without symlinks
        shutil.copyfile(target, link)


def models_dir(root: Path, *, kl: bool = True, full: bool = False, trained: bool = False) -> ModelsTree:
    """Lay out `root` as a ComfyUI models tree (checkpoints/, controlnet/, vae_approx/, open_clip/)
    linking to the cached fixtures, generating any that are missing. `full` adds the ~2 GiB
    full-size SD1.5 checkpoint, `trained` the trained tiny SD1.5 (agg_testing.trained; minutes to
    train on first use)."""
    root = Path(root)
    taesd = taesd_sd15()
    _link(sd15_tiny_checkpoint("taesd"), root / "checkpoints" / CHECKPOINT_TINY)
    if kl:
        _link(sd15_tiny_checkpoint("kl"), root / "checkpoints" / CHECKPOINT_TINY_KL)
    if full:
        _link(sd15_full_checkpoint(), root / "checkpoints" / CHECKPOINT_FULL)
    if trained:
        from agg_testing.trained import sd15_trained_checkpoint

        _link(sd15_trained_checkpoint(), root / "checkpoints" / CHECKPOINT_TRAINED)
    _link(controlnet_tiny(), root / "controlnet" / CONTROLNET_TINY)
    _link(taesd["decoder"], root / "vae_approx" / TAESD_DECODER)
    _link(taesd["encoder"], root / "vae_approx" / TAESD_ENCODER)
    _link(open_clip_tiny(), root / "open_clip" / OPEN_CLIP_TINY)
    for kind in ("vae", "clip_vision"):  # VAELoader / CLIPVisionLoader files (agg_testing.workflow_models links)
        (root / kind).mkdir(parents=True, exist_ok=True)
    from agg_testing import sd3  # the 16-channel flow fixtures (SD3-shaped MMDiT, CLIP-L, taesd3 / taef1)

    sd3.link_flow_models(root)
    return ModelsTree(
        root=root,
        checkpoint_kl=CHECKPOINT_TINY_KL if kl else "",
        checkpoint_full=CHECKPOINT_FULL if full else None,
        checkpoint_trained=CHECKPOINT_TRAINED if trained else None,
    )


def write_extra_model_paths(yaml_path: Path, models: ModelsTree, custom_nodes: Path | None = None) -> Path:
    """Write an extra_model_paths.yaml naming the tree's model folders and (optionally) a
    custom_nodes folder, for ``main.py --extra-model-paths-config``."""
    lines = ["agg_tests:", f"    base_path: {json.dumps(str(models.root))}"]
    for kind in ModelsTree.FOLDERS:
        lines.append(f"    {kind}: {kind}/")
    if custom_nodes is not None:
        lines.append(f"    custom_nodes: {json.dumps(str(Path(custom_nodes).resolve()))}")
    yaml_path = Path(yaml_path)
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text("\n".join(lines) + "\n")
    return yaml_path
