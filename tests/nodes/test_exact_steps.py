"""The asymmetric step against an oracle written in the paper's DDIM / VP coordinates, not in the pack's.

agg_testing.analytic.ddim_vp_step is the DDIM update itself (abar = 1 / (1 + sigma^2), x_vp = sqrt(abar) x,
x'_vp = sqrt(abar') (x0_hat + delta) + sqrt(1 - abar') eps_hat), so comparing with it checks the pack's
k-diffusion form (agg_kernels.step) and what ComfyUI's samplers realise through the hook, rather than
restating the same expression.
"""

from __future__ import annotations

import comfy.samplers
import pytest
import torch
from agg_testing import probes
from agg_testing.analytic import ddim_flow_step, ddim_vp_step

from agg_kernels.schedule import schedule_rate
from agg_kernels.step import asymmetric_step, compensated_denoised, symmetric_step
from agg_kernels.strength import substeps

FAMILIES = ["eps", "v_prediction", "const"]


def oracle(x, d, delta, sigma: float, sigma_next: float, family: str) -> torch.Tensor:
    step = ddim_flow_step if family == "const" else ddim_vp_step
    return step(x, d, delta, sigma, sigma_next)


def sigma_pairs(family: str) -> list[tuple[float, float]]:
    if family == "const":
        return [(0.98, 0.7), (0.5, 0.45), (0.2, 0.0)]
    return [(14.6, 9.0), (1.6, 0.7), (0.7, 0.03), (0.3, 0.0)]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pack_asymmetric_step_is_the_ddim_step(family):
    g = torch.Generator().manual_seed(0)
    x, d, delta = (torch.randn((2, 4, 8, 8), generator=g, dtype=torch.float64) for _ in range(3))
    for s, sn in sigma_pairs(family):
        want = oracle(x, d, delta, s, sn, family)
        got = asymmetric_step(x, d, delta, s, sn, family)
        assert torch.allclose(got, want, atol=1e-10), (s, sn, float((got - want).abs().max()))
        # ComfyUI's Euler step (x + (sn - s) (x - R) / s, every family) given the compensated denoised lands on it
        r = compensated_denoised(d, delta, s, sn, family)
        euler = x + (sn - s) * (x - r) / s
        assert torch.allclose(euler, want, atol=1e-9), (s, sn)
        if 0 < sn:
            # the oracle tells the asymmetric step from the symmetric one and from a flipped delta
            assert not torch.allclose(symmetric_step(x, d, delta, s, sn, family), want, atol=1e-3)
            assert not torch.allclose(asymmetric_step(x, d, -delta, s, sn, family), want, atol=1e-3)


# -- ComfyUI's "ddim" sampler object through the real hook, cond != uncond, finite differences on ------


@pytest.mark.parametrize("family", FAMILIES)
def test_ddim_sampler_object_realises_the_ddim_step(family, monkeypatch):
    """comfy.samplers.sampler_object("ddim") (Euler with its random-noise inpaint option) run through
    KSAMPLER.sample, with a guider whose cond and uncond differ (cfg 4), the real hook closures and the
    finite-difference probe: every realised state is the DDIM step from (x, D, delta)."""
    rt = probes.node_test_module("test_runtime")
    CFGHarness, assert_guided, realised, reference = rt.CFGHarness, rt.assert_guided, rt.realised, rt.reference
    ddim = comfy.samplers.sampler_object("ddim")
    assert ddim.inpaint_options.get("random")  # ComfyUI's ddim, not plain euler
    rt.record_reports(monkeypatch)
    h = CFGHarness(family, ddim.sampler_function, monkeypatch)
    h.inner_model.model_sampling = h.sampling  # KSAMPLER.sample reads model_wrap.inner_model.model_sampling
    h.model_patcher = h.inner_model.model_patcher  # and ComfyUI 0.33's first-step log line names its model's class
    h.model_patcher.model = h.inner_model
    z = torch.randn(h.start().shape, generator=torch.Generator().manual_seed(3))
    latent = reference().expand_as(z).clone() if family == "const" else torch.zeros_like(z)
    seen = []
    callback = h.run.preview(lambda i, x0, x, total: seen.append(x0.clone()))
    out = ddim.sample(h, h.sigmas, {"model_options": {}, "seed": 0}, callback, z, latent, None, True)
    assert_guided(h)
    # one conditional probe pass per sub-step of each guided step (this run's window is the whole schedule)
    assert len(h.probes) == sum(substeps(schedule_rate(h.sigmas, st["sigma"], h.run.window, family)) for st in h.steps if st["guided"])
    assert max(float((st["D"] - st["U"]).abs().max()) for st in h.steps) > 0.1  # cond and uncond really differ
    for st, x_next, sn in zip(h.steps, realised(h, out), h.sigmas[1:].tolist(), strict=True):
        want = oracle(st["x"], st["D"], st["delta"], st["sigma"], sn, family).float()
        assert torch.allclose(x_next, want, atol=1e-4), (st["sigma"], float((x_next - want).abs().max()))
    # previews show D + delta, not the compensated value
    assert len(seen) == len(h.steps)
    for x0, st in zip(seen, h.steps, strict=True):
        assert torch.allclose(x0, st["shown"], atol=1e-5)


# -- through the nodes: KSampler + Apply AGG on the exact denoiser -------------------------------------


@pytest.fixture(scope="module")
def session(comfy):
    probes.register()
    return comfy


@pytest.mark.parametrize("sampler_name", ["euler", "ddim"])
def test_ksampler_states_follow_the_ddim_step(session, sampler_name):
    """Every state of a guided KSampler run (exact Gaussian denoiser, Structure Loss, finite differences) is the
    DDIM step in VP coordinates from the previous state, the guider's D and the hook's delta."""
    ts = probes.node_test_module("test_samplers")
    every_sampler_graph, states = ts.every_sampler_graph, ts.states
    g = every_sampler_graph(sampler_name, 170 + ("euler", "ddim").index(sampler_name), guided=True, analytic=True)
    calls, xs, _ = states(session, g)
    sigmas = [c["sigma"] for c in calls] + [0.0]
    assert len(calls) == 3 and all(c["guided"] for c in calls)
    for i, c in enumerate(calls):
        assert c["family"] == "eps"
        want = ddim_vp_step(c["x"], c["D"], c["delta"], sigmas[i], sigmas[i + 1]).float()
        assert torch.allclose(xs[i + 1], want, atol=1e-4), (i, float((xs[i + 1] - want).abs().max()))
        if i == len(calls) - 1:
            continue  # the last step (from sigma 0.03) spends little schedule time: its delta is ~5e-5
        # the unguided DDIM step from the same state is elsewhere: the check sees the guidance
        assert float(c["delta"].abs().max()) > 1e-2
        plain = ddim_vp_step(c["x"], c["D"], torch.zeros_like(c["D"]), sigmas[i], sigmas[i + 1]).float()
        assert (xs[i + 1] - plain).abs().max() > 1e-2
