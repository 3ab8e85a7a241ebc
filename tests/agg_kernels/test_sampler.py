"""The AGG three-zone DDIM sampler against ComfyUI's own samplers, and its exact compensation."""

from __future__ import annotations

import comfy.k_diffusion.sampling as kds
import pytest
import torch
from agg_testing.analytic import KModel, ancestral_expected, asymmetric_closed_form, mixture

from agg_kernels.sampler import sample_agg, sampler_eta_at
from agg_kernels.schedule import Zones, next_sigma, zone_eta
from agg_kernels.step import compensated_denoised, compensation_target

FAMILIES = ("eps", "v_prediction", "const")
SHAPE = (3, 2, 4, 4)
TOL = 1e-5
MAX_ERR: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nmax error per check:")
    for k, v in sorted(MAX_ERR.items()):
        print(f"  {k}: {v:.2e}")


def record(name, err):
    MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), err)


def data():
    g = torch.Generator().manual_seed(0)
    return mixture(torch.randn(3, *SHAPE[1:], generator=g), [0.4, 0.7, 1.0])


def schedule(family, n=12):
    if family == "const":
        return torch.cat([torch.linspace(0.9, 0.05, n), torch.zeros(1)])
    return kds.get_sigmas_karras(n, 0.03, 14.6)


def start(family, sigmas, seed=1):
    mix = data()
    g = torch.Generator().manual_seed(seed)
    return mix, mix.noised(mix.sample(SHAPE[0], g)[0], float(sigmas[0]), family, g).float()


def exact_model(mix, family):
    return KModel(lambda x, s: mix.denoise(x, s, family), family)


def noise_table(sigmas, seed=5):
    g = torch.Generator().manual_seed(seed)
    table = {float(s): torch.randn(SHAPE, generator=g) for s in sigmas[:-1]}
    calls: list[float] = []

    def sampler(s, sn):
        calls.append(float(s))
        return table[float(s)]

    return table, calls, sampler


def relerr(a, b):
    return ((a.double() - b.double()).abs().max() / max(1.0, b.abs().max().item())).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_eta_zero_everywhere_is_comfy_euler(family):
    sigmas = schedule(family)
    mix, x = start(family, sigmas)
    ours = sample_agg(exact_model(mix, family), x, sigmas, disable=True, zones=Zones(0, 0, 0), family=family)
    ref = kds.sample_euler(exact_model(mix, family), x, sigmas, disable=True)
    err = relerr(ours, ref)
    record(f"agg(eta=0) vs comfy euler {family}", err)
    assert err <= TOL, err


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_constant_eta_is_comfy_euler_ancestral(family, eta):
    # For const the stand-in's CONST model_sampling sends ComfyUI to sample_euler_ancestral_RF.
    sigmas = schedule(family)
    mix, x = start(family, sigmas)
    _, _, noise = noise_table(sigmas)
    ours = sample_agg(exact_model(mix, family), x, sigmas, disable=True, zones=Zones(eta, eta, eta),
                      noise_sampler=noise, family=family)
    ref = kds.sample_euler_ancestral(exact_model(mix, family), x, sigmas, disable=True, eta=eta, noise_sampler=noise)
    err = relerr(ours, ref)
    record(f"agg(eta={eta}) vs comfy euler_ancestral {family}", err)
    assert err <= TOL, err


@pytest.mark.parametrize("family", ["eps", "const"])
def test_default_noise_is_seeded(family):
    # (Inside ComfyUI the AGG Sampler passes ComfyUI's own noise sampler: tests/nodes/test_runtime.py.)
    sigmas = schedule(family, 6)
    mix, x = start(family, sigmas)
    kw = {"disable": True, "zones": Zones(1.0, 1.0, 1.0), "family": family}
    a = sample_agg(exact_model(mix, family), x, sigmas, extra_args={"seed": 11}, **kw)
    b = sample_agg(exact_model(mix, family), x, sigmas, extra_args={"seed": 11}, **kw)
    c = sample_agg(exact_model(mix, family), x, sigmas, extra_args={"seed": 12}, **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("family", FAMILIES)
def test_three_zones_step_by_step(family):
    n = 12
    sigmas = schedule(family, n)
    mix, x = start(family, sigmas)
    _, calls, noise = noise_table(sigmas)
    zones = Zones(eta_edit=0.3, eta=0.0, eta_boost=1.0, edit_end=0.25, boost_start=0.75)
    seen = []
    out = sample_agg(exact_model(mix, family), x, sigmas, callback=seen.append, disable=True, noise_sampler=noise,
                     family=family, zones=zones)
    # Fresh noise only where eta > 0 (edit steps 0-2, boost steps 9-10; the last step lands on D).
    assert calls == [float(sigmas[i]) for i in (0, 1, 2, 9, 10)]
    assert [c["i"] for c in seen] == list(range(n))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    # A float64 reference loop with the zone's eta at each step.
    ref = x.double()
    table, _, _ = noise_table(sigmas)
    for i in range(n):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        eta = zone_eta(i, n, zones)
        assert sampler_eta_at(sigmas, sigmas[i], zones) == eta
        d = mix.denoise(ref, torch.full((SHAPE[0],), s, dtype=torch.float64), family)
        ref = ancestral_expected(ref, d, torch.zeros_like(d), s, sn, eta, family, table.get(s, torch.zeros(SHAPE)))
    err = relerr(out, ref)
    record(f"agg zones vs float64 reference {family}", err)
    assert err <= 1e-4, err


def test_sampler_eta_at_off_schedule():
    sigmas = schedule("eps", 10)
    assert sampler_eta_at(sigmas, 123.0) is None
    assert sampler_eta_at(sigmas, sigmas[-1]) is None
    assert sampler_eta_at(sigmas, sigmas[0], Zones(eta_edit=0.7)) == 0.7
    assert sampler_eta_at(sigmas, sigmas[-2], Zones(eta_boost=0.9)) == 0.9


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("eta_edit", [0.0, 0.5, 1.0])
def test_compensation_one_step(family, eta_edit):
    # One step of sample_agg fed compensated_denoised (target from sampler_eta_at + "agg") lands exactly.
    pairs = [(14.6, 10.0), (3.0, 2.2), (0.5, 0.45), (0.3, 0.0)] if family != "const" else [
        (0.95, 0.8), (0.6, 0.5), (0.2, 0.17), (0.1, 0.0)]
    mix = data()
    for s, sn in pairs:
        sigmas = torch.tensor([s, sn])
        g = torch.Generator().manual_seed(2)
        x = mix.noised(mix.sample(SHAPE[0], g)[0], s, family, g)
        d = mix.denoise(x, torch.full((SHAPE[0],), float(sigmas[0])), family)
        delta = 0.3 * torch.randn(SHAPE, generator=g)
        z = torch.randn(SHAPE, generator=g)

        def fn(xx, sigma, d=d, delta=delta, sigmas=sigmas):
            sf = float(sigma[0])
            eta = sampler_eta_at(sigmas, sf, Zones(eta_edit=eta_edit))
            target, exact = compensation_target("agg", sf, next_sigma(sigmas, sf), family, eta)
            assert exact
            return compensated_denoised(d, delta, sf, target, family)

        out = sample_agg(KModel(fn, family), x, sigmas, disable=True, zones=Zones(eta_edit=eta_edit), noise_sampler=lambda a, b, z=z: z,
                         family=family)
        s32, sn32 = float(sigmas[0]), float(sigmas[1])
        err = (out.double() - ancestral_expected(x, d, delta, s32, sn32, eta_edit, family, z)).abs().max().item()
        record(f"agg compensation one step {family}", err)
        assert err <= TOL, (family, eta_edit, s, sn, err)
        if eta_edit == 0:
            assert (out.double() - asymmetric_closed_form(x, d, delta, s32, sn32, family)).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_compensation_whole_run(family):
    """Guided steps in every zone of a sample_agg run follow the exact asymmetric trajectory."""
    n = 12
    sigmas = schedule(family, n)
    mix, x = start(family, sigmas)
    table, _, noise = noise_table(sigmas)
    zones = Zones(eta_edit=0.4, eta=0.0, eta_boost=1.0, edit_end=0.3, boost_start=0.6)
    goal = mix.means[2]

    def den(xx, s):
        return mix.denoise(xx, torch.full((xx.shape[0],), s, dtype=xx.dtype), family)

    def fn(xx, sigma):
        s = float(sigma[0])
        d = den(xx, s)
        eta = sampler_eta_at(sigmas, s, zones)
        target, exact = compensation_target("agg", s, next_sigma(sigmas, s), family, eta)
        assert exact
        return compensated_denoised(d, 0.2 * (goal - d), s, target, family)

    out = sample_agg(KModel(fn, family), x, sigmas, disable=True, noise_sampler=noise, family=family, zones=zones)
    ref = x.double()
    for i in range(n):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        d = den(ref, s)
        ref = ancestral_expected(ref, d, 0.2 * (goal - d), s, sn, zone_eta(i, n, zones), family,
                                 table.get(s, torch.zeros(SHAPE)))
    err = relerr(out, ref)
    record(f"agg compensation whole run {family} (relative)", err)
    assert err <= 1e-4, err




def test_sampler_module_does_not_import_comfyui():
    import ast
    import pathlib

    import agg_kernels

    root = pathlib.Path(agg_kernels.__file__).parent
    for name in ("sampler.py", "schedule.py"):
        tree = ast.parse((root / name).read_text())
        mods = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        mods += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
        assert not [m for m in mods if m.split(".")[0] in {"comfy", "comfy_api", "nodes", "folder_paths", "comfy_extras"}]


def test_resolved_zones_follow_the_guidance_window_only_when_asked():
    from agg_kernels.sampler import resolved_zones

    sigmas = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.5, 0.0])
    zones = Zones(eta_edit=0.0, eta=0.0, eta_boost=1.0, edit_end=0.2, boost_start=0.8)
    assert resolved_zones(zones, False, sigmas, 3.0, "eps") == zones
    followed = resolved_zones(zones, True, sigmas, 3.0, "eps")
    assert followed.edit_end == pytest.approx(0.4)  # the steps from 10 and 6: the one from 3 is below the window
    assert followed == Zones(0.0, 0.0, 1.0, followed.edit_end, 0.8)  # only the edit zone's end moves
    assert resolved_zones(zones, True, sigmas, None, "eps").edit_end == 0.2  # no AGG run
    assert resolved_zones(zones, True, sigmas, 0.1, "eps").edit_end == 0.8  # never past the boost
