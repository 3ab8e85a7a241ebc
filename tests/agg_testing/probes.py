"""In-process probe nodes for node tests, and access to the pack's modules as ComfyUI loaded them.

Probe nodes (V1-style, registered into ComfyUI's NODE_CLASS_MAPPINGS by `register`):
  AGGTestCountingProbe   MODEL -> MODEL clone with CALC_COND_BATCH and APPLY_MODEL wrappers that record
                         every call into RECORDS[tag] (place it BEFORE Apply AGG); `strip_probe_control`
                         runs the conditional-only passes (the guidance probe at cfg > 1) without ControlNet.
  AGGTestAnalyticModel   MODEL -> MODEL clone whose UNet is replaced by an exact Gaussian denoiser
                         (model_function_wrapper; in ComfyUI 0.3.75 that wrapper receives the sampler
                         state and sigma and returns the denoised value).
  AGGTestExactUNet       MODEL -> MODEL clone whose network (DIFFUSION_MODEL wrapper) returns the exact output
                         of the model's parameterisation (eps, v or flow velocity) for the same Gaussian data,
                         so ComfyUI's own eps / v / flow conversions produce the clean estimate.

Helpers: `guided_steps()` records every evaluation the guidance hook sees (state, sigma, the guider's
denoised D, the step delta and what the sampler was given); `window_isolating(...)` gives the start /
end percent that guide exactly one step of a schedule.
"""

from __future__ import annotations

import copy
import importlib
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
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
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": "probe"})},
                "optional": {"strip_probe_control": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "AGG/testing"

    def patch(self, model, tag, strip_probe_control=False):
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
            topts = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
            records.append({
                "kind": "apply_model",
                "sigma": float(args[1].flatten()[0]),
                "batch": int(args[0].shape[0]),
                "control": control is not None,
                "control_keys": sorted(control.keys()) if isinstance(control, dict) else [],
                # the ControlNet's residuals this pass got (batch first), and which rows are cond (0) / uncond (1)
                "control_out": [t.detach().float().clone() for t in (control or {}).get("output", []) if t is not None]
                if isinstance(control, dict) else [],
                "cond_or_uncond": list((topts or {}).get("cond_or_uncond", [])),
            })
            if strip_probe_control and list((topts or {}).get("cond_or_uncond", [])) == [0]:
                # the conditional-only pass (the guidance probe at cfg > 1) without the ControlNet's residuals
                if len(args) > 4:
                    args = (*args[:4], None, *args[5:])
                else:
                    kwargs = {**kwargs, "control": None}
            return executor(*args, **kwargs)

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, f"agg_test_{tag}", calc_cond_batch)
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, f"agg_test_{tag}", apply_model)
        return (m,)


# -- analytic model ---------------------------------------------------------------------------------


def analytic_latent(seed: int = 0, shape: tuple[int, ...] = (1, 4, 8, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.5


class _ExactGaussianNode:
    """Shared schema of the exact-denoiser probe nodes: N(mean_scale * latent, std^2 I) data."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "latent": ("LATENT",),
                             "std": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.001}),
                             "mean_scale": ("FLOAT", {"default": 0.5, "min": -10.0, "max": 10.0, "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "AGG/testing"

    @staticmethod
    def data(model, latent, std, mean_scale):
        """(the exact data, the pack's family of the model)."""
        from agg_testing.analytic import gaussian

        family = pack_module("nodes.runtime").model_family(model.get_model_object("model_sampling"))
        mean = mean_scale * model.model.process_latent_in(latent["samples"].float())[0].clone()
        return gaussian(mean, std), family


class AGGTestAnalyticModel(_ExactGaussianNode):
    """The exact denoiser of N(mean_scale * latent, std^2 I) data in the model's own family, in place of the
    UNet (mean_scale != 1 keeps the latent itself off the mean, so its noise estimate is not zero)."""

    def patch(self, model, latent, std, mean_scale):
        data, family = self.data(model, latent, std, mean_scale)

        def unet(apply_model, args):
            # The wrapper gets the sampler state and sigma (ComfyUI 0.3.75 calc_cond_batch) and returns D.
            x, sigma = args["input"], args["timestep"]
            return data.denoise(x.float(), sigma.float(), family).to(x.dtype)

        m = model.clone()
        m.set_model_unet_function_wrapper(unet)
        return (m,)


class AGGTestExactUNet(_ExactGaussianNode):
    """An exact denoiser of N(mean_scale * latent, std^2 I) data in place of the diffusion model's *network*:
    a DIFFUSION_MODEL wrapper returns the raw output the model's parameterisation asks for (eps, v, or the
    flow velocity), so ComfyUI's own calculate_input / calculate_denoised (e.g. V_PREDICTION's) turn it
    into the exact clean estimate. Unlike AGGTestAnalyticModel, the whole apply_model path runs."""

    def patch(self, model, latent, std, mean_scale):
        import comfy.model_sampling as ms
        import comfy.patcher_extension as pe

        sampling = model.get_model_object("model_sampling")
        data, family = self.data(model, latent, std, mean_scale)
        sd = float(getattr(sampling, "sigma_data", 1.0))

        def network(executor, xc, timesteps, context, y, control, transformer_options, **kwargs):
            sigma = transformer_options["sigmas"].float().flatten()[0]
            dtype, xc = xc.dtype, xc.float()
            if isinstance(sampling, ms.CONST):
                x = xc  # CONST.calculate_input is the identity
            else:
                x = xc * (sigma**2 + sd**2) ** 0.5  # EPS.calculate_input divides by sqrt(sigma^2 + sigma_data^2)
            d = data.denoise(x, sigma, family)
            if isinstance(sampling, ms.V_PREDICTION):
                # invert D = x sd^2 / (s^2 + sd^2) - v s sd / sqrt(s^2 + sd^2)
                out = (x * sd**2 / (sigma**2 + sd**2) - d) * (sigma**2 + sd**2) ** 0.5 / (sigma * sd)
            else:
                out = (x - d) / sigma  # EPS and CONST: D = x - sigma * out
            return out.to(dtype)

        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "agg_test_exact_unet", network)
        return (m,)


NODES = {"AGGTestCountingProbe": AGGTestCountingProbe, "AGGTestAnalyticModel": AGGTestAnalyticModel,
         "AGGTestExactUNet": AGGTestExactUNet}


def register() -> None:
    """Make the probe nodes available to prompts (idempotent)."""
    import nodes

    for name, cls in NODES.items():
        nodes.NODE_CLASS_MAPPINGS.setdefault(name, cls)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault(name, name)


# -- graphs ------------------------------------------------------------------------------------------


def agg_img2img(*, size: int = 32, steps: int = 3, denoise: float = 0.6, seed: int = 0, sampler_name: str = "euler",
                cfg: float = 5.0, weight: float | None = 0.05, manifold: str = "finite_difference",
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


def add_agg(g, *, weight: float = 0.05, manifold: str = "finite_difference", asymmetric: bool = True,
            end_percent: float = 1.0, consumer: str = "sampler", source=None):
    """Structure Loss on the encoded source + Apply AGG on the model input of node `consumer`."""
    loss = g.node("AGGStructureLoss", name="loss", weight=weight, source=source or g["encode"][0])
    node = g[consumer]
    apply = g.node("AGGApply", name="apply", model=g.prompt[node.id]["inputs"]["model"], loss=loss[0],
                   start_percent=0.0, end_percent=end_percent, manifold=manifold, dds_steps=1, dds_lr=0.05,
                   asymmetric=asymmetric)
    g.set_input(node, model=apply[0])
    return apply


# -- what the guidance hook saw ------------------------------------------------------------------------


@contextmanager
def guided_steps() -> Iterator[list[dict]]:
    """Record every evaluation the pack's guidance hook (the guide closure of nodes.runtime.open_run) handles
    inside the block.

    Each record: node (the AGG node's display name), family, sigma, x (the sampler state), D (the guider's
    denoised), returned (what the sampler got), guided (inside the window and not skipped), delta (the
    step on the clean estimate, D + delta is what previews show; None when not guided), terms (that step's
    reported figures: step, sigma, the loss terms, skipped, a video's frame_change). Observation only: the hook's result is returned unchanged.
    """
    runtime = pack_module("nodes.runtime")
    original_open, original_report = runtime.open_run, runtime.report
    calls: list[dict] = []
    reported: list[tuple[dict, object]] = []

    def report(node_name, step, sigma, result, node_id=None, frame_change=None):
        reported.append(({"step": step, "sigma": sigma, **result.terms, "skipped": result.skipped, "rate": result.rate,
                          "frame_change": frame_change}, result))
        return original_report(node_name, step, sigma, result, node_id, frame_change=frame_change)

    def open_run(*args, **kwargs):
        run = original_open(*args, **kwargs)

        def guide(executor, x, timestep, model_options, seed, denoised):
            before = len(reported)
            out = run.guide(executor, x, timestep, model_options, seed, denoised)
            entry, result = reported[-1] if len(reported) > before else (None, None)
            guided = entry is not None and not entry["skipped"] and result.delta is not None
            calls.append({
                "node": run.node_name, "family": run.family, "sigma": float(timestep.flatten()[0]),
                "x": x.detach().float().clone(), "D": denoised.detach().float().clone(),
                "returned": out.detach().float().clone(), "guided": guided, "terms": entry,
                "delta": ((denoised + result.delta).float() - denoised.float()).clone() if guided else None,
            })
            return out

        return replace(run, guide=guide)

    runtime.open_run, runtime.report = open_run, report
    try:
        yield calls
    finally:
        runtime.open_run, runtime.report = original_open, original_report


class FakePatcher:
    """The ModelPatcher methods nodes.runtime.install uses, recording what it installs (for harnesses that drive
    the hook closures without a model). `clone` deep-copies model_options, as ComfyUI's does."""

    def __init__(self):
        self.model_options: dict = {"transformer_options": {}}
        self.wrappers: dict[str, list] = {}  # kind -> the installed wrappers, outermost first
        self.post_cfg: list = []

    def clone(self) -> FakePatcher:
        n = FakePatcher()
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {k: list(v) for k, v in self.wrappers.items()}
        n.post_cfg = list(self.post_cfg)
        return n

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, []).append(fn)

    def set_model_sampler_post_cfg_function(self, fn):
        self.post_cfg.append(fn)


def percent_for_sigma(percent_to_sigma: Callable[[float], float], sigma: float) -> float:
    """The percent p (0..1) with percent_to_sigma(p) == sigma, by bisection (percent_to_sigma decreases)."""
    lo, hi = 1e-9, 1.0 - 1e-9
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def window_isolating(percent_to_sigma: Callable[[float], float], sigmas: list[float], i: int) -> tuple[float, float]:
    """(start_percent, end_percent) whose guidance window is exactly step i, sigmas[i] -> sigmas[i + 1]: a
    step is guided for the schedule time it shares with the window, so step i gets its whole share and its
    neighbours, which only touch the window's ends, none."""
    start = 0.0 if i == 0 else percent_for_sigma(percent_to_sigma, sigmas[i])
    below = sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
    end = 1.0 if below <= 0 else percent_for_sigma(percent_to_sigma, below)
    return start, end


def node_test_module(name: str) -> ModuleType:
    """A module of tests/nodes/ (e.g. "test_runtime"), for reusing its harness in another test file; the
    suite imports test files by path (--import-mode=importlib), so they are not importable by name."""
    import importlib.util

    key = f"agg_node_tests_{name}"
    if key not in sys.modules:
        path = PACK_ROOT / "tests" / "nodes" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


# -- an independent CLIP judge -------------------------------------------------------------------------

# OpenAI CLIP's published input statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipJudge:
    """The tiny open_clip fixture loaded straight from its file with open_clip's own classes (not through the
    pack), to judge guided results: unit text embeddings of raw texts, unit image embeddings of whole
    ComfyUI IMAGEs ([B, H, W, 3] in 0..1, resized to CLIP's input size, no cut-outs, no augmentation)."""

    def __init__(self, path) -> None:
        from agg_testing.fixtures import load_open_clip_tiny

        self.model = load_open_clip_tiny(path)
        size = self.model.visual.image_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)

    def text(self, text: str) -> torch.Tensor:
        import open_clip

        with torch.inference_mode(False), torch.no_grad():
            e = self.model.encode_text(open_clip.tokenize([text])).float()[0]
        return e / e.norm()

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels[..., :3].movedim(-1, 1).float().clamp(0, 1)
        with torch.inference_mode(False), torch.no_grad():
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                                                align_corners=False)
            x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
            e = self.model.encode_image(x).float()
        return e / e.norm(dim=-1, keepdim=True)


def node_defaults(class_type: str) -> dict:
    """Every input of a node that has a default, at that default (the node's own schema)."""
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    return {name: entry[1]["default"] for section in ("required", "optional")
            for name, entry in spec.get(section, {}).items()
            if len(entry) > 1 and isinstance(entry[1], dict) and "default" in entry[1]}


def colour_distance(image, reference) -> float:
    """README's colour distance, computed in numpy (not with the pack's colour statistics): the mean over the
    RGB channels of (mean_c - ref_mean_c)^2 + (std_c - ref_std_c)^2, each image's pixels in 0..1 ([H, W, 3] or
    [B, H, W, 3] arrays or tensors; all pixels of a batch together)."""

    def stats(a) -> tuple[np.ndarray, np.ndarray]:
        px = np.asarray(a, dtype=np.float64)[..., :3].reshape(-1, 3)
        return px.mean(0), px.std(0)

    (m, s), (rm, rs) = stats(image), stats(reference)
    return float(((m - rm) ** 2 + (s - rs) ** 2).mean())


def along(move: torch.Tensor, direction: torch.Tensor) -> tuple[float, float]:
    """(the move's component along the unit direction, the share of the move that is along it: cos)."""
    move, direction = move.flatten(), direction.flatten() / direction.norm()
    gain = float(move @ direction)
    return gain, gain / max(float(move.norm()), 1e-12)


def judged_clip_move(judge: ClipJudge, kind: str, e_out: torch.Tensor, e_base: torch.Tensor,
                     style_image: torch.Tensor | None = None) -> tuple[float, float]:
    """`along` for a guided result's embedding move from the unguided one, in the direction its loss asks for:
    the paper's text direction from the raw texts (target - 0.4 source) for CLIP Direction ("clip_direction"),
    from the unguided embedding toward the style image's for Image Style."""
    if kind == "clip_direction":
        direction = judge.text("a watercolor painting") - 0.4 * judge.text("a photo")
    else:
        direction = judge.image(style_image) - e_base
    return along(e_out - e_base, direction)


def decoded(vae, latent: torch.Tensor) -> torch.Tensor:
    """ComfyUI's own VAEDecode of a LATENT's samples: IMAGE [B, H, W, 3] in 0..1."""
    with torch.inference_mode(False), torch.no_grad():
        out = vae.decode(latent.float()).float()
    return out.reshape(-1, *out.shape[-3:])


def linear_preview(model, latent: torch.Tensor) -> torch.Tensor:
    """What ComfyUI's latent previewer shows for a LATENT's samples: the latent format's RGB factors (and bias)
    applied to the model-space latent, mapped from [-1, 1] to 0..1: IMAGE [B, h, w, 3] at latent size. As the
    previewer does, a format's factor reshape (Flux.2's unpatchify) applies first and a 5-D latent shows frame 0."""
    fmt = model.latent_format
    w = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)
    b = torch.tensor(getattr(fmt, "latent_rgb_factors_bias", None) or [0.0, 0.0, 0.0], dtype=torch.float32)
    reshape = getattr(fmt, "latent_rgb_factors_reshape", None)
    with torch.inference_mode(False), torch.no_grad():
        x = model.process_latent_in(latent.float())
        x = reshape(x) if reshape is not None else x
        x = x[:, :, 0] if x.ndim == 5 else x
        rgb = torch.einsum("bchw,cr->bhwr", x, w) + b
    return ((rgb + 1) / 2).clamp(0, 1)


class AGGTestUphillModel:
    """MODEL -> MODEL clone whose denoiser is D(x) = -slope * x: its Jacobian -slope * I is no covariance, so a
    Jacobian-carried pull points uphill on every sample (the case the guided step must fall back from)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "slope": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "AGG/testing"

    def patch(self, model, slope):
        def unet(apply_model, args):
            x = args["input"]
            return (-slope * x.float()).to(x.dtype)

        m = model.clone()
        m.set_model_unet_function_wrapper(unet)
        return (m,)


NODES["AGGTestUphillModel"] = AGGTestUphillModel


class ColourTower(torch.nn.Module):
    """An image tower whose embedding is known: the input's mean (CLIP-normalised) colour in dims 0-2, a constant
    1 in dim 3, zeros in dims 4-7."""

    def __init__(self, image_size: int = 32) -> None:
        super().__init__()
        self.image_size = image_size
        self.offset = torch.nn.Parameter(torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.float().mean((2, 3))
        return torch.cat([m, torch.zeros(m.shape[0], 5, dtype=m.dtype, device=m.device)], -1) + self.offset


class ColourCLIP(torch.nn.Module):
    """open_clip's CLIP interface (visual, encode_image, encode_text, context_length) with known embeddings: an
    image's is ColourTower's; a text's lies in dims 4-7 (a fixed random vector per token, summed), disjoint
    from every image's. So a text direction gives an image nothing to follow, and only an image's term in a
    direction can pull the result's colour, toward that image's mean colour."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = ColourTower()
        self.context_length = 77
        gen = torch.Generator().manual_seed(0)
        self.token_embedding = torch.nn.Parameter(torch.randn(49408, 4, generator=gen), requires_grad=False)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.token_embedding[tokens].sum(1)
        return torch.cat([torch.zeros(e.shape[0], 4, dtype=e.dtype, device=e.device), e], -1)


class AGGTestColourCLIP:
    """AGG_CLIP: the pack's AGGClip around a ColourCLIP, for judging CLIP losses' directions in pixel colour."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("AGG_CLIP",)
    FUNCTION = "load"
    CATEGORY = "AGG/testing"

    def load(self):
        return (pack_module("nodes.clip_model").AGGClip(ColourCLIP(), "colour-clip"),)


NODES["AGGTestColourCLIP"] = AGGTestColourCLIP


def loss_values(r, g, loss_role: str, latents: list[torch.Tensor]) -> list[dict[str, float]]:
    """The loss a loss node built for run `r` of graph `g`, evaluated by the pack's own builder on clean latents
    (VAE latent space, as the sampler returns them) at sigma 0 with the first guided step's cut-outs:
    {term: raw value} per latent."""
    from agg_kernels.objective import LossContext, evaluate

    runtime = pack_module("nodes.runtime")
    model = r.output(g["ckpt"].id).model
    info = runtime.RunInfo(model, "eps", torch.device("cpu"), tuple(latents[0].shape), torch.tensor([0.0]))
    loss = r.output(g[loss_role].id).build(info)
    out = []
    try:
        with torch.inference_mode(False), torch.no_grad():
            for lat in latents:
                x0 = model.process_latent_in(lat.float()).clone()
                ctx = LossContext(sigma=torch.zeros(x0.shape[0]), x=x0, family="eps", step=0)
                out.append({k: float(v.mean()) for k, v in evaluate(loss, x0, ctx).items()})
    finally:
        info.close()
    return out
