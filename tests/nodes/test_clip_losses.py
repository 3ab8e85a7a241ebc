"""AGG CLIP Loader, CLIP Direction Loss and Image Style Loss in real prompts (tiny open_clip fixture)."""

from __future__ import annotations

import socket

import pytest
import torch
from agg_testing.graphs import Graph, img2img

SEEDS = iter(range(3000, 4000))


def base_graph(agg_models, *, seed: int, ckpt_name: str | None = None) -> Graph:
    kwargs = {"ckpt_name": ckpt_name} if ckpt_name else {}
    return img2img(seed=seed, steps=3, **kwargs)


def with_agg(g: Graph, loss: list, **settings) -> Graph:
    s = dict(start_percent=0.0, end_percent=1.0, manifold="none", dds_steps=0, dds_lr=0.05, asymmetric=True)
    s.update(settings)
    agg = g.node("AGGApply", name="agg", model=g["ckpt"][0], loss=loss, **s)
    g.set_input(g["sampler"], model=agg[0])
    return g


def clip_loss(g: Graph, agg_models, **inputs) -> list:
    name = inputs.pop("name", "clip_loss")
    if "clip" not in g.names:
        g.node("AGGCLIPLoader", name="clip", clip_name=agg_models.open_clip, architecture="auto")
    args = dict(clip=g["clip"][0], vae=g["ckpt"][2], source_text="a photo", target_text="a watercolor painting",
                weight=20.0, decoder="vae", cutouts=2, range_weight=0.0, seed=0)
    args.update(inputs)
    return g.node("AGGCLIPDirectionLoss", name=name, **args)[0]


def sampled(r, g: Graph) -> torch.Tensor:
    assert r.ok, r.error_text()[:3000]
    return r.output(g["sampler"].id)["samples"]


def term_names(r) -> set[str]:
    return {k for e in r.events("agg.terms") for k in e["terms"]}


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection attempt fails the test."""
    attempts = []

    def refuse(self, *args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"network connection attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, *a))
    return attempts


def test_loader_reads_the_local_file_without_network(comfy, agg_models, no_network):
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    g = base_graph(agg_models, seed=next(SEEDS))
    with_agg(g, clip_loss(g, agg_models, decoder="linear", cutouts=1))
    r = comfy.run(g.prompt, fresh=True)  # fresh: the loader really runs under the socket patch
    sampled(r, g)
    assert not no_network
    loaded = r.output(g["clip"].id)
    assert type(loaded).__name__ == "AGGClip"
    assert loaded.name == agg_models.open_clip
    emb = loaded.encode_text(["a cat"])
    assert emb.ndim == 2 and torch.isfinite(emb).all()


def loss_values(r, g: Graph, loss_role: str, latents: list[torch.Tensor]) -> list[dict[str, float]]:
    """The loss a loss node built, evaluated by the pack's own builder on clean latents (VAE latent space, as
    the sampler returns them) at sigma 0 with the first guided step's cut-outs: {term: raw value} per latent."""
    from agg_testing.probes import pack_module

    from agg_kernels.objective import LossContext

    runtime = pack_module("nodes.runtime")
    model = r.output(g["ckpt"].id).model
    info = runtime.RunInfo(model, "eps", torch.device("cpu"), tuple(latents[0].shape), torch.tensor([0.0]))
    loss = r.output(g[loss_role].id).build(info)
    out = []
    try:
        with torch.inference_mode(False), torch.no_grad():
            for lat in latents:
                x0 = model.process_latent_in(lat.float()).clone()
                ctx = LossContext(sigma=torch.zeros(x0.shape[0]), x=x0, family="eps", step=0)
                out.append({k: float(v.mean()) for k, v in loss(x0, ctx).items()})
    finally:
        info.close()
    return out


@pytest.mark.parametrize("decoder,ckpt", [("vae", "checkpoint"), ("vae", "checkpoint_kl"), ("taesd", "checkpoint"),
                                          ("linear", "checkpoint")])
def test_clip_direction_guidance_lowers_its_loss(comfy, agg_models, decoder, ckpt):
    seed = next(SEEDS)
    ckpt_name = getattr(agg_models, ckpt)
    plain = base_graph(agg_models, seed=seed, ckpt_name=ckpt_name)
    base = sampled(comfy.run(plain.prompt), plain)
    g = base_graph(agg_models, seed=seed, ckpt_name=ckpt_name)
    with_agg(g, clip_loss(g, agg_models, decoder=decoder))
    r = comfy.run(g.prompt)
    out = sampled(r, g)
    assert torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-4, "CLIP guidance did not change the result"
    events = r.events("agg.terms")
    assert len(events) == 3
    assert all("clip_direction" in e["terms"] and not e["skipped"] for e in events), events
    # the loss itself, on the final latent: lower than on the unguided result
    guided, unguided = (v["clip_direction"] for v in loss_values(r, g, "clip_loss", [out, base]))
    print(f"{decoder}/{ckpt}: clip_direction on the result {guided:.5f}, unguided {unguided:.5f}")
    assert guided < unguided


def test_each_decoder_option_decodes_differently(comfy, agg_models):
    """vae, taesd and linear, as the loss nodes make them, are three different decoders of the same latent (none
    silently replaced by another), each an image of the source's size. On the checkpoint with a KL VAE: the
    default test checkpoint's VAE is TAESD itself, which decodes as the taesd option does. (That each option
    guides: test_clip_direction_guidance_lowers_its_loss.)"""
    from agg_testing.probes import pack_module

    decoders = pack_module("nodes.decoders")
    runtime = pack_module("nodes.runtime")
    g = base_graph(agg_models, seed=next(SEEDS), ckpt_name=agg_models.checkpoint_kl)
    r = comfy.run(g.prompt)
    sampled(r, g)
    source = r.output(g["encode"].id)["samples"]
    model, vae = r.output(g["ckpt"].id).model, r.output(g["ckpt"].id, index=2)
    info = runtime.RunInfo(model, "eps", torch.device("cpu"), tuple(source.shape), torch.tensor([0.0]))
    pixels = {}
    try:
        with torch.inference_mode(False), torch.no_grad():
            x0 = model.process_latent_in(source.float()).clone()
            for kind in ("vae", "taesd", "linear"):
                pixels[kind] = decoders.make_decoder(kind, vae, info, "CLIP Direction Loss")(x0).float()
    finally:
        info.close()
    size = r.output(g["scale"].id).shape[1:3]
    for kind, px in pixels.items():
        assert px.shape == (1, 3, *size) and torch.isfinite(px).all(), (kind, px.shape)
    kinds = list(pixels)
    for i, a in enumerate(kinds):
        for b in kinds[i + 1:]:
            diff = float((pixels[a] - pixels[b]).abs().mean())
            print(f"decoders {a} / {b}: mean |difference| {diff:.4f}")
            assert diff > 1e-2, (a, b)


def test_source_image_input(comfy, agg_models):
    seed = next(SEEDS)
    g = base_graph(agg_models, seed=seed)
    with_agg(g, clip_loss(g, agg_models, decoder="linear"))
    without = sampled(comfy.run(g.prompt), g)
    g2 = base_graph(agg_models, seed=seed)
    with_agg(g2, clip_loss(g2, agg_models, decoder="linear", source_image=g2["scale"][0]))
    r = comfy.run(g2.prompt)
    with_image = sampled(r, g2)
    assert "clip_direction" in term_names(r)
    # The source image's embedding enters the direction: the guided result differs.
    assert not torch.equal(with_image, without)


def test_image_style_loss(comfy, agg_models):
    seed = next(SEEDS)
    plain = base_graph(agg_models, seed=seed)
    base = sampled(comfy.run(plain.prompt), plain)
    g = base_graph(agg_models, seed=seed)
    clip = g.node("AGGCLIPLoader", name="clip", clip_name=agg_models.open_clip)
    style_img = g.node("ImageInvert", image=g["scale"][0])
    loss = g.node("AGGImageStyleLoss", name="style_loss", clip=clip[0], vae=g["ckpt"][2], style_image=style_img[0], weight=20.0,
                  decoder="taesd", cutouts=2, seed=1)
    with_agg(g, loss[0])
    r = comfy.run(g.prompt)
    out = sampled(r, g)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-4
    assert "style" in term_names(r)
    guided, unguided = (v["style"] for v in loss_values(r, g, "style_loss", [out, base]))
    print(f"style on the result {guided:.5f}, unguided {unguided:.5f}")
    assert guided < unguided


def test_chained_structure_and_clip_report_both_terms(comfy, agg_models):
    g = base_graph(agg_models, seed=next(SEEDS))
    structure = g.node("AGGStructureLoss", weight=0.5, source=g["encode"][0])
    with_agg(g, clip_loss(g, agg_models, decoder="linear", loss=structure[0]), manifold="finite_difference")
    r = comfy.run(g.prompt)
    sampled(r, g)
    events = r.events("agg.terms")
    assert events
    for e in events:
        assert {"structure", "clip_direction"} <= set(e["terms"]), e


def test_text_embeddings_are_cached_per_prompt(comfy, agg_models):
    g = base_graph(agg_models, seed=next(SEEDS))
    with_agg(g, clip_loss(g, agg_models, decoder="linear", target_text="an oil painting of a harbour"))
    r = comfy.run(g.prompt)
    sampled(r, g)
    clip = r.output(g["clip"].id)
    keys = [k for k in clip._text_cache if any("an oil painting of a harbour" in t for t in k)]
    assert len(keys) == 1

    calls = []
    encode = clip.model.encode_text

    def counting(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    clip.model.encode_text = counting
    try:
        # The same texts again (another seed re-runs the loss node): served from the cache.
        g2 = base_graph(agg_models, seed=next(SEEDS))
        with_agg(g2, clip_loss(g2, agg_models, decoder="linear", target_text="an oil painting of a harbour", seed=7))
        r2 = comfy.run(g2.prompt)
        sampled(r2, g2)
        assert r2.output(g2["clip"].id) is clip, "the loader should be served from ComfyUI's cache"
        assert calls == []
        # A new target text is encoded once (the source text stays cached).
        g3 = base_graph(agg_models, seed=next(SEEDS))
        with_agg(g3, clip_loss(g3, agg_models, decoder="linear", target_text="a charcoal sketch of a harbour"))
        sampled(comfy.run(g3.prompt), g3)
        assert len(calls) == 1
    finally:
        del clip.model.encode_text
