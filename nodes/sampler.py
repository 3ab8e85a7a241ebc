"""AGG Sampler: the paper's three-zone DDIM (edit, unguided, stochastic boost) as a SAMPLER."""

from __future__ import annotations

import comfy.samplers
from comfy_api.v0_0_2 import io

from ..agg_kernels import schedule
from ..agg_kernels.sampler import sample_agg
from .runtime import AGGError, require_family


def sample_agg_comfy(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    family = require_family(model.inner_model.inner_model.model_sampling, "AGG Sampler")
    return sample_agg(model, x, sigmas, extra_args, callback, disable, family=family, **options)


sample_agg_comfy.agg_sampler_name = "agg"  # read by the guidance hook to realise the step exactly


class AGGSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AGGSampler",
            display_name="AGG Sampler",
            category="AGG",
            description="DDIM with a separate eta in three zones of the run: the guided edit zone, an unguided "
            "middle and a stochastic boost at the end (the paper's schedule). For SamplerCustom / SamplerCustomAdvanced.",
            inputs=[
                io.Float.Input("eta_edit", default=schedule.DEFAULT_ETA_EDIT, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise (eta) in the edit zone; 0 = deterministic DDIM."),
                io.Float.Input("eta", default=schedule.DEFAULT_ETA, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise (eta) in the middle zone."),
                io.Float.Input("eta_boost", default=schedule.DEFAULT_ETA_BOOST, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise (eta) in the boost zone; 1 = ancestral, which restores detail."),
                io.Float.Input("edit_end", default=schedule.DEFAULT_EDIT_END, min=0.0, max=1.0, step=0.0001,
                               tooltip="End of the edit zone, as a fraction of the run's steps."),
                io.Float.Input("boost_start", default=schedule.DEFAULT_BOOST_START, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the boost zone, as a fraction of the run's steps."),
                io.Float.Input("s_noise", default=1.0, min=0.0, max=100.0, step=0.01, optional=True,
                               tooltip="Scale of the added noise."),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustom or SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, eta_edit, eta, eta_boost, edit_end, boost_start, s_noise=1.0) -> io.NodeOutput:
        try:
            schedule.check_zones(edit_end, boost_start)
        except ValueError as e:
            raise AGGError(f"AGG Sampler: inputs 'edit_end' / 'boost_start': {e}") from e
        options = {"eta_edit": eta_edit, "eta": eta, "eta_boost": eta_boost, "edit_end": edit_end,
                   "boost_start": boost_start, "s_noise": s_noise}
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_agg_comfy, extra_options=options))
