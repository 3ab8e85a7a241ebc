"""Apply AGG composes with what sits before it in the graph (ControlNet, LoRA, ModelSamplingSD3, batches, cfg 1)
and guidance moves the result the way the loss asks."""

from __future__ import annotations

import pytest
import torch
from agg_testing import graphs, probes
from agg_testing.graphs import Graph

STEPS = 3


@pytest.fixture(scope="module")
def session(comfy):
    probes.register()
    return comfy


def run_latent(session, g, role="sampler"):
    r = session.run(g.prompt)
    assert r.ok, r.error_text()
    out = r.output(g[role].id)["samples"]
    assert torch.isfinite(out).all()
    return r, out


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def records(tag: str, kind: str) -> list[dict]:
    return [rec for rec in probes.RECORDS[tag] if rec["kind"] == kind]


def probes_made(r) -> int:
    """The finite-difference probes a run's guided steps made: one per sub-step (a long step of this 3-step
    schedule is taken in several, agg_kernels.strength.substeps)."""
    return sum(e["substeps"] for e in r.events("agg.terms"))


def probed(tag: str, **kw):
    probes.RECORDS[tag].clear()
    return probes.agg_img2img(probe=tag, steps=STEPS, **kw)


# -- model passes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("manifold, extra", [("finite_difference", 1), ("none", 0)])
def test_model_passes_per_guided_step(session, manifold, extra):
    tag = f"passes_{manifold}"
    g = probed(tag, seed=301 + extra, manifold=manifold)
    r, _ = run_latent(session, g)
    assert len(r.events("agg.terms")) == STEPS
    guided = probes_made(r)
    calls = records(tag, "calc_cond_batch")
    assert len(calls) == STEPS + extra * guided
    # the sampler's passes are the full CFG model (cond + uncond); the finite-difference probe is the
    # conditional prediction alone (half a CFG pass)
    assert sum(c["conds"] == 2 for c in calls) == STEPS
    assert sum(c["conds"] == 1 for c in calls) == extra * guided
    assert len(records(tag, "apply_model")) >= len(calls)


def test_guidance_window_limits_the_extra_passes(session):
    tag = "window"
    g = probed(tag, seed=303, end_percent=0.75)  # the schedule's second sigma: the first step only
    r, _ = run_latent(session, g)
    assert len(r.events("agg.terms")) == 1
    assert len(records(tag, "calc_cond_batch")) == STEPS + probes_made(r)


def test_cfg_one_makes_no_uncond_pass(session):
    tag = "cfg1"
    g = probed(tag, seed=304, cfg=1.0)
    r, _ = run_latent(session, g)
    guided = probes_made(r)
    calls = records(tag, "calc_cond_batch")
    assert len(r.events("agg.terms")) == STEPS and len(calls) == STEPS + guided
    assert all(c["conds"] == 1 for c in calls)
    assert all(a["batch"] == 1 for a in records(tag, "apply_model"))


def control_rows(rec: dict, which: int) -> list[torch.Tensor]:
    """The ControlNet residuals of the cond (0) or uncond (1) rows of one apply_model pass."""
    order = rec["cond_or_uncond"]
    per = rec["batch"] // len(order)
    k = order.index(which)
    return [t[k * per:(k + 1) * per] for t in rec["control_out"]]


def test_controlnet_is_honoured_on_every_pass(session):
    tag = "controlnet"
    g = probed(tag, seed=305)
    graphs.with_controlnet(g, strength=1.0)
    r, _ = run_latent(session, g)
    guided = probes_made(r)
    passes = records(tag, "apply_model")
    assert len(r.events("agg.terms")) == STEPS and len(records(tag, "calc_cond_batch")) == STEPS + guided
    assert len(passes) == STEPS + guided  # the sampler's CFG pass per step, the finite-difference probe per sub-step
    assert all(p["control"] and p["control_out"] for p in passes), [(p["sigma"], p["control_keys"]) for p in passes]
    main = [p for p in passes if len(p["cond_or_uncond"]) == 2]
    probe = [p for p in passes if p["cond_or_uncond"] == [0]]  # the probe is the conditional prediction alone
    assert len(main) == STEPS and len(probe) == guided
    for q in probe:
        m = next(m for m in main if m["sigma"] == q["sigma"])  # the step's own CFG pass
        # the probe's ControlNet residuals are recomputed at the probed x: near the main pass's cond rows (the
        # probe moves x by 2 % of sigma), but not a copy of them
        for a, b in zip(control_rows(m, 0), control_rows(q, 0), strict=True):
            rel = float((a - b).norm() / a.norm())
            assert 1e-6 < rel < 0.5, (m["sigma"], rel)


def controlnet_first_step(session, *, strip: bool) -> dict:
    """The first guided step under a strength-1 ControlNet (Structure Loss 0.006, about 0.05 per step over this
    3-step run's share of the window; finite differences, no refinement); `strip`: the probe pass runs without the
    ControlNet (the counting probe removes it)."""
    g = probes.agg_img2img(seed=306, probe=f"cn_strip_{strip}")
    g.set_input(g["probe"], strip_probe_control=strip)
    g.set_input(g["loss"], weight=0.006)
    g.set_input(g["apply"], dds_steps=0)
    graphs.with_controlnet(g, strength=1.0)
    with probes.guided_steps() as calls:
        r, _ = run_latent(session, g)
    first = calls[0]
    assert first["guided"]
    source = r.output(g["encode"].id)["samples"]
    model = r.output(g["ckpt"].id).model
    first["toward_source"] = model.process_latent_in(source.float()) - first["D"]
    first["event"] = r.events("agg.terms")[0]
    return first


def test_controlnet_enters_the_probe(session):
    """The finite-difference probe sees the ControlNet: its step points toward the source; the same probe with the
    ControlNet removed (its difference then holds the ControlNet's effect divided by the probe's small step) gives
    another step, apart from it by more than the step's own size."""
    real = controlnet_first_step(session, strip=False)
    stripped = controlnet_first_step(session, strip=True)
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    print(f"sigma {real['sigma']:.4g}: step rms {rms(real['delta']):.5f}, cos to the source "
          f"{cos(real['delta'], real['toward_source']):.3f}; probe without the ControlNet: rms "
          f"{rms(stripped['delta']):.5f}, cos {cos(stripped['delta'], stripped['toward_source']):.3f}, apart by "
          f"{rms(stripped['delta'] - real['delta']):.5f}")
    # measured: step rms 0.167, cos 0.74; without the ControlNet in the probe rms 0.661, cos 0.63, apart by 0.599
    # (3.6x the step)
    assert real["event"]["fallback"] is None and not real["event"]["trust_region"]
    assert cos(real["delta"], real["toward_source"]) > 0.5
    assert rms(stripped["delta"] - real["delta"]) > 0.95 * rms(real["delta"])


def test_autograd_under_controlnet_falls_back_to_finite_difference_once(session, caplog):
    """The ControlNet's weights are inference tensors, so the exact Jacobian is out of reach: the run says so
    once and continues with finite differences, giving the finite-difference run's result."""
    import logging

    def graph(manifold: str):
        g = probes.agg_img2img(seed=312, manifold=manifold)
        graphs.with_controlnet(g, strength=1.0)
        return g

    _, fd = run_latent(session, graph("finite_difference"))
    with caplog.at_level(logging.WARNING, logger="AGG"):
        r, ad = run_latent(session, graph("autograd"))
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "AGG" and rec.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "Apply AGG" in warnings[0] and "autograd" in warnings[0] and "finite_difference" in warnings[0]
    events = r.events("agg.terms")
    assert len(events) == STEPS and not any(e["skipped"] for e in events)
    assert torch.allclose(ad, fd, rtol=1e-4, atol=1e-4), float((ad - fd).abs().max())


# -- LoRA -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_name(session, agg_models, tmp_path_factory):
    """A rank-4 LoRA on the tiny UNet's first time-embedding layer, in a registered 'loras' folder."""
    import folder_paths
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = agg_models.path("checkpoints", agg_models.checkpoint)
    with safe_open(str(ckpt), framework="pt") as f:
        out_f, in_f = f.get_slice("model.diffusion_model.time_embed.0.weight").get_shape()
    g = torch.Generator().manual_seed(0)
    rank = 4
    key = "lora_unet_time_embed_0"
    tensors = {
        f"{key}.lora_up.weight": torch.randn((out_f, rank), generator=g) * 0.5,
        f"{key}.lora_down.weight": torch.randn((rank, in_f), generator=g) * 0.5,
        f"{key}.alpha": torch.tensor(float(rank)),
    }
    folder = tmp_path_factory.mktemp("loras")
    name = "agg-test-lora.safetensors"
    save_file(tensors, str(folder / name))
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    return name


def test_lora_patched_model_is_guided(session, lora_name):
    def graph(lora: bool, guided: bool):
        g = probes.agg_img2img(seed=307, weight=None)
        if lora:
            graphs.insert_model_patch(g, "LoraLoaderModelOnly", name="lora", lora_name=lora_name, strength_model=1.0)
        if guided:
            probes.add_agg(g)
        return g

    _, plain = run_latent(session, graph(False, False))
    _, lora = run_latent(session, graph(True, False))
    r, lora_agg = run_latent(session, graph(True, True))
    assert (lora - plain).abs().max() > 1e-3, "the LoRA did not change the model"
    assert len(r.events("agg.terms")) == STEPS
    source = r.output(graph(True, True)["encode"].id)["samples"]
    assert l1(lora_agg, source) < l1(lora, source), (l1(lora_agg, source), l1(lora, source))


# -- batches, flow models, autograd ------------------------------------------------------------------


def batch_graph(guided: bool, which: str) -> Graph:
    """SamplerCustomAdvanced (euler, noise disabled, 3 steps at denoise 0.6) on the encoded source ("one"), its
    inverted picture ("two") or both as a batch ("both"); Structure Loss on the same latent when `guided`."""
    g = probes.agg_img2img(seed=308, weight=None)
    ks = g.prompt.pop(g["sampler"].id)["inputs"]
    inverted = g.node("ImageInvert", image=g["scale"][0])
    enc2 = g.node("VAEEncode", name="encode2", pixels=inverted[0], vae=g["ckpt"][2])
    latent = {"one": g["encode"][0], "two": enc2[0],
              "both": g.node("LatentBatch", samples1=g["encode"][0], samples2=enc2[0])[0]}[which]
    sigmas = g.node("BasicScheduler", model=ks["model"], scheduler="normal", steps=STEPS, denoise=0.6)
    select = g.node("KSamplerSelect", sampler_name="euler")
    guider = g.node("CFGGuider", name="guider", model=ks["model"], positive=ks["positive"], negative=ks["negative"],
                    cfg=5.0)
    noise = g.node("DisableNoise")
    custom = g.node("SamplerCustomAdvanced", name="custom", noise=noise[0], guider=guider[0], sampler=select[0],
                    sigmas=sigmas[0], latent_image=latent)
    g.set_input(g["save_latent"], samples=custom[0])
    if guided:
        probes.add_agg(g, consumer="guider", source=latent)
    return g


def test_batch_of_two_is_each_image_alone(session):
    """Guidance is per sample: each image of a guided batch of two is what the same image gives guided alone,
    and each is pulled toward its own source."""
    _, both = run_latent(session, batch_graph(True, "both"), role="custom")
    _, plain = run_latent(session, batch_graph(False, "both"), role="custom")
    assert both.shape[0] == 2
    for i, which in enumerate(("one", "two")):
        r, alone = run_latent(session, batch_graph(True, which), role="custom")
        source = r.output(batch_graph(True, which)["encode" if which == "one" else "encode2"].id)["samples"]
        diff = float((both[i] - alone[0]).abs().max())
        removed = 1 - l1(both[i], source) / l1(plain[i], source)
        print(f"image {which}: batch vs alone max |difference| {diff:.2e}; share of the distance to its source "
              f"removed {removed:.3f}")
        # measured: the batch and the single runs agree to 1.1e-4 (float32 batched convolutions) and the guidance
        # removes 0.52 / 0.43 of the unguided distance to each image's own source
        assert diff < 1e-4 * max(float(alone.abs().max()), 1.0), diff
        assert removed > 0.3, removed


def test_flow_model(session):
    def graph(guided: bool):
        g = probes.agg_img2img(seed=309, weight=None)
        graphs.with_flow(g, shift=3.0)
        if guided:
            probes.add_agg(g)
        return g

    _, plain = run_latent(session, graph(False))
    r, out = run_latent(session, graph(True))
    # the last step, from sigma 0.009 to 0, spends almost no schedule time (sigma^2 / (alpha^2 + sigma^2) 8e-5)
    assert [round(e["sigma"], 3) for e in r.events("agg.terms")] == [0.751, 0.503]
    source = r.output(graph(True)["encode"].id)["samples"]
    assert l1(out, source) < l1(plain, source), (l1(out, source), l1(plain, source))


def test_autograd_manifold_on_the_tiny_model(session):
    _, plain = run_latent(session, probes.agg_img2img(seed=311, weight=None))  # shared with the weight sweep
    g = probes.agg_img2img(seed=311, manifold="autograd")
    r, ad = run_latent(session, g)
    assert len(r.events("agg.terms")) == STEPS
    assert all(not e["skipped"] for e in r.events("agg.terms"))
    source = r.output(g["encode"].id)["samples"]
    assert l1(ad, source) < l1(plain, source), (l1(ad, source), l1(plain, source))


def analytic_delta(session, manifold: str, seed: int = 313) -> tuple[torch.Tensor, dict]:
    """The first guided step's delta on the exact Gaussian denoiser (small weight: no trust-region cap, no
    refinement), and that step's report."""
    g = probes.agg_img2img(seed=seed, weight=None)
    graphs.insert_model_patch(g, "AGGTestAnalyticModel", name="analytic", latent=g["encode"][0], std=0.5,
                              mean_scale=0.5)
    apply = probes.add_agg(g, weight=0.05, manifold=manifold)
    g.set_input(apply, dds_steps=0)
    with probes.guided_steps() as calls:
        r, _ = run_latent(session, g)
    events = r.events("agg.terms")
    assert len(events) == STEPS and calls[0]["guided"]
    return calls[0]["delta"], events[0]


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_autograd_and_finite_difference_agree_on_the_exact_denoiser(session, caplog):
    """Both probe the conditional denoiser's Jacobian: the same step, in direction and size. The prior
    covariance (`none`) gives a step of another size, so agreement is not a fallback to it."""
    import logging

    with caplog.at_level(logging.WARNING, logger="AGG"):
        ad, ad_event = analytic_delta(session, "autograd")
    assert not [rec.getMessage() for rec in caplog.records if rec.name == "AGG"]  # no fallback to finite differences
    fd, fd_event = analytic_delta(session, "finite_difference")
    prior, _ = analytic_delta(session, "none")
    assert ad_event["fallback"] is None and fd_event["fallback"] is None
    assert not ad_event["trust_region"] and not fd_event["trust_region"]
    size = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    print(f"cos(ad, fd) {cos(ad, fd):.6f}, rms ad {size(ad):.4g} fd {size(fd):.4g} none {size(prior):.4g}")
    assert cos(ad, fd) > 0.99
    assert abs(size(ad) / size(fd) - 1) < 0.05
    assert abs(size(prior) / size(ad) - 1) > 0.2


# -- the direction of guidance --------------------------------------------------------------------

WEIGHTS = (0.01, 0.03, 0.06)
FIGURES: dict[str, float] = {}


def distance_to_source(session, weight, asymmetric=True, seed=311):
    g = probes.agg_img2img(seed=seed, weight=weight, asymmetric=asymmetric)
    r, out = run_latent(session, g)
    source = r.output(g["encode"].id)["samples"]
    return float((out - source).abs().mean())


def test_structure_loss_pulls_toward_the_source_as_weight_rises(session):
    base = distance_to_source(session, None)
    dists = [distance_to_source(session, w) for w in WEIGHTS]
    FIGURES.update({"unguided": base, **{f"w={w}": d for w, d in zip(WEIGHTS, dists, strict=True)}})
    print("L1 distance to source:", FIGURES)
    assert dists[0] < base
    assert dists[0] > dists[1] > dists[2], dists


def test_symmetric_switch_moves_less(session):
    w = WEIGHTS[1]
    base = distance_to_source(session, None)
    asym = distance_to_source(session, w, asymmetric=True)
    sym = distance_to_source(session, w, asymmetric=False)
    print(f"L1 distance to source at weight {w}: unguided {base:.4f} symmetric {sym:.4f} asymmetric {asym:.4f}")
    assert asym < sym < base


def test_each_guided_step_names_its_node_for_the_ui(session):
    """The 'agg.terms' events carry the guiding node's prompt id, so the frontend's chart finds the right node."""
    g = probed("node_id", seed=331, manifold="none")
    r, _ = run_latent(session, g)
    events = r.events("agg.terms")
    assert len(events) == STEPS
    assert {e["node_id"] for e in events} == {g["apply"].id} and {e["node"] for e in events} == {"Apply AGG"}
    assert [e["step"] for e in events] == list(range(1, STEPS + 1))
