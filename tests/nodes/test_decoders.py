"""The pixel decoders the CLIP losses differentiate through (nodes/decoders.py)."""

from __future__ import annotations

import pytest
import torch
from agg_testing.fixtures import CHECKPOINT_TINY_KL, TAESD_DECODER
from agg_testing.probes import pack_module


@pytest.fixture(scope="module")
def model(comfy, agg_models):
    import comfy.sd

    # the KL-VAE variant, so that the checkpoint's VAE and TAESD are different networks
    out = comfy.sd.load_checkpoint_guess_config(str(agg_models.path("checkpoints", CHECKPOINT_TINY_KL)))
    return out[0].model, out[2], agg_models


def run_info(model):
    runtime = pack_module("nodes.runtime")
    return runtime.RunInfo(model, "eps", torch.device("cpu"), (1, 4, 8, 8), torch.tensor([1.0, 0.0]))


def latent(seed=0):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_taesd_decoder_equals_comfyui_own_taesd_decode(model):
    """ComfyUI's previews feed TAESD the model's own latent (latent_preview.TAESDPreviewerImpl); the loss must
    see the same picture (fed process_latent_out(x0) instead, SD1.5's would be 5.5x too large)."""
    from comfy.taesd.taesd import TAESD

    base, vae, models = model
    decoders = pack_module("nodes.decoders")
    x0 = latent()
    ours = decoders.make_decoder("taesd", vae, run_info(base), "CLIP Direction Loss")(x0)
    with torch.inference_mode():
        previewer = TAESD(None, str(models.path("vae_approx", TAESD_DECODER)), latent_channels=4)
        expected = previewer.decode(x0)
        wrong = previewer.decode(base.process_latent_out(x0))  # the scale it must not use
    assert ours.shape == expected.shape == (1, 3, 64, 64)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert not torch.allclose(ours, wrong, atol=1e-2)


@pytest.mark.parametrize("kind", ["vae", "taesd", "linear"])
def test_every_decoder_is_differentiable_under_inference_mode(model, kind):
    base, vae, _ = model
    decoders = pack_module("nodes.decoders")
    decode = decoders.make_decoder(kind, vae, run_info(base), "CLIP Direction Loss")
    with torch.inference_mode():
        x0 = latent(1)
    with torch.inference_mode(False), torch.enable_grad():
        xg = x0.clone().requires_grad_(True)
        pixels = decode(xg)
        (g,) = torch.autograd.grad(pixels.square().mean(), xg)
    assert pixels.shape == (1, 3, 64, 64) and torch.isfinite(g).all() and g.abs().sum() > 0


def test_the_decoders_give_different_pictures(model):
    base, vae, _ = model
    decoders = pack_module("nodes.decoders")
    x0 = latent(2)
    with torch.inference_mode(False):
        out = {k: decoders.make_decoder(k, vae, run_info(base), "CLIP Direction Loss")(x0) for k in ("vae", "taesd", "linear")}
    keys = list(out)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert (out[a] - out[b]).abs().mean() > 1e-3, (a, b)


def test_taesd_falls_back_to_the_vae_with_a_warning_when_its_file_is_missing(model, caplog):
    """The loss nodes default to 'taesd'; a user without the TAESD files still gets a working (slower) run."""
    import copy
    import logging

    base, vae, _ = model
    decoders = pack_module("nodes.decoders")
    fmt = copy.copy(base.latent_format)
    fmt.taesd_decoder_name = "agg_absent_taesd_decoder"

    class WithoutTAESD:
        latent_format = fmt
        process_latent_out = staticmethod(base.process_latent_out)

    x0 = latent(2)
    with caplog.at_level(logging.WARNING, logger="AGG"):
        fallback = decoders.make_decoder("taesd", vae, run_info(WithoutTAESD()), "Image Style Loss")(x0)
    exact = decoders.make_decoder("vae", vae, run_info(base), "Image Style Loss")(x0)
    assert torch.equal(fallback, exact)
    text = " ".join(r.getMessage() for r in caplog.records if r.name == "AGG")
    assert "Image Style Loss" in text and "agg_absent_taesd_decoder" in text and "VAE" in text
