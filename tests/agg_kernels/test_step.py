"""The asymmetric step, its closed form, and its realisation inside ComfyUI's real samplers.

Compensation checks run the real comfy.k_diffusion.sampling functions on a stand-in model that returns
R = compensated_denoised(D, delta, sigma, target) with D from an exact mixture denoiser, and assert that
the sampler lands on the asymmetric x_next (plus the sampler's own fresh noise, made fixed here).
"""

from __future__ import annotations

import math

import comfy.k_diffusion.sampling as kds
import pytest
import torch
from agg_testing.analytic import KModel, alpha64, mixture
from agg_testing.analytic import ancestral_expected as expected_ancestral
from agg_testing.analytic import asymmetric_closed_form as closed_form

from agg_kernels.schedule import next_sigma
from agg_kernels.step import (
    APPROXIMATE_SAMPLERS,
    DDPM_SAMPLERS,
    EXACT_SAMPLERS,
    ancestral_sigma_down,
    ancestral_sigmas,
    approximation_reason,
    asymmetric_step,
    compensated_denoised,
    compensation_target,
    is_classified,
    symmetric_denoised,
    symmetric_step,
)

FAMILIES = ("eps", "v_prediction", "const")
TOL = 1e-5
SHAPE = (3, 4, 4, 4)
# (sigma, sigma_next) pairs per family: large and small steps, the last step to 0 included.
STEPS = {
    "eps": [(14.6, 10.0), (3.0, 2.2), (0.5, 0.45), (0.1, 0.03), (0.3, 0.0)],
    "const": [(0.95, 0.8), (0.6, 0.5), (0.2, 0.17), (0.05, 0.02), (0.1, 0.0)],
}
STEPS["v_prediction"] = STEPS["eps"]

MAX_ERR: dict[str, float] = {}


def record(name: str, err: float) -> None:
    MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), err)


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    print("\nmax abs error (fp32) per check:")
    for k, v in sorted(MAX_ERR.items()):
        print(f"  {k}: {v:.2e}")


def data():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, *SHAPE[1:], generator=g) * 1.5
    return mixture(means, [0.4, 0.7, 1.0], [0.5, 0.3, 0.2])


def state(sigma: float, family: str, seed: int = 1):
    """(x at sigma, exact D(x), a guidance delta) in float32."""
    g = torch.Generator().manual_seed(seed)
    mix = data()
    x0, _ = mix.sample(SHAPE[0], g)
    x = mix.noised(x0, sigma, family, g)
    d = mix.denoise(x, torch.full((SHAPE[0],), sigma), family)
    delta = 0.3 * torch.randn(SHAPE, generator=g)
    return x, d, delta


def maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# --- a. closed form ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_asymmetric_step_closed_form(family):
    for s, sn in STEPS[family]:
        x, d, delta = state(s, family)
        err = maxerr(asymmetric_step(x, d, delta, s, sn, family), closed_form(x, d, delta, s, sn, family))
        record(f"a closed form {family}", err)
        assert err <= TOL, (family, s, sn, err)


@pytest.mark.parametrize("family", FAMILIES)
def test_asymmetric_step_per_sample_sigma(family):
    pairs = STEPS[family][:3]
    s = torch.tensor([p[0] for p in pairs])
    sn = torch.tensor([p[1] for p in pairs])
    xs, ds, deltas = zip(*(state(p[0], family, seed=i)[:3] for i, p in enumerate(pairs)), strict=True)
    x, d, delta = (torch.cat([t[i : i + 1] for i, t in enumerate(ts)]) for ts in (xs, ds, deltas))
    out = asymmetric_step(x, d, delta, s, sn, family)
    for i, (si, sni) in enumerate(pairs):
        expected = closed_form(x[i : i + 1], d[i : i + 1], delta[i : i + 1], si, sni, family)
        err = maxerr(out[i : i + 1], expected)
        record(f"a per-sample sigma {family}", err)
        assert err <= TOL, (family, i, err)
    # A tensor sigma gives the same as a float sigma for that sample.
    one = asymmetric_step(x[:1], d[:1], delta[:1], float(s[0]), float(sn[0]), family)
    assert maxerr(one, out[:1]) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_unguided_asymmetric_step_is_ddim(family):
    # delta = 0: the deterministic DDIM step, which in x's own coordinates is the Euler step.
    s, sn = STEPS[family][1]
    x, d, _ = state(s, family)
    euler = x + (sn - s) * (x - d) / s
    assert maxerr(asymmetric_step(x, d, torch.zeros_like(d), s, sn, family), euler) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_moves_x_by_alpha_next_delta(family):
    s, sn = STEPS[family][0]
    x, d, delta = state(s, family)
    moved = asymmetric_step(x, d, delta, s, sn, family) - asymmetric_step(x, d, torch.zeros_like(d), s, sn, family)
    assert maxerr(moved, alpha64(sn, family) * delta.double()) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_compensation_factor_values(family):
    d, delta = torch.zeros(1, 1), torch.ones(1, 1)
    s, sn = 0.8, 0.5
    c = compensated_denoised(d, delta, s, sn, family).item()
    expected = (1 - sn) * s / (s - sn) if family == "const" else s / (s - sn)
    assert c == pytest.approx(expected, rel=1e-6)
    # Stepping to 0 jumps to the clean estimate: factor 1.
    assert compensated_denoised(d, delta, s, 0.0, family).item() == pytest.approx(1.0)


# --- e. symmetric ablation --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_symmetric_step_moves_by_fraction_of_delta(family):
    for s, sn in STEPS[family]:
        x, d, delta = state(s, family)
        unguided = x + (sn - s) * (x - d) / s
        moved = symmetric_step(x, d, delta, s, sn, family).double() - unguided.double()
        err = maxerr(moved, (1 - sn / s) * delta.double())
        record(f"e symmetric {family}", err)
        assert err <= TOL, (family, s, sn, err)
        # It is the Euler step given D + delta.
        r = symmetric_denoised(d, delta)
        assert maxerr(symmetric_step(x, d, delta, s, sn, family), x + (sn - s) * (x - r) / s) <= TOL


# --- f. schedule lookup and per-sampler targets -----------------------------------------------------


def test_next_sigma():
    sched = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])
    assert next_sigma(sched, 14.6) == pytest.approx(7.0)
    assert next_sigma(sched, 1.0) == 0.0
    assert next_sigma([0.9, 0.5, 0.0], 0.5) == 0.0
    # Off-schedule evaluations (heun's corrector, sde midpoints) and the final sigma: None.
    assert next_sigma(sched, 5.0) is None
    assert next_sigma(sched, 0.0) is None
    assert next_sigma(None, 1.0) is None
    # float32 schedules match float64 sigmas.
    assert next_sigma(torch.tensor([0.123456789, 0.05, 0.0]), 0.123456789) == pytest.approx(0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_compensation_target_per_sampler(family):
    s, sn = (3.0, 2.0) if family != "const" else (0.6, 0.4)
    assert compensation_target("euler", s, sn, family) == (sn, True)
    assert compensation_target("ddim", s, sn, family) == (sn, True)
    assert compensation_target("lcm", s, sn, family) == (0.0, True)
    assert compensation_target("euler_cfg_pp", s, sn, family) == (0.0, True)
    for name in ("euler_ancestral", "agg"):
        for eta in (0.0, 0.5, 1.0):
            target, exact = compensation_target(name, s, sn, family, eta)
            assert exact and target == pytest.approx(ancestral_sigma_down(s, sn, eta, family))
        assert compensation_target(name, s, sn, family, 0.0)[0] == sn
        assert compensation_target(name, s, sn, family, 1.0)[0] < sn
    for approx in ("dpmpp_2m", "heun", "uni_pc", "dpm_2", "exp_heun_2_x0", "exp_heun_2_x0_sde", "not_a_sampler", None):
        assert compensation_target(approx, s, sn, family) == (sn, False)
    assert compensation_target("euler", s, None, family) == (None, False)
    # ddpm: the variance-exploding ancestral step at eta 1, to sn^2 / s; exact except on a flow state
    assert compensation_target("ddpm", s, sn, family) == (pytest.approx(sn * sn / s), family != "const")


def test_every_stock_sampler_is_classified_with_a_reason():
    """Each sampler ComfyUI lists is exact or approximate with its own reason; unknown names are neither."""
    import comfy.samplers

    listed = set(comfy.samplers.KSampler.SAMPLERS)
    assert listed <= {*EXACT_SAMPLERS, *DDPM_SAMPLERS, *APPROXIMATE_SAMPLERS}, listed - {*EXACT_SAMPLERS,
                                                                                        *APPROXIMATE_SAMPLERS}
    assert all(is_classified(name) for name in listed)
    for name in ("euler", "ddim", "euler_ancestral", "lcm", "euler_cfg_pp", "euler_ancestral_cfg_pp", "agg"):
        assert all(approximation_reason(name, f) is None for f in FAMILIES)
    assert approximation_reason("ddpm", "eps") is None and approximation_reason("ddpm", "v_prediction") is None
    assert "flow state" in approximation_reason("ddpm", "const")
    assert "second order" in approximation_reason("exp_heun_2_x0", "eps")
    assert "multistep" in approximation_reason("dpmpp_2m", "const")
    assert not is_classified("res_2m") and not is_classified(None)
    assert "not one the pack classifies" in approximation_reason("res_2m", "eps")


def test_ancestral_sigma_down_matches_comfyui():
    for s, sn in STEPS["eps"]:
        for eta in (0.0, 0.3, 1.0):
            sd, _ = kds.get_ancestral_step(s, sn, eta)
            assert ancestral_sigma_down(s, sn, eta, "eps") == pytest.approx(sd, abs=1e-12)


# --- b. compensation inside ComfyUI's real samplers -------------------------------------------------


def compensated_model(d, delta, family, sampler, eta=1.0):
    """A stand-in model returning R for a one-step schedule, whatever sigma it is asked at."""

    def fn(x, sigma):
        s = float(sigma[0])
        return compensated_denoised(d, delta, s, target_of[s], family)

    target_of: dict[float, float] = {}
    model = KModel(fn, family)
    model.plan = lambda s, sn: target_of.__setitem__(float(torch.tensor(s)), compensation_target(sampler, s, sn, family, eta)[0])
    return model


def fixed_noise(z):
    return lambda sigma, sigma_next: z


def run(sampler_fn, model, x, s, sn, **kw):
    sigmas = torch.tensor([s, sn], dtype=torch.float32)
    model.plan(float(sigmas[0]), float(sigmas[1]))
    return sampler_fn(model, x, sigmas, disable=True, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_comfy_euler_lands_on_asymmetric_step(family):
    for s, sn in STEPS[family]:
        x, d, delta = state(s, family)
        out = run(kds.sample_euler, compensated_model(d, delta, family, "euler"), x, s, sn)
        err = maxerr(out, closed_form(x, d, delta, s, sn, family))
        record(f"b euler {family}", err)
        assert err <= TOL, (family, s, sn, err)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_comfy_euler_ancestral_lands_on_asymmetric_step(family, eta):
    # For const, sample_euler_ancestral dispatches to sample_euler_ancestral_RF (model_sampling is CONST).
    for s, sn in STEPS[family]:
        x, d, delta = state(s, family)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        model = compensated_model(d, delta, family, "euler_ancestral", eta)
        out = run(kds.sample_euler_ancestral, model, x, s, sn, eta=eta, noise_sampler=fixed_noise(z))
        err = maxerr(out, expected_ancestral(x, d, delta, s, sn, eta, family, z))
        record(f"b euler_ancestral {family}", err)
        assert err <= TOL, (family, eta, s, sn, err)
        # The guided part is alpha(sn) * delta exactly, as for Euler.
        plain = compensated_model(d, torch.zeros_like(delta), family, "euler_ancestral", eta)
        base = run(kds.sample_euler_ancestral, plain, x, s, sn, eta=eta, noise_sampler=fixed_noise(z))
        err = maxerr(out - base, alpha64(sn, family) * delta.double())
        record(f"b euler_ancestral guided part {family}", err)
        assert err <= TOL, (family, eta, s, sn, err)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_comfy_rf_dispatch_is_exercised(eta):
    # The const stand-in really reaches the _RF form: its result differs from the variance-exploding form.
    s, sn = STEPS["const"][1]
    x, d, delta = state(s, "const")
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    rf = run(kds.sample_euler_ancestral, compensated_model(d, delta, "const", "euler_ancestral", eta), x, s, sn,
             eta=eta, noise_sampler=fixed_noise(z))
    ve = run(kds.sample_euler_ancestral_RF, compensated_model(d, delta, "const", "euler_ancestral", eta), x, s, sn,
             eta=eta, noise_sampler=fixed_noise(z))
    assert maxerr(rf, ve) <= TOL
    vp = run(kds.sample_euler_ancestral, compensated_model(d, delta, "eps", "euler_ancestral", eta), x, s, sn,
             eta=eta, noise_sampler=fixed_noise(z))
    assert maxerr(rf, vp) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_comfy_lcm_lands_on_asymmetric_step(family):
    for s, sn in STEPS[family]:
        x, d, delta = state(s, family)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        out = run(kds.sample_lcm, compensated_model(d, delta, family, "lcm"), x, s, sn, noise_sampler=fixed_noise(z))
        # lcm jumps to the clean estimate (the asymmetric step to sigma 0) and re-noises it to sn.
        clean = closed_form(x, d, delta, s, 0.0, family)
        expected = alpha64(sn, family) * clean + sn * z.double()
        err = maxerr(out, expected)
        record(f"b lcm {family}", err)
        assert err <= TOL, (family, s, sn, err)


@pytest.mark.parametrize("family", FAMILIES)
def test_comfy_ddpm_is_the_eta_1_ancestral_step(family):
    """ComfyUI's ddpm, given R aimed at sigma_next^2 / sigma, lands on the asymmetric ancestral step at eta 1 for
    eps / v; on a flow state (the same variance-exploding formula) its guided part misses alpha(sn) * delta."""
    for s, sn in STEPS[family]:
        x, d, delta = state(s, family)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        out = run(kds.sample_ddpm, compensated_model(d, delta, family, "ddpm"), x, s, sn, noise_sampler=fixed_noise(z))
        base = run(kds.sample_ddpm, compensated_model(d, torch.zeros_like(delta), family, "ddpm"), x, s, sn,
                   noise_sampler=fixed_noise(z))
        guided = maxerr(out - base, alpha64(sn, family) * delta.double()) / delta.abs().max().item()
        if family == "const" and 0 < sn:
            record(f"b ddpm guided part {family} (relative, approximate)", guided)
            # an Euler step to sn^2 / s moves x by alpha(sn^2 / s) delta: sn - sn^2 / s more than the asymmetric step
            assert guided == pytest.approx(sn * (s - sn) / s, abs=1e-4) and guided > 0.01, (s, sn, guided)
            continue
        err = maxerr(out, expected_ancestral(x, d, delta, s, sn, 1.0, family, z))
        record(f"b ddpm {family}", err)
        assert err <= TOL and guided <= TOL, (family, s, sn, err, guided)


@pytest.mark.parametrize("family", FAMILIES)
def test_noise_scale_leaves_the_guided_part_exact(family):
    """A model whose sampling scales fresh noise (ComfyUI 0.33's noise_scale, HiDream-O1 sets 8): the exact
    samplers' guided part is still alpha(sn) * delta, the noise being drawn independently of R."""
    cases = [("euler_ancestral", kds.sample_euler_ancestral, {"eta": 1.0}), ("lcm", kds.sample_lcm, {})]
    if family != "const":
        cases.append(("ddpm", kds.sample_ddpm, {}))
    for sampler, fn, kw in cases:
        for s, sn in STEPS[family][:4]:
            x, d, delta = state(s, family)
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
            outs = []
            for dl in (delta, torch.zeros_like(delta)):
                model = compensated_model(d, dl, family, sampler, kw.get("eta", 1.0))
                model.inner_model.inner_model.model_sampling.noise_scale = 8.0
                outs.append(run(fn, model, x, s, sn, noise_sampler=fixed_noise(z), **kw))
            err = maxerr(outs[0] - outs[1], alpha64(sn, family) * delta.double())
            record(f"b noise_scale 8 {sampler} {family}", err)
            assert err <= TOL * 8, (sampler, s, sn, err)


def schedule(family: str, n: int) -> torch.Tensor:
    if family == "const":
        return torch.cat([torch.linspace(0.9, 0.05, n), torch.zeros(1)])
    return kds.get_sigmas_karras(n, 0.03, 14.6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "sampler,fn,kw",
    [
        ("euler", kds.sample_euler, {}),
        ("euler_ancestral", kds.sample_euler_ancestral, {"eta": 1.0}),
        ("euler_ancestral", kds.sample_euler_ancestral, {"eta": 0.6}),
        ("lcm", kds.sample_lcm, {}),
    ],
)
def test_comfy_sampler_multistep_trajectory(family, sampler, fn, kw):
    """A whole run in a real sampler follows the asymmetric trajectory step by step.

    delta is a function of D (a pull toward a fixed point), so every step's D depends on the previous
    step's result: an error anywhere would compound.
    """
    mix = data()
    sigmas = schedule(family, 12)
    eta = kw.get("eta", 1.0)
    g = torch.Generator().manual_seed(3)
    goal = torch.randn(SHAPE[1:], generator=g)
    noises = {float(s): torch.randn(SHAPE, generator=g) for s in sigmas[:-1]}
    x_init = mix.noised(mix.sample(SHAPE[0], g)[0], float(sigmas[0]), family, g).float()

    def den(x, s):
        return mix.denoise(x, torch.full((x.shape[0],), s, dtype=x.dtype), family)

    def guide(d):
        return 0.2 * (goal - d)

    def model_fn(x, sigma):
        s = float(sigma[0])
        d = den(x, s)
        target, exact = compensation_target(sampler, s, next_sigma(sigmas, s), family, eta)
        assert exact
        return compensated_denoised(d, guide(d), s, target, family)

    if sampler != "euler":
        kw = {**kw, "noise_sampler": lambda s, sn: noises[float(s)]}
    out = fn(KModel(model_fn, family), x_init.clone(), sigmas, disable=True, **kw)

    x = x_init.double()
    for s, sn in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        d = den(x, s)
        z = noises[float(torch.tensor(s))]
        if sampler == "euler":
            x = closed_form(x, d, guide(d), s, sn, family)
        elif sampler == "lcm":
            x = d + guide(d)
            x = alpha64(sn, family) * x + sn * z.double() if sn > 0 else x
        else:
            x = expected_ancestral(x, d, guide(d), s, sn, eta, family, z)
    scale = max(1.0, x.abs().max().item())
    err = maxerr(out, x) / scale
    record(f"b multistep {sampler} {family} (relative)", err)
    assert math.isfinite(err) and err <= 1e-4, (family, sampler, err)


@pytest.mark.parametrize("family", FAMILIES)
def test_sigma_up_matches_comfyui(family):
    for s, sn in ((14.6, 10.0), (2.0, 1.5), (0.9, 0.8), (0.5, 0.2)):
        if family == "const" and s > 1:
            continue
        for eta in (0.0, 0.5, 1.0):
            down, up = ancestral_sigmas(s, sn, eta, family)
            assert down == ancestral_sigma_down(s, sn, eta, family)
            if family == "const":
                sd = ancestral_sigma_down(s, sn, eta, family)
                expected = (sn**2 - sd**2 * (1 - sn) ** 2 / (1 - sd) ** 2) ** 0.5 if eta else 0.0
            else:
                expected = kds.get_ancestral_step(s, sn, eta)[1]
            assert up == pytest.approx(expected, abs=1e-12)


# -- the guided step as the sampler receives it (realise) ------------------------------------------------


def test_realise_is_exact_for_euler_and_lands_on_the_asymmetric_step():
    from agg_kernels.step import SamplerSpec, realise

    sigmas = [10.0, 5.0, 2.0, 0.0]
    x, d, delta = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), 0.1 * torch.randn(1, 4, 4, 4)
    step = realise(d, delta, 5.0, sigmas, SamplerSpec("euler"), "eps")
    assert step.exact and step.reason is None and torch.equal(step.shown, d + delta)
    euler = x + (2.0 - 5.0) * (x - step.returned) / 5.0  # what k-diffusion's Euler step does with the value
    assert torch.allclose(euler, asymmetric_step(x, d, delta, 5.0, 2.0, "eps"), atol=1e-5)


def test_realise_symmetric_off_schedule_and_unknown_samplers():
    from agg_kernels.step import SamplerSpec, realise

    sigmas = [10.0, 5.0, 2.0, 0.0]
    d, delta = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    sym = realise(d, delta, 5.0, sigmas, SamplerSpec("heun"), "eps", asymmetric=False)
    assert sym.exact and torch.equal(sym.returned, d + delta)
    heun = realise(d, delta, 5.0, sigmas, SamplerSpec("heun"), "eps")
    assert not heun.exact and "sampler 'heun' is second order" in heun.reason and "approximately" in heun.reason
    unknown = realise(d, delta, 5.0, sigmas, SamplerSpec("res_2m"), "eps")
    assert not unknown.exact and "'res_2m' is not one the pack classifies" in unknown.reason
    assert torch.allclose(unknown.returned, compensated_denoised(d, delta, 5.0, 2.0, "eps"))
    ddpm = realise(d, delta, 5.0, sigmas, SamplerSpec("ddpm"), "const")
    assert not ddpm.exact and "flow state" in ddpm.reason
    assert realise(d, delta, 5.0, sigmas, SamplerSpec("ddpm"), "eps").exact
    assert torch.allclose(heun.returned, d + compensated_denoised(d, delta, 5.0, 2.0, "eps") - d)
    between = realise(d, delta, 3.0, sigmas, SamplerSpec("euler"), "eps")  # heun's corrector point
    assert not between.exact and "between schedule points" in between.reason
    assert torch.allclose(between.returned, compensated_denoised(d, delta, 3.0, 2.0, "eps"))
    last = realise(d, delta, 0.0, sigmas, SamplerSpec("euler"), "eps")
    assert not last.exact and "symmetric" in last.reason and torch.equal(last.returned, d + delta)


def test_realise_uses_the_agg_samplers_per_step_eta():
    from agg_kernels.step import SamplerSpec, realise

    sigmas = [10.0, 5.0, 2.0, 0.0]
    d, delta = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    spec = SamplerSpec("agg", eta_at=lambda s: 1.0 if s == 5.0 else 0.0)
    step = realise(d, delta, 5.0, sigmas, spec, "eps")
    down = ancestral_sigma_down(5.0, 2.0, 1.0, "eps")
    assert compensation_target("agg", 5.0, 2.0, "eps", 1.0) == (down, True)  # ancestral and exact
    assert step.exact and torch.allclose(step.returned, compensated_denoised(d, delta, 5.0, down, "eps"))
    plain = realise(d, delta, 10.0, sigmas, spec, "eps")  # eta 0 at this step: aims at the next sigma
    assert torch.allclose(plain.returned, compensated_denoised(d, delta, 10.0, 5.0, "eps"))
