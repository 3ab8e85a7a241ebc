"""Apply AGG / AGG Guider / AGG Sampler under every stock sampler, sampling node and guider, in-process."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager

import comfy.samplers
import pytest
import torch
from agg_testing import graphs, probes
from agg_testing.graphs import Graph

from agg_kernels.step import approximation_reason, is_classified

SAMPLERS = list(comfy.samplers.KSampler.SAMPLERS)

# The stock samplers README promises realise the asymmetric step exactly on the test models (SD1.5, eps),
# written out here rather than read from the pack's own table (agg_kernels.step), so a sampler the pack wrongly
# marks exact fails. ddpm is ComfyUI's eta-1 ancestral step in disguise (exact outside flow models).
README_EXACT = ("euler", "ddim", "euler_ancestral", "lcm", "euler_cfg_pp", "euler_ancestral_cfg_pp", "ddpm")


@pytest.fixture(scope="module")
def session(comfy):
    probes.register()
    return comfy


@contextmanager
def agg_log():
    """Warnings of the pack's 'AGG' logger emitted inside the block."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("AGG")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def samples(r, node) -> torch.Tensor:
    assert r.ok, r.error_text()
    return r.output(node.id)["samples"]


def stepping_name(sampler_name: str) -> str:
    """The name the hook identifies a KSampler sampler by (ddim runs euler's function)."""
    return probes.pack_module("nodes.sampler").sampler_spec(comfy.samplers.sampler_object(sampler_name), torch.zeros(2), None, "eps").name


OVERSHOOTS = ("res_multistep",)  # see check_sampler


def every_sampler_graph(sampler_name: str, seed: int, guided: bool, analytic: bool):
    # 6 steps on the UNet: a multistep sampler mixes the previous step's value (the compensated one) into its
    # extrapolation, and at 3 steps each step carries a third of the window's pull
    g = probes.agg_img2img(sampler_name=sampler_name, seed=seed, weight=None, steps=3 if analytic else 6)
    if analytic:
        # an exact Gaussian denoiser in place of the UNet: the samplers, Apply AGG and the hook are the real
        # ones, each model pass costs nothing, so all 40-odd samplers fit in the test budget
        graphs.insert_model_patch(g, "AGGTestAnalyticModel", name="analytic", latent=g["encode"][0], std=0.5,
                                  mean_scale=0.5)
    if guided:
        probes.add_agg(g)
    return g


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def check_sampler(session, sampler_name: str, analytic: bool):
    seed = 100 + SAMPLERS.index(sampler_name)
    plain = every_sampler_graph(sampler_name, seed, guided=False, analytic=analytic)
    guided = every_sampler_graph(sampler_name, seed, guided=True, analytic=analytic)
    base = samples(session.run(plain.prompt), plain["sampler"])
    with agg_log() as warnings:
        r = session.run(guided.prompt)
    out = samples(r, guided["sampler"])
    assert torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3, "guidance had no effect"
    events = r.events("agg.terms")
    assert events and not any(e["skipped"] for e in events), events
    # Structure Loss on the source: the guided result ends closer to the source than the unguided one
    source = r.output(guided["encode"].id)["samples"]
    if sampler_name in OVERSHOOTS:
        # approximate, and its extrapolation from the previous step's value overshoots the long sub-stepped
        # steps of this 3-step run guided over its whole schedule: measured 2.527 guided against 2.494 unguided
        # (each long step taken whole, it ended closer); docs/PERFORMANCE.md, "Which samplers are exact"
        assert l1(out, source) < 1.02 * l1(base, source), (sampler_name, l1(out, source), l1(base, source))
    else:
        assert l1(out, source) < l1(base, source), (sampler_name, l1(out, source), l1(base, source))
    approx = [w for w in warnings if "sampler '" in w and "realised approximately" in w]
    between = [w for w in warnings if "evaluations between schedule points" in w]
    assert len(between) <= 1, warnings  # heun's and dpm_2's midpoints: one warning per run, not one per step
    if sampler_name in README_EXACT:
        assert not approx, warnings
    else:
        assert len(approx) == 1, warnings  # once per run, naming the sampler and why
        assert approx[0].startswith("Apply AGG: sampler '" + sampler_name + "' "), approx
        assert "not one the pack classifies" not in approx[0], approx


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_every_ksampler_sampler_is_guided(session, sampler_name):
    check_sampler(session, sampler_name, analytic=True)


def test_readme_names_the_exact_samplers():
    readme = (probes.PACK_ROOT / "README.md").read_text()
    sentence = re.search(r"The sampler matters for exactness.*?realise the asymmetric step exactly", readme, re.S)
    assert sentence, "README's sentence naming the exact samplers is gone"
    assert set(re.findall(r"`([a-z_0-9]+)`", sentence.group(0))) == set(README_EXACT)


def test_every_listed_sampler_is_classified():
    """Every sampler this ComfyUI lists reaches the hook under its own name, and the pack classifies that name
    (exact, or approximate with its reason): no sampler falls through as unknown."""
    names = {name: stepping_name(name) for name in SAMPLERS}
    assert names == {name: name for name in SAMPLERS}
    assert [name for name in SAMPLERS if not is_classified(name)] == []
    assert len(SAMPLERS) >= 40  # the whole list (0.3.52 lists 40)


def test_the_pack_treats_exactly_the_readme_samplers_as_exact():
    """The pack's own table, seen through the names its hook gives ComfyUI's sampler objects."""
    exact = {name for name in SAMPLERS if approximation_reason(stepping_name(name), "eps") is None}
    assert exact == set(README_EXACT)


# -- the per-step shift of the exact samplers ---------------------------------------------------------


def windowed_graph(sampler_name: str, seed: int, window: tuple[float, float]):
    g = every_sampler_graph(sampler_name, seed, guided=True, analytic=True)
    g.set_input(g["apply"], start_percent=window[0], end_percent=window[1])
    return g


def states(session, g) -> tuple[list[dict], list[torch.Tensor], object]:
    """(the hook's record of each evaluation, the states x_0 .. x_N in model space, the patched model)."""
    with probes.guided_steps() as calls:
        r = session.run(g.prompt)
    out = samples(r, g["sampler"])
    model = r.output(g["analytic"].id)
    return calls, [c["x"] for c in calls] + [model.model.process_latent_in(out.float())], model


def shift_deviations(session, sampler_name: str, seed: int) -> list[tuple[float, float]]:
    """Per step i: (max |shift - alpha(sigma_{i+1}) delta_i|, max |delta_i|), where the shift is x_{i+1} of a run
    guided on step i alone (its guidance window holds only sigma_i) minus x_{i+1} of the unguided run."""
    from agg_kernels.coordinates import alpha

    calls, _, model = states(session, windowed_graph(sampler_name, seed, (0.0, 1.0)))
    sigmas = [c["sigma"] for c in calls] + [0.0]
    n = len(sigmas) - 1
    assert n == 3 and all(c["guided"] for c in calls), [(c["sigma"], c["guided"]) for c in calls]
    to_sigma = model.get_model_object("model_sampling").percent_to_sigma
    runs = [states(session, windowed_graph(sampler_name, seed, probes.window_isolating(to_sigma, sigmas, i)))[:2]
            for i in range(n)]
    # unguided states: x_0 .. x_{n-1} of the run guided on its last step only, and the unguided run's result
    unguided = every_sampler_graph(sampler_name, seed, guided=False, analytic=True)
    last = samples(session.run(unguided.prompt), unguided["sampler"])
    plain = runs[-1][1][:n] + [model.model.process_latent_in(last.float())]
    family = calls[0]["family"]
    out = []
    for i, (calls_i, xs) in enumerate(runs):
        assert [c["guided"] for c in calls_i] == [j == i for j in range(n)]
        for j in range(i + 1):  # identical up to the guided step
            assert torch.equal(xs[j], plain[j])
        delta = calls_i[i]["delta"]
        shift = xs[i + 1] - plain[i + 1]
        expected = float(alpha(torch.tensor(sigmas[i + 1]), family)) * delta
        out.append((float((shift - expected).abs().max()), float(delta.abs().max())))
    return out


@pytest.mark.parametrize("sampler_name", README_EXACT)
def test_exact_samplers_shift_each_step_by_alpha_times_delta(session, sampler_name):
    """On the exact denoiser, through KSampler, Apply AGG and ComfyUI's sampler object: guiding step i moves
    x_{i+1} by exactly alpha(sigma_{i+1}) * delta_i, the asymmetric step (docs/DESIGN.md §1.2)."""
    devs = shift_deviations(session, sampler_name, seed=150 + SAMPLERS.index(sampler_name))
    print(sampler_name, [f"{d:.1e} of {m:.3f}" for d, m in devs])
    # a real step was taken (the last one, near the clean image, spends little schedule time and moves little)
    assert min(size for _, size in devs[:-1]) > 1e-2 and devs[-1][1] > 0, devs
    for dev, size in devs:
        assert dev <= 1e-4 * max(1.0, size), devs


def test_a_multistep_sampler_fails_the_exactness_check(session):
    """The check above tells an approximate sampler apart: dpmpp_2m mixes in the previous step's estimate."""
    devs = shift_deviations(session, "dpmpp_2m", seed=149)
    print("dpmpp_2m", [f"{d:.1e} of {m:.3f}" for d, m in devs])
    assert max(dev / size for dev, size in devs) > 0.05, devs


# a first-order, an ancestral, a jump, a second-order, a multistep, an SDE and an adaptive sampler on the UNet
ON_THE_UNET = ["euler", "euler_ancestral", "lcm", "heun", "dpmpp_2m", "dpmpp_sde", "uni_pc"]


@pytest.mark.parametrize("sampler_name", ON_THE_UNET)
def test_samplers_on_the_tiny_unet(session, sampler_name):
    check_sampler(session, sampler_name, analytic=False)


# -- sampling nodes -------------------------------------------------------------------------------


def custom_graph(kind: str, *, seed: int, guided: bool = True, sampler: str = "euler"):
    """SamplerCustom or SamplerCustomAdvanced on the img2img source (denoise 0.6, 3 steps)."""
    g = probes.agg_img2img(seed=seed, weight=None)
    ks = g.prompt.pop(g["sampler"].id)["inputs"]
    model = ks["model"]
    sigmas = g.node("BasicScheduler", name="sigmas", model=model, scheduler="normal", steps=3, denoise=0.6)
    select = g.node("KSamplerSelect", name="select", sampler_name=sampler)
    if kind == "SamplerCustom":
        node = g.node("SamplerCustom", name="custom", model=model, add_noise=True, noise_seed=seed, cfg=5.0,
                      positive=ks["positive"], negative=ks["negative"], sampler=select[0], sigmas=sigmas[0],
                      latent_image=g["encode"][0])
    else:
        guider = g.node("CFGGuider", name="guider", model=model, positive=ks["positive"], negative=ks["negative"],
                        cfg=5.0)
        noise = g.node("RandomNoise", name="noise", noise_seed=seed)
        node = g.node("SamplerCustomAdvanced", name="custom", noise=noise[0], guider=guider[0], sampler=select[0],
                      sigmas=sigmas[0], latent_image=g["encode"][0])
    g.set_input(g["save_latent"], samples=node[0])
    if guided:
        probes.add_agg(g, consumer="guider" if kind == "SamplerCustomAdvanced" else "custom")
    return g


def advanced_graph(*, seed: int, guided: bool):
    g = probes.agg_img2img(seed=seed, weight=None)
    ks = g.prompt.pop(g["sampler"].id)["inputs"]
    node = g.node("KSamplerAdvanced", name="adv", model=ks["model"], add_noise="enable", noise_seed=seed, steps=5,
                  cfg=5.0, sampler_name="euler", scheduler="normal", positive=ks["positive"],
                  negative=ks["negative"], latent_image=g["encode"][0], start_at_step=2, end_at_step=5,
                  return_with_leftover_noise="disable")
    g.set_input(g["save_latent"], samples=node[0])
    if guided:
        probes.add_agg(g, consumer="adv")
    return g, node


# The share of the unguided result's L1 distance to the source latent that Structure Loss (weight 0.05, on the
# source) removes, per sampling node / guider: measured on ComfyUI 0.33 (3 steps over the whole window, tiny
# model). A run where guidance does nothing removes 0; under KSampler half the weight removes 0.447 (0.69x) and
# twice the weight 0.721 (1.12x): the band 0.92x .. 1.08x excludes both.
PULL_TO_SOURCE = {
    "KSampler": 0.646, "KSamplerAdvanced": 0.621, "SamplerCustom": 0.641, "SamplerCustomAdvanced": 0.681,
    "AGGGuider": 0.701, "AGGSampler+ApplyAGG": 0.673, "AGGSampler+AGGGuider": 0.671, "DualCFGGuider": 0.555,
    "PerpNegGuider": 0.588,
}


def assert_pulled_to_source(session, plain: Graph, guided: Graph, node_role: str, case: str):
    """The guided result is closer to the source latent (the Structure Loss reference) than the unguided one, by
    the share measured for this node (PULL_TO_SOURCE)."""
    base = samples(session.run(plain.prompt), plain[node_role])
    r = session.run(guided.prompt)
    out = samples(r, guided[node_role])
    assert torch.isfinite(out).all()
    assert r.events("agg.terms")
    source = r.output(guided["encode"].id)["samples"]
    d_plain, d_guided = (float((t.float() - source.float()).abs().mean()) for t in (base, out))
    removed = 1 - d_guided / d_plain
    print(f"{case}: L1 to the source unguided {d_plain:.4f}, guided {d_guided:.4f}: {removed:.3f} removed")
    expected = PULL_TO_SOURCE[case]
    assert 0.92 * expected < removed < 1.08 * expected, (case, removed, expected)
    return r


def test_apply_agg_under_ksampler(session):
    assert_pulled_to_source(session, probes.agg_img2img(seed=201, weight=None), probes.agg_img2img(seed=201), "sampler",
                            "KSampler")


def test_apply_agg_under_ksampler_advanced(session):
    plain, _ = advanced_graph(seed=202, guided=False)
    guided, _ = advanced_graph(seed=202, guided=True)
    r = assert_pulled_to_source(session, plain, guided, "adv", "KSamplerAdvanced")
    assert len(r.events("agg.terms")) == 3


@pytest.mark.parametrize("kind", ["SamplerCustom", "SamplerCustomAdvanced"])
def test_apply_agg_under_custom_samplers(session, kind):
    seed = 203 if kind == "SamplerCustom" else 204
    assert_pulled_to_source(session, custom_graph(kind, seed=seed, guided=False), custom_graph(kind, seed=seed), "custom",
                            kind)


def agg_guider(g: Graph, guider_role: str = "guider", **settings):
    """Replace a CFGGuider by AGG Guider with Structure Loss on the source."""
    inputs = g.prompt[g[guider_role].id]["inputs"]
    loss = g.node("AGGStructureLoss", name="loss", weight=0.05, source=g["encode"][0])
    opts = {"start_percent": 0.0, "end_percent": 1.0, "manifold": "finite_difference", "dds_steps": 1,
            "dds_lr": 0.05, "asymmetric": True, **settings}
    g.prompt[g[guider_role].id] = {"class_type": "AGGGuider", "inputs": {**inputs, "loss": loss[0], **opts}}


def test_agg_guider_under_sampler_custom_advanced(session):
    plain = custom_graph("SamplerCustomAdvanced", seed=205, guided=False)
    guided = custom_graph("SamplerCustomAdvanced", seed=205, guided=False)
    agg_guider(guided)
    assert_pulled_to_source(session, plain, guided, "custom", "AGGGuider")


def agg_sampler(g: Graph, **options):
    opts = {"eta_edit": 0.0, "eta": 0.0, "eta_boost": 1.0, "edit_end": 0.34, "boost_start": 0.67, **options}
    g.prompt[g["select"].id] = {"class_type": "AGGSampler", "inputs": opts}


def test_agg_sampler_with_sampler_custom_and_apply_agg(session):
    plain = custom_graph("SamplerCustom", seed=206, guided=False)
    agg_sampler(plain)
    guided = custom_graph("SamplerCustom", seed=206)
    agg_sampler(guided)
    with agg_log() as warnings:
        assert_pulled_to_source(session, plain, guided, "custom", "AGGSampler+ApplyAGG")
    assert not [w for w in warnings if "realised approximately" in w]  # the AGG sampler's step is exact


def test_agg_sampler_with_agg_guider(session):
    plain = custom_graph("SamplerCustomAdvanced", seed=207, guided=False)
    agg_sampler(plain)
    guided = custom_graph("SamplerCustomAdvanced", seed=207, guided=False)
    agg_sampler(guided)
    agg_guider(guided)
    assert_pulled_to_source(session, plain, guided, "custom", "AGGSampler+AGGGuider")


# -- other guiders ----------------------------------------------------------------------------------


def other_guider_graph(kind: str, *, seed: int, guided: bool):
    g = custom_graph("SamplerCustomAdvanced", seed=seed, guided=False)
    inputs = g.prompt[g["guider"].id]["inputs"]
    ckpt = g["ckpt"]
    if kind == "DualCFGGuider":
        cond2 = g.node("CLIPTextEncode", name="cond2", clip=ckpt[1], text="an oil painting")
        g.prompt[g["guider"].id] = {"class_type": "DualCFGGuider", "inputs": {
            "model": inputs["model"], "cond1": inputs["positive"], "cond2": cond2[0], "negative": inputs["negative"],
            "cfg_conds": 5.0, "cfg_cond2_negative": 3.0, "style": "regular"}}
    else:
        empty = g.node("CLIPTextEncode", name="empty", clip=ckpt[1], text="")
        g.prompt[g["guider"].id] = {"class_type": "PerpNegGuider", "inputs": {
            "model": inputs["model"], "positive": inputs["positive"], "negative": inputs["negative"],
            "empty_conditioning": empty[0], "cfg": 5.0, "neg_scale": 1.0}}
    if guided:
        probes.add_agg(g, consumer="guider")
    return g


@pytest.mark.parametrize("kind", ["DualCFGGuider", "PerpNegGuider"])
def test_apply_agg_under_other_guiders(session, kind):
    seed = 208 if kind == "DualCFGGuider" else 209
    assert_pulled_to_source(session, other_guider_graph(kind, seed=seed, guided=False),
                            other_guider_graph(kind, seed=seed, guided=True), "custom", kind)
