"""Every loss, decoder, manifold and exact sampler on 16-channel flow models, in real prompts.

The models are the generated fixtures of agg_testing.sd3, loaded as SD3 / Flux graphs load theirs (UNETLoader,
CLIPLoader type sd3, VAELoader taesd3 / taef1): an SD3-shaped MMDiT that ComfyUI detects as SD3
(ModelSamplingDiscreteFlow, CONST, shift 3; 16-channel SD3 latent format) and a Flux-shaped DiT (one double and
one single block at Flux's fixed width 3072; ModelSamplingFlux; guidance embedding, sampled with FluxGuidance and
cfg 1). The Flux model costs ~1 s per pass on two CPU cores, so it runs a subset that still covers every loss,
decoder and manifold once, and the exact samplers with the cheapest manifold.
"""

from __future__ import annotations

import pytest
import torch
from agg_testing import graphs, probes, sd3
from agg_testing.analytic import ancestral_expected
from agg_testing.graphs import Graph

SEEDS = iter(range(15000, 16000))
SIZE = 64  # 8 x 8 latents: 16 MMDiT tokens, enough pixels for CLIP's 32 px crops
STEPS = 3
FLUX_STEPS = 2
TOL = 1e-4


# ---------------------------------------------------------------------------------------------------
# Step recorder: what the sampler stepped from and to, around the real Apply AGG


RECORDS: dict[str, list[dict]] = {}


class AGGTestStepRecorder:
    """MODEL -> MODEL clone with a PREDICT_NOISE wrapper recording every call into RECORDS[tag].

    Placed before Apply AGG (position "outer") it sees each sampler step: the state x, sigma, the value the
    sampler steps with, and the run's pending (returned, shown) pair, i.e. D + delta. Placed after it ("inner")
    it sees every model evaluation AGG makes, the first at x being the step's own denoised value D."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "steps"}),
                             "position": (["outer", "inner"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "AGG/testing"

    def patch(self, model, tag, position):
        import comfy.patcher_extension as pe

        runs_key = probes.pack_module("nodes.runtime").RUNS_KEY
        records = RECORDS.setdefault(f"{tag}/{position}", [])

        def record(executor, x, timestep, model_options, seed):
            out = executor(x, timestep, model_options, seed)
            entry = {"x": x.detach().float().clone(), "sigma": float(timestep.flatten()[0]),
                     "out": out.detach().float().clone()}
            if position == "outer":
                runs = model_options.get("transformer_options", {}).get(runs_key, {})
                pending = [r.pending for r in runs.values() if r.pending is not None]
                entry["shown"] = pending[0][1].detach().float().clone() if pending else None
            records.append(entry)
            return out

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, f"agg_test_record_{tag}_{position}", record)
        return (m,)


def register_recorder() -> None:
    import nodes

    nodes.NODE_CLASS_MAPPINGS.setdefault("AGGTestStepRecorder", AGGTestStepRecorder)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault("AGGTestStepRecorder", "AGGTestStepRecorder")


# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def session(comfy):
    probes.register()
    register_recorder()
    return comfy


@pytest.fixture(scope="module")
def flux(session, agg_models):
    """The session with the Flux-shaped fixture linked into its models tree (generated on first use)."""
    sd3.link_flow_models(agg_models.root, flux=True)
    return session


# ---------------------------------------------------------------------------------------------------
# Graph pieces


def apply_agg(g: Graph, loss: list, *, consumer: str = "sampler", **settings):
    s = dict(start_percent=0.0, end_percent=1.0, manifold="finite_difference", dds_steps=1, dds_lr=0.5,
             asymmetric=True)
    s.update(settings)
    node = g[consumer]
    apply = g.node("AGGApply", name="agg", model=g.prompt[node.id]["inputs"]["model"], loss=loss, **s)
    g.set_input(node, model=apply[0])
    return apply


def clip_loader(g: Graph, agg_models):
    if "open_clip" not in g.names:
        g.node("AGGCLIPLoader", name="open_clip", clip_name=agg_models.open_clip, architecture="auto")
    return g["open_clip"]


LOSSES = ["structure_source", "structure_trajectory", "clip_direction", "image_style"]
TERM = {"structure_source": "structure", "structure_trajectory": "structure", "clip_direction": "clip_direction",
        "image_style": "style"}


def add_loss(g: Graph, kind: str, agg_models, *, decoder: str = "vae", weight: float | None = None) -> list:
    """The loss `kind` (role "loss"); structure_trajectory turns the graph into AGG Invert's chain first."""
    if kind == "structure_source":
        return g.node("AGGStructureLoss", name="loss", weight=weight or 0.3, source=g["encode"][0])[0]
    if kind == "structure_trajectory":
        if "invert" not in g.names:
            graphs.flow_inverted(g, steps=g.prompt[g["sampler"].id]["inputs"]["steps"])
        return g.node("AGGStructureLoss", name="loss", weight=weight or 0.3, trajectory=g["invert"][1])[0]
    clip = clip_loader(g, agg_models)
    if kind == "clip_direction":
        return g.node("AGGCLIPDirectionLoss", name="loss", clip=clip[0], vae=g["vae"][0], source_text="a photo",
                      target_text="a watercolor painting", weight=weight or 0.5, decoder=decoder, cutouts=2,
                      range_weight=0.0, seed=0)[0]
    if kind == "image_style":
        style = g.node("ImageInvert", name="style_image", image=g["scale"][0])
        return g.node("AGGImageStyleLoss", name="loss", clip=clip[0], vae=g["vae"][0], style_image=style[0],
                      weight=weight or 0.5, decoder=decoder, cutouts=2, seed=1)[0]
    raise ValueError(kind)


def sampler_role(g: Graph) -> str:
    return "custom" if "custom" in g.names else "sampler"


def guided_graph(kind: str, agg_models, *, flux: bool = False, seed: int, decoder: str = "vae",
                 manifold: str = "finite_difference", guided: bool = True, **graph_args) -> Graph:
    g = graphs.flow_img2img(flux=flux, size=SIZE, seed=seed, steps=FLUX_STEPS if flux else STEPS, **graph_args)
    loss = add_loss(g, kind, agg_models, decoder=decoder)
    if guided:
        apply_agg(g, loss, consumer="guider" if "guider" in g.names else "sampler", manifold=manifold)
    return g


def samples(r, g: Graph) -> torch.Tensor:
    assert r.ok, r.error_text()[:4000]
    return r.output(g[sampler_role(g)].id)["samples"]


def final_loss(r, g: Graph, latent: torch.Tensor) -> float:
    """The graph's loss (its weighted terms) evaluated at a final latent, with a freshly built loss (the same
    crops for every latent it is asked about)."""
    runtime = probes.pack_module("nodes.runtime")
    objective = probes.pack_module("agg_kernels.objective")
    model = r.output(g["unet"].id).model
    x0 = model.process_latent_in(latent.float()).clone()
    info = runtime.RunInfo(model, "const", torch.device("cpu"), tuple(x0.shape), torch.tensor([1e-3, 0.0]))
    loss = r.output(g["loss"].id).build(info)
    try:
        with torch.inference_mode(False), torch.no_grad():
            x0 = x0.clone()
            ctx = objective.LossContext(sigma=torch.full((x0.shape[0],), 1e-3), x=x0, family="const")
            return float(objective.total(loss(x0, ctx), objective.weights_of(loss)).mean())
    finally:
        info.close()


def events_for(r, term: str) -> list[dict]:
    return [e for e in r.events("agg.terms") if term in e["terms"]]


# ---------------------------------------------------------------------------------------------------
# The fixtures are what they claim to be


def test_sd3_fixture_loads_as_sd3(session):
    g = graphs.flow_img2img(size=SIZE, seed=next(SEEDS))
    r = session.run(g.prompt)
    out = samples(r, g)
    model = r.output(g["unet"].id).model
    ms = model.model_sampling
    import comfy.model_sampling as cms

    assert type(model).__name__ == "SD3" and type(model.latent_format).__name__ == "SD3"
    assert isinstance(ms, cms.CONST) and isinstance(ms, cms.ModelSamplingDiscreteFlow)
    assert ms.shift == pytest.approx(3.0)
    assert model.diffusion_model.hidden_size == 64 * sd3.MMDIT_DEPTH
    assert len(model.diffusion_model.joint_blocks) == sd3.MMDIT_DEPTH
    vae = r.output(g["vae"].id)
    assert vae.latent_channels == 16
    cond, meta = r.output(g["positive"].id)[0]
    assert tuple(cond.shape) == (1, 77, 4096) and tuple(meta["pooled_output"].shape) == (1, 2048)
    assert out.shape == (1, 16, SIZE // 8, SIZE // 8) and torch.isfinite(out).all()


def test_flux_fixture_loads_as_flux(flux):
    g = graphs.flow_img2img(flux=True, size=SIZE, seed=next(SEEDS), steps=FLUX_STEPS)
    r = flux.run(g.prompt)
    out = samples(r, g)
    model = r.output(g["unet"].id).model
    import comfy.model_sampling as cms

    assert type(model).__name__ == "Flux" and type(model.latent_format).__name__ == "Flux"
    assert isinstance(model.model_sampling, cms.ModelSamplingFlux) and isinstance(model.model_sampling, cms.CONST)
    assert model.diffusion_model.hidden_size == 3072 and model.diffusion_model.params.guidance_embed
    assert r.output(g["guidance"].id)[0][0][1]["guidance"] == pytest.approx(3.5)
    assert r.output(g["vae"].id).latent_channels == 16
    assert out.shape == (1, 16, SIZE // 8, SIZE // 8) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------
# Regression: CLIP Direction Loss on a flow model (inference tensors kept for backward)


@pytest.mark.parametrize("decoder", ["linear", "vae"])
def test_clip_direction_runs_and_lowers_the_loss_on_a_flow_model(session, agg_models, decoder):
    seed = next(SEEDS)
    plain = guided_graph("clip_direction", agg_models, seed=seed, decoder=decoder, guided=False)
    base = samples(session.run(plain.prompt), plain)
    g = guided_graph("clip_direction", agg_models, seed=seed, decoder=decoder)
    r = session.run(g.prompt)
    out = samples(r, g)
    assert torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3, "CLIP guidance did not change the result"
    events = events_for(r, "clip_direction")
    assert len(events) == STEPS and not any(e["skipped"] for e in events), r.events("agg.terms")
    guided_loss, plain_loss = final_loss(r, g, out), final_loss(r, g, base)
    print(f"clip_direction/{decoder}: loss unguided {plain_loss:.5f} -> guided {guided_loss:.5f}")
    assert guided_loss < plain_loss


# ---------------------------------------------------------------------------------------------------
# The matrix: every loss x decoder x manifold on the SD3-shaped model (cfg 5), a covering subset on Flux (cfg 1)

MANIFOLDS = ["finite_difference", "autograd", "none"]
DECODERS = ["vae", "taesd", "linear"]
MATRIX = [(loss, None, m) for loss in ("structure_source", "structure_trajectory") for m in MANIFOLDS] + [
    (loss, d, m) for loss in ("clip_direction", "image_style") for d in DECODERS for m in MANIFOLDS]
# Flux: each loss, decoder and manifold at least once.
FLUX_MATRIX = [("structure_source", None, "finite_difference"), ("structure_trajectory", None, "none"),
               ("clip_direction", "taesd", "autograd"), ("clip_direction", "linear", "none"),
               ("image_style", "vae", "finite_difference")]
MATRIX_SEED = 15500


def matrix_ids(cells):
    return [f"{loss}-{decoder or 'latent'}-{manifold}" for loss, decoder, manifold in cells]


def check_cell(session, agg_models, loss: str, decoder: str | None, manifold: str, *, flux: bool = False):
    kwargs = dict(flux=flux, seed=MATRIX_SEED, decoder=decoder or "vae")
    plain = guided_graph(loss, agg_models, guided=False, **kwargs)
    base = samples(session.run(plain.prompt), plain)  # same seed for every cell: served from the cache
    g = guided_graph(loss, agg_models, manifold=manifold, **kwargs)
    r = session.run(g.prompt)
    out = samples(r, g)
    assert torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3, "guidance did not change the result"
    events = events_for(r, TERM[loss])
    assert len(events) == (FLUX_STEPS if flux else STEPS), r.events("agg.terms")
    assert not any(e["skipped"] for e in events), events
    guided_loss, plain_loss = final_loss(r, g, out), final_loss(r, g, base)
    print(f"{'flux' if flux else 'sd3'} {loss}/{decoder or '-'}/{manifold}: loss {plain_loss:.5f} -> "
          f"{guided_loss:.5f} ({r.seconds:.1f} s)")
    assert guided_loss < plain_loss


@pytest.mark.parametrize("loss,decoder,manifold", MATRIX, ids=matrix_ids(MATRIX))
def test_sd3_matrix(session, agg_models, loss, decoder, manifold):
    check_cell(session, agg_models, loss, decoder, manifold)


@pytest.mark.parametrize("loss,decoder,manifold", FLUX_MATRIX, ids=matrix_ids(FLUX_MATRIX))
def test_flux_matrix(flux, agg_models, loss, decoder, manifold):
    check_cell(flux, agg_models, loss, decoder, manifold, flux=True)


# ---------------------------------------------------------------------------------------------------
# Exact samplers: each realised step is the asymmetric step written from (x_i, D_i, delta_i), within 1e-4

EXACT = ["euler", "euler_ancestral", "lcm", "agg"]
AGG_ZONES = {"eta_edit": 0.0, "eta": 0.5, "eta_boost": 1.0, "edit_end": 0.25, "boost_start": 0.5}


def exact_graph(sampler: str, *, flux: bool, cfg: float, seed: int, steps: int, manifold: str) -> Graph:
    """img2img with Structure Loss, the outer recorder before Apply AGG and the inner one after it. The AGG
    sampler runs in SamplerCustom (role "custom") with BasicScheduler ("sigmas") on the KSampler's settings."""
    tag = f"exact-{seed}"
    g = graphs.flow_img2img(flux=flux, size=SIZE, seed=seed, steps=steps, cfg=cfg,
                            sampler_name="euler" if sampler == "agg" else sampler)
    unet = g["unet"]
    outer = g.node("AGGTestStepRecorder", name="outer", model=unet[0], tag=tag, position="outer")
    loss = g.node("AGGStructureLoss", name="loss", weight=0.3, source=g["encode"][0])
    agg = g.node("AGGApply", name="agg", model=outer[0], loss=loss[0], start_percent=0.0, end_percent=1.0,
                 manifold=manifold, dds_steps=1, dds_lr=0.5, asymmetric=True)
    inner = g.node("AGGTestStepRecorder", name="inner", model=agg[0], tag=tag, position="inner")
    g.set_input(g["sampler"], model=inner[0])
    if sampler == "agg":
        ks = g.prompt.pop(g["sampler"].id)["inputs"]
        sigmas = g.node("BasicScheduler", name="sigmas", model=unet[0], scheduler=ks["scheduler"], steps=steps,
                        denoise=ks["denoise"])
        select = g.node("AGGSampler", name="select", **AGG_ZONES)
        custom = g.node("SamplerCustom", name="custom", model=inner[0], add_noise=True, noise_seed=seed, cfg=cfg,
                        positive=ks["positive"], negative=ks["negative"], sampler=select[0], sigmas=sigmas[0],
                        latent_image=g["encode"][0])
        g.set_input(g["save_latent"], samples=custom[0])
    return g


def realised_steps(r, g: Graph, seed: int) -> list[dict]:
    """Per sampler step: x, sigma, sigma_next, D, delta, the realised next state, and the compensated value."""
    tag = f"exact-{seed}"
    outer, inner = RECORDS.pop(f"{tag}/outer"), RECORDS.pop(f"{tag}/inner")
    model = r.output(g["unet"].id).model
    final = model.process_latent_in(samples(r, g).float())
    steps = []
    for i, o in enumerate(outer):
        d = next(e["out"] for e in inner if e["sigma"] == o["sigma"] and torch.equal(e["x"], o["x"]))
        assert o["shown"] is not None, "Apply AGG did not guide this step"
        nxt = outer[i + 1] if i + 1 < len(outer) else None
        steps.append({"x": o["x"], "sigma": o["sigma"], "sigma_next": nxt["sigma"] if nxt else 0.0, "D": d,
                      "delta": o["shown"] - d, "returned": o["out"], "shown": o["shown"],
                      "next": nxt["x"] if nxt else final})
    return steps


def expected_next(sampler: str, st: dict, noise, eta: float) -> torch.Tensor:
    s, sn = st["sigma"], st["sigma_next"]
    if sampler == "lcm":
        guided = (st["D"] + st["delta"]).double()
        return guided if sn == 0 else (1 - sn) * guided + sn * noise().double()
    z = noise() if (eta and sn > 0) else torch.zeros_like(st["x"])
    return ancestral_expected(st["x"], st["D"], st["delta"], s, sn, eta, "const", z)


def check_exact(session, sampler: str, *, flux: bool, cfg: float, seed: int, steps: int, manifold: str) -> float:
    import comfy.k_diffusion.sampling as kds

    g = exact_graph(sampler, flux=flux, cfg=cfg, seed=seed, steps=steps, manifold=manifold)
    r = session.run(g.prompt)  # a new seed and tag: every node after the loaders runs again
    taken = realised_steps(r, g, seed)
    assert len(taken) == steps
    if sampler == "agg":
        sigmas = r.output(g["sigmas"].id).flatten().float()
        eta_at = probes.pack_module("agg_kernels.sampler").sampler_eta_at
        etas = [eta_at(sigmas, st["sigma"], **AGG_ZONES) for st in taken]
        assert {0.0, 1.0} <= set(etas), etas  # the edit and boost zones are both exercised
        draw = probes.pack_module("agg_kernels.sampler").default_noise(taken[0]["x"], seed)
    else:
        etas = [1.0 if sampler == "euler_ancestral" else 0.0] * steps
        draw = kds.default_noise_sampler(taken[0]["x"], seed=seed)
    noise = lambda: draw(None, None)  # noqa: E731 - the samplers' own generator, drawn in the same order
    worst = 0.0
    for st, eta in zip(taken, etas, strict=True):
        assert st["delta"].abs().max() > 1e-3, "guidance did nothing"
        want = expected_next(sampler, st, noise, eta).float()
        err = float((st["next"] - want).abs().max())
        worst = max(worst, err)
        assert err < TOL, (sampler, st["sigma"], err)
    if sampler in ("euler", "euler_ancestral"):
        # the compensation is real: the value the sampler stepped with is not the displayed D + delta
        assert any((st["returned"] - st["shown"]).abs().max() > 1e-3 for st in taken[:-1])
    scale = max(float(st["next"].abs().max()) for st in taken)
    print(f"{'flux' if flux else 'sd3'} {sampler} cfg {cfg}: max |realised - asymmetric step| {worst:.2e} "
          f"(|x| up to {scale:.2f}, {steps} steps)")
    return worst


@pytest.mark.parametrize("cfg", [5.0, 1.0], ids=["cfg5", "cfg1"])
@pytest.mark.parametrize("sampler", EXACT)
def test_sd3_exact_samplers_realise_the_asymmetric_step(session, sampler, cfg):
    check_exact(session, sampler, flux=False, cfg=cfg, seed=next(SEEDS), steps=4, manifold="finite_difference")


@pytest.mark.parametrize("sampler", EXACT)
def test_flux_exact_samplers_realise_the_asymmetric_step(flux, sampler):
    check_exact(flux, sampler, flux=True, cfg=1.0, seed=next(SEEDS), steps=FLUX_STEPS, manifold="none")
