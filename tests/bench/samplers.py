"""How exactly each stock ComfyUI sampler realises the asymmetric step, measured with an exact denoiser.

    python tests/bench/samplers.py [--steps 10] [--families eps,const] [--out DIR]

For every sampler in comfy.samplers.KSampler.SAMPLERS, the real sampler object
(comfy.samplers.sampler_object) runs through KSAMPLER.sample, the call ComfyUI's guiders make, on a
stand-in guider: a conditional and an unconditional analytic Gaussian-mixture denoiser (different data,
tests/agg_testing/analytic.py) combined by CFG, with the post-CFG functions run as ComfyUI's
sampling_function runs them (the cfg_pp samplers keep the uncond estimate there). The guidance is the
pack's own hook: the closures of nodes/runtime.py (install, open_run) with a Structure Loss toward a
target and finite differences on, whose conditional probe pass is answered by the conditional denoiser
(comfy.samplers.calc_cond_batch stands in for the model pass).

Each schedule step i is measured on its own: a run whose guidance window holds only step i's evaluations
(sigma_{i+1} < sigma <= sigma_i) against the run with an empty window, with the same noise. The exact
asymmetric step moves x_{i+1} by alpha(sigma_{i+1}) * delta_i (docs/DESIGN.md §1.2 step 4), delta_i being
what the hook applied at sigma_i; the deviation is |realised shift - alpha(sigma_{i+1}) delta_i| /
|alpha(sigma_{i+1}) delta_i| (or over a thousandth of |x_{i+1}| where the shift is smaller), and the table
shows its maximum over the steps. Every step is guided with the same pull and allowance per step (the weight
and trust region over the step's share of schedule time). Effects a guided step leaves
on later steps of multistep samplers are not counted (they are zero for first-order samplers). Beside the
measurement the table gives the pack's classification per family (agg_kernels.step.approximation_reason) and
flags a sampler whose measurement disagrees with it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import types
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/: the shared agg_testing helpers
from agg_testing.comfy_env import PACK_ROOT, configure_comfy  # noqa: E402
from agg_testing.probes import FakePatcher, window_isolating  # noqa: E402

EXACT_TOL = 1e-4


def setup_paths() -> None:
    """ComfyUI first, then the pack root and tests/ (as tests/conftest.py); CPU mode."""
    configure_comfy(cpu=True)


def pack_runtime():
    """The pack's nodes/runtime.py, imported as part of the pack (ComfyUI's `nodes` owns the top-level name)."""
    name = "agg_pack_bench"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(PACK_ROOT)]
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.nodes.runtime")


def schedule(family: str, steps: int):
    import torch

    if family == "const":
        return torch.linspace(0.98, 0.0, steps + 1)
    # Karras-style schedule from 14.6 to 0.03 (SD1.5's range), then 0
    smax, smin, rho = 14.6, 0.03, 7.0
    ramp = torch.linspace(0, 1, steps)
    s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


class ModelWrap:
    """A CFG guider as KSAMPLER.sample and the k-diffusion samplers see it (`inner_model.model_sampling`,
    `inner_model.model_patcher.get_model_object`, a call returning the denoised), with AGG's PREDICT_NOISE
    hook around its prediction."""

    def __init__(self, cond, uncond, family: str, cfg: float, hook, run):
        import comfy.model_sampling
        import torch
        from agg_testing.analytic import COMFY_SAMPLING

        ms = getattr(comfy.model_sampling, COMFY_SAMPLING[family])()
        # a schedule whose first sigma is below sigma_max: the start is x = latent + sigma * noise (no rescale)
        ms.sigma_max = torch.tensor(1e4 if family != "const" else 1.0)
        ms.sigma_min = torch.tensor(1e-3)
        # sa_solver reads its stochastic window through percent_to_sigma; a linear map is enough here
        top = 1.0 if family == "const" else 14.6
        ms.percent_to_sigma = lambda p: 1e4 if p <= 0 else (0.0 if p >= 1 else top * (1.0 - p))
        self.model_sampling = ms
        self.inner_model = SimpleNamespace(
            model_sampling=ms,
            # `model`: ComfyUI 0.33's KSAMPLER names the model's class in its first-step log line
            model_patcher=SimpleNamespace(get_model_object=lambda name: ms if name == "model_sampling" else None,
                                          model=SimpleNamespace()),
        )
        self.model_patcher = self.inner_model.model_patcher
        self.cond, self.uncond, self.family, self.cfg = cond, uncond, family, cfg
        self.hook, self.run = hook, run  # hook: the installed FakePatcher (agg_testing.probes)
        self.seen: list[tuple[float, object]] = []  # (sigma, x) of every evaluation

    def prediction(self, x, timestep, model_options, seed):
        """CFG of the two exact denoisers, then the post-CFG functions (AGG's own capture first, as installed)."""
        c = self.cond.denoise(x.float(), timestep.float(), self.family)
        u = self.uncond.denoise(x.float(), timestep.float(), self.family)
        d = u + self.cfg * (c - u)
        for fn in [*self.hook.post_cfg, *model_options.get("sampler_post_cfg_function", [])]:
            d = fn({"denoised": d, "cond_denoised": c, "uncond_denoised": u, "model": self.inner_model,
                    "sigma": timestep, "input": x, "model_options": model_options, "cond": None, "uncond": None,
                    "cond_scale": self.cfg})
        return d

    def __call__(self, x, sigma, model_options=None, seed=None, **kwargs):
        import comfy.patcher_extension

        runtime = pack_runtime()
        options = dict(model_options or {})
        topts = dict(options.get("transformer_options", {}))
        key = next(iter(self.hook.model_options["transformer_options"][runtime.WINDOWS_KEY]))
        topts[runtime.RUNS_KEY] = {key: self.run}
        options["transformer_options"] = topts
        self.seen.append((float(sigma.flatten()[0]), x.clone()))
        (predict_noise,) = self.hook.wrappers[comfy.patcher_extension.WrappersMP.PREDICT_NOISE]
        return predict_noise(self.prediction, x, sigma, options, seed)


def run_sampler(name: str, family: str, sigmas, x0, noise, mixtures, guide_step: int | None, target, weight: float,
                cfg: float = 4.0, per_share: float = 1.0):
    """States x_0..x_N (the callback's x at each step start, then the output) and the delta the hook applied at
    each guided step's first evaluation. The weight and the trust region are divided by `per_share` (the guided
    step's share of schedule time), so every step is measured with the same pull and allowance."""
    import comfy.samplers
    import torch

    from agg_kernels.losses import structure_loss

    runtime = pack_runtime()
    losses = importlib.import_module(f"{runtime.__package__}.losses")
    cond, uncond = mixtures
    sampler = comfy.samplers.sampler_object(name)
    loss = losses.AGGLoss((losses.LossSpec("Structure Loss", lambda info: structure_loss(weight / per_share, target)),))
    settings = runtime.AGGSettings(start_percent=0.0, end_percent=1.0, manifold="finite_difference", dds_steps=1,
                                   dds_lr=0.5, asymmetric=True)
    # 0.5 posterior standard deviations per step: shifts large enough that float32 rounding stays far below 1e-4
    settings = replace(settings, trust_region=0.5 / per_share)
    model = ModelWrap(cond, uncond, family, cfg, None, None)
    if guide_step is None:  # no schedule time: the hook runs and guides nothing
        window = (1.0 - 1e-8, 1.0)
    else:  # exactly step i: its neighbours only touch the window's ends
        window = window_isolating(model.model_sampling.percent_to_sigma, sigmas.tolist(), guide_step)
    settings = replace(settings, start_percent=window[0], end_percent=window[1])
    model.hook = runtime.install(FakePatcher(), loss, settings, "Apply AGG")
    identity = lambda t: t  # noqa: E731
    guider = SimpleNamespace(conds={"positive": ["POSITIVE"]})

    def calc_cond_batch(model, conds, x, timestep, model_options):
        # the finite-difference probe: the conditional prediction alone
        assert conds == [["POSITIVE"]], conds
        return [cond.denoise(x.float(), timestep.float(), family)]

    inner = SimpleNamespace(model_sampling=model.model_sampling, process_latent_in=identity,
                            process_latent_out=identity, latent_format=None, diffusion_model=torch.nn.Identity())
    guider.inner_model = inner
    run = runtime.open_run("Apply AGG", None, settings, loss, guider, sigmas.float(), sampler, tuple(noise.shape), None)
    model.run = run
    deltas: dict[int, torch.Tensor] = {}
    report = runtime.report

    def recording_report(node_name, step, sigma, result, *args, **kwargs):
        # the guided step's delta on the clean estimate, as the previews show it (observation only)
        if guide_step is not None and result.delta is not None and guide_step not in deltas:
            deltas[guide_step] = result.delta.float().clone()
        return report(node_name, step, sigma, result, *args, **kwargs)

    states: dict[int, torch.Tensor] = {}

    def callback(i, denoised, x, total):
        states.setdefault(i, x.clone())

    original = comfy.samplers.calc_cond_batch
    comfy.samplers.calc_cond_batch, runtime.report = calc_cond_batch, recording_report
    try:
        torch.manual_seed(0)
        out = sampler.sample(model, sigmas, {"model_options": {}, "seed": 0}, callback, noise.clone(), x0.clone(),
                             None, True)
    finally:
        comfy.samplers.calc_cond_batch, runtime.report = original, report
        run.close()
    n = len(sigmas) - 1
    if len(states) < 2 or torch.equal(states.get(1, states[0]), states[0]):
        # some samplers report their initial x to every callback: take x_i from the first evaluation at sigma_i
        states = {}
        for s, x in model.seen:
            for j in range(n):
                if j not in states and math.isclose(s, float(sigmas[j]), rel_tol=1e-5):
                    states[j] = x
    states[n] = out
    return states, deltas


def measure(name: str, family: str, steps: int, weight: float = 0.2) -> dict:
    import torch
    from agg_testing.analytic import mixture

    from agg_kernels.coordinates import alpha
    from agg_kernels.schedule import step_rate

    g = torch.Generator().manual_seed(0)
    cond = mixture(torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float32), [0.5, 0.3, 0.7])
    uncond = mixture(torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float32), [0.6, 0.9])
    sigmas = schedule(family, steps).float()
    x0 = torch.zeros(1, 4, 8, 8, dtype=torch.float32)  # latent_image (denoise 1: pure noise start)
    noise = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float32)
    target = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float32)
    base, _ = run_sampler(name, family, sigmas, x0, noise, (cond, uncond), None, target, weight)
    worst, per_step = 0.0, []
    n = len(sigmas) - 1
    for i in range(n):
        if i + 1 not in base or i not in base:
            continue
        # the same pull at every step, so a step near the clean image (a small share of schedule time) still
        # moves far more than float32 rounding
        rate = step_rate(float(sigmas[i]), float(sigmas[i + 1]), (float(sigmas[i]), float(sigmas[i + 1])), family)
        if rate <= 0:
            continue
        states, deltas = run_sampler(name, family, sigmas, x0, noise, (cond, uncond), i, target, weight,
                                     per_share=rate)
        if i not in deltas or i + 1 not in states:
            continue
        expected = alpha(torch.as_tensor(float(sigmas[i + 1]), dtype=torch.float32), family) * deltas[i]
        if float(expected.norm()) == 0:
            continue
        shift = states[i + 1] - base[i + 1]
        # a shift below a thousandth of the state (a step near the clean image, held by the per-element bound)
        # is judged against that thousandth: float32 rounds the state itself at about 1e-7 of it
        dev = float((shift - expected).norm() / max(float(expected.norm()), 1e-3 * float(states[i + 1].norm())))
        per_step.append(dev)
        worst = max(worst, dev)
    return {"max_deviation": worst if per_step else float("nan"), "per_step": per_step, "steps_measured": len(per_step)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="AGG's asymmetric step per ComfyUI sampler, against the exact step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--families", default="eps,const")
    ap.add_argument("--samplers", default="", help="comma list (default: all of KSampler.SAMPLERS)")
    ap.add_argument("--out", type=Path, help="folder for samplers.json")
    args = ap.parse_args(argv)
    setup_paths()
    import logging

    logging.getLogger("AGG").setLevel(logging.ERROR)  # each measured run would repeat the hook's warnings
    import comfy.samplers

    from agg_kernels.step import approximation_reason

    runtime = pack_runtime()
    names = [s for s in args.samplers.split(",") if s] or list(comfy.samplers.KSampler.SAMPLERS)
    families = [f for f in args.families.split(",") if f]
    results: dict = {}
    header = f"{'sampler':<28}" + "".join(f"{f + ' max dev':>16}" for f in families) + "  realised    pack says"
    print(header)
    for name in names:
        row = {}
        for fam in families:
            try:
                row[fam] = measure(name, fam, args.steps)
            except Exception as e:  # a sampler this stand-in model cannot drive
                row[fam] = {"max_deviation": float("nan"), "error": f"{type(e).__name__}: {e}"[:200]}
        devs = [row[f]["max_deviation"] for f in families]
        finite = [d for d in devs if math.isfinite(d)]
        kind = "n/a" if not finite else ("exact" if max(finite) < EXACT_TOL else "approximate")
        spec_of = importlib.import_module(f"{runtime.__package__}.sampler").sampler_spec
        sampler_name = spec_of(comfy.samplers.sampler_object(name), [1.0, 0.0], None, "eps").name
        # the pack's classification per family, and whether the measurement agrees with it
        pack = {f: approximation_reason(sampler_name, f) or "exact" for f in families}
        agree = all((pack[f] == "exact") == (row[f]["max_deviation"] < EXACT_TOL) for f in families
                    if math.isfinite(row[f]["max_deviation"]))
        results[name] = {"families": row, "realised": kind, "hook_name": sampler_name, "pack": pack,
                         "agrees": agree}
        cells = "".join(f"{d:>16.2e}" if math.isfinite(d) else f"{'error':>16}" for d in devs)
        said = "/".join("exact" if pack[f] == "exact" else "approx" for f in families)
        print(f"{name:<28}{cells}  {kind:<12}{said}{'' if agree else '  DISAGREES with the pack'}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "samplers.json").write_text(json.dumps({"steps": args.steps, "exact_tol": EXACT_TOL,
                                                            "samplers": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
