"""Apply AGG (a MODEL patch for every sampling node) and AGG Guider (for SamplerCustomAdvanced)."""

from __future__ import annotations

import comfy.samplers
from comfy_api.v0_0_2 import io

from ..agg_kernels.manifold import MANIFOLD_MODES
from .runtime import install
from .settings import AGGSettings, guidance_settings, require_family
from .types import AGGLossType

DEFAULTS = AGGSettings()


def settings_inputs() -> list:
    """The guidance settings shared by Apply AGG and AGG Guider (names are a public contract)."""
    return [
        io.Float.Input(
            "start_percent", display_name="guidance start", default=DEFAULTS.start_percent, min=0.0, max=1.0, step=0.001,
            tooltip="Where guidance starts, as a percent of the model's noise range (0 = pure noise). "
            "Same convention as ControlNet's start_percent.",
        ),
        io.Float.Input(
            "end_percent", display_name="guidance end", default=DEFAULTS.end_percent, min=0.0, max=1.0, step=0.001,
            tooltip="Where guidance stops (1 = the clean end). The default 0.59 guides the first 19 of 60 steps of an "
            "img2img run at denoise 0.6, as in the paper; later steps run unguided. Raise it to guide longer "
            "(a stronger edit), lower it for a lighter one.",
        ),
        io.Combo.Input(
            "manifold", display_name="covariance step (expert)", options=list(MANIFOLD_MODES), default=DEFAULTS.manifold,
            tooltip="How the pull on the clean estimate reaches the sampler: through the posterior covariance of the "
            "model. finite_difference: one extra conditional model pass per guided step (ControlNet, LoRA included; "
            "one per sub-step of the long steps of a few-step schedule), "
            "no extra memory. autograd: exact backward pass through the model (slowest, a copy of the weights during "
            "the run). none: the covariance of a unit-variance latent, no model pass (fastest).",
        ),
        io.Int.Input(
            "dds_steps", display_name="refine steps (expert)", default=DEFAULTS.dds_steps, min=0, max=50,
            tooltip="Refinement steps on the clean estimate after the covariance step (no model call), each moving "
            "it by dds_lr x the loss weights. 0 disables.",
        ),
        io.Float.Input(
            "dds_lr", display_name="refine rate (expert)", default=DEFAULTS.dds_lr, min=0.0, max=1.0, step=0.01,
            tooltip="Size of each refinement step, as a fraction of the loss weights (0..1).",
        ),
        io.Boolean.Input(
            "asymmetric", display_name="asymmetric: keep the model noise (expert)", default=DEFAULTS.asymmetric,
            tooltip="On: the guidance edits only the clean estimate and keeps the model's own noise (AGG). "
            "Off: ordinary clean-estimate guidance (the symmetric ablation), which moves the sample much less.",
        ),
        io.Float.Input(
            "trust_region", display_name="step cap (expert)", default=DEFAULTS.trust_region, min=0.01, max=10.0, step=0.01, optional=True,
            tooltip="Cap on the guided change of the clean estimate, in posterior standard deviations of the model at "
            "that noise level (RMS) per reference step of the schedule. A step that would go farther has all its "
            "weights scaled down together until it fits, and says so in the log. Above about 0.3 a very large "
            "Structure weight can end farther from the source than a moderate one.",
        ),
    ]


def guided_model(model, loss, node_name: str, node_id: str | None = None, **settings):
    """A clone of `model` carrying AGG guidance by `loss`, after checking the node's inputs."""
    patch_settings = guidance_settings(node_name, **settings)
    require_family(model.get_model_object("model_sampling"), node_name)
    if loss is None:
        raise ValueError(f"{node_name}: input 'loss' is required (connect a Structure Loss, CLIP Direction Loss or Image Style Loss).")
    return install(model, loss, patch_settings, node_name, node_id)


class AGGApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AGGApply",
            display_name="Apply AGG",
            category="AGG/sampling",
            description="Asymmetric Gradient Guidance on a model: every sampler node (KSampler, KSamplerAdvanced, "
            "SamplerCustom, SamplerCustomAdvanced) and guider using this model is steered by the connected losses.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to guide; it is cloned, never modified."),
                AGGLossType.Input("loss", tooltip="The guidance objective: one loss node or a chain of them."),
                *settings_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with AGG guidance attached.")],
            hidden=[io.Hidden.unique_id],  # names this node in the per-step 'agg.terms' events
        )

    @classmethod
    def execute(cls, model, loss, **settings) -> io.NodeOutput:
        return io.NodeOutput(guided_model(model, loss, "Apply AGG", cls.hidden.unique_id, **settings))


class AGGGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AGGGuider",
            display_name="AGG Guider",
            category="AGG/sampling",
            description="A CFG guider with Asymmetric Gradient Guidance, for SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model; it is cloned, never modified."),
                io.Conditioning.Input("positive", tooltip="The target prompt's conditioning."),
                io.Conditioning.Input("negative", tooltip="The negative prompt's conditioning."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                AGGLossType.Input("loss", tooltip="The guidance objective: one loss node or a chain of them."),
                *settings_inputs(),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced's guider input.")],
            hidden=[io.Hidden.unique_id],  # names this node in the per-step 'agg.terms' events
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, loss, **settings) -> io.NodeOutput:
        guider = comfy.samplers.CFGGuider(guided_model(model, loss, "AGG Guider", cls.hidden.unique_id, **settings))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)
