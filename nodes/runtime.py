"""The guidance hook: a per-run state opened by a SAMPLER_SAMPLE wrapper and applied by a PREDICT_NOISE
wrapper, so that it works under every stock sampling node and every guider (CFG, DualCFG, PerpNeg).

Glue only: the maths is in agg_kernels.
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management
import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers
import torch

from ..agg_kernels.guidance import DEFAULT_DDS_LR, DEFAULT_DDS_STEPS, guided_delta
from ..agg_kernels.manifold import FD_REL_STEP, MANIFOLD_MODES, grad_enabled
from ..agg_kernels.objective import LossContext
from ..agg_kernels.schedule import REFERENCE_END_PERCENT, edit_window, in_window
from ..agg_kernels.step import compensated_denoised, compensation_target, following_sigma, next_sigma
from ..agg_kernels.strength import DEFAULT_TRUST

log = logging.getLogger("AGG")

RUNS_KEY = "agg_runs"  # transformer_options entry holding the open runs of this sampling call


class AGGError(ValueError):
    """A user-facing error; the message names the node and the input."""


def model_family(model_sampling: Any) -> str | None:
    """The pack's coordinate family for a ComfyUI model_sampling object, None when unsupported.

    Only the relation between x, x0 and sigma matters, not the prediction type: EPS, V_PREDICTION,
    EDM and X0 all use x = x0 + sigma * eps; CONST (SD3, Flux) uses x = (1 - sigma) x0 + sigma * eps.
    """
    ms = comfy.model_sampling
    if isinstance(model_sampling, ms.CONST):
        return "const"
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v_prediction"
    if isinstance(model_sampling, ms.EPS):
        return "eps"
    return None


def require_family(model_sampling: Any, node: str, input_name: str = "model") -> str:
    family = model_family(model_sampling)
    if family is None:
        kinds = ", ".join(c.__name__ for c in type(model_sampling).__mro__[:-1])
        raise AGGError(
            f"{node}: input '{input_name}' samples with {kinds}, which AGG does not support "
            "(supported: EPS and V_PREDICTION models such as SD1.x/SD2.x/SDXL, and CONST flow models such as SD3/Flux)."
        )
    return family


@dataclass(frozen=True)
class AGGSettings:
    start_percent: float = 0.0
    end_percent: float = round(REFERENCE_END_PERCENT, 4)
    manifold: str = "finite_difference"
    dds_steps: int = DEFAULT_DDS_STEPS
    dds_lr: float = DEFAULT_DDS_LR
    asymmetric: bool = True
    trust: float = DEFAULT_TRUST
    fd_rel_step: float | None = None  # None: by the model's precision (see fd_step_for)

    def validate(self, node: str) -> AGGSettings:
        if not 0.0 <= self.start_percent < self.end_percent <= 1.0:
            raise AGGError(
                f"{node}: input 'start_percent' ({self.start_percent}) must be below 'end_percent' "
                f"({self.end_percent}), both within 0..1."
            )
        if self.manifold not in MANIFOLD_MODES:
            raise AGGError(f"{node}: input 'manifold' must be one of {', '.join(MANIFOLD_MODES)}, got {self.manifold!r}.")
        if self.dds_steps < 0 or not 0.0 <= self.dds_lr <= 1.0:
            raise AGGError(f"{node}: input 'dds_steps' must not be negative and 'dds_lr' must lie in 0..1 "
                           f"(got {self.dds_steps}, {self.dds_lr}).")
        if not self.trust > 0:
            raise AGGError(f"{node}: input 'trust_region' must be above 0 (got {self.trust}).")
        return self


@dataclass
class RunInfo:
    """What a loss may need to build itself for one sampling run; `cache` and `release` are per run."""

    model: Any  # comfy BaseModel: process_latent_in/out, latent_format, model_sampling
    family: str
    device: torch.device
    latent_shape: tuple[int, ...]
    sigmas: torch.Tensor
    cache: dict = field(default_factory=dict)
    release: list[Callable[[], None]] = field(default_factory=list)

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def close(self) -> None:
        for fn in reversed(self.release):
            fn()
        self.release.clear()
        self.cache.clear()


def sampler_identity(sampler: Any) -> tuple[str | None, float]:
    """(sampler name, eta) of a ComfyUI sampler object; name None when it is not a KSAMPLER."""
    fn = getattr(sampler, "sampler_function", None)
    if fn is None:
        return None, 0.0
    name = getattr(fn, "agg_sampler_name", None) or fn.__name__
    name = name.removeprefix("sample_").removesuffix("_function")
    extra = dict(getattr(sampler, "extra_options", {}) or {})
    eta = extra.get("eta")
    if eta is None:
        try:
            eta = inspect.signature(fn).parameters["eta"].default
        except (KeyError, ValueError, TypeError):
            eta = 0.0
    return name, float(eta) if isinstance(eta, (int, float)) else 0.0


class GradientWeights:
    """A gradient-capable copy of a diffusion model's weights, swapped in only around autograd passes."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        with torch.inference_mode(False):
            self.copies = {
                (mod_name, p_name): torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                for mod_name, mod in module.named_modules()
                for p_name, p in mod._parameters.items()
                if p is not None
            }

    def __enter__(self):
        self.saved = {}
        mods = dict(self.module.named_modules())
        for (mod_name, p_name), copy in self.copies.items():
            mod = mods[mod_name]
            self.saved[(mod_name, p_name)] = mod._parameters[p_name]
            mod._parameters[p_name] = copy
        return self

    def __exit__(self, *exc):
        mods = dict(self.module.named_modules())
        for (mod_name, p_name), orig in self.saved.items():
            mods[mod_name]._parameters[p_name] = orig
        self.saved = {}
        return False


# RuntimeError messages of the model paths autograd cannot go back through.
AUTOGRAD_LIMITS = ("Inference tensors cannot be saved for backward", "modified by an inplace operation")

# Half-precision models round eps_hat to ~1e-3 relative, and D = x - sigma * eps_hat multiplies that by
# sigma: a larger probe keeps the finite difference above the rounding noise.
FD_REL_STEP_HALF = 1e-1


def fd_step_for(dtype: torch.dtype, requested: float | None) -> float:
    if requested is not None:
        return requested
    return FD_REL_STEP_HALF if dtype in (torch.float16, torch.bfloat16) else FD_REL_STEP


class AGGRun:
    """State of one sampling run: built loss, schedule, sampler identity, logs. Never shared between runs."""

    def __init__(self, patch: AGGPatch, guider: Any, sigmas: torch.Tensor, sampler: Any, latent_shape: tuple[int, ...]):
        self.patch = patch
        self.guider = guider
        model = guider.inner_model
        self.family = require_family(model.model_sampling, patch.node_name)
        self.sigmas = sigmas.detach().float().cpu()
        self.window = edit_window(model.model_sampling.percent_to_sigma, patch.settings.start_percent, patch.settings.end_percent)
        self.sampler_name, self.eta = sampler_identity(sampler)
        self.sampler_options = dict(getattr(sampler, "extra_options", {}) or {})
        self.info = RunInfo(model, self.family, comfy.model_management.get_torch_device(), tuple(latent_shape), self.sigmas)
        self.loss = patch.loss.build(self.info)
        self.step = 0
        self.history: list[dict] = []
        self.warned: set[str] = set()
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (returned R, displayed D + delta)
        self.grad_weights: GradientWeights | None = None
        self.captured: torch.Tensor | None = None  # the guider's conditional prediction at this call's x
        self.probe_is_conditional = False
        patcher = getattr(guider, "model_patcher", None)
        model_dtype = patcher.model_dtype() if patcher is not None else torch.float32
        self.fd_rel_step = fd_step_for(model_dtype, patch.settings.fd_rel_step)

    # -- logging -----------------------------------------------------------------------------
    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("%s: %s", self.patch.node_name, message)

    # -- previews ----------------------------------------------------------------------------
    def wrap_callback(self, callback: Callable | None) -> Callable | None:
        """Previews and denoised_output show D + delta, not the compensated value the sampler steps with."""
        if callback is None:
            return None

        def agg_callback(step, x0, x, total_steps):
            if self.pending is not None:
                returned, shown = self.pending
                if x0 is returned:
                    x0 = shown
                elif x0.shape == returned.shape:
                    x0 = x0 - (returned - shown)
                self.pending = None
            return callback(step, x0, x, total_steps)

        return agg_callback

    # -- the step ------------------------------------------------------------------------------
    def target_sigma(self, sigma: float) -> tuple[float | None, bool]:
        sn = next_sigma(self.sigmas, sigma)
        if sn is None:
            # An evaluation between schedule points (heun corrector, dpm_2, sde midpoints): aim at the next
            # schedule entry below it; the result is approximate.
            return following_sigma(self.sigmas, sigma), False
        if self.sampler_name == "agg":
            from ..agg_kernels.sampler import sampler_eta_at

            eta = sampler_eta_at(self.sigmas, sigma, **self.patch_sampler_zone_options())
            return compensation_target("euler_ancestral", sigma, sn, self.family, eta)
        return compensation_target(self.sampler_name, sigma, sn, self.family, self.eta)

    def patch_sampler_zone_options(self) -> dict:
        from ..agg_kernels.sampler import resolve_zones

        return resolve_zones(self.sampler_options, self.sigmas, self.window[1])

    def denoiser(self, executor, timestep, model_options, seed, dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The denoiser whose Jacobian carries the pull: the conditional prediction alone.

        Its Jacobian is a posterior covariance (CFG's J_u + s (J_c - J_u) need not be), it costs one
        conditional pass, and it runs no pre/post-CFG function, so a sampler's state kept there (the
        cfg_pp samplers' uncond estimate) is untouched. ControlNet, LoRA, hooks and area conds still
        apply: the pass goes through calc_cond_batch. A guider without a positive cond is probed through
        its whole prediction, with the post-CFG functions left out for the same reason.
        """
        mode = self.patch.settings.manifold
        if mode == "none":
            return None
        cond = (getattr(self.guider, "conds", None) or {}).get("positive")
        self.probe_is_conditional = cond is not None
        probe_options = {**model_options, "sampler_post_cfg_function": []}

        def forward(xp: torch.Tensor) -> torch.Tensor:
            if cond is None:
                return executor(xp.to(dtype), timestep, probe_options, seed).float()
            return comfy.samplers.calc_cond_batch(self.guider.inner_model, [cond], xp.to(dtype), timestep, model_options)[0].float()

        if mode == "finite_difference":
            return forward

        def differentiable(xp: torch.Tensor) -> torch.Tensor:
            if self.grad_weights is None:
                self.grad_weights = GradientWeights(self.guider.inner_model.diffusion_model)
            with self.grad_weights:
                return forward(xp)

        return differentiable

    def probe_base(self, denoise: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor) -> torch.Tensor | None:
        """The probed denoiser's value at x: the conditional prediction the guider just made (captured by
        the post-CFG hook) when the probe is conditional, else one more pass of the probed denoiser."""
        captured, self.captured = self.captured, None
        if denoise is None or self.patch.settings.manifold != "finite_difference":
            return None
        if self.probe_is_conditional and captured is not None and captured.shape == x.shape:
            return captured.float()
        return denoise(x)

    def guide(self, executor, x: torch.Tensor, timestep: torch.Tensor, model_options: dict, seed, denoised: torch.Tensor) -> torch.Tensor:
        sigma = float(timestep.flatten()[0])
        if not in_window(sigma, self.window):
            self.captured = None
            return denoised
        comfy.model_management.throw_exception_if_processing_interrupted()
        ctx = LossContext(sigma=timestep.detach().float(), x=x.detach().float(), family=self.family, step=self.step)

        def delta():
            settings = self.patch.settings
            denoise = self.denoiser(executor, timestep, model_options, seed, x.dtype)
            return guided_delta(
                self.loss, x, denoised, ctx, settings.manifold, denoise, settings.dds_steps, settings.dds_lr,
                fd_rel_step=self.fd_rel_step, probe_base=self.probe_base(denoise, x), trust=settings.trust,
            )

        try:
            result = delta()
        except RuntimeError as e:
            if self.patch.settings.manifold != "autograd" or not any(m in str(e) for m in AUTOGRAD_LIMITS):
                raise
            # A patch outside the diffusion model (e.g. a ControlNet) holds inference weights, or the model adds
            # in place (Flux's blocks): the exact Jacobian is out of reach, so fall back to the finite-difference
            # one for this run.
            self.warn_once("autograd", f"autograd through the model failed ({e}); using finite_difference instead.")
            self.patch_manifold_fallback()
            result = delta()
        settings = self.patch.settings
        self.step += 1
        self.history.append({"step": self.step, "sigma": sigma, **result.terms, "skipped": result.skipped})
        self.patch.report(self, sigma, result)
        if result.fallback:
            self.warn_once("fallback", f"{result.fallback} (sigma {sigma:.4g}; reported per step in 'agg.terms').")
        if result.delta is None:
            self.warn_once("nonfinite", f"guidance skipped at sigma {sigma:.4g}: {result.skipped}.")
            return denoised
        shown = denoised + result.delta
        if not settings.asymmetric:
            returned = shown
        else:
            target, exact = self.target_sigma(sigma)
            if target is None or target >= sigma:
                self.warn_once("target", f"no next sigma after {sigma:.4g}; using the symmetric update there.")
                returned = shown
            else:
                if not exact:
                    self.warn_once(
                        "approx",
                        f"sampler '{self.sampler_name}' is not first order; the asymmetric step is realised approximately "
                        "(exact for euler, ddim, euler_ancestral, lcm, the cfg_pp Euler forms and the AGG sampler).",
                    )
                returned = compensated_denoised(denoised.float(), result.delta.float(), timestep.float(), target, self.family).to(denoised.dtype)
        self.pending = (returned, shown)
        return returned

    def patch_manifold_fallback(self) -> None:
        self.patch = self.patch.with_settings(manifold="finite_difference")

    def close(self) -> None:
        self.grad_weights = None
        self.info.close()
        self.loss = None


class AGGPatch:
    """What Apply AGG / AGG Guider install on a cloned model: settings, loss spec, two wrappers."""

    def __init__(self, loss: Any, settings: AGGSettings, node_name: str, key: str | None = None):
        self.loss = loss
        self.settings = settings
        self.node_name = node_name
        self.key = key or f"agg_{uuid.uuid4().hex[:12]}"

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options: the patch is immutable, share it.
        return self

    def with_settings(self, **changes) -> AGGPatch:
        from dataclasses import replace

        return AGGPatch(self.loss, replace(self.settings, **changes), self.node_name, self.key)

    def install(self, model: Any) -> Any:
        """A clone of `model` carrying this patch; `model` itself is left untouched."""
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, self.key, self.sampler_sample)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, self.key, self.predict_noise)
        m.set_model_sampler_post_cfg_function(self.capture_cond)
        return m

    def capture_cond(self, args: dict) -> torch.Tensor:
        """Post-CFG hook: remembers the conditional prediction (the probe's base); changes nothing."""
        run = args.get("model_options", {}).get("transformer_options", {}).get(RUNS_KEY, {}).get(self.key)
        if run is not None and args.get("cond_denoised") is not None:
            run.captured = args["cond_denoised"]
        return args["denoised"]

    def sampler_sample(self, executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar):
        sampler = executor.class_obj
        if getattr(getattr(sampler, "sampler_function", None), "agg_skip_guidance", False):
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        run = AGGRun(self, guider, sigmas, sampler, tuple(noise.shape))
        topts = extra_args["model_options"].setdefault("transformer_options", {})
        topts[RUNS_KEY] = {**topts.get(RUNS_KEY, {}), self.key: run}
        try:
            return executor(guider, sigmas, extra_args, run.wrap_callback(callback), noise, latent_image, denoise_mask, disable_pbar)
        finally:
            topts[RUNS_KEY] = {k: v for k, v in topts.get(RUNS_KEY, {}).items() if k != self.key}
            run.close()

    def predict_noise(self, executor, x, timestep, model_options, seed):
        run = model_options.get("transformer_options", {}).get(RUNS_KEY, {}).get(self.key)
        if run is not None:
            run.captured = None
        denoised = executor(x, timestep, model_options, seed)
        if run is None:
            return denoised
        return run.guide(executor, x, timestep, model_options, seed, denoised)

    def report(self, run: AGGRun, sigma: float, result: Any) -> None:
        """Each guided step's figures to the log and, when a server runs, to its clients as an 'agg.terms' event:
        per term its value, raw gradient RMS and step RMS; the step's RMS; trust-region and fallback flags."""
        event = {"node": self.node_name, "step": run.step, "sigma": sigma, **result.report()}
        log.info(
            "%s step %d sigma %.4g: %s; step rms %.4g%s%s", self.node_name, run.step, sigma,
            ", ".join(f"{k} {v:.4g} (grad rms {result.grad_rms.get(k, 0):.3g}, step rms {result.step_rms.get(k, 0):.3g})"
                      for k, v in result.terms.items()),
            result.delta_rms, ", trust region" if result.trust_region else "",
            f", skipped: {result.skipped}" if result.skipped else "",
        )
        try:
            from server import PromptServer

            server = PromptServer.instance
            server.send_sync("agg.terms", event, server.client_id)
        except Exception:  # no server (library use); the log line above is enough
            pass


__all__ = ["AGGError", "AGGPatch", "AGGRun", "AGGSettings", "RunInfo", "grad_enabled", "model_family", "require_family"]
