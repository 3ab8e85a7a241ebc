"""How exactly each stock ComfyUI sampler realises the asymmetric step, measured with an exact denoiser.

    python tests/bench/samplers.py [--steps 10] [--families eps,const] [--out DIR]

For every sampler in comfy.samplers.KSampler.SAMPLERS, the real sampler object
(comfy.samplers.sampler_object) runs on an analytic Gaussian-mixture denoiser
(tests/agg_testing/analytic.py) through KSAMPLER.sample, the call ComfyUI's guiders make. The model
callable applies what AGG's hook applies: delta = gamma * (target - D) on the clean estimate, returned
as the compensated denoised R = compensated_denoised(D, delta, sigma, target_sigma), where
target_sigma comes from the hook's own logic (nodes/runtime.py AGGRun.target_sigma and
sampler_identity, called on the pack's code).

Each schedule step i is measured on its own: a run guided only on the evaluations of step i
(sigma_{i+1} < sigma <= sigma_i) against the unguided run with the same noise. The exact asymmetric
step moves x_{i+1} by alpha(sigma_{i+1}) * delta_i (docs/DESIGN.md §1.2 step 5); the deviation is
|realised shift - alpha(sigma_{i+1}) * delta_i| / |alpha(sigma_{i+1}) * delta_i|, and the table shows
its maximum over the steps. Effects a guided step leaves on later steps of multistep samplers are not
counted (they are zero for first-order samplers).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/: the shared agg_testing helpers
from agg_testing.comfy_env import PACK_ROOT, configure_comfy  # noqa: E402

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
    """What KSAMPLER.sample and the k-diffusion samplers read off a guider: `inner_model.model_sampling`,
    `inner_model.model_patcher.get_model_object`, and a call returning the (guided) denoised."""

    def __init__(self, denoise, family: str, guide):
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
            model_patcher=SimpleNamespace(get_model_object=lambda name: ms if name == "model_sampling" else None),
        )
        self.model_patcher = self.inner_model.model_patcher
        self.denoise = denoise
        self.guide = guide
        self.seen: list[tuple[float, object]] = []  # (sigma, x) of every evaluation

    def __call__(self, x, sigma, model_options=None, seed=None, **kwargs):
        model_options = model_options or {}
        self.seen.append((float(sigma.flatten()[0]), x.clone()))
        d = self.denoise(x, sigma)
        # post-CFG functions (the cfg_pp samplers read the uncond estimate there) run before AGG's
        # PREDICT_NOISE wrapper, on the unguided prediction (cfg 1: cond = uncond = D)
        for fn in model_options.get("sampler_post_cfg_function", []):
            d = fn({"denoised": d, "cond_denoised": d, "uncond_denoised": d, "model": self.inner_model, "sigma": sigma,
                    "input": x, "model_options": model_options, "cond": None, "uncond": None, "cond_scale": 1.0})
        return self.guide(x, sigma, d)


def run_sampler(name: str, family: str, sigmas, x0, noise, mixture, guide_step: int | None, gamma: float, target):
    """States x_0..x_N (the callback's x at each step start, then the output) and the delta at each guided step."""
    import comfy.samplers
    import torch

    from agg_kernels.step import compensated_denoised

    runtime = pack_runtime()
    sampler = comfy.samplers.sampler_object(name)
    sampler_name, eta = runtime.sampler_identity(sampler)
    hook = SimpleNamespace(sigmas=sigmas.float(), sampler_name=sampler_name, eta=eta, family=family,
                           sampler_options=dict(sampler.extra_options or {}))
    hook.patch_sampler_zone_options = lambda: {}
    deltas: dict[int, torch.Tensor] = {}

    def guide(x, sigma, d):
        s = float(sigma.flatten()[0])
        if guide_step is None:
            return d
        hi, lo = float(sigmas[guide_step]), float(sigmas[guide_step + 1])
        if not (lo < s <= hi * (1 + 1e-6)):
            return d
        delta = gamma * (target - d)
        deltas.setdefault(guide_step, delta)
        t, _exact = runtime.AGGRun.target_sigma(hook, s)
        if t is None or t >= s:
            return d + delta
        return compensated_denoised(d, delta, sigma.float(), t, family)

    model = ModelWrap(mixture.denoiser(family), family, guide)
    states: dict[int, torch.Tensor] = {}

    def callback(i, denoised, x, total):
        states.setdefault(i, x.clone())

    torch.manual_seed(0)
    out = sampler.sample(model, sigmas, {"model_options": {}, "seed": 0}, callback, noise.clone(), x0.clone(),
                         None, True)
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


def measure(name: str, family: str, steps: int, gamma: float = 0.2) -> dict:
    import torch
    from agg_testing.analytic import mixture

    from agg_kernels.coordinates import alpha

    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float32)
    mix = mixture(means, [0.5, 0.3, 0.7])
    sigmas = schedule(family, steps).float()
    x0 = torch.zeros(1, 4, 8, 8, dtype=torch.float32)  # latent_image (denoise 1: pure noise start)
    noise = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float32)
    target = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float32)
    base, _ = run_sampler(name, family, sigmas, x0, noise, mix, None, gamma, target)
    worst, per_step = 0.0, []
    n = len(sigmas) - 1
    for i in range(n):
        if i + 1 not in base or i not in base:
            continue
        states, deltas = run_sampler(name, family, sigmas, x0, noise, mix, i, gamma, target)
        if i not in deltas or i + 1 not in states:
            continue
        expected = alpha(torch.as_tensor(float(sigmas[i + 1]), dtype=torch.float32), family) * deltas[i]
        shift = states[i + 1] - base[i + 1]
        dev = float((shift - expected).norm() / expected.norm())
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
    import comfy.samplers

    runtime = pack_runtime()
    names = [s for s in args.samplers.split(",") if s] or list(comfy.samplers.KSampler.SAMPLERS)
    families = [f for f in args.families.split(",") if f]
    results: dict = {}
    header = f"{'sampler':<28}" + "".join(f"{f + ' max dev':>16}" for f in families) + "  realised"
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
        sampler_name, _ = runtime.sampler_identity(comfy.samplers.sampler_object(name))
        results[name] = {"families": row, "realised": kind, "hook_name": sampler_name}
        cells = "".join(f"{d:>16.2e}" if math.isfinite(d) else f"{'error':>16}" for d in devs)
        print(f"{name:<28}{cells}  {kind}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "samplers.json").write_text(json.dumps({"steps": args.steps, "exact_tol": EXACT_TOL,
                                                            "samplers": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
