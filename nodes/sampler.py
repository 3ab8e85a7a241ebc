"""AGG Sampler: the paper's three-zone DDIM (edit, unguided, stochastic boost) as a SAMPLER, and the one place
that describes a ComfyUI sampler object to the guided step (SamplerSpec)."""

from __future__ import annotations

from typing import Any

import comfy.k_diffusion.sampling
import comfy.samplers
import torch
from comfy_api.v0_0_2 import io

from ..agg_kernels import schedule
from ..agg_kernels.sampler import resolved_zones, sample_agg, sampler_eta_at
from ..agg_kernels.schedule import DEFAULT_ZONES, Zones, edit_window
from ..agg_kernels.step import DEFAULT_ETAS, SamplerSpec
from .settings import WINDOWS_KEY, checked, require_family


class PackSampler(comfy.samplers.KSAMPLER):
    """A KSAMPLER of this pack. `stepping` names its stepping rule for the guided step ("agg"), or is None for
    a sampler AGG guidance must leave alone (AGG Invert's inversion)."""

    def __init__(self, sampler_function, stepping: str | None, extra_options: dict | None = None):
        super().__init__(sampler_function, extra_options=extra_options or {})
        self.stepping = stepping


def is_guided(sampler: Any) -> bool:
    return not (isinstance(sampler, PackSampler) and sampler.stepping is None)


# k-diffusion function names that differ from the name ComfyUI lists the sampler under.
FUNCTION_NAMES = {"unipc": "uni_pc", "unipc_bh2": "uni_pc_bh2"}


def stepping_name(fn: Any, inpaint_options: dict | None = None) -> str:
    """The name ComfyUI lists a KSAMPLER's function under (comfy.samplers.KSampler.SAMPLERS): the function's
    name without k-diffusion's "sample_" / ComfyUI's "_function" affixes. "ddim" is euler's function with
    random-noise inpainting. The one place the pack identifies a sampler: agg_kernels.step classifies these names."""
    name = getattr(fn, "__name__", "").removeprefix("sample_").removesuffix("_function")
    name = FUNCTION_NAMES.get(name, name)
    if name == "euler" and (inpaint_options or {}).get("random"):
        return "ddim"
    return name


def guidance_window_low(model_options: dict, model_sampling: Any) -> float | None:
    """The lowest sigma any AGG window on the model reaches (None without AGG guidance): every run on the model
    and the AGG sampler resolve the sampler's zones from this one value."""
    windows = model_options.get("transformer_options", {}).get(WINDOWS_KEY, {})
    lows = [edit_window(model_sampling.percent_to_sigma, start, end)[1] for start, end in windows.values()]
    return min(lows) if lows else None


def sampler_spec(sampler: Any, sigmas: torch.Tensor, window_low: float | None, family: str) -> SamplerSpec:
    """What the guided step needs to know of a ComfyUI sampler object (see agg_kernels.step.SamplerSpec).

    The AGG sampler's zones are resolved here exactly as it resolves them (resolved_zones, from the same
    window_low: guidance_window_low)."""
    options = dict(getattr(sampler, "extra_options", {}) or {})
    if isinstance(sampler, PackSampler) and sampler.stepping == "agg":
        zones = resolved_zones(options["zones"], options["follow_guidance"], sigmas, window_low, family)
        return SamplerSpec("agg", 0.0, eta_at=lambda sigma: sampler_eta_at(sigmas, sigma, zones))
    fn = getattr(sampler, "sampler_function", None)
    if fn is None:
        return SamplerSpec(None)
    name = stepping_name(fn, getattr(sampler, "inpaint_options", None))
    eta = options.get("eta")
    return SamplerSpec(name, float(eta) if isinstance(eta, (int, float)) else DEFAULT_ETAS.get(name, 0.0))


def sample_agg_comfy(model, x, sigmas, extra_args=None, callback=None, disable=None, zones: Zones = DEFAULT_ZONES,
                     follow_guidance=False, s_noise=1.0, noise_sampler=None):
    extra_args = extra_args or {}
    model_sampling = model.inner_model.inner_model.model_sampling
    family = require_family(model_sampling, "AGG Sampler")
    # ComfyUI 0.33 scales every sampler's fresh noise by the family's noise_scale (1 unless the model sets it).
    s_noise = s_noise * getattr(model_sampling, "noise_scale", 1.0)
    low = guidance_window_low(extra_args.get("model_options", {}), model_sampling)
    if noise_sampler is None:
        # ComfyUI's own seeded noise, so that the AGG sampler at eta 1 draws what euler_ancestral draws on
        # every ComfyUI version (0.33 offsets the CPU seed by one).
        noise_sampler = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=extra_args.get("seed"))
    return sample_agg(model, x, sigmas, extra_args, callback, disable, resolved_zones(zones, follow_guidance, sigmas, low, family),
                      s_noise, noise_sampler, family)


class AGGSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AGGSampler",
            display_name="AGG Sampler",
            category="AGG/sampling",
            description="DDIM with a separate eta in three zones of the run: the guided edit zone, an unguided "
            "middle and a stochastic boost at the end (the paper's schedule). For SamplerCustom / SamplerCustomAdvanced.",
            inputs=[
                io.Float.Input("eta_edit", display_name="noise in the edit zone (eta)", default=schedule.DEFAULT_ETA_EDIT, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise (eta) in the edit zone; 0 = deterministic DDIM."),
                io.Float.Input("eta", display_name="noise in the middle zone (eta)", default=schedule.DEFAULT_ETA, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise (eta) in the middle zone."),
                io.Float.Input("eta_boost", display_name="noise in the boost zone (eta)", default=schedule.DEFAULT_ETA_BOOST, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise (eta) in the boost zone; 1 = ancestral, which restores detail."),
                io.Float.Input("edit_end", display_name="edit zone end (fraction of steps)", default=schedule.DEFAULT_EDIT_END, min=0.0, max=1.0, step=0.0001,
                               tooltip="End of the edit zone, as a fraction of the run's steps. Used only when "
                               "'follow_guidance' is off."),
                io.Float.Input("boost_start", display_name="boost zone start (fraction of steps)", default=schedule.DEFAULT_BOOST_START, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the boost zone, as a fraction of the run's steps."),
                io.Float.Input("s_noise", default=1.0, min=0.0, max=100.0, step=0.01, optional=True,
                               tooltip="Scale of the added noise."),
                io.Boolean.Input("follow_guidance", display_name="edit zone = guidance window", default=True, optional=True,
                                 tooltip="On: the edit zone is exactly the steps the guidance acts on (the start / end "
                                 "percent of Apply AGG or AGG Guider), so the window is set in one place. Off: the "
                                 "edit zone ends at 'edit_end'. Without AGG guidance 'edit_end' is used."),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustom or SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, s_noise=1.0, follow_guidance=True, **zone_inputs) -> io.NodeOutput:
        zones = Zones(**zone_inputs)
        checked("AGG Sampler", ("edit_end", "boost_start"), schedule.check_zones, zones)
        options = {"zones": zones, "s_noise": s_noise, "follow_guidance": bool(follow_guidance)}
        return io.NodeOutput(PackSampler(sample_agg_comfy, "agg", extra_options=options))
