"""The guidance hook realises the asymmetric step exactly inside ComfyUI's own k-diffusion samplers.

No neural network: an exact mixture denoiser stands in for the model, the real hook closures (nodes.runtime
install / open_run) run around it, and the real sampler functions (comfy.k_diffusion.sampling and the AGG
sampler) step with what the hook returns. Each realised x_{i+1} is compared with the asymmetric step
written from (x_i, D_i, delta_i).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from agg_testing.analytic import ancestral_expected, mixture
from agg_testing.probes import FakePatcher, pack_module

from agg_kernels.coordinates import alpha
from agg_kernels.losses import structure_loss
from agg_kernels.schedule import Zones, schedule_rate
from agg_kernels.step import asymmetric_step, symmetric_step
from agg_kernels.strength import substeps

TOL = 1e-4
SHAPE = (2, 4, 4, 4)


def model_sampling(family: str):
    import comfy.model_sampling as ms

    if family == "const":
        class Flow(ms.ModelSamplingDiscreteFlow, ms.CONST):
            pass

        sampling = Flow()
        sampling.set_parameters(shift=3.0, multiplier=1000)
        return sampling
    kind = {"eps": ms.EPS, "v_prediction": ms.V_PREDICTION}[family]

    class Discrete(ms.ModelSamplingDiscrete, kind):
        pass

    return Discrete()


def schedule(sampling, steps: int = 6, keep: int = 5) -> torch.Tensor:
    """An img2img-like tail of the model's 'normal' schedule (ends at 0)."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(sampling, "normal", steps)[-(keep + 1):].float()


def data():
    g = torch.Generator().manual_seed(0)
    means = torch.randn((2, *SHAPE[1:]), generator=g)
    return mixture(means, [0.6, 0.9])


def reference():
    return torch.randn((1, *SHAPE[1:]), generator=torch.Generator().manual_seed(1))


# Every guided step's GuidanceResult, as the hook reports it (observation only).
REPORTS: list = []


def record_reports(monkeypatch) -> list:
    """From now until the test ends, every guided step's GuidanceResult goes to REPORTS as well."""
    runtime = pack_module("nodes.runtime")
    original = runtime.report

    def record(node_name, step, sigma, result, node_id=None, frame_change=None):
        REPORTS.append(result)
        return original(node_name, step, sigma, result, node_id, frame_change=frame_change)

    REPORTS.clear()
    monkeypatch.setattr(runtime, "report", record)
    return REPORTS


@pytest.fixture(autouse=True)
def reports(monkeypatch):
    return record_reports(monkeypatch)


class Harness:
    """A fake guider / model around the real hook closures (install, open_run), recording every step."""

    def __init__(self, family, sampler_fn, extra_options=None, manifold="finite_difference", asymmetric=True,
                 weight=2.0, sampler_obj=None):
        runtime = pack_module("nodes.runtime")
        losses = pack_module("nodes.losses")
        self.family = family
        self.sampling = model_sampling(family)
        self.sigmas = schedule(self.sampling)
        ref = reference()
        loss = losses.AGGLoss((losses.LossSpec("Structure Loss", lambda run: structure_loss(weight, ref)),))
        self.loss = loss
        settings = runtime.AGGSettings(start_percent=0.0, end_percent=1.0, manifold=manifold, dds_steps=1,
                                       dds_lr=0.05, asymmetric=asymmetric)
        import comfy.patcher_extension

        patched = runtime.install(FakePatcher(), loss, settings, "Apply AGG")
        (self.predict_noise,) = patched.wrappers[comfy.patcher_extension.WrappersMP.PREDICT_NOISE]
        self.capture_cond = patched.post_cfg[0]
        key = next(iter(patched.model_options["transformer_options"][runtime.WINDOWS_KEY]))
        identity = lambda t: t  # noqa: E731
        inner = SimpleNamespace(model_sampling=self.sampling, process_latent_in=identity, process_latent_out=identity,
                                latent_format=None, diffusion_model=torch.nn.Identity())
        self.guider = SimpleNamespace(inner_model=inner)
        self.sampler_obj = sampler_obj or SimpleNamespace(sampler_function=sampler_fn, extra_options=dict(extra_options or {}))
        self.run = runtime.open_run("Apply AGG", None, settings, loss, self.guider, self.sigmas, self.sampler_obj, SHAPE, None)
        self.model_options = {"transformer_options": {runtime.RUNS_KEY: {key: self.run}}}
        self.mix = data()
        self.executor_calls: list[torch.Tensor] = []
        self.steps: list[dict] = []
        self.callbacks: list[dict] = []
        # the attribute chains the samplers read for their CONST dispatch and lcm's noise_scaling (ComfyUI 0.33
        # also reads model_sampling through the patcher)
        self.inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=self.sampling),
                                           model_patcher=SimpleNamespace(get_model_object=lambda name: self.sampling))

    def executor(self, x, timestep, model_options, seed):
        d = self.mix.denoise(x.float(), timestep.float(), self.family)
        self.executor_calls.append(d)
        return d

    def __call__(self, x, sigma, **extra):
        n, r = len(self.executor_calls), len(REPORTS)
        returned = self.predict_noise(self.executor, x, sigma, self.model_options, 0)
        d = self.executor_calls[n]
        # a step with no schedule time in the window is not guided
        result = REPORTS[-1] if len(REPORTS) > r else None
        guided = result is not None and result.delta is not None
        shown = d + result.delta if guided else d
        self.steps.append({"x": x.clone(), "sigma": float(sigma.flatten()[0]), "D": d, "shown": shown.clone(),
                           "delta": shown - d, "returned": returned.clone(), "guided": guided})
        return returned

    def callback(self):
        def record(step, x0, x, total):
            self.callbacks.append({"step": step, "x0": x0.clone()})

        wrapped = self.run.preview(record)
        return lambda info: wrapped(info["i"], info["denoised"], info["x"], len(self.sigmas) - 1)

    def start(self, seed: int = 3) -> torch.Tensor:
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
        return self.sigmas[0] * z if self.family != "const" else self.sigmas[0] * z + (1 - self.sigmas[0]) * reference()

    def check_callbacks(self):
        assert len(self.callbacks) == len(self.steps)
        for cb, st in zip(self.callbacks, self.steps, strict=True):
            assert torch.allclose(cb["x0"], st["shown"], atol=TOL)
        # the compensated value differs from what the previews show on at least one step
        assert any((st["returned"] - st["shown"]).abs().max() > 1e-3 for st in self.steps)


class FixedNoise:
    def __init__(self, seed: int = 7):
        self.g = torch.Generator().manual_seed(seed)
        self.drawn: list[torch.Tensor] = []

    def __call__(self, sigma, sigma_next):
        z = torch.randn(SHAPE, generator=self.g)
        self.drawn.append(z)
        return z


def realised(h: Harness, out: torch.Tensor) -> list[torch.Tensor]:
    return [st["x"] for st in h.steps[1:]] + [out]


def assert_guided(h: Harness):
    """Every step of the run's (whole-range) window is guided, except a last step from a sigma so small that
    it spends almost no schedule time (v = sigma^2 / (alpha^2 + sigma^2) below 1e-3) in it."""
    assert len(h.steps) == len(h.sigmas) - 1
    live = [st for st in h.steps if st["sigma"] > 0.05]
    assert len(live) >= len(h.steps) - 1
    assert all(st["guided"] and st["delta"].abs().max() > 1e-3 for st in live), "guidance did nothing"
    assert len(REPORTS) == sum(st["guided"] for st in h.steps)


def k():
    import comfy.k_diffusion.sampling as kds

    return kds


FAMILIES = ["eps", "v_prediction", "const"]
MANIFOLDS = ["none", "finite_difference"]


@pytest.mark.parametrize("manifold", MANIFOLDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_euler_realises_the_asymmetric_step(family, manifold):
    h = Harness(family, k().sample_euler, manifold=manifold)
    out = k().sample_euler(h, h.start(), h.sigmas, callback=h.callback(), disable=True)
    assert_guided(h)
    for st, x_next, sn in zip(h.steps, realised(h, out), h.sigmas[1:].tolist(), strict=True):
        want = asymmetric_step(st["x"], st["D"], st["delta"], st["sigma"], sn, family)
        assert torch.allclose(x_next, want, atol=TOL), (st["sigma"], (x_next - want).abs().max())
    h.check_callbacks()


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_euler_ancestral_realises_the_asymmetric_step(family, eta):
    h = Harness(family, k().sample_euler_ancestral, extra_options={"eta": eta})
    noise = FixedNoise()
    out = k().sample_euler_ancestral(h, h.start(), h.sigmas, callback=h.callback(), disable=True, eta=eta,
                                     noise_sampler=noise)
    assert_guided(h)
    drawn = iter(noise.drawn)
    for st, x_next, sn in zip(h.steps, realised(h, out), h.sigmas[1:].tolist(), strict=True):
        z = next(drawn) if (eta and sn > 0) else torch.zeros(SHAPE)
        want = ancestral_expected(st["x"], st["D"], st["delta"], st["sigma"], sn, eta, family, z).float()
        if eta == 0.0:
            assert torch.allclose(want, asymmetric_step(st["x"], st["D"], st["delta"], st["sigma"], sn, family), atol=TOL)
        assert torch.allclose(x_next, want, atol=TOL), (st["sigma"], (x_next - want).abs().max())
    h.check_callbacks()


@pytest.mark.parametrize("family", FAMILIES)
def test_lcm_renoises_the_guided_estimate(family):
    h = Harness(family, k().sample_lcm)
    noise = FixedNoise()
    out = k().sample_lcm(h, h.start(), h.sigmas, callback=h.callback(), disable=True, noise_sampler=noise)
    assert_guided(h)
    drawn = iter(noise.drawn)
    for st, x_next, sn in zip(h.steps, realised(h, out), h.sigmas[1:].tolist(), strict=True):
        guided = st["D"] + st["delta"]
        want = guided if sn == 0 else alpha(torch.tensor(sn), family) * guided + sn * next(drawn)
        assert torch.allclose(x_next, want, atol=TOL), (st["sigma"], (x_next - want).abs().max())
    # lcm jumps to the returned value itself: nothing to compensate, previews equal what it steps with
    for cb, st in zip(h.callbacks, h.steps, strict=True):
        assert torch.allclose(cb["x0"], st["shown"], atol=TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_agg_sampler_realises_the_asymmetric_step(family):
    from agg_kernels.sampler import sampler_eta_at

    sampler = pack_module("nodes.sampler")
    zones = Zones(eta_edit=0.0, eta=0.5, eta_boost=1.0, edit_end=0.4, boost_start=0.6)
    options = {"zones": zones, "follow_guidance": False}
    h = Harness(family, sampler.sample_agg_comfy, sampler_obj=sampler.PackSampler(sampler.sample_agg_comfy, "agg", options))
    noise = FixedNoise()
    out = sampler.sample_agg_comfy(h, h.start(), h.sigmas, {}, h.callback(), True, noise_sampler=noise, **options)
    assert_guided(h)
    etas = [sampler_eta_at(h.sigmas, s, zones) for s in h.sigmas[:-1].tolist()]
    assert {0.0, 0.5, 1.0} <= set(etas)  # every zone is exercised
    drawn = iter(noise.drawn)
    for st, x_next, sn, eta in zip(h.steps, realised(h, out), h.sigmas[1:].tolist(), etas, strict=True):
        z = next(drawn) if (eta and sn > 0) else torch.zeros(SHAPE)
        want = ancestral_expected(st["x"], st["D"], st["delta"], st["sigma"], sn, eta, family, z).float()
        assert torch.allclose(x_next, want, atol=TOL), (st["sigma"], eta, (x_next - want).abs().max())
    h.check_callbacks()


@pytest.mark.parametrize("family", ["eps", "const"])
def test_agg_sampler_draws_comfyuis_own_noise(family):
    """At eta 1 in every zone and without guidance the AGG Sampler is ComfyUI's euler_ancestral, seed for seed
    (ComfyUI 0.33 offsets the CPU seed of its noise sampler: the pack follows whatever ComfyUI does)."""
    from agg_testing.analytic import KModel

    sampler = pack_module("nodes.sampler")
    mix = data()
    model = KModel(lambda x, s: mix.denoise(x, s, family), family)
    sigmas = schedule(model_sampling(family))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    zones = Zones(eta_edit=1.0, eta=1.0, eta_boost=1.0, edit_end=0.4, boost_start=0.6)
    ours = sampler.sample_agg_comfy(model, x, sigmas, {"seed": 11}, None, True, zones)
    again = sampler.sample_agg_comfy(model, x, sigmas, {"seed": 12}, None, True, zones)
    ref = k().sample_euler_ancestral(model, x, sigmas, extra_args={"seed": 11}, disable=True)
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert (again - ref).abs().max() > 0.1  # another seed draws other noise


@pytest.mark.parametrize("family", FAMILIES)
def test_symmetric_switch_steps_with_the_guided_estimate(family):
    h = Harness(family, k().sample_euler, asymmetric=False)
    out = k().sample_euler(h, h.start(), h.sigmas, callback=h.callback(), disable=True)
    assert_guided(h)
    for st, x_next, sn in zip(h.steps, realised(h, out), h.sigmas[1:].tolist(), strict=True):
        assert torch.equal(st["returned"], st["shown"])
        want = symmetric_step(st["x"], st["D"], st["delta"], st["sigma"], sn, family)
        assert torch.allclose(x_next, want, atol=TOL)
        if 0 < sn:
            asym = asymmetric_step(st["x"], st["D"], st["delta"], st["sigma"], sn, family)
            assert not torch.allclose(x_next, asym, atol=1e-3)  # the switch matters


def test_outside_the_window_or_without_a_run_the_model_output_is_untouched():
    runtime = pack_module("nodes.runtime")
    h = Harness("eps", k().sample_euler)
    x = h.start()
    sig = h.sigmas[0:1].repeat(SHAPE[0])
    # no open run for this patch (e.g. another sampling call): pass-through
    out = h.predict_noise(h.executor, x, sig, {"transformer_options": {runtime.RUNS_KEY: {}}}, 0)
    assert out is h.executor_calls[-1]
    # a run whose window lies below this sigma: pass-through, no guided step recorded
    settings = runtime.AGGSettings(start_percent=0.99, end_percent=1.0)
    run = runtime.open_run("Apply AGG", None, settings, h.loss, h.guider, h.sigmas, h.sampler_obj, SHAPE, None)
    assert run.window[0] < float(h.sigmas[1])  # the first step lies wholly above the window
    key = next(iter(h.model_options["transformer_options"][runtime.RUNS_KEY]))
    out = h.predict_noise(h.executor, x, sig, {"transformer_options": {runtime.RUNS_KEY: {key: run}}}, 0)
    assert out is h.executor_calls[-1] and REPORTS == []
    seen = []
    run.preview(lambda step, x0, x, total: seen.append(x0))(0, out, x, 1)
    assert seen[0] is out  # nothing pending: previews show the model's own estimate


# -- cfg_pp samplers: a guider with cond != uncond, finite differences on ----------------------------


class CFGHarness(Harness):
    """A guider with a conditional and an unconditional denoiser (different data), CFG, and the post-CFG
    functions run as ComfyUI's sampling_function runs them; calc_cond_batch answers the conditional probe."""

    def __init__(self, family, sampler_fn, monkeypatch, cfg=4.0, **kw):
        super().__init__(family, sampler_fn, **kw)
        g = torch.Generator().manual_seed(11)
        self.uncond = mixture(torch.randn((2, *SHAPE[1:]), generator=g), [0.7, 1.1])
        self.cfg = cfg
        self.guider.conds = {"positive": ["POSITIVE"]}
        self.probes: list[torch.Tensor] = []
        self.inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=self.sampling),
                                           model_patcher=SimpleNamespace(get_model_object=lambda name: self.sampling))
        import comfy.samplers

        def calc_cond_batch(model, conds, x, timestep, model_options):
            assert conds == [["POSITIVE"]] and model is self.guider.inner_model
            self.probes.append(x)
            return [self.mix.denoise(x.float(), timestep.float(), self.family)]

        monkeypatch.setattr(comfy.samplers, "calc_cond_batch", calc_cond_batch)

    def executor(self, x, timestep, model_options, seed):
        c = self.mix.denoise(x.float(), timestep.float(), self.family)
        u = self.uncond.denoise(x.float(), timestep.float(), self.family)
        d = u + self.cfg * (c - u)
        # the patch's own post-CFG hook sits in the model's options (nodes.runtime.install), the sampler's after it
        for fn in [self.capture_cond, *model_options.get("sampler_post_cfg_function", [])]:
            d = fn({"denoised": d, "cond_denoised": c, "uncond_denoised": u, "model_options": model_options,
                    "sigma": timestep, "input": x, "cond_scale": self.cfg})
        self.executor_calls.append(d)
        return d

    def __call__(self, x, sigma, **extra):
        options = dict(extra.get("model_options", {}))
        options["transformer_options"] = self.model_options["transformer_options"]
        n, r = len(self.executor_calls), len(REPORTS)
        returned = self.predict_noise(self.executor, x, sigma, options, 0)
        d = self.executor_calls[n]
        result = REPORTS[-1] if len(REPORTS) > r else None
        guided = result is not None and result.delta is not None
        shown = d + result.delta if guided else returned
        self.steps.append({"x": x.clone(), "sigma": float(sigma.flatten()[0]), "D": d, "shown": shown.clone(),
                           "delta": shown - returned if not guided else shown - d, "returned": returned.clone(),
                           "guided": guided, "U": self.uncond.denoise(x.float(), sigma.float(), self.family)})
        return returned


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_pp_samplers_realise_the_step_with_the_probe_on(family, eta, monkeypatch):
    """The finite-difference probe is a conditional pass that runs no post-CFG function, so the uncond
    estimate the cfg_pp samplers keep there is the one at x, not at the probed x."""
    kds = k()
    fn = kds.sample_euler_cfg_pp if eta == 0 else kds.sample_euler_ancestral_cfg_pp
    h = CFGHarness(family, fn, monkeypatch, extra_options={} if eta == 0 else {"eta": eta})
    noise = FixedNoise()
    kwargs = {} if eta == 0 else {"eta": eta, "noise_sampler": noise}
    out = fn(h, h.start(), h.sigmas, extra_args={"model_options": {}}, callback=h.callback(), disable=True, **kwargs)
    assert_guided(h)
    # one conditional probe per sub-step of each guided step (this run's window is the whole schedule)
    assert len(h.probes) == sum(substeps(schedule_rate(h.sigmas, st["sigma"], h.run.window, family)) for st in h.steps if st["guided"])
    lam = lambda s: torch.tensor(float(alpha(torch.tensor(s), family)))  # noqa: E731  alpha_s of the sampler
    drawn = iter(noise.drawn)
    for st, x_next, sn in zip(h.steps, realised(h, out), h.sigmas[1:].tolist(), strict=True):
        guided = st["D"] + st["delta"]
        assert torch.allclose(st["returned"], guided, atol=TOL)  # R = D + delta is exact for these samplers
        if sn == 0:
            want = guided
        else:
            s, a_s, a_t = st["sigma"], lam(st["sigma"]), lam(sn)
            down, up = kds.get_ancestral_step(torch.tensor(s) / a_s, torch.tensor(sn) / a_t, eta=eta)
            want = a_t * guided + a_t * down * (st["x"] - a_s * st["U"]) / s
            if eta:
                want = want + a_t * next(drawn) * up
        assert torch.allclose(x_next, want, atol=TOL), (st["sigma"], (x_next - want).abs().max())


def test_two_patches_on_one_model_resolve_the_agg_samplers_zones_to_one_answer():
    """Two Apply AGG on one model (windows ending at 30 % and at 60 %) and an AGG Sampler following the guidance
    window: each run's guided step and the sampler take the same edit zone, the one of the longer window."""
    import comfy.patcher_extension

    from agg_kernels.sampler import resolved_zones, sampler_eta_at

    runtime, sampler, losses = pack_module("nodes.runtime"), pack_module("nodes.sampler"), pack_module("nodes.losses")
    sampling = model_sampling("eps")
    sigmas = schedule(sampling)
    ref = reference()
    loss = losses.AGGLoss((losses.LossSpec("Structure Loss", lambda run: structure_loss(0.1, ref)),))
    first = runtime.install(FakePatcher(), loss, runtime.AGGSettings(end_percent=0.3), "Apply AGG")
    both = runtime.install(first, loss, runtime.AGGSettings(end_percent=0.6), "Apply AGG")
    zones = Zones(eta_edit=0.5, eta=0.0, eta_boost=1.0, edit_end=0.1, boost_start=0.9)
    agg = sampler.PackSampler(sampler.sample_agg_comfy, "agg", {"zones": zones, "follow_guidance": True})
    identity = lambda t: t  # noqa: E731
    guider = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=sampling, process_latent_in=identity,
                                                         process_latent_out=identity, latent_format=None))
    runs = []

    class Executor:
        def __init__(self, fn):
            self.fn, self.class_obj = fn, agg

        def __call__(self, *args):
            return self.fn(*args)

    def sampling_call(guider, sigmas, extra_args, *rest):
        runs.extend(extra_args["model_options"]["transformer_options"][runtime.RUNS_KEY].values())

    outer, inner = both.wrappers[comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE]
    extra_args = {"model_options": both.model_options}
    noise = torch.zeros(SHAPE)
    outer(Executor(lambda *a: inner(Executor(sampling_call), *a)), guider, sigmas, extra_args, None, noise, noise,
          None, True)
    assert len(runs) == 2 and runs[0].window != runs[1].window
    # the sampler's own zones: what sample_agg_comfy resolves from the same model options
    low = sampler.guidance_window_low(extra_args["model_options"], sampling)
    assert low == min(run.window[1] for run in runs)
    theirs = resolved_zones(zones, True, sigmas, low, "eps")
    want = [sampler_eta_at(sigmas, s, theirs) for s in sigmas[:-1].tolist()]
    for run in runs:
        assert [run.sampler.eta_at(s) for s in sigmas[:-1].tolist()] == want
    # each window alone would give another edit zone: the answer above is not one by chance
    alone = [resolved_zones(zones, True, sigmas, run.window[1], "eps").edit_end for run in runs]
    assert alone[0] != alone[1]
