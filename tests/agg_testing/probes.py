"""In-process probe nodes for node tests, and access to the pack's modules as ComfyUI loaded them.

Probe nodes (V1-style, registered into ComfyUI's NODE_CLASS_MAPPINGS by `register`):
  AGGTestCountingProbe   MODEL -> MODEL clone with CALC_COND_BATCH and APPLY_MODEL wrappers that record
                         every call into RECORDS[tag] (place it BEFORE Apply AGG).
  AGGTestAnalyticModel   MODEL -> MODEL clone whose UNet is replaced by an exact Gaussian denoiser
                         (model_function_wrapper; in ComfyUI 0.3.75 that wrapper receives the sampler
                         state and sigma and returns the denoised value).
"""

from __future__ import annotations

import importlib
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import torch

PACK_ROOT = Path(__file__).resolve().parent.parent.parent

RECORDS: dict[str, list[dict]] = defaultdict(list)


def pack_module(sub: str) -> ModuleType:
    """The pack's submodule `sub` (e.g. "nodes.runtime") as ComfyUI loaded it from custom_nodes/; ComfyUI's
    start-up (extra nodes and custom nodes, in main.py's import order) runs first when it has not yet."""
    want = (PACK_ROOT / (sub.replace(".", "/") + ".py")).resolve()

    def find() -> ModuleType | None:
        for mod in list(sys.modules.values()):
            f = getattr(mod, "__file__", None)
            # only ComfyUI's copy (named after its custom_nodes path), not one imported under another name
            if f and "custom_nodes" in mod.__name__ and mod.__name__.endswith(sub) and Path(f).resolve() == want:
                return mod
        return None

    mod = find()
    if mod is None:
        from agg_testing.runner import init_comfy

        init_comfy()
        mod = find() or importlib.import_module(f"{find_pack_name()}.{sub}")
    return mod


def find_pack_name() -> str:
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and "custom_nodes" in name and Path(f).resolve() == (PACK_ROOT / "__init__.py").resolve():
            return name
    raise RuntimeError("ComfyUI did not load the pack from custom_nodes/")


# -- counting probe ---------------------------------------------------------------------------------


def _control_of(args: tuple, kwargs: dict):
    # BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    if len(args) > 4:
        return args[4]
    return kwargs.get("control")


class AGGTestCountingProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "probe"})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "AGG/testing"

    def patch(self, model, tag):
        import comfy.patcher_extension as pe

        records = RECORDS[tag]

        def calc_cond_batch(executor, model_, conds, x_in, timestep, model_options):
            records.append({
                "kind": "calc_cond_batch",
                "sigma": float(timestep.flatten()[0]),
                "conds": sum(c is not None for c in conds),
                "batch": int(x_in.shape[0]),
            })
            return executor(model_, conds, x_in, timestep, model_options)

        def apply_model(executor, *args, **kwargs):
            control = _control_of(args, kwargs)
            records.append({
                "kind": "apply_model",
                "sigma": float(args[1].flatten()[0]),
                "batch": int(args[0].shape[0]),
                "control": control is not None,
                "control_keys": sorted(control.keys()) if isinstance(control, dict) else [],
            })
            return executor(*args, **kwargs)

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, f"agg_test_{tag}", calc_cond_batch)
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, f"agg_test_{tag}", apply_model)
        return (m,)


# -- analytic model ---------------------------------------------------------------------------------


def analytic_latent(seed: int = 0, shape: tuple[int, ...] = (1, 4, 8, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.5


class AGGTestAnalyticModel:
    """The exact denoiser of N(mean_scale * latent, std^2 I) data in the model's own family, in place of the
    UNet (mean_scale != 1 keeps the latent itself off the mean, so its noise estimate is not zero)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "latent": ("LATENT",),
                             "std": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.001}),
                             "mean_scale": ("FLOAT", {"default": 0.5, "min": -10.0, "max": 10.0, "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "AGG/testing"

    def patch(self, model, latent, std, mean_scale):
        from agg_testing.analytic import gaussian

        runtime = pack_module("nodes.runtime")
        family = runtime.model_family(model.get_model_object("model_sampling"))
        inner = model.model
        mean = mean_scale * inner.process_latent_in(latent["samples"].float())[0].clone()
        data = gaussian(mean, std)

        def unet(apply_model, args):
            # The wrapper gets the sampler state and sigma (ComfyUI 0.3.75 calc_cond_batch) and returns D.
            x, sigma = args["input"], args["timestep"]
            return data.denoise(x.float(), sigma.float(), family).to(x.dtype)

        m = model.clone()
        m.set_model_unet_function_wrapper(unet)
        return (m,)


NODES = {"AGGTestCountingProbe": AGGTestCountingProbe, "AGGTestAnalyticModel": AGGTestAnalyticModel}


def register() -> None:
    """Make the probe nodes available to prompts (idempotent)."""
    import nodes

    for name, cls in NODES.items():
        nodes.NODE_CLASS_MAPPINGS.setdefault(name, cls)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault(name, name)


# -- graphs ------------------------------------------------------------------------------------------


def agg_img2img(*, size: int = 32, steps: int = 3, denoise: float = 0.6, seed: int = 0, sampler_name: str = "euler",
                cfg: float = 5.0, weight: float | None = 0.5, manifold: str = "finite_difference",
                asymmetric: bool = True, end_percent: float = 1.0, probe: str | None = None):
    """The stock img2img graph ending in SaveLatent, with Structure Loss (on the source latent) and
    Apply AGG before the KSampler (weight None: unguided). `probe` puts AGGTestCountingProbe with that
    tag between the loader and everything else. Node roles: as graphs.img2img, plus loss, apply, probe."""
    from agg_testing import graphs

    g = graphs.img2img(size=size, steps=steps, denoise=denoise, seed=seed, sampler_name=sampler_name, cfg=cfg)
    for role in ("decode", "save"):
        del g.prompt[g[role].id]
    graphs.save_latent(g, g["sampler"][0])
    if probe is not None:
        graphs.insert_model_patch(g, "AGGTestCountingProbe", name="probe", tag=probe)
    if weight is not None:
        add_agg(g, weight=weight, manifold=manifold, asymmetric=asymmetric, end_percent=end_percent)
    return g


def add_agg(g, *, weight: float = 0.5, manifold: str = "finite_difference", asymmetric: bool = True,
            end_percent: float = 1.0, consumer: str = "sampler", source=None):
    """Structure Loss on the encoded source + Apply AGG on the model input of node `consumer`."""
    loss = g.node("AGGStructureLoss", name="loss", weight=weight, source=source or g["encode"][0])
    node = g[consumer]
    apply = g.node("AGGApply", name="apply", model=g.prompt[node.id]["inputs"]["model"], loss=loss[0],
                   start_percent=0.0, end_percent=end_percent, manifold=manifold, dds_steps=1, dds_lr=0.05,
                   asymmetric=asymmetric)
    g.set_input(node, model=apply[0])
    return apply
