"""The generated model fixtures: byte-identical regeneration, and ComfyUI's real loaders accept them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from agg_testing import fixtures as F


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda d: F.taesd_sd15(cache_dir=d)["decoder"], id="taesd_decoder"),
        pytest.param(lambda d: F.taesd_sd15(cache_dir=d)["encoder"], id="taesd_encoder"),
        pytest.param(lambda d: F.open_clip_tiny(cache_dir=d), id="open_clip_tiny"),
        pytest.param(lambda d: F.controlnet_tiny(cache_dir=d), id="controlnet_tiny"),
        pytest.param(lambda d: F.sd15_tiny_checkpoint("taesd", cache_dir=d), id="sd15_tiny_taesd"),
    ],
)
def test_same_arguments_give_identical_bytes(make, tmp_path):
    # A fresh generation against the shared cache, which an earlier session or process (or
    # `agg_models`) generated independently: one extra generation per file, not two.
    cached = make(None)
    fresh = make(tmp_path)
    assert fresh != cached and fresh.name == cached.name
    assert sha256(fresh) == sha256(cached)


def test_file_carries_a_single_metadata_entry(tmp_path):
    from safetensors import safe_open

    path = F.controlnet_tiny(cache_dir=tmp_path)
    with safe_open(str(path), "pt") as f:
        assert list(f.metadata()) == ["agg_fixture"]


def test_cache_hit_does_not_regenerate(tmp_path):
    first = F.taesd_sd15(cache_dir=tmp_path)["decoder"]
    mtime = first.stat().st_mtime_ns
    n = len(F.GENERATED.entries)
    again = F.taesd_sd15(cache_dir=tmp_path)["decoder"]
    assert again == first and again.stat().st_mtime_ns == mtime
    assert len(F.GENERATED.entries) == n


def test_random_tensor_rules():
    g = F.std_constant(0.02)
    assert torch.equal(F.random_tensor("a.bias", (5,), 1, g), torch.zeros(5))
    assert torch.equal(F.random_tensor("a.norm.weight", (5,), 1, g), torch.ones(5))
    w = F.random_tensor("a.weight", (64, 64), 1, g)
    assert 0.015 < w.std().item() < 0.025
    assert torch.equal(w, F.random_tensor("a.weight", (64, 64), 1, g))
    assert not torch.equal(w, F.random_tensor("b.weight", (64, 64), 1, g))
    assert not torch.equal(w, F.random_tensor("a.weight", (64, 64), 2, g))


@pytest.mark.parametrize("vae", ["taesd", "kl"])
def test_checkpoint_loads_as_sd15_and_decodes(vae, agg_models):
    import comfy.latent_formats
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    name = agg_models.checkpoint if vae == "taesd" else agg_models.checkpoint_kl
    model, clip, vae_obj, _ = comfy.sd.load_checkpoint_guess_config(
        str(agg_models.path("checkpoints", name)), output_vae=True, output_clip=True
    )
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert isinstance(model.model.latent_format, comfy.latent_formats.SD15)
    assert model.model.latent_format.latent_channels == 4
    assert vae_obj.latent_channels == 4
    unet_params = comfy.utils.calculate_parameters(model.model.diffusion_model.state_dict())
    assert 15e6 < unet_params < 30e6  # one resolution level, not the 860M of SD1.5
    te_params = sum(p.numel() for n, p in clip.cond_stage_model.named_parameters() if "text_projection" not in n)
    assert 122e6 < te_params < 124e6  # full CLIP-L text encoder

    tokens = clip.tokenize("a photo of a cat")
    cond = clip.encode_from_tokens(tokens)
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()

    with torch.inference_mode():
        image = vae_obj.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
        latent = vae_obj.encode(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)))
    assert image.shape[-3:] == (64, 64, 3)
    assert torch.isfinite(image).all()
    assert image.std() > 0.01  # not a constant picture
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()


def test_controlnet_loads_with_the_tiny_unet_shape(agg_models):
    import comfy.controlnet

    control = comfy.controlnet.load_controlnet(str(agg_models.path("controlnet", agg_models.controlnet)))
    assert control is not None
    cm = control.control_model
    assert cm.model_channels == 320
    assert len(cm.zero_convs) == 2  # input conv + one res block: the tiny UNet's input blocks


def test_taesd_files_match_the_checkpoint_vae(agg_models, comfy):
    from comfy.sd import load_checkpoint_guess_config

    import nodes

    assert "taesd" in nodes.VAELoader.vae_list(nodes.VAELoader)
    approx = nodes.VAELoader().load_vae("taesd")[0]
    _, _, ckpt_vae, _ = load_checkpoint_guess_config(
        str(agg_models.path("checkpoints", agg_models.checkpoint)), output_clip=False, output_model=False
    )
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b = approx.decode(z), ckpt_vae.decode(z)
    assert a.shape == b.shape == (1, 64, 64, 3)
    # same weights; the checkpoint stores them in fp16
    assert (a - b).abs().max() < 2e-2


def test_open_clip_tiny_loads_and_encodes(agg_models):
    import open_clip

    model = F.load_open_clip_tiny(agg_models.path("open_clip", agg_models.open_clip))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 5e6
    with torch.no_grad():
        img = model.encode_image(torch.rand(2, 3, 32, 32))
        txt = model.encode_text(open_clip.tokenize(["a cat", "a dog"]))
    assert img.shape == txt.shape == (2, F.OPEN_CLIP_TINY_CONFIG["embed_dim"])
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert not torch.allclose(txt[0], txt[1])


def test_models_tree_and_extra_model_paths(agg_models, tmp_path):
    for kind, name in [
        ("checkpoints", agg_models.checkpoint),
        ("checkpoints", agg_models.checkpoint_kl),
        ("controlnet", agg_models.controlnet),
        ("vae_approx", F.TAESD_DECODER),
        ("vae_approx", F.TAESD_ENCODER),
        ("open_clip", agg_models.open_clip),
    ]:
        assert agg_models.path(kind, name).is_file()
    custom = tmp_path / "custom_nodes"
    custom.mkdir()
    cfg = yaml.safe_load(F.write_extra_model_paths(tmp_path / "x.yaml", agg_models, custom).read_text())
    (entry,) = cfg.values()
    assert Path(entry["base_path"]) == agg_models.root
    assert Path(entry["custom_nodes"]) == custom.resolve()
    for kind in F.ModelsTree.FOLDERS:
        assert (agg_models.root / entry[kind]).is_dir()
