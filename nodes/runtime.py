"""The guidance hook: closures installed on a cloned model (as ComfyUI's own Perp-Neg does), so that it works
under every stock sampling node and every guider (CFG, DualCFG, PerpNeg). A SAMPLER_SAMPLE wrapper opens a run
(`open_run`: its state lives in the closures it returns) and a PREDICT_NOISE wrapper hands each evaluation to it.

Glue only: the maths is in agg_kernels.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import torch

from ..agg_kernels.frames import frame_count, steadiness
from ..agg_kernels.guidance import GuidanceResult, guided_delta
from ..agg_kernels.manifold import FALLBACK_MODES, FD_NOISE_REASON, covariance_operator
from ..agg_kernels.objective import LossContext
from ..agg_kernels.schedule import Window, edit_window, schedule_rate
from ..agg_kernels.settings import AGGSettings
from ..agg_kernels.step import SamplerSpec, realise
from .sampler import guidance_window_low, is_guided, sampler_spec
from .settings import RUNS_KEY, WINDOWS_KEY, AGGError, RunInfo, model_family, require_family
from .weights import AUTOGRAD_LIMITS, GradientWeights

log = logging.getLogger("AGG")

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


@dataclass(frozen=True)
class Run:
    """One sampling run of one AGG patch: what it was opened on, and the closures that hold its state."""

    node_name: str
    family: str
    sigmas: torch.Tensor
    window: Window
    sampler: SamplerSpec  # what the guided step knows of the run's sampler (its zones resolved for the AGG sampler)
    guide: Callable[..., torch.Tensor]  # (executor, x, timestep, model_options, seed, denoised) -> returned
    capture: Callable[[torch.Tensor], None]  # the guider's conditional prediction at this call's x
    shown: Callable[[], torch.Tensor | None]  # D + delta of the last guided evaluation, until a preview shows it
    preview: Callable[[Callable | None], Callable | None]  # a sampler callback showing D + delta
    close: Callable[[], None]


def conditional_denoiser(executor, guider, timestep, model_options, seed, dtype) -> tuple[Callable, bool]:
    """(the denoiser whose Jacobian carries the pull, whether it is the conditional prediction alone).

    Its Jacobian is a posterior covariance (CFG's J_u + s (J_c - J_u) need not be), it costs one
    conditional pass, and it runs no pre/post-CFG function, so a sampler's state kept there (the
    cfg_pp samplers' uncond estimate) is untouched. ControlNet, LoRA, hooks and area conds still
    apply: the pass goes through calc_cond_batch. A guider without a positive cond is probed through
    its whole prediction, with the post-CFG functions left out for the same reason.
    """
    cond = (getattr(guider, "conds", None) or {}).get("positive")
    probe_options = {**model_options, "sampler_post_cfg_function": []}

    def forward(xp: torch.Tensor) -> torch.Tensor:
        # a long step probes once per sub-step: an interrupt stops it before the next pass, not at the next step
        comfy.model_management.throw_exception_if_processing_interrupted()
        if cond is None:
            return executor(xp.to(dtype), timestep, probe_options, seed).float()
        return comfy.samplers.calc_cond_batch(guider.inner_model, [cond], xp.to(dtype), timestep, model_options)[0].float()

    return forward, cond is not None


def open_run(node_name: str, node_id: str | None, settings: AGGSettings, loss: Any, guider: Any, sigmas: torch.Tensor,
             sampler: Any, latent_shape: tuple[int, ...], window_low: float | None) -> Run:
    """The closures of one sampling run: built loss, schedule, sampler description, logs. Never shared between
    runs. `window_low`: the lowest end of every AGG window on the model (the AGG sampler's edit zone follows it)."""
    model = guider.inner_model
    family = require_family(model.model_sampling, node_name)
    sigmas = sigmas.detach().float().cpu()
    window = edit_window(model.model_sampling.percent_to_sigma, settings.start_percent, settings.end_percent)
    spec = sampler_spec(sampler, sigmas, window_low, family)
    info = RunInfo(model, family, comfy.model_management.get_torch_device(), tuple(latent_shape), sigmas)
    built = loss.build(info)
    patcher = getattr(guider, "model_patcher", None)
    dtype = compute_dtype(patcher) if patcher is not None else torch.float32
    warned: set[str] = set()
    frame_changes: list[float] = []  # a video's steadiness per guided step (agg_kernels.frames.steadiness)
    state: dict[str, Any] = {
        "step": 0,  # guided steps so far
        "manifold": settings.manifold,  # autograd falls back to finite_difference for the run when it must
        "previous": None,  # the last step's GuidanceResult (the adaptive CLIP weight reads it)
        "pending": None,  # (returned R, displayed D + delta) of the last guided evaluation
        "captured": None,  # the guider's conditional prediction at this call's x
        "weights": None,  # GradientWeights of the diffusion model, made on the first autograd pass
    }

    def warn_once(key: str, message: str) -> None:
        if key not in warned:
            warned.add(key)
            log.warning("%s: %s", node_name, message)

    def capture(cond_denoised: torch.Tensor) -> None:
        state["captured"] = cond_denoised

    def shown() -> torch.Tensor | None:
        return None if state["pending"] is None else state["pending"][1]

    def displayed(x0: torch.Tensor) -> torch.Tensor:
        """What previews show for a value the sampler got: D + delta in place of the last guided step's
        compensated value."""
        if state["pending"] is None:
            return x0
        returned, guided = state["pending"]
        if x0 is returned:
            return guided
        return x0 - (returned - guided) if x0.shape == returned.shape else x0

    def preview(callback: Callable | None) -> Callable | None:
        """Previews and denoised_output show D + delta, not the compensated value the sampler steps with."""
        if callback is None:
            return None

        def agg_callback(step, x0, x, total_steps):
            x0 = displayed(x0)
            state["pending"] = None
            return callback(step, x0, x, total_steps)

        return agg_callback

    def covariance(mode, executor, x, timestep, model_options, seed, captured):
        """The step's covariance operator (agg_kernels.manifold.covariance_operator) on the conditional denoiser."""
        forward, conditional = conditional_denoiser(executor, guider, timestep, model_options, seed, x.dtype)
        # ComfyUI's multi-GPU sampling runs the conds on each device's clone of the model in worker threads,
        # under no_grad: an autograd pass runs on the main device's model (the one whose weights are swapped
        # for gradient-capable views below), as a single-device calc_cond_batch.
        single, _ = conditional_denoiser(executor, guider, timestep, single_device_options(model_options), seed, x.dtype)

        def differentiable(xp: torch.Tensor) -> torch.Tensor:
            if state["weights"] is None:
                state["weights"] = GradientWeights(model.diffusion_model)
            with state["weights"]:
                return single(xp)

        # the probe's base: the conditional prediction the guider just made, when the probe is conditional
        base = captured if conditional and captured is not None and captured.shape == x.shape else None
        return covariance_operator(mode, x, timestep.detach().float(), family, forward, base=base, dtype=dtype,
                                   differentiable=differentiable)

    def guide(executor, x: torch.Tensor, timestep: torch.Tensor, model_options: dict, seed, denoised: torch.Tensor) -> torch.Tensor:
        sigma = float(timestep.flatten()[0])
        rate = schedule_rate(sigmas, sigma, window, family)
        captured, state["captured"] = state["captured"], None
        if rate <= 0:
            return denoised
        comfy.model_management.throw_exception_if_processing_interrupted()
        ctx = LossContext(sigma=timestep.detach().float(), x=x.detach().float(), family=family, step=state["step"])

        def delta():
            cov = covariance(state["manifold"], executor, x, timestep, model_options, seed, captured)
            return guided_delta(built, denoised, ctx, cov, settings.dds_steps, settings.dds_lr,
                                trust=settings.trust_region, rate=rate, previous=state["previous"])

        try:
            result = delta()
        except RuntimeError as e:
            fallback = FALLBACK_MODES.get(state["manifold"])
            if fallback is None or not any(m in str(e) for m in AUTOGRAD_LIMITS):
                raise
            # A patch outside the diffusion model (e.g. a ControlNet) holds inference weights, or the model adds
            # in place (Flux's blocks): the exact Jacobian is out of reach, so the run's covariance operator
            # becomes the finite-difference one.
            warn_once(state["manifold"], f"{state['manifold']} through the model failed ({e}); using {fallback} instead.")
            state["manifold"] = fallback
            result = delta()
        state["step"] += 1
        state["previous"] = result
        change = None
        if result.delta is not None and frame_count(denoised.shape) > 1:
            # a video: how much the guided step changed the clean estimate's frame-to-frame change (flicker)
            change = float(steadiness(denoised.float() + result.delta.to(denoised.device), denoised).max())
            frame_changes.append(change)
        report(node_name, state["step"], sigma, result, node_id, frame_change=change)
        if result.fallback:
            noise = FD_NOISE_REASON in result.fallback
            hint = (f" The model computes in {dtype}; manifold autograd, where the model allows it, is not"
                    " limited by its rounding." if noise else "")
            warn_once("fallback-noise" if noise else "fallback",
                      f"{result.fallback} (sigma {sigma:.4g}; reported per step in 'agg.terms').{hint}")
        if result.delta is None:
            warn_once("nonfinite", f"guidance skipped at sigma {sigma:.4g}: {result.skipped}.")
            return denoised
        step = realise(denoised, result.delta, sigma, sigmas, spec, family, settings.asymmetric)
        if step.reason:
            warn_once(step.reason, f"{step.reason} (first at sigma {sigma:.4g}).")
        state["pending"] = (step.returned, step.shown)
        return step.returned

    def close() -> None:
        if frame_changes:
            log.info("%s: video steadiness over %d guided steps: frame-to-frame change of the clean estimate x%.4g "
                     "at most, x%.4g on average (1 = guidance added no flicker)", node_name, len(frame_changes),
                     max(frame_changes), sum(frame_changes) / len(frame_changes))
        state.clear()
        info.close()

    return Run(node_name, family, sigmas, window, spec, guide, capture, shown, preview, close)


def install(model: Any, loss: Any, settings: AGGSettings, node_name: str, node_id: str | None = None) -> Any:
    """A clone of `model` carrying AGG guidance as closures; `model` itself is left untouched.

    The clone's transformer_options name this patch's window (WINDOWS_KEY: static settings, which the AGG
    sampler reads to follow the guidance window); a sampling run's closures sit in RUNS_KEY while it lasts.
    """
    key = f"agg_{uuid.uuid4().hex[:12]}"  # this patch's entry, and its wrappers' key
    m = model.clone()
    topts = m.model_options.setdefault("transformer_options", {})
    topts[WINDOWS_KEY] = {**topts.get(WINDOWS_KEY, {}), key: (settings.start_percent, settings.end_percent)}

    def run_of(options: dict) -> Run | None:
        return options.get("transformer_options", {}).get(RUNS_KEY, {}).get(key)

    def sampler_sample(executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar):
        sampler = executor.class_obj
        if not is_guided(sampler):  # a sampler guidance must leave alone (AGG Invert's inversion)
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        options = extra_args["model_options"]
        low = guidance_window_low(options, guider.inner_model.model_sampling)
        run = open_run(node_name, node_id, settings, loss, guider, sigmas, sampler, tuple(noise.shape), low)
        runs = options.setdefault("transformer_options", {})
        runs[RUNS_KEY] = {**runs.get(RUNS_KEY, {}), key: run}
        try:
            return executor(guider, sigmas, extra_args, run.preview(callback), noise, latent_image, denoise_mask, disable_pbar)
        finally:
            runs[RUNS_KEY] = {k: v for k, v in runs.get(RUNS_KEY, {}).items() if k != key}
            run.close()

    def predict_noise(executor, x, timestep, model_options, seed):
        run = run_of(model_options)
        if run is not None:
            run.capture(None)
        denoised = executor(x, timestep, model_options, seed)
        return denoised if run is None else run.guide(executor, x, timestep, model_options, seed, denoised)

    def capture_cond(args: dict) -> torch.Tensor:
        """Post-CFG hook: remembers the conditional prediction (the probe's base); changes nothing."""
        run = run_of(args.get("model_options", {}))
        if run is not None and args.get("cond_denoised") is not None:
            run.capture(args["cond_denoised"])
        return args["denoised"]

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, key, sampler_sample)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, key, predict_noise)
    m.set_model_sampler_post_cfg_function(capture_cond)
    return m


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
__all__ = ["RUNS_KEY", "AGGError", "AGGSettings", "Run", "RunInfo", "install", "model_family", "open_run",
           "require_family", "report"]
