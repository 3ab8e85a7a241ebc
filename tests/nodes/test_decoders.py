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


# -- the `vae` decoder's gradient copy: the decoding half only, once per run, gone with the run ----------------------


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def decoding_parts(first_stage_model) -> list:
    """What `first_stage_model.decode` runs, by VAE kind (ComfyUI's classes)."""
    if hasattr(first_stage_model, "taesd_decoder"):  # TAESD as the checkpoint's VAE
        return [first_stage_model.taesd_decoder, first_stage_model.vae_scale, first_stage_model.vae_shift]
    parts = [first_stage_model.decoder]
    if hasattr(first_stage_model, "post_quant_conv"):  # AutoencoderKL (legacy engine)
        parts.append(first_stage_model.post_quant_conv)
    return parts


def count(parts) -> int:
    return sum(p.numel() if isinstance(p, torch.Tensor) else n_params(p) for p in parts)


@pytest.fixture(scope="module")
def taesd_vae_model(comfy, agg_models):
    import comfy.sd
    from agg_testing.fixtures import CHECKPOINT_TINY

    out = comfy.sd.load_checkpoint_guess_config(str(agg_models.path("checkpoints", CHECKPOINT_TINY)))
    return out[0].model, out[2]


@pytest.mark.parametrize("kind", ["kl", "taesd_as_vae"])
def test_vae_gradient_copy_holds_the_decoder_only_and_decodes_exactly_as_the_vae(model, taesd_vae_model, kind):
    """The copy's parameters are exactly the decoder's (no encoder), none is an inference tensor, and it decodes
    exactly as the loaded VAE's own first_stage_model.decode, which it replaces."""
    base, vae = (model[0], model[1]) if kind == "kl" else taesd_vae_model
    decoders = pack_module("nodes.decoders")
    fsm = vae.first_stage_model
    whole, decoding = n_params(fsm), count(decoding_parts(fsm))
    assert decoding < whole  # the encoder is a real share of the VAE
    with torch.inference_mode():  # as in a prompt
        copy = decoders.decoder_copy(fsm, torch.device("cpu"), torch.float32)
    assert n_params(copy) == decoding
    assert all(getattr(copy, name, None) is None for name in decoders.ENCODER_PARTS if hasattr(fsm, name))
    assert not any(p.is_inference() or p.requires_grad for p in copy.parameters())
    # on the VAE's own device and dtype the weights are shared, not copied: the copy costs no weight memory
    shared = {p.data_ptr() for p in fsm.parameters()}
    assert all(p.data_ptr() in shared for p in copy.parameters())
    with torch.inference_mode():
        doubled = decoders.decoder_copy(fsm, torch.device("cpu"), torch.float64)  # another dtype: copied
    assert n_params(doubled) == decoding and not any(p.data_ptr() in shared for p in doubled.parameters())

    info = run_info(base)
    x0 = latent(3)
    with torch.inference_mode():
        expected = fsm.decode(base.process_latent_out(x0).to(vae.vae_dtype)).float()
        ours = decoders.make_decoder("vae", vae, info, "CLIP Direction Loss")(x0)
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0), (ours - expected).abs().max()

    # the recomputed (checkpointed) blocks give the gradient of the plain copy's backward pass
    import copy as copying

    with torch.inference_mode(False), torch.enable_grad():
        plain = copying.deepcopy(fsm)
        grads = []
        for net in (copy, plain):
            z = base.process_latent_out(x0).clone().requires_grad_(True)
            grads.append(torch.autograd.grad(net.decode(z).square().mean(), z)[0])
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-5), (grads[0] - grads[1]).abs().max()


def test_vae_gradient_copy_is_made_once_per_run_and_freed_when_the_run_ends(model):
    import gc
    import weakref

    base, vae, _ = model
    decoders = pack_module("nodes.decoders")
    info = run_info(base)
    made = []
    real = decoders.decoder_copy

    def counting(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    decoders.decoder_copy = counting
    try:
        first = decoders.make_decoder("vae", vae, info, "CLIP Direction Loss")
        second = decoders.make_decoder("vae", vae, info, "Image Style Loss")  # a second loss in the same run
    finally:
        decoders.decoder_copy = real
    assert len(made) == 1
    with torch.inference_mode(False):
        assert torch.equal(first(latent(4)), second(latent(4)))
    ref = weakref.ref(made.pop())
    info.close()
    gc.collect()
    assert ref() is None  # freed although the decode closures are still alive
    with pytest.raises(RuntimeError, match="released"):
        first(latent(4))
