"""AGG Invert: deterministic DDIM inversion of the source latent, recording the clean-estimate trajectory."""

from __future__ import annotations

import comfy.samplers
import latent_preview
import torch
from comfy_api.v0_0_2 import io

from ..agg_kernels.inversion import check_sigmas, ddim_invert
from .sampler import PackSampler
from .settings import checked, require_family
from .types import AGGTrajectoryType

NODE = "AGG Invert"


def inversion_sampler(holder: dict) -> PackSampler:
    """A KSAMPLER that runs the inversion on ascending sigmas (AGG guidance skips it)."""

    @torch.no_grad()
    def sample_agg_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        family = require_family(model.inner_model.inner_model.model_sampling, NODE)

        def denoise(xx: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            d = model(xx, sigma, **extra_args)
            if callback is not None:
                callback({"x": xx, "i": holder["evals"], "sigma": sigma[0], "sigma_hat": sigma[0], "denoised": d})
            holder["evals"] += 1
            return d

        x_top, holder["trajectory"] = ddim_invert(denoise, x, sigmas, family, trajectory_device="cpu")
        return x_top

    return PackSampler(sample_agg_inversion, stepping=None)


class AGGInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AGGInvert",
            display_name="AGG Invert",
            category="AGG/sampling",
            description="DDIM inversion (cfg 1, source prompt) of the source latent up to the first of the given "
            "sigmas. Sample its latent with the same sigmas and noise disabled (KSamplerAdvanced add_noise=disable, "
            "or SamplerCustomAdvanced with DisableNoise); feed its trajectory to Structure Loss.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (the same one you sample with)."),
                io.Latent.Input("latent", tooltip="The source latent (VAEEncode of the photo)."),
                io.Conditioning.Input("positive", tooltip="The source prompt's conditioning (what the photo shows)."),
                io.Sigmas.Input("sigmas", tooltip="The sampling schedule (e.g. BasicScheduler with denoise 0.6); "
                                "the inversion climbs it from the clean end to its first sigma."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The inverted latent, to sample with noise disabled."),
                AGGTrajectoryType.Output(display_name="AGG_TRAJECTORY",
                                         tooltip="The source's clean estimates along the inversion, for Structure Loss."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, positive, sigmas) -> io.NodeOutput:
        family = require_family(model.get_model_object("model_sampling"), NODE)
        s = sigmas.flatten().float().cpu()
        ascending = torch.sort(s).values
        checked(NODE, "sigmas", check_sigmas, ascending, ascending=True, family=family)
        samples = latent["samples"]
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, [])
        guider.set_cfg(1.0)
        holder = {"evals": 0, "trajectory": None}
        callback = latent_preview.prepare_callback(model, s.numel())  # progress bar and previews
        out = guider.sample(torch.zeros_like(samples), samples, inversion_sampler(holder), ascending,
                            callback=callback, disable_pbar=True, seed=0)
        result = {k: v for k, v in latent.items() if k != "noise_mask"}
        result["samples"] = out.to(samples.dtype)
        return io.NodeOutput(result, holder["trajectory"])
