"""AGG leaves nothing behind: the input MODEL samples exactly as before, the autograd manifold mode
restores the weights and drops its gradient copy, and repeated guided runs do not grow memory."""

from __future__ import annotations

import gc
import sys

import psutil
import torch
from agg_testing.graphs import Graph, img2img

CKPT_ID = "1"  # img2img's checkpoint loader: the same cached MODEL object in every prompt here


def runtime_module():
    """The pack's nodes.runtime module as ComfyUI's custom-node loader imported it (the one Apply AGG uses)."""
    import nodes

    apply = sys.modules[nodes.NODE_CLASS_MAPPINGS["AGGApply"].__module__]
    return sys.modules[apply.install.__module__]


def plain(seed: int, sampler_id: str | None = None, steps: int = 4) -> Graph:
    g = img2img(seed=seed, steps=steps)
    assert g["ckpt"].id == CKPT_ID
    if sampler_id is not None:  # the same sampling under another node id: never served from the cache
        old = g["sampler"].id
        g.prompt[sampler_id] = g.prompt.pop(old)
        g.rewire([old, 0], [sampler_id, 0])
        g.names["sampler"] = type(g["sampler"])(sampler_id, "KSampler")
    return g


def guided(seed: int, manifold: str = "finite_difference", steps: int = 4, clip: bool = False,
           agg_models=None) -> Graph:
    g = img2img(seed=seed, steps=steps)
    loss = g.node("AGGStructureLoss", weight=0.5, source=g["encode"][0])
    if clip:
        c = g.node("AGGCLIPLoader", clip_name=agg_models.open_clip)
        loss = g.node("AGGCLIPDirectionLoss", clip=c[0], vae=g["ckpt"][2], source_text="a photo",
                      target_text="a watercolor painting", weight=2.0, loss=loss[0], decoder="vae", cutouts=1)
    agg = g.node("AGGApply", name="agg", model=g["ckpt"][0], loss=loss[0], start_percent=0.0, end_percent=1.0,
                 manifold=manifold, dds_steps=1, dds_lr=0.05, asymmetric=True)
    g.set_input(g["sampler"], model=agg[0])
    return g


def latent(r, g: Graph) -> torch.Tensor:
    assert r.ok, r.error_text()[:3000]
    return r.output(g["sampler"].id)["samples"]


def weights(model_patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model_patcher.model.diffusion_model.state_dict().items()}


def live(type_name: str) -> list:
    gc.collect()
    cls = getattr(runtime_module(), type_name)
    return [o for o in gc.get_objects() if type(o) is cls]


def test_input_model_samples_bit_identically_after_a_guided_run(comfy):
    g0 = plain(seed=71)
    before = latent(comfy.run(g0.prompt, fresh=True), g0)
    gg = guided(seed=71)
    guided_out = latent(comfy.run(gg.prompt), gg)
    assert not torch.equal(guided_out, before), "the guided run should differ (else this test proves nothing)"
    g1 = plain(seed=71, sampler_id="901")
    r1 = comfy.run(g1.prompt)
    after = latent(r1, g1)
    assert not r1.events("agg.terms"), "an unguided run must not be guided"
    assert torch.equal(after, before)


def test_autograd_mode_restores_weights_and_drops_the_gradient_copy(comfy, monkeypatch):
    runtime = runtime_module()
    made = []
    init = runtime.GradientWeights.__init__

    def counting_init(self, module):
        made.append(1)
        init(self, module)

    monkeypatch.setattr(runtime.GradientWeights, "__init__", counting_init)

    g0 = plain(seed=72)
    r0 = comfy.run(g0.prompt)
    before = latent(r0, g0)
    model = r0.output(CKPT_ID)
    w0 = weights(model)
    flags0 = [p.requires_grad for p in model.model.diffusion_model.parameters()]

    gg = guided(seed=72, manifold="autograd")
    latent(comfy.run(gg.prompt), gg)
    assert made, "the autograd mode made no gradient copy (so this test proves nothing)"

    assert comfy.run(gg.prompt).output(CKPT_ID) is model  # the same cached MODEL
    w1 = weights(model)
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "the model's weights changed"
    params = list(model.model.diffusion_model.parameters())
    assert all(p.grad is None for p in params), "a gradient was left on the model's weights"
    assert [p.requires_grad for p in params] == flags0
    assert live("GradientWeights") == [], "a gradient copy of the weights outlived the run"
    assert live("Run") == [], "a run's closures outlived the run"

    g1 = plain(seed=72, sampler_id="902")
    assert torch.equal(latent(comfy.run(g1.prompt), g1), before)


def test_rss_does_not_grow_over_repeated_guided_runs(comfy, agg_models):
    proc = psutil.Process()
    mib = 1024 * 1024

    def run(seed: int) -> float:
        g = guided(seed=seed, manifold="autograd", steps=2, clip=True, agg_models=agg_models)
        r = comfy.run(g.prompt)
        assert torch.isfinite(latent(r, g)).all()
        assert r.events("agg.terms")
        gc.collect()
        return proc.memory_info().rss / mib

    warm = [run(500)]
    figures = [run(510 + i) for i in range(5)]
    growth = max(figures) - figures[0]
    print(f"RSS MiB: warm-up {[round(v, 1) for v in warm]}, runs {[round(v, 1) for v in figures]}, "
          f"growth {growth:.1f} MiB")
    assert live("Run") == [] and live("GradientWeights") == []
    assert growth < 48.0, f"RSS grew {growth:.1f} MiB over 5 guided runs: {figures}"
