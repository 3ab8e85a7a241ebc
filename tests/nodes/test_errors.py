"""Bad inputs give a clear error naming the node and the input, and the next (valid) prompt runs."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from agg_testing.graphs import Graph, NodeRef, img2img
from agg_testing.probes_errors import register

SEEDS = iter(range(1000, 2000))


@pytest.fixture(scope="module", autouse=True)
def probes(comfy):
    register()


def guided(*, seed: int | None = None, weight: float = 0.5, **apply) -> Graph:
    """img2img (64x64, 4 steps) guided by Structure Loss toward the encoded source."""
    g = img2img(seed=next(SEEDS) if seed is None else seed, steps=4)
    loss = g.node("AGGStructureLoss", name="loss", weight=weight, source=g["encode"][0])
    settings = dict(start_percent=0.0, end_percent=1.0, manifold="finite_difference", dds_steps=1, dds_lr=0.05,
                    asymmetric=True)
    settings.update(apply)
    agg = g.node("AGGApply", name="agg", model=g["ckpt"][0], loss=loss[0], **settings)
    g.set_input(g["sampler"], model=agg[0])
    return g


def assert_error(r, *names: str) -> str:
    assert not r.ok, "the prompt should have failed"
    text = r.error_text()
    for name in names:
        assert name in text, f"{name!r} not in the error:\n{text[:3000]}"
    return text


def assert_next_runs(comfy) -> None:
    g = guided(manifold="none")
    r = comfy.run(g.prompt)
    assert r.ok, r.error_text()[:3000]
    out = r.output(g["sampler"].id)["samples"]
    assert torch.isfinite(out).all()
    assert len(r.events("agg.terms")) > 0


def test_source_latent_of_another_size(comfy):
    g = guided()
    big = g.node("EmptyLatentImage", width=128, height=128, batch_size=1)
    g.set_input(g["loss"], source=big[0])
    text = assert_error(comfy.run(g.prompt), "Structure Loss", "'source'")
    assert "16x16" in text and "8x8" in text
    assert_next_runs(comfy)


def test_source_batch_3_vs_sampled_batch_2(comfy):
    g = guided()
    two = g.node("RepeatLatentBatch", samples=g["encode"][0], amount=2)
    three = g.node("RepeatLatentBatch", samples=g["encode"][0], amount=3)
    g.set_input(g["sampler"], latent_image=two[0])
    g.set_input(g["loss"], source=three[0])
    text = assert_error(comfy.run(g.prompt), "Structure Loss", "'source'")
    assert "batch 3" in text and "batch 2" in text
    assert_next_runs(comfy)


def test_source_batch_1_broadcasts_over_batch_2(comfy):
    g = guided()
    two = g.node("RepeatLatentBatch", samples=g["encode"][0], amount=2)
    g.set_input(g["sampler"], latent_image=two[0])
    r = comfy.run(g.prompt)
    assert r.ok, r.error_text()[:3000]
    assert r.output(g["sampler"].id)["samples"].shape[0] == 2


@pytest.fixture
def extra_folder(tmp_path):
    """Register a temporary folder for a model kind; unregistered afterwards."""
    import folder_paths

    added: list[tuple[str, str]] = []

    def add(kind: str) -> str:
        path = tmp_path / kind
        path.mkdir(exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(path))
        added.append((kind, str(path)))
        return str(path)

    yield add
    for kind, path in added:
        paths = folder_paths.folder_names_and_paths[kind][0]
        if path in paths:
            paths.remove(path)
        folder_paths.filename_list_cache.pop(kind, None)


def write_taesd3(folder: str) -> None:
    """Random 16-channel TAESD files with the names VAELoader lists as 'taesd3'."""
    from comfy.taesd.taesd import Decoder, Encoder
    from safetensors.torch import save_file

    torch.manual_seed(0)
    for name, net in (("taesd3_encoder", Encoder(16)), ("taesd3_decoder", Decoder(16))):
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(folder, f"{name}.safetensors"))


def clip_guided(agg_models, **clip_inputs) -> Graph:
    g = guided(weight=0.0)
    clip = g.node("AGGCLIPLoader", name="clip", clip_name=agg_models.open_clip)
    inputs = dict(clip=clip[0], vae=g["ckpt"][2], source_text="a photo", target_text="a watercolor painting",
                  weight=1.0, decoder="vae", cutouts=1, seed=0)
    inputs.update(clip_inputs)
    loss = g.node("AGGCLIPDirectionLoss", name="clip_loss", **inputs)
    g.set_input(g["agg"], loss=loss[0])
    return g


def test_vae_with_other_latent_channels(comfy, agg_models, extra_folder):
    write_taesd3(extra_folder("vae_approx"))
    g = clip_guided(agg_models)
    vae3 = g.node("VAELoader", vae_name="taesd3")
    g.set_input(g["clip_loss"], vae=vae3[0])
    text = assert_error(comfy.run(g.prompt), "CLIP Direction Loss", "'vae'")
    assert "16-channel" in text and "4-channel" in text
    assert_next_runs(comfy)


def test_missing_clip_file(comfy, agg_models, extra_folder):
    # Not in the list at all: ComfyUI's validation names the loader and the input.
    g = clip_guided(agg_models)
    g.set_input(g["clip"], clip_name="no-such-clip.safetensors")
    assert_error(comfy.run(g.prompt), "AGGCLIPLoader", "clip_name")
    # Listed but gone (a dangling link): the loader itself refuses it.
    folder = extra_folder("open_clip")
    os.symlink(os.path.join(folder, "gone.safetensors"), os.path.join(folder, "agg-dangling.safetensors"))
    g = clip_guided(agg_models)
    g.set_input(g["clip"], clip_name="agg-dangling.safetensors")
    assert_error(comfy.run(g.prompt), "AGG CLIP Loader", "'clip_name'", "agg-dangling.safetensors")
    assert_next_runs(comfy)


def test_non_safetensors_clip_file_is_refused_without_unpickling(comfy, agg_models, extra_folder, monkeypatch):
    folder = extra_folder("open_clip")
    with open(os.path.join(folder, "agg-pickled.bin"), "wb") as f:
        f.write(b"\x80\x04not really a pickle")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the loader unpickled a file")

    import pickle

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    g = clip_guided(agg_models)
    g.set_input(g["clip"], clip_name="agg-pickled.bin")
    text = assert_error(comfy.run(g.prompt), "AGG CLIP Loader", "'clip_name'", "safetensors")
    assert "unpickled" not in text
    monkeypatch.undo()
    assert_next_runs(comfy)


def test_empty_target_text(comfy, agg_models):
    g = clip_guided(agg_models, target_text="   ")
    assert_error(comfy.run(g.prompt), "CLIP Direction Loss", "target_text")
    assert_next_runs(comfy)


@pytest.mark.parametrize("start,end", [(0.5, 0.5), (0.8, 0.2)])
def test_start_percent_not_below_end_percent(comfy, start, end):
    g = guided(start_percent=start, end_percent=end)
    assert_error(comfy.run(g.prompt), "Apply AGG", "'start_percent'", "'end_percent'")
    assert_next_runs(comfy)


def custom_sampling(g: Graph, sampler: list, sigmas: list) -> NodeRef:
    """SamplerCustomAdvanced on g's checkpoint and encoded source, with the given SAMPLER and SIGMAS."""
    guider = g.node("CFGGuider", model=g["ckpt"][0], positive=g["positive"][0], negative=g["negative"][0], cfg=5.0)
    noise = g.node("RandomNoise", noise_seed=1)
    out = g.node("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=sampler, sigmas=sigmas,
                 latent_image=g["encode"][0])
    return g.node("SaveLatent", samples=out[0], filename_prefix="agg_err")


def test_agg_sampler_zones_out_of_order(comfy):
    g = img2img(seed=next(SEEDS), steps=3)
    sampler = g.node("AGGSampler", eta_edit=0.0, eta=0.0, eta_boost=1.0, edit_end=0.9, boost_start=0.1,
                     follow_guidance=False)
    custom_sampling(g, sampler[0], g.node("BasicScheduler", model=g["ckpt"][0], scheduler="normal", steps=3,
                                          denoise=0.6)[0])
    text = assert_error(comfy.run(g.prompt), "AGG Sampler", "'edit_end'", "'boost_start'")
    assert "edit_end=0.9" in text and "boost_start=0.1" in text
    assert_next_runs(comfy)


def test_invert_needs_two_sigmas(comfy):
    g = img2img(seed=next(SEEDS), steps=3)
    sigmas = g.node("BasicScheduler", model=g["ckpt"][0], scheduler="normal", steps=3, denoise=0.6)
    one = g.node("SplitSigmas", sigmas=sigmas[0], step=0)  # output 0: the first sigma alone
    inv = g.node("AGGInvert", model=g["ckpt"][0], latent=g["encode"][0], positive=g["positive"][0], sigmas=one[0])
    g.node("SaveLatent", samples=inv[0], filename_prefix="agg_err")
    text = assert_error(comfy.run(g.prompt), "AGG Invert", "'sigmas'")
    assert "at least two sigmas" in text
    assert_next_runs(comfy)


def test_unsupported_model_family(comfy):
    g = guided()
    edm = g.node("ModelSamplingContinuousEDM", model=g["ckpt"][0], sampling="cosmos_rflow", sigma_max=80.0,
                 sigma_min=0.002)
    g.set_input(g["agg"], model=edm[0])
    text = assert_error(comfy.run(g.prompt), "Apply AGG", "'model'")
    assert "COSMOS_RFLOW" in text
    assert_next_runs(comfy)


def test_guider_unsupported_model_family(comfy):
    g = Graph()
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name="agg-tiny-sd15.safetensors")
    edm = g.node("ModelSamplingContinuousEDM", model=ckpt[0], sampling="cosmos_rflow", sigma_max=80.0, sigma_min=0.002)
    pos = g.node("CLIPTextEncode", clip=ckpt[1], text="a cat")
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    loss = g.node("AGGStructureLoss", weight=0.5, source=lat[0])
    guider = g.node("AGGGuider", model=edm[0], positive=pos[0], negative=pos[0], cfg=5.0, loss=loss[0],
                    start_percent=0.0, end_percent=1.0, manifold="none", dds_steps=0, dds_lr=0.05, asymmetric=True)
    noise = g.node("RandomNoise", noise_seed=1)
    sampler = g.node("KSamplerSelect", sampler_name="euler")
    sigmas = g.node("BasicScheduler", model=ckpt[0], scheduler="normal", steps=2, denoise=1.0)
    out = g.node("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=sampler[0], sigmas=sigmas[0],
                 latent_image=lat[0])
    g.node("SaveLatent", samples=out[0], filename_prefix="agg_err")
    assert_error(comfy.run(g.prompt), "AGG Guider", "'model'")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_gradient_skips_the_step_with_one_warning(comfy, caplog, value):
    g = guided()
    bad = g.node("AGGTestPoisonLatent", samples=g["encode"][0], value=value)
    g.set_input(g["loss"], source=bad[0])
    with caplog.at_level(logging.WARNING, logger="AGG"):
        r = comfy.run(g.prompt)
    assert r.ok, r.error_text()[:3000]
    out = r.output(g["sampler"].id)["samples"]
    assert torch.isfinite(out).all()
    events = r.events("agg.terms")
    assert events and all(e["skipped"] for e in events), events
    warnings = [rec for rec in caplog.records if rec.name == "AGG" and "skipped" in rec.getMessage()]
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert "Apply AGG" in warnings[0].getMessage()
    # A skipped step is an unguided one: the result equals the same prompt without AGG.
    plain = img2img(seed=g.prompt[g["sampler"].id]["inputs"]["seed"], steps=4)
    rp = comfy.run(plain.prompt)
    assert torch.equal(rp.output(plain["sampler"].id)["samples"], out)
