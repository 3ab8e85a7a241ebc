"""The guidance hook: a per-run state opened by a SAMPLER_SAMPLE wrapper and applied by a PREDICT_NOISE
wrapper, so that it works under every stock sampling node and every guider (CFG, DualCFG, PerpNeg).

Glue only: the maths is in agg_kernels.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import torch

from ..agg_kernels.frames import frame_count, steadiness
from ..agg_kernels.guidance import GuidanceResult, guided_delta
from ..agg_kernels.manifold import (
    FD_MAX_ERROR,
    FD_NOISE_REASON,
    fd_rel_step_for,
    grad_enabled,
    reduced_precision,
)
from ..agg_kernels.objective import LossContext
from ..agg_kernels.schedule import edit_window, following_sigma, next_sigma, step_rate
from ..agg_kernels.step import SamplerSpec, realise
from .sampler import is_guided, sampler_spec
from .settings import RUNS_KEY, AGGError, AGGSettings, RunInfo, model_family, require_family
from .weights import GradientWeights

log = logging.getLogger("AGG")


# RuntimeError messages of the model paths autograd cannot go back through: inference weights, in-place
# updates, and fused kernels without a backward (ComfyUI 0.33's comfy_kitchen rope, used by Flux).
AUTOGRAD_LIMITS = ("Inference tensors cannot be saved for backward", "modified by an inplace operation",
                   "no autograd formula was registered")

# model_options entries of ComfyUI's multi-GPU sampling (0.33 on): the per-device model clones and their threads.
MULTIGPU_KEYS = ("multigpu_clones", "multigpu_thread_pool")


def single_device_options(model_options: dict) -> dict:
    """`model_options` without the multi-GPU entries: calc_cond_batch then runs on the model it is given."""
    if not any(k in model_options for k in MULTIGPU_KEYS):
        return model_options
    return {k: v for k, v in model_options.items() if k not in MULTIGPU_KEYS}


def compute_dtype(patcher: Any) -> torch.dtype:
    """The dtype the model computes in: ComfyUI's manual cast dtype where it casts the weights layer by layer
    (fp8 storage, weights the device cannot compute in, ModelComputeDtype), else its weights' dtype."""
    cast = patcher.get_model_object("manual_cast_dtype")
    return cast if cast is not None else (patcher.model_dtype() or torch.float32)


class AGGRun:
    """State of one sampling run: built loss, schedule, sampler description, logs. Never shared between runs."""

    def __init__(self, node_name: str, settings: AGGSettings, loss: Any, guider: Any, sigmas: torch.Tensor,
                 sampler: Any, latent_shape: tuple[int, ...], node_id: str | None = None):
        self.node_name = node_name
        self.node_id = node_id
        self.settings = settings
        self.guider = guider
        model = guider.inner_model
        self.family = require_family(model.model_sampling, node_name)
        self.sigmas = sigmas.detach().float().cpu()
        self.window = edit_window(model.model_sampling.percent_to_sigma, settings.start_percent, settings.end_percent)
        self.sampler: SamplerSpec = sampler_spec(sampler, self.sigmas, self.window[1], self.family)
        self.info = RunInfo(model, self.family, comfy.model_management.get_torch_device(), tuple(latent_shape), self.sigmas)
        self.loss = loss.build(self.info)
        self.step = 0  # guided steps so far
        self.warned: set[str] = set()
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (returned R, displayed D + delta)
        self.frame_changes: list[float] = []  # a video's steadiness per guided step (agg_kernels.frames.steadiness)
        self.grad_weights: GradientWeights | None = None
        self.captured: torch.Tensor | None = None  # the guider's conditional prediction at this call's x
        self.probe_is_conditional = False
        patcher = getattr(guider, "model_patcher", None)
        self.compute_dtype = compute_dtype(patcher) if patcher is not None else torch.float32
        self.fd_rel_step = fd_rel_step_for(self.compute_dtype)
        # half precision: a two-sided probe each guided step (one more conditional pass) estimates its own error
        self.fd_max_error = FD_MAX_ERROR if reduced_precision(self.compute_dtype) else None

    # -- logging -----------------------------------------------------------------------------
    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("%s: %s", self.node_name, message)

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
    def denoiser(self, executor, timestep, model_options, seed, dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The denoiser whose Jacobian carries the pull: the conditional prediction alone.

        Its Jacobian is a posterior covariance (CFG's J_u + s (J_c - J_u) need not be), it costs one
        conditional pass, and it runs no pre/post-CFG function, so a sampler's state kept there (the
        cfg_pp samplers' uncond estimate) is untouched. ControlNet, LoRA, hooks and area conds still
        apply: the pass goes through calc_cond_batch. A guider without a positive cond is probed through
        its whole prediction, with the post-CFG functions left out for the same reason.
        """
        mode = self.settings.manifold
        if mode == "none":
            return None
        cond = (getattr(self.guider, "conds", None) or {}).get("positive")
        self.probe_is_conditional = cond is not None
        if mode == "autograd":
            # ComfyUI's multi-GPU sampling runs the conds on each device's clone of the model in worker threads,
            # under no_grad: the autograd pass runs on the main device's model (the one whose weights are swapped
            # for gradient-capable views below), as a single-device calc_cond_batch.
            model_options = single_device_options(model_options)
        probe_options = {**model_options, "sampler_post_cfg_function": []}

        def forward(xp: torch.Tensor) -> torch.Tensor:
            # a long step probes once per sub-step: an interrupt stops it before the next pass, not at the next step
            comfy.model_management.throw_exception_if_processing_interrupted()
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

    def probe_base(self, denoise: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor,
                   captured: torch.Tensor | None) -> torch.Tensor | None:
        """The probed denoiser's value at x: the conditional prediction the guider just made (`captured` by
        the post-CFG hook) when the probe is conditional, else one more pass of the probed denoiser."""
        if denoise is None or self.settings.manifold != "finite_difference":
            return None
        if self.probe_is_conditional and captured is not None and captured.shape == x.shape:
            return captured.float()
        return denoise(x)

    def rate(self, sigma: float) -> float:
        """The step's share of schedule time inside the window (agg_kernels.schedule.step_rate); an evaluation
        between schedule points (heun's corrector, sde midpoints) counts to the next schedule point below."""
        sigma_next = next_sigma(self.sigmas, sigma)
        if sigma_next is None:
            sigma_next = following_sigma(self.sigmas, sigma)
        if sigma_next is None:
            return 0.0
        return step_rate(sigma, sigma_next, self.window, self.family)

    def guide(self, executor, x: torch.Tensor, timestep: torch.Tensor, model_options: dict, seed, denoised: torch.Tensor) -> torch.Tensor:
        sigma = float(timestep.flatten()[0])
        rate = self.rate(sigma)
        if rate <= 0:
            self.captured = None
            return denoised
        comfy.model_management.throw_exception_if_processing_interrupted()
        ctx = LossContext(sigma=timestep.detach().float(), x=x.detach().float(), family=self.family, step=self.step)
        # kept for a retry: the autograd -> finite-difference fallback probes around the same base value
        captured, self.captured = self.captured, None

        def delta():
            settings = self.settings
            denoise = self.denoiser(executor, timestep, model_options, seed, x.dtype)
            return guided_delta(
                self.loss, x, denoised, ctx, settings.manifold, denoise, settings.dds_steps, settings.dds_lr,
                fd_rel_step=self.fd_rel_step, probe_base=self.probe_base(denoise, x, captured), trust=settings.trust_region,
                fd_max_error=self.fd_max_error, rate=rate,
            )

        try:
            result = delta()
        except RuntimeError as e:
            if self.settings.manifold != "autograd" or not any(m in str(e) for m in AUTOGRAD_LIMITS):
                raise
            # A patch outside the diffusion model (e.g. a ControlNet) holds inference weights, or the model adds
            # in place (Flux's blocks): the exact Jacobian is out of reach, so fall back to the finite-difference
            # one for this run.
            self.warn_once("autograd", f"autograd through the model failed ({e}); using finite_difference instead.")
            self.settings = replace(self.settings, manifold="finite_difference")
            result = delta()
        self.step += 1
        change = None
        if result.delta is not None and frame_count(denoised.shape) > 1:
            # a video: how much the guided step changed the clean estimate's frame-to-frame change (flicker)
            change = float(steadiness(denoised.float() + result.delta.to(denoised.device), denoised).max())
            self.frame_changes.append(change)
        report(self.node_name, self.step, sigma, result, self.node_id, frame_change=change)
        if result.fallback:
            noise = FD_NOISE_REASON in result.fallback
            hint = (f" The model computes in {self.compute_dtype}; manifold autograd, where the model allows it, is not"
                    " limited by its rounding." if noise else "")
            self.warn_once("fallback-noise" if noise else "fallback",
                           f"{result.fallback} (sigma {sigma:.4g}; reported per step in 'agg.terms').{hint}")
        if result.delta is None:
            self.warn_once("nonfinite", f"guidance skipped at sigma {sigma:.4g}: {result.skipped}.")
            return denoised
        step = realise(denoised, result.delta, sigma, self.sigmas, self.sampler, self.family, self.settings.asymmetric)
        if step.reason:
            self.warn_once(step.reason, f"{step.reason} (first at sigma {sigma:.4g}).")
        self.pending = (step.returned, step.shown)
        return step.returned

    def close(self) -> None:
        if self.frame_changes:
            log.info("%s: video steadiness over %d guided steps: frame-to-frame change of the clean estimate x%.4g "
                     "at most, x%.4g on average (1 = guidance added no flicker)", self.node_name,
                     len(self.frame_changes), max(self.frame_changes), sum(self.frame_changes) / len(self.frame_changes))
        self.grad_weights = None
        self.info.close()
        self.loss = None


class AGGPatch:
    """What Apply AGG / AGG Guider install on a cloned model: settings, loss spec, two wrappers."""

    def __init__(self, loss: Any, settings: AGGSettings, node_name: str, key: str | None = None,
                 node_id: str | None = None):
        self.loss = loss
        self.settings = settings
        self.node_name = node_name
        self.node_id = node_id  # the prompt's id of the node that made the patch, for the UI
        self.key = key or f"agg_{uuid.uuid4().hex[:12]}"

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options: the patch is immutable, share it.
        return self

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
        if not is_guided(sampler):  # a sampler guidance must leave alone (AGG Invert's inversion)
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        run = AGGRun(self.node_name, self.settings, self.loss, guider, sigmas, sampler, tuple(noise.shape), self.node_id)
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


def capped(result: GuidanceResult) -> str:
    """The log line's note of which bound shortened the step: ", capped: trust region + element bound", or ""."""
    acted = [name for name, on in (("trust region", result.trust_region), ("element bound", result.element_bound)) if on]
    return f", capped: {' + '.join(acted)}" if acted else ""


def report(node_name: str, step: int, sigma: float, result: GuidanceResult, node_id: str | None = None,
           frame_change: float | None = None) -> None:
    """Each guided step's figures to the log and, when a server runs, to its clients as an 'agg.terms' event:
    the node (display name and prompt id), the step's share of schedule time (`rate`, in reference steps, which
    scaled every weight) and the sub-steps it was taken in (`substeps`), per term its value, raw gradient RMS and step RMS; the step's RMS;
    trust-region, per-element-bound and fallback flags, and the terms that asked for no pull although above their floor;
    for a video, `frame_change`: the guided clean estimate's frame-to-frame change over the model's own (1 = no
    flicker added)."""
    event = {"node": node_name, "node_id": node_id, "step": step, "sigma": sigma, **result.report()}
    if frame_change is not None:
        event["frame_change"] = frame_change
    log.info(
        "%s step %d sigma %.4g (share %.3g%s): %s; step rms %.4g%s%s%s%s", node_name, step, sigma, result.rate,
        f" in {result.substeps} sub-steps" if result.substeps > 1 else "",
        ", ".join(f"{k} {v:.4g} (grad rms {result.grad_rms.get(k, 0):.3g}, step rms {result.step_rms.get(k, 0):.3g})"
                  for k, v in result.terms.items()),
        result.delta_rms, capped(result),
        f", no pull from {', '.join(result.idle)} (zero gradient)" if result.idle else "",
        f", fallback: {result.fallback}" if result.fallback else "",
        f", skipped: {result.skipped}" if result.skipped else "",
    )
    if frame_change is not None:
        log.info("%s step %d: frame-to-frame change x%.4g", node_name, step, frame_change)
    try:
        from server import PromptServer

        server = PromptServer.instance
        server.send_sync("agg.terms", event, server.client_id)
    except Exception:  # no server (library use); the log line above is enough
        pass


# The names nodes and tests reach through this module (their home is nodes.settings).
__all__ = ["RUNS_KEY", "AGGError", "AGGPatch", "AGGRun", "AGGSettings", "RunInfo", "grad_enabled", "model_family",
           "require_family", "report"]
