"""Image Style Loss on ComfyUI's own CLIP_VISION (the encoders IPAdapter users keep in models/clip_vision).

CLIPVisionLoader picks one of ComfyUI's full-size configurations from the file's keys (ViT-L and up), far too
large for these tests, so the fixture is ComfyUI's real `ClipVisionModel` class built from a tiny configuration of
the same kind (clip_vision_model) with seeded random weights, handed to the graph by a test node.
"""

from __future__ import annotations

import json

import pytest
import torch
from agg_testing.graphs import Graph, img2img

SEEDS = iter(range(18000, 19000))
TINY_CONFIG = {
    "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64, "layer_norm_eps": 1e-5,
    "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
    "patch_size": 8, "projection_dim": 16,
}


class AGGTestTinyCLIPVision:
    """A CLIP_VISION output: comfy.clip_vision.ClipVisionModel from TINY_CONFIG with seeded random weights."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "make"
    CATEGORY = "AGG/testing"
    config_path = ""

    def make(self, seed):
        import comfy.clip_vision

        cv = comfy.clip_vision.ClipVisionModel(self.config_path)
        gen = torch.Generator().manual_seed(seed)
        sd = {}
        for k, v in cv.get_sd().items():
            if "layer_norm" in k or "layernorm" in k or "layrnorm" in k:
                sd[k] = torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)
            else:
                sd[k] = torch.randn(v.shape, generator=gen) * (0.02 if v.ndim > 1 else 0.01)
        missing, unexpected = cv.load_sd(sd)
        assert not missing and not unexpected
        return (cv,)


@pytest.fixture(scope="module")
def session(comfy, tmp_path_factory):
    import nodes

    path = tmp_path_factory.mktemp("clip_vision") / "tiny_clip_vision.json"
    path.write_text(json.dumps(TINY_CONFIG))
    AGGTestTinyCLIPVision.config_path = str(path)
    nodes.NODE_CLASS_MAPPINGS.setdefault("AGGTestTinyCLIPVision", AGGTestTinyCLIPVision)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault("AGGTestTinyCLIPVision", "AGGTestTinyCLIPVision")
    return comfy


def style_graph(seed: int, *, guided: bool, weight: float = 0.5) -> Graph:
    g = img2img(seed=seed, steps=3, size=64)
    if not guided:
        return g
    cv = g.node("AGGTestTinyCLIPVision", name="clip_vision", seed=7)
    style = g.node("ImageInvert", image=g["scale"][0])
    loss = g.node("AGGImageStyleLoss", name="style_loss", clip=cv[0], vae=g["ckpt"][2], style_image=style[0],
                  weight=weight, decoder="linear", cutouts=2, seed=1)
    agg = g.node("AGGApply", model=g["ckpt"][0], loss=loss[0], start_percent=0.0, end_percent=1.0, manifold="none",
                 dds_steps=0, dds_lr=0.5, asymmetric=True)
    g.set_input(g["sampler"], model=agg[0])
    return g


def style_term(r, g: Graph, latents: list[torch.Tensor]) -> list[float]:
    """The built style loss's raw term on clean latents (sigma 0, the first step's cut-outs)."""
    from agg_testing.probes import pack_module

    from agg_kernels.objective import LossContext, evaluate

    runtime = pack_module("nodes.runtime")
    model = r.output(g["ckpt"].id).model
    info = runtime.RunInfo(model, "eps", torch.device("cpu"), tuple(latents[0].shape), torch.tensor([0.0]))
    loss = r.output(g["style_loss"].id).build(info)
    try:
        with torch.inference_mode(False), torch.no_grad():
            out = []
            for lat in latents:
                x0 = model.process_latent_in(lat.float()).clone()
                ctx = LossContext(sigma=torch.zeros(x0.shape[0]), x=x0, family="eps", step=0)
                out.append(float(evaluate(loss, x0, ctx)["style"].mean()))
            return out
    finally:
        info.close()


def test_image_style_loss_follows_a_clip_vision_encoder(session, agg_models):
    seed = next(SEEDS)
    plain = style_graph(seed, guided=False)
    r0 = session.run(plain.prompt)
    assert r0.ok, r0.error_text()[:3000]
    base = r0.output(plain["sampler"].id)["samples"]
    g = style_graph(seed, guided=True)
    r = session.run(g.prompt)
    assert r.ok, r.error_text()[:3000]
    out = r.output(g["sampler"].id)["samples"]
    assert {k for e in r.events("agg.terms") for k in e["terms"]} == {"style"}
    guided, unguided = style_term(r, g, [out, base])
    print(f"style term (1 - cos) on the result {guided:.5f}, unguided {unguided:.5f}")
    assert guided < 0.5 * unguided  # the result's embedding moved toward the style image's
    # The embedding the loss uses is ComfyUI's own image embedding of the same network.
    encoder = pack_module_clip(r, g)
    cv = r.output(g["clip_vision"].id)
    pixels = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ours = encoder.encode_image(clip_normalized(pixels))
        theirs = cv.encode_image(pixels, crop=False)["image_embeds"]
    assert torch.allclose(ours, theirs.float(), atol=1e-4), (ours - theirs).abs().max()


def pack_module_clip(r, g: Graph):
    from agg_testing.probes import pack_module

    clip_model = pack_module("nodes.clip_model")
    return clip_model.image_encoder(r.output(g["clip_vision"].id), "test")


def clip_normalized(pixels: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] in 0..1 -> OpenAI-normalised [B, 3, H, W], quantised as ComfyUI's clip_preprocess does."""
    from agg_kernels.augment import clip_normalize

    x = (pixels * 255).clamp(0, 255).round() / 255
    return clip_normalize(x.movedim(-1, 1))


def test_a_wrong_clip_input_is_named(session):
    from agg_testing.probes import pack_module

    clip_model = pack_module("nodes.clip_model")
    runtime = pack_module("nodes.runtime")
    with pytest.raises(runtime.AGGError, match="Image Style Loss: input 'clip'"):
        clip_model.image_encoder(object(), "Image Style Loss")


def test_the_loss_differentiates_through_comfyuis_own_weights(session):
    """The network the loss uses holds ordinary tensors on the same memory as ComfyUI's weights wherever those are
    already what it runs in (float32 on the CPU); only weights ComfyUI keeps in half precision on the CPU are
    copied (to float32)."""
    g = style_graph(next(SEEDS), guided=True)
    r = session.run(g.prompt)
    assert r.ok, r.error_text()[:3000]
    cv = r.output(g["clip_vision"].id)
    encoder = pack_module_clip(r, g)
    theirs = dict(cv.model.named_parameters())
    ours = dict(encoder._network().named_parameters())
    assert ours.keys() == theirs.keys()
    for k, p in ours.items():
        if theirs[k].dtype == torch.float32:
            assert p.data_ptr() == theirs[k].data_ptr(), k  # shared, not copied
        else:
            assert p.dtype == torch.float32 and torch.equal(p, theirs[k].float()), k
    assert not any(p.is_inference() for p in ours.values())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    (g_x,) = torch.autograd.grad(encoder.encode_image(x).square().sum(), x)
    assert torch.isfinite(g_x).all() and g_x.abs().sum() > 0
